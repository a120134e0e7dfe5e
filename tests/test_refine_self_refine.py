"""Self-refinement: the stopping rule, the exact-verifier guarantee, batching, feedback sources."""
import random

import pytest
import torch

from labkit.refine.self_refine import (Feedback, accuracy_by_round, check_answer, exact_verifier, final_outputs,
                                       noisy_verifier, revision_prompt, self_refine, sequence_probability, should_stop)


def test_check_answer_by_hand():
    assert check_answer("a:47+85=", "132") and not check_answer("a:47+85=", "122")
    assert check_answer("s:3142=", "1234") and check_answer("r:abc=", "cba") and check_answer("c:ab=", "ab")
    assert check_answer("n:b|abcbb=", "3") and not check_answer("n:b|abcbb=", "2")
    with pytest.raises(ValueError, match="not a task prompt: 'hello'"):
        check_answer("hello", "x")
    assert revision_prompt("a:47+85=", "122", False) == "a:47+85>122|n="


def test_should_stop():
    assert should_stop(Feedback(True), 0, 3)
    assert not should_stop(Feedback(False), 2, 3)
    assert should_stop(Feedback(False), 3, 3)


def _scripted_feedback(accept_at):
    """Accepts input x once it has been judged accept_at[x] times (counts calls per input)."""
    seen = {}

    def fb(inputs, outputs):
        out = []
        for x in inputs:
            seen[x] = seen.get(x, 0) + 1
            out.append(Feedback(seen[x] > accept_at[x]))
        return out
    return fb


def test_loop_stops_on_accept_and_at_max_rounds_and_records_every_round():
    inputs = ["a", "b", "c"]
    revisions = []
    history = self_refine(inputs, lambda xs: [x + "0" for x in xs], _scripted_feedback({"a": 0, "b": 2, "c": 99}),
                          lambda xs, ys, fbs: revisions.append(list(xs)) or [y + "+" for y in ys], max_rounds=3)
    assert [len(h) for h in history] == [1, 3, 4]          # accepted at round 0, round 2, never (N = 3)
    assert [r.output for r in history[2]] == ["c0", "c0+", "c0++", "c0+++"]
    assert [r.feedback.accept for r in history[1]] == [False, False, True]
    assert revisions == [["b", "c"], ["b", "c"], ["c"]]     # accepted inputs left the batch
    assert final_outputs(history) == ["a0", "b0++", "c0+++"]


def test_loop_never_reads_labels():
    # the score may see labels; the loop's rounds must not depend on it, and it is only ever recorded
    inputs = [f"a:{i}+{i}=" for i in range(20)]
    gen = lambda xs: [str(int(x[2:-1].split("+")[0]) * 2 + (i % 3 == 0)) for i, x in enumerate(xs)]  # noqa: E731
    rev = lambda xs, ys, fbs: [str(int(y) - 1) for y in ys]  # noqa: E731
    plain = self_refine(inputs, gen, noisy_verifier(0.3, seed=1), rev, max_rounds=4)
    lying = self_refine(inputs, gen, noisy_verifier(0.3, seed=1), rev, max_rounds=4, score=lambda x, y: 1.0)
    honest = self_refine(inputs, gen, noisy_verifier(0.3, seed=1), rev, max_rounds=4,
                         score=lambda x, y: float(check_answer(x, y)))
    strip = lambda h: [[(r.round, r.output, r.feedback) for r in rs] for rs in h]  # noqa: E731
    assert strip(plain) == strip(lying) == strip(honest)
    assert all(r.score is None for rs in plain for r in rs) and all(r.score == 1.0 for rs in lying for r in rs)


def test_exact_verifier_never_turns_a_correct_answer_wrong():
    # property over random drafts and random (often harmful) revisers
    for seed in range(30):
        rng = random.Random(seed)
        inputs = [f"a:{rng.randint(0, 99)}+{rng.randint(0, 99)}=" for _ in range(25)]
        truth = [str(sum(map(int, x[2:-1].split("+")))) for x in inputs]
        drafts = [t if rng.random() < 0.5 else str(rng.randint(0, 200)) for t in truth]

        def reviser(xs, ys, fbs, rng=rng):
            return [str(rng.randint(0, 200)) if rng.random() < 0.7 else str(sum(map(int, x[2:-1].split("+"))))
                    for x in xs]
        history = self_refine(inputs, lambda xs: drafts, exact_verifier(), reviser, max_rounds=rng.randint(0, 5))
        for rounds, t in zip(history, truth):
            correct = [r.output == t for r in rounds]
            if any(correct):  # once correct, it is accepted and stays the final answer
                assert correct.index(True) == len(rounds) - 1 and rounds[-1].feedback.accept
        acc = accuracy_by_round(history, lambda i, y: y == truth[i], 5)
        assert all(b >= a for a, b in zip(acc, acc[1:]))


