"""What a capstone submission may be: a declarative spec over safetensors files. No code runs.

A submission is a folder::

    my-submission/
      spec.yml                     what to build from the files (below)
      my_student/classifier.json   a classifier you trained: its config ...
      my_student/model.safetensors ... and its weights (labkit.models.save_classifier writes both)
      my_router/router.json        an MoE router: {"kind": "router", "in_features": 64, "num_experts": E}
      my_router/model.safetensors  ... weight [E, 64], bias [E]

``write_submission`` packs one from your models; ``load_submission`` is what the grader runs: it
parses ``spec.yml`` with ``yaml.safe_load``, reads tensors only from safetensors files, checks every
file's SHA-256 and every config and shape, and builds the model from the kit's own classes. A
pickle (``.pt``, ``.pth``, ``.bin``, ``.pkl``, ...) is refused, because unpickling runs code.

``spec.yml`` (a *ref* is ``zoo:NAME``, a digit classifier of the zoo, ideally from ``POOL``, or the
name of a folder of the submission holding ``classifier.json`` + ``model.safetensors``)::

    team: alice
    name: soup-v1
    kind: checkpoint                   # one of KINDS, with its own fields:
    model: zoo:digits/soup-ft3         #   checkpoint: one ref
    # ensemble:  members: [ref, ...]; rule: mean_prob | mean_logit | vote; weights: [w, ...] (optional)
    # merge:     merge: {method: ties, base: ref, models: [ref, ...], parameters: {density: 0.5}}
    #            (any method of labkit.merge.METHODS, computed when the submission is loaded)
    # moe:       router: ref of a router folder; experts: [ref, ...]; top_k: k
    # cascade:   stages: [{model: ref, threshold: 0.9}, ..., {model: ref}]
    files: {my_student/classifier.json: <sha256>, ...}   # every file but spec.yml (write_submission fills it)
    submitted_at: 2026-11-30T12:00:00Z

Every model maps X [N, 64] (float32 digits in [0, 1]) to logits [N, 10]; ``Submission.logits``
does too, whatever the kind. A classifier config is a ``DigitMLP`` (``{"kind": "mlp", "hidden":
[128, 128], "dropout": 0.0, "in_features": 64, "num_classes": 10}``, at most ``MAX_HIDDEN_LAYERS``
hidden layers of at most ``MAX_WIDTH`` units) or a ``DigitCNN`` (``{"kind": "cnn", "channels": 16,
"dropout": 0.0, "num_classes": 10}``, at most ``MAX_CHANNELS`` channels).

Every problem is a ``SubmissionError``: one line naming the submission, the file and the field.
The models each kind builds, with their equations, are in ``kinds.py``. The budget is not a field:
the leaderboard measures it (``labkit.capstone.cost``), so check yours on the public data::

    from labkit.capstone import challenge, cost
    from labkit.capstone.spec import load_submission, write_submission

    write_submission("my-sub", {"team": "alice", "name": "distilled", "kind": "checkpoint",
                                "model": "student"}, {"student": my_mlp})
    sub = load_submission("my-sub")
    X, y, domain = challenge.load_public("val")
    (sub.logits(X).argmax(-1) == y).float().mean(), cost.submission_cost(sub, X)["relative_flops"]
"""
from __future__ import annotations

import copy
import datetime as dt
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import yaml
from torch import nn

from ..device import get_device
from ..models import make_classifier
from .kinds import Cascade, Ensemble, MixtureOfExperts, Single  # noqa: F401 (importable from here too)

SPEC_FILE = "spec.yml"
KINDS = ("checkpoint", "ensemble", "merge", "moe", "cascade")
RULES = ("mean_prob", "mean_logit", "vote")
IN_FEATURES, NUM_CLASSES = 64, 10
MAX_HIDDEN_LAYERS, MAX_WIDTH, MAX_CHANNELS = 4, 1024, 64
MAX_MODELS = 32                        # members, experts, stages or merged models
MAX_FILE_BYTES = 32 * 2**20
# pickle-based formats: loading one runs whatever code its author put in it
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib")
ALLOWED_SUFFIXES = (".json", ".safetensors", ".md", ".txt")
_COMMON_FIELDS = {"team", "name", "kind", "files", "submitted_at", "description"}
KIND_FIELDS = {"checkpoint": {"model"}, "ensemble": {"members", "rule", "weights"}, "merge": {"merge"},
               "moe": {"router", "experts", "top_k"}, "cascade": {"stages"}}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class SubmissionError(ValueError):
    """A submission that cannot be scored: ``submission``, ``file`` (and ``field``) say where."""

    def __init__(self, submission, file: str, message: str, field: str | None = None):
        self.submission, self.file, self.field = str(submission), file, field
        self.detail = f"{file}{f' field {field!r}' if field else ''}: {message}"
        super().__init__(f"submission {self.submission}: {self.detail}")


