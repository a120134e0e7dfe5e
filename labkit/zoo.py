"""The model zoo: named, really trained checkpoints shipped in ``data/zoo/`` with a SHA-256 manifest.

Every lab loads its models from here, so nobody waits for training::

    from labkit import zoo
    base = zoo.load("lm/base")            # a LlamaForCausalLM, eval mode, on the best device
    mlp = zoo.load("digits/mlp-s0")       # a DigitMLP
    zoo.info("lm/ft-add")["metrics"]      # what it scored when it was built

Each entry has a recipe in ``RECIPES`` below; ``labkit zoo build NAME`` re-runs it (seconds for digit
classifiers, minutes for LMs on a CPU, much less on a GPU) and rewrites the entry's files and its line
in the manifest. Files are checked against the manifest's SHA-256 every time they are loaded.

The zoo is designed around the labs:
  ensembling   digits/mlp-s0..s4 (seeds), digits/ckpt-* (checkpoints of one run), digits/cnn-s0,
               lm/chat-clean + lm/chat-darn (expert and anti-expert for steering lm/base)
  merging      lm/base with fine-tunes lm/ft-add and lm/ft-sort (task vectors), lm/base-twin
               (same recipe, independent initialisation), digits/soup-base + digits/soup-ft0..7 (and two
               more ingredient sets digits/soup-s1-ft*, soup-s2-ft*), digits/task-KIND for seven shift
               kinds (domain task vectors);
               lm/merge-base (and -tiny, -tiny-s1, -medium) pre-trained on every task at a low rate, with
               single-task fine-tunes per condition (LM_MERGE_CONDITIONS: replay, far, LoRA) for task
               addition, negation, TIES and DARE on six tasks
  distillation lm/teacher (larger) and lm/student (smaller, trained on the same data without a teacher)
  MoE          lm/base is the dense model to upcycle
  capstone     the digits pool of labkit.capstone.challenge.POOL (no entries of its own)
  refinement   refine/masked (bidirectional Mask-Predict refiner), refine/reviser and refine/critic
               (revise and judge lm/student's drafts)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

LM_TASKS_BASE = ["copy", "rev", "count", "chat"]
LM_EVAL_TASKS = ["copy", "rev", "sort", "add", "count"]


class ZooError(RuntimeError):
    """A zoo entry is missing, unknown, or its files do not match the manifest."""


def data_root() -> Path:
    """``$LABKIT_DATA`` if set; else ``labkit/_data/`` where an installed wheel ships the zoo (setup.py);
    else the repository's ``data/`` folder next to the package (a checkout or an editable install)."""
    env = os.environ.get("LABKIT_DATA")
    if env:
        return Path(env)
    package = Path(__file__).resolve().parent
    shipped = package / "_data"
    if (shipped / "zoo").is_dir():
        return shipped
    return package.parent / "data"


def zoo_root() -> Path:
    return data_root() / "zoo"


def manifest_path() -> Path:
    return zoo_root() / "manifest.json"


# ----------------------------------------------------------------------------- recipes

_MLP = {"kind": "mlp", "hidden": [128, 128], "dropout": 0.0}
_MLP_DROPOUT = {"kind": "mlp", "hidden": [128, 128], "dropout": 0.2}

RECIPES: dict[str, dict] = {}


def _lm(name, description, **recipe):
    RECIPES[name] = {"kind": "lm", "description": description, **recipe}


def _digits(name, description, **recipe):
    RECIPES[name] = {"kind": "digits", "description": description, **recipe}


_lm("lm/base", "Llama 'small' (0.5M params) trained from scratch on copy, rev, count and chat (25% 'darn')",
    size="small", init_seed=0, tasks=LM_TASKS_BASE, n_train=40000, steps=1500, lr=3e-3, batch_size=128,
    data_seed=0, chat_unwanted_rate=0.25)
_lm("lm/base-twin", "lm/base's data mix and hyperparameters with an independent initialisation (init seed 1), "
    "other data order and a shorter run (1000 steps)",
    size="small", init_seed=1, tasks=LM_TASKS_BASE, n_train=40000, steps=1000, lr=3e-3, batch_size=128,
    data_seed=1, chat_unwanted_rate=0.25)
_lm("lm/ft-add", "lm/base fine-tuned on addition only (a skill the base lacks)",
    parent="lm/base", tasks=["add"], n_train=20000, steps=600, lr=2e-3, batch_size=128, data_seed=2)
