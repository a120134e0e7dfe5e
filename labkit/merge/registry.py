"""The registry of named merge methods (mergekit's names, parameters, defaults and meanings).

A ``MergeMethod`` entry carries everything that makes the method what it is: its parameters
(each a ``Param`` with a type, a valid range and a default), how many models it takes, and its
behaviour: either a ``combine`` function (linear, slerp, model stock) or, for the task-arithmetic
family, a ``sparsify`` function and a ``consensus`` rule for ``generalized_task_arithmetic``.
Adding a method is one entry in ``METHODS`` (plus its maths in ``methods.py``).

This module also holds the rules every way of merging shares, so they exist once:
``check_model_count`` (how many models), ``check_param_names`` (typos are errors) and
``resolve`` (defaults, required values, types and ranges, one error line naming the model and the
parameter). ``state_dict.merge`` and the YAML runner both go through them.
"""
from __future__ import annotations

import math
import numbers
import warnings
import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .methods import (_at, breadcrumbs_trim, generalized_task_arithmetic, linear, magnitude_trim, model_stock,
                      random_drop, slerp)

REQUIRED = object()  # marks a parameter without a default
MISSING = object()   # a lookup found no value for a parameter


@dataclass(frozen=True)
class Param:
    """One declared parameter: ``kind`` "number" (finite, within [low, high]) or "bool"."""

    name: str
    default: object
    kind: str = "number"
    low: float = -math.inf
    high: float = math.inf
    per_model: bool = False
    doc: str = ""

    def check(self, value, where: str = ""):
        """The value as the method uses it (float or bool), or a ValueError naming the parameter."""
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            raise ValueError(f"{where}parameter {self.name!r} must be true or false, not {value!r}")
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{where}parameter {self.name!r} must be a number{self._range()}, not {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{where}parameter {self.name!r} must be finite, not {value}")
        if not self.low <= value <= self.high:
            raise ValueError(f"{where}parameter {self.name!r} must be in [{self.low:g}, {self.high:g}], "
                             f"not {value:g}")
        return value

    def _range(self) -> str:
        return "" if (self.low, self.high) == (-math.inf, math.inf) else f" in [{self.low:g}, {self.high:g}]"


@dataclass
class SparsifyContext:
    """What a sparsifier may need besides the delta and the model's parameters."""

    index: int                      # which model (0-based, base excluded)
    tensor_name: str
    seed: int
    rescale_norm: str | None        # None when the method's ``rescale`` is off
    threshold: float | None = None  # a model-wide magnitude cut (trim_scope="model")


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed, so random drops do not depend on the order tensors are merged in."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def sparsify_magnitude(delta, p: dict, ctx: SparsifyContext):
    """TIES trim: keep the top ``density`` fraction by magnitude."""
    return magnitude_trim(delta, p["density"], ctx.rescale_norm, ctx.threshold)


def sparsify_random(delta, p: dict, ctx: SparsifyContext):
    """DARE drop: keep each entry with probability ``density`` (seeded per model and tensor)."""
    generator = torch.Generator().manual_seed(tensor_seed(ctx.seed + 7919 * ctx.index, ctx.tensor_name))
    return random_drop(delta, p["density"], generator, ctx.rescale_norm)


def sparsify_breadcrumbs(delta, p: dict, ctx: SparsifyContext):
    """Breadcrumbs: drop the ``gamma`` largest and the smallest entries, keeping ``density``."""
    return breadcrumbs_trim(delta, p["density"], p["gamma"], ctx.rescale_norm)


def _combine_linear(base, tensors, params, model_params):
    return linear(tensors, [p["weight"] for p in model_params], params["normalize"])


def _combine_slerp(base, tensors, params, model_params):
    return slerp(params["t"], base, tensors[0])


def _combine_model_stock(base, tensors, params, model_params):
    return model_stock(base, tensors, params["filter_wise"])


def _check_linear_weights(params, model_params, where):
    total = sum(p["weight"] for p in model_params)
    if params["normalize"] and abs(total) < 1e-8:
        raise ValueError(f"{where}the weights {[p['weight'] for p in model_params]} sum to 0, so 'linear' "
                         "cannot normalize by their sum (set normalize: false or change a weight)")


@dataclass(frozen=True)
class MergeMethod:
    """A named method. ``params`` / ``model_params`` give the defaults of the global and per-model
    parameters (``REQUIRED`` when there is none); ``parameters`` their full declarations."""

    name: str
    parameters: tuple[Param, ...]
    needs_base: bool
    min_models: int = 1                       # models other than the base
    max_models: int | None = None
    combine: Callable | None = None           # (base, tensors, params, model_params) -> tensor
    sparsify: Callable | None = None          # (delta, model params, SparsifyContext) -> delta
    consensus: str | None = None              # None, "sum" or "count" (TIES sign election)
    check: Callable | None = None             # (params, model_params, where): cross-parameter rules
    paper: str = ""
    description: str = ""

    @property
    def params(self) -> dict:
        return {p.name: p.default for p in self.parameters if not p.per_model}

    @property
    def model_params(self) -> dict:
        return {p.name: p.default for p in self.parameters if p.per_model}

    def param(self, name: str) -> Param:
        return next(p for p in self.parameters if p.name == name)


WEIGHT = Param("weight", REQUIRED, per_model=True, doc="the model's weight w_i")
DENSITY = Param("density", 1.0, low=0.0, high=1.0, per_model=True, doc="fraction of delta entries kept")
GAMMA = Param("gamma", 0.01, low=0.0, high=1.0, per_model=True, doc="fraction of largest entries dropped")
INT8_MASK = Param("int8_mask", False, kind="bool",
                  doc="mergekit: store sign masks as int8 instead of the model dtype to save memory. "
                      "labkit's masks are always 1-byte bools, so both values give the same tensors")


def _task_arithmetic_family(name, normalize, rescale, sparsify=None, consensus=None, extra=(), paper="",
                            description=""):
    parameters = (Param("normalize", normalize, kind="bool"), Param("rescale", rescale, kind="bool"),
                  Param("lambda", 1.0, doc="scale of the merged task vector"), INT8_MASK, WEIGHT, DENSITY,
                  *extra)
    return MergeMethod(name, parameters, needs_base=True, sparsify=sparsify, consensus=consensus, paper=paper,
                       description=description)


METHODS: dict[str, MergeMethod] = {m.name: m for m in [
    MergeMethod("linear", (Param("normalize", True, kind="bool"), WEIGHT), needs_base=False,
                combine=_combine_linear, check=_check_linear_weights,
                paper="https://arxiv.org/abs/2203.05482", description="weighted average"),
    MergeMethod("slerp", (Param("t", REQUIRED, low=0.0, high=1.0, doc="0 gives the base, 1 the other"),),
                needs_base=True, min_models=1, max_models=1, combine=_combine_slerp,
                paper="https://en.wikipedia.org/wiki/Slerp", description="spherical interpolation base -> other"),
    _task_arithmetic_family("task_arithmetic", False, False, paper="https://arxiv.org/abs/2212.04089",
                            description="base + lambda * sum of weighted task vectors"),
    _task_arithmetic_family("ties", True, False, sparsify_magnitude, "sum", paper="https://arxiv.org/abs/2306.01708",
                            description="trim, elect sign, disjoint mean"),
    _task_arithmetic_family("dare_linear", False, True, sparsify_random, paper="https://arxiv.org/abs/2311.03099",
                            description="random drop + rescale, sum"),
    _task_arithmetic_family("dare_ties", False, True, sparsify_random, "sum", paper="https://arxiv.org/abs/2311.03099",
                            description="random drop + rescale, TIES sign election"),
    _task_arithmetic_family("breadcrumbs", False, False, sparsify_breadcrumbs, extra=(GAMMA,),
                            paper="https://arxiv.org/abs/2312.06795", description="drop smallest and largest deltas, sum"),
    _task_arithmetic_family("breadcrumbs_ties", False, False, sparsify_breadcrumbs, "sum", extra=(GAMMA,),
                            paper="https://arxiv.org/abs/2312.06795",
                            description="breadcrumbs with TIES sign election"),
    MergeMethod("model_stock", (Param("filter_wise", False, kind="bool"),), needs_base=True, min_models=2,
                combine=_combine_model_stock, paper="https://arxiv.org/abs/2403.19522",
                description="interpolate the average toward the base by angle"),
]}


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}; labkit supports: {', '.join(METHODS)}")
    return METHODS[name]


