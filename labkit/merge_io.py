"""``labkit merge CONFIG.yml OUT_DIR``: mergekit-style YAML merges of Hugging Face model directories.

Reads safetensors lazily (one tensor at a time with plain file reads, sharded or not), computes
every tensor in float32 on the chosen device with ``labkit.merge.merge_tensor`` (the same code as
``labkit.merge.merge``), and streams each result straight into its place in the output shard, so
peak memory stays near (number of models + 2) x the largest tensor in float32. The output goes to
a temporary directory next to OUT_DIR that is renamed into place only when everything succeeded.

Supported config keys (mergekit's meaning): merge_method, base_model, models (each with
``model`` and ``parameters``), parameters, dtype, out_dtype, tokenizer_source (only the base
model's tokenizer, which is copied), and ``slices`` only in the form one slice whose sources all
span every layer (what mergekit's ``models`` form turns into). Parameter values may be scalars,
gradients (lists interpolated over the layers) and lists of ``{filter, value}`` conditions.
Anything else is refused with a message naming it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .device import get_device
from .merge import METHODS, REQUIRED, get_method, merge_tensor

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
               "float64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
TOP_LEVEL_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
                  "tokenizer_source", "slices"}
REFUSED_KEYS = {"tokenizer": "tokenizer merging", "chat_template": "chat template selection",
                "modules": "multi-module merges"}
DEFAULT_SHARD_BYTES = 5_000_000_000  # mergekit's default --out-shard-size (5B)


# ------------------------------------------------------------------------------------------ IO


class SafetensorsFile:
    """One .safetensors file: the header parsed once, tensors read on demand with seek + readinto
    (no mmap, so the resident memory is only what was read)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        self.data_start = 8 + n
        self.header = {k: v for k, v in header.items() if k != "__metadata__"}

    def read(self, name: str) -> torch.Tensor:
        info = self.header[name]
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {name!r} in {self.path} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        out = torch.empty(info["shape"], dtype=dtype)
        buf = out.reshape(-1).view(torch.uint8).numpy()
        if buf.nbytes != end - begin:
            raise ValueError(f"tensor {name!r} in {self.path}: header size mismatch")
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            if f.readinto(memoryview(buf)) != buf.nbytes:
                raise ValueError(f"tensor {name!r} in {self.path} is truncated")
        return out


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
        self.config = json.loads(config_file.read_text())
        self.specs: dict[str, tuple[tuple, torch.dtype]] = {}
        self._where: dict[str, object] = {}
        index, single = self.path / "model.safetensors.index.json", self.path / "model.safetensors"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {f: SafetensorsFile(self.path / f) for f in sorted(set(weight_map.values()))}
            for name, f in weight_map.items():
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
                sd = torch.load(b, map_location="cpu", mmap=True, weights_only=True)
                for name, t in sd.items():
                    self.specs[name] = (tuple(t.shape), t.dtype)
                    self._where[name] = t

    def _add(self, name, f: SafetensorsFile):
        info = f.header[name]
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} in {f.path} has unsupported dtype {info['dtype']}")
        self.specs[name] = (tuple(info["shape"]), SAFETENSORS_DTYPES[info["dtype"]])
        self._where[name] = f

    def read(self, name: str) -> torch.Tensor:
        where = self._where[name]
        return where.read(name) if isinstance(where, SafetensorsFile) else where.clone()


def _pad8(n: int) -> int:
    return (8 - n % 8) % 8


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


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# -------------------------------------------------------------------------------------- config


@dataclass
class MergePlan:
    method: str
    base: str | None              # model reference of the base (None for linear)
    models: list[str]             # references of the models other than the base, in config order
    model_settings: dict          # reference -> its parameters dict (raw settings)
    slice_settings: dict          # slice-level parameters (raw settings)
    global_settings: dict         # top-level parameters (raw settings)
    dtype: torch.dtype | None     # output dtype (out_dtype, else dtype, else each tensor's own)
    config: dict                  # the parsed YAML
    layer_ranges: dict            # reference -> layer_range of its slice source (slices form only)


def _parse_dtype(value, key):
    if value is None:
        return None
    if str(value) not in DTYPE_NAMES:
        raise ValueError(f"config key {key!r}: unknown dtype {value!r}; use one of float32, float16, bfloat16")
    return DTYPE_NAMES[str(value)]


