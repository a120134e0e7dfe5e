"""Sparse mixture of experts: routers, balancing losses, capacity, SwiGLU experts, interop, expert parallelism.

A sparse MoE layer replaces one feed-forward block by E expert blocks and a router that sends each
token to K of them (Shazeer et al. 2017, "Outrageously large neural networks"):

    y(x) = sum_{e in TopK(x)} g_e(x) * E_e(x)

so the layer holds E experts' parameters but spends the FLOPs of K. The routers, losses and capacity
logic live here; how the experts' work is batched (loop / sort / grouped GEMM / weight gather) lives in
``labkit.moe_dispatch``. Router math is done in float32 whatever the model dtype. Expert weights use
transformers' layout (``gate_up_proj`` [E, 2F, D], ``down_proj`` [E, D, F]), so a ``MoELayer`` can be
built from a transformers Mixtral / Qwen2-MoE / Qwen3-MoE block with the same weights and outputs.

Shapes: T tokens, D hidden size, F expert intermediate size, E experts, K experts per token.
An expert id equal to E in an assignment tensor [T, K] marks a dropped (token, slot) pair.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .moe_dispatch import BACKENDS, combine, dispatch, expert_flops, padded_capacity, sort_by_expert

__all__ = [
    "Routing", "router_logits", "softmax_topk", "topk_softmax", "noisy_logits", "sigmoid_topk",
    "update_selection_bias", "expert_choice", "load_balancing_loss", "router_z_loss", "expert_capacity",
    "apply_capacity", "routing_stats", "Router", "SwiGLU", "SwiGLUExperts", "MoELayer", "upcycle_mlp",
    "moefy", "moe_layers", "moe_aux_loss", "to_mixtral", "prompt_router_weights", "moe_from_dense",
    "ExpertParallelMoE", "moe_flops", "dispatch", "sort_by_expert", "BACKENDS", "ROUTERS",
]

ROUTERS = ("softmax_topk", "topk_softmax", "sigmoid", "expert_choice")


def _check_logits(logits: torch.Tensor, k: int | None = None, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"{name} must be a [T, E] tensor, got {getattr(logits, 'shape', type(logits))}")
    if k is not None and not 1 <= k <= logits.shape[1]:
        raise ValueError(f"top_k must be in [1, E={logits.shape[1]}], got {k}")


def _f32(t: torch.Tensor) -> torch.Tensor:
    """At least float32: bf16/fp16 router math is upcast, float64 stays float64."""
    return t if t.dtype == torch.float64 else t.float()


# ------------------------------------------------------------------------------------------ routers
@dataclass
class Routing:
    """A router's decision for T tokens."""
    experts: torch.Tensor  # [T, K] int64; E marks a dropped slot
    weights: torch.Tensor  # [T, K] float32 combine weights (0 for dropped slots)
    logits: torch.Tensor  # [T, E] float32 router logits (noisy ones when noise was added)
    probs: torch.Tensor  # [T, E] float32 softmax (or sigmoid scores for the sigmoid router)
    dropped: torch.Tensor | None = None  # [T, K] bool, slots dropped by the capacity limit


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router logits in float32: x [T, D], weight [E, D] -> [T, E]. Low-precision logits make
    near-ties flip between experts, so routers always compute in float32 (as DeepSeek-V3 does)."""
    with torch.autocast(x.device.type, enabled=False):  # autocast would run the linear in bf16
        return F.linear(_f32(x), weight.to(_f32(x).dtype))


def softmax_topk(logits: torch.Tensor, k: int, renormalize: bool = True):
    """Mixtral routing: p = softmax(logits); keep the top k; renormalise them to sum to 1.

    logits [T, E] -> (weights [T, k] float32, experts [T, k] int64). Equals transformers'
    ``MixtralTopKRouter`` (and Qwen-MoE's with ``norm_topk_prob``).
    """
    _check_logits(logits, k)
    probs = torch.softmax(_f32(logits), dim=-1)
    weights, experts = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def topk_softmax(logits: torch.Tensor, k: int):
    """Shazeer et al. (2017) routing: G(x) = softmax(KeepTopK(H(x), k)): the softmax runs over the k
    kept logits only. Same experts as ``softmax_topk``; the weights equal its renormalised ones."""
    _check_logits(logits, k)
    top, experts = torch.topk(_f32(logits), k, dim=-1)
    return torch.softmax(top, dim=-1), experts


def noisy_logits(x: torch.Tensor, weight: torch.Tensor, noise_weight: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Noisy top-k gating (Shazeer et al. 2017, eq. 4): H(x) = x W_g + N(0, 1) * softplus(x W_noise).

    The learned, input-dependent noise spreads load early in training; use it in training only.
    """
    clean = router_logits(x, weight)
    std = F.softplus(router_logits(x, noise_weight))
    noise_device = generator.device if generator is not None else clean.device
    noise = torch.randn(clean.shape, generator=generator, device=noise_device).to(clean.device)
    return clean + noise * std


def sigmoid_topk(logits: torch.Tensor, k: int, bias: torch.Tensor | None = None,
                 renormalize: bool = True, scale: float = 1.0):
    """DeepSeek-V3 routing: s = sigmoid(logits); choose the top k of s + b, where the bias b only
    steers selection (it is updated from the load, not learned); weights are the unbiased s of the
    chosen experts, renormalised and scaled. -> (weights [T, k] float32, experts [T, k] int64)."""
    _check_logits(logits, k)
    scores = torch.sigmoid(_f32(logits))
    choice = scores if bias is None else scores + bias.to(scores.dtype)
    _, experts = torch.topk(choice, k, dim=-1)
    weights = scores.gather(1, experts)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scale, experts


def update_selection_bias(bias: torch.Tensor, tokens_per_expert: torch.Tensor, rate: float) -> torch.Tensor:
    """Auxiliary-loss-free balancing (DeepSeek-V3, after Wang et al. 2024): b_e += rate * sign(mean load -
    load_e): overloaded experts become less likely to be chosen, underloaded ones more."""
    if tuple(bias.shape) != tuple(tokens_per_expert.shape):
        raise ValueError(f"bias {tuple(bias.shape)} and tokens_per_expert {tuple(tokens_per_expert.shape)} differ")
    load = tokens_per_expert.float()
    return bias + rate * torch.sign(load.mean() - load).to(bias.dtype)


def expert_choice(logits: torch.Tensor, capacity: int):
    """Expert-choice routing (Zhou et al. 2022): each expert picks its top-``capacity`` tokens by
    softmax score. A token may get any number of experts, including none; load is perfectly balanced.
    Returned in the [T, E] slot form of token-choice routing: slot e holds expert e if it chose the
    token, else the sentinel E with weight 0. Note it looks at the whole batch, so it is not causal.
    """
    _check_logits(logits)
    T, E = logits.shape
    if not 1 <= capacity <= T:
        raise ValueError(f"capacity must be in [1, T={T}], got {capacity}")
    probs = torch.softmax(_f32(logits), dim=-1)  # [T, E]
    gate, token = torch.topk(probs.t(), capacity, dim=-1)  # [E, C]
    chosen = torch.zeros(E, T, dtype=torch.bool, device=logits.device)
    chosen.scatter_(1, token, True)
    chosen = chosen.t()  # [T, E]
    slot_ids = torch.arange(E, device=logits.device).expand(T, E)
    experts = torch.where(chosen, slot_ids, torch.full_like(slot_ids, E))
    weights = probs * chosen
    return weights, experts


# ----------------------------------------------------------------------------- losses and statistics
def load_balancing_loss(router_logits, top_k: int, num_experts: int | None = None,
                        attention_mask: torch.Tensor | None = None,
                        selected_experts: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eqs. 4-6), as Mixtral uses it:

        L = E * sum_e f_e * P_e,   f_e = (1/T) #{(t, j): expert e in t's top k},   P_e = (1/T) sum_t p_te

    with p = softmax(logits). Only P carries gradient; L is minimal (= K) for uniform routing.
    ``router_logits`` is [T, E] or a tuple of per-layer [T, E] tensors (pooled like transformers'
    ``load_balancing_loss_func``, which this equals); ``attention_mask`` [B, S] (T = B*S) excludes
    padding. ``selected_experts`` [T, K] overrides the top-k of softmax(logits) (e.g. noisy routing).
    """
    layers = tuple(router_logits) if isinstance(router_logits, (tuple, list)) else (router_logits,)
    for i, layer in enumerate(layers):
        _check_logits(layer, top_k, name=f"router_logits[{i}]")
    num_experts = num_experts or layers[0].shape[1]
    logits = _f32(torch.cat([layer.to(layers[0].device) for layer in layers]))  # [L*T, E]
    probs = torch.softmax(logits, dim=-1)
    if selected_experts is None:
        selected_experts = torch.topk(probs, top_k, dim=-1).indices
    elif selected_experts.shape[0] != logits.shape[0]:
        raise ValueError(f"selected_experts has {selected_experts.shape[0]} rows, router_logits {logits.shape[0]}")
    # scatter_add, not one_hot: one_hot validates the indices on the host (a sync on a GPU)
    sel = selected_experts.long()
    counts = torch.zeros(sel.shape[0], num_experts + 1, device=logits.device, dtype=logits.dtype).scatter_add_(
        1, sel, torch.ones(sel.shape, device=logits.device, dtype=logits.dtype))[:, :num_experts]  # [L*T, E]
    if attention_mask is None:
        mask = torch.ones(logits.shape[0], device=logits.device, dtype=logits.dtype)
    else:
        mask = attention_mask.reshape(-1).to(logits.device, logits.dtype).repeat(len(layers))
        if mask.numel() != logits.shape[0]:
            raise ValueError(f"attention_mask has {attention_mask.numel()} tokens, router_logits "
                             f"{logits.shape[0] // len(layers)} per layer")
    rows = mask.sum()
    tokens_per_expert = (counts * mask[:, None]).sum(0) / rows  # [E], sums to K
    prob_per_expert = (probs * mask[:, None]).sum(0) / rows  # [E], sums to 1
    return num_experts * torch.sum(tokens_per_expert * prob_per_expert)


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): mean_t (log sum_e exp logits_te)^2. Keeps
    router logits small, which keeps the float32 softmax stable and training from diverging."""
    _check_logits(router_logits, name="router_logits")
    return torch.logsumexp(_f32(router_logits), dim=-1).pow(2).mean()


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens one expert may take: ceil(capacity_factor * T * K / E) (Switch Transformer; GShard)."""
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    return min(num_tokens, padded_capacity(num_tokens, top_k, num_experts, capacity_factor))


def apply_capacity(experts: torch.Tensor, weights: torch.Tensor, num_experts: int, capacity: int):
    """Drop (token, slot) pairs beyond an expert's capacity. Priority as in GShard: every token's first
    choice before any second choice, then token order. No host synchronisation.

    -> (experts [T, K] with E at dropped slots, weights [T, K] with 0 there, dropped [T, K] bool).
    A dropped pair contributes nothing: the token keeps only its residual for that slot.
    """
    if experts.shape != weights.shape or experts.dim() != 2:
        raise ValueError(f"experts {tuple(experts.shape)} and weights {tuple(weights.shape)} must both be [T, K]")
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    T, K = experts.shape
    slot_major = experts.t().reshape(-1)  # [K*T]: all first choices, then all second choices...
    perm, sorted_e, ends = sort_by_expert(slot_major.unsqueeze(1), num_experts)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    pos_sorted = torch.arange(perm.numel(), device=experts.device) - starts[sorted_e.clamp(max=num_experts - 1)]
    pos = torch.empty_like(pos_sorted)
    pos[perm] = pos_sorted
    pos = pos.view(K, T).t()  # [T, K] arrival rank of each pair at its expert
    valid = experts < num_experts
    keep = valid & (pos < capacity)
    dropped = valid & ~keep
    return torch.where(keep, experts, torch.full_like(experts, num_experts)), weights.masked_fill(~keep, 0.0), dropped


def routing_stats(experts: torch.Tensor, num_experts: int, dropped: torch.Tensor | None = None) -> dict:
    """Load statistics of one routing decision (host sync; for reporting): tokens per expert, min, max,
    coefficient of variation (std / mean; 0 = perfectly balanced), dropped pairs and drop rate, and the
    fraction of tokens that no expert processed."""
    flat = experts.reshape(experts.shape[0], -1) if experts.dim() > 1 else experts[:, None]
    counts = torch.zeros(num_experts + 1, device=flat.device).index_add_(
        0, flat.reshape(-1).long(), torch.ones(flat.numel(), device=flat.device))[:num_experts]
    mean = counts.mean()
    n_dropped = int(dropped.sum()) if dropped is not None else 0
    return {
        "tokens_per_expert": [int(c) for c in counts.tolist()],
        "min": int(counts.min()), "max": int(counts.max()),
        "cv": float(counts.std(unbiased=False) / mean) if mean > 0 else 0.0,
        "dropped": n_dropped,
        "drop_rate": n_dropped / max(1, flat.numel()) if dropped is not None else 0.0,
        "unrouted_tokens": float((flat >= num_experts).all(dim=1).float().mean()) if flat.numel() else 0.0,
    }


class Router(nn.Module):
    """A linear router (weight [E, D], transformers' layout) with one of the ``ROUTERS`` rules.

    kind: ``softmax_topk`` (Mixtral), ``topk_softmax`` (Shazeer; ``noisy=True`` adds learned noise in
    training), ``sigmoid`` (DeepSeek-V3; the selection bias is updated in training at
    ``bias_update_rate``), ``expert_choice`` (Zhou et al.; each expert takes ceil(cf * T / E) tokens with
    cf = ``capacity_factor`` or top_k).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 2, kind: str = "softmax_topk", *,
                 renormalize: bool = True, noisy: bool = False, bias_update_rate: float = 1e-3,
                 scale: float = 1.0, capacity_factor: float | None = None, init_std: float = 0.02):
        super().__init__()
        if kind not in ROUTERS:
            raise ValueError(f"router kind must be one of {ROUTERS}, got {kind!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if noisy and kind != "topk_softmax":
            raise ValueError("noisy gating belongs to the 'topk_softmax' router (Shazeer et al. 2017)")
        self.kind, self.top_k, self.num_experts = kind, top_k, num_experts
        self.renormalize, self.scale, self.bias_update_rate = renormalize, scale, bias_update_rate
        self.capacity_factor = capacity_factor
        self.weight = nn.Parameter(torch.randn(num_experts, hidden_size) * init_std)
        # Shazeer et al. initialise the noise weights to zero: noise std softplus(0) = 0.69 at start
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, hidden_size)) if noisy else None
        if kind == "sigmoid":
            self.register_buffer("selection_bias", torch.zeros(num_experts))

    def forward(self, x: torch.Tensor) -> Routing:
        """x [T, D] -> Routing (experts and weights [T, K]; K = E for expert choice)."""
        if self.noise_weight is not None and self.training:
            logits = noisy_logits(x, self.weight, self.noise_weight)
        else:
            logits = router_logits(x, self.weight)
        if self.kind == "softmax_topk":
            weights, experts = softmax_topk(logits, self.top_k, self.renormalize)
        elif self.kind == "topk_softmax":
            weights, experts = topk_softmax(logits, self.top_k)
        elif self.kind == "sigmoid":
            weights, experts = sigmoid_topk(logits, self.top_k, self.selection_bias, self.renormalize, self.scale)
            if self.training and self.bias_update_rate > 0:
                with torch.no_grad():
                    load = torch.zeros(self.num_experts, device=x.device).index_add_(
                        0, experts.reshape(-1), torch.ones(experts.numel(), device=x.device))
                    self.selection_bias.copy_(update_selection_bias(self.selection_bias, load, self.bias_update_rate))
            return Routing(experts, weights, logits, torch.sigmoid(logits))
        else:
            cf = self.capacity_factor or float(self.top_k)
            weights, experts = expert_choice(logits, expert_capacity(x.shape[0], 1, self.num_experts, cf))
        return Routing(experts, weights, logits, torch.softmax(logits, dim=-1))


