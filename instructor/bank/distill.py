"""Hidden cases and float64 references of notebooks/04_distillation.ipynb (instructor only: not in the package).

``VISIBLE_DATA`` makes the stored inputs and expected values of the visible cases that use random
inputs (instructor/make_visible_data.py writes them to labkit/grading/bank/visible_data.json).
"""
from __future__ import annotations

import torch

from labkit.grading import add_hidden, call_with_grad, expect_close, expect_equal, expect_raises

# ---- references (float64, deliberately plain: no labkit.distill) --------------------------------


def _logp(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    z = logits.double() / temperature
    return z - torch.logsumexp(z, dim=-1, keepdim=True)


def _kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    p = p_logp.exp()
    return torch.where(p > 0, p * (p_logp - q_logp), torch.zeros_like(p)).sum(-1)


def kd_loss_ref(student, teacher, temperature):
    per_row = _kl(_logp(teacher, temperature), _logp(student, temperature))
    return (temperature ** 2 * per_row.mean()).to(student.dtype)


def jsd_ref(student, teacher, beta):
    s, t = _logp(student), _logp(teacher)
    if beta == 0:
        per = _kl(t, s)
    elif beta == 1:
        per = _kl(s, t)
    else:
        m = torch.log((1 - beta) * s.exp() + beta * t.exp())
        per = beta * _kl(t, m) + (1 - beta) * _kl(s, m)
    return per.mean().to(student.dtype)


def topk_ref(logits, k, missing):
    p = _logp(logits).exp()
    probs, idx = p.topk(k, dim=-1)
    if missing == "other":
        other = (1 - probs.sum(-1)).clamp_min(0)
    else:
        probs = probs / probs.sum(-1, keepdim=True)
        other = torch.zeros(p.shape[:-1], dtype=torch.float64)
    return idx, probs.to(logits.dtype), other.to(logits.dtype)


def kd_step_ref(weight, bias, x, teacher, labels, temperature, alpha, lr):
    w = weight.double().clone().requires_grad_(True)
    b = bias.double().clone().requires_grad_(True)
    logits = x.double() @ w.T + b
    loss = alpha * temperature ** 2 * _kl(_logp(teacher, temperature), _logp(logits, temperature)).mean()
    if alpha < 1:
        loss = loss + (1 - alpha) * torch.nn.functional.cross_entropy(logits, labels)
    gw, gb = torch.autograd.grad(loss, [w, b])
    return ((w - lr * gw).detach().to(weight.dtype), (b - lr * gb).detach().to(bias.dtype), loss.item())


def _visible_kd_batch():
    student, teacher = torch.randn(6, 5) * 2, torch.randn(6, 5) * 2
    return {"student": student, "teacher": teacher, "expected": kd_loss_ref(student, teacher, 3.0)}


def _visible_step():
    weight, bias, x = torch.randn(4, 3) * 0.5, torch.randn(4) * 0.1, torch.randn(8, 3)
    teacher, labels = torch.randn(8, 4) * 2, torch.randint(0, 4, (8,))
    w, b, loss = kd_step_ref(weight, bias, x, teacher, labels, 2.0, 0.7, 0.5)
    return {"weight": weight, "bias": bias, "x": x, "teacher": teacher, "labels": labels, "new_weight": w,
            "new_bias": b, "loss": torch.tensor(loss, dtype=torch.float64)}


VISIBLE_DATA = {"distill.kd_loss/batch": _visible_kd_batch, "distill.kd_step/data": _visible_step}


# ---- kd_loss -------------------------------------------------------------------------------------

def _kd_random(f):
    s, t = torch.randn(16, 10) * 3, torch.randn(16, 10) * 3
    for temperature in (0.5, 1.0, 4.0):
        expect_close(f(s, t, temperature), kd_loss_ref(s, t, temperature), f"loss on [16, 10] at T={temperature}")


def _kd_3d(f):
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    expect_close(f(s, t, 2.0), kd_loss_ref(s, t, 2.0), "loss on [2, 3, 7]: mean over all 6 positions")


def _kd_f64(f):
    s, t = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    expect_close(f(s, t, 2.0), kd_loss_ref(s, t, 2.0), "loss in float64 (keeps the dtype)")


def _kd_grad(f):
    # d/dz_S of T^2 KL = T (p_S - p_T) / N: the T^2 makes the gradient's size independent of T
    s, t = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    _, grads = call_with_grad(f, (s, t, 5.0), wrt=(0,))
    expected = 5.0 * (_logp(s, 5.0).exp() - _logp(t, 5.0).exp()) / 4
    expect_close(grads[0], expected, "gradient wrt student_logits at T=5: T (p_S - p_T) / N")


def _kd_large(f):
    s = torch.tensor([[1000.0, 990.0, -1000.0], [-1000.0, -1000.0, -995.0]])
    t = torch.tensor([[995.0, 1000.0, 0.0], [5.0, -1000.0, -1000.0]])
    expect_close(f(s, t, 2.0), kd_loss_ref(s, t, 2.0), "loss of logits near ±1000 (use log_softmax)")


def _kd_errors(f):
    s = torch.randn(3, 4)
    expect_raises(ValueError, f, s, torch.randn(3, 4), 0.0, what="temperature=0")
    expect_raises(ValueError, f, s, torch.randn(3, 4), -2.0, what="temperature=-2")
    expect_raises(ValueError, f, s, torch.randn(3, 5), 1.0, what="teacher [3, 5] vs student [3, 4]")


add_hidden("distill.kd_loss", [
    ("random [16, 10] at three temperatures", _kd_random, "core"), ("3-D logits", _kd_3d, "core"),
    ("float64 in, float64 out", _kd_f64, "core"), ("gradient is T (p_S - p_T) / N", _kd_grad, "core"),
    ("logits near ±1000", _kd_large, "stable"), ("bad temperature or shapes raise ValueError", _kd_errors, "errors"),
])


# ---- generalized_jsd -----------------------------------------------------------------------------

def _jsd_random(f):
    s, t = torch.randn(12, 9) * 2, torch.randn(12, 9) * 2
    for beta in (0.1, 0.5, 0.9):
        expect_close(f(s, t, beta), jsd_ref(s, t, beta), f"JSD on [12, 9] at beta={beta}")


def _jsd_3d(f):
    s, t = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    expect_close(f(s, t, 0.3), jsd_ref(s, t, 0.3), "JSD on [2, 4, 5]: mean over all 8 positions")


def _jsd_ends_random(f):
    s, t = torch.randn(7, 6) * 2, torch.randn(7, 6) * 2
    expect_close(f(s, t, 0.0), jsd_ref(s, t, 0.0), "beta=0 on [7, 6]: KL(p_T || p_S)")
    expect_close(f(s, t, 1.0), jsd_ref(s, t, 1.0), "beta=1 on [7, 6]: KL(p_S || p_T)")


def _jsd_large(f):
    # probabilities that underflow to 0 on one side: mixture and KLs must stay finite
    s = torch.tensor([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]])
    t = torch.tensor([[-1000.0, 0.0, 1000.0], [1000.0, -1000.0, 0.0]])
    expect_close(f(s, t, 0.5), jsd_ref(s, t, 0.5), "JSD where probabilities underflow to 0 (beta=0.5)")
    expect_close(f(s, t, 0.25), jsd_ref(s, t, 0.25), "JSD where probabilities underflow to 0 (beta=0.25)")


