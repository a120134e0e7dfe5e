"""labkit.course.report (also importable as labkit.report): record/claim print and store what `labkit labs` collects."""
import json

import numpy as np
import pytest
import torch

from labkit.course import report


def test_claim_prints_its_syllabus_numbers_without_results_and_appends_json(tmp_path, monkeypatch, capsys):
    path = tmp_path / "r.jsonl"
    monkeypatch.setenv("LABKIT_REPORT_FILE", str(path))
    assert report.claim(1, "ensemble beats its best member", torch.tensor(True), detail="0.97 vs 0.95") is None
    report.claim((4, 2, 4), "anti-expert removes darn", np.bool_(False))
    assert capsys.readouterr().out == ("claim ✓ [1] ensemble beats its best member\n"
                                       "claim ✗ [2, 4] anti-expert removes darn\n")
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(e["type"], e["syllabus"], e["text"], e["passed"], e["detail"]) for e in lines] == [
        ("claim", [1], "ensemble beats its best member", True, "0.97 vs 0.95"),
        ("claim", [2, 4], "anti-expert removes darn", False, "")]
    assert report.read_report_file(path)["claims"] == [
        {"syllabus": [1], "text": "ensemble beats its best member", "passed": True, "detail": "0.97 vs 0.95"},
        {"syllabus": [2, 4], "text": "anti-expert removes darn", "passed": False, "detail": ""}]


@pytest.mark.parametrize("syllabus", ["ensemble beats its best member", 0, 21, 2.0, True, (), (3, 25), None])
def test_a_claim_without_a_valid_syllabus_number_is_an_error(syllabus, capsys):
    # the old call claim(text, passed) lands here too: its first argument is the text
    with pytest.raises(ValueError, match=r"syllabus claim number\(s\) it tests \(1-20\)"):
        report.claim(syllabus, "a claim", True)
    assert capsys.readouterr().out == ""


def test_the_syllabus_has_twenty_numbered_claims():
    assert sorted(report.SYLLABUS_CLAIMS) == list(range(1, 21))
    assert all(isinstance(t, str) and t for t in report.SYLLABUS_CLAIMS.values())


def test_record_is_silent_and_converts_values(tmp_path, monkeypatch, capsys):
    path = tmp_path / "r.jsonl"
    monkeypatch.setenv("LABKIT_REPORT_FILE", str(path))
    report.record("acc", torch.tensor(0.5))
    report.record("accs", np.array([0.25, 0.75]))
    report.record("table", {"a": torch.tensor([1, 2]), 3: float("nan")})
    report.record("acc", 0.625)  # recorded again: the last value wins
    assert capsys.readouterr().out == ""
    parsed = report.read_report_file(path)
    assert parsed["records"] == {"acc": 0.625, "accs": [0.25, 0.75], "table": {"a": [1, 2], "3": "nan"}}
    assert parsed["claims"] == []
    assert report.entries()[-1]["key"] == "acc"


def test_without_report_file_nothing_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LABKIT_REPORT_FILE", raising=False)
    monkeypatch.chdir(tmp_path)
    report.claim(20, "works offline", True)
    assert list(tmp_path.iterdir()) == []
    assert report.entries()[-1]["text"] == "works offline"


def test_bad_arguments_and_broken_report_lines(tmp_path):
    with pytest.raises(ValueError, match="key must be a non-empty string"):
        report.record("", 1)
    with pytest.raises(ValueError, match="text must be a non-empty string"):
        report.claim(3, " ", True)
    with pytest.raises(ValueError, match="passed must be one boolean"):
        report.claim(3, "x", torch.tensor([True, False]))
    path = tmp_path / "r.jsonl"
    path.write_text('{"type": "record", "key": "a", "value": 1}\n'
                    '{"type": "claim", "text": "old", "passed": true}\n{"type": "cla')
    assert report.read_report_file(path) == {
        "records": {"a": 1}, "claims": [{"syllabus": [], "text": "old", "passed": True, "detail": ""}]}
    assert report.read_report_file(tmp_path / "missing.jsonl") == {"records": {}, "claims": []}


def test_every_claim_in_the_notebook_sources_names_a_syllabus_claim():
    """Read statically, so a claim without its number fails here before any notebook runs."""
    import ast
    from pathlib import Path

    sources = sorted((Path(__file__).resolve().parents[1] / "notebooks" / "src").glob("[0-9][0-9]_*.py"))
    assert sources
    numbers = set()
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "claim":
                where = f"{path.name}:{node.lineno}"
                assert node.args, f"{where}: claim() without arguments"
                first = ast.literal_eval(node.args[0])  # a literal number or tuple, not computed
                found = list(first) if isinstance(first, tuple) else [first]
                assert found and all(type(n) is int and 1 <= n <= 20 for n in found), f"{where}: {first!r}"
                numbers.update(found)
    assert numbers  # the labs do check syllabus claims
