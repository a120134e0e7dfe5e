"""The sparse mixture-of-experts layer: router -> (capacity) -> K of E SwiGLU experts -> weighted sum.

A sparse MoE layer replaces one feed-forward block by E expert blocks and a router that sends each
token to K of them (Shazeer et al. 2017, "Outrageously large neural networks"):

    y(x) = sum_{e in TopK(x)} g_e(x) * E_e(x)   (+ shared(x), the always-on experts of DeepSeekMoE)

so the layer holds E experts' parameters but spends the FLOPs of K. Routing lives in ``routing.py``,
how the experts' work is batched in ``backends.py``. Expert weights use transformers' layout
(``gate_up_proj`` [E, 2F, D], ``down_proj`` [E, D, F]), so ``convert.py`` moves weights between a
``MoELayer`` and a transformers Mixtral / Qwen2-MoE / Qwen3-MoE block without reshaping.

Shapes: T tokens, D hidden size, F expert intermediate size, E experts, K experts per token.
Every module takes ``device`` and ``dtype`` like ``nn.Linear``, so a layer can be built where it will live.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backends import BACKENDS, dispatch, expert_flops
from .routing import Router, load_balancing_loss, route_with_capacity, router_z_loss, routing_stats


class SwiGLU(nn.Module):
    """A dense SwiGLU feed-forward block, named like transformers' LlamaMLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **factory)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **factory)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, **factory)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SwiGLUExperts(nn.Module):
    """E SwiGLU experts as two 3-D tensors in transformers' ``MixtralExperts`` layout:
    ``gate_up_proj`` [E, 2F, D] (rows :F are the gate, F: the up projection) and ``down_proj`` [E, D, F]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, init_std: float = 0.02,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.randn(num_experts, 2 * intermediate_size, hidden_size, **factory)
                                         * init_std)
        self.down_proj = nn.Parameter(torch.randn(num_experts, hidden_size, intermediate_size, **factory) * init_std)

    def forward(self, x, experts, weights, backend: str = "auto", capacity: int | None = None):
        """x [T, D], experts / weights [T, K] -> [T, D]."""
        return dispatch(x, experts, weights, self.gate_up_proj, self.down_proj, backend=backend, capacity=capacity)


def add_shared_experts(y: torch.Tensor, x: torch.Tensor, shared_experts: nn.Module | None,
                       shared_gate: nn.Module | None) -> torch.Tensor:
    """Add the always-on shared experts to the routed output: y + sigmoid(w . x) * shared(x).

    Shared experts (DeepSeekMoE, Dai et al. 2024) hold common knowledge so the routed experts can
    specialise; Qwen2-MoE scales them by a learned sigmoid gate (``shared_gate``; None = scale 1).
    One helper for the layer and its expert-parallel version. y, x [T, D] -> [T, D].
    """
    if shared_experts is None:
        return y
    shared = shared_experts(x)
    if shared_gate is not None:
        shared = torch.sigmoid(shared_gate(x)) * shared
    return y + shared


class MoELayer(nn.Module):
    """A sparse MoE feed-forward layer: router -> (capacity) -> experts -> weighted sum (+ shared experts).

    Drop-in for a transformer MLP: [..., D] -> [..., D]. After each forward it keeps ``aux_loss``
    (aux_loss_coef * load-balancing loss + z_loss_coef * z-loss, with gradient: add it to the task
    loss), ``router_logits`` [T, E] and, detached, ``last_experts`` [..., K] and ``last_dropped``.

    capacity_factor: None = dropless; else each expert takes ceil(cf * T * K / E) pairs, the rest drop.
    num_shared_experts: always-on experts (DeepSeekMoE), fused into one SwiGLU of n * F units;
    shared_gate: scale them by sigmoid(w . x) (Qwen2-MoE).
    ``MoELayer.from_transformers(block)`` (defined with the conversion tooling in ``convert.py``)
    builds one with the weights of a transformers Mixtral / Qwen-MoE block.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int = 8, top_k: int = 2,
                 router: str = "softmax_topk", *, renormalize: bool = True, noisy: bool = False,
                 capacity_factor: float | None = None, num_shared_experts: int = 0,
                 shared_intermediate_size: int | None = None, shared_gate: bool = False,
                 aux_loss_coef: float | None = None, z_loss_coef: float = 0.0, bias_update_rate: float = 1e-3,
                 routed_scale: float = 1.0, backend: str = "auto", init_std: float = 0.02, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
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
                             init_std=init_std, **factory)
        self.experts = SwiGLUExperts(num_experts, hidden_size, intermediate_size, init_std, **factory)
        shared_f = shared_intermediate_size or num_shared_experts * intermediate_size
        self.shared_experts = SwiGLU(hidden_size, shared_f, **factory) if shared_f else None
        self.shared_gate = nn.Linear(hidden_size, 1, bias=False, **factory) if shared_f and shared_gate else None
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
        routing, experts, weights, dropped, capacity = route_with_capacity(self.router, x2, self.capacity_factor)
        y = self.experts(x2, experts, weights, backend=self.backend, capacity=capacity)
        y = add_shared_experts(y, x2, self.shared_experts, self.shared_gate)
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


def moe_layers(model: nn.Module) -> list:
    """The MoELayer modules of a model, in order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the auxiliary losses the model's MoE layers kept from the last forward."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoELayer")
    return sum(layer.aux_loss for layer in layers)


def moe_flops(num_tokens: int, hidden: int, intermediate: int, num_experts: int, top_k: int) -> dict:
    """Forward FLOPs of the expert matmuls: all E experts (dense equivalent) vs the K that run."""
    dense = expert_flops(num_tokens, num_experts, hidden, intermediate)
    sparse = expert_flops(num_tokens, top_k, hidden, intermediate)
    return {"all_experts": dense, "routed": sparse, "saving": dense / sparse,
            "router": 2 * num_tokens * hidden * num_experts}
