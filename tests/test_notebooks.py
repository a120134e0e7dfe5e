"""Notebooks: each is built from its jupytext source and committed executed; nbval setup (warnings and progress
bars never fail `pytest --nbval`); the build's rules for sources."""
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from labkit.course import build, colab_url, repo_url
from labkit.course.nbval_plugin import drop_volatile

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_drop_volatile_keeps_stdout_results_and_errors():
    outs = [new_output("stream", name="stderr", text="UserWarning: x\n"),
            new_output("stream", name="stdout", text="lesson\n"),
            new_output("display_data", data={"application/vnd.jupyter.widget-view+json": {"model_id": "a"},
                                             "text/plain": " 10%|#  | 1/10"}),
            new_output("execute_result", data={"text/plain": "3"}, execution_count=1),
            new_output("error", ename="ValueError", evalue="x", traceback=[])]
    kept = drop_volatile(outs)
    assert [o["output_type"] for o in kept] == ["stream", "execute_result", "error"]
    assert kept[0]["name"] == "stdout"


def _stored(cell, outputs):
    cell.execution_count = 1
    cell.outputs = outputs
    return cell


def _run_nbval(tmp_path, *plugin_args):
    # an ini of its own: pytest would otherwise find the repo's pyproject (whose addopts load the
    # plugin) through the sanitize file's path
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(tmp_path / "pytest.ini"), "--nbval", "-q", "-p",
         "no:cacheprovider", *plugin_args,
         "--nbval-sanitize-with", str(ROOT / "tests" / "nbval_sanitize.cfg"), "--nbval-current-env", "nb.ipynb"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)


@pytest.mark.notebook
def test_nbval_ignores_warnings_and_progress_bars_with_the_plugin(tmp_path):
    warn = "import warnings\nwarnings.warn('only sometimes')\nprint('lesson')"
    quiet = "print('lesson')"
    nb = new_notebook(cells=[
        new_markdown_cell("# t"),
        # stored: a warning and a progress widget that the fresh run will not produce
        _stored(new_code_cell(quiet), [
            new_output("stream", name="stderr", text="UserWarning: old\n"),
            new_output("display_data", data={"application/vnd.jupyter.widget-view+json": {"model_id": "m"},
                                             "text/plain": "  0%|          | 0/5"}),
            new_output("stream", name="stdout", text="lesson\n")]),
        # fresh run: a warning the stored output does not have
        _stored(new_code_cell(warn), [new_output("stream", name="stdout", text="lesson\n")]),
        # volatile text is sanitised: a memory address
        _stored(new_code_cell("print(object.__repr__(object()))"),
                [new_output("stream", name="stdout", text="<object object at 0x7f00deadbeef>\n")]),
    ])
    nbformat.write(nb, str(tmp_path / "nb.ipynb"))
    with_plugin = _run_nbval(tmp_path, "-p", "labkit.course.nbval_plugin")
    assert with_plugin.returncode == 0, with_plugin.stdout[-3000:]
    without = _run_nbval(tmp_path)
    # what the plugin protects against
    assert without.returncode != 0 and "stderr" in without.stdout, without.stdout[-3000:]


def test_notebooks_follow_the_kit_rules():
    """Every notebook: the Colab badge first, the install cell (a no-op when labkit is importable) second."""
    if not NOTEBOOKS:
        pytest.skip("no notebooks yet")
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        first, second = nb.cells[0], nb.cells[1]
        assert first.cell_type == "markdown" and f"notebooks/{path.name}" in first.source, path.name
        assert "colab-badge.svg" in first.source, path.name
        assert second.cell_type == "code" and second.source.startswith("try:\n    import labkit"), path.name


def test_every_notebook_has_a_source_and_every_source_a_notebook():
    assert [p.stem for p in NOTEBOOKS] == build.source_names()


