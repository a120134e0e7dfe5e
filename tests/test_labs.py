"""`labkit labs`: runs notebooks headless, collects records and claims, reports errors."""
import json
from types import SimpleNamespace

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from labkit.course.labs import labs_cli, report_markdown


def _write(path, sources):
    nb = new_notebook(cells=[new_markdown_cell("# t")] + [new_code_cell(s) for s in sources])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))
    return path


def test_labs_runs_notebooks_and_writes_the_report(tmp_path, capsys):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    (nbdir / "data.txt").write_text("42")
    good = _write(nbdir / "01_good.ipynb", [
        "import os\nfrom labkit.course.report import record, claim\nfrom labkit.device import run_mode",
        "value = int(open('data.txt').read())  # the notebook's folder is the working directory\n"
        "record('answer', value)\nrecord('mode seen', run_mode())",
        "claim('the answer is 42', value == 42, detail=str(value))\nclaim('the answer is odd', value % 2 == 1)",
    ])
    bad = _write(nbdir / "02_bad.ipynb", [
        "from labkit.report import record\nrecord('before the error', 1)",
        "raise ValueError('boom in the lab')",
        "record('never', 2)",
    ])
    sources_before = good.read_bytes(), bad.read_bytes()
    out = tmp_path / "reports"
    rc = labs_cli(SimpleNamespace(notebooks=[str(good), str(bad)], mode="smoke", out=str(out), timeout=300))
    assert rc == 1
    printed = capsys.readouterr().out
    assert "1/2 notebooks ran, 1/2 claims reproduced" in printed and "failed: 02_bad" in printed
    rep = json.loads((out / "report.json").read_text())
    assert rep["mode"] == "smoke" and rep["device"] and rep["versions"]["torch"]
    g, b = rep["labs"]
    assert g["ok"] and g["error"] is None and g["records"] == {"answer": 42, "mode seen": "smoke"}
    assert g["claims"] == [{"text": "the answer is 42", "passed": True, "detail": "42"},
                           {"text": "the answer is odd", "passed": False, "detail": ""}]
    assert not b["ok"] and b["error"].startswith("cell 3: ValueError: boom in the lab")
    assert b["records"] == {"before the error": 1}
    md = (out / "report.md").read_text()
    assert "| 01_good | ok | 1/2 |" in md and "| 02_bad | **error** | 0/0 |" in md
    assert "- ✓ the answer is 42 (42)" in md and "- ✗ the answer is odd" in md and "| answer | 42 |" in md
    executed = nbformat.read(out / "executed" / "01_good.ipynb", as_version=4)
    assert executed.cells[3].outputs[0]["text"] == "claim ✓ the answer is 42\nclaim ✗ the answer is odd\n"
    assert (good.read_bytes(), bad.read_bytes()) == sources_before  # executed copies go to OUT, not over the sources


def test_report_markdown_without_results():
    md = report_markdown({"mode": "full", "device": "gpu", "versions": {}, "labs": [
        {"notebook": "00_x", "ok": True, "error": None, "seconds": 1.0, "records": {}, "claims": []}]})
    assert "(no key results recorded)" in md and "| 00_x | ok | 0/0 | 1 s |" in md


def test_labs_with_no_notebooks(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert labs_cli(SimpleNamespace(notebooks=[], mode=None, out="r", timeout=10)) == 2
    assert "none found" in capsys.readouterr().err


def test_the_old_module_paths_still_import_the_same_objects():
    """labs, report, bench, kernel and the nbval plugin moved; code that imports the old paths keeps working."""
    import labkit.bench
    import labkit.benchmarks
    import labkit.course.kernel
    import labkit.course.labs
    import labkit.course.nbval_plugin
    import labkit.course.report
    import labkit.grading.kernel
    import labkit.grading.nbval_plugin
    import labkit.labs
    import labkit.report

    assert labkit.labs.labs_cli is labkit.course.labs.labs_cli
    assert labkit.report.claim is labkit.course.report.claim and labkit.report.record is labkit.course.report.record
    assert labkit.bench.time_fn is labkit.benchmarks.time_fn
    assert labkit.bench.run_benchmark is labkit.benchmarks.run_benchmark
    assert labkit.grading.kernel.CurrentEnvKernelManager is labkit.course.kernel.CurrentEnvKernelManager
    assert labkit.grading.nbval_plugin.drop_volatile is labkit.course.nbval_plugin.drop_volatile