def _jsd_errors(f):
    s, t = torch.randn(2, 3), torch.randn(2, 3)
    expect_raises(ValueError, f, s, t, -0.1, what="beta=-0.1")
    expect_raises(ValueError, f, s, t, 1.5, what="beta=1.5")


add_hidden("distill.generalized_jsd", [
    ("random [12, 9] at three betas", _jsd_random, "core"), ("3-D logits", _jsd_3d, "core"),
    ("the ends on random logits", _jsd_ends_random, "ends"), ("underflowing probabilities", _jsd_large, "stable"),
    ("beta outside [0, 1] raises ValueError", _jsd_errors, "errors"),
])


# ---- topk_cache ----------------------------------------------------------------------------------

def _distinct_logits(*shape):
    # a random permutation of spread-out values: no ties, so the top k are well defined
    n = shape[-1]
    rows = torch.stack([torch.randperm(n) for _ in range(int(torch.tensor(shape[:-1]).prod()))])
    return (rows.float() * 0.37 + torch.rand(rows.shape) * 0.1).reshape(shape)


def _check_topk(f, logits, k, missing, what):
    idx, probs, other = f(logits, k, missing)
    r_idx, r_probs, r_other = topk_ref(logits, k, missing)
    expect_equal(idx, r_idx, f"indices ({what})")
    expect_close(probs, r_probs, f"probs ({what})")
    expect_close(other, r_other, f"other ({what})")


