"""Questions, the registry every bank module fills, and ``check`` (what a test cell calls).

A question names the student's function, its points, its case groups and its test cases; a test case
is a ``(name, case_fn)`` or ``(name, case_fn, group)`` tuple where ``case_fn(student_fn)`` raises
``CheckFailure`` on a wrong answer. ``check`` runs the cases one by one, each isolated (a crash fails
that case only), each with the random number generators seeded the same way and restored afterwards,
and prints one line per case.

Where cases live: the visible cases are in the package (``labkit/grading/bank/``: students see them
anyway, and their expected values are literal data, never a reference implementation); the hidden
cases and the float64 references are in the *instructor bank*, a folder outside the package
(``instructor/bank/`` of the repository, or ``LABKIT_BANK``, or ``labkit grade --bank DIR``), whose
modules call ``add_hidden``. Without that folder only the visible cases exist.

Scoring (``score_cases``): the cases of a question are split into groups; the first group declared is
the *core* group. A group counts only when every one of its cases passes, and the other groups count
only when the core group passes; the points are shared among groups in proportion to their weights.
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
from typing import Callable, NamedTuple

import numpy as np

from .expect import CheckFailure

Case = tuple  # (name: str, case_fn: Callable[[student_fn], None][, group: str])
CORE = "core"

_LABKIT_DIR = str(Path(__file__).resolve().parents[1])  # .../labkit
_REGISTRY: dict[str, "Question"] = {}
_BANK_ERRORS: dict[str, str] = {}  # bank module -> "ImportError: ..." for banks that failed to import
_BANKS_LOADED = False
_INSTRUCTOR_BANK: Path | None = None  # the instructor bank folder loaded into this process, if any
_INSTRUCTOR_MODULE = "labkit_instructor_bank"


class CaseSpec(NamedTuple):
    name: str
    fn: Callable
    hidden: bool
    group: str


@dataclass
class Question:
    """One graded exercise: the student's ``function`` is tested by the ``visible`` and ``hidden`` cases.

    id: "topic.name", unique across the kit; notebook: the notebook's stem, e.g. "01_ensembling";
    function: the name the student's answer has in the notebook (usually a function; any object works,
    the cases receive it); points: what the question is worth (see ``score_cases``);
    groups: {group: weight}, the first one is the core group that must pass before the others count;
    implemented_by: dotted names of the functions (kit or library) that answer the exercise: an answer
    that calls or wraps one of them is graded 0 ("this exercise asks you to write it").
    """
    id: str
    notebook: str
    function: str
    points: float
    visible: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    description: str = ""
    module: str = ""  # filled by register(): the bank module that declared it
    groups: dict = field(default_factory=lambda: {CORE: 1.0})
    implemented_by: list = field(default_factory=list)

    def cases(self, hidden: bool = False) -> list[CaseSpec]:
        """[CaseSpec(name, case_fn, is_hidden, group)]: the visible cases, then (hidden=True) the hidden ones."""
        core = next(iter(self.groups))
        out = [CaseSpec(c[0], c[1], False, c[2] if len(c) > 2 else core) for c in self.visible]
        if hidden:
            out += [CaseSpec(c[0], c[1], True, c[2] if len(c) > 2 else core) for c in self.hidden]
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
    if not (isinstance(q.groups, dict) and q.groups and all(isinstance(g, str) and isinstance(w, (int, float))
                                                            and w > 0 for g, w in q.groups.items())):
        raise ValueError(f"Question {q.id}: groups must be a non-empty {{name: positive weight}} dict, "
                         f"got {q.groups!r}")
    if not (isinstance(q.implemented_by, (list, tuple)) and all(isinstance(n, str) and "." in n
                                                                for n in q.implemented_by)):
        raise ValueError(f"Question {q.id}: implemented_by must list dotted names such as "
                         f"'labkit.ensemble.linear_interpolate', got {q.implemented_by!r}")
    _validate_cases(q, "visible", q.visible)
    _validate_cases(q, "hidden", q.hidden)
    core = next(iter(q.groups))
    if not any((c[2] if len(c) > 2 else core) == core for c in q.visible):
        raise ValueError(f"Question {q.id}: the core group {core!r} needs a visible case "
                         f"(students must see the core idea)")


def _validate_cases(q: "Question", kind: str, cases: list) -> None:
    names = []
    for case in cases:
        if not (isinstance(case, tuple) and len(case) in (2, 3) and isinstance(case[0], str) and callable(case[1])):
            raise ValueError(f"Question {q.id}: each {kind} case must be a (name, case_fn[, group]) tuple, "
                             f"got {case!r}")
        if len(case) == 3 and case[2] not in q.groups:
            raise ValueError(f"Question {q.id}: {kind} case {case[0]!r} names group {case[2]!r}, "
                             f"not one of {list(q.groups)}")
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


def add_hidden(qid: str, cases: list) -> None:
    """Add hidden cases to a registered question (instructor bank modules call this at import time).

    ``cases``: (name, case_fn[, group]) tuples; a group must be one the question declares.
    """
    q = _REGISTRY.get(qid)
    if q is None:
        raise ValueError(f"add_hidden: no visible question {qid!r} is registered "
                         f"(known: {', '.join(sorted(_REGISTRY))})")
    new = list(cases)
    names = {c[0] for c in new if isinstance(c, tuple) and c}
    merged = [c for c in q.hidden if c[0] not in names] + new  # a reload replaces its own cases
    _validate_cases(q, "hidden", merged)
    q.hidden = merged


def default_instructor_bank() -> Path | None:
    """``LABKIT_BANK`` when set, else the repository's ``instructor/bank`` next to the package, if present."""
    env = os.environ.get("LABKIT_BANK", "")
    if env:
        return Path(env)
    here = Path(_LABKIT_DIR).parent / "instructor" / "bank"
    return here if here.is_dir() else None


