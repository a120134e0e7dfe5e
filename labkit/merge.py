"""Weight-space merging: averaging, task vectors, TIES, DARE, SLERP, model stock, soups, alignment.

Everything here combines *parameters*, not outputs, so it needs models of the same architecture,
and (except for permutation alignment, which repairs it for MLPs) the same initialisation.

Layers of this module:
  * one function per method on single tensors, float32, with its equation and paper
    (``linear``, ``slerp``, ``task_arithmetic``, ``ties``, ``dare``, ``breadcrumbs``, ``model_stock``);
  * ``METHODS``: the registry of named methods with their declared parameters, using mergekit's
    names, meanings and defaults, and ``merge_tensor`` that applies one by name;
  * ``merge(method, models, base, **params)`` on state dicts (or nn.Modules), tensor by tensor;
  * labkit's own: ``average_checkpoints``, ``uniform_soup``, ``greedy_soup``, ``TaskVector``;
  * permutation alignment (``weight_matching``, ``align_mlp``) and diagnostics;
  * ``run_merge_config``: ``labkit merge CONFIG.yml OUT_DIR`` (mergekit YAML, lazy safetensors IO),
    implemented in ``labkit.merge_io``.

Where the papers and mergekit differ, both are offered and mergekit's behaviour is the default,
so a YAML config gives the same tensors here as in mergekit:
  * TIES trimming: per tensor (mergekit, default) or over the whole model (the TIES paper's code):
    ``merge("ties", ..., trim_scope="model")``.
  * DARE/TIES ``rescale``: match the L1 norm of the delta before dropping (mergekit >= 0.1,
    ``rescale_norm="l1"``, default) or divide by the keep probability 1/(1-p) as in the DARE paper
    (``rescale_norm="density"``; also what older mergekit releases did).
The reference is mergekit 0.1.5 (checked tensor for tensor with tests/test_merge_mergekit.py
when mergekit is importable). Older mergekit releases differ in small ways: breadcrumbs kept
nothing when ``int(gamma * numel) == 0``, magnitude trimming asserted instead of keeping at least
one entry, and DARE divided by the density.
"""
from __future__ import annotations

import copy
import math
import zlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .device import get_device