@dataclass
class Submission:
    """A loaded, validated submission. ``model`` maps X [N, 64] to logits [N, 10]."""

    directory: Path
    team: str
    name: str
    kind: str
    submitted_at: dt.datetime
    spec: dict
    model: nn.Module = field(repr=False)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @torch.no_grad()
    def logits(self, X: torch.Tensor) -> torch.Tensor:
        """X [N, 64] float -> logits [N, 10] float32, on X's device."""
        X = torch.as_tensor(X)
        if X.ndim != 2 or X.shape[1] != IN_FEATURES:
            raise ValueError(f"X must have shape [N, {IN_FEATURES}], got {tuple(X.shape)}")
        return self.model(X.to(self.device, torch.float32)).float().to(X.device)


# ----------------------------------------------------------------------------- loading and validation


class _Loader:
    """Validates one submission folder; every error names the submission, the file and the field."""

    def __init__(self, directory: Path, label: str, device: torch.device):
        self.directory, self.label, self.device = directory, label, device
        self.files: dict[str, str] = {}

    def fail(self, file, message, field=None):
        raise SubmissionError(self.label, file, message, field)

    # -- the spec

    def read_spec(self) -> dict:
        path = self.directory / SPEC_FILE
        if not self.directory.is_dir():
            self.fail(SPEC_FILE, f"{self.directory} is not a folder")
        if not path.is_file():
            self.fail(SPEC_FILE, "missing: a submission folder holds spec.yml")
        if path.stat().st_size > 1 << 20:
            self.fail(SPEC_FILE, "larger than 1 MiB")
        try:
            spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            self.fail(SPEC_FILE, "not UTF-8 text")
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            self.fail(SPEC_FILE, f"malformed YAML{where}: {problem}")
        if not isinstance(spec, dict):
            self.fail(SPEC_FILE, f"must be a mapping of fields (team, name, kind, ...), not {type(spec).__name__}")
        kind = spec.get("kind")
        if kind not in KINDS:
            self.fail(SPEC_FILE, f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}", "kind")
        for key in ("team", "name"):
            value = spec.get(key)
            if not isinstance(value, str) or not _NAME.match(value):
                self.fail(SPEC_FILE, f"must be a name of letters, digits, '.', '_' or '-' (up to 64), not {value!r}", key)
        unknown = sorted(set(map(str, spec)) - _COMMON_FIELDS - KIND_FIELDS[kind])
        if unknown:
            self.fail(SPEC_FILE, f"unknown for kind {kind!r} (it takes {', '.join(sorted(KIND_FIELDS[kind]))})",
                      unknown[0])
        for key in sorted(KIND_FIELDS[kind] - {"weights"}):
            if key not in spec:
                self.fail(SPEC_FILE, f"missing: kind {kind!r} needs it", key)
        spec["submitted_at"] = self.timestamp(spec.get("submitted_at"))
        return spec

    def timestamp(self, value) -> dt.datetime:
        if isinstance(value, str):
            try:
                value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                self.fail(SPEC_FILE, f"not an ISO 8601 time such as 2026-11-30T12:00:00Z: {value!r}", "submitted_at")
        if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
            value = dt.datetime(value.year, value.month, value.day)
        if not isinstance(value, dt.datetime):
            self.fail(SPEC_FILE, f"missing or not a time: {value!r}", "submitted_at")
        return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)

    # -- the files

    def check_files(self, listed) -> None:
        """Every file is listed with its SHA-256, no listed file is missing or changed, no pickles."""
        from .challenge import sha256_file

        if not isinstance(listed, dict):
            self.fail(SPEC_FILE, "must map each file of the submission to its SHA-256", "files")
        present = []
        for root, dirs, names in os.walk(self.directory, followlinks=False):
            for name in sorted(dirs + names):
                path = Path(root) / name
                rel = path.relative_to(self.directory).as_posix()
                if path.is_symlink():
                    self.fail(rel, "is a symbolic link (a submission holds only its own files)")
                if path.is_file() and rel != SPEC_FILE:
                    present.append(rel)
        for rel in sorted(present):
            suffix = Path(rel).suffix.lower()
            if suffix in PICKLE_SUFFIXES:
                self.fail(rel, f"{suffix} files are refused: they are pickles, and unpickling runs code; "
                          "save tensors with safetensors (labkit.models.save_classifier)")
            if suffix not in ALLOWED_SUFFIXES:
                self.fail(rel, f"files of type {suffix or '(none)'} are not allowed (only {', '.join(ALLOWED_SUFFIXES)})")
            if rel not in listed:
                self.fail(rel, "is not listed in spec.yml's files (with its SHA-256)", "files")
        for rel, digest in sorted(listed.items(), key=lambda kv: str(kv[0])):
            if not isinstance(rel, str) or rel.startswith("/") or ".." in Path(rel).parts:
                self.fail(SPEC_FILE, f"{rel!r} is not a relative path inside the submission", "files")
            if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
                self.fail(SPEC_FILE, f"the SHA-256 of {rel} must be 64 hex digits, not {digest!r}", "files")
            path = self.directory / rel
            if not path.is_file():
                self.fail(rel, "missing: listed in spec.yml's files but not in the submission", "files")
            if path.stat().st_size > MAX_FILE_BYTES:
                self.fail(rel, f"larger than {MAX_FILE_BYTES >> 20} MiB")
            got = sha256_file(path)
            if got != digest:
                self.fail(rel, f"SHA-256 {got[:12]}... does not match spec.yml's {digest[:12]}...: the file was "
                          "modified after it was packed (tampered or corrupted)", "files")
        self.files = dict(listed)

    def read_json(self, rel: str, field: str) -> dict:
        try:
            value = json.loads((self.directory / rel).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            self.fail(rel, f"malformed JSON: {e}", field)
        if not isinstance(value, dict):
            self.fail(rel, "must hold a JSON object", field)
        return value

    def read_tensors(self, rel: str, field: str) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(self.directory / rel), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            self.fail(rel, f"not a readable safetensors file ({' '.join(str(e).split())})", field)
        for name, t in tensors.items():
            if not t.is_floating_point():
                self.fail(rel, f"tensor {name!r} is {str(t.dtype).replace('torch.', '')}, not floating point", field)
            if not bool(torch.isfinite(t).all()):
                self.fail(rel, f"tensor {name!r} holds NaN or inf", field)
        return {k: v.float() for k, v in tensors.items()}

    def load_weights(self, module: nn.Module, rel: str, field: str) -> nn.Module:
        tensors = self.read_tensors(rel, field)
        expected = module.state_dict()
        for name, t in expected.items():
            if name not in tensors:
                self.fail(rel, f"tensor {name!r} is missing (the config needs {', '.join(expected)})", field)
            if tuple(tensors[name].shape) != tuple(t.shape):
                self.fail(rel, f"tensor {name!r} has shape {list(tensors[name].shape)}, but the config needs "
                          f"{list(t.shape)}", field)
        extra = sorted(set(tensors) - set(expected))
        if extra:
            self.fail(rel, f"tensor {extra[0]!r} is not part of the model its config describes", field)
        module.load_state_dict(tensors)
        return module

    # -- configs

    def check_classifier_config(self, config: dict, rel: str, field: str) -> dict:
        def number(key, low, high, integer=True, default=None):
            value = config.get(key, default)
            ok = isinstance(value, int) if integer else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok or not (low <= value <= high):
                self.fail(rel, f"{key!r} must be {'a whole number' if integer else 'a number'} in [{low}, {high}], "
                          f"not {value!r}", field)
            return value

        kind = config.get("kind")
        allowed = {"mlp": {"kind", "hidden", "dropout", "in_features", "num_classes"},
                   "cnn": {"kind", "channels", "dropout", "num_classes"}}
        if kind not in allowed:
            self.fail(rel, f"classifier kind {kind!r} is not allowed (only 'mlp' or 'cnn')", field)
        unknown = sorted(set(config) - allowed[kind])
        if unknown:
            self.fail(rel, f"unknown key {unknown[0]!r} for a {kind} classifier", field)
        if config.get("num_classes", NUM_CLASSES) != NUM_CLASSES:
            self.fail(rel, f"num_classes must be {NUM_CLASSES} (the digits), not {config.get('num_classes')!r}", field)
        number("dropout", 0.0, 0.99, integer=False, default=0.0)
        if kind == "mlp":
            if config.get("in_features", IN_FEATURES) != IN_FEATURES:
                self.fail(rel, f"in_features must be {IN_FEATURES} (8x8 pixels), not {config.get('in_features')!r}",
                          field)
            hidden = config.get("hidden")
            if not isinstance(hidden, list) or not 1 <= len(hidden) <= MAX_HIDDEN_LAYERS or not all(
                    isinstance(h, int) and not isinstance(h, bool) and 1 <= h <= MAX_WIDTH for h in hidden):
                self.fail(rel, f"'hidden' must list 1 to {MAX_HIDDEN_LAYERS} layer widths in [1, {MAX_WIDTH}], "
                          f"not {hidden!r}", field)
        else:
            number("channels", 1, MAX_CHANNELS)
        return config

    # -- refs

    def folder(self, ref: str, field: str, needed: tuple[str, ...]) -> str:
        rel = ref.strip("/")
        if not rel or rel.startswith(".") or ".." in Path(rel).parts or Path(ref).is_absolute():
            self.fail(SPEC_FILE, f"{ref!r} is not a folder of this submission", field)
        if not (self.directory / rel).is_dir():
            self.fail(SPEC_FILE, f"unknown member {ref!r}: neither zoo:NAME nor a folder of this submission", field)
        for name in needed:
            if f"{rel}/{name}" not in self.files:
                self.fail(f"{rel}/{name}", "missing: a model folder holds " + " and ".join(needed), field)
        return rel

    def classifier(self, ref, field: str) -> nn.Module:
        """A ref (zoo:NAME or a folder of the submission) -> a classifier in eval mode."""
        if not isinstance(ref, str) or not ref:
            self.fail(SPEC_FILE, f"a model ref must be zoo:NAME or a folder name, not {ref!r}", field)
        if ref.startswith("zoo:"):
            name = ref[4:]
            try:
                config, state = _zoo_classifier(name)
            except ValueError as e:
                self.fail(SPEC_FILE, f"unknown member {ref!r}: {e}", field)
            model = make_classifier(config)
            model.load_state_dict(state)
            return model.eval()
        rel = self.folder(ref, field, ("classifier.json", "model.safetensors"))
        config = self.check_classifier_config(self.read_json(f"{rel}/classifier.json", field),
                                              f"{rel}/classifier.json", field)
        return self.load_weights(make_classifier(config), f"{rel}/model.safetensors", field).eval()

    def router(self, ref, n_experts: int, field: str = "router") -> nn.Linear:
        if not isinstance(ref, str) or ref.startswith("zoo:"):
            self.fail(SPEC_FILE, f"the router must be a folder of this submission (router.json + "
                      f"model.safetensors), not {ref!r}", field)
        rel = self.folder(ref, field, ("router.json", "model.safetensors"))
        config = self.read_json(f"{rel}/router.json", field)
        expected = {"kind": "router", "in_features": IN_FEATURES, "num_experts": n_experts}
        for key, value in expected.items():
            if config.get(key) != value:
                self.fail(f"{rel}/router.json", f"{key!r} must be {value!r} (the spec lists {n_experts} experts), "
                          f"not {config.get(key)!r}", field)
        if set(config) != set(expected):
            self.fail(f"{rel}/router.json", f"unknown key {sorted(set(config) - set(expected))[0]!r}", field)
        return self.load_weights(nn.Linear(IN_FEATURES, n_experts), f"{rel}/model.safetensors", field).eval()

    def ref_list(self, value, field: str, low: int = 1) -> list:
        if not isinstance(value, list) or not low <= len(value) <= MAX_MODELS:
            self.fail(SPEC_FILE, f"must be a list of {low} to {MAX_MODELS} model refs, not {value!r}", field)
        return value

    # -- the kinds

    def build(self, spec: dict) -> nn.Module:
        kind = spec["kind"]
        if kind == "checkpoint":
            return Single(self.classifier(spec["model"], "model"))
        if kind == "ensemble":
            members = self.ref_list(spec["members"], "members")
            rule = spec.get("rule", "mean_prob")
            if rule not in RULES:
                self.fail(SPEC_FILE, f"unknown rule {rule!r}; choose one of {', '.join(RULES)}", "rule")
            weights = self.weights(spec.get("weights"), len(members))
            return Ensemble([self.classifier(r, f"members[{i}]") for i, r in enumerate(members)], rule, weights)
        if kind == "merge":
            return Single(self.merged(spec["merge"]))
        if kind == "moe":
            experts = self.ref_list(spec["experts"], "experts", low=2)
            top_k = spec["top_k"]
            if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= len(experts):
                self.fail(SPEC_FILE, f"must be a whole number in [1, {len(experts)}] (the experts), not {top_k!r}",
                          "top_k")
            router = self.router(spec["router"], len(experts))
            return MixtureOfExperts(router, [self.classifier(r, f"experts[{i}]") for i, r in enumerate(experts)],
                                    top_k)
        stages = spec["stages"]
        if not isinstance(stages, list) or not 2 <= len(stages) <= MAX_MODELS:
            self.fail(SPEC_FILE, f"must list 2 to {MAX_MODELS} stages, not {stages!r}", "stages")
        models, thresholds = [], []
        for i, stage in enumerate(stages):
            where = f"stages[{i}]"
            last = i == len(stages) - 1
            if not isinstance(stage, dict) or set(stage) - {"model", "threshold"} or "model" not in stage:
                self.fail(SPEC_FILE, "must be {model: ref, threshold: t} (the last stage: {model: ref})", where)
            if last and "threshold" in stage:
                self.fail(SPEC_FILE, "the last stage takes every example left, so it has no threshold", where)
            if not last:
                t = stage.get("threshold")
                if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t <= 1.0:
                    self.fail(SPEC_FILE, f"threshold must be a max-softmax probability in (0, 1], not {t!r}",
                              f"{where}.threshold")
                thresholds.append(float(t))
            models.append(self.classifier(stage["model"], f"{where}.model"))
        return Cascade(models, thresholds)

    def weights(self, weights, n: int) -> list[float]:
        if weights is None:
            return [1.0 / n] * n
        if not isinstance(weights, list) or len(weights) != n:
            self.fail(SPEC_FILE, f"must list one weight per member ({n}), not {weights!r}", "weights")
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
                   for w in weights) or sum(weights) <= 0:
            self.fail(SPEC_FILE, f"must be finite numbers >= 0 with a positive sum, not {weights!r}", "weights")
        return [w / sum(weights) for w in weights]

    def merged(self, config) -> nn.Module:
        """labkit.merge.merge over the refs' state dicts, into a classifier of the models' architecture."""
        from ..merge import METHODS, merge

        if not isinstance(config, dict) or set(config) - {"method", "base", "models", "parameters"}:
            self.fail(SPEC_FILE, "must be {method: NAME, models: [ref, ...], base: ref (optional), "
                      "parameters: {...} (optional)}", "merge")
        method = config.get("method")
        if method not in METHODS:
            self.fail(SPEC_FILE, f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}", "merge.method")
        refs = self.ref_list(config.get("models"), "merge.models")
        parameters = config.get("parameters") or {}
        if not isinstance(parameters, dict):
            self.fail(SPEC_FILE, f"must be a mapping of parameter names to values, not {parameters!r}",
                      "merge.parameters")
        models = [self.classifier(r, f"merge.models[{i}]") for i, r in enumerate(refs)]
        base = self.classifier(config["base"], "merge.base") if config.get("base") is not None else None
        first = base if base is not None else models[0]
        for i, m in enumerate(models):
            if {**m.config, "dropout": 0} != {**first.config, "dropout": 0}:   # dropout changes no tensor
                self.fail(SPEC_FILE, f"{refs[i]!r} is a {m.config} but the merge's first model is a {first.config}: "
                          "only models of one architecture can be merged", f"merge.models[{i}]")
        try:
            state = merge(method, models, base=base, device="cpu", **parameters)
        except (ValueError, TypeError) as e:
            self.fail(SPEC_FILE, " ".join(str(e).split()), "merge")
        result = make_classifier(first.config)
        result.load_state_dict(state)
        return result.eval()