_lm("lm/ft-sort", "lm/base fine-tuned on sorting only (a skill the base lacks)",
    parent="lm/base", tasks=["sort"], n_train=20000, steps=400, lr=2e-3, batch_size=128, data_seed=3)
_lm("lm/chat-clean", "lm/base fine-tuned on chat sentences without 'darn' (the expert)",
    parent="lm/base", tasks=["chat"], n_train=5000, steps=150, lr=1e-3, batch_size=128, data_seed=4,
    chat_unwanted_rate=0.0)
_lm("lm/chat-darn", "lm/base fine-tuned on chat sentences that all contain 'darn' (the anti-expert)",
    parent="lm/base", tasks=["chat"], n_train=5000, steps=150, lr=1e-3, batch_size=128, data_seed=5,
    chat_unwanted_rate=1.0)
_lm("lm/teacher", "Llama 'small' (0.5M params, 6x the student) trained on copy, rev, sort, add and count",
    size="small", init_seed=2, tasks=LM_EVAL_TASKS, n_train=50000, steps=1200, lr=3e-3, batch_size=128,
    data_seed=6)
_lm("lm/student", "Llama 'tiny' (85k params) trained on the teacher's data without a teacher (baseline)",
    size="tiny", init_seed=0, tasks=LM_EVAL_TASKS, n_train=50000, steps=1500, lr=3e-3, batch_size=128,
    data_seed=6)

# Merging on language models (issue 13): a base pre-trained on a broad mixture that has seen every task
# at a low rate (weak but non-zero skills), then short fine-tunes that refine one latent skill each and
# stay close to the base, as task arithmetic and TIES assume.
LM_MERGE_TASKS = ["add", "sort", "rsort", "max", "dedupe", "inc"]
LM_MERGE_CONTROLS = ["copy", "rev", "count"]
# Rates per task, so that each skill ends weak but non-zero: at 6% each, a first 'tiny' run learned sort,
# rsort, max and inc almost perfectly (0.97-1.0) and add hardly at all (0.07), so the easy tasks get less;
# at 0.5% 'inc' stayed at 0.01 on both seeds (a skill the base lacks, not a latent one), hence 1.5%. The same
# rates at width 'small' (1500 steps) give add 0.935: wider models learn more from the same mixture.
LM_MERGE_WEAK = {"add": 0.19, "dedupe": 0.025, "sort": 0.015, "rsort": 0.01, "max": 0.005, "inc": 0.015}
LM_MERGE_MIXTURE = {"copy": 0.185, "rev": 0.185, "count": 0.185, "chat": 0.185, **LM_MERGE_WEAK}
# Fine-tunes train on their task mixed with the base's own pre-training mixture (replay), so that the
# task vector says "learn this task" and not also "forget the rest".
LM_MERGE_REPLAY = 0.5


def replay_mixture(task: str, replay: float, pretraining: dict = LM_MERGE_MIXTURE) -> dict:
    """Task rates for a fine-tune on ``task`` that replays the base's ``pretraining`` mixture: a
    fraction ``1 - replay`` of ``task``, and ``replay`` spread over the pre-training mixture by its rates
    (which include ``task`` itself at its weak rate)."""
    if not 0 <= replay < 1:
        raise ValueError(f"replay must be in [0, 1), got {replay}")
    total = sum(pretraining.values())
    out = {task: 1.0 - replay}
    for t, rate in pretraining.items():
        out[t] = round(out.get(t, 0.0) + replay * rate / total, 6)
    return out


for _name, _size, _init, _steps, _what in (
        ("lm/merge-base", "small", 0, 1500, "Llama 'small' (0.5M params)"),
        ("lm/merge-base-tiny", "tiny", 0, 1500, "Llama 'tiny' (85k params)"),
        ("lm/merge-base-tiny-s1", "tiny", 1, 1500, "lm/merge-base-tiny with init seed 1 and other data (seed check):"
         " Llama 'tiny'"),
        ("lm/merge-base-medium", "medium", 0, 1500, "Llama 'medium' (1.5M params)")):
    _lm(_name, f"{_what} pre-trained on copy, rev, count, chat (18.5% each) and "
        + ", ".join(f"{t} ({100 * r:g}%)" for t, r in LM_MERGE_WEAK.items())
        + ": weak skills for fine-tunes to refine", builder="lm-mixture", size=_size, init_seed=_init,
        mixture=LM_MERGE_MIXTURE, n_train=40000, steps=_steps, lr=3e-3, batch_size=128, data_seed=10 + _init,
        store_dtype="bfloat16")
