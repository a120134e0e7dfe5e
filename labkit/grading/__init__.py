"""Graded notebooks: the question bank API, ``check`` for test cells, and (in submodules) the
notebook-building helpers (``notebook_tools``), ``labkit release`` (``release``) and ``labkit grade``
(``grade``).

In a bank module (labkit/grading/bank/<topic>.py)::

    from labkit.grading import Question, register, expect_close
    register(Question(id="ensemble.linear_interpolate", notebook="01_ensembling",
                      function="linear_interpolate", points=2,
                      visible=[("two members, uniform weights", case_fn)], hidden=[...]))

In a notebook's test cell::

    from labkit.grading import check
    check("ensemble.linear_interpolate", linear_interpolate)

The bank modules are imported on first use (``load_banks``), so importing this package is cheap.
"""
from .expect import CheckFailure, default_tolerance, expect_close, expect_equal, expect_raises, expect_true
from .questions import (CaseResult, CheckResult, Question, UnknownQuestion, all_questions, check, get_question,
                        load_banks, notebooks, questions_for, register, run_question)

__all__ = [
    "Question", "register", "check", "CheckFailure", "CheckResult", "CaseResult", "UnknownQuestion",
    "expect_close", "expect_equal", "expect_raises", "expect_true", "default_tolerance",
    "questions_for", "notebooks", "all_questions", "get_question", "load_banks", "run_question",
]