# ---------------------------------------------------------------------------------------------
# Per-tensor methods. Inputs are float32 tensors of one shape on one device; so are the outputs.
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Registry of named methods (mergekit's names, parameters and defaults).
# ---------------------------------------------------------------------------------------------

REQUIRED = object()  # marks a parameter without a default


@dataclass(frozen=True)
class MergeMethod:
    """A named method: ``params`` are global (one value per tensor), ``model_params`` per model."""

    name: str
    params: dict
    model_params: dict
    needs_base: bool
    min_models: int = 1  # models other than the base
    max_models: int | None = None
    paper: str = ""
    description: str = ""


def _gta(name, normalize, rescale, extra=None, paper="", description=""):
    model_params = {"weight": REQUIRED, "density": 1.0, **(extra or {})}
    return MergeMethod(name, {"normalize": normalize, "rescale": rescale, "lambda": 1.0, "int8_mask": False},
                       model_params, needs_base=True, paper=paper, description=description)


METHODS: dict[str, MergeMethod] = {m.name: m for m in [
    MergeMethod("linear", {"normalize": True}, {"weight": REQUIRED}, needs_base=False,
                paper="https://arxiv.org/abs/2203.05482", description="weighted average"),
    MergeMethod("slerp", {"t": REQUIRED}, {}, needs_base=True, min_models=1, max_models=1,
                paper="https://en.wikipedia.org/wiki/Slerp", description="spherical interpolation base -> other"),
    _gta("task_arithmetic", False, False, paper="https://arxiv.org/abs/2212.04089",
         description="base + lambda * sum of weighted task vectors"),
    _gta("ties", True, False, paper="https://arxiv.org/abs/2306.01708", description="trim, elect sign, disjoint mean"),
    _gta("dare_linear", False, True, paper="https://arxiv.org/abs/2311.03099", description="random drop + rescale, sum"),
    _gta("dare_ties", False, True, paper="https://arxiv.org/abs/2311.03099", description="random drop + rescale, TIES sign election"),
    _gta("breadcrumbs", False, False, {"gamma": 0.01}, paper="https://arxiv.org/abs/2312.06795",
         description="drop smallest and largest deltas, sum"),
    _gta("breadcrumbs_ties", False, False, {"gamma": 0.01}, paper="https://arxiv.org/abs/2312.06795",
         description="breadcrumbs with TIES sign election"),
    MergeMethod("model_stock", {"filter_wise": False}, {}, needs_base=True, min_models=2,
                paper="https://arxiv.org/abs/2403.19522", description="interpolate the average toward the base by angle"),
]}

_SPARSIFY = {"ties": "magnitude", "dare_linear": "random", "dare_ties": "random",
             "breadcrumbs": "breadcrumbs", "breadcrumbs_ties": "breadcrumbs"}
_CONSENSUS = {"ties": "sum", "dare_ties": "sum", "breadcrumbs_ties": "sum"}


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}; labkit supports: {', '.join(METHODS)}")
    return METHODS[name]


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed, so random drops do not depend on the order tensors are merged in."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def merge_tensor(method: str, base: torch.Tensor | None, tensors: Sequence[torch.Tensor], params: dict,
                 model_params: Sequence[dict], *, name: str = "", seed: int = 0, rescale_norm: str = "l1",
                 trim_thresholds: Sequence[float] | None = None, consume: bool = False) -> torch.Tensor:
    """Apply a named method to one tensor. ``params`` holds the method's global parameters and
    ``model_params[i]`` those of ``tensors[i]`` (defaults filled in by the caller: see
    ``resolve_params``). All tensors float32 on one device. ``base`` excludes the models list.
    ``consume=True`` lets the task-arithmetic family overwrite ``tensors`` to save memory."""
    m = get_method(method)
    if method == "linear":
        return linear(tensors, [p["weight"] for p in model_params], params["normalize"])
    if method == "slerp":
        return slerp(float(params["t"]), base, tensors[0])
    if method == "model_stock":
        return model_stock(base, tensors, bool(params["filter_wise"]))
    assert m.needs_base
    norm = rescale_norm if params["rescale"] else None
    sparsification = _SPARSIFY.get(method)

    def sparsify(i, d):
        p = model_params[i]
        if sparsification == "magnitude":
            threshold = trim_thresholds[i] if trim_thresholds is not None else None
            return magnitude_trim(d, p["density"], norm, threshold)
        if sparsification == "random":
            g = torch.Generator().manual_seed(tensor_seed(seed + 7919 * i, name))
            return random_drop(d, p["density"], g, norm)
        return breadcrumbs_trim(d, p["density"], p["gamma"], norm)

    return generalized_task_arithmetic(
        base, tensors, [p["weight"] for p in model_params], sparsify if sparsification else None,
        _CONSENSUS.get(method), bool(params["normalize"]), float(params["lambda"]), consume)


def resolve_params(method: str, given: dict, n_models: int, *, fill_weight: float | None = None,
                   where: str = "") -> tuple[dict, list[dict]]:
    """Split user parameters into (global params, per-model params) with defaults filled in.

    A per-model parameter may be a scalar (all models) or a sequence of ``n_models`` values.
    Unknown names raise a ValueError naming them (typos silently ignored are worse than an error).
    """
    m = get_method(method)
    given = {("lambda" if k == "lambda_" else k): v for k, v in given.items()}
    unknown = set(given) - set(m.params) - set(m.model_params)
    if unknown:
        raise ValueError(f"{where}unknown parameter(s) {sorted(unknown)} for merge method {method!r}; "
                         f"it takes {sorted(m.params)} and per model {sorted(m.model_params)}")
    params = {}
    for k, default in m.params.items():
        v = given.get(k, default)
        if v is REQUIRED:
            raise ValueError(f"{where}merge method {method!r} needs parameter {k!r}")
        params[k] = v
    per_model = [{} for _ in range(n_models)]
    for k, default in m.model_params.items():
        v = given.get(k, default)
        if v is REQUIRED and k == "weight" and fill_weight is not None:
            v = fill_weight
        if v is REQUIRED:
            raise ValueError(f"{where}merge method {method!r} needs parameter {k!r} for every model")
        if isinstance(v, (list, tuple)):
            if len(v) != n_models:
                raise ValueError(f"{where}parameter {k!r} has {len(v)} values for {n_models} models")
        for i in range(n_models):
            per_model[i][k] = _at(v, i)
    return params, per_model


# ---------------------------------------------------------------------------------------------
# State dicts: merge whole models tensor by tensor.
# ---------------------------------------------------------------------------------------------


def as_state_dict(model) -> dict[str, torch.Tensor]:
    """A state dict from an nn.Module, a TaskVector's deltas or a state dict (returned as is)."""
    if isinstance(model, nn.Module):
        return model.state_dict()
    if isinstance(model, TaskVector):
        return model.deltas
    if isinstance(model, dict):
        return model
    raise TypeError(f"expected an nn.Module or a state dict, got {type(model).__name__}")


