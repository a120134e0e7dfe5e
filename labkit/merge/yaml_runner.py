"""``labkit merge CONFIG.yml OUT_DIR``: mergekit-style YAML merges of Hugging Face model directories.

Reads safetensors lazily (``safetensors_io``), computes every tensor in float32 on the chosen
device with ``registry.merge_tensor`` (the same code as ``labkit.merge.merge``), and streams each
result straight into its place in the output shard, so peak memory stays near (number of models
+ 2) x the largest tensor in float32.

Supported config keys (mergekit's meaning): merge_method, base_model, models (each with
``model`` and ``parameters``), parameters, dtype, out_dtype, tokenizer_source (only the base
model's tokenizer, which is copied), and ``slices`` only in the form one slice whose sources all
span every layer (what mergekit's ``models`` form turns into). Parameter values may be scalars,
gradients (lists interpolated over the layers) and lists of ``{filter, value}`` conditions.
Anything else is refused with a message naming it.

What it guarantees: everything that can be checked without reading a tensor is checked first
(the config, every parameter value for every tensor against its declared type and range, the
model count, architectures, tensor names/shapes, tokenizers with the same token -> id map, and
OUT_DIR, see ``output_dir``); NaN/inf in an input tensor (or produced in the output) is refused
naming the tensor; the output is written into a temporary folder that becomes OUT_DIR only when
complete (``output_dir.written_atomically``), so signals and write errors leave OUT_DIR as it was.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..device import get_device
from .output_dir import (MARKER, TOKENIZER_FILES, MergeInterrupted, check_out_dir, remove_leftovers,  # noqa: F401
                         resolve_out_dir, written_atomically)
from .registry import MISSING, METHODS, check_model_count, check_param_names, get_method, merge_tensor, resolve
from .safetensors_io import ModelDir, ShardWriter
from .state_dict import check_compatible, check_finite

DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
               "float64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOP_LEVEL_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
                  "tokenizer_source", "slices"}
REFUSED_KEYS = {"tokenizer": "tokenizer merging", "chat_template": "chat template selection",
                "modules": "multi-module merges"}
DEFAULT_SHARD_BYTES = 5_000_000_000  # mergekit's default --out-shard-size (5B)


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


def _leaves(setting):
    """Every value a setting can take (scalars, gradient points, condition values)."""
    if isinstance(setting, list):
        return [v for e in setting for v in _leaves(e)]
    if isinstance(setting, dict):
        return _leaves(setting.get("value"))
    return [setting]


def _check_settings(settings, method: str, where: str) -> dict:
    """Names known, values of the right type and range (every value a gradient or filter can pick)."""
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise ValueError(f"{where}: 'parameters' must be a mapping of names to values, not {settings!r}")
    check_param_names(method, list(settings), f"{where}: ", lenient=True)
    declared = {p.name: p for p in get_method(method).parameters}
    for name, setting in settings.items():
        if name in declared:
            for leaf in _leaves(setting):
                if leaf is None:
                    raise ValueError(f"{where}: parameter {name!r} has no value (null)")
                declared[name].check(leaf, f"{where}: ")
    return settings


def _read_yaml(config_path: Path) -> dict:
    import yaml

    if config_path.is_dir():
        raise ValueError(f"CONFIG {str(config_path)!r} is a directory; give the YAML file")
    try:
        text = config_path.read_text()
    except FileNotFoundError:
        raise ValueError(f"CONFIG {str(config_path)!r} does not exist") from None
    except UnicodeDecodeError:
        raise ValueError(f"CONFIG {str(config_path)!r} is not a text (UTF-8) file") from None
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{config_path}: YAML syntax error{where}: {problem}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{config_path}: expected a YAML mapping at the top level")
    return cfg


def load_plan(config_path) -> MergePlan:
    """Parse and validate a mergekit YAML file; refuse unsupported keys and bad values naming them."""
    config_path = Path(config_path)
    cfg = _read_yaml(config_path)
    refused = [f"{k} ({REFUSED_KEYS[k]})" for k in cfg if k in REFUSED_KEYS]
    unknown = [str(k) for k in cfg if k not in TOP_LEVEL_KEYS and k not in REFUSED_KEYS]
    if refused or unknown:
        raise ValueError(f"{config_path}: labkit merge does not support config key(s) "
                         f"{', '.join(refused + unknown)}")
    if "merge_method" not in cfg:
        raise ValueError(f"{config_path}: missing 'merge_method'")
    method = cfg["merge_method"]
    if not isinstance(method, str) or method not in METHODS:
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
            raise ValueError(f"{config_path}: {where}[{i}] has unsupported key(s) {sorted(map(str, extra))}")
        if not isinstance(entry["model"], (str, int, float)):
            raise ValueError(f"{config_path}: {where}[{i}]: 'model' must be a local path, not {entry['model']!r}")
        ref = str(entry["model"])
        if "slices" in cfg:
            layer_ranges[ref] = entry.get("layer_range")
        if ref in settings:
            raise ValueError(f"{config_path}: model {ref!r} is listed twice")
        refs.append(ref)
        settings[ref] = _check_settings(entry.get("parameters"), method, f"{config_path}: parameters of model {ref!r}")
    _check_settings(slice_settings, method, f"{config_path}: slice parameters")
    global_settings = _check_settings(cfg.get("parameters"), method, f"{config_path}: parameters")
    if method == "linear" and base is not None and base not in refs:
        raise ValueError(f"{config_path}: 'linear' does not use base_model {base!r}; list it under 'models' "
                         "with a weight, or remove base_model")
    others = [r for r in refs if r != base or method == "linear"]
    check_model_count(method, len(others), base is not None or not m.needs_base, f"{config_path}: ")
    ts = cfg.get("tokenizer_source")
    if ts is not None and str(ts) != "base" and str(ts) != (base or refs[0]):
        raise ValueError(f"{config_path}: tokenizer_source {ts!r} is not supported (labkit copies the base "
                         "model's tokenizer; tokenizer merging such as 'union' is not implemented)")
    dtype = _parse_dtype(cfg.get("out_dtype"), "out_dtype") or _parse_dtype(cfg.get("dtype"), "dtype")
    return MergePlan(method, base if method != "linear" else None, others, settings, slice_settings,
                     global_settings, dtype, cfg, layer_ranges)


def _full_range_slice(slices, config_path):
    """Accept the one-slice, full-layer-range form only; return (sources as model entries, slice params)."""
    if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict):
        raise ValueError(f"{config_path}: 'slices' (layer stacking / partial layer ranges) is not supported; "
                         "only one slice whose sources all span every layer, or use 'models'")
    s = slices[0]
    extra = set(s) - {"sources", "parameters"}
    if extra:
        raise ValueError(f"{config_path}: slice key(s) {sorted(map(str, extra))} are not supported")
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
    def lookup(name, i):
        levels = [plan.slice_settings, plan.global_settings]
        if i is not None:
            levels.insert(0, plan.model_settings.get(plan.models[i]))
        for level in levels:
            if level and name in level:
                try:
                    v = evaluate_setting(level[name], tensor_name, t)
                except ValueError as e:
                    who = f"model {plan.models[i]!r}: " if i is not None else ""
                    raise ValueError(f"{who}parameter {name!r}: {e}") from None
                if v is not None:
                    return v
        return MISSING

    return resolve(plan.method, lookup, len(plan.models), model_names=plan.models,
                   where=f"tensor {tensor_name!r}: ")


def _model_path(ref: str, config_dir: Path) -> Path:
    p = Path(ref).expanduser()
    if p.is_dir() or p.is_absolute():
        return p
    q = config_dir / p
    return q if q.is_dir() else p


# ------------------------------------------------------------------------------- checks on inputs


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
    check_compatible([dirs[r].specs for r in refs], [repr(r) for r in refs])


def read_vocab(model_dir: Path) -> dict | None:
    """The token -> id map of a model folder's tokenizer (tokenizer.json or vocab.json), None without one."""
    tok, vocab = model_dir / "tokenizer.json", model_dir / "vocab.json"
    try:
        if tok.is_file():
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(tok)).get_vocab(with_added_tokens=True)
        if vocab.is_file():
            return dict(json.loads(vocab.read_text()))
    except Exception as e:  # tokenizers raises its own exception type for malformed files
        raise ValueError(f"the tokenizer in {model_dir} cannot be read ({str(e).splitlines()[0] if str(e) else e!r}); "
                         "pass --allow-tokenizer-mismatch to merge without comparing tokenizers") from None
    return None


