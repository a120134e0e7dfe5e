"""The capstone's submissions (labkit.capstone.spec), cost (labkit.capstone.cost) and challenge data.

Golden values are worked out by hand in the comments: FLOPs of an MLP and a CNN layer by layer, and
the outputs of each ensemble rule, MoE gate and cascade on models whose logits are set by hand
(zero weights, chosen biases), so nothing here is the code under test checking itself.
"""
from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
import yaml

from labkit.capstone import challenge, cost
from labkit.capstone.spec import SubmissionError, load_submission, write_submission
from labkit.models import DigitCNN, DigitMLP

WHEN = "2026-11-30T12:00:00Z"


def constant_mlp(logits, hidden=1) -> DigitMLP:
    """A DigitMLP whose output is ``logits`` for every input (all weights 0, the head's bias set)."""
    m = DigitMLP(hidden=(hidden,))
    with torch.no_grad():
        for layer in m.layers:
            layer.weight.zero_()
            layer.bias.zero_()
        m.layers[-1].bias.copy_(torch.tensor(logits, dtype=torch.float32))
    return m


def onehot(c, scale=1.0):
    return [scale if i == c else 0.0 for i in range(10)]


def spec(kind="checkpoint", **fields):
    return {"team": "alice", "name": "s1", "kind": kind, "submitted_at": WHEN, **fields}


# ----------------------------------------------------------------------------- cost: golden FLOPs


def test_flops_of_an_mlp_by_hand():
    # 64->128, 128->128, 128->10: 2 * (8192 + 16384 + 1280) = 51712
    assert cost.flops_per_example(DigitMLP(hidden=(128, 128))) == 51712
    # 64->7, 7->10: 2 * (448 + 70) = 1036
    assert cost.flops_per_example(DigitMLP(hidden=(7,))) == 1036


def test_flops_of_a_cnn_by_hand():
    # conv1 1->16, 3x3, out 16x8x8: 2 * 1024 * 9 = 18432; conv2 16->32 3x3 on the pooled 4x4, out 32x4x4:
    # 2 * 512 * 16 * 9 = 147456; head 32*2*2=128 -> 10: 2 * 1280 = 2560; total 168448
    assert cost.flops_per_example(DigitCNN(channels=16)) == 168448
    # channels 4: conv1 2*4*64*9 = 4608; conv2 2*(8*16)*4*9 = 9216; head 2*32*10 = 640
    assert cost.flops_per_example(DigitCNN(channels=4)) == 4608 + 9216 + 640


def test_budget_two_pool_mlps_fit_three_do_not(tmp_path):
    members = [f"zoo:digits/soup-ft{i}" for i in range(3)]
    X = challenge.load_public("val")[0][:64]
    ref = cost.reference_model()
    two = load_submission(write_submission(tmp_path / "two", spec("ensemble", members=members[:2], rule="vote")))
    three = load_submission(write_submission(tmp_path / "three", spec("ensemble", members=members, rule="vote")))
    c2, c3 = (cost.submission_cost(s, X, ref, latency_repeats=1) for s in (two, three))
    assert c2["relative_flops"] == 2.0 and c3["relative_flops"] == 3.0
    assert cost.budget_violation(c2) is None
    assert "3.00x" in cost.budget_violation(c3) and "2.5x" in cost.budget_violation(c3)
    assert c2["latency_ms"] > 0 and c2["relative_latency"] > 0
    # a pool CNN alone is over budget (3.26x): a teacher to distil, not a submission
    assert cost.flops_per_example(DigitCNN(16)) / cost.flops_per_example(ref) > challenge.BUDGET_MULTIPLIER


def test_latency_gate_uses_its_tolerance():
    c = {"relative_flops": 1.0, "relative_latency": 6.0}
    assert cost.budget_violation(c, 2.5, latency_tolerance=1.0) is not None   # limit 5x
    assert cost.budget_violation(c, 2.5, latency_tolerance=2.0) is None       # limit 7.5x
    assert cost.budget_violation(c, 2.5, latency_tolerance=None) is None      # no gate


