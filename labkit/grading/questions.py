"""Questions, the registry every bank module fills, and ``check`` (what a test cell calls).

A question names the student's function, its points and its test cases; a test case is a
``(name, case_fn)`` pair where ``case_fn(student_fn)`` raises ``CheckFailure`` on a wrong answer.
``check`` runs the cases one by one, each isolated (a crash fails that case only), each with the
random number generators seeded the same way and restored afterwards, and prints one line per case.
"""
from __future__ import annotations

import importlib
import linecache
import os
import pkgutil
import random
import sys
import sysconfig
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .expect import CheckFailure

Case = tuple  # (name: str, case_fn: Callable[[student_fn], None])

_LABKIT_DIR = str(Path(__file__).resolve().parents[1])  # .../labkit
_REGISTRY: dict[str, "Question"] = {}
_BANK_ERRORS: dict[str, str] = {}  # bank module -> "ImportError: ..." for banks that failed to import
_BANKS_LOADED = False


@dataclass
class Question:
    """One graded exercise: the student's ``function`` is tested by the ``visible`` and ``hidden`` cases.

    id: "topic.name", unique across the kit; notebook: the notebook's stem, e.g. "01_ensembling";
    function: the name the student's answer has in the notebook (usually a function; any object works,
    the cases receive it); points: what the question is worth, shared in proportion to passed cases.
    """
    id: str
    notebook: str
    function: str
    points: float
    visible: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    description: str = ""
    module: str = ""  # filled by register(): the bank module that declared it

    def cases(self, hidden: bool = False) -> list[tuple[str, Callable, bool]]:
        """[(name, case_fn, is_hidden)]: the visible cases, then (with hidden=True) the hidden ones."""
        out = [(n, f, False) for n, f in self.visible]
        if hidden:
            out += [(n, f, True) for n, f in self.hidden]
        return out


def _validate(q: Question) -> None:
    if not isinstance(q.id, str) or "." not in q.id or q.id.strip() != q.id:
        raise ValueError(f"Question id {q.id!r} must look like 'topic.name' (no spaces around it)")
    if not isinstance(q.notebook, str) or not q.notebook or q.notebook.endswith(".ipynb"):
        raise ValueError(f"Question {q.id}: notebook {q.notebook!r} must be a notebook stem like '01_ensembling'")
    if not isinstance(q.function, str) or not q.function.isidentifier():
        raise ValueError(f"Question {q.id}: function {q.function!r} must be a Python identifier")
    if not isinstance(q.points, (int, float)) or isinstance(q.points, bool) or q.points <= 0:
        raise ValueError(f"Question {q.id}: points must be a positive number, got {q.points!r}")
    if not q.visible:
        raise ValueError(f"Question {q.id}: needs at least one visible case (students must see what is tested)")
    for kind, cases in (("visible", q.visible), ("hidden", q.hidden)):
        names = []
        for case in cases:
            if not (isinstance(case, tuple) and len(case) == 2 and isinstance(case[0], str) and callable(case[1])):
                raise ValueError(f"Question {q.id}: each {kind} case must be a (name, case_fn) tuple, got {case!r}")
            names.append(case[0])
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"Question {q.id}: duplicate {kind} case names {sorted(dup)}")


def register(question: Question) -> Question:
    """Add a question to the registry (bank modules call this at import time); returns it."""
    if not isinstance(question, Question):
        raise TypeError(f"register() takes a Question, got {type(question).__name__}")
    _validate(question)
    caller = sys._getframe(1).f_globals.get("__name__", "")
    question.module = question.module or caller
    old = _REGISTRY.get(question.id)
    if old is not None and old.module != question.module:
        raise ValueError(f"Question id {question.id!r} is declared twice: in {old.module} and in {question.module}")
    _REGISTRY[question.id] = question  # same module again (a reload): the new declaration wins
    return question


