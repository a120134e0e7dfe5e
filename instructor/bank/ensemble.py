"""Hidden cases and float64 references of notebooks/01_ensembling.ipynb (instructor only).

References are plain float64 (explicit sums, no log-space tricks), written independently of
labkit.ensemble and of the notebook's solutions.
"""
from __future__ import annotations

import math

import torch

from labkit.grading import add_hidden, expect_close, expect_equal, expect_raises, expect_true

D = torch.float64


# ---- references -------------------------------------------------------------------------------

def _probs(logits):
    z = logits.double()
    z = z - z.max(-1, keepdim=True).values
    return z.exp() / z.exp().sum(-1, keepdim=True)


def _w(weights, logits):
    w = torch.as_tensor(weights, dtype=D)
    return w.reshape(*w.shape, *([1] * (logits.ndim - w.ndim)))


def _linear_ref(logits, weights):
    return torch.log((_w(weights, logits) * _probs(logits)).sum(0)).to(logits.dtype)


def _log_linear_ref(logits, weights):
    score = (_w(weights, logits) * torch.log(_probs(logits))).sum(0)
    return torch.log(_probs(score)).to(logits.dtype)


def _em_ref(target_lp, iters=5000):
    p = target_lp.double().exp()  # [M, N]
    w = torch.full((p.shape[0],), 1 / p.shape[0], dtype=D)
    for _ in range(iters):
        r = w[:, None] * p / (w[:, None] * p).sum(0)
        w = r.mean(1)
    return w


def _loglik(w, target_lp):
    return torch.log((w.double()[:, None] * target_lp.double().exp()).sum(0)).sum().item()


def _visible_linear():
    logits = torch.randn(3, 4, 10) * 3
    w = torch.tensor([0.2, 0.5, 0.3])
    return {"logits": logits, "weights": w, "expected": _linear_ref(logits, w)}


VISIBLE_DATA = {"ensemble.linear_interpolate/three members": _visible_linear}


# ---- linear interpolation ---------------------------------------------------------------------

def _lin_position(f):
    logits = torch.randn(2, 3, 5, 7, dtype=D)
    w = torch.rand(3, 5, dtype=D)
    w = torch.stack([w, 1 - w])  # [M=2, B=3, T=5]: a different mix at every position
    expect_close(f(logits, w), _linear_ref(logits, w), "log-probs with per-position weights [2, 3, 5]")


def _lin_large(f):
    logits = torch.tensor([[1000.0, 990.0, -1000.0], [-1000.0, 995.0, 1000.0]])
    got = f(logits, torch.tensor([0.5, 0.5]))
    expect_true(torch.isfinite(got).sum() >= 2, "log-probs of logits near ±1000 must not overflow to NaN/inf "
                                                 "(use log_softmax and logsumexp)")
    expect_close(got, _linear_ref(logits, [0.5, 0.5]), "log-probs of logits near ±1000")


def _lin_bad(f):
    logits = torch.randn(2, 5)
    expect_raises(ValueError, f, logits, torch.tensor([0.7, 0.7]), what="weights summing to 1.4")
    expect_raises(ValueError, f, logits, torch.tensor([1.5, -0.5]), what="a negative weight")
    expect_raises(ValueError, f, logits, torch.tensor([0.2, 0.3, 0.5]), what="3 weights for 2 members")


add_hidden("ensemble.linear_interpolate", [
    ("per-position weights", _lin_position, "core"), ("large logits stay finite", _lin_large, "stable"),
    ("bad weights raise ValueError", _lin_bad, "errors"),
])


# ---- log-linear interpolation -----------------------------------------------------------------

def _ll_random(f):
    logits = torch.randn(3, 4, 10) * 3
    w = torch.tensor([0.9, -0.4, 0.6])
    expect_close(f(logits, w), _log_linear_ref(logits, w), "log-probs of 3 members with a negative weight")


def _ll_position(f):
    logits = torch.randn(2, 3, 6, dtype=D)
    w = torch.randn(2, 3, dtype=D)
    expect_close(f(logits, w), _log_linear_ref(logits, w), "log-probs with per-row weights [2, 3]")


