"""Sparse mixture of experts: routers, balancing losses, capacity, SwiGLU experts, interop, expert parallelism.

A sparse MoE layer replaces one feed-forward block by E expert blocks and a router that sends each
token to K of them (Shazeer et al. 2017), so it holds E experts' parameters but spends the FLOPs of K.

Read in this order (methods):
  routing.py ..... routers (softmax top-k, top-k softmax, noisy, sigmoid + bias, expert choice),
                   load-balancing and z losses, capacity, routing statistics
  layer.py ....... SwiGLU experts and ``MoELayer`` (router -> capacity -> experts -> weighted sum)
  backends.py .... how the experts' work is batched: loop / sort / grouped GEMM / weight gather
Tooling (imports the methods, never the other way round):
  convert.py ..... from transformers blocks, upcycling (moefy), to Mixtral, MoE from dense fine-tunes
  parallel.py .... expert parallelism over a torch.distributed process group

``labkit.moe_dispatch`` remains importable as an alias of ``labkit.moe.backends``. The dispatch
module is called ``backends`` because ``labkit.moe.dispatch`` is, as before, the dispatch function.
"""
from .backends import BACKENDS, choose_backend, combine, dispatch, expert_flops, padded_capacity, sort_by_expert
from .convert import from_transformers, moe_from_dense, moefy, prompt_router_weights, to_mixtral, upcycle_mlp
from .layer import MoELayer, SwiGLU, SwiGLUExperts, add_shared_experts, moe_aux_loss, moe_flops, moe_layers
from .parallel import ExpertParallelMoE
from .routing import (ROUTERS, Router, Routing, apply_capacity, expert_capacity, expert_choice, load_balancing_loss,
                      noisy_logits, route_with_capacity, router_logits, router_z_loss, routing_stats, sigmoid_topk,
                      softmax_topk, topk_softmax, update_selection_bias)

__all__ = [
    "Routing", "router_logits", "softmax_topk", "topk_softmax", "noisy_logits", "sigmoid_topk",
    "update_selection_bias", "expert_choice", "load_balancing_loss", "router_z_loss", "expert_capacity",
    "apply_capacity", "routing_stats", "Router", "SwiGLU", "SwiGLUExperts", "MoELayer", "upcycle_mlp",
    "moefy", "moe_layers", "moe_aux_loss", "to_mixtral", "prompt_router_weights", "moe_from_dense",
    "ExpertParallelMoE", "moe_flops", "dispatch", "sort_by_expert", "BACKENDS", "ROUTERS",
    # importable from labkit.moe before the package layout (through its imports)
    "combine", "expert_flops", "padded_capacity",
    # new in the package layout
    "route_with_capacity", "add_shared_experts", "from_transformers", "choose_backend",
]
