"""The labkit command: errors are one line naming the problem, with a non-zero exit code."""
import subprocess
import sys

from labkit.cli import main


def test_merge_with_missing_config_is_one_line(tmp_path, capsys):
    code = main(["merge", str(tmp_path / "nope.yml"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("labkit merge: error:") and "nope.yml" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_unknown_zoo_entry_is_one_line(capsys):
    code = main(["zoo", "build", "lm/nope"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown zoo entry 'lm/nope'" in err


def test_unknown_subcommand_exits_with_usage():
    r = subprocess.run([sys.executable, "-m", "labkit.cli", "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_doctor_runs(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "device:" in out and "mode:" in out and "torch" in out
