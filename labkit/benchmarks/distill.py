"""``labkit bench distill``: peak memory and time of the chunked (fused) distillation loss vs the naive one.

One forward + backward of the generalised JSD (beta = 0.5, as Liger's fused linear JSD) between a
student's and a teacher's next-token distributions, from their hidden states [N, H] and LM heads
[V, H], for vocabularies of 32k-128k and 1k-16k tokens (scaled down on a CPU). Three ways:
  naive  the full logits [N, V] of both models and plain autograd (``naive_linear_distill_loss``);
  fused  ``fused_linear_distill_loss``: chunks of C ~ N H / V tokens, gradients computed in the forward;
  trl    TRL's ``GKDTrainer.generalized_jsd_loss`` on full logits, when ``trl`` is importable.
Peak memory is what the loss adds on top of its inputs: ``torch.cuda.max_memory_allocated`` on a GPU;
on a CPU the peak resident set (VmHWM, reset through /proc/self/clear_refs) in a worker process whose
allocator returns every large block to the system (MALLOC_MMAP_THRESHOLD_), so freed memory is not
reused unseen. Anchor (issue 11): Liger at H=4096, V=128256, 8192 tokens, bf16, H100: 8.7 GB vs
56.4 GB for torch, 183 vs 195 ms. Goal: fused peak <= 1/6 of naive, time no worse, at V=128k, N=8k.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from . import peak_memory, time_fn
from ..device import get_device
from ..distill.fused import default_chunk_size, fused_linear_distill_loss, naive_linear_distill_loss


def _plan(device: torch.device, smoke: bool) -> dict:
    if smoke:
        return dict(H=64, dtype=torch.float32, sizes=[(8192, 256)], warmup=0, repeat=1)
    if device.type == "cuda":
        return dict(H=4096, dtype=torch.bfloat16, warmup=2, repeat=5,
                    sizes=[(32768, 1024), (32768, 8192), (128256, 1024), (128256, 4096), (128256, 8192),
                           (128256, 16384)])
    # a shared 2-core CPU has neither the memory nor the time for H = 4096: narrow hidden states
    return dict(H=128, dtype=torch.float32, sizes=[(32768, 512), (32768, 2048), (131072, 512)],
                warmup=0, repeat=1)


def _cpu_peak_bytes(fn) -> int | None:
    """Peak resident-set growth while running ``fn`` (Linux), or None where /proc cannot tell."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        return None

    before = status("VmRSS:")
    fn()
    return status("VmHWM:") - before


def _loss_fns(H, V, N, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device, dtype)  # noqa: E731
    h_s = mk(N, H).requires_grad_()
    w_s = mk(V, H, scale=H ** -0.5).requires_grad_()
    h_t, w_t = mk(N, H), mk(V, H, scale=H ** -0.5)
    labels = torch.zeros(N, dtype=torch.long, device=device)
    labels[: N // 8] = -100  # a prompt to mask
    args = dict(student_hidden=h_s, student_weight=w_s, teacher_hidden=h_t, teacher_weight=w_t, labels=labels,
                divergence="jsd", beta=0.5, scale_t2=False, normalize=False)
    fns = {
        "naive": lambda: naive_linear_distill_loss(**args),
        "fused": lambda: fused_linear_distill_loss(**args),
    }
    try:
        from trl import GKDTrainer

        def trl_loss():
            z_s = h_s @ w_s.T
            with torch.no_grad():
                z_t = h_t @ w_t.T
            return GKDTrainer.generalized_jsd_loss(z_s[None], z_t[None], labels=labels[None], beta=0.5)

        fns["trl"] = trl_loss
    except ImportError:
        pass
    return fns, (h_s, w_s)


def _measure(H, V, N, dtype, device, warmup, repeat) -> list[dict]:
    fns, wrt = _loss_fns(H, V, N, dtype, device)
    values, rows = {}, []
    for name, loss_fn in fns.items():
        def step():
            loss = loss_fn()
            torch.autograd.grad(loss, wrt)  # gradients are returned and freed: nothing accumulates
            return loss

        first = {}  # the measured run doubles as the warm-up and gives the loss value
        run_once = lambda: first.setdefault("loss", step().item())  # noqa: E731
        peak = peak_memory(run_once, device) if device.type == "cuda" else _cpu_peak_bytes(run_once)
        values[name] = first["loss"]
        seconds = time_fn(step, warmup=warmup, repeat=repeat, device=device)["min_s"]
        rows.append({"V": V, "N": N, "H": H, "method": name, "ms": seconds * 1e3,
                     "peak_MiB": None if peak is None else peak / 2**20,
                     "chunk": default_chunk_size(N, H, V) if name == "fused" else None})
    naive = next(r for r in rows if r["method"] == "naive")
    for r in rows:
        r["time_vs_naive"] = r["ms"] / naive["ms"]
        r["memory_vs_naive"] = (r["peak_MiB"] / naive["peak_MiB"]) if r["peak_MiB"] and naive["peak_MiB"] else None
        r["loss_diff"] = abs(values[r["method"]] - values["naive"])
    return rows


def _all_rows(smoke: bool, device: torch.device) -> list[dict]:
    plan = _plan(device, smoke)
    rows = []
    for V, N in plan["sizes"]:
        rows += _measure(plan["H"], V, N, plan["dtype"], device, plan["warmup"], plan["repeat"])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _rows_in_worker(smoke: bool) -> list[dict]:
    """CPU: measure in a fresh process whose malloc unmaps every large block when it is freed."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    command = [sys.executable, "-m", "labkit.benchmarks.distill", "--worker"] + (["--smoke"] if smoke else [])
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"the distill benchmark worker failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(smoke: bool = False) -> dict:
    device = get_device()
    rows = _all_rows(smoke, device) if device.type == "cuda" else _rows_in_worker(smoke)
    plan = _plan(device, smoke)
    has_trl = any(r["method"] == "trl" for r in rows)
    return {
        "title": f"distillation loss (generalised JSD, beta 0.5), forward + backward from hidden states "
                 f"(H={plan['H']}, {str(plan['dtype']).replace('torch.', '')})",
        "baseline": "naive: full [N, V] logits of student and teacher, plain autograd",
        "columns": ["V", "N", "method", "chunk", "ms", "peak_MiB", "time_vs_naive", "memory_vs_naive", "loss_diff"],
        "rows": rows,
        "notes": ("times are the best of the repeats (one run on a CPU, after a first run that measures memory); "
                  "peak_MiB is the memory the loss adds over its inputs "
                  + ("(CUDA max_memory_allocated)" if device.type == "cuda" else
                     "(peak RSS growth in a worker with large blocks unmapped on free)")
                  + ". Goal at V=128k, N=8k on a GPU: memory_vs_naive <= 0.17 and time_vs_naive <= 1."
                  + ("" if has_trl else " trl is not installed, so there are no trl rows.")),
    }


if __name__ == "__main__":
    if "--worker" in sys.argv:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(json.dumps(_all_rows("--smoke" in sys.argv, torch.device("cpu"))))