@lru_cache(maxsize=64)
def _zoo_state(name: str):
    from .. import zoo

    recipe = zoo.RECIPES.get(name)
    if recipe is None:
        raise ValueError("not in the zoo (see labkit.capstone.challenge.POOL)")
    if recipe["kind"] != "digits":
        raise ValueError("not a digit classifier")
    try:
        model = zoo.load(name, device="cpu")   # hash-checked against the zoo's manifest
    except zoo.ZooError as e:
        raise ValueError(" ".join(str(e).split())) from None
    return dict(model.config), {k: v.detach().clone() for k, v in model.state_dict().items()}


def _zoo_classifier(name: str):
    config, state = _zoo_state(name)
    return dict(config), {k: v.clone() for k, v in state.items()}


def load_submission(directory, device=None, label: str | None = None) -> Submission:
    """Validate and load the submission in ``directory`` (see the module's docstring).

    Nothing the submission holds is executed: YAML through ``yaml.safe_load``, JSON, and tensors
    from safetensors files, into the kit's own model classes. ``device``: default the best available.
    Raises ``SubmissionError`` (one line naming the submission, the file and the field).
    """
    directory = Path(directory)
    loader = _Loader(directory, label or str(directory), torch.device(device) if device else get_device())
    spec = loader.read_spec()
    loader.check_files(spec.get("files"))
    model = loader.build(spec).eval().to(loader.device)
    return Submission(directory, spec["team"], spec["name"], spec["kind"], spec["submitted_at"], spec, model,
                      loader.device)


