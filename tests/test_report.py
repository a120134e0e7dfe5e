"""labkit.course.report (also importable as labkit.report): record/claim print and store what `labkit labs` collects."""
import json

import numpy as np
import pytest
import torch

from labkit.course import report


def test_claim_prints_one_line_without_numbers_and_appends_json(tmp_path, monkeypatch, capsys):
    path = tmp_path / "r.jsonl"
    monkeypatch.setenv("LABKIT_REPORT_FILE", str(path))
    assert report.claim("ensemble beats its best member", torch.tensor(True), detail="0.97 vs 0.95") is None
    report.claim("anti-expert removes darn", np.bool_(False))
    assert capsys.readouterr().out == "claim ✓ ensemble beats its best member\nclaim ✗ anti-expert removes darn\n"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(e["type"], e["text"], e["passed"], e["detail"]) for e in lines] == [
        ("claim", "ensemble beats its best member", True, "0.97 vs 0.95"),
        ("claim", "anti-expert removes darn", False, "")]


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
    report.claim("works offline", True)
    assert list(tmp_path.iterdir()) == []
    assert report.entries()[-1]["text"] == "works offline"


def test_bad_arguments_and_broken_report_lines(tmp_path):
    with pytest.raises(ValueError, match="key must be a non-empty string"):
        report.record("", 1)
    with pytest.raises(ValueError, match="text must be a non-empty string"):
        report.claim(" ", True)
    with pytest.raises(ValueError, match="passed must be one boolean"):
        report.claim("x", torch.tensor([True, False]))
    path = tmp_path / "r.jsonl"
    path.write_text('{"type": "record", "key": "a", "value": 1}\n{"type": "cla')
    assert report.read_report_file(path) == {"records": {"a": 1}, "claims": []}
    assert report.read_report_file(tmp_path / "missing.jsonl") == {"records": {}, "claims": []}