# ------------------------------------------------------------------------------------------ experts
def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU") or act is F.silu


class SwiGLU(nn.Module):
    """A dense SwiGLU feed-forward block, named like transformers' LlamaMLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SwiGLUExperts(nn.Module):
    """E SwiGLU experts as two 3-D tensors in transformers' ``MixtralExperts`` layout:
    ``gate_up_proj`` [E, 2F, D] (rows :F are the gate, F: the up projection) and ``down_proj`` [E, D, F]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, init_std: float = 0.02):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.randn(num_experts, 2 * intermediate_size, hidden_size) * init_std)
        self.down_proj = nn.Parameter(torch.randn(num_experts, hidden_size, intermediate_size) * init_std)

    def forward(self, x, experts, weights, backend: str = "auto", capacity: int | None = None):
        """x [T, D], experts / weights [T, K] -> [T, D]."""
        return dispatch(x, experts, weights, self.gate_up_proj, self.down_proj, backend=backend, capacity=capacity)


class MoELayer(nn.Module):
    """A sparse MoE feed-forward layer: router -> (capacity) -> experts -> weighted sum (+ shared experts).

    Drop-in for a transformer MLP: [..., D] -> [..., D]. After each forward it keeps ``aux_loss``
    (aux_loss_coef * load-balancing loss + z_loss_coef * z-loss, with gradient: add it to the task
    loss), ``router_logits`` [T, E] and, detached, ``last_experts`` [..., K] and ``last_dropped``.

    capacity_factor: None = dropless; else each expert takes ceil(cf * T * K / E) pairs, the rest drop.
    num_shared_experts: always-on experts (DeepSeekMoE), fused into one SwiGLU of n * F units;
    shared_gate: scale them by sigmoid(w . x) (Qwen2-MoE).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int = 8, top_k: int = 2,
                 router: str = "softmax_topk", *, renormalize: bool = True, noisy: bool = False,
                 capacity_factor: float | None = None, num_shared_experts: int = 0,
                 shared_intermediate_size: int | None = None, shared_gate: bool = False,
                 aux_loss_coef: float | None = None, z_loss_coef: float = 0.0, bias_update_rate: float = 1e-3,
                 routed_scale: float = 1.0, backend: str = "auto", init_std: float = 0.02):
        super().__init__()
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got {capacity_factor}")
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.top_k, self.backend = num_experts, top_k, backend
        self.capacity_factor = capacity_factor
        self.router = Router(hidden_size, num_experts, top_k, router, renormalize=renormalize, noisy=noisy,
                             bias_update_rate=bias_update_rate, scale=routed_scale,
                             capacity_factor=capacity_factor if router == "expert_choice" else None,
                             init_std=init_std)
        self.experts = SwiGLUExperts(num_experts, hidden_size, intermediate_size, init_std)
        shared_f = shared_intermediate_size or num_shared_experts * intermediate_size
        self.shared_experts = SwiGLU(hidden_size, shared_f) if shared_f else None
        self.shared_gate = nn.Linear(hidden_size, 1, bias=False) if shared_f and shared_gate else None
        # the sigmoid router balances through its bias and expert choice is balanced by construction
        self.aux_loss_coef = aux_loss_coef if aux_loss_coef is not None else \
            (0.01 if router in ("softmax_topk", "topk_softmax") else 0.0)
        self.z_loss_coef = z_loss_coef
        self.aux_loss = torch.zeros(())
        self.router_logits = self.last_experts = self.last_dropped = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"x has hidden size {x.shape[-1]}, the layer expects {self.hidden_size}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.hidden_size)  # [T, D]
        routing = self.router(x2)
        experts, weights, dropped, capacity = routing.experts, routing.weights, None, None
        if self.capacity_factor is not None and self.router.kind != "expert_choice":
            capacity = expert_capacity(x2.shape[0], self.top_k, self.num_experts, self.capacity_factor)
            experts, weights, dropped = apply_capacity(experts, weights, self.num_experts, capacity)
        y = self.experts(x2, experts, weights, backend=self.backend, capacity=capacity)
        if self.shared_experts is not None:
            shared = self.shared_experts(x2)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x2)) * shared
            y = y + shared
        aux = routing.logits.new_zeros(())
        if self.aux_loss_coef:
            aux = aux + self.aux_loss_coef * load_balancing_loss(
                routing.logits, self.top_k, self.num_experts, selected_experts=routing.experts)
        if self.z_loss_coef:
            aux = aux + self.z_loss_coef * router_z_loss(routing.logits)
        self.aux_loss, self.router_logits = aux, routing.logits
        self.last_experts = experts.detach().view(*lead, experts.shape[-1])
        self.last_dropped = None if dropped is None else dropped.view(*lead, dropped.shape[-1])
        return y.view(*lead, self.hidden_size)

    def stats(self) -> dict:
        """``routing_stats`` of the last forward."""
        if self.last_experts is None:
            raise RuntimeError("stats() needs a forward pass first")
        k = self.last_experts.shape[-1]
        return routing_stats(self.last_experts.reshape(-1, k), self.num_experts,
                             None if self.last_dropped is None else self.last_dropped.reshape(-1, k))

    def num_params(self) -> dict:
        """Total parameters and parameters active per token (router + K experts + shared)."""
        per_expert = 3 * self.hidden_size * self.intermediate_size
        other = sum(p.numel() for n, p in self.named_parameters() if not n.startswith("experts."))
        return {"total": other + self.num_experts * per_expert, "active": other + self.top_k * per_expert}

    @classmethod
    def from_transformers(cls, block: nn.Module, **kwargs) -> "MoELayer":
        """Build a layer with the weights and outputs of a transformers sparse MoE block (Mixtral,
        Qwen2-MoE with its gated shared expert, Qwen3-MoE; any block with a softmax top-k ``gate`` and
        3-D SwiGLU ``experts``). Mixtral's training-time jitter noise is not reproduced."""
        gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
        if gate is None or experts is None or not hasattr(experts, "gate_up_proj") \
                or not isinstance(getattr(gate, "weight", None), torch.Tensor):
            raise TypeError(f"{type(block).__name__} is not a transformers sparse MoE block with gate + 3-D experts")
        if hasattr(gate, "e_score_correction_bias") or getattr(experts, "has_bias", False) \
                or getattr(experts, "is_transposed", False) or not getattr(experts, "is_concatenated", True):
            raise TypeError(f"{type(block).__name__}: only softmax top-k routers and bias-free, "
                            "concatenated, untransposed experts are supported")
        if not _is_silu(experts.act_fn):
            raise TypeError(f"{type(block).__name__}: experts use {type(experts.act_fn).__name__}, not SiLU")
        E, two_f, D = experts.gate_up_proj.shape
        shared = getattr(block, "shared_expert", None)
        layer = cls(D, two_f // 2, E, gate.top_k, "softmax_topk",
                    renormalize=getattr(gate, "norm_topk_prob", True),
                    shared_intermediate_size=shared.down_proj.in_features if shared is not None else None,
                    shared_gate=getattr(block, "shared_expert_gate", None) is not None, **kwargs)
        with torch.no_grad():
            layer.router.weight.copy_(gate.weight)
            layer.experts.gate_up_proj.copy_(experts.gate_up_proj)
            layer.experts.down_proj.copy_(experts.down_proj)
            if shared is not None:
                layer.shared_experts.load_state_dict(
                    {k: v for k, v in shared.state_dict().items() if k.endswith("proj.weight")})
                if layer.shared_gate is not None:
                    layer.shared_gate.weight.copy_(block.shared_expert_gate.weight)
        return layer.to(device=experts.gate_up_proj.device, dtype=experts.gate_up_proj.dtype)