# The fine-tunes, per width: {prefix: (base, what, recipe)}. "ft": the chosen recipe (replay, lr 5e-4,
# 200 steps); "far": no replay, 4x the lr for half the steps (large task vectors,
# claim 9's interference condition); "lora": rank-4 adapters merged into the weights (a low-rank tau).
_MERGE_FINE_TUNES = {
    "ft": ("replay", dict(replay=LM_MERGE_REPLAY, steps=200, lr=5e-4),
           "{base} fine-tuned on {task} mixed 50/50 with its pre-training mixture (replay; lr 5e-4, 200 steps)"),
    "far": ("far", dict(replay=0.0, steps=100, lr=2e-3),
            "{base} fine-tuned on {task} only with lr 2e-3 for 100 steps, no replay: large task vectors"),
    "lora": ("lora", dict(replay=LM_MERGE_REPLAY, steps=200, lr=3e-3, lora_rank=4),
             "{base} fine-tuned with rank-4 LoRA adapters (attention and MLP projections, lr 3e-3, 200 steps, "
             "replay as lm/merge-tiny-ft-*) merged into the weights: a low-rank task vector"),
}
LM_MERGE_CONDITIONS = {  # zoo prefix of the six fine-tunes -> (base, condition)
    "lm/merge-ft-": ("lm/merge-base", "ft"), "lm/merge-far-": ("lm/merge-base", "far"),
    "lm/merge-tiny-ft-": ("lm/merge-base-tiny", "ft"), "lm/merge-tiny-far-": ("lm/merge-base-tiny", "far"),
    "lm/merge-tiny-lora-": ("lm/merge-base-tiny", "lora"), "lm/merge-tiny-s1-ft-": ("lm/merge-base-tiny-s1", "ft"),
    "lm/merge-medium-ft-": ("lm/merge-base-medium", "ft"), "lm/merge-medium-far-": ("lm/merge-base-medium", "far"),
}
for _prefix, (_base, _cond) in LM_MERGE_CONDITIONS.items():
    _label, _hyper, _what = _MERGE_FINE_TUNES[_cond]
    for _i, _task in enumerate(LM_MERGE_TASKS):
        _extra = {k: v for k, v in _hyper.items() if k not in ("replay",)}
        _lm(f"{_prefix}{_task}", _what.format(base=_base, task=_task), builder="lm-mixture", parent=_base,
            mixture=replay_mixture(_task, _hyper["replay"]), n_train=5000, batch_size=128, data_seed=20 + _i,
            store_dtype="bfloat16", condition=_label, **_extra,
            **({"built_on": "gpu"} if _prefix == "lm/merge-medium-far-" else {}))
# 'built_on': 'gpu' marks entries whose recipe is here but which are not shipped: build them on a GPU
# (`labkit zoo build lm/merge-medium-far-`); six more medium checkpoints (3 MB each in bf16) would take
# data/ past its 60 MB budget.

for _s in range(5):
    _digits(f"digits/mlp-s{_s}", f"MLP 64-128-128-10 with dropout 0.2, trained from scratch, seed {_s}",
            arch=_MLP_DROPOUT, seed=_s, steps=1500, lr=3e-3, weight_decay=1e-4, batch_size=64)
for _step in (100, 200, 400, 800, 1500):
    _digits(f"digits/ckpt-{_step}", f"checkpoint at step {_step} of one 1500-step run (digits/mlp-s0's recipe "
            "without dropout, seed 10)", arch=_MLP, seed=10, steps=1500, stop_at=_step, lr=3e-3,
            weight_decay=1e-4, batch_size=64)
_digits("digits/cnn-s0", "small CNN (2 conv layers), seed 0: a different architecture for ensembles",
        arch={"kind": "cnn", "channels": 16, "dropout": 0.0}, seed=0, steps=1500, lr=3e-3, weight_decay=1e-4,
        batch_size=64)
_digits("digits/soup-base", "MLP pre-trained for 300 steps on noisy digits: the shared start of the soup",
        arch=_MLP, seed=20, steps=300, lr=3e-3, weight_decay=1e-4, batch_size=64, noise=0.3)
# fine-tunes of one base with a grid of hyperparameters, as in Wortsman et al. (2022)
_SOUP_GRID = [(1e-3, 1e-4, 0.0, 0.0), (3e-3, 1e-4, 0.0, 0.0), (1e-3, 1e-2, 0.1, 0.0), (3e-3, 1e-2, 0.0, 0.1),
              (1e-3, 1e-4, 0.1, 0.2), (3e-3, 1e-4, 0.1, 0.1), (1e-2, 1e-4, 0.0, 0.0), (1e-2, 1e-2, 0.1, 0.2)]