def check_compatible(state_dicts: Sequence[dict], names: Sequence[str] | None = None) -> None:
    """Raise a ValueError naming the first missing, extra or mis-shaped tensor."""
    names = names or [f"model {i}" for i in range(len(state_dicts))]
    ref, ref_name = state_dicts[0], names[0]
    for sd, nm in zip(state_dicts[1:], names[1:]):
        for k in ref:
            if k not in sd:
                raise ValueError(f"tensor {k!r} is in {ref_name} but missing from {nm}")
            if tuple(sd[k].shape) != tuple(ref[k].shape):
                raise ValueError(f"tensor {k!r} has shape {tuple(ref[k].shape)} in {ref_name} "
                                 f"but {tuple(sd[k].shape)} in {nm}")
        for k in sd:
            if k not in ref:
                raise ValueError(f"tensor {k!r} is in {nm} but missing from {ref_name}")


def merge(method: str, models: Sequence, base=None, *, device=None, out_dtype: torch.dtype | None = None,
          seed: int = 0, trim_scope: str = "tensor", rescale_norm: str = "l1", **params) -> dict[str, torch.Tensor]:
    """Merge state dicts (or nn.Modules) with a named method, tensor by tensor, in float32.

    ``models`` excludes ``base``. Parameters use mergekit's names (``weight``, ``density``,
    ``normalize``, ``t``, ``gamma``, ``lambda_`` or ``**{"lambda": x}``, ``rescale``,
    ``filter_wise``); per-model ones take a scalar or one value per model. Unlike mergekit's YAML,
    ``weight`` defaults to 1.0 here. ``trim_scope="model"`` (TIES only) trims each task vector to
    its top ``density`` over the whole model as in the TIES paper instead of per tensor.
    ``rescale_norm``: "l1" (mergekit) or "density" (DARE paper's 1/(1-p)).
    Non-floating tensors (integer buffers) are copied from the base (or first model). Output
    tensors keep the base's (first model's) dtype and device unless ``out_dtype`` is given.
    """
    m = get_method(method)
    sds = [as_state_dict(x) for x in models]
    base_sd = as_state_dict(base) if base is not None else None
    if m.needs_base and base_sd is None:
        raise ValueError(f"merge method {method!r} needs a base model")
    if len(sds) < m.min_models or (m.max_models is not None and len(sds) > m.max_models):
        want = m.min_models if m.max_models == m.min_models else f"at least {m.min_models}"
        raise ValueError(f"merge method {method!r} takes {want} model(s) besides the base, got {len(sds)}")
    if base_sd is not None and method == "linear":
        raise ValueError("'linear' ignores a base model: list it among the models with a weight instead")
    if trim_scope not in ("tensor", "model"):
        raise ValueError(f"trim_scope must be 'tensor' or 'model', not {trim_scope!r}")
    if trim_scope == "model" and _SPARSIFY.get(method) != "magnitude":
        raise ValueError(f"trim_scope='model' applies to 'ties' only, not {method!r}")
    everyone = ([base_sd] if base_sd is not None else []) + sds
    check_compatible(everyone)
    glob, per_model = resolve_params(method, params, len(sds), fill_weight=1.0)
    device = torch.device(device) if device is not None else get_device()
    ref = everyone[0]
    thresholds = None
    if trim_scope == "model":
        thresholds = [_model_trim_threshold(base_sd, sd, p["density"], device) for sd, p in zip(sds, per_model)]
    out = {}
    for name, ref_t in ref.items():
        if not ref_t.is_floating_point():
            out[name] = ref_t.clone()
            continue
        base_t = base_sd[name].to(device, torch.float32) if base_sd is not None else None
        xs = [sd[name].to(device, torch.float32) for sd in sds]
        merged = merge_tensor(method, base_t, xs, glob, per_model, name=name, seed=seed,
                              rescale_norm=rescale_norm, trim_thresholds=thresholds)
        out[name] = merged.to(ref_t.device, out_dtype or ref_t.dtype)
    return out


def _model_trim_threshold(base_sd, sd, density, device) -> float | None:
    """The magnitude of the k-th largest entry of theta - theta_base over all float tensors."""
    if density >= 1:
        return None
    mags = torch.cat([(sd[k].to(device, torch.float32) - base_sd[k].to(device, torch.float32)).abs().reshape(-1)
                      for k in sd if sd[k].is_floating_point()])
    k = int(density * mags.numel())
    return math.inf if k == 0 else float(mags.topk(k).values[-1])


