"""Masked iterative refinement: schedule, re-masking, sampling precision, diffusion commits, round trips."""
import math

import pytest
import torch

from labkit.data import EOS_ID, VOCAB
from labkit.refine import masked
from labkit.refine.masked import (ANSWER_WIDTH, MASK_ID, decode_answers, encode_answers, encode_prompts,
                                  lowest_confidence, make_masked_lm, mask_predict, mask_predict_step,
                                  masked_diffusion, predict_tokens, remask_count)


def test_mask_id_is_new_and_leaves_existing_ids_alone():
    assert MASK_ID == len(VOCAB) and MASK_ID not in VOCAB.values()
    assert make_masked_lm("tiny").config.vocab_size == len(VOCAB) + 1


@pytest.mark.parametrize("L,T,expected", [(8, 4, [8, 6, 4, 2, 0]), (5, 3, [5, 3, 1, 0]), (8, 1, [8, 0])])
def test_remask_schedule_is_floor_L_T_minus_t_over_T(L, T, expected):
    # n_t = floor(L (T - t) / T), written out by hand for each case
    assert [remask_count(t, T, L) for t in range(T + 1)] == expected


def test_remask_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="iterations"):
        remask_count(0, 0, 8)
    with pytest.raises(ValueError, match="t must"):
        remask_count(5, 4, 8)


def test_lowest_confidence_picks_exactly_the_n_least_confident():
    conf = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.95],
                         [0.2, 0.8, 0.1, 0.7, 0.6]], dtype=torch.float64)
    got = lowest_confidence(conf, 2)
    assert got.tolist() == [[False, True, False, True, False], [True, False, True, False, False]]
    per_row = lowest_confidence(conf, torch.tensor([1, 3]))
    assert per_row.tolist() == [[False, True, False, False, False], [True, False, True, False, True]]
    # ties go to the earlier position
    assert lowest_confidence(torch.full((1, 4), 0.5), 2).tolist() == [[True, True, False, False]]
    with pytest.raises(ValueError, match="n must"):
        lowest_confidence(conf, 6)


