"""Dispatch backends for a sparse mixture-of-experts layer: how the work of the experts is batched.

Every backend computes the same function of the same tensors,

    y[t] = sum_j w[t, j] * E_{e[t, j]}(x[t]),     E_e(x) = W_down[e] (silu(W_gate[e] x) * W_up[e] x)

for tokens x [T, D], expert assignments e [T, K] (the K experts each token was routed to) and routing
weights w [T, K]. An assignment equal to ``num_experts`` is a *sentinel*: the slot was dropped (over
capacity, or not chosen by expert-choice routing) and adds nothing. Expert weights use the layout of
transformers' ``MixtralExperts``: ``gate_up_proj`` [E, 2F, D] (gate rows first, then up rows) and
``down_proj`` [E, D, F], applied as ``F.linear``.

The backends differ only in how the T*K (token, expert) pairs are batched:

* ``loop``     one small matmul per expert that received tokens (the reference; a host sync per expert);
* ``sort``     sort the pairs by expert, scatter them into a padded [E, C, D] buffer with a static
               capacity C, two batched matmuls, gather back: no host synchronisation and static shapes,
               paid for with padded FLOPs (dropless C = T, so E/K times the useful work);
* ``grouped``  sort the pairs by expert, then one grouped GEMM per projection over the jagged segments
               (``torch.nn.functional.grouped_mm``): no padding and no host sync;
* ``gather``   gather each pair's expert weights and do a batched matrix-vector product (what gpt-fast
               does for Mixtral decoding): only sensible for a handful of tokens.

``choose_backend`` picks one from the device, dtype and number of tokens. (Also importable under its
old name, ``labkit.moe_dispatch``.)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BACKENDS = ("loop", "sort", "grouped", "gather")


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused projection: [..., 2F] -> [..., F], silu(gate) * up (Shazeer 2020)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def check_dispatch_inputs(x, experts, weights, gate_up_proj, down_proj) -> None:
    """Raise a clear error when the tensors handed to a backend do not fit together."""
    if x.dim() != 2:
        raise ValueError(f"x must be [T, D], got shape {tuple(x.shape)}")
    if gate_up_proj.dim() != 3 or down_proj.dim() != 3:
        raise ValueError(f"gate_up_proj must be [E, 2F, D] and down_proj [E, D, F], got "
                         f"{tuple(gate_up_proj.shape)} and {tuple(down_proj.shape)}")
    E, two_f, D = gate_up_proj.shape
    if two_f % 2:
        raise ValueError(f"gate_up_proj's middle dimension must be 2F (gate and up), got {two_f}")
    if tuple(down_proj.shape) != (E, D, two_f // 2):
        raise ValueError(f"down_proj must be [E, D, F] = {(E, D, two_f // 2)} to match gate_up_proj "
                         f"{tuple(gate_up_proj.shape)}, got {tuple(down_proj.shape)}")
    if x.shape[1] != D:
        raise ValueError(f"x has hidden size {x.shape[1]} but the experts expect {D}")
    if experts.dim() != 2 or experts.shape[0] != x.shape[0]:
        raise ValueError(f"experts must be [T, K] with T = {x.shape[0]}, got {tuple(experts.shape)}")
    if experts.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"experts must be an integer tensor, got {experts.dtype}")
    if tuple(weights.shape) != tuple(experts.shape):
        raise ValueError(f"weights {tuple(weights.shape)} must have the shape of experts {tuple(experts.shape)}")
    if not weights.is_floating_point():
        raise TypeError(f"weights must be floating point, got {weights.dtype}")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for low-precision activations (and float32), float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def combine(y_slots: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Weighted sum over each token's K slots, accumulated in float32 (at least): [T, K, D], [T, K] -> [T, D]."""
    acc = accumulation_dtype(y_slots.dtype)
    return (y_slots.to(acc) * weights.to(acc).unsqueeze(-1)).sum(dim=1).to(dtype)