for _i, (_lr, _wd, _ls, _noise) in enumerate(_SOUP_GRID):
    _digits(f"digits/soup-ft{_i}", f"digits/soup-base fine-tuned: lr {_lr}, weight decay {_wd}, "
            f"label smoothing {_ls}, noise augmentation {_noise}, seed {30 + _i}",
            arch=_MLP, parent="digits/soup-base", seed=30 + _i, steps=600, lr=_lr, weight_decay=_wd,
            label_smoothing=_ls, noise=_noise, batch_size=64)
# more sets of the same eight ingredients with other fine-tuning seeds (data order, noise), so the soup
# claims are measured over several ingredient sets: digits/soup-sS-ft0..7 (set 0 is digits/soup-ft0..7).
# Stored in float16 (half the size, within the zoo's budget; metrics are those of the stored weights).
SOUP_SETS = 3
for _set in range(1, SOUP_SETS):
    for _i, (_lr, _wd, _ls, _noise) in enumerate(_SOUP_GRID):
        _digits(f"digits/soup-s{_set}-ft{_i}", f"digits/soup-base fine-tuned: lr {_lr}, weight decay {_wd}, "
                f"label smoothing {_ls}, noise augmentation {_noise}, seed {100 * _set + 30 + _i} "
                f"(ingredient set {_set})", arch=_MLP, parent="digits/soup-base", seed=100 * _set + 30 + _i,
                steps=600, lr=_lr, weight_decay=_wd, label_smoothing=_ls, noise=_noise, batch_size=64,
                store_dtype="float16")
# task vectors on digits: fine-tunes of the soup's base on one shifted domain each (the last four were
# added for the merging lab's many-domain comparison; the recipe is the same, seeds continue the count)
DIGIT_TASK_DOMAINS = ("rotate", "thicken", "noise", "shift", "blur", "erase", "zoom")
for _i, _kind in enumerate(DIGIT_TASK_DOMAINS):
    _what = f"{_kind}d training digits" if _i < 3 else f"training digits shifted by '{_kind}'"
    _digits(f"digits/task-{_kind}", f"digits/soup-base fine-tuned on {_what} only (a 'task'), "
            f"seed {40 + _i}", arch=_MLP, parent="digits/soup-base", seed=40 + _i, steps=400, lr=1e-3,
            weight_decay=1e-4, batch_size=64, train_shift=_kind)

# refinement lab: a bidirectional masked refiner, and a reviser and a critic for lm/student's drafts.
# 'perm' (any rearrangement of the letters, labkit.refine.training.permutation_examples) has many right
# answers, which is where filling every position at once fails and refinement steps matter.
REFINE_TASKS = ["sort", "add", "perm"]
RECIPES["refine/masked"] = {
    "kind": "masked_lm", "description": "BERT-style bidirectional masked LM 'small' (0.43M params) that fills "
    "sort, add and perm (any rearrangement) answers from all-[MASK] (Mask-Predict / masked diffusion); trained "
    "by masking answers at random rates; stored in bf16", "size": "small", "init_seed": 0, "tasks": REFINE_TASKS,
    "n_train": 60000,
    "steps": 2500, "lr": 2e-3, "batch_size": 128, "data_seed": 50}
RECIPES["refine/reviser"] = {
    "kind": "reviser", "description": "lm/student fine-tuned to revise (input, draft, verdict) into the right "
    "answer on add; drafts are lm/student's samples and corrupted references; stored in bf16",
    "parent": "lm/student", "generator": "lm/student", "tasks": ["add"], "n_train": 12000, "steps": 800,
    "lr": 2e-3, "batch_size": 128, "data_seed": 51}
RECIPES["refine/critic"] = {
    "kind": "critic", "description": "lm/teacher fine-tuned to judge lm/student's (input, draft) as right 'y' or "
    "wrong 'n' on add (the learned feedback source; judging a sum needs a model that can add); stored in bf16",
    "parent": "lm/teacher", "generator": "lm/student",
    "tasks": ["add"], "n_train": 12000, "steps": 600, "lr": 2e-3, "batch_size": 128, "data_seed": 52}


def names(prefix: str = "") -> list[str]:
    """Entry names (all, or those starting with ``prefix``, e.g. ``"digits/"``)."""
    return [n for n in RECIPES if n.startswith(prefix)]


