"""The gradebook of a class: who handed in which lab, points per question, totals, summaries, feedback.

It is built from the per-submission result dicts of ``labkit.grading.grade.grade`` (``{"student",
"notebook", "results": {qid: {"points", "max_points", ...}}, "error", "notes"}``), each with the path
of its file, and written by ``write`` into the ``--out`` folder of ``labkit grade``:

    gradebook.csv                one row per student: points per question per lab, lab totals, total
    grades.csv                   one row per graded file (duplicates included), as graded
    report.md                    per-lab summaries, and every file or student that needs a look
    histograms/LAB.png           the distribution of the lab's totals
    feedback/STUDENT/LAB.md      what each student gets back

Students are named by their files: nbgrader's ``STUDENT/LAB.ipynb`` (also ``STUDENT/LAB/LAB.ipynb``,
nbgrader's submitted folder with assignments named after labs) or a flat ``STUDENT_LAB.ipynb``; with a
roster (``read_roster``), a file belongs to the roster student whose id or file-name alias it carries.

Totals are only ever compared within one lab (the same maximum): a student's overall total sums the
labs of the gradebook with a missing lab counting 0, so every row has the same maximum.
"""
from __future__ import annotations

import csv
import io
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

SEPARATORS = "_-. "


# ----------------------------------------------------------------------------------------------
# Who is this?


@dataclass(frozen=True)
class RosterEntry:
    id: str
    name: str = ""
    aliases: tuple[str, ...] = ()


_ID_COLUMNS = ("id", "student", "student_id", "username")
_ALIAS_COLUMNS = ("aliases", "alias", "files")


def read_roster(path: str | Path) -> list[RosterEntry]:
    """A class roster from a CSV file with a header: ``id`` (or ``student``), ``name`` (optional) and
    ``aliases`` (optional: other names the student's files carry, separated by ``;`` or spaces).

    Raises ValueError naming the file and line for an empty or repeated id, or an alias claimed by two
    students; FileNotFoundError for a missing file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"roster {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"roster {path}: cannot read it ({e})") from None
    reader = csv.DictReader(io.StringIO(text))
    header = {(h or "").strip().lower(): h for h in reader.fieldnames or []}
    id_col = next((header[c] for c in _ID_COLUMNS if c in header), None)
    if id_col is None:
        raise ValueError(f"roster {path}: no student id column (the header needs one of {', '.join(_ID_COLUMNS)}; "
                         f"it has {', '.join(map(repr, reader.fieldnames or [])) or 'nothing'})")
    name_col = header.get("name")
    alias_col = next((header[c] for c in _ALIAS_COLUMNS if c in header), None)
    entries: list[RosterEntry] = []
    owner: dict[str, str] = {}  # every id and alias, lower-cased -> the id it belongs to
    for line, row in enumerate(reader, start=2):
        sid = (row.get(id_col) or "").strip()
        if not sid:
            if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue  # a blank line
            raise ValueError(f"roster {path}, line {line}: empty student id")
        aliases = tuple(a for a in re.split(r"[;\s]+", (row.get(alias_col) or "") if alias_col else "") if a)
        for key in (sid, *aliases):
            other = owner.get(key.lower())
            if other is not None and not (other == sid and key != sid):
                what = "student id" if key == sid else "alias"
                raise ValueError(f"roster {path}, line {line}: {what} {key!r} is already "
                                 + ("listed" if other == sid else f"used by student {other!r}"))
            owner[key.lower()] = sid
        entries.append(RosterEntry(sid, (row.get(name_col) or "").strip() if name_col else "", aliases))
    if not entries:
        raise ValueError(f"roster {path}: no students in it")
    return entries


def path_candidates(path: str | Path, lab: str, labs: Iterable[str] = ()) -> list[str]:
    """Names a submission's path may give its student, most specific first.

    ``alice_00_welcome.ipynb`` -> ["alice", ...]; ``alice/00_welcome.ipynb`` -> ["alice", ...]; then the
    file's stem and the folders above it (a roster picks the first one it knows).
    """
    path = Path(path)
    names = sorted({lab, *labs}, key=len, reverse=True)
    stem = path.stem
    out: list[str] = []
    if stem in names:  # nbgrader: STUDENT/LAB.ipynb, or STUDENT/LAB/LAB.ipynb
        parents = [p.name for p in Path(os.path.abspath(path)).parents if p.name]
        while parents and parents[0] in names:
            parents.pop(0)
        out += parents[:1]
    else:
        for name in names:
            if stem.endswith(name) and stem[: -len(name)].rstrip(SEPARATORS) and stem[-len(name) - 1] in SEPARATORS:
                out.append(stem[: -len(name)].rstrip(SEPARATORS))  # flat: STUDENT_LAB.ipynb
                break
            if stem.startswith(name) and stem[len(name):].lstrip(SEPARATORS) and stem[len(name)] in SEPARATORS:
                out.append(stem[len(name):].lstrip(SEPARATORS))  # LAB_STUDENT.ipynb
                break
        out.append(stem)
    out += [p.name for p in Path(os.path.abspath(path)).parents if p.name][:3]
    return list(dict.fromkeys(out))


def student_from_path(path: str | Path, lab: str, labs: Iterable[str] = ()) -> str:
    """The student a submission's path names (see ``path_candidates``): the first candidate."""
    return path_candidates(path, lab, labs)[0]