# ------------------------------------------------------------------------------ upcycling, swapping
def _mlp_weights(mlp: nn.Module):
    for name in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(mlp, name, None)
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"{type(mlp).__name__} has no Linear {name}: not a Llama-style SwiGLU MLP")
        if lin.bias is not None:
            raise ValueError(f"{type(mlp).__name__}.{name} has a bias; upcycling supports bias-free MLPs")
    act = getattr(mlp, "act_fn", nn.SiLU())
    if not _is_silu(act):
        raise TypeError(f"{type(mlp).__name__} uses {type(act).__name__}, not SiLU")
    return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight  # [F, D], [F, D], [D, F]


def upcycle_mlp(mlp: nn.Module, num_experts: int = 8, top_k: int = 2, *, noise_std: float = 0.0,
                generator: torch.Generator | None = None, **layer_kwargs) -> MoELayer:
    """Sparse upcycling (Komatsuzaki et al. 2022): every expert starts as a copy of a trained dense
    SwiGLU MLP and the router starts random. With weights that sum to one (renormalised top-k) and no
    token dropping, the MoE computes exactly the dense MLP at step 0; continued training then lets the
    copies diverge. ``noise_std`` (relative) perturbs the copies to break their symmetry sooner."""
    gate, up, down = _mlp_weights(mlp)
    F_, D = gate.shape
    layer = MoELayer(D, F_, num_experts, top_k, **layer_kwargs)
    with torch.no_grad():
        gate_up = torch.cat([gate, up], dim=0).float()  # [2F, D]
        layer.experts.gate_up_proj.copy_(gate_up.expand(num_experts, -1, -1))
        layer.experts.down_proj.copy_(down.float().expand(num_experts, -1, -1))
        if noise_std:
            for p in (layer.experts.gate_up_proj, layer.experts.down_proj):
                noise = torch.randn(p.shape, generator=generator).to(p.device)
                p.add_(noise * noise_std * p.std())
    return layer.to(device=gate.device, dtype=gate.dtype)


