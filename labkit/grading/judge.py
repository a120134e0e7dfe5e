"""Judging answers that run elsewhere: the bank's cases run in the grader, the student's function does not.

A case is written once, as a function ``case(f)`` that makes inputs, calls ``f`` and checks what came
back (see ``questions``). ``check`` runs it in one process. The grader runs the *same* case function
in its own process with ``f`` a stand-in (``_Replay``): the first time the case calls ``f`` the
stand-in records the inputs (encoded as data, see ``wire``) and stops the case; the grader has the
student's kernel make that call and send back the output; the case is then run again from the start,
with the same seed, and this time the stand-in returns the recorded output, until the case finishes
(one round per call; a case that calls ``f`` three times takes three rounds). Inputs must be the
same on every run (a fingerprint checks it). Expected values, references and comparisons never
leave the grader; the kernel only ever sees inputs.
"""
from __future__ import annotations

import builtins
import hashlib
import json

import torch

from . import wire
from .expect import CheckFailure
from .questions import CaseResult, CheckResult, Question, _first_line, _SeededRNG, lock_message

MAX_ROUNDS = 12


class _NeedCall(BaseException):
    """The case called the student's function with inputs whose output is not known yet."""


class _Lost(BaseException):
    """The call never came back (timeout, dead kernel, unreadable output): the case fails with ``why``."""

    def __init__(self, why: str, status: str = "error"):
        super().__init__(why)
        self.why, self.status = why, status


class _Missing(BaseException):
    """The notebook defines no function of the question's name."""


# builtin exception types a student's error is rebuilt as (so expect_raises(ValueError, ...) works);
# any other name becomes a fresh Exception subclass of that name, never a class of the grader
_BUILTIN_EXC = {n: getattr(builtins, n) for n in (
    "ValueError", "TypeError", "IndexError", "KeyError", "RuntimeError", "NotImplementedError", "AssertionError",
    "ZeroDivisionError", "AttributeError", "ArithmeticError", "OverflowError", "RecursionError", "LookupError",
    "NameError", "UnboundLocalError", "MemoryError", "FloatingPointError", "Exception")}


def student_exception(type_name: str, message: str, where: dict | None) -> Exception:
    cls = _BUILTIN_EXC.get(type_name)
    if cls is None:
        safe = type_name if type_name.isidentifier() else "Exception"
        cls = type(safe, (Exception,), {})
    e = cls(message)
    e._labkit_student = where or {}  # noqa: SLF001 - marks it as raised by the answer, not by the case
    return e


class Outcome:
    """What one call of the student's function came to."""

    def __init__(self, kind: str, value=None, type_name: str = "", message: str = "", where=None, grad=False):
        self.kind, self.value, self.type_name, self.message, self.where, self.grad = (
            kind, value, type_name, message, where or {}, grad)

    def result(self):
        if self.kind == "ok":
            if self.grad:
                v = self.value
                if isinstance(v, dict) and set(v) == {"out", "grads"}:
                    return v["out"], v["grads"]
                raise _Lost("the answer's output with gradients was malformed")
            return self.value
        if self.kind == "raised":
            raise student_exception(self.type_name, self.message, self.where)
        if self.kind == "missing":
            raise _Missing()
        status = self.kind if self.kind in ("timeout", "dead") else "error"
        raise _Lost(self.message or "no result came back", status=status)