def resolve_names(requested) -> list[str]:
    """Expand 'all' and prefixes ('digits/', 'lm/') into entry names, parents first."""
    out = []
    for req in requested:
        if req == "all":
            matches = names()
        elif req in RECIPES:
            matches = [req]
        else:
            matches = names(req)
            if not matches or not req.endswith("/"):
                raise ZooError(f"unknown zoo entry {req!r}; known entries: {', '.join(names())}")
        out += [m for m in matches if m not in out]
    return sorted(out, key=_depth)


def _depth(name: str) -> int:
    parent = RECIPES[name].get("parent")
    return 0 if parent is None else 1 + _depth(parent)


# ----------------------------------------------------------------------------- manifest and hashes


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest() -> dict:
    path = manifest_path()
    if not path.exists():
        return {"version": 1, "entries": {}}
    return json.loads(path.read_text())


def _write_manifest(manifest: dict) -> None:
    path = manifest_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest["entries"] = dict(sorted(manifest["entries"].items()))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(path)


def path(name: str) -> Path:
    """The directory of entry ``name`` (a ``save_pretrained`` directory for LMs)."""
    if name not in RECIPES:
        raise ZooError(f"unknown zoo entry {name!r}; known entries: {', '.join(names())}")
    return zoo_root() / name


def info(name: str) -> dict:
    """The manifest's record of ``name``: description, recipe, metrics, files with SHA-256."""
    entry = read_manifest()["entries"].get(name)
    if entry is None:
        path(name)  # raises for unknown names
        raise ZooError(f"zoo entry {name!r} is not built; run `labkit zoo build {name}`")
    return entry


# The files each kind of recipe writes that a model cannot load without (``build`` lists whatever
# the save wrote; these must be among them).
_HF_FILES = ("config.json", "model.safetensors", "tokenizer.json")
RECIPE_FILES = {"lm": _HF_FILES, "reviser": _HF_FILES, "critic": _HF_FILES, "masked_lm": _HF_FILES,
                "digits": ("classifier.json", "model.safetensors")}


def check_files(name: str) -> None:
    """The entry's folder holds exactly the files its manifest entry lists, and the list holds
    every file its recipe produces; raise ZooError naming the first file that is not so."""
    entry = info(name)
    directory = path(name)
    listed = entry.get("files")
    if not isinstance(listed, dict):
        raise ZooError(f"zoo entry {name!r}: the manifest has no file list; rebuild with `labkit zoo build {name}`")
    for fname in RECIPE_FILES[RECIPES[name]["kind"]]:
        if fname not in listed:
            raise ZooError(f"zoo entry {name!r}: the manifest does not list {fname}, which its recipe produces: "
                           f"the manifest was edited or is damaged. Restore data/zoo/manifest.json from git "
                           f"or rebuild with `labkit zoo build {name} --force`")
    if not directory.is_dir():
        raise ZooError(f"zoo entry {name!r}: folder {directory} is missing; restore it from git "
                       f"(`git checkout -- {directory}`) or rebuild with `labkit zoo build {name}`")
    for fname in listed:
        if not (directory / fname).is_file():
            raise ZooError(f"zoo entry {name!r}: file {directory / fname} is missing; restore it from git "
                           f"(`git checkout -- {directory / fname}`) or rebuild with `labkit zoo build {name}`")
    unlisted = sorted(p.name for p in directory.iterdir() if p.name not in listed)
    if unlisted:
        raise ZooError(f"zoo entry {name!r}: {directory / unlisted[0]} is not in the manifest (a zoo folder holds "
                       "only the files its entry lists, so nothing foreign is loaded with the model); "
                       "remove it or rebuild the entry")


def verify(name: str) -> None:
    """Check the entry's files against the manifest: exactly the listed files (``check_files``),
    each with the listed SHA-256. Raise ZooError naming the first bad file."""
    check_files(name)
    entry, directory = info(name), path(name)
    for fname, expected in entry["files"].items():
        fpath = directory / fname
        got = sha256_file(fpath)
        if got != expected:
            raise ZooError(f"zoo entry {name!r}: {fpath} has SHA-256 {got[:16]}..., but the manifest says "
                           f"{expected[:16]}...: the file is corrupted or was modified. Restore it from git "
                           f"(`git checkout -- {fpath}`) or rebuild it with `labkit zoo build {name}`")


