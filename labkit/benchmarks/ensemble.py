"""Benchmark: K ensemble members in a Python loop vs one batched forward over stacked parameters.

Members are small MLP classifiers of one architecture (the digits members' shape, wider in full
mode). The loop launches K small forwards; ``stacked_forward`` runs every layer once as a batched
matmul over [K, out, in] weights (torch.func.vmap + functional_call). On a GPU small members are
launch-bound, so the batched path should cost close to one member; on a CPU the work itself
dominates and the two are closer.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from labkit.benchmarks import peak_memory, time_fn
from labkit.device import get_device
from labkit.ensemble.members import loop_forward, stack_members, stacked_forward


def make_member(d_in: int, hidden: int, n_classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, n_classes))


def run(smoke: bool = False) -> dict:
    device = get_device()
    d_in, hidden, n_classes = 64, (64 if smoke else 256), 10
    batch = 256 if smoke else 1024
    repeat = 5 if smoke else 30

    def best_of(fn):  # the minimum is the least disturbed by other processes sharing the machine
        return time_fn(fn, warmup=2, repeat=repeat, device=device)["min_s"]

    x = torch.rand(batch, d_in, device=device)
    rows = []
    with torch.no_grad():
        one = make_member(d_in, hidden, n_classes, seed=0).to(device).eval()
        single_s = best_of(lambda: one(x))
        for k in (2, 4, 8, 16):
            members = [make_member(d_in, hidden, n_classes, seed=s).to(device).eval() for s in range(k)]
            params, buffers, skeleton = stack_members(members)
            loop = lambda: loop_forward(members, x)                               # noqa: E731
            batched = lambda: stacked_forward(params, buffers, skeleton, x)       # noqa: E731
            max_err = (loop() - batched()).abs().max().item()
            loop_s = best_of(loop)
            batched_s = best_of(batched)
            rows.append({
                "K": k,
                "loop_ms": loop_s * 1e3,
                "batched_ms": batched_s * 1e3,
                "speedup": loop_s / batched_s,
                "batched_vs_one_member": batched_s / single_s,
                "loop_peak_MiB": _mib(peak_memory(loop, device)),
                "batched_peak_MiB": _mib(peak_memory(batched, device)),
                "max_abs_diff": max_err,
            })
    return {
        "title": f"ensemble members: Python loop vs vmap over stacked parameters (MLP 64-{hidden}-{hidden}-10, batch {batch})",
        "baseline": "loop over members (speedup = loop_ms / batched_ms)",
        "columns": ["K", "loop_ms", "batched_ms", "speedup", "batched_vs_one_member",
                    "loop_peak_MiB", "batched_peak_MiB", "max_abs_diff"],
        "rows": rows,
        "notes": (f"times are the best of {repeat} runs. one member alone: {single_s * 1e3:.4g} ms per batch. "
                  "batched_vs_one_member = batched time / one "
                  "member's time (K would mean no saving). Peak memory is None where torch cannot measure it (CPU)."),
    }


def _mib(nbytes):
    return None if nbytes is None else nbytes / 2**20