# ----------------------------------------------------------------------------- packing (student side)


def _default_mode(folder: Path) -> None:
    """mkdtemp makes a folder only its owner can read; give it the mode any new folder gets (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)


def write_folder_atomically(directory: Path, fill) -> Path:
    """Build ``directory`` with ``fill(tmp)`` in a fresh folder beside it, then rename it into place.
    An existing ``directory`` is moved aside first and deleted only once the rename succeeded (put back
    if it fails), so a failure at any point leaves either the old folder or the new one, never half."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        _default_mode(tmp)
        fill(tmp)
        if not directory.exists():
            os.replace(tmp, directory)
            return directory
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent))
        try:
            os.replace(directory, old / "previous")
            os.replace(tmp, directory)
        except BaseException:
            if (old / "previous").exists():
                os.replace(old / "previous", directory)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _save_module(module: nn.Module, folder: Path, name: str) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    if isinstance(module, nn.Linear):   # an MoE router
        config = {"kind": "router", "in_features": module.in_features, "num_experts": module.out_features}
        (folder / "router.json").write_text(json.dumps(config, indent=1) + "\n")
    elif isinstance(getattr(module, "config", None), dict) and module.config.get("kind") in ("mlp", "cnn"):
        (folder / "classifier.json").write_text(json.dumps(module.config, indent=1) + "\n")
    else:
        raise ValueError(f"model {name!r} is a {type(module).__name__}: a submission holds DigitMLP / DigitCNN "
                         "classifiers (labkit.models) and nn.Linear(64, E) MoE routers")
    state = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))