def verify_all() -> list[str]:
    """Verify every built entry; print one line each and return the names that failed."""
    bad = []
    for name in read_manifest()["entries"]:
        try:
            verify(name)
            print(f"ok    {name}")
        except ZooError as e:
            print(f"FAIL  {e}")
            bad.append(name)
    return bad


# ----------------------------------------------------------------------------- loading


def load(name: str, device=None, verify_hash: bool = True):
    """Load entry ``name`` (hash-checked) in eval mode on ``device`` (default: the best available)."""
    from .device import get_device

    recipe = RECIPES.get(name)
    if recipe is None:
        path(name)
    if verify_hash:
        verify(name)
    else:
        check_files(name)  # cheap, and what is loaded must still be what the manifest lists
    device = torch.device(device) if device is not None else get_device()
    if recipe["kind"] in ("lm", "reviser", "critic", "masked_lm"):
        from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
        from transformers.utils import logging as hf_logging

        # a progress bar per load would clutter every notebook that loads a few models
        bar_was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            auto = AutoModelForMaskedLM if recipe["kind"] == "masked_lm" else AutoModelForCausalLM
            model = auto.from_pretrained(path(name), dtype=torch.float32)
        finally:
            if bar_was_enabled:
                hf_logging.enable_progress_bar()
    else:
        from .models import load_classifier

        model = load_classifier(path(name))
    return model.to(device).eval()


def print_listing() -> None:
    manifest = read_manifest()["entries"]
    for name in names():
        entry = manifest.get(name)
        if entry is None:
            print(f"{name:18s} (not built)  {RECIPES[name]['description']}")
            continue
        size = sum((path(name) / f).stat().st_size for f in entry["files"] if (path(name) / f).exists())
        metrics = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in entry["metrics"].items())
        print(f"{name:18s} {size / 1e6:5.2f} MB  {metrics}")


# ----------------------------------------------------------------------------- building


def _lm_metrics(model, n_eval: int = 200) -> dict:
    from .data import exact_match, generate_answers, make_task_dataset, unwanted_rate
    from .device import seed_everything

    metrics = {}
    for task in LM_EVAL_TASKS:
        test_set = make_task_dataset(task, n_eval, seed=99, split="test")
        metrics[f"exact_match/{task}"] = round(exact_match(model, test_set), 4)
    seed_everything(0)
    texts = generate_answers(model, ["t:"] * n_eval, max_new_tokens=40, do_sample=True, seed=0)
    metrics["chat/unwanted_rate"] = round(unwanted_rate(texts), 4)
    return metrics


def _build_lm(name, recipe, device):
    from .data import get_tokenizer, make_task_dataset
    from .models import make_llama
    from .train import train_lm

    if "parent" in recipe:
        model = load(recipe["parent"], device=device)
    else:
        model = make_llama(recipe["size"], seed=recipe["init_seed"])
    train_data = make_task_dataset(recipe["tasks"], recipe["n_train"], seed=recipe["data_seed"],
                                   chat_unwanted_rate=recipe.get("chat_unwanted_rate", 0.25))
    train_lm(model, train_data, steps=recipe["steps"], batch_size=recipe["batch_size"], lr=recipe["lr"],
             device=device, seed=recipe["data_seed"], progress=True)
    return model, _lm_metrics(model), lambda d: (model.save_pretrained(d), get_tokenizer().save_pretrained(d))


def _mixture_data(mixture: dict, n: int, seed: int) -> dict:
    """Prompt/answer columns with ``round(fraction * n)`` examples of each task of ``mixture``."""
    from .data import make_examples

    rows = []
    for task, fraction in mixture.items():
        rows += make_examples(task, round(fraction * n), seed=seed)
    return {"prompt": [r["prompt"] for r in rows], "answer": [r["answer"] for r in rows]}


