"""Visible cases of notebooks/04_distillation.ipynb: the soft-target loss with T^2, the generalised JSD,
a top-k teacher cache with its missing mass, and one distillation training step.

Expected values are hand-computed (the two-class example p_T = (0.75, 0.25), p_S = (0.5, 0.5)) or
stored data (``visible_data.json``); the hidden cases and the float64 references are in the instructor
bank (instructor/bank/distill.py).
"""
from __future__ import annotations

import math

import torch

from labkit.grading import Question, expect_close, expect_equal, expect_true, register
from labkit.grading.bank._data import visible

NB = "04_distillation"

# the two-class example: teacher (0.75, 0.25), student (0.5, 0.5)
KL_TS = 0.13081203594113697   # KL(p_T || p_S) = 0.75 ln 1.5 + 0.25 ln 0.5
KL_ST = 0.14384103622589042   # KL(p_S || p_T) = 0.5 ln(2/3) + 0.5 ln 2
JSD_HALF = 0.033822075568605205  # beta = 0.5, m = (0.625, 0.375)
JSD_02 = 0.021154040341870555    # beta = 0.2, m = 0.8 p_S + 0.2 p_T = (0.55, 0.45)


def _two_class():
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # softmax: (0.75, 0.25)
    student = torch.zeros(1, 2)                      # softmax: (0.5, 0.5)
    return student, teacher


# ---- the soft-target loss -----------------------------------------------------------------------

def _kd_t1(f):
    s, t = _two_class()
    expect_close(f(s, t, 1.0), torch.tensor(KL_TS), "T^2 KL(p_T || p_S) at T=1 (forward KL, not reverse)")


def _kd_t2(f):
    s, t = _two_class()
    # at T=2 the teacher logits 2 ln 3 give the same (0.75, 0.25): only the factor T^2 = 4 changes
    expect_close(f(s, 2 * t, 2.0), torch.tensor(4 * KL_TS), "loss at T=2 (includes the factor T^2 = 4)")


def _kd_batch(f):
    d = visible("distill.kd_loss/batch")
    expect_close(f(d["student"], d["teacher"], 3.0), d["expected"], "loss on a batch [6, 5] at T=3 (mean over rows)")


register(Question(
    id="distill.kd_loss", notebook=NB, function="kd_loss", points=2,
    description="T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over the last (class) dimension and "
                "averaged over every other position; a 0-d tensor in the logits' dtype; finite for logits near "
                "±1000; gradients flow to student_logits; ValueError for T <= 0 or different shapes",
    groups={"core": 4, "stable": 1, "errors": 1},
    implemented_by=["labkit.distill.forward_kl", "labkit.distill.losses.forward_kl",
                    "labkit.distill.distillation_loss", "labkit.distill.losses.distillation_loss",
                    "labkit.distill.generalized_jsd", "labkit.distill.losses.generalized_jsd"],
    visible=[("T=1, two classes", _kd_t1), ("T=2 includes T^2", _kd_t2), ("batch [6, 5] at T=3", _kd_batch)],
))


# ---- the generalised JSD ------------------------------------------------------------------------

def _jsd_half(f):
    s, t = _two_class()
    expect_close(f(s, t, 0.5), torch.tensor(JSD_HALF), "JSD at beta=0.5")


def _jsd_02(f):
    s, t = _two_class()
    expect_close(f(s, t, 0.2), torch.tensor(JSD_02), "JSD at beta=0.2 (m = 0.8 p_S + 0.2 p_T)")


def _jsd_ends(f):
    s, t = _two_class()
    expect_close(f(s, t, 0.0), torch.tensor(KL_TS), "beta=0: forward KL(p_T || p_S)")
    expect_close(f(s, t, 1.0), torch.tensor(KL_ST), "beta=1: reverse KL(p_S || p_T)")


register(Question(
    id="distill.generalized_jsd", notebook=NB, function="generalized_jsd", points=2,
    description="m = (1-beta) p_S + beta p_T (a mixture of probabilities); beta KL(p_T||m) + (1-beta) KL(p_S||m) "
                "for 0 < beta < 1, exactly KL(p_T||p_S) at beta=0 and KL(p_S||p_T) at beta=1; summed over the last "
                "dimension, averaged over positions; a 0-d tensor in the logits' dtype; finite for logits near "
                "±1000 and where a probability underflows to 0; ValueError for beta outside [0, 1]",
    groups={"core": 3, "ends": 2, "stable": 1, "errors": 1},
    implemented_by=["labkit.distill.generalized_jsd", "labkit.distill.losses.generalized_jsd",
                    "labkit.distill.forward_kl", "labkit.distill.losses.forward_kl",
                    "labkit.distill.reverse_kl", "labkit.distill.losses.reverse_kl",
                    "labkit.distill.distillation_loss", "labkit.distill.losses.distillation_loss"],
    visible=[("beta=0.5, two classes", _jsd_half), ("beta=0.2: which side gets beta", _jsd_02),
             ("beta=0 and beta=1 are the two KLs", _jsd_ends, "ends")],
))


