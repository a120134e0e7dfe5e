"""The capstone's cost of inference: FLOPs per example (the hard gate) and measured latency.

FLOPs count the multiply-adds of every ``nn.Linear`` and ``nn.Conv2d`` that runs, times 2:

    Linear  [rows, in] -> [rows, out]:          2 * rows * in * out
    Conv2d  C_in -> C_out, k_h x k_w kernel:    2 * (C_out * H_out * W_out) * (C_in / groups) * k_h * k_w

(biases, activations, pooling, softmax and the combination rules are free: they are a few percent
of a layer's work). They are counted by forward hooks while the model runs, so what is counted is
what ran: an ensemble pays for every member, an MoE for its router and the k experts each example is
routed to, a cascade for the stages each example actually went through (the mean over the data).
The count is exact and the same on every machine, which is why the budget gate is on FLOPs.

Latency (milliseconds per batch of ``LATENCY_ROWS`` rows) is measured: a few timed runs on the grading machine, each right
after a run of the reference model so both see the same machine load; the relative latency is the
median of these paired ratios. It is gated with a tolerance (``challenge.LATENCY_TOLERANCE``).
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from ..device import synchronize
from .challenge import BUDGET_MULTIPLIER, LATENCY_TOLERANCE


class FlopCounter:
    """Forward hooks on every Linear and Conv2d of ``model``; ``total`` accumulates their FLOPs."""

    def __init__(self, model: nn.Module):
        self.total = 0
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if isinstance(m, (nn.Linear, nn.Conv2d))]

    def _hook(self, module, inputs, output):
        if isinstance(module, nn.Linear):
            rows = output.numel() // module.out_features
            self.total += 2 * rows * module.in_features * module.out_features
        else:
            kh, kw = module.kernel_size
            self.total += 2 * output.numel() * (module.in_channels // module.groups) * kh * kw

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def flops_per_example(model: nn.Module, in_features: int = 64) -> int:
    """FLOPs of one forward pass of ``model`` on one example x [1, in_features] (see module doc)."""
    device = next(model.parameters()).device
    with FlopCounter(model) as counter:
        model(torch.zeros(1, in_features, device=device))
    return counter.total


@torch.no_grad()
def submission_flops(sub, X: torch.Tensor) -> float:
    """Mean FLOPs per example that ``sub.logits`` actually spends on X [N, 64]."""
    with FlopCounter(sub.model) as counter:
        sub.logits(X)
    return counter.total / len(X)


def measure_latency(fns, X: torch.Tensor, repeats: int = 5, warmup: int = 1) -> list[list[float]]:
    """Wall times in ms of each fn(X), ``repeats`` of each, timed in turns (fn0, fn1, ..., fn0, fn1,
    ...) so that a change of machine load hits all of them alike: [len(fns)][repeats]."""
    # One CPU thread while timing: on a busy machine, intra-op threads wait on each other, and more so for
    # the many small gather/scatter ops of an MoE or a cascade (5x a single model's time with 2 threads on
    # a loaded 2-core CPU, the same as one model with 1 thread). The ratios then compare work, not stalls.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _timed_turns(fns, X, repeats, warmup)
    finally:
        torch.set_num_threads(threads)


def _timed_turns(fns, X, repeats, warmup):
    times = [[] for _ in fns]
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns:
                fn(X)
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                synchronize(X.device)
                start = time.perf_counter()
                fn(X)
                synchronize(X.device)
                times[i].append(1000.0 * (time.perf_counter() - start))
    return times


def reference_model(device=None) -> nn.Module:
    """``challenge.REFERENCE_MODEL`` from the zoo: the unit of cost."""
    from .. import zoo
    from .challenge import REFERENCE_MODEL

    return zoo.load(REFERENCE_MODEL, device=device or "cpu")


# Rows per timed batch. The pool's MLPs spend ~0.1 ms of arithmetic on a few thousand rows, so at that
# size a timing measures Python overhead: a two-stage cascade at 1.7x the FLOPs timed 2.6x the reference
# on 1795 rows and 1.8x on 28720 (2-core CPU). X is tiled to this many rows before it is timed.
LATENCY_ROWS = 16384


def submission_cost(sub, X: torch.Tensor, reference: nn.Module | None = None, latency_repeats: int = 5,
                    latency_rows: int = LATENCY_ROWS) -> dict:
    """{flops, relative_flops, latency_ms, relative_latency} of ``sub`` on X [N, 64]; FLOPs per
    example relative to the reference model's, latency of one batch of ``latency_rows`` rows (X tiled)
    relative to the reference's (measured here, now; ``latency_repeats=0`` skips the timing and leaves
    both None)."""
    reference = reference if reference is not None else reference_model(sub.device)
    flops = submission_flops(sub, X)
    cost = {"flops": flops, "relative_flops": flops / flops_per_example(reference),
            "latency_ms": None, "relative_latency": None}
    if latency_repeats > 0:
        Xd = X.repeat(-(-latency_rows // len(X)), 1)[:max(latency_rows, 1)].to(sub.device)
        ref_device = next(reference.parameters()).device
        sub_ms, ref_ms = measure_latency([sub.logits, lambda x: reference(x.to(ref_device))], Xd, latency_repeats)
        # the median of paired ratios: each pair ran back to back, under the same load
        cost.update(latency_ms=statistics.median(sub_ms),
                    relative_latency=statistics.median(s / r for s, r in zip(sub_ms, ref_ms)))
    return cost


def budget_violation(cost: dict, multiplier: float = BUDGET_MULTIPLIER,
                     latency_tolerance: float | None = LATENCY_TOLERANCE) -> str | None:
    """Why ``cost`` is over budget (one line), or None. FLOPs: a hard gate at ``multiplier`` x the
    reference. Latency: ``multiplier * (1 + latency_tolerance)`` x the reference's (None: no gate)."""
    if cost["relative_flops"] > multiplier + 1e-9:
        return (f"over budget: {cost['relative_flops']:.2f}x the reference model's FLOPs per example "
                f"(at most {multiplier:g}x)")
    if latency_tolerance is not None and cost.get("relative_latency") is not None:
        limit = multiplier * (1 + latency_tolerance)
        if cost["relative_latency"] > limit:
            return (f"over budget: latency {cost['relative_latency']:.2f}x the reference model's (at most "
                    f"{limit:g}x: {multiplier:g}x with a {100 * latency_tolerance:g}% tolerance)")
    return None
