"""Reading and writing Hugging Face model folders for ``labkit merge``, one tensor at a time.

Reading goes through ``safetensors.safe_open`` (memory-mapped and lazy, every dtype safetensors
knows). The file is opened for each tensor and closed right after, so the mapped pages of tensors
already merged are released and the resident memory stays near one tensor per model. Writing is
``ShardWriter``: the layout is known before any tensor is computed, so each result goes straight to
its final offset in its shard and nothing accumulates in memory.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import safe_open

_CODES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
          "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
          "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
          "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool"}
# only the dtypes this torch has (uint16/32/64 and float8 came in torch 2.1-2.3)
SAFETENSORS_DTYPES = {code: getattr(torch, name) for code, name in _CODES.items() if hasattr(torch, name)}
DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class SafetensorsFile:
    """One .safetensors file: names, shapes and dtypes from its header; tensors read on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.header: dict[str, tuple[tuple, torch.dtype]] = {}
        try:
            with safe_open(self.path, framework="pt") as f:
                for name in f.keys():
                    view = f.get_slice(name)
                    code = view.get_dtype()
                    if code not in SAFETENSORS_DTYPES:
                        raise ValueError(f"tensor {name!r} in {self.path} has dtype {code}, which this torch "
                                         f"({torch.__version__}) cannot hold")
                    self.header[name] = (tuple(view.get_shape()), SAFETENSORS_DTYPES[code])
        except ValueError:
            raise
        except Exception as e:  # safetensors raises its own error types for malformed files
            raise ValueError(f"{self.path} is not a readable safetensors file: {e}") from None

    def read(self, name: str, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor, copied once into ``device`` / ``dtype`` (default: CPU, its own dtype)."""
        try:
            with safe_open(self.path, framework="pt") as f:
                # a copy: the mapped file is released as soon as this tensor is no longer used
                return f.get_tensor(name).to(device or "cpu", dtype, copy=True)
        except Exception as e:
            raise ValueError(f"tensor {name!r} in {self.path} cannot be read: {e}") from None


class ModelDir:
    """A Hugging Face model directory read lazily: ``specs`` maps tensor name -> (shape, dtype)."""

    def __init__(self, path: Path, allow_pickle: bool = False):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ValueError(f"model {str(path)!r} is not a local directory (labkit merge reads local "
                             "checkpoints only; download the model first)")
        config_file = self.path / "config.json"
        if not config_file.exists():
            raise ValueError(f"model {str(path)!r} has no config.json")
        try:
            self.config = json.loads(config_file.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{config_file} is not valid JSON: {e}") from None
        if not isinstance(self.config, dict):
            raise ValueError(f"{config_file} is not a JSON object")
        self.specs: dict[str, tuple[tuple, torch.dtype]] = {}
        self._where: dict[str, object] = {}
        index, single = self.path / "model.safetensors.index.json", self.path / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise ValueError(f"{index} is not a valid safetensors index: {e!r}") from None
            files = {f: SafetensorsFile(self.path / f) for f in sorted(set(weight_map.values()))}
            for name, f in weight_map.items():
                if name not in files[f].header:
                    raise ValueError(f"{index} places tensor {name!r} in {f}, which does not hold it")
                self._add(name, files[f])
        elif single.exists():
            f = SafetensorsFile(single)
            for name in f.header:
                self._add(name, f)
        else:
            bins = sorted(self.path.glob("pytorch_model*.bin"))
            if not bins:
                raise ValueError(f"model {str(path)!r} has no model.safetensors(.index.json) nor pytorch_model*.bin")
            if not allow_pickle:
                raise ValueError(f"model {str(path)!r} has only pickle checkpoints ({bins[0].name}); unpickling "
                                 "can run arbitrary code, so labkit refuses it unless you pass --allow-pickle "
                                 "(or convert the checkpoint to safetensors)")
            for b in bins:
                try:
                    sd = torch.load(b, map_location="cpu", mmap=True, weights_only=True)
                except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
                    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    raise ValueError(f"{b} cannot be loaded as plain tensors (weights_only): {first}") from None
                if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
                    raise ValueError(f"{b} does not hold a flat state dict of tensors")
                for name, t in sd.items():
                    self.specs[name] = (tuple(t.shape), t.dtype)
                    self._where[name] = t

    def _add(self, name, f: SafetensorsFile):
        self.specs[name] = f.header[name]
        self._where[name] = f

    def read(self, name: str, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        where = self._where[name]
        if isinstance(where, SafetensorsFile):
            return where.read(name, device, dtype)
        return where.to(device or "cpu", dtype, copy=True)


def _pad8(n: int) -> int:
    return (8 - n % 8) % 8


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


class ShardWriter:
    """Writes safetensors shards whose layout (names, shapes, dtypes) is known in advance, so each
    tensor is written to its final offset as soon as it is computed: nothing accumulates in memory."""

    def __init__(self, out_dir: Path, specs: dict[str, tuple[tuple, torch.dtype]], max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        shards, current, size = [], [], 0
        for name, (shape, dtype) in specs.items():
            nbytes = _numel(shape) * torch.empty(0, dtype=dtype).element_size()
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = [], 0
            current.append((name, shape, dtype, nbytes))
            size += nbytes
        shards.append(current)
        n = len(shards)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.location: dict[str, tuple[str, int, int, torch.dtype, tuple]] = {}
        self.total_size = 0
        self.written: set[str] = set()
        for fname, shard in zip(self.files, shards):
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name, shape, dtype, nbytes in shard:
                header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * _pad8(len(raw))
            with open(self.out_dir / fname, "wb") as f:
                f.write(len(raw).to_bytes(8, "little"))
                f.write(raw)
                f.truncate(8 + len(raw) + offset)
            for name, shape, dtype, nbytes in shard:
                begin = header[name]["data_offsets"][0]
                self.location[name] = (fname, 8 + len(raw) + begin, nbytes, dtype, tuple(shape))
            self.total_size += offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        fname, pos, nbytes, dtype, shape = self.location[name]
        t = tensor.detach().to("cpu", dtype).contiguous()
        if tuple(t.shape) != shape:
            raise ValueError(f"tensor {name!r}: computed shape {tuple(t.shape)}, expected {shape}")
        buf = t.reshape(-1).view(torch.uint8).numpy()
        with open(self.out_dir / fname, "r+b") as f:
            f.seek(pos)
            f.write(memoryview(buf))
        self.written.add(name)

    def finish(self) -> None:
        missing = set(self.location) - self.written
        if missing:
            raise RuntimeError(f"internal error: tensors never written: {sorted(missing)[:3]}")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {name: loc[0] for name, loc in self.location.items()}}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
