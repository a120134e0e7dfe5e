"""notebook_tools (markers, cell builders) and `labkit release`."""
import hashlib
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest

from labkit.grading import notebook_tools as nt
from labkit.cli import main
from labkit.course import repo_url
from labkit.grading import release as release_mod
from labkit.grading.release import ReleaseURL, release, release_cli, release_url, student_version

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
    for c in nb.cells[:2]:  # badge and install cell of the fake kit of _kit()
        c.source = c.source.replace(repo_url().removeprefix("https://github.com/"), "teach/kit")
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
    assert release_cli(args) == 2
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
    assert release_cli(args) == 2
    err = capsys.readouterr().err
    n = len(nbformat.read(bad, as_version=4).cells)
    assert f"01_bad.ipynb, cell {n} (grade_id 'f_solution'): '### BEGIN SOLUTION' on line 2 has no matching" in err
    assert not (tmp_path / "rel").exists()


def _kit(root: Path, release_url_setting: str | None = None) -> Path:
    """A fake kit checkout: pyproject.toml with the repository URL (and a release-url setting)."""
    text = '[project]\nname = "x"\n[project.urls]\nRepository = "https://github.com/teach/kit"\n'
    if release_url_setting:
        text += f'[tool.labkit]\nrelease-url = "{release_url_setting}"\n'
    root.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text(text)
    return root


