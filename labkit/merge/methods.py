"""Per-tensor merge methods: the maths, one function each, with its equation and paper.

Shapes: every function takes tensors of one shape ``[*]`` (any shape: a weight matrix
``[out, in]``, a bias ``[out]``, an embedding ``[vocab, hidden]``), float32, on one device, and
returns a tensor of that shape. "delta" is a task vector theta_i - theta_base of that shape.

Where the papers and mergekit differ, both are offered and mergekit's behaviour is the default,
so a YAML config gives the same tensors here as in mergekit:
  * TIES trimming: per tensor (mergekit, default) or over the whole model (the TIES paper's code):
    ``labkit.merge.merge("ties", ..., trim_scope="model")``.
  * DARE/TIES ``rescale``: match the L1 norm of the delta before dropping (mergekit >= 0.1,
    ``rescale_norm="l1"``, default) or divide by the keep probability 1/(1-p) as in the DARE paper
    (``rescale_norm="density"``; also what older mergekit releases did).
The reference is mergekit 0.1.5 (checked tensor for tensor with tests/test_merge_mergekit.py
when mergekit is importable). Older mergekit releases differ in small ways: breadcrumbs kept
nothing when ``int(gamma * numel) == 0``, magnitude trimming asserted instead of keeping at least
one entry, and DARE divided by the density.

Nothing here knows about names, registries, files or YAML: ``registry.py`` maps method names to
these functions, ``state_dict.py`` applies them to whole models, ``yaml_runner.py`` to checkpoints.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """Weighted average: theta = sum_i w_i theta_i (/ sum_i w_i when ``normalize``).

    The oldest merge: averaging checkpoints (Polyak averaging) and model soups
    (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482). mergekit: ``linear``.
    """
    if len(tensors) != len(weights):
        raise ValueError(f"linear: {len(tensors)} tensors but {len(weights)} weights")
    out = torch.zeros_like(tensors[0])
    for x, w in zip(tensors, weights):
        out.add_(x, alpha=float(w))
    if normalize:
        total = float(sum(weights))
        if abs(total) < 1e-8:
            raise ValueError(f"linear: weights {list(weights)} sum to 0, cannot normalize")
        out.div_(total)
    return out


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two tensors seen as flat vectors (Shoemake 1985).

    cos(Omega) = <v0/|v0|, v1/|v1|>;  theta = sin((1-t) Omega)/sin(Omega) v0 + sin(t Omega)/sin(Omega) v1.
    Falls back to (1-t) v0 + t v1 when |cos(Omega)| > ``dot_threshold`` (nearly colinear: the
    sines vanish). t=0 gives v0 (mergekit's base_model). mergekit: ``slerp`` (same threshold and eps).
    """
    n0, n1 = v0.norm(), v1.norm()
    u0 = v0 / n0 if n0 > eps else v0
    u1 = v1 / n1 if n1 > eps else v1
    dot = float((u0 * u1).sum())
    if abs(dot) > dot_threshold:
        return (1 - t) * v0 + t * v1
    omega = math.acos(dot)
    s0 = math.sin(omega - t * omega) / math.sin(omega)
    s1 = math.sin(t * omega) / math.sin(omega)
    return s0 * v0 + s1 * v1


def rescale_to_norm(masked: torch.Tensor, original: torch.Tensor, norm: str | None, density: float = 1.0,
                    eps: float = 1e-7, inplace: bool = False) -> torch.Tensor:
    """Rescale a sparsified delta so it keeps the original's size.

    ``norm``: None (no rescaling), "l1" (multiply by |original|_1 / |masked|_1: mergekit's
    ``rescale: true``), "l2", "linf", or "density" (divide by the keep probability: DARE's 1/(1-p)).
    ``inplace`` scales ``masked`` itself (saves a copy when the caller owns it).
    """
    if norm is None:
        return masked
    if norm == "density":
        return masked.div_(density) if inplace else masked / density
    ords = {"l1": 1, "l2": 2, "linf": math.inf}
    if norm not in ords:
        raise ValueError(f"rescale_norm must be None, 'l1', 'l2', 'linf' or 'density', not {norm!r}")
    before = torch.linalg.vector_norm(original, ord=ords[norm])
    after = torch.linalg.vector_norm(masked, ord=ords[norm])
    if before < eps or after < eps:
        return masked
    return masked.mul_(before / after) if inplace else masked * (before / after)