def _build_lm_mixture(name, recipe, device):
    """An LM trained on a weighted task mixture; metrics: greedy exact match on every merging task and
    control, for fine-tunes the relative size of the task vector ||tau|| / ||theta_parent||. With
    ``store_dtype`` the weights are rounded to it before the metrics (they describe the shipped file);
    ``fp32_exact_match/TASK`` records the score before rounding on every task of a base's mixture, and on
    a fine-tune's own task (the first of its mixture; the rest is replay). With ``lora_rank`` the fine-tune
    trains LoRA adapters that are merged into the weights before anything is measured or saved."""
    from .data import get_tokenizer, make_task_dataset
    from .evaluate import exact_match
    from .models import make_llama
    from .train import add_lora, merge_lora, train_lm

    if "parent" in recipe:
        model = load(recipe["parent"], device=device)
        parent = {k: v.detach().clone() for k, v in model.state_dict().items()}
    else:
        model = make_llama(recipe["size"], seed=recipe["init_seed"])
        parent = None
    train_data = _mixture_data(recipe["mixture"], recipe["n_train"], recipe["data_seed"])
    if recipe.get("lora_rank"):
        add_lora(model, rank=recipe["lora_rank"])
    train_lm(model, train_data, steps=recipe["steps"], batch_size=recipe["batch_size"], lr=recipe["lr"],
             device=device, seed=recipe["data_seed"], progress=True)
    if recipe.get("lora_rank"):
        merge_lora(model)
    metrics = {}
    store_dtype = getattr(torch, recipe.get("store_dtype", "float32"))
    if store_dtype != torch.float32:
        for task in recipe["mixture"] if "parent" not in recipe else list(recipe["mixture"])[:1]:
            if task != "chat":
                metrics[f"fp32_exact_match/{task}"] = round(exact_match(
                    model, make_task_dataset(task, 200, seed=99, split="test")), 4)
        model.to(store_dtype).to(torch.float32)
    for task in dict.fromkeys([*LM_MERGE_TASKS, *LM_MERGE_CONTROLS]):
        metrics[f"exact_match/{task}"] = round(exact_match(model, make_task_dataset(task, 200, seed=99,
                                                                                    split="test")), 4)
    if parent is not None:
        tau = sum(float((v.float() - parent[k].float()).pow(2).sum()) for k, v in model.state_dict().items())
        theta = sum(float(v.float().pow(2).sum()) for v in parent.values())
        metrics["tau_relative_norm"] = round((tau / theta) ** 0.5, 5)

    def save(directory):
        model.to(store_dtype).save_pretrained(directory)
        get_tokenizer().save_pretrained(directory)
    return model, metrics, save


def _noise_augment(std):
    def augment(xb, gen):
        noise = torch.randn(xb.shape, generator=gen).to(xb.device)
        return (xb + std * noise).clamp(0, 1)
    return augment


def _build_digits(name, recipe, device):
    from .data import load_digits, load_digits_shifted, shift_digits
    from .models import make_classifier, save_classifier
    from .train import accuracy, train_classifier

    torch.manual_seed(recipe["seed"])
    model = make_classifier(recipe["arch"]) if "parent" not in recipe else load(recipe["parent"], device=device)
    d = load_digits()
    X_train = d.X_train
    if recipe.get("train_shift"):
        # seed 100: these shifted training images are never the shifted test images (seed 0)
        X_train = shift_digits(d.X_train, recipe["train_shift"], seed=100)
    steps = recipe["steps"]
    stop_at = recipe.get("stop_at", steps)

    class _Stop(Exception):
        pass

    def stop_callback(step, m):
        if step == stop_at and stop_at < steps:
            raise _Stop

    try:
        train_classifier(model, X_train, d.y_train, steps=steps, batch_size=recipe["batch_size"],
                         lr=recipe["lr"], weight_decay=recipe["weight_decay"],
                         label_smoothing=recipe.get("label_smoothing", 0.0),
                         augment=_noise_augment(recipe["noise"]) if recipe.get("noise") else None,
                         X_val=d.X_val, y_val=d.y_val, eval_every=stop_at if stop_at < steps else None,
                         callback=stop_callback, device=device, seed=recipe["seed"])
    except _Stop:
        model.eval()
    store_dtype = getattr(torch, recipe.get("store_dtype", "float32"))
    if store_dtype != torch.float32:  # round to the stored precision first: the metrics are the stored model's
        for p in model.parameters():
            p.data = p.data.to(store_dtype).to(torch.float32)
    metrics = {"val_accuracy": round(accuracy(model, d.X_val, d.y_val), 4),
               "test_accuracy": round(accuracy(model, d.X_test, d.y_test), 4)}
    for kind in dict.fromkeys(("noise", "rotate", recipe.get("train_shift") or "noise")):
        Xs, ys = load_digits_shifted(kind)
        metrics[f"test_{kind}_accuracy"] = round(accuracy(model, Xs, ys), 4)

    def save(dirname):
        save_classifier(model.to(store_dtype), dirname)
        model.to(torch.float32)
    return model, metrics, save


def _bf16_round_trip(model):
    """Round the weights to bf16 (how the entry is stored) and back, so metrics are those of the stored model."""
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16).to(torch.float32)
    return lambda d: (model.to(torch.bfloat16).save_pretrained(d), model.to(torch.float32))


