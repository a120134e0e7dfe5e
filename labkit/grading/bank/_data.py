"""The stored inputs and expected outputs of the visible cases that use random inputs.

Expected values of visible cases are data, never code that computes them: a reference implementation
in the package would answer the exercise. ``visible_data.json`` is written by the instructor's
``instructor/make_visible_data.py`` from the float64 references of the instructor bank (which a test
re-runs to check that the stored values still agree).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

PATH = Path(__file__).with_name("visible_data.json")


def to_json(value):
    """A tensor or number as JSON: tensors as {"dtype", "shape", "data"} with exact float reprs."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        data = t.reshape(-1).tolist()
        if t.is_floating_point():
            data = [repr(float(x)) for x in data]
        return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "data": data}
    if isinstance(value, dict):
        return {"dict": {k: to_json(v) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return {"list": [to_json(v) for v in value]}
    return {"value": value}


def from_json(node):
    if "dtype" in node:
        dtype = getattr(torch, node["dtype"])
        data = [float(x) for x in node["data"]] if dtype.is_floating_point else node["data"]
        return torch.tensor(data, dtype=dtype).reshape(node["shape"])
    if "dict" in node:
        return {k: from_json(v) for k, v in node["dict"].items()}
    if "list" in node:
        return [from_json(v) for v in node["list"]]
    return node["value"]


@lru_cache(maxsize=1)
def _all() -> dict:
    return json.loads(PATH.read_text(encoding="utf-8"))


def visible(key: str) -> dict:
    """{name: value} stored for one visible case (fresh tensors on every call)."""
    try:
        entry = _all()[key]
    except KeyError:
        raise KeyError(f"{PATH.name} has no entry {key!r}: rerun instructor/make_visible_data.py") from None
    return {k: from_json(v) for k, v in entry.items()}