def magnitude_trim(delta: torch.Tensor, density: float, rescale_norm: str | None = None,
                   threshold: float | None = None) -> torch.Tensor:
    """Keep the ``max(1, int(density * numel))`` largest-magnitude entries, zero the rest (TIES "trim").

    Entries of equal magnitude at the cut are kept in index order (mergekit's sort breaks such ties
    arbitrarily). With ``threshold`` (a model-wide cut, see ``merge(..., trim_scope="model")``)
    keep |delta| >= threshold instead.
    """
    if threshold is not None:
        mask = delta.abs() >= threshold
    else:
        if density >= 1:
            return delta
        if density <= 0 or delta.numel() == 0:
            return torch.zeros_like(delta)
        n = delta.numel()
        k = max(1, int(density * n))  # a positive density keeps at least one entry
        cut = _kth_largest_magnitude(delta, k)
        mask = delta.abs() >= cut
        extra = int(mask.sum()) - k
        if extra > 0:  # ties at the cut: keep the first ones
            flat = mask.view(-1)
            flat[((delta.abs() == cut).view(-1)).nonzero().squeeze(1)[-extra:]] = False
    return rescale_to_norm(delta * mask, delta, rescale_norm, density, inplace=True)


def _kth_largest_magnitude(x: torch.Tensor, k: int) -> float:
    """The k-th largest |x| (selection, O(n)). On the CPU numpy partitions one float copy in place;
    torch.kthvalue would also allocate an int64 index per entry (3x the tensor's memory)."""
    mag = x.detach().abs().reshape(-1)
    if mag.device.type == "cpu":
        arr = mag.numpy()
        arr.partition(arr.size - k)
        return float(arr[arr.size - k])
    return float(mag.kthvalue(mag.numel() - k + 1).values)


def random_drop(delta: torch.Tensor, density: float, generator: torch.Generator | None = None,
                rescale_norm: str | None = "l1") -> torch.Tensor:
    """DARE's drop: keep each entry with probability ``density`` (= 1 - p), then rescale.

    Yu et al. 2023, https://arxiv.org/abs/2311.03099. The mask is drawn on the CPU from
    ``generator`` so a seed gives the same merge on every device.
    """
    if density >= 1:
        return delta
    probs = torch.full(delta.shape, float(density))
    mask = torch.bernoulli(probs, generator=generator).to(delta.device, delta.dtype)
    return rescale_to_norm(delta * mask, delta, rescale_norm, density, inplace=True)