def _check_tokenizers(refs, dirs: dict[str, ModelDir]) -> None:
    vocabs = [read_vocab(dirs[r].path) for r in refs]
    if sum(v is not None for v in vocabs) < 2:
        return
    from ..models import check_same_vocab

    try:
        check_same_vocab(vocabs, [f"model {r!r}" for r in refs])
    except ValueError as e:
        raise ValueError(f"{e} (merging mixes embedding rows by id; pass --allow-tokenizer-mismatch "
                         "if you know better)") from None


def parse_device(device) -> torch.device:
    """A torch.device that exists here, or a ValueError naming the problem."""
    if device is None:
        return get_device()
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1, mps)") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: this torch ({torch.__version__}) has no usable CUDA device")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    if d.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device {device!r}: MPS is not available here")
    if d.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device!r}: labkit merge runs on cpu, cuda or mps")
    return d


# ---------------------------------------------------------------------------------------- runner


def _after_tensor(count: int, name: str) -> None:
    """Called after each tensor is written; tests patch it to inject faults at chosen points."""


def run_merge_config(config_path, out_dir, *, device=None, force: bool = False, allow_pickle: bool = False,
                     allow_nonfinite: bool = False, allow_tokenizer_mismatch: bool = False, seed: int = 0,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES, verbose: bool = True) -> Path:
    """Merge the models a mergekit YAML file describes into OUT_DIR (see the module docstring).

    ``seed`` makes DARE's random drops reproducible (per tensor, independent of device and order).
    Refuses a non-empty OUT_DIR unless ``force`` and it is a previous merge output; the old one is
    replaced only after the merge succeeded. Returns OUT_DIR as an absolute path.
    """
    config_path = Path(config_path)
    plan = load_plan(config_path)
    shown = str(out_dir)
    out_dir = resolve_out_dir(out_dir)
    refs = ([plan.base] if plan.base else []) + plan.models
    paths = {ref: _model_path(ref, config_path.parent) for ref in refs}
    remove_leftovers(out_dir)  # first: a killed run may have moved the old OUT_DIR aside
    check_out_dir(out_dir, paths, force, shown)
    device = parse_device(device)
    dirs = {ref: ModelDir(paths[ref], allow_pickle=allow_pickle) for ref in refs}
    _check_models(plan, dirs)
    for ref, lr in plan.layer_ranges.items():
        n = dirs[ref].config.get("num_hidden_layers")
        if lr is None or list(lr) != [0, n]:
            raise ValueError(f"{config_path}: slice source {ref!r} has layer_range {lr}, but only full ranges "
                             f"[0, {n}] are supported (layer stacking / partial slices are not)")
    if not allow_tokenizer_mismatch:
        _check_tokenizers(refs, dirs)
    ref0 = refs[0]
    num_layers = int(dirs[ref0].config.get("num_hidden_layers") or 1)
    out_specs = {name: (shape, plan.dtype if (plan.dtype and dtype.is_floating_point) else dtype)
                 for name, (shape, dtype) in dirs[ref0].specs.items()}
    # every parameter of every tensor, checked before the first tensor is read
    params = {name: _resolve(plan, name, layer_position(name, num_layers))
              for name, (_, dtype) in dirs[ref0].specs.items() if dtype.is_floating_point}

    with written_atomically(out_dir) as tmp:
        writer = ShardWriter(tmp, out_specs, max_shard_bytes)
        for count, name in enumerate(out_specs):
            _merge_one(plan, dirs, refs, name, params.get(name), writer, device, seed, allow_nonfinite)
            _after_tensor(count, name)
        writer.finish()
        copied = [f for f in TOKENIZER_FILES + ("generation_config.json",) if (dirs[ref0].path / f).is_file()]
        for fname in copied:
            shutil.copyfile(dirs[ref0].path / fname, tmp / fname)  # copyfile: the user's permissions
        (tmp / MARKER).write_text(config_path.read_text())
        _write_config(dirs[ref0], tmp, plan.dtype)  # last: until here the folder is not a model
    if verbose:
        print(f"merged {len(refs)} models with {plan.method!r} into {shown} "
              f"({len(writer.files)} shard{'s' if len(writer.files) > 1 else ''}, "
              f"{writer.total_size / 1e6:.1f} MB)")
    return out_dir


def _merge_one(plan, dirs, refs, name, params, writer, device, seed, allow_nonfinite) -> None:
    if not dirs[refs[0]].specs[name][1].is_floating_point:  # integer buffers: the base's (first model's)
        writer.write(name, dirs[refs[0]].read(name))
        return
    xs = []
    for r in refs:  # read straight into float32 on the device: one copy per model
        xs.append(dirs[r].read(name, device, torch.float32))
        check_finite(xs[-1], name, f"model {r!r}", allow_nonfinite)
    base = xs.pop(0) if plan.base else None
    glob, per_model = params
    merged = merge_tensor(plan.method, base, xs, glob, per_model, name=name, seed=seed, consume=True)
    del xs, base
    out = merged.to(writer.location[name][3])
    del merged
    check_finite(out, name, "the merged model", allow_nonfinite)
    writer.write(name, out)


def _write_config(model: ModelDir, out: Path, dtype: torch.dtype | None) -> None:
    config = dict(model.config)
    if dtype is not None:
        name = str(dtype).replace("torch.", "")
        if "torch_dtype" in config:
            config["torch_dtype"] = name
        if "dtype" in config or "torch_dtype" not in config:
            config["dtype"] = name
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