def _decoder_layers(model: nn.Module):
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no .model.layers: expected a Llama-style causal LM")
    return layers


def moefy(model: nn.Module, num_experts: int = 8, top_k: int = 2, layers=None, upcycle: bool = True,
          intermediate_size: int | None = None, **layer_kwargs) -> nn.Module:
    """Replace the MLPs of a Llama-style model (``model.model.layers[i].mlp``) by MoE layers, in place.

    upcycle=True copies each dense MLP into every expert (``upcycle_mlp``); False builds fresh experts
    of ``intermediate_size`` (default: the dense size). ``layers``: indices to convert (default: all).
    """
    decoder = _decoder_layers(model)
    for i in range(len(decoder)) if layers is None else layers:
        mlp = decoder[i].mlp
        gate, _, _ = _mlp_weights(mlp)
        if upcycle:
            new = upcycle_mlp(mlp, num_experts, top_k, **layer_kwargs)
        else:
            new = MoELayer(gate.shape[1], intermediate_size or gate.shape[0], num_experts, top_k, **layer_kwargs)
            new = new.to(device=gate.device, dtype=gate.dtype)
        decoder[i].mlp = new
    return model


def moe_layers(model: nn.Module) -> list:
    """The MoELayer modules of a model, in order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the auxiliary losses the model's MoE layers kept from the last forward."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoELayer")
    return sum(layer.aux_loss for layer in layers)


def to_mixtral(model: nn.Module):
    """A transformers ``MixtralForCausalLM`` with the weights and outputs of a Llama whose every MLP is
    a plain top-k ``MoELayer`` (e.g. after ``moefy``): save it with ``save_pretrained``, load it with
    any Mixtral-aware tool. Mixtral's routing is softmax -> top-k -> renormalise, without shared
    experts or capacity, so only such layers convert."""
    from transformers import MixtralConfig, MixtralForCausalLM

    mlps = [block.mlp for block in _decoder_layers(model)]
    first = mlps[0]
    for i, m in enumerate(mlps):
        if not isinstance(m, MoELayer):
            raise TypeError(f"layer {i}'s MLP is a {type(m).__name__}, not an MoELayer: moefy every layer first")
        same = (m.num_experts, m.top_k, m.intermediate_size) == (first.num_experts, first.top_k, first.intermediate_size)
        plain = m.router.kind == "softmax_topk" and m.router.renormalize and m.router.noise_weight is None
        if not same or not plain or m.shared_experts is not None or m.capacity_factor is not None:
            raise ValueError(f"layer {i}: Mixtral needs identical softmax top-k layers (renormalised, no noise, "
                             "no shared experts, no capacity limit)")
    src = model.config.to_dict()
    if src.get("attention_bias") or src.get("mlp_bias"):
        raise ValueError("Mixtral has no attention or MLP biases")
    allowed = set(MixtralConfig().to_dict()) - {"model_type", "architectures", "transformers_version"}
    kwargs = {k: v for k, v in src.items() if k in allowed}
    kwargs.update(intermediate_size=first.intermediate_size, num_local_experts=first.num_experts,
                  num_experts_per_tok=first.top_k, router_aux_loss_coef=first.aux_loss_coef,
                  router_jitter_noise=0.0, sliding_window=None)
    config = MixtralConfig(**kwargs)
    mixtral = MixtralForCausalLM(config)
    state = {k.replace(".mlp.router.weight", ".mlp.gate.weight"): v for k, v in model.state_dict().items()}
    mixtral.load_state_dict(state, strict=True)
    p = next(model.parameters())
    return mixtral.to(device=p.device, dtype=p.dtype).eval()


# -------------------------------------------------------------------------- MoE from dense fine-tunes
@torch.no_grad()
def prompt_router_weights(model: nn.Module, tokenizer, prompts: list, negative_prompts: list | None = None,
                          average: bool = False) -> torch.Tensor:
    """Router weights from prompts, as mergekit-moe's ``hidden`` gate mode does: for each expert, the
    base model's hidden state entering each layer on that expert's prompts (last token, or mean over
    tokens with ``average``), averaged over prompts, minus the same for its negative prompts,
    normalised to unit length. prompts: one list of strings per expert -> [L, E, D] float32."""
    if not prompts or any(not p for p in prompts):
        raise ValueError("prompts must hold a non-empty list of strings per expert")
    device = next(model.parameters()).device

    def hidden(texts):
        enc = tokenizer(list(texts), return_tensors="pt", padding=True).to(device)
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
        states = torch.stack(out.hidden_states[:-1]).float()  # [L, B, S, D]
        mask = enc["attention_mask"].float()  # [B, S]
        if average:
            pooled = (states * mask[None, :, :, None]).sum(2) / mask.sum(1)[None, :, None]
        else:
            last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # last real token, left or right padding
            pooled = states[:, torch.arange(mask.shape[0], device=device), last]  # [L, B, D]
        return pooled.mean(1)  # [L, D]

    vecs = []
    for i, texts in enumerate(prompts):
        v = hidden(texts)
        if negative_prompts and negative_prompts[i]:
            v = v - hidden(negative_prompts[i])
        vecs.append(v / v.norm(dim=-1, keepdim=True).clamp_min(1e-8))
    return torch.stack(vecs, dim=1)  # [L, E, D]


def moe_from_dense(base: nn.Module, experts: list, router_weights: torch.Tensor, top_k: int = 2,
                   **layer_kwargs) -> nn.Module:
    """A mergekit-moe style "MoE" (a "clown car"): attention, norms and embeddings from ``base``,
    layer l's expert i = the MLP of ``experts[i]`` at layer l, router l = ``router_weights[l]`` [E, D]
    (e.g. from ``prompt_router_weights``). All models must share the architecture; no training."""
    model = copy.deepcopy(base)
    decoder = _decoder_layers(model)
    expert_layers = [_decoder_layers(m) for m in experts]
    if router_weights.shape[:2] != (len(decoder), len(experts)):
        raise ValueError(f"router_weights must be [L={len(decoder)}, E={len(experts)}, D], "
                         f"got {tuple(router_weights.shape)}")
    for l, block in enumerate(decoder):
        gate, _, _ = _mlp_weights(block.mlp)
        layer = MoELayer(gate.shape[1], gate.shape[0], len(experts), top_k, **layer_kwargs)
        with torch.no_grad():
            for e, dec in enumerate(expert_layers):
                g, u, d = _mlp_weights(dec[l].mlp)
                layer.experts.gate_up_proj[e].copy_(torch.cat([g, u]))
                layer.experts.down_proj[e].copy_(d)
            layer.router.weight.copy_(router_weights[l])
        block.mlp = layer.to(device=gate.device, dtype=gate.dtype)
    return model


def moe_flops(num_tokens: int, hidden: int, intermediate: int, num_experts: int, top_k: int) -> dict:
    """Forward FLOPs of the expert matmuls: all E experts (dense equivalent) vs the K that run."""
    dense = expert_flops(num_tokens, num_experts, hidden, intermediate)
    sparse = expert_flops(num_tokens, top_k, hidden, intermediate)
    return {"all_experts": dense, "routed": sparse, "saving": dense / sparse,
            "router": 2 * num_tokens * hidden * num_experts}


# ------------------------------------------------------------------------------- expert parallelism
class _AllToAll(torch.autograd.Function):
    """all_to_all_single with autograd: the backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        import torch.distributed as dist

        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