def load_merged(model: nn.Module, state_dict: dict) -> nn.Module:
    """A deep copy of ``model`` carrying ``state_dict`` (handy for evaluating merges)."""
    new = copy.deepcopy(model)
    new.load_state_dict(state_dict)
    return new


def interpolate(a, b, alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) theta_a + alpha theta_b, for every floating tensor (alpha outside [0, 1] extrapolates)."""
    return merge("linear", [a, b], weight=[1 - alpha, alpha], normalize=False, device="cpu")


# ---------------------------------------------------------------------------------------------
# labkit's own: checkpoint averaging, soups, task vectors.
# ---------------------------------------------------------------------------------------------


def average_checkpoints(checkpoints: Sequence, last: int | None = None, weights: Sequence[float] | None = None):
    """Uniform (or weighted) average of checkpoints along one training run, e.g. the last 5:
    reduces SGD noise (Polyak & Juditsky 1992; "checkpoint averaging" in NMT, Vaswani et al. 2017)."""
    checkpoints = list(checkpoints)[-last:] if last else list(checkpoints)
    if not checkpoints:
        raise ValueError("average_checkpoints needs at least one checkpoint")
    return merge("linear", checkpoints, weight=list(weights) if weights else 1.0, normalize=True, device="cpu")


def uniform_soup(models: Sequence) -> dict[str, torch.Tensor]:
    """The uniform soup: the plain average of fine-tunes of one base (Wortsman et al. 2022)."""
    return average_checkpoints(models)


@dataclass
class SoupResult:
    state_dict: dict
    chosen: list[int]             # indices into the candidate list, in the order they were added
    score: float                  # evaluate(soup)
    individual: list[float]       # evaluate(candidate) for every candidate
    history: list[tuple[int, float, bool]] = field(default_factory=list)  # (candidate, score with it, kept)


def greedy_soup(models: Sequence, evaluate: Callable[[dict], float]) -> SoupResult:
    """Greedy soup (Wortsman et al. 2022, recipe 1): sort candidates by their own held-out score
    (best first), start from the best, and add each next one to the average only if the held-out
    score of the average does not decrease. ``evaluate(state_dict) -> float`` (higher is better),
    computed on held-out data, never on the test set."""
    if not models:
        raise ValueError("greedy_soup needs at least one model")
    sds = [as_state_dict(m) for m in models]
    individual = [float(evaluate(sd)) for sd in sds]
    order = sorted(range(len(sds)), key=lambda i: -individual[i])
    chosen, best = [order[0]], individual[order[0]]
    history = [(order[0], best, True)]
    for i in order[1:]:
        candidate = uniform_soup([sds[j] for j in chosen + [i]])
        score = float(evaluate(candidate))
        kept = score >= best
        history.append((i, score, kept))
        if kept:
            chosen, best = chosen + [i], score
    return SoupResult(uniform_soup([sds[j] for j in chosen]), chosen, best, individual, history)


class TaskVector:
    """tau = theta_finetuned - theta_base as a value (Ilharco et al. 2023): add, negate, scale,
    then ``apply_to(base)``. Only floating tensors are kept (float32, on the CPU)."""

    def __init__(self, deltas: dict[str, torch.Tensor]):
        self.deltas = {k: v.detach().to("cpu", torch.float32) for k, v in deltas.items()}

    @classmethod
    def between(cls, base, finetuned) -> "TaskVector":
        b, f = as_state_dict(base), as_state_dict(finetuned)
        check_compatible([b, f], ["base", "finetuned"])
        return cls({k: f[k].float() - b[k].float() for k in b if b[k].is_floating_point()})

    def _check(self, other: "TaskVector"):
        if not isinstance(other, TaskVector):
            raise TypeError(f"can only combine a TaskVector with a TaskVector, not {type(other).__name__}")
        if set(other.deltas) != set(self.deltas):
            diff = sorted(set(other.deltas) ^ set(self.deltas))
            raise ValueError(f"task vectors cover different tensors, e.g. {diff[:3]}")

    def __add__(self, other):
        self._check(other)
        return TaskVector({k: v + other.deltas[k] for k, v in self.deltas.items()})

    def __radd__(self, other):  # sum([tv1, tv2]) starts from 0
        return self if isinstance(other, (int, float)) and other == 0 else self.__add__(other)

    def __neg__(self):
        return TaskVector({k: -v for k, v in self.deltas.items()})

    def __sub__(self, other):
        return self + (-other)

    def __mul__(self, scale: float):
        if not isinstance(scale, (int, float)):
            raise TypeError(f"a TaskVector scales by a number, not {type(scale).__name__}")
        return TaskVector({k: v * scale for k, v in self.deltas.items()})

    __rmul__ = __mul__

    def norm(self) -> float:
        return math.sqrt(sum(float(v.pow(2).sum()) for v in self.deltas.values()))

    def cosine(self, other: "TaskVector") -> float:
        self._check(other)
        dot = sum(float((v * other.deltas[k]).sum()) for k, v in self.deltas.items())
        return dot / max(self.norm() * other.norm(), 1e-12)

    def apply_to(self, base, scale: float = 1.0) -> dict[str, torch.Tensor]:
        """theta_base + scale * tau; tensors keep the base's dtype and device."""
        b = as_state_dict(base)
        missing = sorted(set(self.deltas) - set(b))
        if missing:
            raise ValueError(f"the base has no tensor {missing[0]!r} of this task vector")
        out = {}
        for k, v in b.items():
            if k in self.deltas:
                if tuple(self.deltas[k].shape) != tuple(v.shape):
                    raise ValueError(f"tensor {k!r}: task vector shape {tuple(self.deltas[k].shape)} "
                                     f"vs base {tuple(v.shape)}")
                out[k] = (v.float() + scale * self.deltas[k].to(v.device)).to(v.dtype)
            else:
                out[k] = v.clone()
        return out

    def __repr__(self):
        return f"TaskVector({len(self.deltas)} tensors, norm={self.norm():.4g})"


