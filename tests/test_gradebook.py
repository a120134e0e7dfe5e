"""The gradebook of `labkit grade`: students from paths or a roster, one row per student, per-lab
summaries and histograms, feedback per student per lab, and a report naming every file or student that
needs a look. Unit tests run on synthetic result dicts (a class of 30); one end-to-end test runs the
real `labkit grade` on a small class; the CLI's argument errors are one line and exit 2."""
import csv
import random
import struct
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from labkit.cli import main
from labkit.grading import gradebook as gb

ROOT = Path(__file__).resolve().parents[1]
WELCOME = ROOT / "notebooks" / "00_welcome.ipynb"
LABS = ["00_welcome", "01_ensembling", "02_merging"]

# two labs with different maxima (6 and 11): totals must never be averaged across them
QUESTIONS = {
    "00_welcome": {"welcome.softmax": 2, "welcome.accuracy": 1, "welcome.average_probs": 2, "welcome.agreement": 1},
    "01_ensembling": {"ensemble.a": 2, "ensemble.b": 3, "ensemble.c": 2, "ensemble.d": 4},
}


def result(lab: str, points: dict, key: str = "k", error: str | None = None) -> dict:
    """A result dict shaped like labkit.grading.grade.grade_one's."""
    return {"student": key, "notebook": lab, "error": error, "notes": [], "seconds": 1.0,
            "results": {q: {"qid": q, "points": float(points[q]), "max_points": float(m), "passed": 0, "total": 0,
                            "status": "ran", "message": "", "cases": []} for q, m in QUESTIONS[lab].items()}}


# ---------------------------------------------------------------- who is this?


@pytest.mark.parametrize("path, lab, student", [
    ("class/alice/00_welcome.ipynb", "00_welcome", "alice"),                   # nbgrader: STUDENT/LAB
    ("submitted/alice/00_welcome/00_welcome.ipynb", "00_welcome", "alice"),    # nbgrader: STUDENT/ASSIGNMENT/LAB
    ("class/alice_00_welcome.ipynb", "00_welcome", "alice"),                   # flat: STUDENT_LAB
    ("class/bob.smith-01_ensembling.ipynb", "01_ensembling", "bob.smith"),
    ("class/00_welcome_carol.ipynb", "00_welcome", "carol"),                   # LAB_STUDENT
    ("class/dave.ipynb", "00_welcome", "dave"),                                # recognised by its metadata
    ("class/x00_welcome.ipynb", "00_welcome", "x00_welcome"),                  # no separator: not a lab suffix
    ("class/erin_01_ensembling.ipynb", "00_welcome", "erin"),                  # metadata says 00, name says 01
])
def test_student_from_path(path, lab, student):
    assert gb.student_from_path(path, lab, LABS) == student


def _roster(tmp_path, text: str) -> Path:
    p = tmp_path / "roster.csv"
    p.write_text(text, encoding="utf-8")
    return p


def test_read_roster_and_identify_by_id_or_alias(tmp_path):
    roster = gb.read_roster(_roster(tmp_path, "\ufeffStudent,Name,Aliases\nalice,Alice A,aa; alice.a\n\nbob,Bob B,\n"))
    assert roster == [gb.RosterEntry("alice", "Alice A", ("aa", "alice.a")), gb.RosterEntry("bob", "Bob B", ())]
    ident = gb.Identifier(roster, LABS)
    assert ident("c/AA_00_welcome.ipynb", "00_welcome") == ("alice", True)       # alias, any case
    assert ident("c/alice.a/00_welcome.ipynb", "00_welcome") == ("alice", True)
    assert ident("c/bob/ps1/00_welcome.ipynb", "00_welcome") == ("bob", True)    # an assignment folder in between
    assert ident("c/zed_00_welcome.ipynb", "00_welcome") == ("zed", False)       # not on the roster


@pytest.mark.parametrize("text, message", [
    ("name,aliases\nAlice,a\n", "no student id column"),
    ("id,name\nalice,A\n,B\n", "line 3: empty student id"),
    ("id,name\nalice,A\nalice,B\n", "line 3: student id 'alice' is already listed"),
    ("id,aliases\nalice,al\nbob,al\n", "line 3: alias 'al' is already used by student 'alice'"),
    ("id,aliases\nalice,\nbob,ALICE\n", "line 3: alias 'ALICE' is already used by student 'alice'"),
    ("id,name\n", "no students in it"),
])
def test_read_roster_errors_name_the_line(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        gb.read_roster(_roster(tmp_path, text))


def test_read_roster_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="roster .*nope.csv: no such file"):
        gb.read_roster(tmp_path / "nope.csv")


