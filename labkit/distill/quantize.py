"""Distil, then quantise: int8 weights for the distilled student, with accuracy, size and latency.

Distillation makes the model smaller; int8 makes each remaining weight 4x smaller again, and the two
stack (the efficiency anchors of the course's inference-cost discussion). Two variants, both with
torch's own tools:

  * dynamic quantisation (``torch.ao.quantization.quantize_dynamic``): Linear weights stored as int8
    with one scale per layer; activations quantised on the fly per batch. CPU kernels (fbgemm /
    qnnpack) only, so the quantised model lives on the CPU.
  * weight-only int8 (``weight_only_int8``): each Linear's weight rounded to int8 with one scale per
    output row, w ~= s_r * q, q in [-127, 127], and dequantised for the matmul. Any device; it shows the
    rounding error alone (the size saving is what int8 storage would give).
"""
from __future__ import annotations

import copy
import io
import time
import warnings

import torch
import torch.nn as nn


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the CPU with every ``nn.Linear`` dynamically quantised to int8."""
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError as e:  # torch announces the eager API's move to torchao
        raise ImportError("torch.ao.quantization.quantize_dynamic is not in this torch; use weight_only_int8") from e

    cpu_copy = copy.deepcopy(model).to("cpu").eval()
    if not any(isinstance(m, nn.Linear) for m in cpu_copy.modules()):
        raise ValueError("model has no nn.Linear layer to quantise")
    with warnings.catch_warnings():  # the deprecation notices say nothing about the result
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(cpu_copy, {nn.Linear}, dtype=torch.qint8)


@torch.no_grad()
def weight_only_int8(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy with each Linear weight replaced by its int8 round trip (per-row absmax scale).

        s_r = max_j |w_rj| / 127,   q_rj = round(w_rj / s_r),   w_rj <- s_r q_rj

    Returns (model, int8 storage in bytes of the quantised weights incl. their float32 scales).
    Weights tied to several modules (an LM's embedding and head) are rounded once.
    """
    out = copy.deepcopy(model).eval()
    nbytes, seen = 0, set()
    for module in out.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            w = module.weight
            scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
            q = torch.round(w / scale).clamp(-127, 127)
            w.copy_(q * scale)
            nbytes += w.numel() + scale.numel() * 4
    if not seen:
        raise ValueError("model has no nn.Linear layer to quantise")
    return out, nbytes


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: what the checkpoint costs on disk (packed int8
    weights for a dynamically quantised model)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


@torch.no_grad()
def latency_ms(model: nn.Module, inputs: torch.Tensor, repeat: int = 20, warmup: int = 3) -> float:
    """Best-of-``repeat`` wall time in ms of one forward on ``inputs`` (on the model's device).

    The minimum is the figure least disturbed by other processes; use a benchmark for careful timing.
    """
    params = list(model.parameters())
    inputs = inputs.to(params[0].device if params else "cpu")  # a dynamically quantised model has none: CPU
    for _ in range(warmup):
        model(inputs)
    best = float("inf")
    for _ in range(repeat):
        if inputs.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(inputs)
        if inputs.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


@torch.no_grad()
def quantization_report(model: nn.Module, X: torch.Tensor, y: torch.Tensor, repeat: int = 20) -> list[dict]:
    """Rows for a classifier: float32 vs dynamic int8 vs weight-only int8, each with accuracy, size
    (bytes) and latency (ms, CPU, whole ``X`` as one batch)."""
    float_model = copy.deepcopy(model).to("cpu").eval()
    X, y = X.cpu(), torch.as_tensor(y).cpu()

    def accuracy(m):
        return (m(X).argmax(-1) == y).float().mean().item()

    dynamic = quantize_dynamic_int8(float_model)
    weight_only, weight_only_bytes = weight_only_int8(float_model)
    linear_float_bytes = sum(m.weight.numel() * 4 for m in float_model.modules() if isinstance(m, nn.Linear))
    other_bytes = model_size_bytes(float_model) - linear_float_bytes
    rows = [
        {"model": "float32", "accuracy": accuracy(float_model), "size_bytes": model_size_bytes(float_model),
         "latency_ms": latency_ms(float_model, X, repeat)},
        {"model": "int8 dynamic", "accuracy": accuracy(dynamic), "size_bytes": model_size_bytes(dynamic),
         "latency_ms": latency_ms(dynamic, X, repeat)},
        {"model": "int8 weight-only", "accuracy": accuracy(weight_only),
         "size_bytes": other_bytes + weight_only_bytes, "latency_ms": latency_ms(weight_only, X, repeat)},
    ]
    return rows