# ------------------------------------------------------------------ rules shared by every path


def check_model_count(method: str, n_models: int, has_base: bool, where: str = "") -> None:
    """Refuse a wrong number of models (``n_models`` excludes the base) or a missing base."""
    m = get_method(method)
    if m.needs_base and not has_base:
        raise ValueError(f"{where}merge method {method!r} needs a base model (base_model)")
    if n_models < m.min_models or (m.max_models is not None and n_models > m.max_models):
        want = m.min_models if m.max_models == m.min_models else f"at least {m.min_models}"
        raise ValueError(f"{where}merge method {method!r} takes {want} model(s) besides the base, got {n_models}")


def check_param_names(method: str, names, where: str = "", lenient: bool = False) -> None:
    """Unknown parameter names are errors (typos silently ignored are worse). With ``lenient``
    (mergekit YAML, where configs often carry another method's parameters) a name that some
    other method declares only warns that it is ignored."""
    m = get_method(method)
    known_anywhere = {p.name for x in METHODS.values() for p in x.parameters}
    declared = {p.name for p in m.parameters}
    unknown = [n for n in names if n not in declared and not (lenient and n in known_anywhere)]
    if unknown:
        raise ValueError(f"{where}unknown parameter(s) {sorted(unknown)} for merge method {method!r}; "
                         f"it takes {sorted(m.params)} and per model {sorted(m.model_params)}")
    for n in names:
        if n not in declared:
            warnings.warn(f"{where}parameter {n!r} is not used by merge method {method!r}; ignored", stacklevel=3)