# ---------------------------------------------------------------------------------------------
# Permutation alignment (weight matching, Ainsworth et al. 2023, Git Re-Basin).
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Diagnostics.
# ---------------------------------------------------------------------------------------------


def cosine_matrix(task_vectors: Sequence[TaskVector]) -> torch.Tensor:
    """[T, T] cosine similarities between task vectors (near 0: nearly orthogonal, little interference)."""
    n = len(task_vectors)
    out = torch.eye(n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = task_vectors[i].cosine(task_vectors[j])
    return out


def sign_conflict_rate(task_vectors: Sequence[TaskVector], density: float = 1.0) -> dict[str, float]:
    """Per tensor, the fraction of entries where the (trimmed to ``density``) task vectors have both
    a positive and a negative value: the interference TIES's sign election resolves."""
    out = {}
    for k in task_vectors[0].deltas:
        ds = [magnitude_trim(tv.deltas[k], density) for tv in task_vectors]
        pos = torch.stack([d > 0 for d in ds]).any(0)
        neg = torch.stack([d < 0 for d in ds]).any(0)
        out[k] = float((pos & neg).float().mean())
    return out


def trimmed_mass(task_vector: TaskVector, density: float, per_tensor: bool = False):
    """The fraction of a task vector's L1 mass that magnitude trimming to ``density`` removes
    (per tensor, as mergekit trims). Small values are why TIES can drop 80% of entries."""
    removed, total, out = 0.0, 0.0, {}
    for k, d in task_vector.deltas.items():
        kept = magnitude_trim(d, density)
        r, t = float((d - kept).abs().sum()), float(d.abs().sum())
        out[k] = r / t if t > 0 else 0.0
        removed, total = removed + r, total + t
    return out if per_tensor else (removed / total if total > 0 else 0.0)


def interpolation_curve(a, b, evaluate: Callable[[dict], object], alphas: Sequence[float] | None = None) -> list[dict]:
    """Evaluate (1 - alpha) theta_a + alpha theta_b along the segment. ``evaluate(state_dict)``
    returns a number or a dict of numbers (e.g. loss and accuracy). Returns one dict per alpha."""
    alphas = [i / 10 for i in range(11)] if alphas is None else [float(x) for x in alphas]
    rows = []
    for alpha in alphas:
        result = evaluate(interpolate(a, b, alpha))
        rows.append({"alpha": alpha, **(result if isinstance(result, dict) else {"value": float(result)})})
    return rows


def run_merge_config(config_path, out_dir, *, device=None, force: bool = False, allow_pickle: bool = False,
                     **kwargs):
    """``labkit merge CONFIG.yml OUT_DIR``: see ``labkit.merge_io.run_merge_config``."""
    from .merge_io import run_merge_config as _run

    return _run(config_path, out_dir, device=device, force=force, allow_pickle=allow_pickle, **kwargs)