def test_batched_refinement_equals_one_at_a_time():
    inputs = [f"a:{i}+{2 * i}=" for i in range(30)]
    gen = lambda xs: [str(3 * int(x[2:-1].split("+")[0]) + 2) for x in xs]  # noqa: E731
    rev = lambda xs, ys, fbs: [str(int(y) - 1) for y in ys]  # noqa: E731
    fb = noisy_verifier(0.2, seed=3)
    batched = self_refine(inputs, gen, fb, rev, max_rounds=3)
    alone = [self_refine([x], gen, fb, rev, max_rounds=3)[0] for x in inputs]
    assert batched == alone
    assert len({len(h) for h in batched}) > 1  # the inputs really stopped at different rounds


def test_noisy_verifier_flips_at_its_error_rate_and_is_deterministic():
    inputs = [f"a:{i % 100}+{i // 100}=" for i in range(4000)]
    outputs = [str(i % 100 + i // 100 + (i % 2)) for i in range(4000)]  # half right, half wrong
    truth = [check_answer(x, y) for x, y in zip(inputs, outputs)]
    verdicts = [f.accept for f in noisy_verifier(0.2, seed=0)(inputs, outputs)]
    flips = sum(v != t for v, t in zip(verdicts, truth)) / len(truth)
    assert abs(flips - 0.2) < 0.025
    assert verdicts == [f.accept for f in noisy_verifier(0.2, seed=0)(inputs, outputs)]
    assert [f.accept for f in noisy_verifier(0.0)(inputs, outputs)] == truth
    with pytest.raises(ValueError, match="error_rate"):
        noisy_verifier(1.5)


def test_error_paths_name_the_argument():
    gen = lambda xs: xs  # noqa: E731
    with pytest.raises(TypeError, match="revise"):
        self_refine(["a"], gen, exact_verifier(), "not callable")
    with pytest.raises(ValueError, match="feedback returned 0 items for 1 inputs"):
        self_refine(["a"], gen, lambda xs, ys: [], lambda *a: a[1])
    with pytest.raises(ValueError, match="max_rounds"):
        self_refine(["a"], gen, exact_verifier(), lambda *a: a[1], max_rounds=-1)
    with pytest.raises(TypeError, match="Feedback"):
        self_refine(["a"], gen, lambda xs, ys: [True], lambda *a: a[1])


def test_sequence_probability_matches_a_token_by_token_product():
    from labkit.data import EOS_ID, get_tokenizer
    from labkit.models import make_llama

    model = make_llama("tiny", seed=0).eval()
    tok = get_tokenizer()
    got = sequence_probability(model, ["a:1+2=", "s:31="], ["3", "13"])
    for i, (p, a) in enumerate([("a:1+2=", "3"), ("s:31=", "13")]):
        ids = tok(p)["input_ids"]
        prob = 1.0
        for t in tok(a, add_special_tokens=False)["input_ids"] + [EOS_ID]:
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1].double()
            prob *= torch.softmax(logits, -1)[t].item()
            ids = ids + [t]
        assert got[i].item() == pytest.approx(prob, rel=1e-5)


def test_zoo_reviser_and_critic_with_an_exact_verifier():
    from labkit import zoo
    from labkit.data import make_examples
    from labkit.refine.self_refine import critic_feedback, lm_generator, lm_reviser

    built = zoo.read_manifest()["entries"]
    if "refine/reviser" not in built or "refine/critic" not in built:
        pytest.skip("refine/reviser or refine/critic is not built")
    prompts = [r["prompt"] for r in make_examples("add", 100, seed=7, split="test")]
    gen, rev = lm_generator(zoo.load("lm/student", device="cpu")), lm_reviser(zoo.load("refine/reviser", device="cpu"))
    history = self_refine(prompts, gen, exact_verifier(), rev, max_rounds=2)
    acc = accuracy_by_round(history, lambda i, y: check_answer(prompts[i], y), 2)
    assert acc[2] >= acc[1] >= acc[0]
    verdicts = critic_feedback(zoo.load("refine/critic", device="cpu"))(prompts, gen(prompts))
    assert len(verdicts) == 100 and all(isinstance(v, Feedback) for v in verdicts)


def test_check_answer_agrees_with_every_task_of_the_kit():
    # the reference answers come from labkit.data's own generators, not from the checker
    from labkit.data import TASKS, make_examples
    from labkit.refine.self_refine import check_answer

    for task in TASKS:
        if task == "chat":
            continue
        for row in make_examples(task, 20, seed=3, split="test"):
            assert check_answer(row["prompt"], row["answer"]), (task, row)
            assert not check_answer(row["prompt"], row["answer"] + "0"), (task, row)
    # 'max' and the refinement lab's 'perm' share the prefix 'm'; digits vs letters tell them apart
    assert check_answer("m:3142=", "4") and not check_answer("m:3142=", "4321")
    assert check_answer("m:dbfa=", "abdf") and not check_answer("m:dbfa=", "abdd")
