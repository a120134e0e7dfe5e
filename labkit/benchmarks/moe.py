"""``labkit bench moe``: the MoE dispatch backends against transformers' own experts implementations.

Same weights, same routing, same shapes for everyone: the experts' forward (and forward + backward)
is timed for labkit's ``loop``, ``sort``, ``grouped``, ``gather`` and ``auto`` backends and for
transformers' ``MixtralExperts`` under its ``eager``, ``grouped_mm`` and ``batched_mm``
implementations, over decode batches (1-64 tokens) and prefill batches (up to 16k tokens on a GPU).
Achieved TFLOP/s counts the useful expert FLOPs, 2 * T * K * 3 * D * F (x3 with the backward), and is
reported as a fraction of a dense matmul measured in the same run and dtype (bf16 on CUDA, float32
on CPU, where bf16 matmuls are slow). Rows carry the speed-up over the fastest transformers
implementation at that size (> 1: faster). Times are the best of several runs (min), which is what
a shared machine can measure reliably.
"""
from __future__ import annotations

import torch

from ..moe import backends as md
from . import peak_memory, time_fn
from ..device import get_device, synchronize

LABKIT_IMPLS = ("loop", "sort", "grouped", "gather", "auto")
HF_IMPLS = ("eager", "grouped_mm", "batched_mm")


def _plan(device: torch.device, smoke: bool) -> dict:
    if smoke:
        return dict(dtype=torch.float32, configs=[dict(name="tiny", D=32, F=64, E=4, K=2)],
                    decode=[1, 4], prefill=[64], warmup=1, repeat=3, min_time=0.02, budget=2**28, dense=256)
    if device.type == "cuda":
        return dict(dtype=torch.bfloat16,
                    configs=[dict(name="mixtral-8x7b", D=4096, F=14336, E=8, K=2),
                             dict(name="olmoe-64x1b", D=2048, F=1024, E=64, K=8)],
                    decode=[1, 2, 4, 8, 16, 32, 64], prefill=[256, 1024, 4096, 16384],
                    warmup=3, repeat=10, min_time=0.1, budget=24 * 2**30, dense=8192)
    # a CPU has neither the memory nor the time for model-sized layers: scaled-down shapes
    return dict(dtype=torch.float32, configs=[dict(name="cpu-8x", D=128, F=256, E=8, K=2)],
                decode=[1, 4, 16, 64], prefill=[256, 1024, 4096], warmup=1, repeat=3, min_time=0.1, budget=2**30, dense=1024)


