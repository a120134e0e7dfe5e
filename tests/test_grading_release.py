"""notebook_tools (markers, cell builders) and `labkit release`."""
import hashlib
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest

from labkit.grading import notebook_tools as nt
from labkit.grading.release import release, release_cli, student_version

SOLUTION = '''
def softmax(logits, temperature=1.0):
    """Docstring stays."""
    if temperature <= 0:
        ### BEGIN SOLUTION
        raise ValueError("bad")
        ### END SOLUTION
    ### BEGIN SOLUTION
    z = logits / temperature
    return z.softmax(-1)
    ### END SOLUTION
'''


# ---------------------------------------------------------------- markers


def test_find_regions_and_errors_name_the_place_and_line():
    src = "a\n### BEGIN SOLUTION\nb\n    ### END SOLUTION\nc\n### BEGIN SOLUTION\n### END SOLUTION"
    assert nt.solution_regions(src) == [(1, 3), (5, 6)]
    with pytest.raises(nt.MarkerError, match=r"^nb.ipynb, cell 3: '### BEGIN SOLUTION' on line 2 has no matching"):
        nt.solution_regions("x\n### BEGIN SOLUTION\ny", "nb.ipynb, cell 3")
    with pytest.raises(nt.MarkerError, match=r"'### END SOLUTION' on line 1 has no '### BEGIN SOLUTION' before it"):
        nt.solution_regions("### END SOLUTION")
    with pytest.raises(nt.MarkerError, match=r"on line 3 is nested inside the one on line 1"):
        nt.solution_regions("### BEGIN SOLUTION\nx\n### BEGIN SOLUTION\n### END SOLUTION\n### END SOLUTION")
    with pytest.raises(nt.MarkerError, match="HIDDEN TESTS' on line 1 has no matching"):
        nt.hidden_regions("### BEGIN HIDDEN TESTS\ncheck()")
    assert nt.solution_regions("x = '### BEGIN SOLUTION inside a string'") == []


def test_stub_keeps_def_docstring_and_indentation():
    out, n = nt.stub_solutions(SOLUTION.strip("\n"))
    assert n == 2
    assert out == '''def softmax(logits, temperature=1.0):
    """Docstring stays."""
    if temperature <= 0:
        # YOUR CODE HERE
        raise NotImplementedError("TODO: implement softmax()")
    # YOUR CODE HERE
    raise NotImplementedError("TODO: implement softmax()")'''
    compile(out, "stub", "exec")


def test_stub_at_top_level_and_in_markdown():
    out, n = nt.stub_solutions("x = 1\n### BEGIN SOLUTION\nanswer = x + 1\n### END SOLUTION\nprint(answer)")
    assert (out, n) == ('x = 1\n# YOUR CODE HERE\nraise NotImplementedError("TODO: your code here")\nprint(answer)', 1)
    md, _ = nt.stub_solutions("Why?\n\n### BEGIN SOLUTION\nBecause.\n### END SOLUTION", markdown=True)
    assert md == "Why?\n\nYOUR ANSWER HERE"
    nested, _ = nt.stub_solutions("class A:\n    def f(self):\n        for i in x:\n            ### BEGIN SOLUTION\n"
                                  "            pass\n            ### END SOLUTION")
    assert nested.endswith('            raise NotImplementedError("TODO: implement f()")')


def test_remove_hidden_tests():
    out, n = nt.remove_hidden_tests("a = 1\n### BEGIN HIDDEN TESTS\nassert a\n### END HIDDEN TESTS\nb = 2")
    assert (out, n) == ("a = 1\nb = 2", 1)


# ---------------------------------------------------------------- cell builders


