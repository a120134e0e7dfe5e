"""The distillation question bank: correct answers (labkit.distill's own functions where they fit, plain
solutions otherwise) pass every case, plausible mistakes fail."""
import math

import torch
import torch.nn.functional as F

from labkit import distill
from labkit.grading import run_question


def kd_loss(student_logits, teacher_logits, temperature):
    if student_logits.shape != teacher_logits.shape:
        raise ValueError("shapes differ")
    return distill.forward_kl(student_logits, teacher_logits, temperature=temperature).to(student_logits.dtype)


def generalized_jsd(student_logits, teacher_logits, beta):
    return distill.generalized_jsd(student_logits, teacher_logits, beta=beta, normalize=False,
                                   scale_t2=False).to(student_logits.dtype)


def topk_cache(teacher_logits, k, missing="other"):
    cache = distill.topk_cache(teacher_logits, k, missing, value_dtype=teacher_logits.dtype)
    probs = cache.logprobs.exp()
    if missing == "renormalize":
        probs = probs / probs.sum(-1, keepdim=True)
        other = torch.zeros(probs.shape[:-1], dtype=teacher_logits.dtype)
    else:
        other = (1 - probs.sum(-1)).clamp_min(0)
    return cache.indices.long(), probs, other


def distillation_step(weight, bias, x, teacher_logits, labels, temperature, alpha, lr):
    if not 0 <= alpha <= 1:
        raise ValueError("alpha")
    w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    logits = x @ w.T + b
    loss = distill.distillation_loss(logits, teacher_logits, labels, alpha=alpha, temperature=temperature,
                                     reduction="batchmean")
    gw, gb = torch.autograd.grad(loss, [w, b])
    return (w - lr * gw).detach(), (b - lr * gb).detach(), loss.item()


SOLUTIONS = {"distill.kd_loss": kd_loss, "distill.generalized_jsd": generalized_jsd,
             "distill.topk_cache": topk_cache, "distill.kd_step": distillation_step}


def test_solutions_pass_every_case():
    for qid, fn in SOLUTIONS.items():
        result = run_question(qid, fn, hidden=True)
        assert result.passed == result.total, result.verdict()
        assert result.points == get_points(qid)


# ---- plausible mistakes ----------------------------------------------------------------------------

def kd_without_t2(s, t, temperature):
    return kd_loss(s, t, temperature) / temperature ** 2


def kd_direction_swapped(s, t, temperature):  # KL(p_S || p_T)
    return distill.reverse_kl(s, t, temperature=temperature).to(s.dtype)


def kd_kl_div_args_swapped(s, t, temperature):  # F.kl_div(input=teacher, target=student): the classic slip
    return temperature ** 2 * F.kl_div(F.log_softmax(t / temperature, -1), F.log_softmax(s / temperature, -1),
                                       log_target=True, reduction="batchmean")


def kd_unstable(s, t, temperature):  # softmax(...).log(): -inf at ±1000
    p_t, p_s = F.softmax(t / temperature, -1), F.softmax(s / temperature, -1)
    return temperature ** 2 * (p_t * (p_t.log() - p_s.log())).sum(-1).mean()


def jsd_logit_mixture(s, t, beta):  # mixes logits, not probabilities
    if beta in (0, 1):
        return generalized_jsd(s, t, beta)
    m = F.log_softmax((1 - beta) * s + beta * t, -1)
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    return (beta * (lt.exp() * (lt - m)).sum(-1) + (1 - beta) * (ls.exp() * (ls - m)).sum(-1)).mean()


def jsd_beta_swapped(s, t, beta):  # m = beta p_S + (1 - beta) p_T
    return generalized_jsd(t, s, beta) if 0 < beta < 1 else generalized_jsd(s, t, beta)


def jsd_ends_swapped(s, t, beta):
    return generalized_jsd(s, t, 1 - beta) if beta in (0, 1) else generalized_jsd(s, t, beta)


def topk_renormalises_always(logits, k, missing="other"):
    return topk_cache(logits, k, "renormalize")


def topk_keeps_always(logits, k, missing="other"):
    idx, probs, other = topk_cache(logits, k, "other")
    return idx, probs, other