class SpyModel(torch.nn.Module):
    """Records the ids it was called with and returns fixed logits that favour token 'a' at every position."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, input_ids, attention_mask):
        self.calls.append(input_ids.clone())
        logits = torch.zeros(*input_ids.shape, masked.MASKED_VOCAB_SIZE)
        logits[..., VOCAB["a"]] = 3.0
        return type("Out", (), {"logits": logits})()


def test_mask_predict_step_remasks_exactly_the_least_confident_and_keeps_the_rest():
    spy = SpyModel()
    ids, mask = encode_prompts(["c:ab=", "c:cd="])
    tokens = torch.tensor([[VOCAB[c] for c in "bcdefghi"], [VOCAB[c] for c in "ijbcdefg"]])
    conf = torch.tensor([[.9, .2, .8, .1, .7, .6, .95, .3],
                         [.1, .9, .9, .9, .9, .9, .9, .05]], dtype=torch.float64)
    new_tokens, new_conf, remasked = mask_predict_step(spy, ids, mask, tokens, conf, 3)
    expected = torch.zeros_like(remasked)
    expected[0, [3, 1, 7]] = True   # 0.1, 0.2, 0.3
    expected[1, [7, 0, 1]] = True   # 0.05, 0.1, then the first 0.9
    assert torch.equal(remasked, expected)
    seen = spy.calls[0][:, ids.shape[1]:]
    assert torch.equal(seen == MASK_ID, expected)  # the model saw [MASK] exactly there
    assert torch.equal(new_tokens[~expected], tokens[~expected]) and torch.equal(new_conf[~expected], conf[~expected])
    assert (new_tokens[expected] == VOCAB["a"]).all()
    p_a = math.exp(3) / (math.exp(3) + masked.MASKED_VOCAB_SIZE - 1 - len(masked._FORBIDDEN))
    assert torch.allclose(new_conf[expected], torch.tensor(p_a, dtype=torch.float64))


def test_predict_tokens_samples_in_float64_reproducibly_and_greedy_is_argmax():
    logits = torch.tensor([[[0.0, 1.0, 2.0]]], dtype=torch.bfloat16)
    tokens, conf = predict_tokens(logits)
    assert tokens.item() == 2 and conf.dtype == torch.float64
    assert conf.item() == pytest.approx(math.exp(2) / (1 + math.e + math.exp(2)), abs=1e-12)
    a = predict_tokens(logits.expand(1, 4000, 3), 1.0, torch.Generator().manual_seed(0))
    b = predict_tokens(logits.expand(1, 4000, 3), 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(a[0], b[0])
    freq = torch.bincount(a[0].flatten(), minlength=3).double() / 4000
    assert torch.allclose(freq, torch.softmax(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), 0), atol=0.03)
    with pytest.raises(ValueError, match="temperature"):
        predict_tokens(logits, -1.0)


def test_encode_decode_round_trip_and_errors():
    slot = encode_answers(["123", ""])
    assert slot.shape == (2, ANSWER_WIDTH) and (slot[0, 3:] == EOS_ID).all()
    assert decode_answers(slot) == ["123", ""]
    slot[0, 1] = MASK_ID
    assert decode_answers(slot) == ["1_3", ""]
    with pytest.raises(ValueError, match="prompt 'c:abcdefghijklmnop='"):
        encode_prompts(["c:abcdefghijklmnop="])
    with pytest.raises(ValueError, match="answer '123456789'"):
        encode_answers(["123456789"])


def test_mask_predict_trace_follows_the_schedule_on_a_tiny_model():
    model = make_masked_lm("tiny", seed=0).eval()
    ids, mask = encode_prompts(["s:321=", "a:4+5=", "s:97="])
    tokens, trace = mask_predict(model, ids, mask, 4, trace=True)
    assert [int(s["remasked"][0].sum()) for s in trace] == [8, 6, 4, 2]
    assert torch.equal(trace[-1]["tokens"], tokens) and (tokens != MASK_ID).all()


def test_masked_diffusion_never_changes_a_committed_token():
    model = make_masked_lm("tiny", seed=1).eval()
    ids, mask = encode_prompts(["s:321=", "a:4+5="])
    tokens, trace = masked_diffusion(model, ids, mask, 3, temperature=1.0, generator=torch.Generator().manual_seed(0),
                                     trace=True)
    still_masked = [int((s["tokens"] == MASK_ID).sum(1)[0]) for s in trace]
    assert still_masked == [remask_count(t, 3, ANSWER_WIDTH) for t in (1, 2, 3)]
    for before, after in zip(trace, trace[1:]):
        committed = before["tokens"] != MASK_ID
        assert torch.equal(after["tokens"][committed], before["tokens"][committed])


def test_masked_lm_save_pretrained_round_trip(tmp_path):
    from transformers import AutoModelForMaskedLM

    model = make_masked_lm("tiny", seed=2).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    ids, mask = encode_prompts(["s:3142="])
    assert torch.equal(mask_predict(model, ids, mask, 3), mask_predict(loaded, ids, mask, 3))


def test_fill_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="method"):
        masked.fill(make_masked_lm("tiny"), ["s:1="], 2, method="beam")


def test_zoo_masked_refiner_reproduces_its_recorded_metric():
    from labkit import zoo
    from labkit.refine.training import masked_accuracy, task_examples

    if "refine/masked" not in zoo.read_manifest()["entries"]:
        pytest.skip("refine/masked is not built")
    model = zoo.load("refine/masked", device="cpu")
    prompts = [r["prompt"] for r in task_examples("perm", 200, seed=99, split="test")]
    assert masked_accuracy(model, prompts, 4) == zoo.info("refine/masked")["metrics"]["mask_predict/perm/steps4"]


def test_left_to_right_baseline_spends_one_pass_per_token():
    from labkit.models import make_llama

    model = make_llama("tiny", seed=0).eval()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(1))
    masked.left_to_right(model, ["s:321=", "a:1+2="], 3)
    assert 1 <= len(calls) <= 3  # generate stops early only if every row emitted <eos>
    with pytest.raises(ValueError, match="forward_passes"):
        masked.left_to_right(model, ["s:1="], 0)


def test_permutation_task_has_many_right_answers_and_disjoint_splits():
    from labkit.refine.self_refine import check_answer
    from labkit.refine.training import permutation_examples, task_examples

    train, test = permutation_examples(300, seed=0), permutation_examples(100, seed=0, split="test")
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in test)
    assert all(check_answer(r["prompt"], r["answer"]) for r in train + test)
    assert check_answer("m:abca=", "caba") and not check_answer("m:abca=", "abcc")
    mixed = task_examples(["sort", "perm"], 5, seed=1)
    assert [r["task"] for r in mixed] == ["sort", "perm", "sort", "perm", "sort"]
