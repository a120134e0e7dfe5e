"""Adaptive computation: per-example stopping, batched early exit == one at a time, compute counting."""
import pytest
import torch

from labkit.refine.adaptive import adaptive_mask_predict, confident, run_adaptive
from labkit.refine.masked import decode_answers, encode_prompts, make_masked_lm, mask_predict

PROMPTS = ["s:321=", "a:4+5=", "s:97=", "a:12+30=", "s:5555=", "a:99+1=", "s:0=", "a:7+7="]


def test_run_adaptive_counts_compute_and_stops_rows_independently():
    # each row counts up by one per step and is done once it reaches its own target
    target = torch.tensor([1, 3, 2, 5])
    state = {"count": torch.zeros(4, dtype=torch.long), "target": target}
    step = lambda s, t: {**s, "count": s["count"] + 1}  # noqa: E731
    stop = lambda s, t: s["count"] >= s["target"]  # noqa: E731
    res = run_adaptive(step, state, max_steps=4, stop=stop)
    assert res.steps_used.tolist() == [1, 3, 2, 4]
    assert res.state["count"].tolist() == [1, 3, 2, 4]
    assert res.row_passes == 1 + 3 + 2 + 4 and res.forward_passes == 4
    fixed = run_adaptive(step, state, max_steps=4, stop=stop, early_exit=False)
    assert fixed.steps_used.tolist() == [4] * 4 and fixed.row_passes == 16
    assert state["count"].tolist() == [0, 0, 0, 0]  # the caller's state is not modified


def test_run_adaptive_error_paths():
    state = {"x": torch.zeros(3)}
    with pytest.raises(ValueError, match="max_steps"):
        run_adaptive(lambda s, t: s, state, 0)
    with pytest.raises(ValueError, match="stop must return one flag per live row"):
        run_adaptive(lambda s, t: s, state, 2, stop=lambda s, t: torch.tensor([True]))
    with pytest.raises(ValueError, match="batch size"):
        run_adaptive(lambda s, t: s, {"a": torch.zeros(2), "b": torch.zeros(3)}, 2)
    with pytest.raises(ValueError, match="threshold"):
        confident(0.0)


def _tiny():
    return make_masked_lm("tiny", seed=3).eval()


def test_batched_early_exit_equals_one_at_a_time_exactly():
    model = _tiny()
    # a checker that accepts some answers early: examples stop after different numbers of steps
    checker = lambda p, a: (sum(map(ord, p + a)) % 3) == 0  # noqa: E731
    batched = adaptive_mask_predict(model, PROMPTS, max_steps=5, checker=checker)
    alone = adaptive_mask_predict(model, PROMPTS, max_steps=5, checker=checker, one_at_a_time=True)
    assert batched["answers"] == alone["answers"]
    assert torch.equal(batched["steps_used"], alone["steps_used"])
    assert batched["row_passes"] == alone["row_passes"] == int(batched["steps_used"].sum())
    assert len(set(batched["steps_used"].tolist())) > 1


def test_an_example_stopped_at_step_s_holds_the_fixed_run_answer_after_s_iterations():
    model = _tiny()
    # the threshold is the median of the final min-confidences, so some stop early and some run out
    ids, mask = encode_prompts(PROMPTS)
    _, trace = mask_predict(model, ids, mask, 6, trace=True)
    min_conf = torch.stack([s["confidence"].min(1).values for s in trace])  # [T, B]
    threshold = float(min_conf.flatten().median())
    res = adaptive_mask_predict(model, PROMPTS, max_steps=6, threshold=threshold)
    for b, s in enumerate(res["steps_used"].tolist()):
        assert res["answers"][b] == decode_answers(trace[s - 1]["tokens"][b: b + 1])[0]
        stopped_early = s < 6
        assert stopped_early == bool((min_conf[: s, b] >= threshold).any())
    fixed = adaptive_mask_predict(model, PROMPTS, max_steps=6)
    assert fixed["answers"] == decode_answers(trace[-1]["tokens"]) and fixed["row_passes"] == 6 * len(PROMPTS)
    assert res["row_passes"] < fixed["row_passes"]
