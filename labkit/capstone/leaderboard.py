"""``labkit leaderboard``: score capstone submissions on the hidden split, Kaggle's way (tooling).

    labkit leaderboard CLASS_OR_SUBMISSION... --out DIR [--hidden PATH [--hidden-sha256 HEX]]
                       [--reveal-private] [--jobs N]
                       [--daily-cap N] [--reference SUBMISSION...] [--latency-repeats N]
                       [--latency-tolerance T] [--force]

A class folder holds ``<team>/<submission>/spec.yml`` (and optionally ``<team>/final.yml``); a team
folder holds ``<submission>/spec.yml``; a path that holds ``spec.yml`` itself is one submission. For every submission, in this order:

1. ``spec.load_submission`` validates it (no code runs); a bad one is *invalid*, with its one-line error.
2. It is scored on the hidden split: accuracy on the public part (about 30%) and on the private part,
   and its FLOPs per example are counted (``cost``). Workers (``--jobs``) do this part; each result
   depends only on the submission and the hidden split, so any number of jobs gives the same table.
3. Its latency is measured here, one submission at a time, alternating with the reference model
   (one over the gate is timed again, and keeps the better of the two).
4. Over the FLOPs budget or the latency gate: *disqualified*, with the reason.
5. ``--daily-cap N``: a team's valid submissions beyond the N-th of a UTC day (by ``submitted_at``)
   are *not counted*.
6. Finals: up to 2 per team, named in ``<team>/final.yml`` (``finals: [sub-a, sub-b]``, folder
   names); without one (or when it is wrong, which the table says) the team's two best public
   scores are selected. A team ranks by its best final: public score, or private with
   ``--reveal-private`` (private scores are not shown without it). Equal scores: the earlier
   ``submitted_at`` ranks first, and the table says so.

Writes ``leaderboard.csv`` and ``leaderboard.html`` (a sortable table and an accuracy-vs-FLOPs plot
with the reference frontier) into ``--out``, atomically, never into a folder it did not create
(unless ``--force``). The reference frontier: points stored with the hidden split
(``instructor/capstone/make_hidden.py``) plus any ``--reference`` submissions, scored like the others.
"""
from __future__ import annotations

import csv
import datetime as dt
import io
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import torch
import yaml

from . import challenge, cost
from .spec import SPEC_FILE, SubmissionError, load_submission

MARKER = ".labkit-leaderboard"
OUTPUTS = ("leaderboard.csv", "leaderboard.html")
MAX_FINALS = 2
COLUMNS = ("rank", "team", "submission", "kind", "submitted_at", "final", "status", "public_accuracy",
           "private_accuracy", "flops", "relative_flops", "latency_ms", "relative_latency", "reason", "note")


@dataclass
class Entry:
    """One submission's row."""

    team: str
    submission: str               # its folder name
    path: Path
    class_team: bool = False      # team taken from a class folder (the spec must agree)
    kind: str = ""
    submitted_at: dt.datetime | None = None
    status: str = "ok"            # ok | disqualified | invalid | not counted
    reason: str = ""
    note: str = ""
    public: float | None = None
    private: float | None = None
    flops: float | None = None
    relative_flops: float | None = None
    latency_ms: float | None = None
    relative_latency: float | None = None
    final: bool = False
    rank: int | None = None
    reference: bool = False

    @property
    def label(self) -> str:
        return f"{self.team}/{self.submission}"

    @property
    def scored(self) -> bool:
        return self.public is not None


@dataclass
class Board:
    entries: list[Entry]
    frontier: list[dict]
    reveal_private: bool
    budget: float
    team_notes: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- finding submissions