def load_banks() -> dict[str, str]:
    """Import every module in labkit/grading/bank/ once; return {module: error} for those that failed.

    A broken bank module does not take the others down: its error is remembered, warned about, and
    named when one of its questions is asked for.
    """
    global _BANKS_LOADED
    if _BANKS_LOADED:
        return dict(_BANK_ERRORS)
    _BANKS_LOADED = True
    from . import bank

    for info in sorted(pkgutil.iter_modules(bank.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        name = f"{bank.__name__}.{info.name}"
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - report and carry on with the other banks
            _BANK_ERRORS[name] = f"{type(e).__name__}: {e}"
            warnings.warn(f"labkit.grading: question bank {name} failed to import ({type(e).__name__}: {e})",
                          RuntimeWarning, stacklevel=2)
    return dict(_BANK_ERRORS)


def all_questions() -> dict[str, Question]:
    """Every registered question by id (loads the banks first)."""
    load_banks()
    return dict(_REGISTRY)


def notebooks() -> list[str]:
    """The notebook stems that have at least one question."""
    return sorted({q.notebook for q in all_questions().values()})


def questions_for(notebook: str) -> list[Question]:
    """The questions of one notebook (stem, e.g. "00_welcome"; a path or .ipynb name also works), in bank order."""
    stem = Path(notebook).stem if notebook.endswith(".ipynb") else notebook
    return [q for q in all_questions().values() if q.notebook == stem]


class UnknownQuestion(LookupError):
    def __str__(self) -> str:  # LookupError would repr() the message; print it as written
        return str(self.args[0])


def get_question(qid: str) -> Question:
    """The question with this id, or UnknownQuestion listing the ids that do exist nearby."""
    questions = all_questions()
    if qid in questions:
        return questions[qid]
    topic = qid.split(".")[0] if isinstance(qid, str) else ""
    same_topic = sorted(k for k in questions if k.split(".")[0] == topic)
    lines = [f"unknown question id {qid!r}."]
    if same_topic:
        notebook = questions[same_topic[0]].notebook
        known = [q.id for q in questions_for(notebook)]
        lines.append(f"Known ids of notebook {notebook}: {', '.join(known)}")
    else:
        by_nb: dict[str, list[str]] = {}
        for q in questions.values():
            by_nb.setdefault(q.notebook, []).append(q.id)
        lines.append("Known ids: " + ("; ".join(f"{nb}: {', '.join(ids)}" for nb, ids in sorted(by_nb.items()))
                                     or "none"))
    if _BANK_ERRORS:
        lines.append("These question banks failed to import: "
                     + "; ".join(f"{m} ({e})" for m, e in sorted(_BANK_ERRORS.items())))
    raise UnknownQuestion("\n".join(lines))


# ----------------------------------------------------------------------------------------------
# Running cases


@dataclass
class CaseResult:
    name: str
    status: str  # "pass" | "fail" | "error" (the answer raised) | "todo" (NotImplementedError)
    message: str = ""
    hidden: bool = False

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def line(self) -> str:
        mark = "✓" if self.passed else "✗"
        tag = " [hidden]" if self.hidden else ""
        return f"{mark} {self.name}{tag}" + (f": {self.message}" if self.message else "")


@dataclass
class CheckResult:
    """What ``check`` found: per-case results, the passed count and the points earned."""
    qid: str
    max_points: float
    cases: list[CaseResult]
    hidden: bool = False

    @property
    def passed(self) -> int:
        return sum(c.passed for c in self.cases)

    @property
    def total(self) -> int:
        return len(self.cases)

    @property
    def ok(self) -> bool:
        return self.passed == self.total

    @property
    def points(self) -> float:
        """Points in proportion to the passed cases, rounded to 2 decimals."""
        return round(self.max_points * self.passed / self.total, 2) if self.total else 0.0

    def summary(self) -> str:
        scope = "cases (visible + hidden)" if self.hidden else "visible cases"
        if self.cases and all(c.status == "todo" for c in self.cases):
            head = f"✗ {self.qid}: not implemented yet, 0/{self.total} {scope} passed"
        else:
            head = f"{'✓' if self.ok else '✗'} {self.qid}: {self.passed}/{self.total} {scope} passed"
        if self.hidden:
            head += f", {_pts(self.points)}/{_pts(self.max_points)} points"
        return head

    def verdict(self) -> str:
        """The text check() prints: a summary line, then one line per case (none when not started)."""
        lines = [self.summary()]
        if not all(c.status == "todo" for c in self.cases):
            lines += ["  " + c.line() for c in self.cases]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"qid": self.qid, "passed": self.passed, "total": self.total, "points": self.points,
                "max_points": self.max_points,
                "cases": [{"name": c.name, "status": c.status, "message": c.message, "hidden": c.hidden}
                          for c in self.cases]}

    def __repr__(self) -> str:
        return f"CheckResult({self.qid!r}, passed={self.passed}/{self.total}, points={self.points}/{self.max_points})"

    def _ipython_display_(self) -> None:
        """check() has printed the verdict already; showing the result again would only repeat it."""


def _pts(x: float) -> str:
    return f"{x:g}"


def _library_dirs() -> tuple[str, ...]:
    paths = {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return tuple(str(Path(p).resolve()) for p in paths if p) + (_LABKIT_DIR,)


_LIB_DIRS = _library_dirs()


def _is_student_frame(filename: str) -> bool:
    if filename.startswith("<frozen") or filename.startswith("<string"):
        return False
    try:
        resolved = str(Path(filename).resolve())
    except (OSError, ValueError):
        resolved = filename
    return not resolved.startswith(_LIB_DIRS)


def _first_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).strip().split("\n")[0].split()) if text else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def summarise_exception(exc: BaseException, case_fn: Callable | None = None) -> str:
    """One line about an exception raised while running a case: its type, message and the student's line.

    The student's line is the deepest frame outside the standard library, the installed packages,
    labkit itself and the case function (``case_fn``, wherever it is defined).
    """
    kind = type(exc).__name__
    msg = _first_line(str(exc))
    case_code = getattr(case_fn, "__code__", None)
    frames = []
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        code = frame.f_code
        student = code is not case_code and _is_student_frame(code.co_filename)
        frames.append((code.co_filename, lineno, code.co_name, student))
    student = [f for f in frames if f[3]]
    if student:
        filename, lineno, name, _ = student[-1]
        line = linecache.getline(filename, lineno).strip()
        code = f" `{line}`" if line else ""
        return f"your code raised {kind}: {msg} (line {lineno} in {name}:{code})"
    where = f" in {Path(frames[-1][0]).name} line {frames[-1][1]}" if frames else ""
    return (f"checking your answer raised {kind}: {msg}{where}; "
            f"does your function return the right kind of value?")


