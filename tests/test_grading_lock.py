"""The answer-key lock: static detection on notebook sources (authoritative) and the run-time trace."""
import nbformat
import pytest
import torch

from labkit import ensemble as ens
from labkit.grading import check, questions_for
from labkit.grading.lock import runtime_lock_check, static_lock_check

LOCKED = ["labkit.ensemble.linear_interpolate", "labkit.ensemble.combine"]


@pytest.mark.parametrize("cells", [
    ["from labkit.ensemble import linear_interpolate"],
    ["from labkit.ensemble import linear_interpolate as li", "linear_interpolate = li"],
    ["import labkit.ensemble as E",
     "def linear_interpolate(logits, weights):\n    return E.linear_interpolate(logits, weights)"],
    ["from labkit import ensemble", "def linear_interpolate(l, w):\n    return ensemble.combine(l, w, 'linear')"],
    ["import labkit", "def linear_interpolate(l, w):\n    return labkit.ensemble.linear_interpolate(l, w)"],
    ["from labkit import ensemble as ens",
     "def linear_interpolate(l, w):\n    return getattr(ens, 'linear_interpolate')(l, w)"],
    ["import importlib",
     "def linear_interpolate(l, w):\n    return importlib.import_module('labkit.ensemble').linear_interpolate(l, w)"],
    ["def linear_interpolate(l, w):\n    from labkit.ensemble import linear_interpolate as kit\n    return kit(l, w)"],
    ["from labkit.ensemble import *", "def linear_interpolate(l, w):\n    return combine(l, w)"],
    # the kit's function reached through a helper defined in another cell
    ["from labkit.ensemble import linear_interpolate as kit_li", "def helper(l, w):\n    return kit_li(l, w)",
     "%time x = 1", "def linear_interpolate(l, w):\n    return helper(l, w) + 0"],
    ["import functools, labkit.ensemble", "linear_interpolate = functools.partial(labkit.ensemble.linear_interpolate)"],
])
def test_static_lock_finds_the_kit_function(cells):
    assert static_lock_check(cells, "linear_interpolate", LOCKED), cells


@pytest.mark.parametrize("cells", [
    ["import torch", "def linear_interpolate(logits, weights):\n    return torch.logsumexp(logits, 0)"],
    # importing the kit's name first and then writing one's own function of that name is fine
    ["from labkit.ensemble import linear_interpolate", "def linear_interpolate(l, w):\n    return l.sum(0)"],
    # other kit functions, and parameters or locals that happen to share a notebook name
    ["from labkit import ensemble as ens", "weights = ens.combine", "def linear_interpolate(logits, weights):\n"
     "    ens = logits\n    return ens.sum(0) * weights"],
    ["x = (", "def linear_interpolate(l, w):\n    return l"],  # a cell that does not parse is skipped
])
def test_static_lock_leaves_own_code_alone(cells):
    assert static_lock_check(cells, "linear_interpolate", LOCKED) == []


def test_the_solution_notebooks_trip_no_lock():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "notebooks"
    names = sorted(p.stem for p in root.glob("[0-9][0-9]_*.ipynb"))
    assert len(names) >= 6, names
    for name in names:
        nb = nbformat.read(root / f"{name}.ipynb", as_version=4)
        sources = [c.source for c in nb.cells if c.cell_type == "code"]
        for q in questions_for(name):
            assert static_lock_check(sources, q.function, q.implemented_by) == [], q.id


def test_every_question_declares_its_implementers_and_they_exist():
    from labkit.grading import all_questions
    from labkit.grading.lock import _resolve_object

    for q in all_questions().values():
        for name in q.implemented_by:
            assert _resolve_object(name) is not None, f"{q.id}: {name} does not exist"
    assert sum(bool(q.implemented_by) for q in all_questions().values()) >= 15


def test_runtime_lock_sees_a_call_hidden_from_the_source():
    def sneaky(logits, weights):
        return getattr(ens, "linear_" + "interpolate")(logits, weights)  # no literal name to find

    with runtime_lock_check(LOCKED) as seen:
        sneaky(torch.randn(2, 3), torch.tensor([0.5, 0.5]))
    assert seen == {"labkit.ensemble.linear_interpolate"}
    with runtime_lock_check(LOCKED) as seen:  # the kit calling itself is not the student calling it
        ens.ensemble_next_token(torch.randn(2, 1, 3), torch.tensor([0.5, 0.5]), "linear")
    assert seen == set()


def test_check_reports_the_lock_and_scores_zero(capsys):
    def wrapper(logits, weights):
        return ens.linear_interpolate(logits, weights)

    r = check("ensemble.linear_interpolate", wrapper, hidden=True, strict=False)
    out = capsys.readouterr().out
    assert r.points == 0 and r.locked and not r.ok and r.passed == r.total
    assert "this exercise asks you to write it; you called labkit.ensemble.linear_interpolate" in out
    with pytest.raises(AssertionError, match="you called labkit.ensemble.linear_interpolate"):
        check("ensemble.linear_interpolate", wrapper, hidden=True)  # nbgrader's hidden cell: 0 points


def test_runtime_lock_without_importing_anything(monkeypatch):
    # in a kernel the lock resolves nothing by importing; a module first imported during the answer's
    # call is still recognised by its functions' names and modules
    import sys

    for name in [m for m in sys.modules if m == "labkit.ensemble" or m.startswith("labkit.ensemble.")]:
        monkeypatch.delitem(sys.modules, name)

    def answer(logits, weights):
        return ens.linear_interpolate(logits, weights)

    with runtime_lock_check(LOCKED) as seen:
        answer(torch.randn(2, 3), torch.tensor([0.5, 0.5]))
    assert seen == {"labkit.ensemble.linear_interpolate"}
    assert "labkit.ensemble" not in sys.modules  # nothing was imported to find it