def _check_setting_names(settings: dict | None, method: str, where: str):
    m = METHODS[method]
    known_anywhere = set().union(*[set(x.params) | set(x.model_params) for x in METHODS.values()])
    for name in settings or {}:
        if name not in m.params and name not in m.model_params:
            if name in known_anywhere:
                warnings.warn(f"{where}: parameter {name!r} is not used by merge_method {method!r}; ignored",
                              stacklevel=3)
            else:
                raise ValueError(f"{where}: unknown parameter {name!r} for merge_method {method!r} "
                                 f"(it takes {sorted(m.params)} and per model {sorted(m.model_params)})")


def load_plan(config_path) -> MergePlan:
    """Parse and validate a mergekit YAML file; refuse unsupported keys naming them."""
    import yaml

    config_path = Path(config_path)
    cfg = yaml.safe_load(config_path.read_text())
    if not isinstance(cfg, dict):
        raise ValueError(f"{config_path}: expected a YAML mapping at the top level")
    refused = [f"{k} ({REFUSED_KEYS[k]})" for k in cfg if k in REFUSED_KEYS]
    unknown = [k for k in cfg if k not in TOP_LEVEL_KEYS and k not in REFUSED_KEYS]
    if refused or unknown:
        raise ValueError(f"{config_path}: labkit merge does not support config key(s) "
                         f"{', '.join(refused + unknown)}")
    if "merge_method" not in cfg:
        raise ValueError(f"{config_path}: missing 'merge_method'")
    method = cfg["merge_method"]
    if method not in METHODS:
        raise ValueError(f"{config_path}: merge_method {method!r} is not supported; labkit supports "
                         f"{', '.join(METHODS)}")
    m = get_method(method)
    base = cfg.get("base_model")
    base = None if base is None else str(base)
    if ("models" in cfg) == ("slices" in cfg):
        raise ValueError(f"{config_path}: give exactly one of 'models' or 'slices'")
    slice_settings = {}
    if "slices" in cfg:
        entries, slice_settings = _full_range_slice(cfg["slices"], config_path)
    else:
        entries = cfg["models"]
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{config_path}: 'models' must be a non-empty list")
    refs, settings, layer_ranges = [], {}, {}
    where = "slices[0].sources" if "slices" in cfg else "models"
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "model" not in entry:
            raise ValueError(f"{config_path}: {where}[{i}] needs a 'model' key")
        extra = set(entry) - {"model", "parameters"} - ({"layer_range"} if "slices" in cfg else set())
        if extra:
            raise ValueError(f"{config_path}: {where}[{i}] has unsupported key(s) {sorted(extra)}")
        ref = str(entry["model"])
        if "slices" in cfg:
            layer_ranges[ref] = entry.get("layer_range")
        if ref in settings:
            raise ValueError(f"{config_path}: model {ref!r} is listed twice")
        refs.append(ref)
        settings[ref] = entry.get("parameters") or {}
        _check_setting_names(settings[ref], method, f"{config_path}: parameters of model {ref!r}")
    _check_setting_names(slice_settings, method, f"{config_path}: slice parameters")
    _check_setting_names(cfg.get("parameters"), method, f"{config_path}: parameters")
    if m.needs_base and base is None:
        raise ValueError(f"{config_path}: merge_method {method!r} needs a 'base_model'")
    if method == "linear" and base is not None and base not in refs:
        raise ValueError(f"{config_path}: 'linear' does not use base_model {base!r}; list it under 'models' "
                         "with a weight, or remove base_model")
    others = [r for r in refs if r != base or method == "linear"]
    if len(others) < m.min_models or (m.max_models is not None and len(others) > m.max_models):
        n = m.min_models if m.max_models == m.min_models else f"at least {m.min_models}"
        raise ValueError(f"{config_path}: merge_method {method!r} takes {n} model(s) besides the base, "
                         f"got {len(others)}")
    ts = cfg.get("tokenizer_source")
    if ts is not None and str(ts) != "base" and str(ts) != (base or refs[0]):
        raise ValueError(f"{config_path}: tokenizer_source {ts!r} is not supported (labkit copies the base "
                         "model's tokenizer; tokenizer merging such as 'union' is not implemented)")
    dtype = _parse_dtype(cfg.get("out_dtype"), "out_dtype") or _parse_dtype(cfg.get("dtype"), "dtype")
    return MergePlan(method, base if method != "linear" else None, others, settings, slice_settings,
                     cfg.get("parameters") or {}, dtype, cfg, layer_ranges)