# ---- the top-k cache --------------------------------------------------------------------------

def _topk_other(f):
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.15, 0.25]]))
    idx, probs, other = f(logits, 2, "other")
    expect_equal(idx, torch.tensor([[1, 3]]), "indices (largest first)")
    expect_close(probs, torch.tensor([[0.5, 0.25]]), "kept probabilities (not renormalised)")
    expect_close(other, torch.tensor([0.25]), "'other' mass 1 - 0.75")


def _topk_renorm(f):
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.15, 0.25]]))
    idx, probs, other = f(logits, 2, "renormalize")
    expect_equal(idx, torch.tensor([[1, 3]]), "indices (largest first)")
    expect_close(probs, torch.tensor([[2 / 3, 1 / 3]]), "renormalised probabilities")
    expect_close(other, torch.tensor([0.0]), "'other' mass after renormalising")


register(Question(
    id="distill.topk_cache", notebook=NB, function="topk_cache", points=2,
    description="(indices [..., k] int64 in decreasing probability, probs [..., k], other [...]) from teacher logits "
                "[..., V]: with missing='other' probs are softmax probabilities and other = 1 - their sum; with "
                "missing='renormalize' probs are divided by their sum and other is 0; probs and other in the "
                "logits' dtype; finite for logits near ±1000; k = V keeps everything (other = 0); ValueError for k "
                "outside 1..V or another missing",
    groups={"core": 3, "full": 1, "stable": 1, "errors": 1},
    implemented_by=["labkit.distill.topk_cache", "labkit.distill.teachers.topk_cache",
                    "labkit.distill.lm_teacher_cache", "labkit.distill.loop.lm_teacher_cache"],
    visible=[("k=2, keep the 'other' bucket", _topk_other), ("k=2, renormalise", _topk_renorm)],
))


# ---- one distillation training step ------------------------------------------------------------

def _step_data(f):
    d = visible("distill.kd_step/data")
    w, b, loss = f(d["weight"], d["bias"], d["x"], d["teacher"], d["labels"], 2.0, 0.7, 0.5)
    expect_close(loss, d["loss"].item(), "loss before the step", rtol=1e-5, atol=1e-6)  # a float32 loss
    expect_close(w, d["new_weight"], "weight after the step")
    expect_close(b, d["new_bias"], "bias after the step")


def _step_returns_new(f):
    d = visible("distill.kd_step/data")
    w0 = d["weight"].clone()
    w, _, loss = f(d["weight"], d["bias"], d["x"], d["teacher"], d["labels"], 2.0, 0.7, 0.5)
    expect_true(isinstance(loss, float), f"the loss should be a Python float, got {type(loss).__name__}")
    expect_true(not w.requires_grad, "the new weight should be a plain tensor (detached, requires_grad False)")
    expect_close(d["weight"], w0, "the weight you were given (update a copy, not the input)")


register(Question(
    id="distill.kd_step", notebook=NB, function="distillation_step", points=3,
    description="one plain SGD step (new = old - lr * grad) of a linear student, logits = x @ weight.T + bias, on "
                "L = alpha * T^2 * KL(p_T || p_S) at temperature T + (1 - alpha) * cross-entropy with the labels at "
                "T = 1, both averaged over the rows; returns (new weight, new bias, loss before the step as a Python "
                "float); new tensors detached, the inputs unchanged; alpha=1 needs no labels (None); ValueError for "
                "alpha outside [0, 1] or T <= 0",
    groups={"core": 4, "alpha": 1, "errors": 1},
    implemented_by=["labkit.distill.distill_step", "labkit.distill.loop.distill_step",
                    "labkit.distill.distill_classifier", "labkit.distill.loop.distill_classifier",
                    "labkit.distill.distillation_loss", "labkit.distill.losses.distillation_loss",
                    "labkit.distill.forward_kl", "labkit.distill.losses.forward_kl"],
    visible=[("a step on stored data (T=2, alpha=0.7, lr=0.5)", _step_data),
             ("returns new detached tensors and a float", _step_returns_new)],
))