def instructor_bank() -> Path | None:
    """The instructor bank loaded into this process (None: only the visible cases are known)."""
    load_banks()
    return _INSTRUCTOR_BANK


def load_instructor_bank(path: str | Path) -> Path:
    """Import every ``*.py`` of an instructor bank folder (hidden cases and references) once."""
    global _INSTRUCTOR_BANK
    load_banks(instructor=False)
    path = Path(path).resolve()
    if _INSTRUCTOR_BANK is not None:
        if _INSTRUCTOR_BANK != path:
            raise ValueError(f"an instructor bank is loaded already ({_INSTRUCTOR_BANK}); cannot also load {path}")
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"instructor bank {path}: no such folder")
    import importlib.util
    import types

    pkg = sys.modules.get(_INSTRUCTOR_MODULE) or types.ModuleType(_INSTRUCTOR_MODULE)
    pkg.__path__ = [str(path)]
    sys.modules[_INSTRUCTOR_MODULE] = pkg
    for file in sorted(path.glob("*.py")):
        if file.name.startswith("_"):
            continue
        name = f"{_INSTRUCTOR_MODULE}.{file.stem}"
        try:
            spec = importlib.util.spec_from_file_location(name, file)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - report and carry on with the other modules
            _BANK_ERRORS[str(file)] = f"{type(e).__name__}: {e}"
            warnings.warn(f"labkit.grading: instructor bank module {file} failed to import ({type(e).__name__}: {e})",
                          RuntimeWarning, stacklevel=2)
    _INSTRUCTOR_BANK = path
    return path


def load_banks(instructor: bool = True) -> dict[str, str]:
    """Import every module in labkit/grading/bank/ once (and the default instructor bank, when present);
    return {module: error} for those that failed.

    A broken bank module does not take the others down: its error is remembered, warned about, and
    named when one of its questions is asked for.
    """
    global _BANKS_LOADED
    if not _BANKS_LOADED:
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
    if instructor and _INSTRUCTOR_BANK is None and os.environ.get("LABKIT_GRADING_KERNEL") != "1":
        found = default_instructor_bank()
        if found is not None and found.is_dir():
            load_instructor_bank(found)
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
    status: str  # "pass" | "fail" | "error" (the answer raised) | "todo" (NotImplementedError) | "locked"
    message: str = ""
    hidden: bool = False
    group: str = CORE

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def line(self) -> str:
        mark = "✓" if self.passed else "✗"
        tag = " [hidden]" if self.hidden else ""
        return f"{mark} {self.name}{tag}" + (f": {self.message}" if self.message else "")