def discover(paths, out_dir: Path | None = None) -> tuple[list[Entry], dict[str, Path]]:
    """Entries for every submission under ``paths`` (class folders or submission folders), sorted,
    and {team: its final.yml} for the class folders' teams that have one."""
    entries, finals = [], {}
    skip = out_dir.resolve() if out_dir is not None else None
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ValueError(f"{raw}: no such file or folder")
        if not path.is_dir():
            raise ValueError(f"{raw}: not a folder (give class folders or submission folders)")
        if (path / SPEC_FILE).is_file():
            entries.append(Entry(team=path.resolve().parent.name, submission=path.name, path=path))
            continue
        children = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        is_team = any((c / SPEC_FILE).is_file() for c in children)
        found = 0
        for team_dir in [path] if is_team else children:
            if skip is not None and team_dir.resolve() == skip:
                continue
            if (team_dir / "final.yml").is_file():
                finals[team_dir.name] = team_dir / "final.yml"
            for sub in sorted(p for p in team_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
                if skip is not None and sub.resolve() == skip:
                    continue
                entries.append(Entry(team=team_dir.name, submission=sub.name, path=sub, class_team=True))
                found += 1
        if not found:
            raise ValueError(f"{raw}: no submissions found (a class folder holds <team>/<submission>/spec.yml)")
    seen = set()
    for e in entries:
        if e.path.resolve() in seen:
            raise ValueError(f"{e.path}: given twice")
        seen.add(e.path.resolve())
    return entries, finals


# ----------------------------------------------------------------------------- scoring (workers)

_HIDDEN = {}


def _hidden(path: str, sha256: str | None):
    key = (path, sha256)
    if key not in _HIDDEN:
        _HIDDEN[key] = challenge.load_hidden(path, sha256)
    return _HIDDEN[key]


def score_one(path: str, label: str, team: str | None, hidden_path: str, sha256: str | None, device: str,
              reference_flops: float) -> dict:
    """Validate and score one submission on the hidden split: a dict of plain values (never raises
    for a bad submission: its error becomes the reason)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the same arithmetic for any --jobs, so the same accuracies
    try:
        X, y, _, public = _hidden(hidden_path, sha256)
        sub = load_submission(path, device=device, label=label)
        if team is not None and sub.team != team:
            raise SubmissionError(label, SPEC_FILE, f"says team {sub.team!r}, but the submission is in the folder "
                                  f"of team {team!r}", "team")
        with cost.FlopCounter(sub.model) as counter:
            logits = sub.logits(X)
        if logits.shape != (len(X), 10) or not bool(torch.isfinite(logits).all()):
            raise SubmissionError(label, SPEC_FILE, f"the model gives logits of shape {list(logits.shape)} "
                                  "with non-finite values or the wrong shape")
        correct = (logits.argmax(-1).cpu() == y).float()
        flops = counter.total / len(X)
        return dict(status="ok", team=sub.team, kind=sub.kind, submitted_at=sub.submitted_at.isoformat(),
                    public=float(correct[public].mean()), private=float(correct[~public].mean()), flops=flops,
                    relative_flops=flops / reference_flops)
    except SubmissionError as e:
        return dict(status="invalid", reason=e.detail)
    except Exception as e:  # a submission must never stop the leaderboard; say what happened
        text = " ".join(str(e).split())
        return dict(status="invalid", reason=f"could not be scored: {type(e).__name__}: {text}")
    finally:
        torch.set_num_threads(threads)


def _score_all(entries: list[Entry], hidden_path: str, sha256: str | None, device: str, jobs: int,
               reference_flops: float) -> None:
    args = [(str(e.path), e.label, e.team if e.class_team else None, hidden_path, sha256, device, reference_flops)
            for e in entries]
    if jobs <= 1 or len(entries) <= 1:
        results = [score_one(*a) for a in args]
    else:
        # spawn: a fresh interpreter per worker (fork after torch has started threads can hang)
        with ProcessPoolExecutor(max_workers=min(jobs, len(entries)), mp_context=get_context("spawn")) as pool:
            results = list(pool.map(score_one, *zip(*args)))
    for e, r in zip(entries, results):
        e.status = r["status"]
        e.reason = r.get("reason", "")
        if e.status == "ok":
            e.team = r["team"]
            e.kind, e.public, e.private = r["kind"], r["public"], r["private"]
            e.submitted_at = dt.datetime.fromisoformat(r["submitted_at"])
            e.flops, e.relative_flops = r["flops"], r["relative_flops"]


def _measure_latency(entries: list[Entry], X, device: str, repeats: int, reference, limit: float | None,
                     budget: float) -> None:
    """Time each valid submission against the reference. Noise only ever slows a run down, so a
    submission over the latency ``limit`` (and within the FLOPs ``budget``) is timed once more
    (twice as many runs) and keeps the lower of the two relative latencies before the gate judges it."""
    for e in entries:
        if e.status != "ok":
            continue
        try:
            sub = load_submission(e.path, device=device, label=e.label)
            c = cost.submission_cost(sub, X, reference=reference, latency_repeats=repeats)
            if limit is not None and c["relative_latency"] > limit and e.relative_flops <= budget:
                again = cost.submission_cost(sub, X, reference=reference, latency_repeats=2 * repeats)
                c = min(c, again, key=lambda m: m["relative_latency"])
            e.latency_ms, e.relative_latency = c["latency_ms"], c["relative_latency"]
        except Exception as err:  # it loaded a moment ago; anything now is the machine's problem
            e.status, e.reason = "invalid", f"latency could not be measured: {' '.join(str(err).split())}"


# ----------------------------------------------------------------------------- Kaggle's rules


def _apply_daily_cap(entries: list[Entry], cap: int | None) -> None:
    if cap is None:
        return
    per_day: dict[tuple, list[Entry]] = {}
    for e in entries:
        if e.status in ("ok", "disqualified") and not e.reference:
            per_day.setdefault((e.team, e.submitted_at.date()), []).append(e)
    for (team, day), day_entries in per_day.items():
        day_entries.sort(key=lambda e: (e.submitted_at, e.submission))
        for n, e in enumerate(day_entries[cap:], start=cap + 1):
            e.status = "not counted"
            e.reason = f"over the daily cap: submission {n} of team {team} on {day} (at most {cap} a day)"


def _read_finals(path: Path, names: set[str]) -> tuple[list[str] | None, str]:
    """(the named finals, "") or (None, why final.yml cannot be used)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        return None, f"final.yml is malformed ({' '.join(str(e).split())[:120]})"
    finals = data.get("finals") if isinstance(data, dict) else data
    if not isinstance(finals, list) or not all(isinstance(f, str) for f in finals):
        return None, "final.yml must be `finals: [submission, ...]` (folder names)"
    if len(finals) > MAX_FINALS:
        return None, f"final.yml names {len(finals)} submissions; at most {MAX_FINALS} are allowed"
    unknown = [f for f in finals if f not in names]
    if unknown:
        return None, f"final.yml names {unknown[0]!r}, which is not a submission of this team"
    return list(dict.fromkeys(finals)), ""


def _select_finals(entries: list[Entry], finals: dict[str, Path], team_notes: dict[str, str]) -> None:
    teams: dict[str, list[Entry]] = {}
    for e in entries:
        if not e.reference:
            teams.setdefault(e.team, []).append(e)
    for team, team_entries in sorted(teams.items()):
        named, why = (None, "")
        if team in finals:
            named, why = _read_finals(finals[team], {e.submission for e in team_entries})
        if named is not None:
            for e in team_entries:
                e.final = e.submission in named
            continue
        ok = sorted((e for e in team_entries if e.status == "ok"), key=lambda e: (-e.public, e.submitted_at,
                                                                                   e.submission))
        for e in ok[:MAX_FINALS]:
            e.final = True
        if why:
            team_notes[team] = f"{why}; the {MAX_FINALS} best public scores were selected instead"


def _rank(entries: list[Entry], reveal_private: bool) -> None:
    metric = (lambda e: e.private) if reveal_private else (lambda e: e.public)
    best: dict[str, Entry] = {}
    for e in entries:
        if e.final and e.status == "ok" and not e.reference:
            order = (-metric(e), e.submitted_at, e.submission)
            if e.team not in best or order < (-metric(best[e.team]), best[e.team].submitted_at,
                                              best[e.team].submission):
                best[e.team] = e
    ranked = sorted(best.values(), key=lambda e: (-metric(e), e.submitted_at, e.team, e.submission))
    for i, e in enumerate(ranked, start=1):
        e.rank = i
    for a, b in zip(ranked, ranked[1:]):
        if metric(a) == metric(b):
            a.note = _join(a.note, f"tied with {b.team} at {metric(a):.4f}: ranked first as the earlier submission "
                           f"({_time(a.submitted_at)})")
            b.note = _join(b.note, f"tied with {a.team} at {metric(b):.4f}: ranked after the earlier submission "
                           f"({_time(a.submitted_at)})")


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


def _time(t: dt.datetime | None) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ") if t is not None else ""


def _order(entries: list[Entry]) -> list[Entry]:
    ranked = sorted((e for e in entries if e.rank is not None), key=lambda e: e.rank)
    rest = sorted((e for e in entries if e.rank is None), key=lambda e: (e.team, e.submission))
    return ranked + rest


# ----------------------------------------------------------------------------- the whole run


def build(paths, hidden=None, sha256: str | None = None, out_dir=None, reveal_private: bool = False, jobs: int = 1,
          daily_cap: int | None = None, references=(), latency_repeats: int = 5,
          latency_tolerance: float | None = challenge.LATENCY_TOLERANCE, budget: float = challenge.BUDGET_MULTIPLIER,
          device: str | None = None) -> Board:
    """Score everything and apply the rules; returns the Board that ``write`` writes."""
    hidden_path = str(hidden if hidden is not None else challenge.default_hidden_path())
    X, y, domain, public, meta = challenge.load_hidden(hidden_path, sha256, with_metadata=True)
    device = device or "cpu"
    entries, finals = discover(paths, Path(out_dir) if out_dir is not None else None)
    refs = [Entry(team="reference", submission=Path(r).name, path=Path(r), reference=True) for r in references]
    reference = cost.reference_model(device)
    reference_flops = cost.flops_per_example(reference)
    _score_all(entries + refs, hidden_path, sha256, device, jobs, reference_flops)
    if latency_repeats > 0:
        limit = None if latency_tolerance is None else budget * (1 + latency_tolerance)
        _measure_latency(entries, X, device, latency_repeats, reference, limit, budget)
    for e in entries:
        if e.status == "ok":
            why = cost.budget_violation(vars(e), budget, latency_tolerance)
            if why:
                e.status, e.reason = "disqualified", why
    _apply_daily_cap(entries, daily_cap)
    team_notes: dict[str, str] = {}
    _select_finals(entries, finals, team_notes)
    _rank(entries, reveal_private)
    for e in entries:
        if e.team in team_notes:
            e.note = _join(e.note, team_notes[e.team])
        if e.status == "not counted":
            e.public = e.private = None
    frontier = [dict(p) for p in meta.get("frontier", [])]
    for r in refs:
        if r.status != "ok":
            raise ValueError(f"reference submission {r.path}: {r.reason}")
        frontier.append({"name": r.submission, "relative_flops": r.relative_flops, "public": r.public,
                         "private": r.private})
    return Board(_order(entries), frontier, reveal_private, budget, team_notes)


# ----------------------------------------------------------------------------- writing


def _fmt(value, digits: int) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}f}"