# ---------------------------------------------------------------- a class of 30 (synthetic results)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def class_of_30(tmp_path):
    """30 students, two labs; layouts mixed; one duplicate, one student without lab 01, one off the roster."""
    rng = random.Random(7)
    graded, points = [], {}
    for i in range(30):
        sid = f"s{i:02d}"
        for lab in QUESTIONS:
            if sid == "s05" and lab == "01_ensembling":
                continue  # s05 did not hand in lab 01
            pts = {q: rng.choice([0, m / 2, m]) for q, m in QUESTIONS[lab].items()}
            points[(sid, lab)] = pts
            # three layouts: nbgrader's folders, flat names, and a file-name alias from the roster
            path = [f"class/{sid}/{lab}.ipynb", f"class/{sid}_{lab}.ipynb", f"class/nick{i}_{lab}.ipynb"][i % 3]
            graded.append((path, result(lab, pts)))
    graded.append(("class/late/S07-00_welcome.ipynb", result("00_welcome", {q: 0 for q in QUESTIONS["00_welcome"]})))
    graded.append(("class/zed_00_welcome.ipynb", result("00_welcome", {q: 1 for q in QUESTIONS["00_welcome"]})))
    rows = ["id,name,aliases"] + [f"s{i:02d},Student {i},nick{i}" for i in range(30)] + ["s30,Absent Student,"]
    roster = gb.read_roster(_roster(tmp_path, "\n".join(rows) + "\n"))
    problems = ["class/s11_04_distill.ipynb: its metadata names notebook '04_distill', which has no questions"]
    book = gb.build(graded, roster, problems, labs=LABS)
    paths = gb.write(book, tmp_path / "grades")
    return dict(book=book, paths=paths, points=points, out=tmp_path / "grades")