def _full_range_slice(slices, config_path):
    """Accept the one-slice, full-layer-range form only; return (sources as model entries, slice params)."""
    if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict):
        raise ValueError(f"{config_path}: 'slices' (layer stacking / partial layer ranges) is not supported; "
                         "only one slice whose sources all span every layer, or use 'models'")
    s = slices[0]
    extra = set(s) - {"sources", "parameters"}
    if extra:
        raise ValueError(f"{config_path}: slice key(s) {sorted(extra)} are not supported")
    return s.get("sources") or [], s.get("parameters") or {}


def layer_position(name: str, num_layers: int) -> float:
    """mergekit's t for gradients: layer i of n -> i / (n - 1). Tensors outside the layers
    (embeddings, final norm, head) get t = 0, as in mergekit 0.1.5 (older releases used t = 1 for
    the tensors after the layers)."""
    match = re.search(r"\.layers\.(\d+)\.", name)
    if match:
        return int(match.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0
    return 0.0


def evaluate_setting(setting, tensor_name: str, t: float):
    """A parameter's value for one tensor: scalar; gradient (list of numbers, linearly interpolated
    at t); list of scalars (picked at t); or list of {filter, value} (first filter that is a
    substring of the tensor name, or None / '*'). None when no condition matches."""
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list) and setting:
        if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        if all(isinstance(e, dict) for e in setting):
            for cond in setting:
                if set(cond) - {"filter", "value"} or "value" not in cond:
                    raise ValueError(f"parameter condition {cond!r} must have 'value' and optionally 'filter'")
                f = cond.get("filter")
                if f is None or f == "*" or (tensor_name and str(f) in tensor_name):
                    return evaluate_setting(cond["value"], tensor_name, t)
            return None
    if isinstance(setting, dict) and set(setting) <= {"filter", "value"} and "value" in setting:
        return evaluate_setting([setting], tensor_name, t)
    raise ValueError(f"unsupported parameter value {setting!r}")


def _resolve(plan: MergePlan, tensor_name: str, t: float) -> tuple[dict, list[dict]]:
    """Global and per-model parameters for one tensor, with mergekit's precedence:
    model's own parameters > slice parameters > top-level parameters > the method's default."""
    m = get_method(plan.method)

    def lookup(name, levels, default, required, who):
        for level in levels:
            if level and name in level:
                v = evaluate_setting(level[name], tensor_name, t)
                if v is not None:
                    return v
        if required:
            raise ValueError(f"missing required parameter {name!r}{who} for tensor {tensor_name!r}")
        return default

    glob = {k: lookup(k, [plan.slice_settings, plan.global_settings], None if d is REQUIRED else d,
                      d is REQUIRED, "") for k, d in m.params.items()}
    per_model = []
    for ref in plan.models:
        levels = [plan.model_settings.get(ref), plan.slice_settings, plan.global_settings]
        per_model.append({k: lookup(k, levels, None if d is REQUIRED else d, d is REQUIRED, f" of model {ref!r}")
                          for k, d in m.model_params.items()})
    return glob, per_model


def _model_path(ref: str, config_dir: Path) -> Path:
    p = Path(ref).expanduser()
    if p.is_dir() or p.is_absolute():
        return p
    q = config_dir / p
    return q if q.is_dir() else p


# ---------------------------------------------------------------------------------------- runner


def _check_models(plan: MergePlan, dirs: dict[str, ModelDir]) -> None:
    refs = ([plan.base] if plan.base else []) + plan.models
    ref0 = refs[0]
    arch0 = dirs[ref0].config.get("architectures")
    for ref in refs[1:]:
        arch = dirs[ref].config.get("architectures")
        if arch != arch0:
            raise ValueError(f"architectures differ: {ref0!r} is {arch0} but {ref!r} is {arch}")
        for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
            a, b = dirs[ref0].config.get(key), dirs[ref].config.get(key)
            if a != b:
                raise ValueError(f"configs differ in {key!r}: {ref0!r} has {a} but {ref!r} has {b}")
    specs0 = dirs[ref0].specs
    for ref in refs[1:]:
        specs = dirs[ref].specs
        for name, (shape, _) in specs0.items():
            if name not in specs:
                raise ValueError(f"tensor {name!r} is in {ref0!r} but missing from {ref!r}")
            if specs[name][0] != shape:
                raise ValueError(f"tensor {name!r} has shape {shape} in {ref0!r} but {specs[name][0]} in {ref!r}")
        for name in specs:
            if name not in specs0:
                raise ValueError(f"tensor {name!r} is in {ref!r} but missing from {ref0!r}")


