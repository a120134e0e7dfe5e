"""Values between the grader and a student's kernel, as data only: a JSON tree plus a safetensors file.

``labkit grade`` never unpickles or imports anything a submission produced. The grader writes each
call's inputs with ``encode``; the student's kernel decodes them, calls the student's function and
encodes what came back (or the exception it raised); the grader reads that back with ``decode``,
which accepts only the node types below, within size limits, and builds plain tensors, numbers,
strings, lists, tuples and dicts. Anything else the student returned arrives as an ``Opaque`` that
only knows its type name (so an object whose ``__eq__`` always says True is just a wrong answer).

Node types: none, bool, int, float, str, tensor (a key into the safetensors file), ndarray, list,
tuple, dict (a list of [key, value] pairs), callable (a ``DeclaredCallable`` by registry name, inputs
only), opaque (outputs only).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch

MAX_FILE_BYTES = 256 * 2**20  # one call's outputs, tensors included
MAX_JSON_BYTES = 8 * 2**20
MAX_NODES = 200_000
MAX_DEPTH = 32
MAX_STR = 4000
MAX_INT_DIGITS = 200
_FLOAT = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$|^[+-]?(inf|nan)$")
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)}


class WireError(ValueError):
    """What came back is not a value the grader accepts (type, size, structure)."""


class Opaque:
    """A returned object of a type the grader does not take (a custom class, a generator, a model...).

    It only knows its type name; it equals nothing, and has no length, shape or item.
    """

    __slots__ = ("type_name",)

    def __init__(self, type_name: str):
        self.type_name = type_name

    def __repr__(self) -> str:
        return f"<{self.type_name} object>"

    def __eq__(self, other):
        return False

    __hash__ = object.__hash__


# ----------------------------------------------------------------------------------------------
# Callables that a case passes to the student's function, described by name and built in the kernel


_CALLABLES: dict = {}


def declared(name: str):
    """Register a constructor ``make(**kwargs) -> callable`` under ``name`` (kit code only)."""
    def deco(make):
        _CALLABLES[name] = make
        return make
    return deco


class DeclaredCallable:
    """A callable given to the student's function by description: ``DeclaredCallable("closeness", target=1.0)``.

    In ``check`` (one process) it simply calls the registered function; for ``labkit grade`` it travels
    as its name and keyword arguments and the student's kernel builds it from the kit's registry. A
    student who changes the kit's function in their own kernel changes only their own outputs, which
    the grader judges.
    """

    def __init__(self, name: str, **kwargs):
        if name not in _CALLABLES:
            raise KeyError(f"no declared callable {name!r} (known: {', '.join(sorted(_CALLABLES))})")
        self.name, self.kwargs = name, kwargs
        self._fn = _CALLABLES[name](**kwargs)

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.kwargs.items())})"


@declared("closeness")
def _closeness(target: float):
    """A soup score: minus the distance of a one-entry state dict's ``w`` from ``target``."""
    return lambda sd: -abs(float(sd["w"].reshape(-1)[0]) - target)


@declared("constant")
def _constant(value: float):
    """A score that ignores its input."""
    return lambda *args, **kwargs: value


# ----------------------------------------------------------------------------------------------
# Encoding (both sides)


def _typename(x) -> str:
    t = type(x)
    name = getattr(t, "__qualname__", "object")
    mod = getattr(t, "__module__", "") or ""
    name = name if mod == "builtins" else f"{mod.split('.')[0]}.{name}"
    return str(name)[:100]


def encode(value, tensors: dict, inputs: bool = False):
    """The JSON tree of ``value``; its tensors go into ``tensors`` (key -> contiguous CPU tensor)."""
    counter = [0]

    def put(t: torch.Tensor) -> str:
        key = f"t{len(tensors)}"
        t = torch.Tensor.as_subclass(t.detach(), torch.Tensor).to("cpu").contiguous().clone()
        tensors[key] = t
        return key

    def enc(x, depth):
        counter[0] += 1
        if counter[0] > MAX_NODES or depth > MAX_DEPTH:
            raise WireError("value too large or too deeply nested")
        t = type(x)
        if x is None:
            return {"t": "none"}
        if isinstance(x, np.generic) and not isinstance(x, (str, bytes)):
            x, t = np.asarray(x), np.ndarray  # a NumPy scalar stays NumPy: a 0-d array
        if t is bool:
            return {"t": "bool", "v": bool(x)}
        if t is int:
            return {"t": "int", "v": str(int(x))}
        if t is float:
            return {"t": "float", "v": repr(float(x))}
        if t is str:
            return {"t": "str", "v": x[:MAX_STR]}
        if isinstance(x, torch.Tensor):
            if x.dtype not in _DTYPES.values():
                return {"t": "opaque", "type": f"torch.Tensor of dtype {x.dtype}"}
            return {"t": "tensor", "k": put(x), "rg": bool(x.requires_grad), "dev": x.device.type}
        if isinstance(x, np.ndarray) and t is np.ndarray:
            tt = torch.from_numpy(np.ascontiguousarray(x)) if x.dtype.kind in "biufc" else None
            if tt is None or tt.dtype not in _DTYPES.values():
                return {"t": "opaque", "type": f"numpy.ndarray of dtype {x.dtype}"}
            return {"t": "ndarray", "k": put(tt)}
        if t is torch.Size:
            return {"t": "tuple", "v": [enc(int(v), depth + 1) for v in x]}
        if t in (list, tuple):
            return {"t": t.__name__, "v": [enc(v, depth + 1) for v in x]}
        if t is dict:
            return {"t": "dict", "v": [[enc(k, depth + 1), enc(v, depth + 1)] for k, v in x.items()]}
        if inputs and t is DeclaredCallable:
            return {"t": "callable", "name": x.name, "kwargs": enc(dict(x.kwargs), depth + 1)}
        if inputs:
            raise WireError(f"cannot send a {_typename(x)} to the student's function (use DeclaredCallable "
                            f"for functions)")
        return {"t": "opaque", "type": _typename(x)}

    return enc(value, 0)


