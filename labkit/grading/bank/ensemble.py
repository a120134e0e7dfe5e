"""Questions of notebooks/01_ensembling.ipynb: combination rules, fitting mixture weights, the bagging
resampler and one ensemble decoding step.

Expected values are hand-computed (exact fractions) or come from the plain float64 references below,
written independently of labkit.ensemble and of the notebook's solutions.
"""
from __future__ import annotations

import math

import torch

from labkit.grading import Question, expect_close, expect_equal, expect_raises, expect_true, register

NB = "01_ensembling"
D = torch.float64


# ---- references (float64, deliberately plain: explicit sums, no log-space tricks) ---------------

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
    logits = torch.randn(3, 4, 10) * 3
    w = torch.tensor([0.2, 0.5, 0.3])
    expect_close(f(logits, w), _linear_ref(logits, w), "log-probs of 3 members [3, 4, 10]")


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


register(Question(
    id="ensemble.linear_interpolate", notebook=NB, function="linear_interpolate", points=2,
    description="log sum_m w_m softmax(logits_m) over [M, ..., V]; weights [M] or [M, ...]; ValueError on bad weights",
    visible=[("two members by hand", _lin_hand), ("OR: a zero from one member is not a veto", _lin_or),
             ("three members [3, 4, 10]", _lin_random)],
    hidden=[("per-position weights", _lin_position), ("large logits stay finite", _lin_large),
            ("bad weights raise ValueError", _lin_bad)],
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


register(Question(
    id="ensemble.log_linear_interpolate", notebook=NB, function="log_linear_interpolate", points=2,
    description="log_softmax(sum_m w_m log_softmax(logits_m)); any real weights; ValueError on a wrong count",
    visible=[("two members by hand", _ll_hand), ("a negative weight by hand", _ll_negative),
             ("AND: a zero from one member is a veto", _ll_and)],
    hidden=[("three members, random", _ll_random), ("per-row weights", _ll_position),
            ("zero weight and -inf log-probs", _ll_zero_weight), ("wrong number of weights", _ll_bad)],
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


def _em_dominant(f):
    target_lp = _log([[0.9, 0.7, 0.8], [0.1, 0.2, 0.3]])  # member 0 is better on every example
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


register(Question(
    id="ensemble.fit_mixture_weights", notebook=NB, function="fit_mixture_weights", points=3,
    description="EM for linear-interpolation weights: target_lp [M, N] -> w [M] on the simplex",
    visible=[("two members by hand (w = 5/6)", _em_hand), ("weights lie on the simplex", _em_simplex)],
    hidden=[("a dominant member takes the weight", _em_dominant), ("100 random examples", _em_random),
            ("likelihood at least that of uniform weights", _em_likelihood)],
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


def _boot_uniform(f):
    counts = torch.bincount(f(10, 2000, 3).flatten(), minlength=10).double()
    expect_close(counts / counts.sum(), torch.full((10,), 0.1, dtype=D), "frequency of each index", atol=0.01, rtol=0)


def _boot_bad(f):
    expect_raises(ValueError, f, 0, 3, 0, what="n = 0")
    expect_raises(ValueError, f, 10, 0, 0, what="k = 0")


register(Question(
    id="ensemble.bootstrap_indices", notebook=NB, function="bootstrap_indices", points=2,
    description="bootstrap_indices(n, k, seed) -> LongTensor [k, n] drawn with replacement, reproducible",
    visible=[("shape, dtype and range", _boot_shape), ("reproducible from the seed", _boot_seed)],
    hidden=[("drawn with replacement (~63.2% distinct)", _boot_replacement), ("every index equally likely", _boot_uniform),
            ("n or k below 1 raises ValueError", _boot_bad)],
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
    member_logits = torch.stack([_log([0.4, 0.35, 0.25]), _log([0.8, 0.1, 0.1])])[:, None, :]
    tokens, _ = f(member_logits, torch.tensor([1.0, -1.0], dtype=D), "log_linear")
    expect_equal(tokens, torch.tensor([1]), "greedy token with an anti-expert (weights 1, -1)")


register(Question(
    id="ensemble.ensemble_next_token", notebook=NB, function="ensemble_next_token", points=2,
    description="one greedy step: member logits [M, B, V] -> (tokens [B], combined log-probs [B, V])",
    visible=[("linear rule by hand", _step_linear), ("log-linear rule by hand", _step_log_linear)],
    hidden=[("a batch of 8, both rules", _step_batch), ("an anti-expert with a negative weight", _step_anti)],
))
