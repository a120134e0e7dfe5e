"""Unit tests for the foundation modules: device, data, models, train, zoo, doctor, bench."""
import json
import math
import shutil

import numpy as np
import pytest
import torch

from labkit import bench, data, device, models, train, zoo


# ----------------------------------------------------------------------------- device

def test_run_mode_from_env(monkeypatch):
    monkeypatch.setenv("LABKIT_MODE", "full")
    assert device.run_mode() == "full" and not device.is_smoke()
    assert device.by_mode(smoke=1, full=2) == 2
    monkeypatch.setenv("LABKIT_MODE", "smoke")
    assert device.by_mode(smoke=1, full=2) == 1


def test_run_mode_rejects_unknown(monkeypatch):
    monkeypatch.setenv("LABKIT_MODE", "fast")
    with pytest.raises(ValueError, match="LABKIT_MODE='fast'"):
        device.run_mode()


def test_run_mode_default_follows_device(monkeypatch):
    monkeypatch.delenv("LABKIT_MODE", raising=False)
    expected = "full" if torch.cuda.is_available() else "smoke"
    assert device.run_mode() == expected


def test_get_device_refuses_missing_cuda(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present, so asking for it is not an error")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        device.get_device("cuda")


def test_seed_everything_reproduces():
    device.seed_everything(3)
    a = (torch.rand(3), np.random.rand(), __import__("random").random())
    device.seed_everything(3)
    b = (torch.rand(3), np.random.rand(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


# ----------------------------------------------------------------------------- data

def test_tokenizer_roundtrip_and_ids():
    tok = data.get_tokenizer()
    ids = tok("r:ab c=")["input_ids"]
    assert ids[0] == data.BOS_ID and len(ids) == 1 + len("r:ab c=")
    assert tok.decode(ids, skip_special_tokens=True) == "r:ab c="
    assert tok.pad_token_id == data.PAD_ID and tok.eos_token_id == data.EOS_ID
    batch = tok(["c:a=", "c:abc="], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0].tolist()[:2] == [0, 0]  # left padding for generation


@pytest.mark.parametrize("task", sorted(data.TASKS))
def test_task_answers_are_correct(task):
    for ex in data.make_examples(task, 50, seed=1):
        inp = ex["prompt"][2:].rstrip("=")
        ans = ex["answer"]
        if task == "copy":
            assert ans == inp
        elif task == "rev":
            assert ans == inp[::-1]
        elif task == "sort":
            assert ans == "".join(sorted(inp))
        elif task == "add":
            a, b = inp.split("+")
            assert int(ans) == int(a) + int(b)
        elif task == "count":
            q, s = inp.split("|")
            assert int(ans) == s.count(q)
        elif task == "chat":
            assert ex["prompt"] == "t:" and 3 <= len(ans.split()) <= 7
        assert ex["text"] == ex["prompt"] + ans


def test_task_data_is_deterministic_and_splits_disjoint():
    a = data.make_examples(["rev", "add"], 200, seed=5)
    assert a == data.make_examples(["rev", "add"], 200, seed=5)
    assert a != data.make_examples(["rev", "add"], 200, seed=6)
    train_prompts = {e["prompt"] for e in data.make_examples(["rev", "add"], 3000, seed=0)}
    test_prompts = {e["prompt"] for e in data.make_examples(["rev", "add"], 300, seed=0, split="test")}
    assert not train_prompts & test_prompts


def test_chat_unwanted_rate_is_respected():
    rows = data.make_examples("chat", 2000, seed=0, chat_unwanted_rate=0.25)
    rate = data.unwanted_rate(r["answer"] for r in rows)
    assert abs(rate - 0.25) < 0.04
    assert data.unwanted_rate(r["answer"] for r in data.make_examples("chat", 50, chat_unwanted_rate=0.0)) == 0


def test_task_dataset_errors():
    with pytest.raises(ValueError, match="unknown task"):
        data.make_task_dataset("multiply", 3)
    with pytest.raises(ValueError, match="split"):
        data.make_task_dataset("rev", 3, split="dev")
    ds = data.make_task_dataset(["copy"], 4)
    assert ds.column_names == ["task", "prompt", "answer", "text"] and len(ds) == 4


def test_encode_for_training_masks_prompt():
    enc = data.encode_for_training(["r:ab=", "c:abc="], ["ba", "abc"])
    tok = data.get_tokenizer()
    ids, labels = enc["input_ids"], enc["labels"]
    assert ids.shape == labels.shape == enc["attention_mask"].shape == (2, 11)
    # first row: <bos> r : a b = | b a <eos>, then 2 pads to the second row's 11 tokens
    assert labels[0].tolist() == [-100] * 6 + [tok.convert_tokens_to_ids("b"), tok.convert_tokens_to_ids("a"),
                                               data.EOS_ID] + [-100] * 2
    assert enc["attention_mask"][0].tolist() == [1] * 9 + [0] * 2


def test_digits_splits():
    d = data.load_digits()
    assert (len(d.X_train), len(d.X_val), len(d.X_test)) == (1078, 359, 360)
    assert d.X_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert float(d.X_train.min()) >= 0 and float(d.X_train.max()) <= 1
    assert torch.equal(torch.bincount(d.y_test), torch.bincount(d.y_test))  # all ten classes present
    assert len(torch.unique(d.y_test)) == 10


@pytest.mark.parametrize("kind", data.SHIFT_KINDS)
def test_shifted_digits_differ_and_stay_in_range(kind):
    d = data.load_digits()
    Xs = data.shift_digits(d.X_test, kind)
    assert Xs.shape == d.X_test.shape and Xs.dtype == torch.float32
    assert float(Xs.min()) >= 0 and float(Xs.max()) <= 1
    assert (Xs - d.X_test).abs().mean() > 0.01
    assert torch.equal(Xs, data.shift_digits(d.X_test, kind))  # seeded


def test_thicken_only_adds_ink():
    d = data.load_digits()
    assert bool((data.shift_digits(d.X_test, "thicken") >= d.X_test - 1e-6).all())


def test_shift_digits_errors():
    with pytest.raises(ValueError, match="unknown shift kind"):
        data.shift_digits(torch.zeros(2, 64), "sharpen")
    with pytest.raises(ValueError, match=r"\[N, 64\]"):
        data.shift_digits(torch.zeros(2, 8, 8), "noise")


# ----------------------------------------------------------------------------- models

def test_llama_roundtrip(tmp_path):
    m = models.make_llama("tiny", seed=0)
    m.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    m2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    x = torch.tensor([[1, 5, 6, 7]])
    torch.testing.assert_close(m(x).logits, m2(x).logits)
    assert m.config.vocab_size == len(data.VOCAB)


def test_mixtral_active_params_match_dense():
    dense = models.llama_config("small")
    moe = models.mixtral_config("small", num_experts=8, top_k=2)
    # active MLP width per token = top_k * expert width = dense width
    assert moe.num_experts_per_tok * moe.intermediate_size == dense.intermediate_size
    m = models.make_mixtral("tiny", num_experts=4, top_k=2)
    assert m(torch.tensor([[1, 5, 6]])).logits.shape == (1, 3, len(data.VOCAB))


def test_unknown_size():
    with pytest.raises(ValueError, match="unknown LM size"):
        models.make_llama("huge")


@pytest.mark.parametrize("cls", [models.DigitMLP, models.DigitCNN])
def test_classifier_save_load(tmp_path, cls):
    m = cls()
    models.save_classifier(m, tmp_path)
    m2 = models.load_classifier(tmp_path)
    x = torch.rand(5, 64)
    torch.testing.assert_close(m(x), m2(x))
    assert m(x).shape == (5, 10)


def test_make_classifier_error():
    with pytest.raises(ValueError, match="unknown classifier kind"):
        models.make_classifier({"kind": "rnn"})


# ----------------------------------------------------------------------------- train

def test_cosine_schedule_shape():
    assert train.cosine_schedule(0, 100, 10) == pytest.approx(0.1)
    assert train.cosine_schedule(9, 100, 10) == pytest.approx(1.0)
    assert train.cosine_schedule(10, 100, 10) == pytest.approx(1.0)
    assert train.cosine_schedule(100, 100, 10) == pytest.approx(0.1)
    mid = train.cosine_schedule(55, 100, 10)
    assert mid == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_train_classifier_learns_and_is_seeded():
    d = data.load_digits()
    accs = []
    for _ in range(2):
        torch.manual_seed(0)
        m = models.DigitMLP(hidden=(32,))
        h = train.train_classifier(m, d.X_train, d.y_train, steps=150, X_val=d.X_val, y_val=d.y_val,
                                   eval_every=50, device="cpu", seed=0)
        accs.append(h["eval"][-1][1])
        assert [s for s, _ in h["eval"]] == [50, 100, 150]
    assert accs[0] == accs[1] > 0.85
    assert h["loss"][-1] < h["loss"][0]


def test_train_classifier_errors():
    m = models.DigitMLP()
    with pytest.raises(ValueError, match="steps must be positive"):
        train.train_classifier(m, torch.zeros(3, 64), torch.zeros(3, dtype=torch.long), steps=0)
    with pytest.raises(ValueError, match="3 rows but y has 2"):
        train.train_classifier(m, torch.zeros(3, 64), torch.zeros(2, dtype=torch.long), steps=1)
    with pytest.raises(ValueError, match="3 rows but y has 2"):
        train.accuracy(m, torch.zeros(3, 64), torch.zeros(2, dtype=torch.long))


def test_accuracy_by_hand():
    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0].long(), 10).float() + self.w

    X = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    assert train.accuracy(Fixed(), X, torch.tensor([1, 2, 0, 0])) == 0.5


def test_train_lm_overfits_one_task():
    m = models.make_llama("tiny", seed=0)
    ds = data.make_task_dataset("copy", 64, seed=0)
    h = train.train_lm(m, ds, steps=60, batch_size=32, lr=3e-3, device="cpu", eval_data=ds.select(range(16)))
    assert h["loss"][-1] < 0.5 * h["loss"][0]
    assert len(h["eval"]) == 1


# ----------------------------------------------------------------------------- zoo

def test_every_recipe_parent_exists_and_names_resolve():
    for name, recipe in zoo.RECIPES.items():
        assert recipe.get("parent") is None or recipe["parent"] in zoo.RECIPES, name
    order = zoo.resolve_names(["digits/soup-ft0"]) + zoo.resolve_names(["lm/"])
    assert zoo.resolve_names(["lm/"]).index("lm/base") < zoo.resolve_names(["lm/"]).index("lm/ft-add")
    with pytest.raises(zoo.ZooError, match="unknown zoo entry 'lm/nope'"):
        zoo.resolve_names(["lm/nope"])
    assert order


def test_shipped_zoo_matches_manifest_and_metrics():
    entries = zoo.read_manifest()["entries"]
    assert set(entries) <= set(zoo.RECIPES)
    total = 0
    for name, entry in entries.items():
        zoo.verify(name)
        total += sum((zoo.path(name) / f).stat().st_size for f in entry["files"])
        assert all(f.endswith((".json", ".safetensors")) for f in entry["files"]), name
    # issue 13: data/ (the zoo and its manifest) may hold 60 MB; the zoo stays under 59 MB
    assert total < 59e6, f"the zoo is {total / 1e6:.1f} MB, over the 59 MB budget"
    for name, entry in entries.items():
        if entry["kind"] == "digits":
            shift = entry["recipe"].get("train_shift")
            key = f"test_{shift}_accuracy" if shift else "val_accuracy"  # a domain specialist, on its domain
            # 0.8: digits/task-shift reaches 0.82 on translated digits with the recipe all task-* entries share
            assert entry["metrics"][key] > 0.8, (name, key)
    if "lm/base" in entries:
        m = entries["lm/base"]["metrics"]
        assert min(m["exact_match/copy"], m["exact_match/rev"], m["exact_match/count"]) >= 0.95


@pytest.fixture
def zoo_copy(tmp_path, monkeypatch):
    """A private copy of the manifest and one entry, so tests can corrupt files safely."""
    name = "digits/mlp-s0"
    src = zoo.path(name)
    dst = tmp_path / "zoo" / name
    shutil.copytree(src, dst)
    manifest = zoo.read_manifest()
    (tmp_path / "zoo" / "manifest.json").write_text(
        json.dumps({"version": 1, "entries": {name: manifest["entries"][name]}}))
    monkeypatch.setenv("LABKIT_DATA", str(tmp_path))
    return name, dst


def test_zoo_load_verified_entry(zoo_copy):
    name, _ = zoo_copy
    model = zoo.load(name, device="cpu")
    d = data.load_digits()
    assert train.accuracy(model, d.X_val, d.y_val) == pytest.approx(zoo.info(name)["metrics"]["val_accuracy"],
                                                                    abs=1e-4)


def test_zoo_refuses_corrupted_file(zoo_copy):
    name, dst = zoo_copy
    f = dst / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(zoo.ZooError, match=r"model\.safetensors has SHA-256 .* corrupted or was modified"):
        zoo.load(name, device="cpu")


def test_zoo_refuses_missing_file_and_unbuilt_entry(zoo_copy):
    name, dst = zoo_copy
    (dst / "classifier.json").unlink()
    with pytest.raises(zoo.ZooError, match="classifier.json is missing"):
        zoo.load(name)
    with pytest.raises(zoo.ZooError, match="not built"):
        zoo.info("digits/mlp-s1")
    with pytest.raises(zoo.ZooError, match="unknown zoo entry"):
        zoo.load("digits/nope")


def test_zoo_build_digits_entry_is_atomic_and_recorded(zoo_copy, monkeypatch):
    name, dst = zoo_copy
    entry = zoo.build("digits/ckpt-100", device="cpu")
    zoo.verify("digits/ckpt-100")
    assert entry["metrics"]["val_accuracy"] > 0.8
    assert not list(dst.parent.glob(".building-*"))
    # an existing entry is kept unless forced
    before = zoo.info(name)["files"]
    zoo.build(name, device="cpu")
    assert zoo.info(name)["files"] == before


# ----------------------------------------------------------------------------- doctor and bench

def test_doctor_version_check(monkeypatch):
    from labkit import doctor

    assert doctor._version_tuple("2.13.0+cpu") == (2, 13, 0)
    assert doctor._version_tuple("1.26.4rc1") == (1, 26, 4)
    rows = {m: s for m, _, s in doctor.check_versions()}
    assert rows["torch"] == "ok"
    monkeypatch.setitem(doctor.TESTED, "torch", ("9.0", "10.0"))
    rows = {m: s for m, _, s in doctor.check_versions()}
    assert rows["torch"].startswith("untested")


def test_bench_table_and_errors(tmp_path):
    table = bench.format_table(["k", "ratio"], [{"k": 2, "ratio": 1.23456}, {"k": 16, "ratio": None}])
    assert table.splitlines()[2].split() == ["2", "1.235"]
    assert table.splitlines()[3].split() == ["16", "-"]
    with pytest.raises(ValueError, match="unknown benchmark 'foo'"):
        bench.run_benchmark("foo", out_dir=tmp_path)
    t = bench.time_fn(lambda: sum(range(100)), warmup=1, repeat=3, device="cpu")
    assert t["samples"] >= 3 and t["min_s"] <= t["median_s"]
    assert bench.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_load_pretrained_local_dir_and_offline_refusal(tmp_path, monkeypatch):
    m = models.make_llama("tiny", seed=2)
    m.save_pretrained(tmp_path / "m")
    data.get_tokenizer().save_pretrained(tmp_path / "m")
    loaded, tok = models.load_pretrained(tmp_path / "m", device="cpu")
    x = torch.tensor([[1, 8, 9]])
    torch.testing.assert_close(loaded(x).logits, m(x).logits)
    assert tok("c:ab=")["input_ids"] == data.get_tokenizer()("c:ab=")["input_ids"]
    monkeypatch.delenv("LABKIT_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="does not download by default"):
        models.load_pretrained("labkit-nonexistent/model-xyz")


def test_check_same_vocab_names_first_differing_token():
    from labkit.models import check_same_vocab
    a = {"<pad>": 0, "a": 1, "b": 2, "c": 3}
    check_same_vocab([a, dict(a), None], names=["x", "y", "z"])  # identical or missing: fine
    swapped = {"<pad>": 0, "a": 1, "c": 2, "b": 3}  # same size, ids 2 and 3 swapped
    with pytest.raises(ValueError, match=r"id 2 is 'b' in x but 'c' in y"):
        check_same_vocab([a, swapped], names=["x", "y"])
    bigger = dict(a, d=4)
    with pytest.raises(ValueError, match=r"id 4 is None in x but 'd' in y"):
        check_same_vocab([a, bigger], names=["x", "y"])
    check_same_vocab([a, swapped], allow_mismatch=True)


def test_check_same_vocab_on_kit_tokenizer():
    from labkit.data import get_tokenizer
    from labkit.models import check_same_vocab
    tok = get_tokenizer()
    check_same_vocab([tok, get_tokenizer()])
    vocab = tok.get_vocab()
    first, second = sorted(vocab, key=vocab.get)[5:7]
    other = dict(vocab)
    other[first], other[second] = vocab[second], vocab[first]
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_same_vocab([tok, other])


# ----------------------------------------------------------------------------- labkit.evaluate
def test_evaluation_helpers_moved_to_evaluate_and_stay_importable():
    import subprocess
    import sys

    from labkit import evaluate
    from labkit.data import exact_match, generate_answers, unwanted_rate
    from labkit.train import accuracy, predict_logits

    assert (exact_match, generate_answers, unwanted_rate) == (evaluate.exact_match, evaluate.generate_answers,
                                                             evaluate.unwanted_rate)
    assert (accuracy, predict_logits) == (evaluate.accuracy, evaluate.predict_logits)
    with pytest.raises(AttributeError, match="labkit.data' has no attribute 'exact_matches'"):
        data.exact_matches  # noqa: B018
    # data <-> evaluate must import in either order in a fresh interpreter (no circular import)
    for first, second in (("evaluate", "data"), ("data", "evaluate"), ("train", "evaluate")):
        code = f"import labkit.{first}, labkit.{second}; from labkit.data import exact_match"
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-500:]


class _ScriptedLM(torch.nn.Module):
    """A stand-in causal LM whose generate() appends a scripted answer (+ <eos>, then padding) per prompt."""

    def __init__(self, answers):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.answers = list(answers)
        self.calls = 0

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        tok = data.get_tokenizer()
        rows = []
        for _ in range(len(input_ids)):
            ids = tok(self.answers[self.calls], add_special_tokens=False)["input_ids"] + [data.EOS_ID]
            self.calls += 1
            ids = (ids + [data.PAD_ID] * max_new_tokens)[:max_new_tokens]
            rows.append(ids)
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)


def test_exact_match_and_unwanted_rate_by_hand():
    from labkit import evaluate

    ds = {"prompt": ["c:ab=", "r:abc=", "a:1+2=", "s:31="], "answer": ["ab", "cba", "3", "13"]}
    model = _ScriptedLM(["ab", "cb", "3", "13x"])  # right, too short, right, too long
    assert evaluate.exact_match(model, ds, batch_size=3) == 2 / 4
    assert model.calls == 4 and model.training  # every prompt answered once; the training flag restored
    # answers are cut at <eos> and decoded without the prompt
    assert evaluate.generate_answers(_ScriptedLM(["xy"]), ["c:xy="], max_new_tokens=5) == ["xy"]
    assert evaluate.unwanted_rate(["darn it", "darned", "a darn b", "ok"]) == 0.5  # whole words only
    with pytest.raises(ValueError, match="non-empty dataset"):
        evaluate.exact_match(model, {"prompt": [], "answer": []})
    with pytest.raises(ValueError, match="at least one text"):
        evaluate.unwanted_rate([])