def breadcrumbs_trim(delta: torch.Tensor, density: float, gamma: float = 0.01,
                     rescale_norm: str | None = None) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``gamma`` fraction of largest-magnitude entries (outliers) and the
    smallest ones, keeping ``density`` of the entries (Davari & Belilovsky 2023,
    https://arxiv.org/abs/2312.06795). Counts as in mergekit: n_top = int(gamma n),
    n_bottom = n - int(density n) - n_top (outlier removal shrinks when n_bottom < 0).
    """
    if density >= 1:
        return delta
    n = delta.numel()
    n_top, n_bot = int(gamma * n), n - int(density * n) - int(gamma * n)
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    order = delta.abs().view(-1).argsort()  # ascending magnitude
    mask = torch.zeros_like(delta)
    mask.view(-1)[order[n_bot:n - n_top]] = 1
    return rescale_to_norm(delta * mask, delta, rescale_norm, density, inplace=True)


def elect_sign(weighted_deltas: Sequence[torch.Tensor], method: str = "sum",
               out: torch.Tensor | None = None) -> torch.Tensor:
    """TIES "elect": the sign of sum_i w_i delta_i per entry ("sum", the paper) or the majority of
    signs ("count"); 0 counts as +1, as in mergekit. Returns a tensor of +1/-1 (in ``out`` if given)."""
    if method not in ("sum", "count"):
        raise ValueError(f"consensus method must be 'sum' or 'count', not {method!r}")
    total = torch.zeros_like(weighted_deltas[0]) if out is None else out.zero_()
    for d in weighted_deltas:
        total.add_(d if method == "sum" else d.sign())
    positive = total >= 0
    return total.copy_(positive).mul_(2).sub_(1)


def generalized_task_arithmetic(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                                sparsify: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                                consensus: str | None = None, normalize: bool = False,
                                lambda_: float = 1.0, consume: bool = False) -> torch.Tensor:
    """The family behind task arithmetic, TIES, DARE and breadcrumbs (mergekit's structure):

      delta_i = sparsify_i(theta_i - theta_base)               (trim / drop, optional)
      m_i     = [sign(w_i delta_i) == elected sign]             (consensus, optional; else m_i = 1)
      tau     = sum_i m_i w_i delta_i  (/ sum_i m_i w_i when ``normalize``; 0 divisors count as 1)
      theta   = theta_base + lambda * tau
    """
    # Written to hold about (models + 3) tensors at once. With ``consume`` the input tensors (and
    # the list) are overwritten in place, which the lazy YAML runner uses; otherwise they are kept.
    deltas = tensors if consume else [None] * len(tensors)
    for i, w in enumerate(weights):
        d = tensors[i].sub_(base) if consume else tensors[i] - base   # from here on ours to modify
        if sparsify is not None:
            d = sparsify(i, d)
        deltas[i] = d.mul_(float(w))
        del d
    mixed = torch.zeros_like(base)
    divisor = torch.zeros_like(base) if normalize else None
    if consensus is not None:
        positive = elect_sign(deltas, consensus, out=mixed) > 0
        mixed.zero_()
        for wd, w in zip(deltas, weights):
            agree = torch.where(positive, wd > 0, wd < 0)  # zeros never agree: a disjoint mean
            mixed.add_(wd.mul_(agree))
            if normalize:
                divisor.add_(agree, alpha=float(w))
            del agree
        if normalize:
            divisor[divisor == 0] = 1
    else:
        for wd in deltas:
            mixed.add_(wd)
        total = float(sum(weights))
        divisor = total if abs(total) >= 1e-8 else 1.0
    if consume:
        deltas.clear()
    if normalize:
        mixed.div_(divisor)
    return mixed.mul_(lambda_).add_(base)


def task_arithmetic(base, tensors, weights, lambda_: float = 1.0, normalize: bool = False):
    """theta = theta_base + lambda sum_i w_i (theta_i - theta_base) (Ilharco et al. 2023,
    https://arxiv.org/abs/2212.04089). mergekit: ``task_arithmetic``."""
    return generalized_task_arithmetic(base, tensors, weights, normalize=normalize, lambda_=lambda_)


def ties(base, tensors, weights, density: float = 1.0, normalize: bool = True, lambda_: float = 1.0,
         rescale_norm: str | None = None, consensus: str = "sum"):
    """TIES-merging (Yadav et al. 2023, https://arxiv.org/abs/2306.01708): trim each delta to its top
    ``density`` fraction by magnitude, elect a sign per entry, average only the deltas that agree
    (disjoint mean), add lambda times the result. mergekit: ``ties`` (trims per tensor)."""
    return generalized_task_arithmetic(
        base, tensors, weights, lambda i, d: magnitude_trim(d, _at(density, i), rescale_norm),
        consensus, normalize, lambda_)


def dare(base, tensors, weights, density: float = 1.0, generator: torch.Generator | None = None,
         rescale_norm: str | None = "l1", consensus: str | None = None, normalize: bool = False,
         lambda_: float = 1.0):
    """DARE (Yu et al. 2023): drop each delta entry with probability p = 1 - density, rescale, then
    sum (``consensus=None``: mergekit ``dare_linear``) or TIES-elect (``"sum"``: ``dare_ties``)."""
    return generalized_task_arithmetic(
        base, tensors, weights, lambda i, d: random_drop(d, _at(density, i), generator, rescale_norm),
        consensus, normalize, lambda_)


def breadcrumbs(base, tensors, weights, density: float = 1.0, gamma: float = 0.01,
                rescale_norm: str | None = None, consensus: str | None = None, normalize: bool = False,
                lambda_: float = 1.0):
    """Model Breadcrumbs: task arithmetic on deltas with both tails cut (see ``breadcrumbs_trim``)."""
    return generalized_task_arithmetic(
        base, tensors, weights, lambda i, d: breadcrumbs_trim(d, _at(density, i), _at(gamma, i), rescale_norm),
        consensus, normalize, lambda_)


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """Model Stock (Jang et al. 2024, https://arxiv.org/abs/2403.19522), as mergekit computes it:
    cos = mean over pairs of cos(theta_i - theta_0, theta_j - theta_0) (per row if ``filter_wise``),
    t = N cos / (1 + (N - 1) cos),  theta = t mean_i(theta_i) + (1 - t) theta_0.  Needs N >= 2."""
    if len(tensors) < 2:
        raise ValueError("model_stock needs a base and at least 2 other models")
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() <= 1 else base
        ws = [w.unsqueeze(0) if w.dim() <= 1 else w for w in tensors]
    else:
        w0, ws = base.reshape(-1), [w.reshape(-1) for w in tensors]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norms = offsets[i].norm(dim=-1) * offsets[j].norm(dim=-1)
            cosines.append(((offsets[i] * offsets[j]).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    t = n * cos / (1 + (n - 1) * cos)
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)


def _at(value, i):
    """A per-model parameter: a scalar or a sequence indexed by model."""
    return value[i] if isinstance(value, (list, tuple)) else value
