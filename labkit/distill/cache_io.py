"""Saving and loading teacher caches beside a dataset (safetensors + the few fields they need).

Tooling for ``teachers.TopKCache`` / ``teachers.SampledCache``: a cache is written once, after one pass
of the teacher over the dataset, and read by every later training run. Writes go to a temporary file
that is renamed into place, so an interrupted save never leaves half a cache; an existing file is
only replaced with ``overwrite=True``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .teachers import SampledCache, TopKCache


def save_cache(cache, path, overwrite: bool = False) -> Path:
    """Write ``cache`` to ``path`` (a .safetensors file); returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    tensors = {"indices": cache.indices.contiguous().cpu()}
    meta = {"vocab_size": cache.vocab_size, "temperature": cache.temperature}
    if isinstance(cache, TopKCache):
        tensors["logprobs"] = cache.logprobs.contiguous().cpu()
        meta.update(kind="topk", missing=cache.missing)
    elif isinstance(cache, SampledCache):
        meta.update(kind="sampled")
    else:
        raise TypeError(f"cache must be a TopKCache or SampledCache, got {type(cache).__name__}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"labkit_distill_cache": json.dumps(meta)})
    os.replace(tmp, path)
    return path


def load_cache(path, device=None):
    """Read a cache written by ``save_cache``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no cache at {path}")
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("labkit_distill_cache")
    if raw is None:
        raise ValueError(f"{path} is not a labkit distillation cache (no 'labkit_distill_cache' metadata)")
    meta = json.loads(raw)
    tensors = load_file(str(path), device=str(device) if device is not None else "cpu")
    if meta["kind"] == "topk":
        return TopKCache(tensors["indices"], tensors["logprobs"], meta["vocab_size"], meta["missing"],
                         meta["temperature"])
    return SampledCache(tensors["indices"], meta["vocab_size"], meta["temperature"])
