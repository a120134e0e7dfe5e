"""Permutation alignment (weight matching, Ainsworth et al. 2023, "Git Re-Basin",
https://arxiv.org/abs/2209.04836): permute the hidden units of one MLP so that it sits next to
another in weight space before they are averaged. Shapes: a chain of Linear layers W_l [out_l, in_l]."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .state_dict import load_merged


def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of the nn.Linear modules in registration order: the chain weight matching permutes."""
    return [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]


def weight_matching(layers_a: Sequence[tuple], layers_b: Sequence[tuple], max_iter: int = 100,
                    seed: int = 0) -> list[torch.Tensor]:
    """Permutations of the hidden units of B that make it closest to A (weight matching).

    ``layers_*``: [(W_1, b_1), ..., (W_L, b_L)] of a chain of Linear layers, W_l [out_l, in_l]
    (b may be None). Returns L-1 index tensors perm_l [out_l]: B's unit perm_l[i] plays A's unit i.
    Each step solves, for one hidden layer l with the others fixed, the assignment problem
      max_P <W_l^A, P W_l^B P_{l-1}^T> + <b_l^A, P b_l^B> + <W_{l+1}^A, P_{l+1} W_{l+1}^B P^T>
    with the Hungarian algorithm, in random layer order until no permutation changes.
    """
    from scipy.optimize import linear_sum_assignment

    if len(layers_a) != len(layers_b) or len(layers_a) < 2:
        raise ValueError("weight_matching needs two chains of the same number (>= 2) of Linear layers")
    wa = [(w.detach().double().cpu(), None if b is None else b.detach().double().cpu()) for w, b in layers_a]
    wb = [(w.detach().double().cpu(), None if b is None else b.detach().double().cpu()) for w, b in layers_b]
    for l, ((w1, _), (w2, _)) in enumerate(zip(wa, wb)):
        if w1.shape != w2.shape:
            raise ValueError(f"layer {l}: shapes {tuple(w1.shape)} and {tuple(w2.shape)} differ")
    n_hidden = len(wa) - 1
    perms = [torch.arange(wa[l][0].shape[0]) for l in range(n_hidden)]
    rng = torch.Generator().manual_seed(seed)
    for _ in range(max_iter):
        changed = False
        for l in torch.randperm(n_hidden, generator=rng).tolist():
            (w_a, b_a), (w_b, b_b) = wa[l], wb[l]
            w_b_in = w_b[:, perms[l - 1]] if l > 0 else w_b       # B's inputs already aligned to A
            score = w_a @ w_b_in.T                                # [out_l, out_l]
            if b_a is not None and b_b is not None:
                score += torch.outer(b_a, b_b)
            w_next_a, w_next_b = wa[l + 1][0], wb[l + 1][0]
            w_next_b = w_next_b[perms[l + 1]] if l + 1 < n_hidden else w_next_b
            score += w_next_a.T @ w_next_b
            _, cols = linear_sum_assignment(score.numpy(), maximize=True)
            new = torch.as_tensor(cols, dtype=torch.long)
            old_score = score[torch.arange(len(new)), perms[l]].sum()
            new_score = score[torch.arange(len(new)), new].sum()
            if new_score > old_score + 1e-12:
                perms[l], changed = new, True
        if not changed:
            break
    return perms


def permute_linear_chain(state_dict: dict, names: Sequence[str], perms: Sequence[torch.Tensor]) -> dict:
    """Apply hidden-unit permutations to a chain of Linear layers (``names``) in a state dict:
    rows (and bias) of layer l and columns of layer l+1. The function the model computes is unchanged."""
    out = {k: v.clone() for k, v in state_dict.items()}
    for l, perm in enumerate(perms):
        w, b, w_next = f"{names[l]}.weight", f"{names[l]}.bias", f"{names[l + 1]}.weight"
        out[w] = out[w][perm.to(out[w].device)]
        if b in out:
            out[b] = out[b][perm.to(out[b].device)]
        out[w_next] = out[w_next][:, perm.to(out[w_next].device)]
    return out


def align_mlp(model_a: nn.Module, model_b: nn.Module, max_iter: int = 100, seed: int = 0) -> nn.Module:
    """A copy of ``model_b`` with its hidden units permuted to match ``model_a`` (same function as B).

    Works for MLPs whose Linear layers form a chain (in registration order) with elementwise
    activations in between, e.g. labkit.models.DigitMLP."""
    names = linear_layer_names(model_a)
    if names != linear_layer_names(model_b):
        raise ValueError("align_mlp: the two models have different Linear layers")
    sa, sb = model_a.state_dict(), model_b.state_dict()
    chain = lambda sd: [(sd[f"{n}.weight"], sd.get(f"{n}.bias")) for n in names]  # noqa: E731
    perms = weight_matching(chain(sa), chain(sb), max_iter=max_iter, seed=seed)
    return load_merged(model_b, permute_linear_chain(sb, names, perms))

