"""Conversion tooling: MoE layers from and to transformers models and dense checkpoints.

* ``from_transformers``: a ``MoELayer`` from a transformers Mixtral / Qwen2-MoE / Qwen3-MoE block;
* ``upcycle_mlp`` / ``moefy``: sparse upcycling of a dense Llama-style model (Komatsuzaki et al. 2022);
* ``to_mixtral``: a transformers ``MixtralForCausalLM`` from a moefied Llama, to save and share;
* ``prompt_router_weights`` / ``moe_from_dense``: a mergekit-moe style MoE built from dense fine-tunes.

Tooling imports the methods (``layer``, ``routing``), never the other way round.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layer import MoELayer


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU") or act is F.silu


# ------------------------------------------------------------------------------ transformers blocks
def from_transformers(block: nn.Module, layer_cls: type = MoELayer, **kwargs) -> MoELayer:
    """A ``MoELayer`` with the weights and outputs of a transformers sparse MoE block (Mixtral,
    Qwen2-MoE with its gated shared expert, Qwen3-MoE; any block with a softmax top-k ``gate`` and
    3-D SwiGLU ``experts``); also reachable as ``MoELayer.from_transformers(block)``.

    The layer is built directly in the block's dtype and on its device, so a float64 block converts
    without rounding and a bf16 Mixtral layer never takes a float32 copy of its experts (a block on
    the meta device gives a meta layer). Mixtral's training-time jitter noise is not reproduced.
    """
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
    for name in ("device", "dtype"):
        if name in kwargs:
            raise TypeError(f"from_transformers takes {name} from the block; convert the layer afterwards")
    layer = layer_cls(D, two_f // 2, E, gate.top_k, "softmax_topk",
                      renormalize=getattr(gate, "norm_topk_prob", True),
                      shared_intermediate_size=shared.down_proj.in_features if shared is not None else None,
                      shared_gate=getattr(block, "shared_expert_gate", None) is not None,
                      device=experts.gate_up_proj.device, dtype=experts.gate_up_proj.dtype, **kwargs)
    with torch.no_grad():
        layer.router.weight.copy_(gate.weight)
        layer.experts.gate_up_proj.copy_(experts.gate_up_proj)
        layer.experts.down_proj.copy_(experts.down_proj)
        if shared is not None:
            layer.shared_experts.load_state_dict(
                {k: v for k, v in shared.state_dict().items() if k.endswith("proj.weight")})
            if layer.shared_gate is not None:
                layer.shared_gate.weight.copy_(block.shared_expert_gate.weight)
    return layer


def _from_transformers_classmethod(cls, block: nn.Module, **kwargs) -> MoELayer:
    return from_transformers(block, layer_cls=cls, **kwargs)


_from_transformers_classmethod.__doc__ = from_transformers.__doc__
# the constructor lives with the conversion tooling, so layer.py never imports transformers-facing code;
# attaching it here keeps ``MoELayer.from_transformers(block)`` working for every user of the layer
MoELayer.from_transformers = classmethod(_from_transformers_classmethod)


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
    for i, block in enumerate(decoder):
        gate, _, _ = _mlp_weights(block.mlp)
        layer = MoELayer(gate.shape[1], gate.shape[0], len(experts), top_k, **layer_kwargs)
        with torch.no_grad():
            for e, dec in enumerate(expert_layers):
                g, u, d = _mlp_weights(dec[i].mlp)
                layer.experts.gate_up_proj[e].copy_(torch.cat([g, u]))
                layer.experts.down_proj[e].copy_(d)
            layer.router.weight.copy_(router_weights[i])
        block.mlp = layer.to(device=gate.device, dtype=gate.dtype)
    return model
