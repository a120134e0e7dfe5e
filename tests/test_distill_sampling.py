"""Sampling (off-policy, sequence-level, on-policy, per-token reverse KL) on the kit's zoo LMs, and the loops."""
import pytest
import torch

from labkit import data, zoo
from labkit.distill import (completion_batch, distill_classifier, distill_lm, forward_kl, generate_completions,
                            lm_teacher_cache, offpolicy_batch, on_policy_batch, on_policy_reverse_kl_loss, reverse_kl_token_signal,
                            sequence_kd_batch, shift_labels, teacher_logits, token_logprobs)

PROMPTS = ["a:12+30=", "r:abcd=", "c:hij=", "a:5+7="]
ANSWERS = ["42", "dcba", "hij", "12"]


@pytest.fixture(scope="module")
def lms():
    return zoo.load("lm/teacher", device="cpu"), zoo.load("lm/student", device="cpu")


def test_offpolicy_batch_is_the_training_format():
    batch = offpolicy_batch(PROMPTS, ANSWERS)
    ref = data.encode_for_training(PROMPTS, ANSWERS)
    assert all(torch.equal(batch[k], ref[k]) for k in ref)


def test_completion_batch_masks_prompts_and_padding():
    batch = completion_batch([[1, 5, 6], [1, 7]], [[8, 2], [9, 10, 11, 2]])
    assert batch["input_ids"].tolist() == [[1, 5, 6, 8, 2, 0], [1, 7, 9, 10, 11, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1] * 6]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 2, -100], [-100, -100, 9, 10, 11, 2]]


def test_sequence_kd_uses_the_teachers_answers(lms):
    teacher, _ = lms
    batch = sequence_kd_batch(teacher, PROMPTS, max_new_tokens=6)
    greedy = data.generate_answers(teacher, PROMPTS, max_new_tokens=6)
    tok = data.get_tokenizer()
    for row, labels, want in zip(batch["input_ids"], batch["labels"], greedy):
        answer_ids = [t for t in labels.tolist() if t != -100]
        assert tok.decode(answer_ids, skip_special_tokens=True) == want
        assert (labels != -100).sum() == len(answer_ids)


def test_generate_completions_stop_at_eos_and_are_seeded(lms):
    _, student = lms
    p1, c1 = generate_completions(student, PROMPTS, max_new_tokens=6, seed=3)
    _, c2 = generate_completions(student, PROMPTS, max_new_tokens=6, seed=3)
    assert c1 == c2
    for ids in c1:
        assert 0 < len(ids) <= 6 and (data.EOS_ID not in ids[:-1])
    assert [len(p) for p in p1] == [len(data.get_tokenizer()(p)["input_ids"]) for p in PROMPTS]


@pytest.mark.parametrize("lmbda,n_student", [(0.0, 0), (0.5, 2), (1.0, 4)])
def test_on_policy_batch_mixes_a_fraction_lambda(lms, lmbda, n_student):
    _, student = lms
    batch = on_policy_batch(student, PROMPTS, ANSWERS, lmbda=lmbda, max_new_tokens=6, seed=1)
    assert int(batch["on_policy"].sum()) == n_student
    off = offpolicy_batch(PROMPTS, ANSWERS)
    for i in range(len(PROMPTS)):
        if not batch["on_policy"][i]:  # dataset rows are the dataset's tokens exactly
            n = int(off["attention_mask"][i].sum())
            assert batch["input_ids"][i, :n].tolist() == off["input_ids"][i, :n].tolist()
            assert batch["labels"][i, :n].tolist() == off["labels"][i, :n].tolist()
    with pytest.raises(ValueError, match="lmbda"):
        on_policy_batch(student, PROMPTS, ANSWERS, lmbda=1.5)


def test_token_logprobs_and_reverse_kl_signal(lms):
    teacher, student = lms
    batch = on_policy_batch(student, PROMPTS, ANSWERS, lmbda=1.0, max_new_tokens=6, seed=0)
    t_lp = token_logprobs(teacher, batch).detach()
    s_lp = token_logprobs(student, batch)
    mask = shift_labels(batch["labels"]) != -100
    assert s_lp.shape == batch["input_ids"].shape and (s_lp[~mask] == 0).all() and (s_lp[mask] < 0).all()
    # the same numbers straight from the logits
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = shift_labels(batch["labels"])
    b, t = mask.nonzero()[0].tolist()
    assert torch.allclose(s_lp[b, t], torch.log_softmax(logits[b, t], -1)[targets[b, t]])
    signal = reverse_kl_token_signal(s_lp, t_lp, mask)
    assert torch.allclose(signal[mask], (t_lp - s_lp)[mask]) and not signal.requires_grad
    loss = on_policy_reverse_kl_loss(s_lp, t_lp, mask)
    plain = on_policy_reverse_kl_loss(s_lp, t_lp, mask, baseline=False)
    n = mask.sum()
    assert torch.allclose(plain, -((t_lp - s_lp).detach() * s_lp)[mask].sum() / n)
    b = (t_lp - s_lp).detach()[mask].mean()  # the baseline only adds b * mean log p_S
    assert torch.allclose(loss, plain + b * s_lp[mask].sum() / n, atol=1e-6)
    loss.backward()
    assert any(p.grad is not None for p in student.parameters())
    student.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="every position is masked"):
        on_policy_reverse_kl_loss(s_lp, t_lp, torch.zeros_like(mask))


