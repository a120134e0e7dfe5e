"""``labkit merge CONFIG.yml OUT_DIR`` end to end on tiny save_pretrained Llama directories:
mergekit-format configs for every method, sharded input and output, every refusal path and
the atomic write. Expected tensors come from labkit.merge.merge on the loaded state dicts, whose
arithmetic test_merge.py checks against hand-computed values (and test_merge_mergekit.py against
mergekit itself when it is installed)."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from labkit import merge as M
from labkit.merge.safetensors_io import ModelDir
from labkit.merge.yaml_runner import evaluate_setting, layer_position, run_merge_config

transformers = pytest.importorskip("transformers")


def tiny_config(**overrides):
    kw = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=64)
    return transformers.LlamaConfig(**{**kw, **overrides})


def write_tokenizer(folder: Path, order=None) -> None:
    """A real 32-token word-level tokenizer.json (``order`` permutes which id each token gets)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    tokens = ["<unk>"] + [f"w{i}" for i in range(31)]
    ids = list(range(32)) if order is None else list(order)
    Tokenizer(WordLevel(dict(zip(tokens, ids)), unk_token="<unk>")).save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return tiny_llamas(tmp_path_factory.mktemp("tiny_llamas"))


def tiny_llamas(root: Path) -> Path:
    """base, three fine-tunes of it (small perturbations), and broken variants."""
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(tiny_config())
    base.save_pretrained(root / "base")
    write_tokenizer(root / "base")
    (root / "base" / "tokenizer_config.json").write_text("{}")
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    for i in range(3):
        base.load_state_dict(base_weights)
        with torch.no_grad():
            for p in base.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        base.save_pretrained(root / f"ft{i}")
    transformers.LlamaForCausalLM(tiny_config(intermediate_size=48)).save_pretrained(root / "wide")
    shutil.copytree(root / "ft0", root / "mistral")
    cfg = json.loads((root / "mistral" / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (root / "mistral" / "config.json").write_text(json.dumps(cfg))
    shutil.copytree(root / "ft0", root / "nonorm")
    sd = load_file(root / "nonorm" / "model.safetensors")
    del sd["model.norm.weight"]
    save_file(sd, root / "nonorm" / "model.safetensors", metadata={"format": "pt"})
    (root / "pickled").mkdir()
    shutil.copy(root / "ft1" / "config.json", root / "pickled" / "config.json")
    torch.save(load_file(root / "ft1" / "model.safetensors"), root / "pickled" / "pytorch_model.bin")
    return root


def sds(zoo, *names):
    return [load_file(zoo / n / "model.safetensors") for n in names]


def write_config(path: Path, zoo: Path, **cfg) -> Path:
    """A mergekit YAML file; model names are made absolute paths inside ``zoo``."""
    def fix(ref):
        return str(zoo / ref)
    if "base_model" in cfg:
        cfg["base_model"] = fix(cfg["base_model"])
    for entry in cfg.get("models", []):
        entry["model"] = fix(entry["model"])
    for s in cfg.get("slices", []):
        for src in s.get("sources", []):
            src["model"] = fix(src["model"])
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_dir(path) -> dict:
    d = ModelDir(path)
    return {k: d.read(k) for k in d.specs}


def assert_same(got: dict, expected: dict, atol=0.0):
    assert set(got) == set(expected)
    for k in expected:
        assert got[k].dtype == expected[k].dtype, k
        assert torch.allclose(got[k].float(), expected[k].float(), atol=atol, rtol=0), k


CASES = {
    "linear": (dict(merge_method="linear", models=[dict(model="ft0", parameters=dict(weight=0.6)),
                                                     dict(model="ft1", parameters=dict(weight=0.4))]),
               lambda z: M.merge("linear", sds(z, "ft0", "ft1"), weight=[0.6, 0.4])),
    "slerp": (dict(merge_method="slerp", base_model="ft0", parameters=dict(t=0.3),
                   models=[dict(model="ft0"), dict(model="ft1")]),
              lambda z: M.merge("slerp", sds(z, "ft1"), sds(z, "ft0")[0], t=0.3)),
    "task_arithmetic": (dict(merge_method="task_arithmetic", base_model="base", parameters={"lambda": 0.7},
                             models=[dict(model="ft0", parameters=dict(weight=1.0)),
                                     dict(model="ft1", parameters=dict(weight=-0.5))]),
                        lambda z: M.merge("task_arithmetic", sds(z, "ft0", "ft1"), sds(z, "base")[0],
                                          weight=[1.0, -0.5], lambda_=0.7)),
    "ties": (dict(merge_method="ties", base_model="base",
                  models=[dict(model="base"), dict(model="ft0", parameters=dict(weight=0.7, density=0.5)),
                          dict(model="ft1", parameters=dict(weight=0.3, density=0.2)),
                          dict(model="ft2", parameters=dict(weight=0.5))], parameters=dict(density=0.4)),
             lambda z: M.merge("ties", sds(z, "ft0", "ft1", "ft2"), sds(z, "base")[0], weight=[0.7, 0.3, 0.5],
                               density=[0.5, 0.2, 0.4])),
    "dare_linear": (dict(merge_method="dare_linear", base_model="base",
                         models=[dict(model="ft0", parameters=dict(weight=1.0, density=0.3)),
                                 dict(model="ft1", parameters=dict(weight=1.0, density=0.6))]),
                    lambda z: M.merge("dare_linear", sds(z, "ft0", "ft1"), sds(z, "base")[0], density=[0.3, 0.6])),
    "dare_ties": (dict(merge_method="dare_ties", base_model="base", parameters=dict(rescale=False, normalize=True),
                       models=[dict(model="ft0", parameters=dict(weight=0.5, density=0.5)),
                               dict(model="ft1", parameters=dict(weight=0.5, density=0.5))]),
                  lambda z: M.merge("dare_ties", sds(z, "ft0", "ft1"), sds(z, "base")[0], weight=0.5, density=0.5,
                                    rescale=False, normalize=True)),
    "breadcrumbs": (dict(merge_method="breadcrumbs", base_model="base",
                         models=[dict(model="ft0", parameters=dict(weight=1.0, density=0.6, gamma=0.05)),
                                 dict(model="ft1", parameters=dict(weight=0.5, density=0.8))]),
                    lambda z: M.merge("breadcrumbs", sds(z, "ft0", "ft1"), sds(z, "base")[0], weight=[1.0, 0.5],
                                      density=[0.6, 0.8], gamma=[0.05, 0.01])),
    "model_stock": (dict(merge_method="model_stock", base_model="base",
                         models=[dict(model="ft0"), dict(model="ft1"), dict(model="ft2")]),
                    lambda z: M.merge("model_stock", sds(z, "ft0", "ft1", "ft2"), sds(z, "base")[0])),
}


@pytest.mark.parametrize("method", list(CASES))
def test_every_method_end_to_end(zoo, tmp_path, method):
    cfg, expected = CASES[method]
    path = write_config(tmp_path / "merge.yml", zoo, dtype="float32", **json.loads(json.dumps(cfg)))
    out = run_merge_config(path, tmp_path / "out", verbose=False)
    assert_same(read_dir(out), expected(zoo))
    if method not in ("linear", "slerp"):  # the tokenizer comes from the base (else the first model)
        assert (out / "tokenizer.json").read_bytes() == (zoo / "base" / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (out / "mergekit_config.yml").exists()


def test_output_loads_in_transformers_and_cli(zoo, tmp_path):
    from labkit.cli import main

    path = write_config(tmp_path / "m.yml", zoo, **json.loads(json.dumps(CASES["ties"][0])))
    assert main(["merge", str(path), str(tmp_path / "out")]) == 0
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    expected = CASES["ties"][1](zoo)
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 32)


def test_out_dtype_and_config(zoo, tmp_path):
    path = write_config(tmp_path / "m.yml", zoo, merge_method="linear", dtype="bfloat16",
                        models=[dict(model="ft0", parameters=dict(weight=1)), dict(model="ft1", parameters=dict(weight=1))])
    out = run_merge_config(path, tmp_path / "out", verbose=False)
    got = read_dir(out)
    expected = M.merge("linear", sds(zoo, "ft0", "ft1"), out_dtype=torch.bfloat16)
    assert_same(got, expected)  # float32 arithmetic, then rounded once to bf16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = transformers.LlamaForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_sharded_output_and_input(zoo, tmp_path):
    cfg = json.loads(json.dumps(CASES["ties"][0]))
    path = write_config(tmp_path / "m.yml", zoo, **cfg)
    out = run_merge_config(path, tmp_path / "sharded", max_shard_bytes=3000, verbose=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in read_dir(out).values())
    assert_same(read_dir(out), CASES["ties"][1](zoo))
    assert isinstance(transformers.LlamaForCausalLM.from_pretrained(out), torch.nn.Module)
    # a sharded copy of ft0 as input gives the same merge as the single-file ft0
    copy_cfg = write_config(tmp_path / "copy.yml", zoo, merge_method="linear",
                            models=[dict(model="ft0", parameters=dict(weight=1.0))])
    run_merge_config(copy_cfg, zoo / "ft0_sharded", max_shard_bytes=2000, force=True, verbose=False)
    assert (zoo / "ft0_sharded" / "model.safetensors.index.json").exists()
    cfg["models"][1]["model"] = "ft0_sharded"
    path = write_config(tmp_path / "m2.yml", zoo, **cfg)
    assert_same(read_dir(run_merge_config(path, tmp_path / "out2", verbose=False)), CASES["ties"][1](zoo))


def test_gradients_filters_and_full_range_slice(zoo, tmp_path):
    t_setting = [dict(filter="self_attn", value=[0.0, 1.0]), dict(filter="mlp", value=0.8), dict(value=0.5)]
    path = write_config(tmp_path / "m.yml", zoo, merge_method="slerp", base_model="ft0",
                        slices=[dict(sources=[dict(model="ft0", layer_range=[0, 2]), dict(model="ft1", layer_range=[0, 2])])],
                        parameters=dict(t=t_setting))
    got = read_dir(run_merge_config(path, tmp_path / "out", verbose=False))
    a, b = sds(zoo, "ft0", "ft1")
    for k in a:
        if "self_attn" in k:  # gradient [0, 1] over the 2 layers
            t = 0.0 if "layers.0." in k else 1.0
        else:
            t = 0.8 if "mlp" in k else 0.5
        assert torch.equal(got[k], M.slerp(t, a[k], b[k])), k


def test_evaluate_setting_and_layer_position():
    assert evaluate_setting(0.3, "x", 0.5) == 0.3
    assert evaluate_setting([0.0, 1.0, 0.0], "x", 0.25) == pytest.approx(0.5)
    assert evaluate_setting([0.0, 1.0], "x", 1.0) == 1.0
    assert evaluate_setting(["a", "b"], "x", 1.0) == "b"
    assert evaluate_setting([{"filter": "mlp", "value": 2}], "attn", 0) is None
    assert evaluate_setting([{"filter": "mlp", "value": 2}, {"value": 3}], "attn", 0) == 3
    assert layer_position("model.layers.3.mlp.up_proj.weight", 4) == 1.0
    assert layer_position("model.layers.1.mlp.up_proj.weight", 3) == 0.5
    assert layer_position("lm_head.weight", 4) == 0.0 and layer_position("model.embed_tokens.weight", 4) == 0.0
    with pytest.raises(ValueError, match="unsupported parameter value"):
        evaluate_setting({"a": 1}, "x", 0)


def _ties(**extra):
    return {**json.loads(json.dumps(CASES["ties"][0])), **extra}


REFUSALS = [
    (_ties(slices=[{"sources": []}]), "exactly one of 'models' or 'slices'"),
    ({"merge_method": "slerp", "base_model": "ft0", "parameters": {"t": 0.5},
      "slices": [{"sources": [{"model": "ft0", "layer_range": [0, 1]}, {"model": "ft1", "layer_range": [0, 1]}]}]},
     r"layer_range \[0, 1\].*only full ranges"),
    ({"merge_method": "linear", "slices": [{"sources": []}, {"sources": []}]}, "'slices'.*not supported"),
    (_ties(tokenizer={"source": "union"}), r"tokenizer \(tokenizer merging\)"),
    (_ties(tokenizer_source="union"), "tokenizer_source 'union' is not supported"),
    (_ties(chat_template="chatml"), "chat_template"),
    (_ties(modules={}), "modules"),
    (_ties(frobnicate=1), "frobnicate"),
    (_ties(merge_method="della"), "merge_method 'della' is not supported"),
    (_ties(parameters={"densty": 0.5}), r"unknown parameter\(s\) \['densty'\]"),
    ({k: v for k, v in _ties().items() if k != "base_model"}, "needs a base model"),
    ({"merge_method": "linear", "base_model": "base", "models": [{"model": "ft0", "parameters": {"weight": 1}}]},
     "'linear' does not use base_model"),
    ({"merge_method": "slerp", "base_model": "ft0", "parameters": {"t": 0.5},
      "models": [{"model": "ft0"}, {"model": "ft1"}, {"model": "ft2"}]}, "takes 1 model"),
    ({"merge_method": "model_stock", "base_model": "base", "models": [{"model": "ft0"}]}, "at least 2"),
    ({"merge_method": "task_arithmetic", "base_model": "base", "models": [{"model": "ft0"}]},
     "model '.*ft0': merge method 'task_arithmetic' needs parameter 'weight'"),
    ({"merge_method": "slerp", "base_model": "ft0", "models": [{"model": "ft0"}, {"model": "ft1"}]},
     "needs parameter 't'"),
    (_ties(dtype="float8"), "unknown dtype"),
    ({"merge_method": "linear", "models": [{"model": "ft0", "parameters": {"weight": 1}},
                                           {"model": "ft0", "parameters": {"weight": 1}}]}, "listed twice"),
    ({"merge_method": "linear", "models": [{"model": "ft0", "parameters": {"weight": 1}, "lora": "x"}]},
     r"unsupported key\(s\) \['lora'\]"),
    ({"merge_method": "linear", "models": [{"model": "mistral", "parameters": {"weight": 1}},
                                           {"model": "ft0", "parameters": {"weight": 1}}]},
     "architectures differ"),
    ({"merge_method": "linear", "models": [{"model": "ft0", "parameters": {"weight": 1}},
                                           {"model": "wide", "parameters": {"weight": 1}}]},
     r"tensor 'model.layers.0.mlp.down_proj.weight' has shape \(16, 32\)"),
    ({"merge_method": "linear", "models": [{"model": "ft0", "parameters": {"weight": 1}},
                                           {"model": "nonorm", "parameters": {"weight": 1}}]},
     "tensor 'model.norm.weight' is in .* but missing from"),
    ({"merge_method": "linear", "models": [{"model": "ft0", "parameters": {"weight": 1}},
                                           {"model": "pickled", "parameters": {"weight": 1}}]}, "--allow-pickle"),
    ({"merge_method": "linear", "models": [{"model": "does-not-exist", "parameters": {"weight": 1}}]},
     "not a local directory"),
]


@pytest.mark.parametrize("cfg,message", REFUSALS, ids=[m[:28] for _, m in REFUSALS])
def test_refusals(zoo, tmp_path, cfg, message):
    path = write_config(tmp_path / "m.yml", zoo, **json.loads(json.dumps(cfg)))
    with pytest.raises(ValueError, match=message):
        run_merge_config(path, tmp_path / "out", verbose=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.yml"]  # no temp dir left behind


def test_known_parameter_of_another_method_warns(zoo, tmp_path):
    path = write_config(tmp_path / "m.yml", zoo, merge_method="linear",
                        models=[{"model": "ft0", "parameters": {"weight": 1, "density": 0.5}}])
    with pytest.warns(UserWarning, match="'density' is not used by merge method 'linear'"):
        run_merge_config(path, tmp_path / "out", verbose=False)


def test_pickle_only_when_allowed(zoo, tmp_path):
    path = write_config(tmp_path / "m.yml", zoo, merge_method="linear",
                        models=[{"model": "ft0", "parameters": {"weight": 1}}, {"model": "pickled", "parameters": {"weight": 1}}])
    out = run_merge_config(path, tmp_path / "out", allow_pickle=True, verbose=False)
    assert_same(read_dir(out), M.merge("linear", sds(zoo, "ft0", "ft1")))


def test_refuses_non_empty_out_dir_and_force_replaces_only_a_merge_output(zoo, tmp_path):
    path = write_config(tmp_path / "m.yml", zoo, **_ties())
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty; pass --force"):
        run_merge_config(path, out, verbose=False)
    with pytest.raises(ValueError, match="not a merge output .* --force will not replace it"):
        run_merge_config(path, out, force=True, verbose=False)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    (out / "precious.txt").unlink()
    run_merge_config(path, out, verbose=False)  # an empty OUT_DIR is fine without --force
    first = (out / "model.safetensors").read_bytes()
    run_merge_config(path, out, force=True, verbose=False)  # a previous merge output is replaced
    assert (out / "model.safetensors").read_bytes() == first
    (out / "notes.txt").write_text("mine")  # ... but not when the user added files to it
    with pytest.raises(ValueError, match="holds 'notes.txt', which labkit merge does not write"):
        run_merge_config(path, out, force=True, verbose=False)
    assert (out / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        run_merge_config(path, tmp_path / "file", verbose=False)


def test_atomic_write_failure_keeps_old_out_dir(zoo, tmp_path, monkeypatch):
    from labkit.merge import yaml_runner

    path = write_config(tmp_path / "m.yml", zoo, **_ties())
    out = run_merge_config(path, tmp_path / "out", verbose=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail_after_5(count, name):
        if count >= 5:
            raise RuntimeError("simulated failure")

    monkeypatch.setattr(yaml_runner, "_after_tensor", fail_after_5)
    with pytest.raises(RuntimeError, match="simulated failure"):
        run_merge_config(path, out, force=True, verbose=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.yml", "out"]  # the temp dir is gone
    monkeypatch.setattr(yaml_runner, "_after_tensor", lambda count, name: fail_after_5(count + 5, name))
    with pytest.raises(RuntimeError, match="simulated failure"):
        run_merge_config(path, tmp_path / "fresh", verbose=False)
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.yml", "out"]