def resolve(method: str, lookup: Callable[[str, int | None], object], n_models: int, *,
            model_names: Sequence[str] | None = None, where: str = "",
            fill_weight: float | None = None) -> tuple[dict, list[dict]]:
    """Every parameter of ``method`` for one tensor: (global params, per-model params).

    ``lookup(name, None)`` gives the user's value of a global parameter and ``lookup(name, i)``
    that of model i, or ``MISSING``. Defaults are filled in, required values demanded (``weight``
    becomes ``fill_weight`` when given), and each value checked against its declared type and range.
    """
    m = get_method(method)
    labels = ([f"model {n!r}: " for n in model_names] if model_names is not None
              else [f"model {i}: " for i in range(n_models)])

    def value(p: Param, i, who):
        v = lookup(p.name, i)
        if v is MISSING:
            v = fill_weight if (p.default is REQUIRED and p is WEIGHT and fill_weight is not None) else p.default
        if v is REQUIRED:
            raise ValueError(f"{where}{who}merge method {method!r} needs parameter {p.name!r}")
        return p.check(v, f"{where}{who}")

    params = {p.name: value(p, None, "") for p in m.parameters if not p.per_model}
    per_model = [{p.name: value(p, i, labels[i]) for p in m.parameters if p.per_model} for i in range(n_models)]
    if m.check is not None:
        m.check(params, per_model, where)
    return params, per_model


def resolve_params(method: str, given: dict, n_models: int, *, fill_weight: float | None = None,
                   where: str = "") -> tuple[dict, list[dict]]:
    """``resolve`` for keyword arguments: a per-model parameter may be a scalar (all models) or a
    sequence of ``n_models`` values; ``lambda_`` is accepted for ``lambda`` (a Python keyword)."""
    m = get_method(method)
    given = {("lambda" if k == "lambda_" else k): v for k, v in given.items()}
    check_param_names(method, given, where)
    for p in m.parameters:
        v = given.get(p.name)
        if p.per_model and isinstance(v, (list, tuple)) and len(v) != n_models:
            raise ValueError(f"{where}parameter {p.name!r} has {len(v)} values for {n_models} models")
        if not p.per_model and isinstance(v, (list, tuple)):
            raise ValueError(f"{where}parameter {p.name!r} takes one value for all models, not {list(v)!r}")

    def lookup(name, i):
        if name not in given:
            return MISSING
        return given[name] if i is None else _at(given[name], i)

    return resolve(method, lookup, n_models, where=where, fill_weight=fill_weight)


def merge_tensor(method: str, base: torch.Tensor | None, tensors: Sequence[torch.Tensor], params: dict,
                 model_params: Sequence[dict], *, name: str = "", seed: int = 0, rescale_norm: str = "l1",
                 trim_thresholds: Sequence[float] | None = None, consume: bool = False) -> torch.Tensor:
    """Apply a named method to one tensor. ``params`` / ``model_params[i]`` come from ``resolve``
    (or ``resolve_params``). All tensors float32, one shape, one device; ``base`` is not among
    ``tensors``. ``consume=True`` lets the task-arithmetic family overwrite ``tensors`` (saves memory)."""
    m = get_method(method)
    if m.combine is not None:
        return m.combine(base, tensors, params, model_params)
    norm = rescale_norm if params["rescale"] else None

    def sparsify(i, delta):
        threshold = trim_thresholds[i] if trim_thresholds is not None else None
        return m.sparsify(delta, model_params[i], SparsifyContext(i, name, seed, norm, threshold))

    return generalized_task_arithmetic(
        base, tensors, [p["weight"] for p in model_params], sparsify if m.sparsify else None,
        m.consensus, params["normalize"], params["lambda"], consume)
