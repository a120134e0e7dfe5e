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


# ------------------------------------------------------------------ merge and generic error paths


def _one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _zoo_config(tmp_path, **model_params):
    import yaml

    from labkit import zoo

    cfg = {"merge_method": "ties", "base_model": str(zoo.path("lm/base")),
           "models": [{"model": str(zoo.path("lm/ft-add")), "parameters": {"weight": 1, **model_params}}]}
    path = tmp_path / "m.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_yaml_syntax_error(tmp_path, capsys):
    (tmp_path / "bad.yml").write_text("merge_method: [ties\n")
    code = main(["merge", str(tmp_path / "bad.yml"), str(tmp_path / "out")])
    _one_line_error(capsys, code, "YAML syntax error at line 2")


def test_bad_parameter_type_names_model_and_parameter(tmp_path, capsys):
    code = main(["merge", str(_zoo_config(tmp_path, density="half")), str(tmp_path / "out")])
    _one_line_error(capsys, code, "ft-add", "'density' must be a number in [0, 1], not 'half'")


def test_a_folder_given_as_config(tmp_path, capsys):
    code = main(["merge", str(tmp_path), str(tmp_path / "out")])
    _one_line_error(capsys, code, "is a directory; give the YAML file")


def test_device_that_this_torch_lacks(tmp_path, capsys):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", str(_zoo_config(tmp_path)), str(tmp_path / "out"), "--device", "cuda"])
    _one_line_error(capsys, exit_info.value.code, "--device", "has no usable CUDA device")


def test_pickle_checkpoint_refused_in_one_line(tmp_path, capsys):
    import shutil

    import torch
    from safetensors.torch import load_file

    from labkit import zoo

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(zoo.path("lm/ft-add") / "model.safetensors", tmp_path / "w.safetensors")
    torch.save(load_file(tmp_path / "w.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "config.json").write_text("{}")
    cfg = _zoo_config(tmp_path)
    cfg.write_text(cfg.read_text().replace(str(zoo.path("lm/ft-add")), str(pickled)))
    code = main(["merge", str(cfg), str(tmp_path / "out")])
    _one_line_error(capsys, code, "only pickle checkpoints", "--allow-pickle")


def test_output_over_an_input_is_refused_with_force(tmp_path, capsys):
    from labkit import zoo

    before = sorted(p.name for p in zoo.zoo_root().iterdir())
    code = main(["merge", str(_zoo_config(tmp_path)), str(zoo.zoo_root()), "--force"])
    _one_line_error(capsys, code, "contains the input model")
    assert sorted(p.name for p in zoo.zoo_root().iterdir()) == before


def test_unexpected_errors_are_one_line_and_debug_keeps_the_traceback(tmp_path, capsys, monkeypatch):
    import pytest

    from labkit.merge import yaml_runner

    def bug(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(yaml_runner, "load_plan", bug)
    code = main(["merge", str(tmp_path / "m.yml"), str(tmp_path / "out")])
    _one_line_error(capsys, code, "TypeError: a bug", "LABKIT_DEBUG=1")
    monkeypatch.setenv("LABKIT_DEBUG", "1")
    with pytest.raises(TypeError, match="a bug"):
        main(["merge", str(tmp_path / "m.yml"), str(tmp_path / "out")])


def test_bench_out_pointing_at_a_file_is_refused_before_running(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code = main(["bench", "merge", "--smoke", "--out", str(tmp_path / "f")])
    _one_line_error(capsys, code, "is not a writable folder")


def test_usage_errors_are_one_line():
    r = subprocess.run([sys.executable, "-m", "labkit.cli", "merge"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "required: config, out_dir" in r.stderr
