"""The merging tasks (rsort, max, dedupe, inc), the lm/merge-* zoo entries and labkit.merge.sweep."""
import hashlib
import json
import math
from collections import Counter

import pytest
import torch

from labkit import data, merge, zoo
from labkit.merge import sweep as merge_sweep
from labkit.evaluate import exact_match

NEW_TASKS = ["rsort", "max", "dedupe", "inc"]


# ----------------------------------------------------------------------------- tasks


@pytest.mark.parametrize("task", NEW_TASKS)
def test_new_task_answers_are_correct(task):
    for ex in data.make_examples(task, 300, seed=3):
        prefix, inp = ex["prompt"][:2], ex["prompt"][2:-1]
        ans = ex["answer"]
        assert ex["prompt"].endswith("=") and ex["text"] == ex["prompt"] + ans
        assert prefix == data.TASKS[task].prefix + ":"
        if task == "rsort":
            # a descending order by counting digits, not by sorting
            counts = Counter(inp)
            assert ans == "".join(d * counts[d] for d in "9876543210")
        elif task == "max":
            assert len(ans) == 1 and ans in inp and all(int(c) <= int(ans) for c in inp)
        elif task == "dedupe":
            assert len(set(ans)) == len(ans) and set(ans) == set(inp)
            assert [inp.index(c) for c in ans] == sorted(inp.index(c) for c in set(inp))
        elif task == "inc":
            assert len(ans) == len(inp) and all((int(a) - int(i)) % 10 == 1 for a, i in zip(ans, inp))


class _ScriptedRng:
    """Stands in for random.Random: a fixed length, then the given characters one by one."""

    def __init__(self, chars):
        self.chars = iter(chars)
        self.length = len(chars)

    def randint(self, lo, hi):
        assert lo <= self.length <= hi
        return self.length

    def choice(self, alphabet):
        c = next(self.chars)
        assert c in alphabet
        return c


def test_new_tasks_by_hand():
    cases = {"rsort": ("3142", "4321"), "max": ("3142", "4"), "dedupe": ("abacb", "abc"),
             "inc": ("3149", "4250"), }
    for task, (inp, ans) in cases.items():
        assert data.TASKS[task].make(_ScriptedRng(inp)) == (inp, ans), task


@pytest.mark.parametrize("task", NEW_TASKS)
def test_new_tasks_split_and_vocabulary(task):
    train = {r["prompt"] for r in data.make_examples(task, 3000, seed=0)}
    test = {r["prompt"] for r in data.make_examples(task, 300, seed=0, split="test")}
    assert not train & test and len(test) > 200
    tok = data.get_tokenizer()
    for r in data.make_examples(task, 50, seed=1):
        assert data.UNK_ID not in tok(r["text"])["input_ids"]


def test_prefixes_are_unique():
    prefixes = [t.prefix for t in data.TASKS.values()]
    assert len(prefixes) == len(set(prefixes))


def test_existing_tasks_keep_their_data_and_token_ids():
    # digest computed from the code before the merging tasks were added (main at b8970b8): the shipped
    # checkpoints were trained and evaluated on exactly these examples and ids
    rows = [data.make_examples(["copy", "rev", "sort", "add", "count", "chat"], 600, seed=s, split=sp)
            for s in (0, 7) for sp in ("train", "test")]
    blob = json.dumps([rows, data.VOCAB, data.get_tokenizer()("a:47+85=132")["input_ids"]]).encode()
    assert hashlib.sha256(blob).hexdigest() == "cffa976e8dd614feeceaca68277a0a202ebd6aa01bbeb3a3862330316c51436a"


# ----------------------------------------------------------------------------- zoo entries


def _built(prefix):
    return [n for n in zoo.names(prefix) if n in zoo.read_manifest()["entries"]]


def test_merge_entries_are_built_verify_and_recipes_match():
    built = _built("lm/merge")
    on_cpu = {n for n in zoo.names("lm/merge") if zoo.RECIPES[n].get("built_on") != "gpu"}
    assert on_cpu <= set(built), f"not built: {sorted(on_cpu - set(built))}"
    for prefix, (base, _) in zoo.LM_MERGE_CONDITIONS.items():
        assert {zoo.RECIPES[prefix + t]["parent"] for t in zoo.LM_MERGE_TASKS} == {base}, prefix
    for name in built:
        zoo.verify(name)
        entry = zoo.info(name)
        assert entry["recipe"] == {k: v for k, v in zoo.RECIPES[name].items() if k not in ("description", "kind")}
        if "parent" in entry["recipe"]:
            assert 0 < entry["metrics"]["tau_relative_norm"] < 1, name


