"""Routing for a sparse mixture of experts: which K of E experts see each token, and with what weight.

A router scores every token against every expert (logits [T, E] = x W_r^T) and keeps K experts per
token (token choice) or K tokens per expert (expert choice, Zhou et al. 2022). This file holds the
routing rules, the balancing losses that keep experts evenly loaded, the capacity limit that drops
what an expert cannot take, and load statistics. Router math runs in float32 whatever the model
dtype: near-ties between experts flip under bf16 rounding.

Shapes: T tokens, D hidden size, E experts, K experts per token. An expert id equal to E in an
assignment tensor [T, K] marks a dropped (token, slot) pair.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backends import padded_capacity, sort_by_expert

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
                 scale: float = 1.0, capacity_factor: float | None = None, init_std: float = 0.02,
                 device=None, dtype=None):
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
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.randn(num_experts, hidden_size, **factory) * init_std)
        # Shazeer et al. initialise the noise weights to zero: noise std softplus(0) = 0.69 at start
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, hidden_size, **factory)) if noisy else None
        if kind == "sigmoid":
            self.register_buffer("selection_bias", torch.zeros(num_experts, **factory))

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


def route_with_capacity(router: Router, x: torch.Tensor, capacity_factor: float | None):
    """Route x [T, D] and drop the (token, slot) pairs beyond each expert's capacity.

    One helper for every MoE forward (the layer and its expert-parallel version), so both apply the
    same limit: capacity = ceil(cf * T * K / E) over the T tokens routed together (``expert_capacity``),
    GShard's priority (``apply_capacity``). Expert choice is balanced by construction and skips it.
    -> (routing, experts [T, K], weights [T, K], dropped [T, K] bool or None, capacity or None);
    ``routing`` keeps the router's own choice, which the balancing loss is computed on.
    """
    routing = router(x)
    if capacity_factor is None or router.kind == "expert_choice":
        return routing, routing.experts, routing.weights, None, None
    capacity = expert_capacity(x.shape[0], router.top_k, router.num_experts, capacity_factor)
    experts, weights, dropped = apply_capacity(routing.experts, routing.weights, router.num_experts, capacity)
    return routing, experts, weights, dropped, capacity