# ----------------------------------------------------------------------------- kinds: golden outputs


def test_ensemble_rules_by_hand(tmp_path):
    a, b = constant_mlp(onehot(0, 2.0)), constant_mlp(onehot(1, 3.0))
    X = torch.rand(3, 64)
    s = lambda rule, **kw: load_submission(write_submission(tmp_path / rule, spec(  # noqa: E731
        "ensemble", members=["a", "b"], rule=rule, **kw), {"a": a, "b": b}), device="cpu").logits(X)
    # mean_logit with weights 0.7, 0.3: class 0 -> 1.4, class 1 -> 0.9, others 0
    z = s("mean_logit", weights=[7, 3])
    assert torch.allclose(z[0, :2], torch.tensor([1.4, 0.9])) and z[0, 2:].abs().max() < 1e-6
    # mean_prob, equal weights: p_a = e^2 / (e^2 + 9) on class 0, 1 / (e^2 + 9) elsewhere; p_b likewise with 3
    pa0, pa_ = math.exp(2) / (math.exp(2) + 9), 1 / (math.exp(2) + 9)
    pb1, pb_ = math.exp(3) / (math.exp(3) + 9), 1 / (math.exp(3) + 9)
    want = [math.log((pa0 + pb_) / 2), math.log((pa_ + pb1) / 2)] + [math.log((pa_ + pb_) / 2)] * 8
    assert torch.allclose(s("mean_prob")[1], torch.tensor(want), atol=1e-6)
    # vote with weights 0.5, 0.5: a tie between classes 0 and 1 goes to the lower class
    v = s("vote")
    assert v[2].tolist()[:2] == [0.5, 0.5] and v.argmax(-1).tolist() == [0, 0, 0]


def test_moe_gates_and_flops_by_hand(tmp_path):
    router = torch.nn.Linear(64, 3)
    with torch.no_grad():
        router.weight.zero_()
        router.bias.copy_(torch.tensor([0.0, math.log(3.0), -10.0]))
    experts = {"e0": constant_mlp(onehot(0, 1.0)), "e1": constant_mlp(onehot(1, 1.0)), "e2": constant_mlp(onehot(2, 9.0))}
    sub = load_submission(write_submission(tmp_path / "moe", spec("moe", router="r", experts=["e0", "e1", "e2"],
                                                                  top_k=2), {"r": router, **experts}), device="cpu")
    X = torch.rand(5, 64)
    # p = (1, 3, e^-10) / sum; the top 2 are experts 1 and 0, renormalised to 0.75 and 0.25
    z = sub.logits(X)
    assert torch.allclose(z, torch.tensor(onehot(0, 0.25)).add(torch.tensor(onehot(1, 0.75))).expand(5, 10), atol=1e-6)
    # router 2*64*3 = 384, plus two experts of 2*(64*1 + 1*10) = 148 each
    assert cost.submission_flops(sub, X) == 384 + 2 * 148


def test_cascade_stops_early_and_pays_only_what_ran(tmp_path):
    first = DigitMLP(hidden=(1,))
    with torch.no_grad():
        for layer in first.layers:
            layer.weight.zero_()
            layer.bias.zero_()
        first.layers[0].weight[0, 0] = 1.0     # h = relu(pixel 0)
        first.layers[1].weight[0, 0] = 10.0    # logit of class 0 = 10 h
    second = constant_mlp(onehot(7, 5.0), hidden=2)
    sub = load_submission(write_submission(tmp_path / "c", spec("cascade", stages=[
        {"model": "first", "threshold": 0.9}, {"model": "second"}]), {"first": first, "second": second}), device="cpu")
    X = torch.zeros(4, 64)
    X[:2, 0] = 1.0   # rows 0, 1: softmax max e^10/(e^10+9) ~ 0.9996 >= 0.9, stop; rows 2, 3: 0.1, go on
    assert sub.logits(X).argmax(-1).tolist() == [0, 0, 7, 7]
    assert sub.model.run(X)[1].tolist() == [0, 0, 1, 1]
    # stage 1 for all: 2*(64 + 10) = 148; stage 2 (hidden 2) for half: 2*(128 + 20) = 296
    assert cost.submission_flops(sub, X) == 148 + 0.5 * 296