def row_values(e: Entry, reveal_private: bool) -> dict:
    return {"rank": "" if e.rank is None else str(e.rank), "team": e.team, "submission": e.submission,
            "kind": e.kind, "submitted_at": _time(e.submitted_at), "final": "yes" if e.final else "",
            "status": e.status, "public_accuracy": _fmt(e.public, 4),
            "private_accuracy": _fmt(e.private, 4) if reveal_private else "",
            "flops": "" if e.flops is None else f"{e.flops:.0f}", "relative_flops": _fmt(e.relative_flops, 3),
            "latency_ms": _fmt(e.latency_ms, 3), "relative_latency": _fmt(e.relative_latency, 2),
            "reason": e.reason, "note": e.note}


def to_csv(board: Board) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for e in board.entries:
        writer.writerow(row_values(e, board.reveal_private))
    return buf.getvalue()


def check_out_dir(out: Path, force: bool, submissions=()) -> None:
    """Refuse an ``out`` that is a file, a submission (or inside one), or a non-empty folder that
    this command did not write (without ``force``)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not a folder")
    resolved = out.resolve()
    for s in submissions:
        s = Path(s).resolve()
        if (s / SPEC_FILE).is_file() and (resolved == s or s in resolved.parents):
            raise ValueError(f"--out {out}: is inside submission {s}; writing there would change the submission")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file() and not force:
        raise ValueError(f"--out {out}: holds files that labkit leaderboard did not write; choose an empty or new "
                         "folder, or pass --force to write leaderboard.csv and leaderboard.html there")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write(board: Board, out: Path, force: bool = False) -> list[Path]:
    from .leaderboard_html import to_html

    out = Path(out)
    check_out_dir(out, force)
    texts = {"leaderboard.csv": to_csv(board), "leaderboard.html": to_html(board)}   # everything before writing
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).is_file():
        _atomic_write(out / MARKER, "written by labkit leaderboard; it replaces leaderboard.csv and .html here\n")
    written = []
    for name, text in texts.items():
        _atomic_write(out / name, text)
        written.append(out / name)
    return written


def leaderboard_cli(args) -> int:
    out = Path(args.out)
    entries, _ = discover(args.submissions, out)
    check_out_dir(out, args.force, [e.path for e in entries] + list(args.reference or []))
    tolerance = None if args.latency_tolerance is not None and args.latency_tolerance < 0 else args.latency_tolerance
    board = build(args.submissions, hidden=args.hidden, sha256=args.hidden_sha256, out_dir=out, reveal_private=args.reveal_private,
                  jobs=args.jobs, daily_cap=args.daily_cap, references=args.reference or [],
                  latency_repeats=args.latency_repeats, latency_tolerance=tolerance, device=args.device)
    written = write(board, out, force=args.force)
    counts = {}
    for e in board.entries:
        counts[e.status] = counts.get(e.status, 0) + 1
    ranked = sum(e.rank is not None for e in board.entries)
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    print(f"labkit leaderboard: {len(board.entries)} submissions ({summary}), {ranked} teams ranked "
          f"by {'private' if board.reveal_private else 'public'} score -> {', '.join(map(str, written))}")
    return 0