def dense_tflops(n: int, dtype, device) -> float:
    """Measured rate of one dense n x n x n matmul: the ceiling the experts' GEMMs are compared to."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, warmup=2, repeat=5, device=device, min_time=0.2)["min_s"]
    return 2 * n**3 / t / 1e12


def _hf_experts(D, F, E, gate_up, down, impl):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E)
    with torch.device("meta"):
        experts = MixtralExperts(cfg)
    experts.gate_up_proj, experts.down_proj = gate_up, down  # the very same Parameters
    experts.config._experts_implementation = impl
    return experts


def _bytes_needed(impl, T, D, F, E, K, elsize) -> int:
    """Rough activation memory of one forward + backward, to skip what cannot fit."""
    pairs = T * K
    if impl in ("gather", "hf:batched_mm"):
        return pairs * 3 * D * F * elsize * 3  # per-pair weight copies (and their gradients)
    if impl == "sort":
        return E * T * (2 * D + 3 * F) * elsize * 3  # padded [E, T, .] buffers
    return pairs * (2 * D + 3 * F) * elsize * 3


def run(smoke: bool = False) -> dict:
    device = get_device()
    if device.type == "cpu":
        # one thread: on a shared CPU, OpenMP threads waiting for each other made 2-thread timings
        # 10-100x noisier than the work measured. Left set, so the JSON records what was measured.
        torch.set_num_threads(1)
    plan = _plan(device, smoke)
    dtype = plan["dtype"]
    dense = dense_tflops(plan["dense"], dtype, device)
    rows, wins, sizes, best_frac = [], 0, 0, 0.0
    for cfg in plan["configs"]:
        D, F, E, K = cfg["D"], cfg["F"], cfg["E"], cfg["K"]
        g = torch.Generator().manual_seed(0)
        gate_up = torch.nn.Parameter((torch.randn(E, 2 * F, D, generator=g) / D**0.5).to(device, dtype))
        down = torch.nn.Parameter((torch.randn(E, D, F, generator=g) / F**0.5).to(device, dtype))
        router = (torch.randn(E, D, generator=g) / D**0.5).to(device)
        impls = {f"hf:{name}": _hf_experts(D, F, E, gate_up, down, name) for name in HF_IMPLS}
        for phase, sizes_ in (("decode", plan["decode"]), ("prefill", plan["prefill"])):
            for T in sizes_:
                x = torch.randn(T, D, generator=g).to(device, dtype)
                weights, experts = torch.softmax(x.float() @ router.t(), -1).topk(K)
                weights = weights / weights.sum(-1, keepdim=True)
                dy = torch.randn(T, D, generator=g).to(device, dtype)
                flops = md.expert_flops(T, K, D, F)
                with torch.no_grad():
                    reference = impls["hf:eager"](x, experts, weights).float()
                for mode in ("fwd", "fwd+bwd"):
                    if mode == "fwd":
                        with torch.no_grad():
                            chosen = md.choose_backend(x, K, gate_up, down)
                    else:
                        chosen = md.choose_backend(x.detach().requires_grad_(), K, gate_up, down)
                    measured = {}
                    for impl in LABKIT_IMPLS + tuple(impls):
                        if _bytes_needed(chosen if impl == "auto" else impl, T, D, F, E, K,
                                         x.element_size()) > plan["budget"]:
                            continue
                        if impl.startswith("hf:"):
                            layer = impls[impl]
                            call = lambda xx, ww: layer(xx, experts, ww)  # noqa: E731
                        else:
                            call = lambda xx, ww, b=impl: md.dispatch(xx, experts, ww, gate_up, down, backend=b)  # noqa: E731
                        if mode == "fwd":
                            def fn(call=call):
                                with torch.no_grad():
                                    return call(x, weights)
                        else:
                            xg, wg = x.detach().requires_grad_(), weights.detach().requires_grad_()

                            def fn(call=call, xg=xg, wg=wg):
                                y = call(xg, wg)
                                return torch.autograd.grad(y, (xg, wg, gate_up, down), dy)
                        try:
                            t = time_fn(fn, warmup=plan["warmup"], repeat=plan["repeat"], device=device,
                                        min_time=plan["min_time"])["min_s"]
                            mem = peak_memory(fn, device) if mode == "fwd+bwd" else None
                        except torch.OutOfMemoryError:
                            torch.cuda.empty_cache()
                            continue
                        synchronize(device)
                        err = None
                        if mode == "fwd":  # same function, whoever computes it
                            y = fn().float()
                            err = ((y - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item()
                        measured[impl] = (t, mem, err)
                    hf_best = min((t for k, (t, _, _) in measured.items() if k.startswith("hf:")), default=None)
                    for impl, (t, mem, err) in measured.items():
                        work = flops * (3 if mode == "fwd+bwd" else 1)
                        rows.append({
                            "config": cfg["name"], "phase": phase, "tokens": T, "pass": mode,
                            "impl": f"auto->{chosen}" if impl == "auto" else impl,
                            "ms": round(t * 1e3, 4), "TFLOP/s": round(work / t / 1e12, 4),
                            "x_vs_best_hf": None if hf_best is None else round(hf_best / t, 3),
                            "peak_MB": None if mem is None else round(mem / 2**20, 1),
                            "tokens_per_expert": round(T * K / E, 1),
                            "rel_err_vs_hf_eager": None if err is None else float(f"{err:.2e}"),
                        })
                        if impl == "auto":
                            sizes += 1
                            wins += hf_best is None or t <= hf_best * 1.05
    dense = max(dense, dense_tflops(plan["dense"], dtype, device))  # best of before and after: load varies
    for row in rows:
        row["frac_dense"] = round(row["TFLOP/s"] / dense, 4)
        if row["impl"].startswith("auto") and row["tokens_per_expert"] >= 1000:
            best_frac = max(best_frac, row["frac_dense"])
    notes = (f"dense {dtype} matmul ({plan['dense']}^3, best of a run before and after): {dense:.3f} TFLOP/s. "
             f"auto within 5% of or faster than the fastest transformers implementation at {wins}/{sizes} "
             f"(size, pass) points. Best auto fraction of the dense rate at >= 1000 tokens per expert: "
             f"{best_frac:.2f}" + (" (no such size in this run)" if best_frac == 0 else "") + ". "
             "Rows skipped where the estimated memory exceeded the plan's budget (gather / batched_mm copy "
             "weights per token).")
    return {
        "title": "MoE experts: labkit dispatch backends vs transformers' experts implementations",
        "baseline": "fastest transformers MixtralExperts implementation (eager / grouped_mm / batched_mm), same size",
        "columns": ["config", "phase", "tokens", "pass", "impl", "ms", "TFLOP/s", "frac_dense", "x_vs_best_hf",
                    "peak_MB", "rel_err_vs_hf_eager"],
        "rows": rows,
        "notes": notes,
        "dense_tflops": dense,
    }