def test_merge_is_computed_at_load_time(tmp_path):
    a, b = constant_mlp(onehot(0, 2.0)), constant_mlp(onehot(1, 4.0))
    sub = load_submission(write_submission(tmp_path / "m", spec("merge", merge={"method": "linear", "models": ["a", "b"]}),
                                           {"a": a, "b": b}), device="cpu")
    # the average of the two heads' biases: 1.0 on class 0, 2.0 on class 1; one model's FLOPs
    assert torch.allclose(sub.logits(torch.rand(2, 64))[0], torch.tensor(onehot(0, 1.0)) + torch.tensor(onehot(1, 2.0)))
    assert cost.submission_flops(sub, torch.rand(2, 64)) == 148


def test_zoo_refs_and_round_trip(tmp_path):
    path = write_submission(tmp_path / "s", spec(model="zoo:digits/soup-ft3"))
    sub = load_submission(path)
    assert (sub.team, sub.name, sub.kind) == ("alice", "s1", "checkpoint")
    assert sub.submitted_at.isoformat() == "2026-11-30T12:00:00+00:00"
    from labkit import zoo

    X = challenge.load_public("val")[0][:32]
    assert torch.equal(sub.logits(X), zoo.load("digits/soup-ft3", device="cpu")(X))
    with pytest.raises(FileExistsError):
        write_submission(path, spec(model="zoo:digits/soup-ft3"))
    write_submission(path, spec(model="zoo:digits/soup-ft4"), overwrite=True)
    assert "soup-ft4" in (path / "spec.yml").read_text()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a submission"):
        write_submission(tmp_path / "mine", spec(model="zoo:digits/soup-ft3"), overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_write_submission_validates_before_anything_appears(tmp_path):
    with pytest.raises(SubmissionError, match="unknown member"):
        write_submission(tmp_path / "bad", spec(model="zoo:digits/nope"))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- one-line errors


def _edit_spec(path, **changes):
    data = yaml.safe_load((path / "spec.yml").read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    (path / "spec.yml").write_text(yaml.safe_dump(data, sort_keys=False))


def _rehash(path):
    from labkit.capstone.challenge import sha256_file

    files = {p.relative_to(path).as_posix(): sha256_file(p) for p in sorted(path.rglob("*"))
             if p.is_file() and p.name != "spec.yml"}
    _edit_spec(path, files=files)


def _mine(tmp_path, **fields):
    return write_submission(tmp_path / "sub", spec(model="mine", **fields), {"mine": DigitMLP(hidden=(8,))})


def _config(path, **changes):
    cfg = path / "mine" / "classifier.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **changes}))
    _rehash(path)


def _tensors(path, change):
    from safetensors.torch import load_file, save_file

    f = path / "mine" / "model.safetensors"
    state = load_file(str(f))
    change(state)
    save_file(state, str(f))
    _rehash(path)


ERRORS = {
    "unknown zoo member": (lambda p: _edit_spec(p, model="zoo:digits/nope"), "spec.yml field 'model'", "unknown member"),
    "an LM is no member": (lambda p: _edit_spec(p, model="zoo:lm/base"), "field 'model'", "not a digit classifier"),
    "unknown folder": (lambda p: _edit_spec(p, model="theirs"), "field 'model'", "unknown member 'theirs'"),
    "missing file": (lambda p: (p / "mine" / "classifier.json").unlink(), "mine/classifier.json", "missing"),
    "hash mismatch": (lambda p: (p / "mine" / "classifier.json").write_text('{"kind": "mlp", "hidden": [9]}'),
                      "mine/classifier.json field 'files'", "tampered"),
    "pickle .pt": (lambda p: ((p / "w.pt").write_bytes(pickle.dumps([1])), _rehash(p)), "w.pt", "are pickles"),
    "pickle .bin": (lambda p: ((p / "mine" / "pytorch_model.bin").write_bytes(b"x"), _rehash(p)),
                    "mine/pytorch_model.bin", "are pickles"),
    "unlisted file": (lambda p: (p / "extra.json").write_text("{}"), "extra.json", "not listed"),
    "classifier kind": (lambda p: _config(p, kind="transformer"), "mine/classifier.json", "'transformer' is not allowed"),
    "too wide": (lambda p: _config(p, hidden=[5000]), "mine/classifier.json", "'hidden' must list"),
    "input width": (lambda p: _config(p, in_features=32), "mine/classifier.json", "in_features must be 64"),
    "num classes": (lambda p: _config(p, num_classes=5), "mine/classifier.json", "num_classes must be 10"),
    "shape": (lambda p: _config(p, hidden=[16]), "mine/model.safetensors", "tensor 'layers.0.weight' has shape [8, 64]"),
    "missing tensor": (lambda p: _tensors(p, lambda s: s.pop("layers.1.bias")), "mine/model.safetensors",
                       "tensor 'layers.1.bias' is missing"),
    "extra tensor": (lambda p: _tensors(p, lambda s: s.update(extra=torch.zeros(2))), "mine/model.safetensors",
                     "tensor 'extra' is not part"),
    "nan": (lambda p: _tensors(p, lambda s: s["layers.0.weight"].__setitem__((0, 0), float("nan"))),
            "mine/model.safetensors", "NaN"),
    "not safetensors": (lambda p: ((p / "mine" / "model.safetensors").write_bytes(b"junk"), _rehash(p)),
                        "mine/model.safetensors", "not a readable safetensors"),
    "malformed yaml": (lambda p: (p / "spec.yml").write_text("team: [alice\n"), "spec.yml", "malformed YAML at line"),
    "not a mapping": (lambda p: (p / "spec.yml").write_text("- a\n"), "spec.yml", "must be a mapping"),
    "unknown kind": (lambda p: _edit_spec(p, kind="stacking"), "field 'kind'", "unknown kind 'stacking'"),
    "unknown field": (lambda p: _edit_spec(p, members=["mine"]), "field 'members'", "unknown for kind 'checkpoint'"),
    "bad team": (lambda p: _edit_spec(p, team="../x"), "field 'team'", "must be a name"),
    "bad time": (lambda p: _edit_spec(p, submitted_at="yesterday"), "field 'submitted_at'", "ISO 8601"),
    "unknown rule": (lambda p: _edit_spec(p, kind="ensemble", model=None, members=["mine"], rule="max"),
                     "field 'rule'", "unknown rule 'max'"),
    "weights vs members": (lambda p: _edit_spec(p, kind="ensemble", model=None, members=["mine", "mine"], rule="vote",
                                                weights=[1]), "field 'weights'", "one weight per member (2)"),
    "negative weights": (lambda p: _edit_spec(p, kind="ensemble", model=None, members=["mine"], rule="vote",
                                              weights=[-1]), "field 'weights'", ">= 0"),
    "merge method": (lambda p: _edit_spec(p, kind="merge", model=None, merge={"method": "avg", "models": ["mine"]}),
                     "field 'merge.method'", "unknown merge method 'avg'"),
    "merge parameter": (lambda p: _edit_spec(p, kind="merge", model=None, merge={
        "method": "ties", "base": "mine", "models": ["mine"], "parameters": {"density": 1.5}}), "field 'merge'",
        "'density' must be in [0, 1]"),
    "merge architectures": (lambda p: _edit_spec(p, kind="merge", model=None, merge={
        "method": "linear", "models": ["mine", "zoo:digits/cnn-s0"]}), "field 'merge.models[1]'", "one architecture"),
    "top_k": (lambda p: _edit_spec(p, kind="moe", model=None, router="mine", experts=["mine", "mine"], top_k=3),
              "field 'top_k'", "[1, 2]"),
    "router": (lambda p: _edit_spec(p, kind="moe", model=None, router="mine", experts=["mine", "mine"], top_k=1),
               "mine/router.json", "missing"),
    "cascade threshold": (lambda p: _edit_spec(p, kind="cascade", model=None, stages=[
        {"model": "mine", "threshold": 1.5}, {"model": "mine"}]), "field 'stages[0].threshold'", "(0, 1]"),
    "cascade last": (lambda p: _edit_spec(p, kind="cascade", model=None, stages=[
        {"model": "mine", "threshold": 0.5}, {"model": "mine", "threshold": 0.5}]), "field 'stages[1]'",
        "no threshold"),
    "symlink": (lambda p: (p / "link.json").symlink_to(p / "mine" / "classifier.json"), "link.json", "symbolic link"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_each_error_is_one_line_naming_submission_file_and_field(tmp_path, case):
    damage, where, what = ERRORS[case]
    path = _mine(tmp_path)
    damage(path)
    with pytest.raises(SubmissionError) as info:
        load_submission(path, label="alice/s1")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("submission alice/s1: ")
    assert where in message and what in message, message


def test_router_config_must_match_the_experts(tmp_path):
    path = write_submission(tmp_path / "moe", spec("moe", router="r", experts=["zoo:digits/soup-ft0", "zoo:digits/soup-ft1"],
                                                   top_k=1), {"r": torch.nn.Linear(64, 2)})
    _edit_spec(path, experts=["zoo:digits/soup-ft0", "zoo:digits/soup-ft1", "zoo:digits/soup-ft2"])
    with pytest.raises(SubmissionError, match=r"r/router.json field 'router': 'num_experts' must be 3"):
        load_submission(path)


def test_nothing_is_unpickled_while_loading(tmp_path, monkeypatch):
    path = write_submission(tmp_path / "s", spec("ensemble", members=["zoo:digits/soup-ft0", "mine"], rule="mean_prob"),
                            {"mine": DigitMLP(hidden=(8,))})

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    from labkit.capstone import spec as spec_module

    spec_module._zoo_state.cache_clear()  # load the zoo members afresh, under the patch
    for target in (torch, pickle):
        monkeypatch.setattr(target, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    load_submission(path).logits(torch.rand(2, 64))


# ----------------------------------------------------------------------------- the challenge data


def test_public_data_shapes_domains_and_determinism():
    X, y, d = challenge.load_public("val")
    assert X.shape == (1795, 64) and X.dtype == torch.float32 and y.dtype == torch.int64
    assert d.bincount().tolist() == [359] * len(challenge.DOMAINS)
    assert torch.equal(X[d == 0], __import__("labkit.data", fromlist=["x"]).load_digits().X_val)
    X[0, 0] = 5.0   # a copy: changing it changes nothing for the next caller
    assert challenge.load_public("val")[0][0, 0] != 5.0
    with pytest.raises(ValueError, match="hidden"):
        challenge.load_public("test")


def test_hidden_split_is_hashed_and_tampering_is_refused(tmp_path):
    X, y, d, public = challenge.load_hidden()
    assert len(X) == len(y) == len(d) == len(public) == 3240
    assert 0.25 <= public.float().mean() <= 0.34
    for i in range(len(challenge.DOMAINS)):   # every domain in both parts
        assert public[d == i].any() and (~public[d == i]).any()
    bad = tmp_path / "hidden.safetensors"
    data = bytearray(challenge.default_hidden_path().read_bytes())
    data[-10] ^= 0x01
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted or was modified") as info:
        challenge.load_hidden(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="does not exist"):
        challenge.load_hidden(tmp_path / "none.safetensors")


def test_hidden_split_stays_with_the_instructor():
    """instructor/ (hence instructor/capstone) is pruned from the sdist and outside the packages, which is
    how instructor/bank stays out (tests/test_wheel.py checks the wheel for any instructor/ file)."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    hidden = challenge.default_hidden_path()
    assert repo / "instructor" in hidden.parents
    assert "prune instructor" in (repo / "MANIFEST.in").read_text().splitlines()
    pyproject = (repo / "pyproject.toml").read_text()
    assert 'include = ["labkit*"]' in pyproject
    assert not any(p.suffix == ".safetensors" for p in (repo / "labkit").rglob("*"))


def test_make_hidden_rebuilds_the_stored_split():
    """instructor/capstone/make_hidden.py is deterministic: its tensors are the stored ones."""
    import importlib.util

    path = challenge.default_hidden_path().parent / "make_hidden.py"
    spec_ = importlib.util.spec_from_file_location("make_hidden", path)
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    rebuilt = module.hidden_tensors()
    stored = challenge.load_hidden()
    for name, tensor in zip(("X", "y", "domain", "public"), stored):
        assert torch.equal(rebuilt[name], tensor), name
    # the hidden images are the test split's: clean copies first, then the shifted ones
    from labkit.data import load_digits

    assert torch.equal(stored[0][stored[2] == 0], load_digits().X_test)


@pytest.mark.gpu
def test_submissions_score_the_same_on_cuda(tmp_path):
    """Every kind on CUDA gives the CPU's logits (float32 tolerance) and the same FLOPs."""
    router = torch.nn.Linear(64, 3)
    subs = {
        "ens": (spec("ensemble", members=["zoo:digits/soup-ft0", "zoo:digits/cnn-s0"], rule="mean_prob"), {}),
        "merge": (spec("merge", merge={"method": "ties", "base": "zoo:digits/soup-base",
                                       "models": ["zoo:digits/soup-ft1", "zoo:digits/soup-ft2"],
                                       "parameters": {"density": 0.5}}), {}),
        "moe": (spec("moe", router="r", experts=["zoo:digits/task-rotate", "zoo:digits/task-noise",
                                                 "zoo:digits/soup-ft7"], top_k=2), {"r": router}),
        "cascade": (spec("cascade", stages=[{"model": "zoo:digits/soup-ft7", "threshold": 0.9},
                                            {"model": "zoo:digits/cnn-s0"}]), {}),
    }
    X = challenge.load_public("val")[0]
    for name, (s, models) in subs.items():
        path = write_submission(tmp_path / name, s, models)
        cpu, gpu = load_submission(path, device="cpu"), load_submission(path, device="cuda")
        z_cpu, z_gpu = cpu.logits(X), gpu.logits(X.cuda())
        assert z_gpu.device.type == "cuda"
        assert torch.allclose(z_cpu, z_gpu.cpu(), atol=1e-4), name
        if name != "cascade":   # a cascade's exits may flip on a near-threshold example
            assert cost.submission_flops(cpu, X) == cost.submission_flops(gpu, X.cuda()), name


def test_methods_never_import_the_tooling():
    import ast
    from pathlib import Path

    root = Path(challenge.__file__).parent
    tooling = {"leaderboard", "leaderboard_html", "make_class"}
    for name in ("challenge", "spec", "kinds", "cost"):
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = {(n.module or "").split(".")[-1] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name.split(".")[-1] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not imported & tooling, (name, imported & tooling)


def test_write_folder_atomically_keeps_the_old_folder_on_failure(tmp_path, monkeypatch):
    from labkit.capstone import spec as spec_mod

    target = tmp_path / "sub"
    target.mkdir()
    (target / "old.txt").write_text("old")

    def fails(tmp):
        (tmp / "half.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        spec_mod.write_folder_atomically(target, fails)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]            # no temporary folder left
    assert [p.name for p in target.iterdir()] == ["old.txt"]

    real_replace, calls = spec_mod.os.replace, []

    def second_rename_fails(src, dst):        # moving the old folder aside works, the new one's rename fails
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(spec_mod.os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="rename failed"):
        spec_mod.write_folder_atomically(target, lambda tmp: (tmp / "new.txt").write_text("new"))
    monkeypatch.setattr(spec_mod.os, "replace", real_replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]
    assert [p.name for p in target.iterdir()] == ["old.txt"]              # put back

    spec_mod.write_folder_atomically(target, lambda tmp: (tmp / "new.txt").write_text("new"))
    assert [p.name for p in target.iterdir()] == ["new.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["sub"]
