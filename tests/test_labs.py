"""`labkit labs`: runs notebooks headless, collects records and claims, reports errors."""
import json
from types import SimpleNamespace

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from labkit.course.labs import labs_cli, report_markdown, syllabus_table


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
        "claim(1, 'the answer is 42', value == 42, detail=str(value))\n"
        "claim((1, 3), 'the answer is odd', value % 2 == 1)\nclaim(2, 'the answer is even', value % 2 == 0)",
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
    assert "1/2 notebooks ran, 2/3 checks passed" in printed and "failed: 02_bad" in printed
    # claim 1: one check passed, one failed; 2: passed; 3: failed; the other 17 unchecked
    assert "syllabus claims: 1 reproduced, 1 partly, 1 not reproduced, 17 not yet taught" in printed
    rep = json.loads((out / "report.json").read_text())
    assert rep["mode"] == "smoke" and rep["device"] and rep["versions"]["torch"]
    g, b = rep["labs"]
    assert g["ok"] and g["error"] is None and g["records"] == {"answer": 42, "mode seen": "smoke"}
    assert g["claims"] == [{"syllabus": [1], "text": "the answer is 42", "passed": True, "detail": "42"},
                           {"syllabus": [1, 3], "text": "the answer is odd", "passed": False, "detail": ""},
                           {"syllabus": [2], "text": "the answer is even", "passed": True, "detail": ""}]
    rows = {row["claim"]: row for row in rep["syllabus"]}
    assert sorted(rows) == list(range(1, 21))
    assert [(rows[n]["status"], rows[n]["labs"], [c["text"] for c in rows[n]["checks"]]) for n in (1, 2, 3, 4)] == [
        ("partly", ["01_good"], ["the answer is 42", "the answer is odd"]),
        ("reproduced", ["01_good"], ["the answer is even"]),
        ("not reproduced", ["01_good"], ["the answer is odd"]),
        ("not yet taught", [], [])]
    assert not b["ok"] and b["error"].startswith("cell 3: ValueError: boom in the lab")
    assert b["records"] == {"before the error": 1}
    md = (out / "report.md").read_text()
    assert "| 01_good | ok | 2/3 |" in md and "| 02_bad | **error** | 0/0 |" in md
    assert "- ✓ [1] the answer is 42 (42)" in md and "- ✗ [1, 3] the answer is odd" in md and "| answer | 42 |" in md
    assert "| 1 | An ensemble beats its best member" in md and "| **partly** | 1/2 |" in md
    assert "| 3 | " in md and "| **not reproduced** | 0/1 | ✗ 01_good: the answer is odd |" in md
    assert "| 20 | " in md and "| not yet taught | - | - |" in md and "A lab failed" in md
    executed = nbformat.read(out / "executed" / "01_good.ipynb", as_version=4)
    assert executed.cells[3].outputs[0]["text"] == ("claim ✓ [1] the answer is 42\nclaim ✗ [1, 3] the answer is odd\n"
                                                    "claim ✓ [2] the answer is even\n")
    assert (good.read_bytes(), bad.read_bytes()) == sources_before  # executed copies go to OUT, not over the sources


def test_report_markdown_without_results():
    md = report_markdown({"mode": "full", "device": "gpu", "versions": {}, "labs": [
        {"notebook": "00_x", "ok": True, "error": None, "seconds": 1.0, "records": {}, "claims": []}]})
    assert "(no key results recorded)" in md and "| 00_x | ok | 0/0 | 1 s |" in md
    assert md.count("| not yet taught | - | - |") == 20 and "A lab failed" not in md


def test_syllabus_table_merges_checks_across_labs():
    def lab(name, *claims):
        return {"notebook": name, "claims": [{"syllabus": s, "text": t, "passed": p, "detail": ""}
                                             for s, t, p in claims]}
    rows = syllabus_table([lab("01_a", ([1], "a1", True), ([2, 5], "a2", True), ([], "old claim", False)),
                           lab("02_b", ([5], "b5", False), ([2], "b2", True), ([9], "b9", False))])
    status = {r["claim"]: r["status"] for r in rows}
    assert status == {**{n: "not yet taught" for n in range(1, 21)}, 1: "reproduced", 2: "reproduced",
                      5: "partly", 9: "not reproduced"}
    by = {r["claim"]: r for r in rows}
    assert by[2]["labs"] == ["01_a", "02_b"] and [c["text"] for c in by[2]["checks"]] == ["a2", "b2"]
    assert [(c["lab"], c["passed"]) for c in by[5]["checks"]] == [("01_a", True), ("02_b", False)]
    assert all("old claim" not in [c["text"] for c in r["checks"]] for r in rows)  # no number: in no row


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


def test_a_hung_cell_is_named_and_the_notebook_rerun_once(tmp_path, capsys):
    """A cell past --cell-timeout stops the notebook after that cell's limit, not the notebook's budget; the
    notebook is rerun once in a fresh kernel, and the report says which cell hung and that it was rerun."""
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    hung = _write(nbdir / "03_hung.ipynb", [
        "from labkit.course.report import record\nrecord('started', 1)",
        "import time\ntime.sleep(120)",
        "record('never', 2)",
    ])
    out = tmp_path / "reports"
    rc = labs_cli(SimpleNamespace(notebooks=[str(hung)], mode="smoke", out=str(out), timeout=300,
                                  cell_timeout=2.0, retries=1))
    assert rc == 1
    printed = capsys.readouterr().out
    assert printed.count("cell 3 ran past its time limit (2 s per cell") == 2, printed  # first run and retry line
    assert "retry 03_hung" in printed
    lab = json.loads((out / "report.json").read_text())["labs"][0]
    assert lab["timed_out_cell"] == 2 and lab["retried_after"].startswith("cell 3 ran past")
    assert lab["seconds"] < 60, "the cell limit, not the 300 s notebook budget, ended the run"
    assert "Rerun in a fresh kernel after: cell 3" in (out / "report.md").read_text()
