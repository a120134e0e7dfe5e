"""nbval setup: warnings and progress bars never fail `pytest --nbval`; notebooks follow the kit's rules."""
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from labkit.grading.nbval_plugin import drop_volatile

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
    with_plugin = _run_nbval(tmp_path, "-p", "labkit.grading.nbval_plugin")
    assert with_plugin.returncode == 0, with_plugin.stdout[-3000:]
    without = _run_nbval(tmp_path)
    assert without.returncode != 0 and "stderr" in without.stdout, without.stdout[-3000:]  # what the plugin protects against


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


def test_welcome_notebook_is_generated_from_its_script_and_executed():
    path = ROOT / "notebooks" / "00_welcome.ipynb"
    if not path.exists():
        pytest.skip("notebooks/00_welcome.ipynb is missing")
    nb = nbformat.read(path, as_version=4)
    sys.path.insert(0, str(ROOT / "notebooks" / "src"))
    try:
        import make_00_welcome as script
    finally:
        sys.path.pop(0)
    assert [c.source for c in nb.cells] == [c.source for c in script.cells], \
        "notebooks/00_welcome.ipynb differs from notebooks/src/make_00_welcome.py: regenerate and re-execute it"
    assert nb.metadata["labkit"] == {"notebook": "00_welcome"}
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "commit the notebook executed (smoke mode)"
    assert not any(o.get("output_type") == "error" for c in code for o in c.outputs)