def step_without_t2(weight, bias, x, teacher_logits, labels, temperature, alpha, lr):
    w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    logits = x @ w.T + b
    soft = distill.forward_kl(logits, teacher_logits, temperature=temperature, scale_t2=False)
    loss = alpha * soft + (1 - alpha) * F.cross_entropy(logits, labels)
    gw, gb = torch.autograd.grad(loss, [w, b])
    return (w - lr * gw).detach(), (b - lr * gb).detach(), loss.item()


def step_alpha_swapped(weight, bias, x, teacher_logits, labels, temperature, alpha, lr):
    return distillation_step(weight, bias, x, teacher_logits, labels, temperature, 1 - alpha, lr)


def step_after_loss(weight, bias, x, teacher_logits, labels, temperature, alpha, lr):  # reports the new loss
    w, b, _ = distillation_step(weight, bias, x, teacher_logits, labels, temperature, alpha, lr)
    logits = x @ w.T + b
    loss = distill.distillation_loss(logits, teacher_logits, labels, alpha=alpha, temperature=temperature)
    return w, b, loss.item()


def test_wrong_answers_lose_the_core_group():
    mistakes = [("distill.kd_loss", kd_without_t2), ("distill.kd_loss", kd_direction_swapped),
                ("distill.kd_loss", kd_kl_div_args_swapped),
                ("distill.generalized_jsd", jsd_logit_mixture), ("distill.generalized_jsd", jsd_beta_swapped),
                ("distill.topk_cache", topk_renormalises_always), ("distill.topk_cache", topk_keeps_always),
                ("distill.kd_step", step_without_t2), ("distill.kd_step", step_alpha_swapped),
                ("distill.kd_step", step_after_loss)]
    for qid, fn in mistakes:
        result = run_question(qid, fn, hidden=True)
        assert result.points == 0, f"{qid}: {fn.__name__} scored {result.points}\n{result.verdict()}"
        # the visible cases alone already tell the student something is wrong
        assert not run_question(qid, fn).ok, f"{qid}: {fn.__name__} passes every visible case"


def test_edge_case_mistakes_lose_only_their_group():
    for qid, fn in [("distill.kd_loss", kd_unstable), ("distill.generalized_jsd", jsd_ends_swapped)]:
        result = run_question(qid, fn, hidden=True)
        assert 0 < result.points < get_points(qid), f"{qid}: {fn.__name__}\n{result.verdict()}"


def get_points(qid):
    from labkit.grading import get_question
    return get_question(qid).points


def test_visible_hand_values_are_the_definitions():
    p_t, p_s = torch.tensor([0.75, 0.25], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64)
    from labkit.grading.bank import distill as bank
    assert math.isclose(bank.KL_TS, float((p_t * (p_t / p_s).log()).sum()), rel_tol=1e-12)
    assert math.isclose(bank.KL_ST, float((p_s * (p_s / p_t).log()).sum()), rel_tol=1e-12)
    for beta, value in ((0.5, bank.JSD_HALF), (0.2, bank.JSD_02)):
        m = (1 - beta) * p_s + beta * p_t
        ref = beta * (p_t * (p_t / m).log()).sum() + (1 - beta) * (p_s * (p_s / m).log()).sum()
        assert math.isclose(value, float(ref), rel_tol=1e-12)


def test_the_solution_notebook_trips_no_lock_and_calls_every_question():
    from pathlib import Path

    import nbformat

    from labkit.grading import questions_for
    from labkit.grading.lock import static_lock_check

    nb = nbformat.read(Path(__file__).resolve().parents[1] / "notebooks" / "04_distillation.ipynb", as_version=4)
    sources = [c.source for c in nb.cells if c.cell_type == "code"]
    qs = questions_for("04_distillation")
    assert {q.id for q in qs} == set(SOLUTIONS)
    for q in qs:
        assert static_lock_check(sources, q.function, q.implemented_by) == [], q.id
        assert any(f'check("{q.id}", {q.function})' in s for s in sources), q.id


def test_locked_answer_is_found():
    from labkit.grading import get_question
    from labkit.grading.lock import static_lock_check

    cells = ["from labkit import distill", "def kd_loss(s, t, T):\n    return distill.forward_kl(s, t, temperature=T)"]
    assert static_lock_check(cells, "kd_loss", get_question("distill.kd_loss").implemented_by) != []
