"""Merging whole models: state dicts (or nn.Modules) tensor by tensor, soups, task vectors.

Everything here combines *parameters*, not outputs, so it needs models of the same architecture,
and (except for permutation alignment, ``align.py``, which repairs it for MLPs) the same
initialisation. The rules a merge must obey live here once and the YAML runner uses them too:
``check_compatible`` (same tensors, shapes and kinds), ``check_finite`` (no NaN/inf in or out),
and, from ``registry.py``, the model count and the parameter resolution.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ..device import get_device
from .registry import check_model_count, get_method, merge_tensor, resolve_params, sparsify_magnitude


def as_state_dict(model) -> dict[str, torch.Tensor]:
    """A state dict from an nn.Module, a TaskVector's deltas or a state dict (returned as is)."""
    if isinstance(model, nn.Module):
        return model.state_dict()
    if isinstance(model, TaskVector):
        return model.deltas
    if isinstance(model, dict):
        return model
    raise TypeError(f"expected an nn.Module or a state dict, got {type(model).__name__}")


RESCALE_NORMS = ("l1", "l2", "linf", "density")


def tensor_layout(model) -> dict[str, tuple[tuple, torch.dtype]]:
    """{tensor name: (shape, dtype)}: what two models must share to be merged."""
    if isinstance(model, Mapping) and all(isinstance(v, tuple) for v in model.values()):
        return {k: (tuple(v[0]), v[1]) for k, v in model.items()}  # already a layout
    return {k: (tuple(v.shape), v.dtype) for k, v in as_state_dict(model).items()}


def check_compatible(models: Sequence, names: Sequence[str] | None = None) -> None:
    """Raise a ValueError naming the first missing, extra or mis-shaped tensor, or one that is
    floating point in one model and integer in another. ``models``: state dicts, nn.Modules or
    layouts ``{name: (shape, dtype)}`` (what the YAML runner reads from file headers)."""
    names = list(names) if names else [f"model {i}" for i in range(len(models))]
    layouts = [tensor_layout(m) for m in models]
    ref, ref_name = layouts[0], names[0]
    for layout, nm in zip(layouts[1:], names[1:]):
        for k, (shape, dtype) in ref.items():
            if k not in layout:
                raise ValueError(f"tensor {k!r} is in {ref_name} but missing from {nm}")
            if layout[k][0] != shape:
                raise ValueError(f"tensor {k!r} has shape {shape} in {ref_name} but {layout[k][0]} in {nm}")
            if layout[k][1].is_floating_point != dtype.is_floating_point:
                raise ValueError(f"tensor {k!r} is {str(dtype).replace('torch.', '')} in {ref_name} but "
                                 f"{str(layout[k][1]).replace('torch.', '')} in {nm} (floating vs integer)")
        for k in layout:
            if k not in ref:
                raise ValueError(f"tensor {k!r} is in {nm} but missing from {ref_name}")


def check_finite(tensor: torch.Tensor, name: str, who: str, allow: bool = False) -> None:
    """Refuse a tensor holding NaN or inf: merging spreads it silently into the result."""
    if allow or not tensor.is_floating_point():
        return
    if tensor.element_size() == 1:  # float8 has no isfinite kernel
        tensor = tensor.float()
    # fast path, one pass and no mask: NaN or inf anywhere makes the sum non-finite (a finite sum
    # proves all entries finite; an overflowing one falls through to the exact count below)
    if math.isfinite(float(tensor.sum())):
        return
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    n_nan = int(torch.isnan(tensor).sum())
    n_inf = int((~finite).sum()) - n_nan
    raise ValueError(f"tensor {name!r} of {who} holds {n_nan} NaN and {n_inf} inf value(s); refusing to merge "
                     "(allow_nonfinite=True / --allow-nonfinite merges anyway)")


def merge(method: str, models: Sequence, base=None, *, device=None, out_dtype: torch.dtype | None = None,
          seed: int = 0, trim_scope: str = "tensor", rescale_norm: str = "l1", allow_nonfinite: bool = False,
          **params) -> dict[str, torch.Tensor]:
    """Merge state dicts (or nn.Modules) with a named method, tensor by tensor, in float32.

    ``models`` excludes ``base``. Parameters use mergekit's names (``weight``, ``density``,
    ``normalize``, ``t``, ``gamma``, ``lambda_`` or ``**{"lambda": x}``, ``rescale``,
    ``filter_wise``); per-model ones take a scalar or one value per model. Unlike mergekit's YAML,
    ``weight`` defaults to 1.0 here. ``trim_scope="model"`` (TIES only) trims each task vector to
    its top ``density`` over the whole model as in the TIES paper instead of per tensor.
    ``rescale_norm``: "l1" (mergekit) or "density" (DARE paper's 1/(1-p)).
    Non-floating tensors (integer buffers) are copied from the base (or first model). Output
    tensors keep the base's (first model's) dtype and device unless ``out_dtype`` is given.
    NaN or inf in an input (or produced in the output, e.g. by an overflowing ``out_dtype``) is
    refused naming the tensor, unless ``allow_nonfinite``.
    """
    m = get_method(method)
    sds = [as_state_dict(x) for x in models]
    base_sd = as_state_dict(base) if base is not None else None
    check_model_count(method, len(sds), base_sd is not None)
    if base_sd is not None and m.combine is not None and not m.needs_base:
        raise ValueError(f"{method!r} ignores a base model: list it among the models with a weight instead")
    if trim_scope not in ("tensor", "model"):
        raise ValueError(f"trim_scope must be 'tensor' or 'model', not {trim_scope!r}")
    if trim_scope == "model" and m.sparsify is not sparsify_magnitude:
        raise ValueError(f"trim_scope='model' applies to 'ties' only, not {method!r}")
    if rescale_norm not in RESCALE_NORMS:
        raise ValueError(f"rescale_norm must be one of {RESCALE_NORMS}, not {rescale_norm!r}")
    everyone = ([base_sd] if base_sd is not None else []) + sds
    who = (["the base"] if base_sd is not None else []) + [f"model {i}" for i in range(len(sds))]
    check_compatible(everyone, who)
    glob, per_model = resolve_params(method, params, len(sds), fill_weight=1.0)
    device = torch.device(device) if device is not None else get_device()
    ref = everyone[0]
    for name in ref:
        for sd, nm in zip(everyone, who):
            check_finite(sd[name], name, nm, allow_nonfinite)
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
        check_finite(out[name], name, "the merged model", allow_nonfinite)
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