def _topk_random(f):
    logits = _distinct_logits(5, 20)
    for k in (1, 3, 8):
        _check_topk(f, logits, k, "other", f"[5, 20], k={k}, other")
        _check_topk(f, logits, k, "renormalize", f"[5, 20], k={k}, renormalize")


def _topk_3d(f):
    _check_topk(f, _distinct_logits(2, 3, 11), 4, "other", "[2, 3, 11], k=4, other")


def _topk_full(f):
    logits = _distinct_logits(3, 6)
    _check_topk(f, logits, 6, "other", "k = V, other")
    _check_topk(f, logits, 6, "renormalize", "k = V, renormalize")


def _topk_large(f):
    logits = torch.tensor([[1000.0, 999.0, 990.0, -1000.0], [-1000.0, -998.0, -999.5, -1001.0]])
    _check_topk(f, logits, 2, "other", "logits near ±1000, other")


def _topk_errors(f):
    logits = torch.randn(2, 5)
    expect_raises(ValueError, f, logits, 0, "other", what="k=0")
    expect_raises(ValueError, f, logits, 6, "other", what="k=6 > V=5")
    expect_raises(ValueError, f, logits, 2, "drop", what="missing='drop'")


add_hidden("distill.topk_cache", [
    ("random [5, 20], three k, both modes", _topk_random, "core"), ("3-D logits", _topk_3d, "core"),
    ("k = V keeps everything", _topk_full, "full"), ("logits near ±1000", _topk_large, "stable"),
    ("bad k or missing raise ValueError", _topk_errors, "errors"),
])


# ---- kd_step -------------------------------------------------------------------------------------

def _step_case(f, temperature, alpha, lr, what, n=16, c=5, d=4, labels=True):
    weight, bias, x = torch.randn(c, d) * 0.3, torch.randn(c) * 0.1, torch.randn(n, d)
    teacher, y = torch.randn(n, c) * 2, torch.randint(0, c, (n,))
    y = y if labels else None
    w, b, loss = f(weight, bias, x, teacher, y, temperature, alpha, lr)
    r_w, r_b, r_loss = kd_step_ref(weight, bias, x, teacher, y, temperature, alpha, lr)
    expect_close(loss, r_loss, f"loss before the step ({what})", rtol=1e-5, atol=1e-6)  # a float32 loss
    expect_close(w, r_w, f"weight after the step ({what})")
    expect_close(b, r_b, f"bias after the step ({what})")


def _step_random(f):
    _step_case(f, 4.0, 0.9, 0.1, "T=4, alpha=0.9, lr=0.1")
    _step_case(f, 1.0, 0.5, 1.0, "T=1, alpha=0.5, lr=1")


def _step_alpha_ends(f):
    _step_case(f, 3.0, 1.0, 0.2, "alpha=1, labels None: soft targets only", labels=False)
    _step_case(f, 3.0, 0.0, 0.2, "alpha=0: cross-entropy only, T does not matter")


def _step_errors(f):
    weight, bias, x = torch.randn(3, 2), torch.randn(3), torch.randn(4, 2)
    teacher, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    expect_raises(ValueError, f, weight, bias, x, teacher, y, 2.0, 1.5, 0.1, what="alpha=1.5")
    expect_raises(ValueError, f, weight, bias, x, teacher, y, 0.0, 0.5, 0.1, what="temperature=0")


add_hidden("distill.kd_step", [
    ("two random steps", _step_random, "core"), ("alpha=1 and alpha=0", _step_alpha_ends, "alpha"),
    ("bad alpha or temperature raise ValueError", _step_errors, "errors"),
])