def test_release_defaults_come_from_the_kit_checkout_whatever_the_directory(tmp_path, monkeypatch, capsys):
    kit = _kit(tmp_path / "kit")
    monkeypatch.setattr(release_mod, "ROOT", kit)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    args = SimpleNamespace(notebooks=[], out=None, force=False, url=None)
    assert release_cli(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"none found in {kit / 'notebooks'}/" in err
    _source_notebook(kit / "notebooks" / "00_welcome.ipynb")
    assert release_cli(args) == 0
    out = capsys.readouterr().out
    nb = nbformat.read(kit / "release" / "00_welcome.ipynb", as_version=4)
    assert not (elsewhere / "release").exists()
    text = "\n".join(c.source for c in nb.cells)
    assert "https://colab.research.google.com/github/teach/kit/blob/main/release/00_welcome.ipynb" in text
    assert '"git", "clone", "--depth", "1", "https://github.com/teach/kit", "labkit-repo"' in text
    assert "labkit-course" not in text and "/notebooks/" not in text
    assert "also holds the solution notebooks" in out  # the default clones the instructor's repository


def test_release_url_option_and_setting_point_badges_and_install_cell_at_the_release(tmp_path, monkeypatch):
    src = _source_notebook(tmp_path / "src" / "00_welcome.ipynb")
    kit = _kit(tmp_path / "kit", "https://github.com/course/student-kit/tree/fall/labs")
    monkeypatch.setattr(release_mod, "ROOT", kit)
    release([src], tmp_path / "a")  # the [tool.labkit] setting
    text = "\n".join(c.source for c in nbformat.read(tmp_path / "a" / "00_welcome.ipynb", as_version=4).cells)
    assert "(https://colab.research.google.com/github/course/student-kit/blob/fall/labs/00_welcome.ipynb)" in text
    assert '"https://github.com/course/student-kit", "labkit-repo"' in text
    # --url wins over the setting (through the CLI, from another directory)
    monkeypatch.chdir(tmp_path)
    assert main(["release", str(src), "--out", "b", "--url", "https://github.com/o/r"]) == 0
    text = "\n".join(c.source for c in nbformat.read(tmp_path / "b" / "00_welcome.ipynb", as_version=4).cells)
    assert "https://colab.research.google.com/github/o/r/blob/main/release/00_welcome.ipynb" in text
    assert '"https://github.com/o/r", "labkit-repo"' in text and "student-kit" not in text


@pytest.mark.parametrize("url, expected", [
    ("https://github.com/o/r", ReleaseURL("o/r", "main", "release")),
    ("https://github.com/o/r.git", ReleaseURL("o/r", "main", "release")),
    ("https://github.com/o/r/tree/dev", ReleaseURL("o/r", "dev", "")),
    ("https://github.com/o/r/tree/dev/a/b/", ReleaseURL("o/r", "dev", "a/b")),
])
def test_release_url_parsing(url, expected):
    assert ReleaseURL.parse(url) == expected
    assert expected.colab("01_x").endswith(f"/{expected.branch}/" + (f"{expected.path}/" if expected.path else "")
                                           + "01_x.ipynb")


def test_release_errors_are_one_line_exit_2_and_write_nothing(tmp_path, monkeypatch, capsys):
    src = _source_notebook(tmp_path / "00_welcome.ipynb")
    monkeypatch.setattr(release_mod, "ROOT", _kit(tmp_path / "kit"))
    monkeypatch.chdir(tmp_path)
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    (tmp_path / "broken.ipynb").write_text("{not json")
    cases = [
        ([str(src), "--out", "r", "--url", "https://gitlab.com/o/r"], "is not a GitHub repository or folder URL"),
        ([str(src), "--out", "r", "--url", "https://github.com/teach/kit/tree/main/notebooks"],
         "is the folder of the solution notebooks"),
        ([str(src), "--out", str(a_file)], "a_file is a file, not a folder"),
        (["missing.ipynb", "--out", "r"], "missing.ipynb: no such notebook"),
        (["broken.ipynb", "--out", "r"], "broken.ipynb: not a readable notebook"),
    ]
    for argv, message in cases:
        assert main(["release", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("labkit release: error: ") and message in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "r").exists() and a_file.read_text() == "keep me"
    monkeypatch.setattr(release_mod, "ROOT", _kit(tmp_path / "kit2", "ftp://nowhere"))
    assert main(["release", str(src), "--out", "r"]) == 2
    assert "[tool.labkit] release-url: release URL 'ftp://nowhere'" in capsys.readouterr().err
    monkeypatch.setenv("LABKIT_DEBUG", "1")  # the debug switch keeps the traceback
    with pytest.raises(ValueError, match="ftp://nowhere"):
        main(["release", str(src), "--out", "r"])
    monkeypatch.delenv("LABKIT_DEBUG")
    monkeypatch.setattr(release_mod, "ROOT", tmp_path / "site-packages")  # a wheel: no checkout
    assert main(["release", str(src), "--url", "https://github.com/o/r"]) == 2
    assert "give --out DIR: labkit is not installed from a checkout" in capsys.readouterr().err


def test_colab_links_to_other_repositories_are_left_alone(tmp_path):
    other = "https://colab.research.google.com/github/someone/paper/blob/main/demo.ipynb"
    src = _source_notebook(tmp_path / "00_welcome.ipynb", [nt.markdown(f"See [a demo]({other}).")])
    (r,) = release([src], tmp_path / "rel", url="https://github.com/course/student", root=_kit(tmp_path / "kit"))
    text = "\n".join(c.source for c in r.nb.cells)
    assert other in text
    assert "https://colab.research.google.com/github/course/student/blob/main/release/00_welcome.ipynb" in text


def test_a_link_to_the_solutions_left_in_a_cell_is_refused(tmp_path):
    link = nt.markdown("See [the solution](https://github.com/teach/kit/blob/main/notebooks/00_welcome.ipynb).")
    src = _source_notebook(tmp_path / "00_welcome.ipynb", [link])
    with pytest.raises(ValueError, match=r"cell \d+ links to the solution notebooks"):
        release([src], tmp_path / "rel", url="https://github.com/teach/kit", root=_kit(tmp_path / "kit"))
    assert not (tmp_path / "rel").exists()


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


def test_every_shipped_notebook_releases_pointing_at_the_release(tmp_path):
    sources = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
    url = release_url()  # the kit's own setting
    done = release(sources, tmp_path)
    assert len(done) == len(sources) >= 4
    for r in done:
        text = "\n".join(c.source for c in r.nb.cells)
        assert url.colab(r.source.stem) in text, r.source  # its badge opens the released notebook
        assert f'"{url.clone_url}", "labkit-repo"' in text
        assert "/notebooks/" not in text and "HIDDEN TESTS" not in text and "BEGIN SOLUTION" not in text