def write_submission(directory, spec: dict, models: dict | None = None, overwrite: bool = False) -> Path:
    """Pack a submission: each of ``models`` ({folder name: module}) as ``<name>/classifier.json +
    model.safetensors`` (a DigitMLP / DigitCNN) or ``<name>/router.json + model.safetensors`` (an
    ``nn.Linear(64, E)`` router), then ``spec.yml`` with the SHA-256 of every file and
    ``submitted_at`` (now, unless ``spec`` gives it). The result is validated with
    ``load_submission`` before it appears at ``directory``, so what you pack is what will be scored.

    An existing ``directory`` is replaced only with ``overwrite=True``, and only if it holds a
    submission (a ``spec.yml``); nothing is left half-written.
    """
    from .challenge import sha256_file

    directory = Path(directory)
    models = dict(models or {})
    spec = copy.deepcopy(dict(spec))
    if "files" in spec:
        raise ValueError("spec: leave out 'files': write_submission computes the SHA-256 of every file")
    if directory.exists():
        if not overwrite:
            raise FileExistsError(f"{directory} exists; pass overwrite=True to replace the submission there")
        if not directory.is_dir() or (any(directory.iterdir()) and not (directory / SPEC_FILE).is_file()):
            raise FileExistsError(f"{directory} exists and is not a submission (no {SPEC_FILE}); not replacing it")
    for name in models:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"model folder name {name!r}: use letters, digits, '.', '_' or '-'")
    submitted_at = spec.get("submitted_at") or dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    if isinstance(submitted_at, dt.datetime):
        submitted_at = submitted_at.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    def fill(tmp: Path) -> None:
        for name, module in sorted(models.items()):
            _save_module(module, tmp / name, name)
        files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        packed = {**spec, "files": files, "submitted_at": str(submitted_at)}
        (tmp / SPEC_FILE).write_text(yaml.safe_dump(packed, sort_keys=False))
        load_submission(tmp, device="cpu", label=str(directory))

    return write_folder_atomically(directory, fill)