def test_merge_bases_have_weak_skills_on_every_seed_and_finetunes_refine_them():
    for base in ("lm/merge-base", "lm/merge-base-tiny", "lm/merge-base-tiny-s1"):
        m = zoo.info(base)["metrics"]
        # the controls are learned, every merging skill is present and none is mastered (the widest base
        # learns add at 19% of its data to 0.935: its fine-tune has least to add there)
        assert min(m[f"exact_match/{t}"] for t in zoo.LM_MERGE_CONTROLS) >= 0.85, base
        assert all(0.03 <= m[f"exact_match/{t}"] < 0.95 for t in zoo.LM_MERGE_TASKS), base
    for prefix, (base, _) in zoo.LM_MERGE_CONDITIONS.items():
        parent = zoo.info(base)["metrics"] if base in zoo.read_manifest()["entries"] else None
        for name in _built(prefix):
            (task,) = [t for t in zoo.LM_MERGE_TASKS if name.endswith("-" + t)]
            assert zoo.info(name)["metrics"][f"exact_match/{task}"] >= parent[f"exact_match/{task}"], name


def test_merge_entry_loads_and_its_metric_reproduces():
    name = "lm/merge-tiny-ft-inc"
    model = zoo.load(name, device="cpu")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    test_set = data.make_task_dataset("inc", 200, seed=99, split="test")
    assert exact_match(model, test_set) == pytest.approx(zoo.info(name)["metrics"]["exact_match/inc"], abs=1e-4)


# ----------------------------------------------------------------------------- merge_sweep tooling


def test_teacher_forced_exact_match_equals_greedy_exact_match():
    model = zoo.load("lm/merge-base-tiny", device="cpu")
    rows = data.make_task_dataset(["add", "rsort", "dedupe", "copy"], 120, seed=4, split="test")
    tf = merge_sweep.teacher_forced_exact_match(model, rows)
    assert tf == pytest.approx(exact_match(model, rows), abs=1e-9)
    assert 0 < tf < 1  # mixed skills: the comparison is not trivially 0 == 0 or 1 == 1
    with pytest.raises(ValueError, match="at least one"):
        merge_sweep.teacher_forced_exact_match(model, {"prompt": [], "answer": []})


def test_val_test_split_is_disjoint_held_out_and_deterministic():
    s = merge_sweep.val_test_split("max", 100)
    assert len(s["val"]["prompt"]) == len(s["test"]["prompt"]) == 100
    assert not set(s["val"]["prompt"]) & set(s["test"]["prompt"])
    assert len(set(s["val"]["prompt"])) == 100
    train = {r["prompt"] for r in data.make_examples("max", 5000, seed=0)}
    assert not train & (set(s["val"]["prompt"]) | set(s["test"]["prompt"]))
    assert s == merge_sweep.val_test_split("max", 100)
    with pytest.raises(ValueError, match="n must be positive"):
        merge_sweep.val_test_split("max", 0)


def test_random_direction_matches_norm_per_tensor_and_is_nearly_orthogonal():
    g = torch.Generator().manual_seed(0)
    tv = merge.TaskVector({"a": torch.randn(200, 50, generator=g), "b": 3 * torch.randn(400, generator=g)})
    r = merge_sweep.random_direction_like(tv, seed=1)
    for k in tv.deltas:
        assert r.deltas[k].norm().item() == pytest.approx(tv.deltas[k].norm().item(), rel=1e-5)
    assert r.norm() == pytest.approx(tv.norm(), rel=1e-5)
    assert abs(r.cosine(tv)) < 0.05  # 10,400 dimensions: a random cosine has std ~0.01
    assert merge_sweep.random_direction_like(tv, seed=1).deltas["a"].equal(r.deltas["a"])


def test_normalized_accuracy_and_pick_on_validation():
    assert merge_sweep.normalized_accuracy(0.5, 0.8) == 0.625
    assert math.isnan(merge_sweep.normalized_accuracy(0.3, 0.0))
    assert merge_sweep.pick_on_validation({0.5: 0.2, 1.0: 0.7, 2.0: 0.7}) == 1.0
    with pytest.raises(ValueError, match="at least one candidate"):
        merge_sweep.pick_on_validation({})


# ----------------------------------------------------------------------------- LoRA and replay


def test_lora_linear_by_hand():
    from labkit.train import LoRALinear

    base = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]]))
    lora = LoRALinear(base, rank=1, alpha=2.0)  # scale alpha / r = 2
    with torch.no_grad():
        lora.lora_A.copy_(torch.tensor([[1.0, 2.0, 0.0]]))
        lora.lora_B.copy_(torch.tensor([[0.5], [-1.0]]))
    # by hand: 2 * B A = 2 * [[0.5, 1, 0], [-1, -2, 0]] = [[1, 2, 0], [-2, -4, 0]]
    assert lora.delta_weight().tolist() == [[1.0, 2.0, 0.0], [-2.0, -4.0, 0.0]]
    x = torch.tensor([[1.0, 1.0, 1.0]])
    # W x = [3, 0]; (2 B A) x = [3, -6]; together [6, -6]
    assert lora(x).tolist() == [[6.0, -6.0]]