def save(path: str | Path, tree, tensors: dict) -> None:
    """Write ``path`` (.json) and its tensors (``path`` with .safetensors) atomically, no pickle."""
    from safetensors.torch import save_file

    path = Path(path)
    st = path.with_suffix(".safetensors")
    tmp = path.with_name(path.name + ".tmp")
    tmp_st = st.with_name(st.name + ".tmp")
    save_file(tensors, str(tmp_st))
    tmp.write_text(json.dumps(tree), encoding="utf-8")
    os.replace(tmp_st, st)
    os.replace(tmp, path)  # the .json last: its presence means the pair is complete


# ----------------------------------------------------------------------------------------------
# Decoding (strict)


def _read_limited(path: Path, limit: int) -> bytes:
    """Read a regular file without following a symlink, refusing more than ``limit`` bytes."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        import stat

        if not stat.S_ISREG(st.st_mode):
            raise WireError(f"{path.name} is not a regular file")
        if st.st_size > limit:
            raise WireError(f"{path.name} is {st.st_size} bytes, over the {limit}-byte limit")
        chunks, total = [], 0
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            total += len(b)
            if total > limit:
                raise WireError(f"{path.name} grew over the {limit}-byte limit")
            chunks.append(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


def load(path: str | Path, inputs: bool = False):
    """Read what ``save`` wrote and decode it strictly; raises WireError for anything unexpected."""
    from safetensors.torch import load as st_load

    path = Path(path)
    try:
        tree = json.loads(_read_limited(path, MAX_JSON_BYTES).decode("utf-8"))
        raw = _read_limited(path.with_suffix(".safetensors"), MAX_FILE_BYTES)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"unreadable result ({type(e).__name__}: {str(e)[:120]})") from None
    try:
        tensors = st_load(raw)
    except Exception as e:  # noqa: BLE001 - a malformed file is a wrong result, nothing more
        raise WireError(f"malformed tensor file ({type(e).__name__})") from None
    return tree, tensors


def decode(tree, tensors: dict, inputs: bool = False):
    """Build the value of a JSON tree (``inputs``: callables allowed, opaque refused)."""
    counter = [0]
    used: set = set()

    def tensor(node):
        key = node.get("k")
        if not isinstance(key, str) or key not in tensors:
            raise WireError("a tensor node names no stored tensor")
        if key in used:  # one stored tensor, one node: no aliasing tricks
            raise WireError("a stored tensor is used twice")
        used.add(key)
        t = tensors[key]
        if t.dtype not in _DTYPES.values():
            raise WireError(f"tensor dtype {t.dtype} is not accepted")
        return t

    def dec(node, depth):
        counter[0] += 1
        if counter[0] > MAX_NODES or depth > MAX_DEPTH:
            raise WireError("value too large or too deeply nested")
        if not isinstance(node, dict) or not isinstance(node.get("t"), str):
            raise WireError("malformed value node")
        kind = node["t"]
        v = node.get("v")
        if kind == "none":
            return None
        if kind == "bool":
            if not isinstance(v, bool):
                raise WireError("malformed bool")
            return v
        if kind == "int":
            if not (isinstance(v, str) and re.fullmatch(r"[+-]?\d{1,%d}" % MAX_INT_DIGITS, v)):
                raise WireError("malformed int")
            return int(v)
        if kind == "float":
            if not (isinstance(v, str) and _FLOAT.match(v.strip().lower())):
                raise WireError("malformed float")
            return float(v)
        if kind == "str":
            if not isinstance(v, str) or len(v) > MAX_STR:
                raise WireError("malformed or too long string")
            return v
        if kind == "tensor":
            t = tensor(node)
            if inputs and node.get("rg") is True and (t.is_floating_point() or t.is_complex()):
                t.requires_grad_(True)
            return t
        if kind == "ndarray":
            return tensor(node).numpy()
        if kind in ("list", "tuple"):
            if not isinstance(v, list):
                raise WireError(f"malformed {kind}")
            items = [dec(x, depth + 1) for x in v]
            return items if kind == "list" else tuple(items)
        if kind == "dict":
            if not isinstance(v, list) or not all(isinstance(p, list) and len(p) == 2 for p in v):
                raise WireError("malformed dict")
            out = {}
            for k, val in v:
                key = dec(k, depth + 1)
                if not isinstance(key, (str, int, float, bool, type(None), tuple)):
                    raise WireError("a dict key must be a string or a number")
                out[key] = dec(val, depth + 1)
            return out
        if kind == "callable" and inputs:
            name = node.get("name")
            if not isinstance(name, str) or name not in _CALLABLES:
                raise WireError(f"unknown declared callable {name!r}")
            kwargs = dec(node.get("kwargs"), depth + 1)
            if not isinstance(kwargs, dict):
                raise WireError("malformed callable arguments")
            return DeclaredCallable(name, **kwargs)
        if kind == "opaque" and not inputs:
            name = node.get("type")
            return Opaque(name[:100] if isinstance(name, str) else "object")
        raise WireError(f"value type {kind!r} is not accepted here")

    if not isinstance(tree, dict):
        raise WireError("malformed value")
    value = dec(tree, 0)
    return value