def _ll_zero_weight(f):
    a = torch.tensor([0.0, 1.0, -math.inf], dtype=D)
    b = torch.tensor([0.5, 0.0, 0.2], dtype=D)
    got = f(torch.stack([a, b]), torch.tensor([0.0, 1.0], dtype=D))
    expect_true(not torch.isnan(got).any(), "a member with weight 0 must drop out, even where its log-prob is "
                                            "-inf (0 * -inf is NaN: skip zero-weight terms)")
    expect_close(got, torch.log_softmax(b, -1), "log-probs when member 0 has weight 0")


def _ll_bad(f):
    expect_raises(ValueError, f, torch.randn(2, 5), torch.tensor([1.0]), what="1 weight for 2 members")


add_hidden("ensemble.log_linear_interpolate", [
    ("three members, random", _ll_random, "core"), ("per-row weights", _ll_position, "core"),
    ("zero weight and -inf log-probs", _ll_zero_weight, "zero_weight"), ("wrong number of weights", _ll_bad, "errors"),
])


# ---- EM ---------------------------------------------------------------------------------------

def _em_dominant(f):
    target_lp = torch.log(torch.tensor([[0.9, 0.7, 0.8], [0.1, 0.2, 0.3]], dtype=D))  # member 0 always better
    w = f(target_lp, 2000)
    expect_true(w[0].item() > 0.99, f"a member that is better on every example should get almost all the weight, "
                                    f"got {w.tolist()}")


def _em_random(f):
    target_lp = torch.log_softmax(torch.randn(3, 100, 5, dtype=D) * 2, -1)[..., 0]
    expect_close(f(target_lp, 2000), _em_ref(target_lp), "weights on 100 random examples", atol=1e-3, rtol=0)


def _em_likelihood(f):
    target_lp = torch.log_softmax(torch.randn(5, 80, 4, dtype=D), -1)[..., 0]
    w = f(target_lp, 50)
    uniform = torch.full((5,), 0.2, dtype=D)
    expect_true(_loglik(w, target_lp) >= _loglik(uniform, target_lp) - 1e-9,
                "the fitted weights must not have a lower likelihood than uniform weights (EM never goes down)")


add_hidden("ensemble.fit_mixture_weights", [
    ("a dominant member takes the weight", _em_dominant, "core"), ("100 random examples", _em_random, "core"),
    ("likelihood at least that of uniform weights", _em_likelihood, "core"),
])


# ---- bootstrap --------------------------------------------------------------------------------

def _boot_uniform(f):
    counts = torch.bincount(f(10, 2000, 3).flatten(), minlength=10).double()
    expect_close(counts / counts.sum(), torch.full((10,), 0.1, dtype=D), "frequency of each index", atol=0.01, rtol=0)


def _boot_bad(f):
    expect_raises(ValueError, f, 0, 3, 0, what="n = 0")
    expect_raises(ValueError, f, 10, 0, 0, what="k = 0")


add_hidden("ensemble.bootstrap_indices", [
    ("every index equally likely", _boot_uniform, "core"), ("n or k below 1 raises ValueError", _boot_bad, "errors"),
])


# ---- decoding step ----------------------------------------------------------------------------

def _step_batch(f):
    member_logits = torch.randn(3, 8, 20) * 2
    w = torch.tensor([0.5, 0.25, 0.25])
    for rule, ref in (("linear", _linear_ref), ("log_linear", _log_linear_ref)):
        tokens, logprobs = f(member_logits, w, rule)
        expected = ref(member_logits, w)
        expect_close(logprobs, expected, f"combined log-probs ({rule}, batch of 8)")
        expect_equal(tokens, expected.argmax(-1), f"greedy tokens ({rule}, batch of 8)")


def _step_anti(f):
    # weights (1, -1): the token member 1 likes most is pushed out
    member_logits = torch.stack([torch.log(torch.tensor([0.4, 0.35, 0.25], dtype=D)),
                                 torch.log(torch.tensor([0.8, 0.1, 0.1], dtype=D))])[:, None, :]
    tokens, _ = f(member_logits, torch.tensor([1.0, -1.0], dtype=D), "log_linear")
    expect_equal(tokens, torch.tensor([1]), "greedy token with an anti-expert (weights 1, -1)")


add_hidden("ensemble.ensemble_next_token", [
    ("a batch of 8, both rules", _step_batch, "core"), ("an anti-expert with a negative weight", _step_anti, "core"),
])