def score_cases(cases: list[CaseResult], groups: dict, max_points: float) -> float:
    """Points for a list of case results under the group policy (rounded to 2 decimals).

    A group counts when all its cases pass; nothing counts unless the core group (the first one
    declared) passes; counted groups share the points in proportion to their weights. Groups without a
    case in ``cases`` (e.g. hidden-only groups in a visible check) are left out of the share.
    """
    present = [g for g in groups if any(c.group == g for c in cases)]
    if not present:
        return 0.0
    ok = {g: all(c.passed for c in cases if c.group == g) for g in present}
    core = next(iter(groups))
    if core in ok and not ok[core]:
        return 0.0
    total = sum(float(groups[g]) for g in present)
    return round(max_points * sum(float(groups[g]) for g in present if ok[g]) / total, 2)


@dataclass
class CheckResult:
    """What ``check`` found: per-case results, the passed count and the points earned."""
    qid: str
    max_points: float
    cases: list[CaseResult]
    hidden: bool = False
    groups: dict = field(default_factory=lambda: {CORE: 1.0})
    message: str = ""  # why the question scored what it did beyond its cases (e.g. the answer-key lock)
    locked: bool = False  # the answer called a function that answers the exercise: 0 points

    @property
    def passed(self) -> int:
        return sum(c.passed for c in self.cases)

    @property
    def total(self) -> int:
        return len(self.cases)

    @property
    def ok(self) -> bool:
        return self.passed == self.total and not self.locked

    @property
    def points(self) -> float:
        """Points by case group (``score_cases``), 0 when the answer-key lock fired."""
        return 0.0 if self.locked else score_cases(self.cases, self.groups, self.max_points)

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
        if self.message:
            lines.append("  " + self.message)
        if not all(c.status == "todo" for c in self.cases):
            lines += ["  " + c.line() for c in self.cases]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"qid": self.qid, "passed": self.passed, "total": self.total, "points": self.points,
                "max_points": self.max_points, "locked": self.locked, "lock_message": self.message,
                "groups": dict(self.groups),
                "cases": [{"name": c.name, "status": c.status, "message": c.message, "hidden": c.hidden,
                           "group": c.group} for c in self.cases]}

    def __repr__(self) -> str:
        return f"CheckResult({self.qid!r}, passed={self.passed}/{self.total}, points={self.points}/{self.max_points})"

    def _ipython_display_(self) -> None:
        """check() has printed the verdict already; showing the result again would only repeat it."""


def _pts(x: float) -> str:
    return f"{x:g}"


def lock_message(names) -> str:
    """The feedback line of the answer-key lock."""
    names = sorted(set(names))
    return (f"this exercise asks you to write it; you called {', '.join(names)} (0 points for this question: "
            f"write the computation yourself)")


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
    if _INSTRUCTOR_BANK is not None and resolved.startswith(str(_INSTRUCTOR_BANK)):
        return False
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


def run_case(name: str, case_fn: Callable, student_fn, hidden: bool = False, group: str = CORE) -> CaseResult:
    """Run one case; every failure mode becomes a CaseResult (KeyboardInterrupt still propagates)."""
    try:
        with _SeededRNG(0):
            case_fn(student_fn)
    except CheckFailure as e:
        return CaseResult(name, "fail", _first_line(str(e), 400) or "wrong answer", hidden, group)
    except NotImplementedError as e:
        msg = _first_line(str(e))
        return CaseResult(name, "todo", "not implemented yet" + (f" ({msg})" if msg else ""), hidden, group)
    except RecursionError as e:
        return CaseResult(name, "error", f"your code raised RecursionError: {_first_line(str(e))}", hidden, group)
    except Exception as e:  # noqa: BLE001 - the student's crash costs this case only
        return CaseResult(name, "error", summarise_exception(e, case_fn), hidden, group)
    return CaseResult(name, "pass", "", hidden, group)


