"""nbgrader as a first-class route: a throwaway nbgrader course made from the lab notebooks.

Every lab goes through ``generate_assignment`` (the markers parse, the graded cells carry the bank's
points, the student version holds no solution and no hidden test). 00_welcome, the cheapest lab to
execute, also goes through ``autograde`` three times: the blank ``labkit release`` scores 0, the
solution notebook full marks, and a partly right submission (nbgrader's own release with two of four
answers filled in) exactly what ``labkit grade`` gives it. Autograding the other labs would execute
each of them three more times (minutes each on a 2-core CPU); what makes their blank release score 0
under nbgrader, a hidden test cell that raises on a wrong answer, is checked for every lab by
``test_every_graded_cell_is_a_hidden_check_that_raises`` and in tests/test_grading.py.

nbgrader scores a test cell all or nothing (it passes or raises), while ``labkit grade`` gives partial
credit within a question, so the two agree on questions answered fully right or not at all; the partly
right submission is made of those.
"""
import ast
import csv
import os
import shutil
import sys
from pathlib import Path

import nbformat
import pytest

from labkit.cli import main
from labkit.grading.questions import get_question, questions_for

ROOT = Path(__file__).resolve().parents[1]
LABS = sorted((ROOT / "notebooks").glob("*.ipynb"))
AUTOGRADED = "00_welcome"
PARTLY = {"softmax_with_temperature_solution", "agreement_solution"}  # the answers filled in


def _nbgrader_meta(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def _graded_cells(nb) -> list:
    return [c for c in nb.cells if _nbgrader_meta(c).get("grade") and not _nbgrader_meta(c).get("solution")]


@pytest.mark.parametrize("lab", LABS, ids=lambda p: p.stem)
def test_every_graded_cell_is_a_hidden_check_that_raises(lab):
    """nbgrader gives a graded cell its points unless it raises: each must be ``check(qid, fn, hidden=True)``
    (strict by default: a wrong answer raises) for a question of this lab, worth the bank's points."""
    nb = nbformat.read(lab, as_version=4)
    cells = _graded_cells(nb)
    assert {get_question(q.id).id for q in questions_for(lab.stem)} == {
        _check_call(c.source)[0] for c in cells}, lab.name
    for cell in cells:
        qid, kwargs = _check_call(cell.source)
        assert kwargs.get("hidden") is True and kwargs.get("strict", True) is True, cell.source
        assert _nbgrader_meta(cell)["points"] == get_question(qid).points


def _check_call(source: str) -> tuple[str, dict]:
    calls = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "check"]
    assert len(calls) == 1, source
    call = calls[0]
    return call.args[0].value, {k.arg: k.value.value for k in call.keywords}


# ---------------------------------------------------------------- the nbgrader course


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    pytest.importorskip("nbgrader", reason="nbgrader is not installed (it is in the dev extra: "
                                           "pip install -e '.[dev]')")
    from nbgrader.apps import NbGraderAPI
    from traitlets.config import Config

    root = tmp_path_factory.mktemp("nbgrader-course")
    for lab in LABS:
        (root / "source" / lab.stem).mkdir(parents=True)
        shutil.copy(lab, root / "source" / lab.stem / lab.name)
    config = Config()
    config.CourseDirectory.root = str(root)
    config.CourseDirectory.course_id = "labkit"
    config.Execute.timeout = 600  # seconds per cell; the zoo loads in the first cells
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LABKIT_MODE", os.environ.get("LABKIT_MODE", "smoke"))  # the autograder's kernels inherit it
        # nbgrader migrates its database by running the `alembic` script of this environment
        mp.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
        api = NbGraderAPI(config=config)
        generated = {lab.stem: api.generate_assignment(lab.stem, force=True, create=True) for lab in LABS}
        yield dict(root=root, api=api, generated=generated)


def _gradebook(root: Path):
    from nbgrader.api import Gradebook

    return Gradebook(f"sqlite:///{root / 'gradebook.db'}")


@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.parametrize("lab", LABS, ids=lambda p: p.stem)
def test_generate_assignment_takes_every_lab_as_it_is(course, lab):
    result = course["generated"][lab.stem]
    assert result["success"], result.get("error") or result.get("log")
    released = nbformat.read(course["root"] / "release" / lab.stem / lab.name, as_version=4)
    text = "\n".join(c.source for c in released.cells)
    assert "BEGIN SOLUTION" not in text and "HIDDEN TESTS" not in text and "hidden=True" not in text
    source = nbformat.read(lab, as_version=4)
    with _gradebook(course["root"]) as gb:
        notebook = gb.find_notebook(lab.stem, lab.stem)
        assert notebook.max_score == sum(q.points for q in questions_for(lab.stem))
        assert {g.name for g in notebook.grade_cells if not g.name.endswith("_solution")} == {
            _nbgrader_meta(c)["grade_id"] for c in _graded_cells(source)}


def _fill_in(student_nb, solution_nb, grade_ids: set[str]):
    """``student_nb`` with the answers of ``solution_nb`` in the solution cells named by ``grade_ids``."""
    answers = {_nbgrader_meta(c).get("grade_id"): c.source for c in solution_nb.cells}
    for cell in student_nb.cells:
        gid = _nbgrader_meta(cell).get("grade_id")
        if gid in grade_ids:
            cell.source = answers[gid]
    return student_nb


@pytest.mark.slow
@pytest.mark.notebook
def test_autograde_blank_solution_and_partly_right_like_labkit_grade(course, tmp_path):
    root, api = course["root"], course["api"]
    lab = ROOT / "notebooks" / f"{AUTOGRADED}.ipynb"
    assert course["generated"][AUTOGRADED]["success"]
    # blank: the student version `labkit release` writes; solution: the source; partly: nbgrader's release
    assert main(["release", str(lab), "--out", str(tmp_path / "release")]) == 0
    nbgrader_release = nbformat.read(root / "release" / AUTOGRADED / lab.name, as_version=4)
    partly = _fill_in(nbgrader_release, nbformat.read(lab, as_version=4), PARTLY)
    submissions = {"blank": tmp_path / "release" / lab.name, "solution": lab}
    for student, path in submissions.items():
        (root / "submitted" / student / AUTOGRADED).mkdir(parents=True)
        shutil.copy(path, root / "submitted" / student / AUTOGRADED / lab.name)
    (root / "submitted" / "partly" / AUTOGRADED).mkdir(parents=True)
    nbformat.write(partly, str(root / "submitted" / "partly" / AUTOGRADED / lab.name))

    scores = {}
    for student in ("blank", "solution", "partly"):
        result = api.autograde(AUTOGRADED, student, force=True, create=True)
        assert result["success"], result.get("error") or result.get("log")
        with _gradebook(root) as gb:
            nb = gb.find_submission_notebook(AUTOGRADED, AUTOGRADED, student)
            scores[student] = {g.name: g.score for g in nb.grades if not g.name.endswith("_solution")}
    full = sum(q.points for q in questions_for(AUTOGRADED))
    assert sum(scores["blank"].values()) == 0
    assert sum(scores["solution"].values()) == full

    # the same file through labkit grade (nbgrader's submitted/STUDENT/ASSIGNMENT/LAB.ipynb layout)
    out = tmp_path / "grades"
    assert main(["grade", str(root / "submitted" / "partly"), "--out", str(out), "--jobs", "1"]) == 0
    with open(out / "grades.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["student"] == "partly"
    labkit_points = {f"{q.id.replace('.', '_')}_hidden": float(row[q.id]) for q in questions_for(AUTOGRADED)}
    assert scores["partly"] == labkit_points
    assert 0 < sum(labkit_points.values()) < full