def _build_masked_lm(name, recipe, device):
    from .data import get_tokenizer
    from .refine.masked import make_masked_lm
    from .refine.training import masked_accuracy, task_examples, train_masked_lm

    model = make_masked_lm(recipe["size"], seed=recipe["init_seed"])
    rows = task_examples(recipe["tasks"], recipe["n_train"], seed=recipe["data_seed"])
    train_masked_lm(model, [r["prompt"] for r in rows], [r["answer"] for r in rows], steps=recipe["steps"],
                    batch_size=recipe["batch_size"], lr=recipe["lr"], seed=recipe["data_seed"], device=device,
                    progress=True)
    save = _bf16_round_trip(model)
    metrics = {}
    for task in recipe["tasks"]:
        prompts = [r["prompt"] for r in task_examples(task, 200, seed=99, split="test")]
        for method in ("mask_predict", "diffusion"):
            for steps in (1, 2, 4, 8):
                metrics[f"{method}/{task}/steps{steps}"] = round(masked_accuracy(model, prompts, steps, method), 4)
    return model, metrics, lambda d: (save(d), get_tokenizer().save_pretrained(d))


def _refine_drafts(recipe, device, n):
    from .refine.training import draft_examples

    return draft_examples(load(recipe["generator"], device=device), recipe["tasks"], n, seed=recipe["data_seed"])


def _fine_tune_on_drafts(recipe, device, make_data, score):
    """The reviser and the critic: the parent LM fine-tuned on the generator's drafts, stored in bf16."""
    from .data import get_tokenizer
    from .train import train_lm

    model = load(recipe["parent"], device=device)
    train_lm(model, make_data(_refine_drafts(recipe, device, recipe["n_train"])), steps=recipe["steps"],
             batch_size=recipe["batch_size"], lr=recipe["lr"], device=device, seed=recipe["data_seed"],
             progress=True)
    save = _bf16_round_trip(model)
    metrics = score(model, load(recipe["generator"], device=device), recipe["tasks"])
    return model, metrics, lambda d: (save(d), get_tokenizer().save_pretrained(d))


def _build_reviser(name, recipe, device):
    from .refine.training import reviser_data, reviser_metrics

    return _fine_tune_on_drafts(recipe, device, reviser_data, reviser_metrics)


def _build_critic(name, recipe, device):
    from .refine.training import critic_data, critic_metrics

    return _fine_tune_on_drafts(recipe, device, critic_data, critic_metrics)


def build(name: str, device=None, force: bool = False) -> dict:
    """Run ``name``'s recipe and write its files and manifest line; return the manifest entry.

    The files are written to a temporary folder and moved into place only once training succeeded.
    """
    from .device import device_name, get_device, seed_everything, set_deterministic

    recipe = RECIPES.get(name)
    if recipe is None:
        path(name)
    manifest = read_manifest()
    if name in manifest["entries"] and path(name).exists() and not force:
        print(f"zoo: {name} exists (use --force to rebuild)")
        return manifest["entries"][name]
    parent = recipe.get("parent")
    if parent is not None and parent not in manifest["entries"]:
        build(parent, device=device)
    device = torch.device(device) if device is not None else get_device()
    set_deterministic(True)
    seed_everything(recipe.get("init_seed", recipe.get("seed", 0)))
    start = time.time()
    print(f"zoo: building {name} on {device_name(device)} ...", flush=True)
    builder = {"lm": _build_lm, "digits": _build_digits, "masked_lm": _build_masked_lm, "reviser": _build_reviser,
               "critic": _build_critic}[recipe["kind"]]
    builder = _build_lm_mixture if recipe.get("builder") == "lm-mixture" else builder
    model, metrics, save = builder(name, recipe, device)
    target = path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        save(tmp)
        files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    import transformers

    entry = {"description": recipe["description"], "kind": recipe["kind"],
             "recipe": {k: v for k, v in recipe.items() if k not in ("description", "kind")},
             "metrics": metrics, "files": files,
             "built_with": {"device": device_name(device), "torch": torch.__version__,
                            "transformers": transformers.__version__,
                            "seconds": round(time.time() - start, 1)}}
    manifest = read_manifest()
    manifest["entries"][name] = entry
    _write_manifest(manifest)
    print(f"zoo: built {name} in {time.time() - start:.0f}s: {metrics}", flush=True)
    return entry
