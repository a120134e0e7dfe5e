"""Graded notebooks: the question bank API, ``check`` for test cells, and (in submodules) the
notebook-building helpers (``notebook_tools``), ``labkit release`` (``release``) and ``labkit grade``
(``grade``).

In a bank module (labkit/grading/bank/<topic>.py: visible cases only, expected values as literals)::

    from labkit.grading import Question, register, expect_close
    register(Question(id="ensemble.linear_interpolate", notebook="01_ensembling",
                      function="linear_interpolate", points=2, groups={"core": 3, "errors": 1},
                      implemented_by=["labkit.ensemble.linear_interpolate"],
                      visible=[("two members, uniform weights", case_fn)]))

and in the instructor bank (instructor/bank/<topic>.py, outside the package: hidden cases, references)::

    from labkit.grading import add_hidden
    add_hidden("ensemble.linear_interpolate", [("per-position weights", case_fn, "core"), ...])

In a notebook's test cell::

    from labkit.grading import check
    check("ensemble.linear_interpolate", linear_interpolate)

The bank modules are imported on first use (``load_banks``), so importing this package is cheap.
"""
from .expect import CheckFailure, default_tolerance, expect_close, expect_equal, expect_raises, expect_true
from .questions import (CORE, CaseResult, CheckResult, Question, UnknownQuestion, add_hidden, all_questions,
                        call_with_grad, check, get_question, instructor_bank, load_banks, load_instructor_bank,
                        notebooks, questions_for, register, run_question, score_cases)
from .wire import DeclaredCallable

__all__ = [
    "Question", "register", "check", "CheckFailure", "CheckResult", "CaseResult", "UnknownQuestion",
    "expect_close", "expect_equal", "expect_raises", "expect_true", "default_tolerance",
    "questions_for", "notebooks", "all_questions", "get_question", "load_banks", "run_question",
    "CORE", "add_hidden", "call_with_grad", "instructor_bank", "load_instructor_bank", "score_cases",
    "DeclaredCallable",
]