@pytest.mark.parametrize("name", build.source_names())
def test_notebook_is_built_from_its_source_and_committed_executed(name):
    diff = build.differences(name)
    assert not diff, (f"notebooks/{name}.ipynb differs from notebooks/src/{name}.py: run `labkit build-notebooks "
                      f"{name}` and execute it (README, instructor workflow):\n" + "\n".join(diff[:10]))
    nb = nbformat.read(build.notebook_path(name), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "commit the notebook executed (smoke mode)"
    assert not any(o.get("output_type") == "error" for c in code for o in c.outputs)


# ---------------------------------------------------------------- the build's rules

SOURCE = '''# This preamble describes the file; it is not a cell.

# %% [markdown]
# # 07 · A test notebook
#
# Intro text.

# %%
import torch

from labkit.grading import check

# %% tags=["solution"]
def softmax_with_temperature(logits, temperature=1.0):
    """softmax(logits / T)."""
    ### BEGIN SOLUTION
    return torch.softmax(logits / temperature, dim=-1)
    ### END SOLUTION

# %% tags=["tests"]
check("welcome.softmax", softmax_with_temperature)

# %% tags=["raises-exception"]
raise ValueError("shown on purpose")
'''


def _source(tmp_path, text, name="07_test"):
    path = tmp_path / f"{name}.py"
    path.write_text(text, encoding="utf-8")
    return path


def test_build_turns_tagged_cells_into_graded_cells(tmp_path):
    nb = build.build_notebook("07_test", _source(tmp_path, SOURCE))
    kinds = [(c.cell_type, c.metadata.get("nbgrader", {}).get("grade_id"), c.metadata.get("tags")) for c in nb.cells]
    assert kinds == [("markdown", None, None), ("code", None, None), ("code", None, None),
                     ("code", "softmax_with_temperature_solution", None),
                     ("code", "welcome_softmax_visible", None), ("code", "welcome_softmax_hidden", None),
                     ("code", None, ["raises-exception"])]
    title, install = nb.cells[0].source, nb.cells[1].source
    assert title == (f"# 07 · A test notebook\n\n[![Open In Colab](https://colab.research.google.com/assets/"
                     f"colab-badge.svg)]({colab_url('07_test')})\n\nIntro text.")
    assert f'"git", "clone", "--depth", "1", "{repo_url()}"' in install
    assert nb.cells[2].source == "import torch\n\nfrom labkit.grading import check"  # no preamble, no tags line
    assert nb.cells[4].source == 'check("welcome.softmax", softmax_with_temperature)'
    hidden = nb.cells[5]
    assert hidden.source.startswith("### BEGIN HIDDEN TESTS\n") and "hidden=True" in hidden.source
    assert hidden.metadata["nbgrader"]["points"] == 2 and hidden.metadata["nbgrader"]["grade"]  # from the bank
    assert nb.metadata["labkit"] == {"notebook": "07_test"}


@pytest.mark.parametrize("old, new, message", [
    ("# # 07 · A test notebook", "# Not a title", "first cell must be markdown opening with the '# Title' line"),
    ('check("welcome.softmax", softmax_with_temperature)', 'check("welcome.nope", softmax_with_temperature)',
     r"07_test.py:20 \(cell 4\): unknown question id"),
    ('check("welcome.softmax", softmax_with_temperature)', "print(1)",
     r"07_test.py:20 \(cell 4\): a \"tests\" cell holds exactly one call"),
    ("    ### BEGIN SOLUTION\n", "", r"07_test.py:13 \(cell 3\): .*no '### BEGIN SOLUTION'"),
    ('# %% tags=["raises-exception"]', '# %% [markdown] tags=["solution"]',
     r"07_test.py:23 \(cell 5\): tags \['solution'\] belong on code"),
    ('raise ValueError("shown on purpose")', 'def softmax_with_temperature():\n    ### BEGIN SOLUTION\n    pass\n'
                                             '    ### END SOLUTION', "duplicate nbgrader grade_id"),
])
def test_build_names_the_cell_that_breaks_a_rule(tmp_path, old, new, message):
    text = SOURCE.replace(old, new, 1)
    if "duplicate" in message:
        text = text.replace('tags=["raises-exception"]', 'tags=["solution"]')
    assert text != SOURCE
    with pytest.raises(build.SourceError, match=message):
        build.build_notebook("07_test", _source(tmp_path, text))


def test_build_keeps_the_outputs_of_unchanged_cells_only(tmp_path):
    old = build.build_notebook("07_test", _source(tmp_path, SOURCE))
    for i, cell in enumerate(old.cells):
        if cell.cell_type == "code":
            _stored(cell, [new_output("stream", name="stdout", text=f"output {i}\n")])
            cell.metadata["execution"] = {"iopub.status.idle": "then"}
    old.metadata["widgets"] = {"state": "kept"}
    edited = SOURCE.replace("import torch\n", "import torch  # changed\n")
    new = build.build_notebook("07_test", _source(tmp_path, edited))
    stale = build.carry_outputs(new, old)
    assert stale == 1
    changed = new.cells[2]
    assert changed.outputs == [] and changed.execution_count is None and "execution" not in changed.metadata
    assert changed.id != old.cells[2].id
    for i in (1, 3, 4, 5, 6):
        assert new.cells[i].outputs == old.cells[i].outputs and new.cells[i].id == old.cells[i].id
        assert new.cells[i].metadata["execution"] == {"iopub.status.idle": "then"}
    assert new.metadata["widgets"] == {"state": "kept"}
    prose = build.build_notebook("07_test", _source(tmp_path, SOURCE.replace("Intro text.", "New intro.")))
    assert build.carry_outputs(prose, old) == 0  # a markdown edit leaves nothing to execute


def test_build_check_fails_on_a_stale_notebook_and_names_it(tmp_path, monkeypatch, capsys):
    from labkit.cli import main

    src, out = tmp_path / "src", tmp_path / "nb"
    src.mkdir(), out.mkdir()
    _source(src, SOURCE)
    monkeypatch.setattr(build, "SOURCES", src)
    monkeypatch.setattr(build, "NOTEBOOKS", out)
    monkeypatch.setattr(build, "ROOT", tmp_path)
    assert main(["build-notebooks", "--check", "07"]) == 1
    assert "07_test: differs" in capsys.readouterr().out and not (out / "07_test.ipynb").exists()
    assert main(["build-notebooks", "07"]) == 0
    assert "wrote nb/07_test.ipynb (6 code cell(s) new or changed: execute it)" in capsys.readouterr().out
    assert (out / "07_test.ipynb").stat().st_mode & 0o777 == 0o644  # readable, not the temporary file's 0600
    assert main(["build-notebooks", "--check"]) == 0
    _source(src, SOURCE.replace("Intro text.", "Another intro."))
    assert main(["build-notebooks", "--check", "07_test"]) == 1
    assert "cell 1: source differ" in capsys.readouterr().out
    assert main(["build-notebooks", "08"]) == 2
    assert "notebook '08': no source" in capsys.readouterr().err


def test_repo_url_is_the_one_setting_in_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    url = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    assert repo_url() == url.rstrip("/")
    assert colab_url("00_welcome") == (f"https://colab.research.google.com/github/{url[len('https://github.com/'):]}"
                                       "/blob/main/notebooks/00_welcome.ipynb")
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert colab_url(path.stem) in nb.cells[0].source and repo_url() in nb.cells[1].source, path.name
