"""End to end: release notebooks/00_welcome.ipynb, then grade several submissions in ONE `labkit grade` run.

Submissions: the solution notebook (full points), the untouched student version (0 points, feedback for
every question), a student version with one wrong answer, one crashing answer and one endless loop
(only those questions lose points), a notebook whose kernel dies mid-way (recognised by its file
name, graded after a restart), and one that cannot be identified (the run exits non-zero naming it).
Every submission's bytes must be unchanged afterwards.
"""
import csv
import hashlib
import shutil
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from labkit.cli import main
from labkit.grading.grade import grade_one

pytestmark = pytest.mark.notebook

ROOT = Path(__file__).resolve().parents[1]
WELCOME = ROOT / "notebooks" / "00_welcome.ipynb"
CELL_TIMEOUT = 10

BROKEN = {
    "softmax_with_temperature_solution":  # right, but exp overflows on large logits and T <= 0 is accepted
        "def softmax_with_temperature(logits, temperature=1.0):\n    e = (logits / temperature).exp()\n"
        "    return e / e.sum(dim=-1, keepdim=True)",
    "accuracy_solution":
        "def accuracy(logits, labels):\n    return logits.argmax(dim=-1).eq(labels).mean_of_all()",
    "average_probs_solution":
        "def average_probs(probs, weights=None):\n    steps = 0\n    while True:\n        steps += 1",
    "agreement_solution":
        "def agreement(pred_a, pred_b):\n    if pred_a.shape != pred_b.shape:\n        raise ValueError('shapes')\n"
        "    return (pred_a == pred_b).float().mean().item()",
}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    if not WELCOME.exists():
        pytest.skip("notebooks/00_welcome.ipynb is missing")
    tmp = tmp_path_factory.mktemp("e2e")
    assert main(["release", str(WELCOME), "--out", str(tmp / "release")]) == 0
    student = tmp / "release" / "00_welcome.ipynb"

    subs = tmp / "submissions"
    subs.mkdir()
    shutil.copy(WELCOME, subs / "solution.ipynb")
    shutil.copy(student, subs / "untouched.ipynb")
    nb = nbformat.read(student, as_version=4)
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in BROKEN:
            cell.source = BROKEN[gid]
    nbformat.write(nb, str(subs / "broken.ipynb"))
    crashy = new_notebook(cells=[  # no labkit metadata: recognised by its file name
        new_code_cell("import torch"),
        new_code_cell("def agreement(a, b):\n    if a.shape != b.shape:\n        raise ValueError('x')\n"
                      "    return (a == b).float().mean().item()"),
        new_code_cell("import os\nos._exit(1)"),
        new_code_cell("def accuracy(logits, labels):\n    if len(logits) != len(labels):\n        raise ValueError('x')\n"
                      "    return (logits.argmax(-1) == labels).float().mean().item()"),
    ])
    nbformat.write(crashy, str(subs / "crashy_00_welcome.ipynb"))
    nbformat.write(new_notebook(cells=[new_code_cell("x = 1")]), str(subs / "mystery.ipynb"))
    paths = sorted(subs.iterdir())
    before = {p.name: _sha(p) for p in paths}

    out = tmp / "grades"
    t0 = time.monotonic()
    rc = main(["grade", *map(str, paths), "--out", str(out), "--cell-timeout", str(CELL_TIMEOUT),
               "--timeout", "400", "--jobs", "2"])
    seconds = time.monotonic() - t0
    with open(out / "grades.csv", newline="") as f:
        rows = {r["student"]: r for r in csv.DictReader(f)}
    return dict(rc=rc, rows=rows, out=out, paths=paths, before=before, seconds=seconds)


def _points(row):
    return {k: float(v) for k, v in row.items() if k.startswith("welcome.")}


def test_grade_exits_nonzero_only_for_the_ungradable_submission(graded):
    assert graded["rc"] == 1
    assert set(graded["rows"]) == {"solution", "untouched", "broken", "crashy"}  # crashy_00_welcome.ipynb: crashy


