"""Expert parallelism: an ``MoELayer`` whose experts are split over the ranks of a process group.

Distributed tooling around the layer in ``layer.py``: routing, capacity and shared experts are the
layer's own helpers (``route_with_capacity``, ``add_shared_experts``); only the exchange of tokens
between ranks (two ``all_to_all_single`` calls, differentiable) lives here (GShard, Lepikhin et al.
2021; DeepSpeed-MoE, Rajbhandari et al. 2022).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .backends import combine, dispatch, sort_by_expert
from .layer import MoELayer, add_shared_experts
from .routing import route_with_capacity


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

        lead, D, E = x.shape[:-1], self.hidden_size, self.num_experts
        x2 = x.reshape(-1, D)
        # capacity per rank, on its local tokens: each rank's tokens are one routing group (GShard)
        _, experts, weights, _, _ = route_with_capacity(self.router, x2, self.capacity_factor)
        T, K = experts.shape  # K = E under expert choice
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
        y = add_shared_experts(combine(y_slots, weights, x.dtype), x2, self.shared_experts, self.shared_gate)
        return y.view(*lead, D)