def test_cell_builders_carry_nbgrader_metadata():
    sol = nt.solution(SOLUTION)
    assert sol.metadata["nbgrader"] == {"grade": False, "grade_id": "softmax_solution", "locked": False,
                                        "schema_version": 3, "solution": True}
    visible, hidden = nt.tests("welcome.softmax")
    assert visible.source == 'check("welcome.softmax", softmax_with_temperature)'
    assert visible.metadata["nbgrader"]["locked"] and not visible.metadata["nbgrader"]["grade"]
    assert hidden.source == ('### BEGIN HIDDEN TESTS\ncheck("welcome.softmax", softmax_with_temperature, hidden=True)\n'
                             '### END HIDDEN TESTS')
    assert hidden.metadata["nbgrader"] == {"grade": True, "grade_id": "welcome_softmax_hidden", "locked": True,
                                           "points": 2, "schema_version": 3, "solution": False}
    with pytest.raises(LookupError, match="unknown question id"):
        nt.tests("welcome.nope")
    with pytest.raises(nt.MarkerError, match="no '### BEGIN SOLUTION'"):
        nt.solution("def f():\n    return 1")
    with pytest.raises(ValueError, match="give a grade_id"):
        nt.solution("### BEGIN SOLUTION\nx = 1\n### END SOLUTION")
    title, install = nt.header("07_x", "Seven", "Intro.")
    assert "colab.research.google.com/github/labkit-course/labkit/blob/main/notebooks/07_x.ipynb" in title.source
    assert install.source.startswith("try:\n    import labkit\nexcept ImportError:")
    nb = nt.new_notebook("07_x", [title, install, sol])
    assert nb.metadata["labkit"] == {"notebook": "07_x"} and nt.notebook_name(nb) == "07_x"
    with pytest.raises(ValueError, match="duplicate nbgrader grade_id"):
        nt.new_notebook("07_x", [sol, nt.solution(SOLUTION)])


# ---------------------------------------------------------------- release


def _source_notebook(path: Path, extra_cells=()) -> Path:
    cells = nt.header("00_welcome", "T") + [
        nt.code("import torch\nfrom labkit.grading import check"),
        nt.solution(SOLUTION),
        *nt.tests("welcome.softmax"),
        nt.markdown("Explain:\n### BEGIN SOLUTION\nsecret reasoning\n### END SOLUTION"),
        nt.code("a = 1\n### BEGIN HIDDEN TESTS\nassert a == 1\n### END HIDDEN TESTS\nprint(a)"),
        *extra_cells,
    ]
    nb = nt.new_notebook("00_welcome", cells)
    for c in nb.cells:  # pretend it was executed
        if c.cell_type == "code":
            c.execution_count = 3
            c.outputs = [nbformat.v4.new_output("stream", name="stdout", text="out\n")]
            c.metadata["execution"] = {"iopub.status.busy": "2024"}
    nb.metadata["widgets"] = {"state": {}}
    nt.write(nb, path)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_release_writes_student_version_and_never_touches_the_source(tmp_path):
    src = _source_notebook(tmp_path / "src" / "00_welcome.ipynb")
    before = _sha(src)
    done = release([src], tmp_path / "rel")
    assert _sha(src) == before
    assert [(r.solutions, r.hidden_cells) for r in done] == [(3, 2)]
    nb = nbformat.read(tmp_path / "rel" / "00_welcome.ipynb", as_version=4)
    text = "\n".join(c.source for c in nb.cells)
    assert "z = logits / temperature" not in text and "secret reasoning" not in text
    assert "HIDDEN" not in text and "hidden=True" not in text and "assert a == 1" not in text
    assert 'raise NotImplementedError("TODO: implement softmax()")' in text and "YOUR ANSWER HERE" in text
    assert "a = 1\nprint(a)" in text  # a mixed cell keeps its visible part
    assert len(nb.cells) == len(nbformat.read(src, as_version=4).cells) - 1  # the hidden-test cell is gone
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None and "execution" not in c.metadata
    sol = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution")]
    assert sol and sol[0].metadata["nbgrader"]["grade_id"] == "softmax_solution"
    assert nb.metadata["labkit"] == {"notebook": "00_welcome"} and "widgets" not in nb.metadata
    for c in nb.cells:  # the student version is valid Python (magics aside)
        if c.cell_type == "code" and "%pip" not in c.source:
            compile(c.source, "cell", "exec")