class _SeededRNG:
    """Seed torch, NumPy and random for one case and restore the notebook's generators afterwards."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def __enter__(self):
        import torch

        self._fork = torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))
                                           if torch.cuda.is_initialized() else [])
        self._fork.__enter__()
        self._np, self._py = np.random.get_state(), random.getstate()
        torch.manual_seed(self.seed)
        np.random.seed(self.seed)
        random.seed(self.seed)
        return self

    def __exit__(self, *exc):
        np.random.set_state(self._np)
        random.setstate(self._py)
        return self._fork.__exit__(*exc)


def run_case(name: str, case_fn: Callable, student_fn, hidden: bool = False) -> CaseResult:
    """Run one case; every failure mode becomes a CaseResult (KeyboardInterrupt still propagates)."""
    try:
        with _SeededRNG(0):
            case_fn(student_fn)
    except CheckFailure as e:
        return CaseResult(name, "fail", _first_line(str(e), 400) or "wrong answer", hidden)
    except NotImplementedError as e:
        msg = _first_line(str(e))
        return CaseResult(name, "todo", "not implemented yet" + (f" ({msg})" if msg else ""), hidden)
    except RecursionError as e:
        return CaseResult(name, "error", f"your code raised RecursionError: {_first_line(str(e))}", hidden)
    except Exception as e:  # noqa: BLE001 - the student's crash costs this case only
        return CaseResult(name, "error", summarise_exception(e, case_fn), hidden)
    return CaseResult(name, "pass", "", hidden)


def run_question(qid: str, fn, hidden: bool = False) -> CheckResult:
    """Run a question's cases on ``fn`` without printing (``check`` prints; the grader serialises)."""
    q = get_question(qid)
    cases = [run_case(n, f, fn, h) for n, f, h in q.cases(hidden)]
    return CheckResult(q.id, q.points, cases, hidden)


def check(qid: str, fn, hidden: bool = False, strict: bool | None = None) -> CheckResult:
    """Run question ``qid``'s visible cases (and hidden ones with ``hidden=True``) on ``fn``; print a verdict.

    Never raises for a wrong or crashing answer: it prints one line per case (expected vs got, shapes,
    dtypes, the largest error and where, the tolerance; or the exception and the student's line) and
    returns a CheckResult (``.passed``, ``.total``, ``.points``). Set ``LABKIT_CHECK_STRICT=1`` to make a
    failed check raise after printing (for nbgrader's autograder, which scores a test cell by whether it
    raises). An unknown ``qid`` raises UnknownQuestion listing the known ids.

    ``strict`` (default: ``hidden``): a failed check raises CheckFailure (an AssertionError) after
    printing, so the hidden test cells score 0 under nbgrader's autograder for a wrong answer.
    """
    strict = hidden if strict is None else strict
    result = run_question(qid, fn, hidden)
    print(result.verdict())
    if not result.ok and (strict or os.environ.get("LABKIT_CHECK_STRICT", "") not in ("", "0")):
        raise CheckFailure(f"{qid}: {result.passed}/{result.total} cases passed")
    return result