class ExpertParallelMoE(nn.Module):
    """An MoELayer whose experts are split over the ranks of a process group (expert parallelism).

    Rank r holds experts [r * E/W, (r+1) * E/W); router and shared experts are replicated (all-reduce
    their gradients as data parallelism would). Each rank routes its own tokens, sends every (token,
    expert) pair to the expert's rank with ``all_to_all_single``, runs its local experts, sends results
    back, and combines them with its routing weights. The split sizes need one host sync per step.
With a capacity factor, each rank's tokens are one routing group (capacity per group, as in GShard).
    """

    def __init__(self, layer: MoELayer, group=None):
        super().__init__()
        import torch.distributed as dist

        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if layer.num_experts % self.world:
            raise ValueError(f"num_experts={layer.num_experts} is not divisible by world size {self.world}")
        self.num_experts, self.top_k, self.hidden_size = layer.num_experts, layer.top_k, layer.hidden_size
        self.local = layer.num_experts // self.world
        self.capacity_factor, self.backend = layer.capacity_factor, layer.backend
        self.router = copy.deepcopy(layer.router)
        self.shared_experts = copy.deepcopy(layer.shared_experts)
        self.shared_gate = copy.deepcopy(layer.shared_gate)
        lo = self.rank * self.local
        self.gate_up_proj = nn.Parameter(layer.experts.gate_up_proj.detach()[lo:lo + self.local].clone())
        self.down_proj = nn.Parameter(layer.experts.down_proj.detach()[lo:lo + self.local].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        lead, D, E, K = x.shape[:-1], self.hidden_size, self.num_experts, self.top_k
        x2 = x.reshape(-1, D)
        routing = self.router(x2)
        experts, weights = routing.experts, routing.weights
        if self.capacity_factor is not None and self.router.kind != "expert_choice":
            cap = expert_capacity(x2.shape[0], K, E, self.capacity_factor)  # per rank, on local tokens
            experts, weights, _ = apply_capacity(experts, weights, E, cap)
        T, K = experts.shape
        perm, sorted_e, ends = sort_by_expert(experts, E)  # dropped pairs sort to the tail
        per_expert = torch.diff(ends, prepend=ends.new_zeros(1))  # [E]
        send = per_expert.view(self.world, self.local).sum(1)  # pairs for each rank
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        in_splits, out_splits = send.tolist(), recv.tolist()
        n_send = sum(in_splits)
        rows = perm[:n_send]
        recv_x = _AllToAll.apply(x2[rows // K], out_splits, in_splits, self.group)  # [n_recv, D]
        recv_e = torch.empty(sum(out_splits), dtype=sorted_e.dtype, device=x.device)
        dist.all_to_all_single(recv_e, sorted_e[:n_send].contiguous(), out_splits, in_splits, group=self.group)
        local_e = (recv_e - self.rank * self.local).unsqueeze(1)  # [n_recv, 1]
        ones = torch.ones(local_e.shape, device=x.device)
        y_local = dispatch(recv_x, local_e, ones, self.gate_up_proj, self.down_proj, backend=self.backend)
        y_back = _AllToAll.apply(y_local, in_splits, out_splits, self.group)  # [n_send, D]
        y_sorted = torch.cat([y_back, y_back.new_zeros(T * K - n_send, D)])
        y_slots = y_sorted.new_zeros(T * K, D).index_copy(0, perm, y_sorted).view(T, K, D)
        y = combine(y_slots, weights, x.dtype)
        if self.shared_experts is not None:
            shared = self.shared_experts(x2)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x2)) * shared
            y = y + shared
        return y.view(*lead, D)