def _fingerprint(tree, tensors: dict) -> str:
    h = hashlib.sha256(json.dumps(tree, sort_keys=True).encode())
    for k in sorted(tensors):
        t = tensors[k]
        h.update(f"{k}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class _Replay:
    """Stands in for the student's function inside a case run by the grader."""

    def __init__(self, answered: list):
        self.answered, self.i, self.pending = answered, 0, None

    def __call__(self, *args, **kwargs):
        return self._labkit_call(args, kwargs, None)

    def _labkit_call(self, args, kwargs, grad):
        tensors: dict = {}
        tree = {"args": wire.encode(tuple(args), tensors, inputs=True),
                "kwargs": wire.encode(dict(kwargs), tensors, inputs=True), "grad": None}
        if grad is not None:
            weight = grad.get("weight")
            tree["grad"] = {"wrt": [int(i) for i in grad["wrt"]],
                            "weight": wire.encode(weight, tensors, inputs=True) if weight is not None else None}
        fp = _fingerprint(tree, tensors)
        if self.i < len(self.answered):
            want, outcome = self.answered[self.i]
            if want != fp:
                raise RuntimeError("a test case made different inputs on a second run (its inputs must depend "
                                   "only on the seed); this is a bug in the question bank")
            self.i += 1
            return outcome.result()
        self.pending = (tree, tensors, fp, grad is not None)
        raise _NeedCall()


def _redact(message: str, hidden: bool) -> str:
    """A hidden case's failure says what was checked, never what was expected."""
    if not hidden:
        return message
    what = message.split(": ", 1)[0] if ": " in message else ""
    what = what if len(what) <= 120 else ""
    return (f"{what}: " if what else "") + "wrong answer (the values of hidden cases are not shown)"


def _student_error(e: BaseException) -> str:
    where = getattr(e, "_labkit_student", {}) or {}
    msg = _first_line(str(e))
    text = f"your code raised {type(e).__name__}: {msg}"
    if where.get("line"):
        code = f" `{where['text']}`" if where.get("text") else ""
        text += f" (line {where['line']} in {where.get('func', '?')}:{code})"
    return text


def run_replayed_case(spec, answered: list):
    """Run one case against recorded outcomes: a CaseResult, or the _Replay holding the next call."""
    rep = _Replay(answered)
    name, hidden, group = spec.name, spec.hidden, spec.group
    try:
        with _SeededRNG(0):
            spec.fn(rep)
    except _NeedCall:
        return rep
    except _Missing:
        return CaseResult(name, "missing", "the function is not defined in the notebook", hidden, group)
    except _Lost as e:
        return CaseResult(name, "error", e.why, hidden, group)
    except CheckFailure as e:
        if hasattr(e, "_labkit_student"):  # the answer raised an exception named like ours: still its error
            return CaseResult(name, "error", _student_error(e), hidden, group)
        return CaseResult(name, "fail", _redact(_first_line(str(e), 400) or "wrong answer", hidden), hidden, group)
    except Exception as e:  # noqa: BLE001 - the answer's error, or the case failing on what came back
        if hasattr(e, "_labkit_student"):
            if isinstance(e, NotImplementedError):
                msg = _first_line(str(e))
                return CaseResult(name, "todo", "not implemented yet" + (f" ({msg})" if msg else ""), hidden, group)
            return CaseResult(name, "error", _student_error(e), hidden, group)
        detail = "" if hidden else f": {_first_line(str(e))}"
        return CaseResult(name, "error", f"checking your answer raised {type(e).__name__}{detail}; "
                                         f"does your function return the right kind of value?", hidden, group)
    return CaseResult(name, "pass", "", hidden, group)


def judge_question(q: Question, send, hidden: bool = True, static_lock: list | None = None) -> dict:
    """Judge question ``q``: ``send(qid, calls) -> {call id: Outcome}`` has the student's kernel make calls.

    ``calls``: [(call id, request tree, tensors, is_grad_call)]. Returns CheckResult.to_dict() plus
    "status" ("ran", "missing", "locked") and "message".
    """
    specs = q.cases(hidden)
    answered: dict[int, list] = {i: [] for i in range(len(specs))}
    results: dict[int, CaseResult] = {}
    runtime_locked: set = set()
    for _ in range(MAX_ROUNDS):
        pending = {}
        for i, spec in enumerate(specs):
            if i in results:
                continue
            out = run_replayed_case(spec, answered[i])
            if isinstance(out, CaseResult):
                results[i] = out
            else:
                pending[i] = out.pending
        if not pending:
            break
        calls = [(f"c{i}r{len(answered[i])}", tree, tensors, is_grad)
                 for i, (tree, tensors, _, is_grad) in pending.items()]
        outcomes, seen = send(q, calls)
        runtime_locked |= {n for n in seen if n in q.implemented_by}
        for (cid, *_), (i, (_, _, fp, _)) in zip(calls, pending.items()):
            answered[i].append((fp, outcomes.get(cid) or Outcome("error", message="no result came back")))
    for i, spec in enumerate(specs):
        if i not in results:
            results[i] = CaseResult(spec.name, "error", "the test case needed too many calls", spec.hidden, spec.group)
    cases = [results[i] for i in range(len(specs))]
    res = CheckResult(q.id, q.points, cases, hidden, dict(q.groups))
    locked = sorted(set(static_lock or []) | runtime_locked)
    status, message = "ran", ""
    if locked:
        res.locked, res.message = True, lock_message(locked)
        status, message = "locked", res.message
    elif cases and all(c.status == "missing" for c in cases):
        status, message = "missing", (f"`{q.function}` is not defined in the notebook (did the cell defining it "
                                      f"run without error?)")
        res.cases = []
    d = res.to_dict()
    d.update(status=status, message=message, total=d["total"] if res.cases else len(cases))
    return d
