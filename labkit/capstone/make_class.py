"""``labkit capstone make-class DIR``: a generated class folder with every case the leaderboard
must handle (tooling; deterministic: the same files on every run).

    DIR/<team>/<submission>/spec.yml (+ model folders), DIR/<team>/final.yml

CASES maps each submission to what the leaderboard must make of it; tests/test_capstone_leaderboard.py
checks the leaderboard against it.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
import yaml

from .spec import write_folder_atomically, write_submission

MARKER = ".labkit-class"

# (team, submission) -> (expected status, a phrase of the reason or note)
CASES = {
    ("alice", "single"): ("ok", "valid checkpoint"),
    ("alice", "pair"): ("ok", "valid 2-member ensemble with a model of the team's own"),
    ("bob", "soup"): ("ok", "valid merge: a uniform soup of soup-ft0..7"),
    ("bob", "big-ensemble"): ("disqualified", "over budget"),
    ("carol", "broken-yaml"): ("invalid", "malformed YAML"),
    ("carol", "ghost"): ("invalid", "unknown member"),
    ("carol", "tampered"): ("invalid", "modified after it was packed"),
    ("carol", "bad-shapes"): ("invalid", "has shape"),
    ("carol", "pickled"): ("invalid", "are pickles"),
    ("dave", "same-model"): ("ok", "tied with erin"),
    ("erin", "same-model"): ("ok", "tied with dave"),
    ("frank", "ft1"): ("ok", "final.yml names 3 submissions"),
    ("frank", "ft2"): ("ok", "final.yml names 3 submissions"),
    ("frank", "ft3"): ("ok", "final.yml names 3 submissions"),
    ("grace", "router"): ("ok", "valid moe"),
    ("grace", "cascade"): ("ok", "valid cascade; the second of grace's submissions that day"),
}


def _spec(team, name, kind, when, **fields):
    return {"team": team, "name": name, "kind": kind, **fields, "submitted_at": when}


def _student(seed_name: str):
    from .. import zoo

    return zoo.load(seed_name, device="cpu")


def _write_all(root: Path) -> None:
    from ..models import DigitMLP

    day = "2026-11-2"
    write_submission(root / "alice" / "single", _spec("alice", "single", "checkpoint", f"{day}8T09:00:00Z",
                                                      model="zoo:digits/soup-ft7"))
    write_submission(root / "alice" / "pair", _spec("alice", "pair", "ensemble", f"{day}9T10:00:00Z",
                                                    members=["zoo:digits/soup-ft7", "student"], rule="mean_prob"),
                     {"student": _student("digits/soup-ft4")})
    write_submission(root / "bob" / "soup", _spec("bob", "soup", "merge", f"{day}8T11:00:00Z", merge={
        "method": "linear", "models": [f"zoo:digits/soup-ft{i}" for i in range(8)]}))
    write_submission(root / "bob" / "big-ensemble", _spec("bob", "big-ensemble", "ensemble", f"{day}9T11:00:00Z",
                                                          members=[f"zoo:digits/soup-ft{i}" for i in range(5)],
                                                          rule="mean_logit"))
    # carol: every way a submission can be broken
    broken = root / "carol" / "broken-yaml"
    write_submission(broken, _spec("carol", "broken-yaml", "checkpoint", f"{day}8T08:00:00Z",
                                   model="zoo:digits/soup-ft1"))
    (broken / "spec.yml").write_text((broken / "spec.yml").read_text().replace("kind: checkpoint",
                                                                               "kind: [checkpoint"))
    ghost = root / "carol" / "ghost"
    write_submission(ghost, _spec("carol", "ghost", "checkpoint", f"{day}8T08:10:00Z", model="zoo:digits/soup-ft1"))
    (ghost / "spec.yml").write_text((ghost / "spec.yml").read_text().replace("zoo:digits/soup-ft1",
                                                                             "zoo:digits/soup-ft99"))
    tampered = root / "carol" / "tampered"
    write_submission(tampered, _spec("carol", "tampered", "checkpoint", f"{day}8T08:20:00Z", model="mine"),
                     {"mine": _student("digits/soup-ft2")})
    weights = tampered / "mine" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01   # one bit of one weight: the hash catches what no eye would
    weights.write_bytes(bytes(data))
    shapes = root / "carol" / "bad-shapes"
    write_submission(shapes, _spec("carol", "bad-shapes", "checkpoint", f"{day}8T08:30:00Z", model="mine"),
                     {"mine": _seeded(lambda: DigitMLP(hidden=(128, 128)))})
    config = shapes / "mine" / "classifier.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "hidden": [64, 64]}, indent=1) + "\n")
    _rehash(shapes)   # the hashes match: only the shapes are wrong
    pickled = root / "carol" / "pickled"
    write_submission(pickled, _spec("carol", "pickled", "checkpoint", f"{day}8T08:40:00Z",
                                    model="zoo:digits/soup-ft1"))
    # a pickle written here (pickle.dumps of plain data), never read by anything
    (pickled / "model.pt").write_bytes(pickle.dumps({"weight": [0.0] * 4}))
    _rehash(pickled)
    # dave and erin: the same model, so equal scores; erin submitted first
    for team, when in (("dave", f"{day}9T15:00:00Z"), ("erin", f"{day}9T14:00:00Z")):
        write_submission(root / team / "same-model", _spec(team, "same-model", "checkpoint", when,
                                                           model="zoo:digits/soup-ft5"))
    for i in (1, 2, 3):
        write_submission(root / "frank" / f"ft{i}", _spec("frank", f"ft{i}", "checkpoint", f"{day}8T1{i}:00:00Z",
                                                          model=f"zoo:digits/soup-ft{i}"))
    (root / "frank" / "final.yml").write_text(yaml.safe_dump({"finals": ["ft1", "ft2", "ft3"]}))
    write_submission(root / "grace" / "router", _spec("grace", "router", "moe", f"{day}9T09:00:00Z", router="gate",
                                                      experts=["zoo:digits/task-rotate", "zoo:digits/task-noise",
                                                               "zoo:digits/soup-ft7"], top_k=2),
                     {"gate": _seeded(lambda: torch.nn.Linear(64, 3))})
    write_submission(root / "grace" / "cascade", _spec("grace", "cascade", "cascade", f"{day}9T09:30:00Z", stages=[
        {"model": "zoo:digits/soup-ft7", "threshold": 0.9}, {"model": "zoo:digits/task-rotate"}]))


def _seeded(make, seed: int = 0):
    """``make()`` under a fixed seed (whatever ran before), leaving the caller's random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def _rehash(directory: Path) -> None:
    """Recompute spec.yml's files: as a student who edited files by hand and re-packed would."""
    from .challenge import sha256_file

    spec_path = directory / "spec.yml"
    spec = yaml.safe_load(spec_path.read_text())
    spec["files"] = {p.relative_to(directory).as_posix(): sha256_file(p) for p in sorted(directory.rglob("*"))
                     if p.is_file() and p.name != "spec.yml"}
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))


def make_class(directory, force: bool = False) -> Path:
    """Write the class folder to ``directory`` (a new or empty folder, or a previous class folder
    with ``force``); built in a temporary folder first, so nothing is left half-written."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is a file, not a folder")
    if directory.is_dir() and any(directory.iterdir()):
        if not (directory / MARKER).is_file():
            raise ValueError(f"{directory} holds files that make-class did not write; choose a new folder")
        if not force:
            raise ValueError(f"{directory} holds a class folder already; pass --force to replace it")
    def fill(tmp: Path) -> None:
        _write_all(tmp)
        (tmp / MARKER).write_text("written by labkit capstone make-class\n")

    return write_folder_atomically(directory, fill)


def make_class_cli(args) -> int:
    path = make_class(args.directory, force=args.force)
    print(f"labkit capstone make-class: wrote {len(CASES)} submissions of "
          f"{len({team for team, _ in CASES})} teams to {path}")
    return 0