class Identifier:
    """``ident(path, lab)`` -> (student id, on the roster): the first of the path's candidates that is a
    roster id or alias (any case), else the first candidate (on the roster: False; True without one)."""

    def __init__(self, roster: list[RosterEntry] | None = None, labs: Iterable[str] = ()):
        self.roster = list(roster or [])
        self.labs = list(labs)
        self.lookup = {}
        for e in self.roster:
            for key in (e.id, *e.aliases):
                self.lookup[key.lower()] = e.id

    def __call__(self, path: str | Path, lab: str) -> tuple[str, bool]:
        candidates = path_candidates(path, lab, self.labs)
        for c in candidates:
            if c.lower() in self.lookup:
                return self.lookup[c.lower()], True
        return candidates[0], not self.roster


def find_submissions(items: list[str], out: str | Path) -> list[Path]:
    """The notebooks to grade: each file as given, each folder's ``*.ipynb`` (recursively, sorted; hidden
    folders such as .ipynb_checkpoints and the ``out`` folder skipped). ValueError names missing paths."""
    out_dir = Path(out).resolve()
    missing = [i for i in items if not Path(i).exists()]
    if missing:
        raise ValueError(f"no such submission: {', '.join(missing)}")
    paths: list[Path] = []
    for item in map(Path, items):
        if not item.is_dir():
            paths.append(item)
            continue
        found = [p for p in sorted(item.rglob("*.ipynb"))
                 if not any(part.startswith(".") for part in p.relative_to(item).parts)
                 and out_dir not in p.resolve().parents]
        if not found:
            raise ValueError(f"no notebooks (*.ipynb) in the folder {item}")
        paths += found
    return list(dict.fromkeys(paths))


# ----------------------------------------------------------------------------------------------
# The gradebook


@dataclass
class Entry:
    """One graded file: its student, lab, path and result dict."""
    student: str
    lab: str
    path: str
    result: dict

    @property
    def total(self) -> float:
        return round(sum(float(r["points"]) for r in self.result["results"].values()), 2)


@dataclass
class LabSummary:
    lab: str
    max_points: float
    totals: list[float]  # one per counted submission

    @property
    def n(self) -> int:
        return len(self.totals)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.totals) if self.totals else None

    @property
    def median(self) -> float | None:
        return statistics.median(self.totals) if self.totals else None


@dataclass
class Gradebook:
    students: dict[str, str]  # id -> name (empty without a roster), in row order
    labs: dict[str, list[tuple[str, float]]]  # lab -> [(qid, max points)], in bank order
    counted: dict[tuple[str, str], Entry]  # (student, lab) -> the one submission that counts
    entries: list[Entry]  # every graded file
    duplicates: dict[tuple[str, str], list[Entry]] = field(default_factory=dict)
    not_on_roster: list[Entry] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # files that could not be graded: "path: why"
    roster: bool = False

    def lab_max(self, lab: str) -> float:
        return round(sum(m for _, m in self.labs[lab]), 2)

    @property
    def max_total(self) -> float:
        return round(sum(self.lab_max(lab) for lab in self.labs), 2)

    def total(self, student: str) -> float:
        return round(sum(self.counted[(student, lab)].total for lab in self.labs if (student, lab) in self.counted), 2)

    def missing(self) -> list[tuple[str, list[str]]]:
        """[(student, labs)] of students without a counted submission of some lab (duplicates aside)."""
        out = []
        for s in self.students:
            labs = [lab for lab in self.labs if (s, lab) not in self.counted and (s, lab) not in self.duplicates]
            if labs:
                out.append((s, labs))
        return out

    def summaries(self) -> list[LabSummary]:
        return [LabSummary(lab, self.lab_max(lab), [e.total for (s, lb), e in self.counted.items() if lb == lab])
                for lab in self.labs]

    def notices(self) -> list[str]:
        """One line per thing an instructor must look at: unknown files, duplicates, missing work, failures."""
        lines = [f"could not grade {p}" for p in self.problems]
        for (s, lab), dup in self.duplicates.items():
            files = ", ".join(f"{e.path} ({_pts(e.total)} points)" for e in dup)
            lines.append(f"{s} handed in {lab} {len(dup)} times ({files}): none of them is counted; "
                         f"keep one and grade again")
        for e in self.not_on_roster:
            lines.append(f"{e.path}: student {e.student!r} is not on the roster (counted under that name)")
        for s, labs in self.missing():
            lines.append(f"{s}: no submission of {', '.join(labs)}")
        for e in self.entries:
            error = e.result.get("error")
            if error and not any(error in p for p in self.problems):  # grade() names its own failures
                lines.append(f"{e.path}: grading failed ({error}); scored 0")
        return lines