def _read(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_gradebook_csv_one_row_per_student_with_points_and_totals(class_of_30):
    rows = {r["student"]: r for r in _read(class_of_30["paths"]["gradebook"])}
    points = class_of_30["points"]
    assert list(rows) == [f"s{i:02d}" for i in range(31)] + ["zed"]  # roster order, then students off it
    assert rows["s03"]["name"] == "Student 3" and rows["zed"]["name"] == ""
    for (sid, lab), pts in points.items():
        row = rows[sid]
        if (sid, lab) == ("s07", "00_welcome"):
            assert row[f"{lab}/total"] == "" and row["duplicate"] == "00_welcome"
            continue
        for q, p in pts.items():
            assert float(row[f"{lab}/{q}"]) == p
        assert float(row[f"{lab}/total"]) == pytest.approx(sum(pts.values()))
    # the overall total is the sum of the lab totals, out of the same maximum for everyone (6 + 11)
    for sid, row in rows.items():
        labs = [float(row[f"{lab}/total"]) for lab in QUESTIONS if row[f"{lab}/total"]]
        assert float(row["total"]) == pytest.approx(sum(labs)) and row["max"] == "17"
    assert rows["s05"]["missing"] == "01_ensembling" and rows["s05"]["01_ensembling/total"] == ""
    assert rows["s30"]["missing"] == "00_welcome 01_ensembling" and rows["s30"]["total"] == "0"


def test_per_lab_summaries_never_mix_labs(class_of_30):
    book, points = class_of_30["book"], class_of_30["points"]
    for s in book.summaries():
        totals = sorted(sum(p.values()) for (sid, lab), p in points.items()
                        if lab == s.lab and (sid, lab) != ("s07", "00_welcome"))
        totals = sorted(totals + ([4.0] if s.lab == "00_welcome" else []))  # zed (1 point x 4), off the roster, counts
        assert s.n == len(totals) == (30 if s.lab == "00_welcome" else 29)
        assert s.mean == pytest.approx(sum(totals) / len(totals))
        mid = len(totals) // 2
        assert s.median == pytest.approx(totals[mid] if len(totals) % 2 else (totals[mid - 1] + totals[mid]) / 2)
        assert s.max_points == {"00_welcome": 6, "01_ensembling": 11}[s.lab]
        report = (class_of_30["out"] / "report.md").read_text()
        assert f"| {s.lab} | {s.max_points:g} | {s.n} | {s.mean:.2f} |" in report
        w, h = _png_size(class_of_30["out"] / "histograms" / f"{s.lab}.png")
        assert w > 100 and h > 100


def test_feedback_per_student_per_lab_and_both_duplicates_kept(class_of_30):
    fb = class_of_30["out"] / "feedback"
    for (sid, lab) in class_of_30["points"]:
        if (sid, lab) != ("s07", "00_welcome"):
            text = (fb / sid / f"{lab}.md").read_text()
            assert text.startswith(f"# Feedback: {sid} ({lab})")
    dups = sorted(p.name for p in (fb / "s07").iterdir())
    assert dups == ["00_welcome__S07-00_welcome.md", "00_welcome__s07_00_welcome.md", "01_ensembling.md"]


def test_report_and_notices_name_every_problem(class_of_30):
    notices = class_of_30["book"].notices()
    report = (class_of_30["out"] / "report.md").read_text()
    expected = [
        "could not grade class/s11_04_distill.ipynb: its metadata names notebook '04_distill'",
        "s07 handed in 00_welcome 2 times (class/s07_00_welcome.ipynb (",
        "class/zed_00_welcome.ipynb: student 'zed' is not on the roster",
        "s05: no submission of 01_ensembling",
        "s30: no submission of 00_welcome, 01_ensembling",
        "zed: no submission of 01_ensembling",
    ]
    for text in expected:
        assert any(text in n for n in notices), text
        assert text in report, text
    assert len(notices) == len(expected)


def test_a_class_without_a_roster_is_named_by_its_files(tmp_path):
    graded = [("c/alice/00_welcome.ipynb", result("00_welcome", dict.fromkeys(QUESTIONS["00_welcome"], 1))),
              ("c/bob_00_welcome.ipynb", result("00_welcome", dict.fromkeys(QUESTIONS["00_welcome"], 0),
                                                error="could not start a kernel: boom"))]
    book = gb.build(graded, labs=LABS)
    assert list(book.students) == ["alice", "bob"] and not book.not_on_roster
    assert book.notices() == ["c/bob_00_welcome.ipynb: grading failed (could not start a kernel: boom); scored 0"]
    gb.write(book, tmp_path)
    rows = _read(tmp_path / "grades.csv")
    assert [(r["student"], r["total"], r["max"], r["file"]) for r in rows] == [
        ("alice", "4", "6", "c/alice/00_welcome.ipynb"), ("bob", "0", "6", "c/bob_00_welcome.ipynb")]


def test_safe_names_for_folders():
    assert gb.safe_name("../etc/passwd") == "_etc_passwd"
    assert gb.safe_name("a b/c") == "a_b_c" and gb.safe_name("") == "_" and gb.safe_name("jo.e@x") == "jo.e@x"


# ---------------------------------------------------------------- the CLI's argument errors


@pytest.mark.parametrize("extra, message", [
    (["--timeout", "-1"], "--timeout must be a positive number of seconds, got -1"),
    (["--timeout", "nan"], "--timeout must be a positive number of seconds, got nan"),
    (["--cell-timeout", "0"], "--cell-timeout must be a positive number of seconds, got 0"),
    (["--jobs", "0"], "--jobs must be a positive whole number, got 0"),
])
def test_grade_bad_numbers_are_one_line_exit_2(tmp_path, capsys, extra, message):
    sub = tmp_path / "alice_00_welcome.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell("x = 1")]), str(sub))
    assert main(["grade", str(sub), "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert err == f"labkit grade: error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_grade_path_errors_are_one_line_exit_2(tmp_path, capsys, monkeypatch):
    sub = tmp_path / "alice_00_welcome.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell("x = 1")]), str(sub))
    a_file = tmp_path / "grades.txt"
    a_file.write_text("keep")
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(sub), "--out", str(a_file)], f"--out {a_file} is a file, not a folder"),
        ([str(tmp_path / "nope.ipynb"), str(sub), "--out", str(tmp_path / "o")], "no such submission: "),
        ([str(tmp_path / "empty"), "--out", str(tmp_path / "o")], "no notebooks (*.ipynb) in the folder"),
        ([str(sub), "--out", str(tmp_path / "o"), "--roster", str(tmp_path / "r.csv")], "r.csv: no such file"),
    ]
    for argv, message in cases:
        assert main(["grade", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("labkit grade: error: ") and message in err and err.count("\n") == 1, err
    assert a_file.read_text() == "keep" and not (tmp_path / "o").exists()
    monkeypatch.setenv("LABKIT_DEBUG", "1")
    with pytest.raises(ValueError, match="--jobs must be"):
        main(["grade", str(sub), "--out", str(tmp_path / "o"), "--jobs", "-3"])


def test_folder_arguments_skip_hidden_folders_and_the_output(tmp_path):
    from labkit.grading.gradebook import find_submissions as submission_paths

    for rel in ["alice/00_welcome.ipynb", "bob_00_welcome.ipynb", ".ipynb_checkpoints/bob_00_welcome-checkpoint.ipynb",
                "grades/executed/alice.ipynb", "notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("{}")
    found = submission_paths([str(tmp_path)], tmp_path / "grades")
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["alice/00_welcome.ipynb", "bob_00_welcome.ipynb"]


# ---------------------------------------------------------------- end to end: a small class


def _minimal_submission(path: Path, answers: dict[str, str]) -> Path:
    """A submission of 00_welcome that keeps only the imports and the answer cells (fast to execute):
    ``answers`` maps a solution cell's grade_id to "solution" (the reference answer) or "stub"."""
    from labkit.grading.release import student_version

    source = nbformat.read(WELCOME, as_version=4)
    student, _, _ = student_version(source, WELCOME)
    by_id = {c.metadata.get("nbgrader", {}).get("grade_id"): c for c in source.cells}
    stubs = {c.metadata.get("nbgrader", {}).get("grade_id"): c for c in student.cells}
    cells = [new_code_cell("import torch")]
    cells += [new_code_cell((by_id if how == "solution" else stubs)[gid].source) for gid, how in answers.items()]
    nb = new_notebook(cells=cells, metadata={"labkit": {"notebook": "00_welcome"}})
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


SOLUTION_IDS = ["softmax_with_temperature_solution", "accuracy_solution", "average_probs_solution",
                "agreement_solution"]


@pytest.mark.slow
@pytest.mark.notebook
def test_labkit_grade_writes_the_gradebook_of_a_small_class(tmp_path, capsys):
    if not WELCOME.exists():
        pytest.skip("notebooks/00_welcome.ipynb is missing")
    cls = tmp_path / "class"
    _minimal_submission(cls / "alice" / "00_welcome.ipynb", dict.fromkeys(SOLUTION_IDS, "solution"))  # nbgrader layout
    _minimal_submission(cls / "bob_00_welcome.ipynb", dict.fromkeys(SOLUTION_IDS, "stub"))              # flat
    partly = dict.fromkeys(SOLUTION_IDS, "stub") | {"softmax_with_temperature_solution": "solution",
                                                      "agreement_solution": "solution"}
    _minimal_submission(cls / "cj_00_welcome.ipynb", partly)                                            # alias
    nbformat.write(new_notebook(cells=[new_code_cell("x = 1")]), str(cls / "mystery.ipynb"))              # no lab
    roster = _roster(tmp_path, "id,name,aliases\nalice,Alice,\nbob,Bob,\ncarol,Carol,cj\ndave,Dave,\n")
    out = tmp_path / "grades"
    rc = main(["grade", str(cls), "--out", str(out), "--roster", str(roster), "--jobs", "2",
               "--cell-timeout", "60", "--timeout", "300"])
    captured = capsys.readouterr()
    assert rc == 1  # mystery.ipynb could not be graded
    rows = {r["student"]: r for r in _read(out / "gradebook.csv")}
    assert list(rows) == ["alice", "bob", "carol", "dave"]
    assert [rows[s]["00_welcome/total"] for s in rows] == ["6", "0", "3", ""]
    assert rows["carol"]["00_welcome/welcome.softmax"] == "2" and rows["carol"]["00_welcome/welcome.accuracy"] == "0"
    assert rows["dave"]["missing"] == "00_welcome" and {r["max"] for r in rows.values()} == {"6"}
    for s in ("alice", "bob", "carol"):
        assert (out / "feedback" / s / "00_welcome.md").read_text().startswith(f"# Feedback: {s} (00_welcome)")
    assert _png_size(out / "histograms" / "00_welcome.png")[0] > 100
    report = (out / "report.md").read_text()
    assert "| 00_welcome | 6 | 3 | 3.00 | 3 | 0 | 6 |" in report
    for text in ("mystery.ipynb: cannot tell which notebook this is", "dave: no submission of 00_welcome"):
        assert text in report and text in captured.err
    assert "labkit grade: dave: no submission of 00_welcome\n" in captured.err
    assert "00_welcome: 3 counted of 6 points: mean 3.00, median 3, min 0, max 6" in captured.out