def test_release_refuses_to_overwrite_without_force(tmp_path, capsys):
    src = _source_notebook(tmp_path / "00_welcome.ipynb")
    args = SimpleNamespace(notebooks=[str(src)], out=str(tmp_path / "rel"), force=False)
    assert release_cli(args) == 0
    assert "released" in capsys.readouterr().out
    target = tmp_path / "rel" / "00_welcome.ipynb"
    target.write_text("student edits")
    assert release_cli(args) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    assert target.read_text() == "student edits"
    args.force = True
    assert release_cli(args) == 0
    assert nbformat.read(target, as_version=4).metadata["labkit"]["notebook"] == "00_welcome"


def test_release_refuses_to_write_over_its_source(tmp_path):
    src = _source_notebook(tmp_path / "00_welcome.ipynb")
    before = _sha(src)
    with pytest.raises(ValueError, match="would overwrite the source notebook"):
        release([src], tmp_path, force=True)
    assert _sha(src) == before


def test_release_unbalanced_markers_names_notebook_and_cell_and_writes_nothing(tmp_path, capsys):
    good = _source_notebook(tmp_path / "a" / "00_welcome.ipynb")
    bad_cell = nt.code("def f():\n    ### BEGIN SOLUTION\n    return 1\n")
    bad_cell.metadata["nbgrader"] = {"grade_id": "f_solution", "solution": True}
    bad = _source_notebook(tmp_path / "b" / "01_bad.ipynb", [bad_cell])
    args = SimpleNamespace(notebooks=[str(good), str(bad)], out=str(tmp_path / "rel"), force=False)
    assert release_cli(args) == 1
    err = capsys.readouterr().err
    n = len(nbformat.read(bad, as_version=4).cells)
    assert f"01_bad.ipynb, cell {n} (grade_id 'f_solution'): '### BEGIN SOLUTION' on line 2 has no matching" in err
    assert not (tmp_path / "rel").exists()


def test_release_default_notebooks_and_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = SimpleNamespace(notebooks=[], out="release", force=False)
    assert release_cli(args) == 2
    assert "none found in notebooks/" in capsys.readouterr().err
    _source_notebook(tmp_path / "notebooks" / "00_welcome.ipynb")
    assert release_cli(args) == 0
    assert (tmp_path / "release" / "00_welcome.ipynb").exists()
    assert release_cli(SimpleNamespace(notebooks=["missing.ipynb"], out="r2", force=False)) == 1
    assert "missing.ipynb: no such notebook" in capsys.readouterr().err
    (tmp_path / "broken.ipynb").write_text("{not json")
    assert release_cli(SimpleNamespace(notebooks=["broken.ipynb"], out="r2", force=False)) == 1
    assert "broken.ipynb: not a readable notebook" in capsys.readouterr().err


def test_student_version_does_not_modify_its_input():
    nb = nt.new_notebook("00_welcome", [nt.solution(SOLUTION)])
    before = nbformat.writes(nb)
    student, n_sol, n_hidden = student_version(nb)
    assert nbformat.writes(nb) == before and (n_sol, n_hidden) == (2, 0)


def test_the_shipped_welcome_notebook_releases_cleanly(tmp_path):
    src = Path(__file__).resolve().parents[1] / "notebooks" / "00_welcome.ipynb"
    if not src.exists():
        pytest.skip("notebooks/00_welcome.ipynb is not generated yet")
    (r,) = release([src], tmp_path)
    assert r.solutions == 4 and r.hidden_cells == 4
    nb = nbformat.read(src, as_version=4)
    assert nb.metadata["labkit"]["notebook"] == "00_welcome"
