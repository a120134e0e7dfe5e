"""Visible cases of notebooks/01_ensembling.ipynb: combination rules, fitting mixture weights, the bagging
resampler and one ensemble decoding step.

Expected values are hand-computed (exact fractions) or stored data (``visible_data.json``); the hidden
cases and the float64 references are in the instructor bank (instructor/bank/ensemble.py).
"""
from __future__ import annotations

import math

import torch

from labkit.grading import Question, expect_close, expect_equal, expect_true, register
from labkit.grading.bank._data import visible

NB = "01_ensembling"
D = torch.float64


def _log(probs):
    return torch.log(torch.tensor(probs, dtype=D))


# ---- linear interpolation ---------------------------------------------------------------------

def _lin_hand(f):
    logits = torch.stack([_log([0.5, 0.25, 0.25]) + 3.0, _log([0.1, 0.2, 0.7]) - 1.0])
    got = f(logits, torch.tensor([0.3, 0.7], dtype=D))
    expect_close(got, _log([0.22, 0.215, 0.565]), "log-probs of 0.3 P_a + 0.7 P_b (logits shifted by constants)")


def _lin_or(f):
    a = torch.tensor([0.0, 0.0, -math.inf], dtype=D)
    b = torch.tensor([-math.inf, 0.0, 0.0], dtype=D)
    got = f(torch.stack([a, b]), torch.tensor([0.5, 0.5], dtype=D))
    expect_close(got, _log([0.25, 0.5, 0.25]), "log-probs when each member gives one token probability 0 (OR)")


def _lin_random(f):
    d = visible("ensemble.linear_interpolate/three members")
    expect_close(f(d["logits"], d["weights"]), d["expected"], "log-probs of 3 members [3, 4, 10]")


register(Question(
    id="ensemble.linear_interpolate", notebook=NB, function="linear_interpolate", points=2,
    description="log sum_m w_m softmax(logits_m) over [M, ..., V]; weights [M] or [M, ...]; stable for large "
                "logits; ValueError on weights that are negative, do not sum to 1 or do not match M",
    groups={"core": 3, "stable": 1, "errors": 1},
    implemented_by=["labkit.ensemble.linear_interpolate", "labkit.ensemble.combine",
                    "labkit.ensemble.ensemble_next_token"],
    visible=[("two members by hand", _lin_hand), ("OR: a zero from one member is not a veto", _lin_or),
             ("three members [3, 4, 10]", _lin_random)],
))


# ---- log-linear interpolation -----------------------------------------------------------------

def _ll_hand(f):
    a, b = _log([1 / 2, 1 / 4, 1 / 4]) + 2.0, _log([1 / 8, 1 / 2, 3 / 8])
    got = f(torch.stack([a, b]), torch.tensor([1.0, 1.0], dtype=D))
    expect_close(got, _log([2 / 9, 4 / 9, 3 / 9]), "log-probs of P_a * P_b renormalised")


def _ll_negative(f):
    a, b = _log([1 / 2, 1 / 4, 1 / 4]), _log([1 / 8, 1 / 2, 3 / 8])
    got = f(torch.stack([a, b]), torch.tensor([2.0, -1.0], dtype=D))
    expect_close(got, _log([48 / 55, 3 / 55, 4 / 55]), "log-probs of P_a^2 / P_b renormalised (negative weight)")


def _ll_and(f):
    a = torch.tensor([0.0, 0.0, -math.inf], dtype=D)
    b = torch.tensor([-math.inf, 0.0, 0.0], dtype=D)
    got = f(torch.stack([a, b]), torch.tensor([0.5, 0.5], dtype=D))
    expect_close(got.exp(), torch.tensor([0.0, 1.0, 0.0], dtype=D), "probabilities (AND: each zero is a veto)")


register(Question(
    id="ensemble.log_linear_interpolate", notebook=NB, function="log_linear_interpolate", points=2,
    description="log_softmax(sum_m w_m log_softmax(logits_m)); any real weights; a zero-weight member drops "
                "out even where its log-prob is -inf; ValueError when the number of weights is not M",
    groups={"core": 3, "zero_weight": 1, "errors": 1},
    implemented_by=["labkit.ensemble.log_linear_interpolate", "labkit.ensemble.combine",
                    "labkit.ensemble.ensemble_next_token", "labkit.ensemble.dexperts"],
    visible=[("two members by hand", _ll_hand), ("a negative weight by hand", _ll_negative),
             ("AND: a zero from one member is a veto", _ll_and)],
))


# ---- fitting mixture weights (EM) -------------------------------------------------------------