def sort_by_expert(experts: torch.Tensor, num_experts: int):
    """Group the flattened (token, slot) pairs by expert, without a host synchronisation.

    experts [T, K] -> ``perm`` [T*K] (a stable sort of the flattened pairs by expert id; pair ``perm[i]``
    belongs to token ``perm[i] // K``), ``sorted_experts`` [T*K] and ``offsets`` [E] (``offsets[e]`` is
    the end of expert e's segment, i.e. cumulative token counts: the ``offs`` of a grouped GEMM).
    Sentinel pairs (``experts == num_experts``) sort to the tail, past ``offsets[-1]``.
    """
    sorted_experts, perm = torch.sort(experts.reshape(-1), stable=True)
    # searchsorted instead of bincount: bincount needs the max value on the host, this does not
    bounds = torch.arange(num_experts, device=experts.device, dtype=sorted_experts.dtype)
    offsets = torch.searchsorted(sorted_experts, bounds, right=True)
    return perm, sorted_experts, offsets


def _unsort(rows: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Undo a row permutation: out[perm[i]] = rows[i] (one scatter; its backward is a gather)."""
    return rows.new_empty(rows.shape).index_copy(0, perm, rows)


# ---------------------------------------------------------------------------------------- backends
def dispatch_loop(x, experts, weights, gate_up_proj, down_proj, capacity=None):
    """Reference: for each expert, gather its tokens, run the expert, add the weighted result back."""
    T, D = x.shape
    acc = accumulation_dtype(x.dtype)
    out = torch.zeros(T, D, dtype=acc, device=x.device)
    for e in range(gate_up_proj.shape[0]):
        token, slot = torch.where(experts == e)  # host sync: fine for a reference
        if token.numel() == 0:
            continue
        h = swiglu(F.linear(x[token], gate_up_proj[e]))  # [n, F]
        y = F.linear(h, down_proj[e])  # [n, D]
        out = out.index_add(0, token, y.to(acc) * weights[token, slot].to(acc).unsqueeze(-1))
    return out.to(x.dtype)


def dispatch_sort(x, experts, weights, gate_up_proj, down_proj, capacity=None):
    """Sort by expert, scatter into a padded [E, C, D] buffer, two ``bmm``s, gather back.

    ``capacity`` C is the static number of rows per expert; without one, C = T, which holds every
    token as long as no token picks the same expert twice. No host synchronisation anywhere.
    """
    T, D = x.shape
    K = experts.shape[1]
    E = gate_up_proj.shape[0]
    C = T if capacity is None else min(int(capacity), T)
    perm, sorted_e, offsets = sort_by_expert(experts, E)
    starts = torch.cat([offsets.new_zeros(1), offsets[:-1]])  # [E] first row of each expert
    expert_of_row = sorted_e.clamp(max=E - 1)
    pos = torch.arange(perm.numel(), device=x.device) - starts[expert_of_row]  # rank within expert
    keep = (sorted_e < E) & (pos < C)
    slot = torch.where(keep, expert_of_row * C + pos, E * C)  # row E*C is a dummy for dropped pairs
    buf = x.new_zeros(E * C + 1, D).index_put((slot,), x[perm // K])  # [E*C+1, D]
    h = swiglu(torch.bmm(buf[: E * C].view(E, C, D), gate_up_proj.transpose(1, 2)))  # [E, C, F]
    yb = torch.bmm(h, down_proj.transpose(1, 2)).reshape(E * C, D)  # [E*C, D]
    y_sorted = torch.cat([yb, yb.new_zeros(1, D)])[slot]  # [T*K, D], dropped pairs read zeros
    y_slots = _unsort(y_sorted, perm).view(T, K, D)
    return combine(y_slots, weights, x.dtype)


_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_MM_BROKEN: set = set()  # (device type, dtype) pairs where a first call raised


def grouped_mm_supported(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> bool:
    """Can ``torch``'s grouped GEMM run these shapes here? (torch >= 2.8; CUDA needs SM80+;
    bf16/fp16/fp32 on CPU, bf16 on CUDA as documented; rows must be 16-byte aligned.)"""
    if _GROUPED_MM is None or (x.device.type, x.dtype) in _GROUPED_MM_BROKEN:
        return False
    if x.dtype != gate_up_proj.dtype or x.dtype != down_proj.dtype:
        return False
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0):
            return False
    elif x.device.type == "cpu":
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
    else:
        return False
    size = x.element_size()
    dims = (x.shape[1], down_proj.shape[2], gate_up_proj.shape[1])
    ptrs = (gate_up_proj.data_ptr(), down_proj.data_ptr())
    return all(d * size % 16 == 0 for d in dims) and all(p % 16 == 0 for p in ptrs)


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    # grouped_mm's backward rejects gradients with zero strides (e.g. from .sum()): make them dense
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


def dispatch_grouped(x, experts, weights, gate_up_proj, down_proj, capacity=None):
    """Sort by expert, then one grouped GEMM per projection over the jagged per-expert segments."""
    T, D = x.shape
    K = experts.shape[1]
    E = gate_up_proj.shape[0]
    perm, sorted_e, offsets = sort_by_expert(experts, E)
    offs = offsets.to(torch.int32)
    # rows past offs[-1] (dropped pairs) are skipped by the kernel and left uninitialised, in the
    # forward and in the input gradient: zero the output rows, and zero the input rows when a gradient
    # will flow (masked_fill's backward then zeroes theirs). Rows never mix, so h needs no mask.
    dropped = (sorted_e >= E).unsqueeze(-1)  # [T*K, 1]
    xs = x[perm // K]  # [T*K, D]
    if xs.requires_grad:
        xs = xs.masked_fill(dropped, 0.0)
    h = swiglu(_contiguous_grad(_GROUPED_MM(xs, gate_up_proj.transpose(1, 2), offs=offs)))  # [T*K, F]
    y = _contiguous_grad(_GROUPED_MM(h, down_proj.transpose(1, 2), offs=offs))  # [T*K, D]
    y = y.masked_fill(dropped, 0.0)
    y_slots = _unsort(y, perm).view(T, K, D)
    return combine(y_slots, weights, x.dtype)


def dispatch_gather(x, experts, weights, gate_up_proj, down_proj, capacity=None):
    """Per pair, gather the expert's weights and do a matrix-vector product (gpt-fast's decode path)."""
    T, D = x.shape
    K = experts.shape[1]
    E = gate_up_proj.shape[0]
    flat = experts.reshape(-1)
    dropped = (flat >= E).unsqueeze(-1)
    idx = flat.clamp(max=E - 1)
    xr = x.unsqueeze(1).expand(T, K, D).reshape(T * K, D, 1)
    h = swiglu(torch.bmm(gate_up_proj[idx], xr).squeeze(-1))  # [T*K, 2F, D] @ [T*K, D, 1] -> [T*K, F]
    y = torch.bmm(down_proj[idx], h.unsqueeze(-1)).squeeze(-1)  # [T*K, D]
    y = y.masked_fill(dropped, 0.0)
    return combine(y.view(T, K, D), weights, x.dtype)


_FUNCTIONS = {"loop": dispatch_loop, "sort": dispatch_sort, "grouped": dispatch_grouped,
              "gather": dispatch_gather}

# Why the thresholds are what they are. All backends do the same useful FLOPs (``expert_flops``);
# they differ in overhead, padding and weight traffic:
# * loop: E small dense GEMMs, each behind a host sync and a gather/scatter of its rows; the fixed cost
#   per expert is amortised once an expert gets enough rows, and the dense GEMM is the best-tuned kernel
#   there is. Its backward, though, is a pile of small ops, so it only wins forward-only.
# * grouped: one kernel per projection, no padding, no sync, but a less tuned kernel than a plain GEMM
#   on a CPU: it wins while experts get few rows and whenever a backward follows.
# * sort: static shapes and no sync, paid for with a padded [E, C] buffer (C = T when dropless, so E/K
#   times the useful FLOPs): free while the GPU is latency-bound (few rows per expert), the biggest
#   cost once it is compute-bound. A CPU is never latency-bound enough to hide the padding.
# * gather: copies each pair's expert weights (2F*D + D*F values per pair), so weight traffic grows
#   with pairs instead of with active experts: cheaper than any sort only for a handful of pairs
#   (decoding one or two sequences), never on a CPU where the copy is as slow as the matmul.
# CPU: beyond ~32 rows per expert the loop's dense GEMMs outrun the grouped kernel (forward only).
CPU_GROUPED_MAX_PAIRS_PER_EXPERT = 32
# CUDA: grouped GEMM whenever torch has it for the dtype (it reads each active expert's weights once);
# without it, the weight gather up to ~8 pairs (4 tokens x top-2), the padded sort while the average
# expert gets <= 64 rows (padding is hidden by latency), and the loop beyond, where E host syncs are
# cheap next to the GEMMs. These two are set from the cost model above; `labkit bench moe` on a GPU
# writes the timings that check them (bench/results/).
CUDA_GATHER_MAX_PAIRS = 8
CUDA_SORT_MAX_PAIRS_PER_EXPERT = 64


def choose_backend(x: torch.Tensor, top_k: int, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> str:
    """Pick a backend from the device, the dtype, the number of (token, expert) pairs and whether a
    backward pass will follow."""
    pairs, num_experts = x.shape[0] * top_k, gate_up_proj.shape[0]
    grouped = grouped_mm_supported(x, gate_up_proj, down_proj)
    if x.device.type == "cuda":
        if grouped:
            return "grouped"
        if pairs <= CUDA_GATHER_MAX_PAIRS:
            return "gather"
        return "sort" if pairs <= CUDA_SORT_MAX_PAIRS_PER_EXPERT * num_experts else "loop"
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or gate_up_proj.requires_grad)
    if grouped and (needs_grad or pairs <= CPU_GROUPED_MAX_PAIRS_PER_EXPERT * num_experts):
        return "grouped"
    return "loop"


def dispatch(x, experts, weights, gate_up_proj, down_proj, backend: str = "auto", capacity=None):
    """Run the experts on routed tokens with the chosen backend: x [T, D] -> y [T, D].

    experts [T, K] (int, ``num_experts`` marks a dropped slot), weights [T, K] (float), gate_up_proj
    [E, 2F, D], down_proj [E, D, F]. ``capacity`` (rows per expert) only sizes the ``sort`` buffer.
    """
    check_dispatch_inputs(x, experts, weights, gate_up_proj, down_proj)
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        # do autocast's cast up front, so the experts' GEMMs (grouped_mm included) run in bf16/fp16
        low = torch.get_autocast_dtype("cuda")
        x, gate_up_proj, down_proj = x.to(low), gate_up_proj.to(low), down_proj.to(low)
    if backend == "auto":
        backend = choose_backend(x, experts.shape[1], gate_up_proj, down_proj)
    if backend not in _FUNCTIONS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if x.shape[0] == 0:
        return x.new_zeros(0, x.shape[1])
    experts = experts.long()
    if backend == "grouped":
        if not grouped_mm_supported(x, gate_up_proj, down_proj):
            backend = "sort" if x.device.type == "cuda" else "loop"
        else:
            try:
                return dispatch_grouped(x, experts, weights, gate_up_proj, down_proj, capacity)
            except (RuntimeError, NotImplementedError):  # a torch build without this kernel
                _GROUPED_MM_BROKEN.add((x.device.type, x.dtype))
                backend = "sort" if x.device.type == "cuda" else "loop"
    return _FUNCTIONS[backend](x, experts, weights, gate_up_proj, down_proj, capacity)


def expert_flops(num_tokens: int, top_k: int, hidden: int, intermediate: int) -> int:
    """Useful FLOPs of the routed SwiGLU experts: 2 * T * K * 3 * D * F (three D x F matmuls)."""
    return 2 * num_tokens * top_k * 3 * hidden * intermediate


def padded_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Rows per expert under a capacity factor: ceil(cf * T * K / E) (Switch Transformer, GShard)."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))