def run_merge_config(config_path, out_dir, *, device=None, force: bool = False, allow_pickle: bool = False,
                     seed: int = 0, max_shard_bytes: int = DEFAULT_SHARD_BYTES, verbose: bool = True,
                     _fail_after: int | None = None) -> Path:
    """Merge the models a mergekit YAML file describes into OUT_DIR (see the module docstring).

    ``seed`` makes DARE's random drops reproducible (per tensor, independent of device and order).
    Refuses a non-empty OUT_DIR unless ``force``; with ``force`` the old directory is replaced only
    after the merge succeeded. ``_fail_after`` (tests) raises after that many tensors were written.
    """
    config_path, out_dir = Path(config_path), Path(out_dir)
    plan = load_plan(config_path)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"OUT_DIR {str(out_dir)!r} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ValueError(f"OUT_DIR {str(out_dir)!r} is not empty; pass --force to replace it")
    refs = ([plan.base] if plan.base else []) + plan.models
    paths = {ref: _model_path(ref, config_path.parent) for ref in refs}
    for ref, p in paths.items():
        if p.exists() and out_dir.exists() and p.resolve() == out_dir.resolve():
            raise ValueError(f"OUT_DIR {str(out_dir)!r} is also the input model {ref!r}")
    dirs = {ref: ModelDir(paths[ref], allow_pickle=allow_pickle) for ref in refs}
    _check_models(plan, dirs)
    for ref, lr in plan.layer_ranges.items():
        n = dirs[ref].config.get("num_hidden_layers")
        if lr is None or list(lr) != [0, n]:
            raise ValueError(f"{config_path}: slice source {ref!r} has layer_range {lr}, but only full ranges "
                             f"[0, {n}] are supported (layer stacking / partial slices are not)")
    device = torch.device(device) if device is not None else get_device()
    ref0 = refs[0]
    num_layers = int(dirs[ref0].config.get("num_hidden_layers") or 1)
    out_specs = {name: (shape, plan.dtype if (plan.dtype and dtype.is_floating_point) else dtype)
                 for name, (shape, dtype) in dirs[ref0].specs.items()}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        writer = ShardWriter(tmp, out_specs, max_shard_bytes)
        for count, name in enumerate(out_specs):
            if _fail_after is not None and count >= _fail_after:
                raise RuntimeError(f"simulated failure after {count} tensors")
            raw = dirs[ref0].read(name)
            if not raw.is_floating_point():  # integer buffers: the base's (first model's) value
                writer.write(name, raw)
                continue
            glob, per_model = _resolve(plan, name, layer_position(name, num_layers))
            first = raw.to(device, torch.float32)
            del raw
            rest = [dirs[r].read(name).to(device, torch.float32) for r in refs[1:]]
            base, xs = (first, rest) if plan.base else (None, [first] + rest)
            del first, rest
            merged = merge_tensor(plan.method, base, xs, glob, per_model, name=name, seed=seed, consume=True)
            del xs, base
            writer.write(name, merged)
            del merged
        writer.finish()
        _write_config(dirs[ref0], tmp, plan.dtype)
        for fname in TOKENIZER_FILES + ("generation_config.json",):
            src = dirs[ref0].path / fname
            if src.is_file():
                shutil.copy2(src, tmp / fname)
        (tmp / "mergekit_config.yml").write_text(config_path.read_text())
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        print(f"merged {len(refs)} models with {plan.method!r} into {out_dir} "
              f"({len(writer.files)} shard{'s' if len(writer.files) > 1 else ''}, "
              f"{writer.total_size / 1e6:.1f} MB)")
    return out_dir


def _write_config(model: ModelDir, out: Path, dtype: torch.dtype | None) -> None:
    config = dict(model.config)
    if dtype is not None:
        name = str(dtype).replace("torch.", "")
        if "torch_dtype" in config:
            config["torch_dtype"] = name
        if "dtype" in config or "torch_dtype" not in config:
            config["dtype"] = name
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished temp dir to OUT_DIR; an existing OUT_DIR is moved aside first and deleted
    only after the rename succeeded (so a failure at any point leaves the old one in place)."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    old.rmdir()
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
