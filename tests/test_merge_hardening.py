"""``labkit merge`` under bad input: OUT_DIR next to, inside or around the inputs, parameters out of
range or of the wrong type (refused before any tensor is read), NaN/inf in checkpoints, tokenizers
that disagree, every safetensors dtype, permissions, and what a killed run leaves behind. Each case
asserts the refusal message and that the inputs (and OUT_DIR) are byte-identical to before."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from labkit import merge as M
from labkit.merge import safetensors_io, yaml_runner
from labkit.merge.yaml_runner import run_merge_config
from test_merge_io import _ties, read_dir, tiny_llamas, write_config, write_tokenizer

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return tiny_llamas(tmp_path_factory.mktemp("tiny_llamas"))


def snapshot(*folders) -> dict:
    """Every file under ``folders`` with its SHA-256 (and every folder), to compare before/after."""
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if ".labkit-merge-" in p.name)


# ------------------------------------------------------------------------------------ OUT_DIR


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("where,message", [
    (lambda z: z / "ft0", "is the input model"),
    (lambda z: z, "contains the input model"),
    (lambda z: z / "base" / "merged", "is inside the input model"),
    (lambda z: z / "ft1" / ".." / "ft0", "is the input model"),
])
def test_out_dir_never_is_contains_or_is_inside_an_input(zoo, tmp_path, where, message, force):
    path = write_config(tmp_path / "m.yml", zoo, **_ties())
    before = snapshot(zoo)
    with pytest.raises(ValueError, match=message):
        run_merge_config(path, where(zoo), force=force, verbose=False)
    assert snapshot(zoo) == before


def test_out_dir_with_dotdot_is_resolved_and_leaves_nothing_else(zoo, tmp_path):
    path = write_config(tmp_path / "m.yml", zoo, **_ties())
    with pytest.raises(ValueError, match="not empty"):
        run_merge_config(path, tmp_path / "sub" / "..", verbose=False)  # is tmp_path itself
    (tmp_path / "sub").mkdir()
    out = run_merge_config(path, tmp_path / "sub" / ".." / "out", verbose=False)
    assert out == tmp_path / "out" and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.yml", "out", "sub"]


@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o002, 0o775, 0o664)])
def test_output_gets_the_users_normal_permissions(zoo, tmp_path, umask, dir_mode, file_mode):
    path = write_config(tmp_path / "m.yml", zoo, **_ties())
    old = os.umask(umask)
    try:
        out = run_merge_config(path, tmp_path / "out", verbose=False)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == dir_mode
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {p.name: file_mode for p in out.iterdir()}


# ------------------------------------------------------------------------------------ parameters


def _per_model(**params):
    cfg = _ties()
    cfg["models"][1]["parameters"].update(params)
    return cfg


BAD_PARAMETERS = [
    (_per_model(density=1.5), r"model '.*ft0'.*'density' must be in \[0, 1\], not 1.5"),
    (_per_model(density=-0.5), r"'density' must be in \[0, 1\], not -0.5"),
    (_per_model(density="half"), r"model '.*ft0'.*'density' must be a number in \[0, 1\], not 'half'"),
    (_per_model(weight=float("nan")), "'weight' must be finite, not nan"),
    (_per_model(weight=float("inf")), "'weight' must be finite, not inf"),
    (_per_model(weight=True), "'weight' must be a number, not True"),
    (_per_model(density=[0.5, 1.5]), r"'density' must be in \[0, 1\], not 1.5"),  # a gradient point
    (_per_model(density=[{"filter": "mlp", "value": 2}, {"value": 0.5}]), r"'density' must be in \[0, 1\], not 2"),
    (_ties(parameters={"normalize": "yes"}), "'normalize' must be true or false, not 'yes'"),
    (_ties(parameters={"lambda": "x"}), "'lambda' must be a number, not 'x'"),
    (_ties(parameters={"int8_mask": 3}), "'int8_mask' must be true or false"),
    ({"merge_method": "slerp", "base_model": "ft0", "parameters": {"t": 5}, "models": [{"model": "ft1"}]},
     r"'t' must be in \[0, 1\], not 5"),
    ({"merge_method": "breadcrumbs", "base_model": "base",
      "models": [{"model": "ft0", "parameters": {"weight": 1, "gamma": 2}}]}, r"'gamma' must be in \[0, 1\]"),
    ({"merge_method": "linear", "models": [{"model": "ft0", "parameters": {"weight": 1}},
                                           {"model": "ft1", "parameters": {"weight": -1}}]}, "sum to 0"),
    (_ties(parameters=[1, 2]), "'parameters' must be a mapping"),
]


@pytest.mark.parametrize("cfg,message", BAD_PARAMETERS, ids=[m[:30] for _, m in BAD_PARAMETERS])
def test_parameters_are_refused_before_any_tensor_is_read(zoo, tmp_path, monkeypatch, cfg, message):
    def no_reading(*args, **kwargs):
        raise AssertionError("a tensor was read before the parameters were checked")

    monkeypatch.setattr(safetensors_io.SafetensorsFile, "read", no_reading)
    path = write_config(tmp_path / "m.yml", zoo, **json.loads(json.dumps(cfg)))
    with pytest.raises(ValueError, match=message):
        run_merge_config(path, tmp_path / "out", verbose=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.yml"]


@pytest.mark.parametrize("method,params,message", [
    ("ties", {"density": 1.5}, r"'density' must be in \[0, 1\]"),
    ("ties", {"density": [0.5, -0.1]}, r"model 1: parameter 'density' must be in \[0, 1\], not -0.1"),
    ("ties", {"weight": float("nan")}, "'weight' must be finite"),
    ("slerp", {"t": 5}, r"'t' must be in \[0, 1\]"),
    ("dare_linear", {"density": "half"}, "must be a number"),
    ("ties", {"normalize": 1}, "must be true or false"),
])
def test_in_memory_merge_validates_the_same_way(method, params, message):
    base = {"w": torch.zeros(4)}
    models = [{"w": torch.randn(4)} for _ in range(1 if method == "slerp" else 2)]
    with pytest.raises(ValueError, match=message):
        M.merge(method, models, base, **params)


def test_int8_mask_is_declared_and_changes_nothing(zoo, tmp_path):
    a = read_dir(run_merge_config(write_config(tmp_path / "a.yml", zoo, **_ties(parameters={"density": 0.4, "int8_mask": True})),
                                  tmp_path / "a", verbose=False))
    b = read_dir(run_merge_config(write_config(tmp_path / "b.yml", zoo, **_ties()), tmp_path / "b", verbose=False))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------ inputs


@pytest.fixture
def nan_model(zoo, tmp_path):
    import shutil

    folder = tmp_path / "ft_nan"
    shutil.copytree(zoo / "ft1", folder)
    sd = load_file(folder / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    sd["model.layers.1.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_nonfinite_input_is_refused_by_tensor_name_unless_allowed(zoo, tmp_path, nan_model):
    cfg = {"merge_method": "task_arithmetic", "base_model": "base",
           "models": [{"model": "ft0", "parameters": {"weight": 1.0}}, {"model": str(nan_model), "parameters": {"weight": 0.5}}]}
    path = write_config(tmp_path / "m.yml", zoo, **cfg)
    before = snapshot(zoo, nan_model)
    with pytest.raises(ValueError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' of model '.*ft_nan' holds 1 NaN "
                                         r"and 1 inf value\(s\).*--allow-nonfinite"):
        run_merge_config(path, tmp_path / "out", verbose=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    out = run_merge_config(path, tmp_path / "out", allow_nonfinite=True, verbose=False)
    expected = M.merge("task_arithmetic", [load_file(zoo / "ft0" / "model.safetensors"),
                                           load_file(nan_model / "model.safetensors")],
                       load_file(zoo / "base" / "model.safetensors"), weight=[1.0, 0.5], allow_nonfinite=True)
    got = read_dir(out)
    assert all(torch.equal(got[k], expected[k]) or torch.allclose(got[k], expected[k], equal_nan=True) for k in got)
    assert snapshot(zoo, nan_model) == before
    with pytest.raises(ValueError, match="holds 1 NaN and 1 inf"):
        M.merge("linear", [load_file(nan_model / "model.safetensors")])
    from labkit.cli import main

    assert main(["merge", str(path), str(tmp_path / "cli_out")]) == 2
    assert main(["merge", str(path), str(tmp_path / "cli_out"), "--allow-nonfinite"]) == 0


def test_tokenizers_that_map_tokens_to_other_ids_are_refused(zoo, tmp_path):
    import shutil

    other = tmp_path / "other_tok"
    shutil.copytree(zoo / "ft0", other)
    order = list(range(32))
    order[5], order[9] = order[9], order[5]
    write_tokenizer(other, order)
    cfg = {"merge_method": "linear", "models": [{"model": "base", "parameters": {"weight": 1}},
                                                {"model": str(other), "parameters": {"weight": 1}}]}
    path = write_config(tmp_path / "m.yml", zoo, **cfg)  # an absolute path stays as it is
    with pytest.raises(ValueError, match=r"id 5 is 'w4' in model '.*base' but 'w8' in model '.*other_tok'.*"
                                         "--allow-tokenizer-mismatch"):
        run_merge_config(path, tmp_path / "out", verbose=False)
    assert not (tmp_path / "out").exists()
    out = run_merge_config(path, tmp_path / "out", allow_tokenizer_mismatch=True, verbose=False)
    assert (out / "model.safetensors").exists()
    from labkit.cli import main

    assert main(["merge", str(path), str(tmp_path / "cli_out")]) == 2
    assert main(["merge", str(path), str(tmp_path / "cli_out"), "--allow-tokenizer-mismatch"]) == 0


def _raw_model(folder: Path, tensors: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                    "num_hidden_layers": 1}))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_reads_every_dtype_safetensors_reads(tmp_path):
    torch.manual_seed(0)
    dtypes = [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.float16, torch.float64]
    ints = {"u16": torch.arange(6, dtype=torch.int32).to(torch.uint16), "i64": torch.arange(3),
            "b": torch.tensor([True, False])}
    sds = []
    for i in range(2):
        tensors = {f"w.{str(d).split('.')[-1]}": (torch.randn(4, 3) / 2).to(d) for d in dtypes}
        sds.append({**tensors, **{k: (v.int() + i).to(v.dtype) for k, v in ints.items()}})
        _raw_model(tmp_path / f"m{i}", sds[-1])
    path = tmp_path / "m.yml"
    path.write_text(json.dumps({"merge_method": "linear", "models": [
        {"model": str(tmp_path / "m0"), "parameters": {"weight": 0.3}},
        {"model": str(tmp_path / "m1"), "parameters": {"weight": 0.7}}]}))
    got = read_dir(run_merge_config(path, tmp_path / "out", verbose=False))
    expected = M.merge("linear", sds, weight=[0.3, 0.7])
    assert set(got) == set(expected)
    for k in expected:  # compared as raw bytes (float8 and uint16 have few torch ops)
        assert got[k].dtype == expected[k].dtype, k
        assert got[k].view(torch.uint8).tolist() == expected[k].contiguous().view(torch.uint8).tolist(), k
    assert got["u16"].int().tolist() == list(range(6))  # integers: the first model's


# ------------------------------------------------------------------------------------ debris


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_partial_folder_never_looks_like_a_model(zoo, tmp_path, monkeypatch):
    path = write_config(tmp_path / "m.yml", zoo, **_ties())
    seen = []

    def look(count, name):
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(".out.labkit-merge-partial.")]
        seen.append((len(partial), any((p / "config.json").exists() for p in partial)))

    monkeypatch.setattr(yaml_runner, "_after_tensor", look)
    run_merge_config(path, tmp_path / "out", verbose=False)
    assert seen and all(n == 1 and not has_config for n, has_config in seen)


def test_next_run_removes_what_a_killed_run_left(zoo, tmp_path):
    path = write_config(tmp_path / "m.yml", zoo, **_ties())
    dead, alive = _dead_pid(), os.getppid()
    debris = tmp_path / f".out.labkit-merge-partial.{dead}.abcd1234"
    debris.mkdir()
    (debris / "model.safetensors").write_bytes(b"half")
    other_run = tmp_path / f".out.labkit-merge-partial.{alive}.abcd1234"  # a live process: not ours to remove
    other_run.mkdir()
    run_merge_config(path, tmp_path / "out", verbose=False)
    assert leftovers(tmp_path) == [other_run.name]


def test_a_run_killed_between_the_renames_gets_its_old_out_dir_back(zoo, tmp_path):
    path = write_config(tmp_path / "m.yml", zoo, **_ties())
    out = run_merge_config(path, tmp_path / "out", verbose=False)
    before = snapshot(out)
    moved = tmp_path / f".out.labkit-merge-old.{_dead_pid()}.abcd1234"
    out.rename(moved)  # what a SIGKILL between the two renames leaves
    with pytest.raises(ValueError, match="not empty; pass --force"):  # the old OUT_DIR is back, and protected
        run_merge_config(path, out, verbose=False)
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


def test_a_signal_during_the_final_renames_lets_them_finish(zoo, tmp_path, monkeypatch):
    import signal

    from labkit.merge import output_dir

    path = write_config(tmp_path / "m.yml", zoo, **_ties())
    out = run_merge_config(path, tmp_path / "out", verbose=False)
    real_replace = os.replace
    calls = []

    def replace_then_signal(src, dst):  # SIGTERM right after OUT_DIR was moved aside
        real_replace(src, dst)
        calls.append(dst)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(output_dir.os, "replace", replace_then_signal)
    run_merge_config(path, out, force=True, verbose=False)
    assert len(calls) == 2 and (out / "config.json").exists() and leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler was put back