def _em_hand(f):
    # d/dw sum_n log(w a_n + (1-w) b_n) = 0 with a = (0.8, 0.2), b = (0.2, 0.4) gives w = 5/6
    target_lp = _log([[0.8, 0.2], [0.2, 0.4]])
    expect_close(f(target_lp, 2000), torch.tensor([5 / 6, 1 / 6], dtype=D), "weights", atol=1e-4, rtol=0)


def _em_simplex(f):
    target_lp = torch.log_softmax(torch.randn(4, 50, 6, dtype=D), -1)[..., 0]
    w = f(target_lp, 200)
    expect_equal(tuple(w.shape), (4,), "shape of the weights")
    expect_true(bool((w >= 0).all()), f"weights must be non-negative, got {w.tolist()}")
    expect_close(w.sum(), torch.tensor(1.0, dtype=D), "sum of the weights", atol=1e-6, rtol=0)


register(Question(
    id="ensemble.fit_mixture_weights", notebook=NB, function="fit_mixture_weights", points=3,
    description="EM for linear-interpolation weights: target_lp [M, N] -> w [M] on the simplex",
    groups={"core": 1},
    implemented_by=["labkit.ensemble.fit_mixture_weights"],
    visible=[("two members by hand (w = 5/6)", _em_hand), ("weights lie on the simplex", _em_simplex)],
))


# ---- the bagging resampler --------------------------------------------------------------------

def _boot_shape(f):
    idx = f(50, 4, 0)
    expect_true(isinstance(idx, torch.Tensor), f"expected a tensor, got {type(idx).__name__}")
    expect_equal(tuple(idx.shape), (4, 50), "shape [k, n]")
    expect_equal(idx.dtype, torch.long, "dtype")
    expect_true(bool((idx >= 0).all() and (idx < 50).all()), "indices must lie in [0, n)")


def _boot_seed(f):
    expect_equal(f(30, 3, 7), f(30, 3, 7), "two calls with the same seed")
    expect_true(not torch.equal(f(30, 3, 7), f(30, 3, 8)), "different seeds must give different resamples")


def _boot_replacement(f):
    idx = f(20_000, 2, 1)
    for row in idx:
        frac = len(row.unique()) / 20_000
        expect_true(abs(frac - (1 - 1 / math.e)) < 0.01,
                    f"a bootstrap sample (with replacement) holds ~63.2% distinct examples, got {frac:.1%}")
    expect_true(not torch.equal(idx[0], idx[1]), "the k resamples must differ from each other")


register(Question(
    id="ensemble.bootstrap_indices", notebook=NB, function="bootstrap_indices", points=2,
    description="bootstrap_indices(n, k, seed) -> LongTensor [k, n] drawn uniformly WITH replacement, "
                "reproducible from the seed; ValueError when n or k is below 1",
    groups={"core": 3, "errors": 1},
    implemented_by=["labkit.ensemble.bootstrap_indices", "labkit.ensemble.bagging"],
    visible=[("shape, dtype and range", _boot_shape), ("reproducible from the seed", _boot_seed),
             ("drawn with replacement (~63.2% distinct)", _boot_replacement)],
))


# ---- one ensemble decoding step ---------------------------------------------------------------

def _step_member_logits():
    # [M=2, B=1, V=3]: linear picks token 0 (0.4, 0.3, 0.3), log-linear picks token 1 (member 0 vetoes 2)
    return torch.stack([_log([0.7, 0.3, 0.0]), _log([0.1, 0.3, 0.6])])[:, None, :]


def _step_linear(f):
    tokens, logprobs = f(_step_member_logits(), torch.tensor([0.5, 0.5], dtype=D), "linear")
    expect_equal(tokens, torch.tensor([0]), "greedy token (linear)")
    expect_close(logprobs, _log([[0.4, 0.3, 0.3]]), "combined log-probs (linear)")


def _step_log_linear(f):
    tokens, logprobs = f(_step_member_logits(), torch.tensor([0.5, 0.5], dtype=D), "log_linear")
    expect_equal(tokens, torch.tensor([1]), "greedy token (log-linear)")
    expect_close(logprobs.exp(), torch.tensor([[math.sqrt(0.07), 0.3, 0.0]], dtype=D) / (math.sqrt(0.07) + 0.3),
                 "combined probabilities (log-linear)")


register(Question(
    id="ensemble.ensemble_next_token", notebook=NB, function="ensemble_next_token", points=2,
    description="one greedy step: member logits [M, B, V] -> (tokens [B], combined log-probs [B, V])",
    groups={"core": 1},
    implemented_by=["labkit.ensemble.ensemble_next_token", "labkit.ensemble.EnsembleLM"],
    visible=[("linear rule by hand", _step_linear), ("log-linear rule by hand", _step_log_linear)],
))