def test_csv_columns(graded):
    row = graded["rows"]["solution"]
    assert list(row) == ["student", "notebook", "welcome.softmax", "welcome.accuracy", "welcome.average_probs",
                         "welcome.agreement", "total", "max", "file"]
    assert row["notebook"] == "00_welcome" and row["max"] == "6"


def test_solution_gets_full_points(graded):
    row = graded["rows"]["solution"]
    assert _points(row) == {"welcome.softmax": 2, "welcome.accuracy": 1, "welcome.average_probs": 2,
                            "welcome.agreement": 1}
    assert row["total"] == "6"


def test_untouched_student_version_gets_zero_and_feedback_for_every_question(graded):
    row = graded["rows"]["untouched"]
    assert set(_points(row).values()) == {0.0} and row["total"] == "0"
    fb = (graded["out"] / "feedback" / "untouched" / "00_welcome.md").read_text()
    for qid in ("welcome.softmax", "welcome.accuracy", "welcome.average_probs", "welcome.agreement"):
        assert f"## {qid} (" in fb
    assert fb.count("Not implemented yet") == 4


def test_wrong_crashing_and_looping_answers_cost_only_their_questions(graded):
    p = _points(graded["rows"]["broken"])
    assert p["welcome.softmax"] == 1.2  # core group (weight 3 of 5) right; stable and errors groups wrong
    assert p["welcome.accuracy"] == 0 and p["welcome.average_probs"] == 0
    assert p["welcome.agreement"] == 1
    fb = (graded["out"] / "feedback" / "broken" / "00_welcome.md").read_text()
    # a hidden case's failure says what was checked, never the expected values
    assert ("✗ large logits stay finite [hidden]: probabilities of logits near ±1000 (subtract the max before exp): "
            "wrong answer (the values of hidden cases are not shown)") in fb
    assert "your code raised AttributeError: 'Tensor' object has no attribute 'mean_of_all'" in fb
    assert "`return logits.argmax(dim=-1).eq(labels).mean_of_all()`" in fb
    assert f"stopped after {CELL_TIMEOUT} s: the answer did not finish" in fb
    assert "(an endless loop?); the cells after it still ran" in fb  # the notebook's own check cell
    assert "Traceback" not in fb


def test_dead_kernel_is_restarted_and_grading_goes_on(graded):
    p = _points(graded["rows"]["crashy"])
    assert p["welcome.agreement"] == 1 and p["welcome.accuracy"] == 1
    assert p["welcome.softmax"] == 0 and p["welcome.average_probs"] == 0
    fb = (graded["out"] / "feedback" / "crashy" / "00_welcome.md").read_text()
    assert "the kernel died while running cell 3; the kernel was restarted" in fb
    assert "`softmax_with_temperature` is not defined in the notebook" in fb


def test_unknown_notebook_is_named(graded):
    assert not (graded["out"] / "feedback" / "mystery").exists()
    # the message was printed during the fixture; check it through a fresh, fast run of prepare()
    from labkit.grading.grade import prepare

    subs, problems = prepare([p for p in graded["paths"] if p.name == "mystery.ipynb"])
    assert subs == [] and "mystery.ipynb: cannot tell which notebook this is" in problems[0]


def test_submissions_are_never_modified_and_executed_copies_are_kept(graded):
    assert {p.name: _sha(p) for p in graded["paths"]} == graded["before"]
    assert (graded["out"] / "executed" / "broken.ipynb").exists()
    print(f"e2e grading run: {graded['seconds']:.0f} s")


def test_notebook_budget_stops_remaining_cells(tmp_path):
    nb = new_notebook(cells=[new_code_cell("import time\ntime.sleep(1.5)") for _ in range(6)]
                      + [new_code_cell("def agreement(a, b):\n    return 1.0")])
    raw = nbformat.writes(nb).encode()
    sub = {"student": "slow", "notebook": "00_welcome", "name": "slow.ipynb", "raw": raw,
           "questions": [{"qid": "welcome.agreement", "function": "agreement", "points": 1}]}
    res = grade_one(sub, cell_timeout=30, timeout=4, executed_dir=None)
    assert any("were not run: the notebook used up its 4 s budget" in n for n in res["notes"])
    assert res["results"]["welcome.agreement"]["status"] == "missing"