def build(graded: list[tuple[str | Path, dict]], roster: list[RosterEntry] | None = None,
          problems: Iterable[str] = (), labs: Iterable[str] = ()) -> Gradebook:
    """A gradebook from ``[(path, result dict)]``; ``labs``: every lab name (helps read file names)."""
    known_labs = list(dict.fromkeys([*labs, *(g["notebook"] for _, g in graded)]))
    ident = Identifier(roster, known_labs)
    students: dict[str, str] = {e.id: e.name for e in roster or []}
    lab_questions: dict[str, dict[str, float]] = {}
    entries, not_on_roster = [], []
    for path, g in graded:
        student, known = ident(path, g["notebook"])
        entry = Entry(student, g["notebook"], str(path), g)
        entries.append(entry)
        if not known:
            not_on_roster.append(entry)
        students.setdefault(student, "")
        qs = lab_questions.setdefault(entry.lab, {})
        for qid, r in g["results"].items():
            qs.setdefault(qid, round(float(r["max_points"]), 2))
    by_key: dict[tuple[str, str], list[Entry]] = {}
    for e in entries:
        by_key.setdefault((e.student, e.lab), []).append(e)
    counted = {k: v[0] for k, v in by_key.items() if len(v) == 1}
    duplicates = {k: v for k, v in by_key.items() if len(v) > 1}
    if not roster:
        students = dict(sorted(students.items()))
    return Gradebook(students, {lab: list(qs.items()) for lab, qs in sorted(lab_questions.items())}, counted,
                     entries, duplicates, not_on_roster, list(problems), bool(roster))


# ----------------------------------------------------------------------------------------------
# Writing it


def _pts(x: float | None) -> str:
    return "" if x is None else f"{round(float(x), 2):g}"


def safe_name(name: str) -> str:
    """A file-system-safe version of a student id or lab name (no separators, no leading dot)."""
    name = re.sub(r"[^\w@+.-]", "_", name).lstrip(".")
    return name or "_"