def test_reverse_kl_signal_is_an_unbiased_reverse_kl_estimate():
    g = torch.Generator().manual_seed(0)
    p_s = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)
    p_t = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)
    y = torch.multinomial(p_s, 200000, replacement=True, generator=g)
    signal = reverse_kl_token_signal(p_s.log()[y], p_t.log()[y], torch.ones_like(y, dtype=torch.bool))
    exact = (p_s * (p_s.log() - p_t.log())).sum()
    assert abs(-signal.mean().item() - exact.item()) < 0.02


def test_distillation_moves_the_student_towards_the_teacher(lms):
    teacher, _ = lms
    student = zoo.load("lm/student", device="cpu")
    train = data.make_task_dataset(["add"], 64, seed=5)
    batch = offpolicy_batch(train["prompt"], train["answer"])
    labels = shift_labels(batch["labels"])

    def gap():
        with torch.no_grad():
            s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return forward_kl(s, teacher_logits(teacher, batch), labels).item()

    before = gap()
    hist = distill_lm(student, teacher, train, steps=8, mode="off_policy", batch_size=32, lr=3e-4, device="cpu")
    assert gap() < before and hist["teacher_calls"] == 8 and hist["teacher_rows"] == 8 * 32
    hist = distill_lm(student, teacher, train, steps=2, mode="on_policy", lmbda=0.5, batch_size=8,
                      max_new_tokens=4, device="cpu", divergence="jsd", beta=0.5)
    assert hist["teacher_calls"] == 2 and len(hist["loss"]) == 2
    hist = distill_lm(student, teacher, train, steps=2, mode="on_policy_rkl", batch_size=8, max_new_tokens=4,
                      device="cpu")
    assert hist["teacher_calls"] == 2
    hist = distill_lm(student, None, train, steps=2, mode="labels", batch_size=8, device="cpu")
    assert hist["teacher_calls"] == 0
    pool, cache = lm_teacher_cache(teacher, train, k=4, device="cpu")
    assert cache.indices.shape == (*pool["input_ids"].shape, 4)
    hist = distill_lm(student, None, train, steps=2, mode="cached", cache=(pool, cache), batch_size=8, device="cpu")
    assert hist["teacher_calls"] == 0 and len(hist["loss"]) == 2
    with pytest.raises(ValueError, match="needs cache"):
        distill_lm(student, None, train, steps=1, mode="cached")
    with pytest.raises(ValueError, match="needs a teacher"):
        distill_lm(student, None, train, steps=1, mode="off_policy")
    with pytest.raises(ValueError, match="mode must be one of"):
        distill_lm(student, teacher, train, steps=1, mode="offline")


def test_distill_classifier_from_an_ensemble():
    from labkit.models import DigitMLP

    d = data.load_digits()
    members = [zoo.load(f"digits/mlp-s{i}", device="cpu") for i in range(2)]
    student = DigitMLP(hidden=(32,))
    hist = distill_classifier(student, members, d.X_train, d.y_train, steps=100, lr=1e-2, temperature=4.0, alpha=0.9,
                              X_val=d.X_val, y_val=d.y_val, device="cpu")
    assert hist["loss"][-1] < hist["loss"][0] and hist["val_accuracy"] > 0.6
    with pytest.raises(ValueError, match="teacher logits cover"):
        distill_classifier(student, torch.zeros(5, 10), d.X_train, d.y_train, steps=1)
    # across architectures, with hidden states: a CNN's conv features into an MLP's first layer
    cnn = zoo.load("digits/cnn-s0", device="cpu")
    hist = distill_classifier(DigitMLP(hidden=(32,)), cnn, d.X_train, d.y_train, steps=5, device="cpu",
                              hidden_pairs=[("layers.0", "conv2")])
    proj = hist["projector"]
    assert proj.maps[0].weight.shape == (16 * 2 * 2 * 2 * 4, 32) and proj.maps[0].weight.grad is not None
    with pytest.raises(ValueError, match="one teacher model"):
        distill_classifier(student, members, d.X_train, d.y_train, steps=1, hidden_pairs=[("layers.0", "conv2")])


def test_sampled_reverse_kl_policy_gradient_reaches_the_teacher():
    # only the log-probs of sampled tokens are used, yet the full reverse KL goes to ~0
    from labkit.distill import reverse_kl

    g = torch.Generator().manual_seed(0)
    t = torch.randn(8, 12, generator=g) * 2
    s = torch.zeros(8, 12, requires_grad=True)
    opt = torch.optim.Adam([s], lr=0.05)
    start = reverse_kl(s, t).item()
    for _ in range(300):
        y = torch.multinomial(torch.softmax(s, -1).detach(), 16, replacement=True, generator=g)
        s_lp, t_lp = torch.log_softmax(s, -1).gather(1, y), torch.log_softmax(t, -1).gather(1, y)
        loss = on_policy_reverse_kl_loss(s_lp, t_lp, torch.ones_like(y, dtype=torch.bool))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert reverse_kl(s, t).item() < 0.02 * start