def run_question(qid: str, fn, hidden: bool = False) -> CheckResult:
    """Run a question's cases on ``fn`` in this process, without printing (``check`` prints).

    For trusted code only (the kit's tests, the instructor's own checks): ``labkit grade`` never calls
    a student's function in its own process (see ``labkit.grading.grade``).
    """
    q = get_question(qid)
    cases = [run_case(c.name, c.fn, fn, c.hidden, c.group) for c in q.cases(hidden)]
    return CheckResult(q.id, q.points, cases, hidden, dict(q.groups))


def check(qid: str, fn, hidden: bool = False, strict: bool | None = None) -> CheckResult:
    """Run question ``qid``'s visible cases (and hidden ones with ``hidden=True``) on ``fn``; print a verdict.

    Never raises for a wrong or crashing answer: it prints one line per case (expected vs got, shapes,
    dtypes, the largest error and where, the tolerance; or the exception and the student's line) and
    returns a CheckResult (``.passed``, ``.total``, ``.points``). Set ``LABKIT_CHECK_STRICT=1`` to make a
    failed check raise after printing (for nbgrader's autograder, which scores a test cell by whether it
    raises). An unknown ``qid`` raises UnknownQuestion listing the known ids.

    ``strict`` (default: ``hidden``): a failed check raises CheckFailure (an AssertionError) after
    printing, so the hidden test cells score 0 under nbgrader's autograder for a wrong answer.

    ``hidden=True`` needs the instructor bank (``instructor/bank`` of the repository or ``LABKIT_BANK``);
    without it only the visible cases run, a note says so, and a strict check raises (nbgrader must not
    give the points of tests it could not run). ``check`` is a learning aid that runs in the notebook's
    own process; grades come from ``labkit grade``, which checks answers out of the notebook's reach.
    An answer that calls a function that answers the exercise (the question's ``implemented_by``) is
    reported, scores 0 and fails a strict check.
    """
    strict = hidden if strict is None else strict
    q = get_question(qid)
    missing_bank = hidden and instructor_bank() is None
    if missing_bank:
        print(f"note: the hidden cases of {qid} are only available where the instructor bank is present "
              f"(labkit grade --bank DIR, or LABKIT_BANK); running the visible cases")
        hidden = False
    from .lock import runtime_lock_check

    with runtime_lock_check(q.implemented_by) as seen:
        result = run_question(qid, fn, hidden)
    if seen:
        result.locked = True
        result.message = lock_message(seen)
    print(result.verdict())
    if strict and missing_bank:
        raise CheckFailure(f"{qid}: the hidden cases could not run (no instructor bank)")
    if not result.ok and (strict or os.environ.get("LABKIT_CHECK_STRICT", "") not in ("", "0")):
        why = f": {result.message}" if result.locked else ""
        raise CheckFailure(f"{qid}: {result.passed}/{result.total} cases passed{why}")
    return result


def call_with_grad(f, args, wrt, weight=None):
    """Call ``f(*args)`` with gradients on ``args[i]`` for i in ``wrt``; return (output, [gradients]).

    The gradients are those of ``(output * weight).sum()`` (``output.sum()`` without a weight); an
    argument the output does not depend on gets None, and a non-tensor output gives (output, None).
    Cases use this instead of calling ``torch.autograd`` on the answer themselves, so that
    ``labkit grade`` can have the student's kernel compute the gradients and send them as data.
    """
    if hasattr(f, "_labkit_call"):  # the grader's stand-in: the kernel does the same computation
        return f._labkit_call(tuple(args), {}, {"wrt": list(wrt), "weight": weight})
    import torch

    args = list(args)
    for i in wrt:
        args[i] = args[i].detach().clone().requires_grad_(True)
    out = f(*args)
    if not isinstance(out, torch.Tensor):
        return out, None
    loss = (out * weight).sum() if weight is not None else out.sum()
    grads = torch.autograd.grad(loss, [args[i] for i in wrt], allow_unused=True)
    return out.detach(), [None if g is None else g.detach() for g in grads]