def default_feedback(entry: Entry) -> str:
    """A plain feedback file from the result dict alone (``labkit grade`` passes a richer one)."""
    res = entry.result["results"]
    lines = [f"# Feedback: {entry.student} ({entry.lab})", "",
             f"**Total: {_pts(entry.total)} / {_pts(sum(r['max_points'] for r in res.values()))} points**", ""]
    for qid, r in res.items():
        message = f": {r['message']}" if r.get("message") else ""
        lines.append(f"- {qid}: {_pts(r['points'])} / {_pts(r['max_points'])}{message}")
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> None:
    """Write a whole file or leave the old one (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8", newline="")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _csv(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def gradebook_rows(book: Gradebook) -> list[list]:
    """gradebook.csv: a header, then one row per student (blank cells: no counted submission of that lab)."""
    header = ["student", "name"]
    for lab, qs in book.labs.items():
        header += [f"{lab}/{qid}" for qid, _ in qs] + [f"{lab}/total"]
    header += ["total", "max", "missing", "duplicate"]
    rows = [header]
    for s, name in book.students.items():
        row = [s, name]
        for lab, qs in book.labs.items():
            e = book.counted.get((s, lab))
            res = e.result["results"] if e else {}
            row += [_pts(res[q]["points"]) if q in res else "" for q, _ in qs] + [_pts(e.total) if e else ""]
        missing = [lab for lab in book.labs if (s, lab) not in book.counted and (s, lab) not in book.duplicates]
        dup = [lab for lab in book.labs if (s, lab) in book.duplicates]
        rows.append(row + [_pts(book.total(s)), _pts(book.max_total), " ".join(missing), " ".join(dup)])
    return rows


def grades_rows(book: Gradebook) -> list[list]:
    """grades.csv: one row per graded file, duplicates included."""
    qcols = [q for qs in book.labs.values() for q, _ in qs]
    rows = [["student", "notebook", *qcols, "total", "max", "file"]]
    for e in book.entries:
        res = e.result["results"]
        rows.append([e.student, e.lab, *(_pts(res[q]["points"]) if q in res else "" for q in qcols),
                     _pts(e.total), _pts(book.lab_max(e.lab)), e.path])
    return rows


def histogram(summary: LabSummary, path: Path) -> Path:
    """A PNG histogram of one lab's totals on the 0..max axis (matplotlib's Agg canvas, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5, 3), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    top = summary.max_points or 1.0
    bins = max(1, min(20, int(round(top)) if top >= 1 else 1))
    ax.hist(summary.totals, bins=bins, range=(0, top), color="#4c72b0", edgecolor="white")
    ax.set_xlim(0, top)
    ax.set_xlabel(f"points (of {_pts(top)})")
    ax.set_ylabel("submissions")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    mean = "" if summary.mean is None else f", mean {summary.mean:.2f}"
    ax.set_title(f"{summary.lab}: n={summary.n}{mean}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, format="png")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def report_markdown(book: Gradebook, histograms: dict[str, str]) -> str:
    n_files = len(book.entries)
    lines = ["# Gradebook report", "",
             f"{len(book.students)} student(s), {n_files} graded file(s), {len(book.problems)} file(s) not graded"
             + (", students from the roster" if book.roster else ", students named by their files") + ".", "",
             "## Labs", "",
             "Totals are compared within a lab only (the same maximum). A duplicate is not counted.", "",
             "| lab | max points | n | mean | median | min | max | histogram |", "|---|---|---|---|---|---|---|---|"]
    for s in book.summaries():
        lo = min(s.totals) if s.totals else None
        hi = max(s.totals) if s.totals else None
        mean = "" if s.mean is None else f"{s.mean:.2f}"
        lines.append(f"| {s.lab} | {_pts(s.max_points)} | {s.n} | {mean} | {_pts(s.median)} | {_pts(lo)} | {_pts(hi)} "
                     f"| ![{s.lab}]({histograms[s.lab]}) |")
    for lab, qs in book.labs.items():
        lines += ["", f"### {lab}: mean points per question", "", "| question | max | mean |", "|---|---|---|"]
        for qid, mx in qs:
            pts = [e.result["results"][qid]["points"] for (s, lb), e in book.counted.items()
                   if lb == lab and qid in e.result["results"]]
            mean = f"{statistics.fmean(pts):.2f}" if pts else ""
            lines.append(f"| {qid} | {_pts(mx)} | {mean} |")
    lines += ["", f"Overall total: of {_pts(book.max_total)} points for every student (the sum of the labs above; "
                  "a missing lab counts 0).", ""]
    notices = book.notices()
    lines += ["## Needs a look", ""]
    lines += [f"- {n}" for n in notices] if notices else ["Nothing: every file was graded and counted."]
    return "\n".join(lines) + "\n"


def write(book: Gradebook, out: str | Path, feedback: Callable[[Entry], str] = default_feedback) -> dict[str, Path]:
    """Write the gradebook's files into ``out`` (see the module docstring); return {kind: path}."""
    out = Path(out)
    paths = {"gradebook": out / "gradebook.csv", "grades": out / "grades.csv", "report": out / "report.md",
             "feedback": out / "feedback", "histograms": out / "histograms"}
    _write_text(paths["gradebook"], _csv(gradebook_rows(book)))
    _write_text(paths["grades"], _csv(grades_rows(book)))
    hist = {}
    for s in book.summaries():
        p = histogram(s, paths["histograms"] / f"{safe_name(s.lab)}.png")
        hist[s.lab] = p.relative_to(out).as_posix()
    by_key: dict[tuple[str, str], list[Entry]] = {}
    for e in book.entries:
        by_key.setdefault((e.student, e.lab), []).append(e)
    used: set[Path] = set()
    for (student, lab), group in by_key.items():
        folder = paths["feedback"] / safe_name(student)
        for e in group:
            # a duplicate gets one file per submission, named after it: nothing graded is dropped
            name = safe_name(lab) + (f"__{safe_name(Path(e.path).stem)}" if len(group) > 1 else "")
            target, n = folder / f"{name}.md", 2
            while target in used:  # two ids that differ only in characters safe_name replaces
                target, n = folder / f"{name}-{n}.md", n + 1
            used.add(target)
            _write_text(target, feedback(e))
    _write_text(paths["report"], report_markdown(book, hist))
    return paths