def test_lora_starts_as_the_base_trains_only_adapters_and_merges_into_the_weights():
    from labkit.models import make_llama
    from labkit.train import LoRALinear, add_lora, merge_lora, train_lm

    model = make_llama("tiny", seed=0)
    keys = list(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(4, 40, (3, 12), generator=torch.Generator().manual_seed(0))
    reference = model(input_ids=ids).logits
    add_lora(model, rank=2)
    assert torch.allclose(model(input_ids=ids).logits, reference)  # B = 0: the unchanged model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    train_lm(model, data.make_task_dataset("sort", 64, seed=0), steps=5, batch_size=16, lr=1e-2, device="cpu")
    adapted = model(input_ids=ids).logits
    n_adapters = sum(isinstance(m, LoRALinear) for m in model.modules())
    assert n_adapters == 2 * 7  # two layers x (q, k, v, o, gate, up, down)
    merge_lora(model)
    assert list(model.state_dict()) == keys and not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert torch.allclose(model(input_ids=ids).logits, adapted, atol=1e-5)  # merged == adapter forward
    after = model.state_dict()
    for k, w in before.items():
        delta = (after[k] - w).double()
        if k.endswith("proj.weight"):
            # tau is low rank (up to float32 rounding of W + delta: rtol 1e-4 on the singular values)
            assert 0 < torch.linalg.matrix_rank(delta, rtol=1e-4).item() <= 2, k
        else:
            assert delta.abs().max().item() == 0, k  # embeddings and norms untouched


def test_lora_errors():
    from labkit.models import make_llama
    from labkit.train import add_lora, merge_lora

    with pytest.raises(ValueError, match="rank must be positive"):
        add_lora(make_llama("tiny"), rank=0)
    with pytest.raises(ValueError, match="no nn.Linear named"):
        add_lora(make_llama("tiny"), targets=("nope",))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        merge_lora(make_llama("tiny"))


def test_replay_mixture_proportions():
    mix = zoo.replay_mixture("sort", 0.5)
    assert sum(mix.values()) == pytest.approx(1.0, abs=1e-5)
    total = sum(zoo.LM_MERGE_MIXTURE.values())
    assert mix["sort"] == pytest.approx(0.5 + 0.5 * zoo.LM_MERGE_MIXTURE["sort"] / total, abs=1e-6)
    assert mix["copy"] == pytest.approx(0.5 * 0.185 / total, abs=1e-6)
    assert set(mix) == set(zoo.LM_MERGE_MIXTURE)
    no_replay = zoo.replay_mixture("inc", 0.0)
    assert no_replay["inc"] == 1.0 and sum(no_replay.values()) == 1.0
    with pytest.raises(ValueError, match="replay must be in"):
        zoo.replay_mixture("sort", 1.0)
    # the data a recipe trains on has these proportions (round(rate * n) examples per task)
    recipe = zoo.RECIPES["lm/merge-tiny-ft-max"]
    rows = zoo._mixture_data(recipe["mixture"], recipe["n_train"], seed=0)
    counts = Counter(p.split(":")[0] for p in rows["prompt"])
    assert counts["m"] / len(rows["prompt"]) == pytest.approx(recipe["mixture"]["max"], abs=1e-3)
    assert counts["c"] / len(rows["prompt"]) == pytest.approx(recipe["mixture"]["copy"], abs=1e-3)


def test_run_sweep_small_grid_pairs_and_figure_row():
    fts = {"max": "lm/merge-tiny-ft-max", "inc": "lm/merge-tiny-ft-inc"}
    r = merge_sweep.run_sweep("lm/merge-base-tiny", fts, controls=("copy",), n=20, lambdas=(0.5, 1.0),
                              densities=(0.5,), task_counts=(2,), drop_rates=(0.0, 0.9), negation_lambdas=(1.0,),
                              log=lambda *_: None)
    pair = r["pair_addition"]["max+inc"]
    assert set(r["pair_addition"]) == {"max+inc"} and pair["chosen"]["lambda"] in (0.5, 1.0)
    # the pair's test score, recomputed here from the zoo without the sweep's scorer
    base = zoo.load("lm/merge-base-tiny", device="cpu")
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    tau = sum(merge.TaskVector.between(base_sd, zoo.load(n, device="cpu").state_dict()) for n in fts.values())
    base.load_state_dict(tau.apply_to(base_sd, scale=pair["chosen"]["lambda"]))
    for t in ("max", "inc", "copy"):
        test = merge_sweep.val_test_split(t, 20)["test"]
        assert pair["test"][t] == pytest.approx(merge_sweep.teacher_forced_exact_match(base, test), abs=1e-4)
    row = merge_sweep.figure_row(r)
    assert row["tau_relative_norm_mean"] == pytest.approx(sum(r["tau_relative_norm"].values()) / 2, abs=1e-4)
    assert row["task_arithmetic_normalized"] == r["methods"]["2 tasks"]["task_arithmetic"]["test_normalized_mean"]
    assert row["pair_gain_captured"] == pytest.approx(pair["test_gain_captured_mean"], abs=1e-4)
    assert any("pairs" in line for line in merge_sweep.summary(r))
