"""Questions of notebooks/02_merging.ipynb: weighted averaging of state dicts, task-vector
arithmetic, the three steps of TIES (trim, elect, disjoint mean) and the greedy soup.

Expected values are hand-computed or come from the plain float64 references below, written
independently of labkit.merge and of the notebook's solutions.
"""
from __future__ import annotations

import torch

from labkit.grading import Question, expect_close, expect_equal, expect_raises, expect_true, register

NB = "02_merging"
D = torch.float64


def _t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def _sd(dtype=torch.float32, **tensors):
    return {k: torch.tensor(v, dtype=dtype) for k, v in tensors.items()}


# ---- weighted averaging ----------------------------------------------------------------------

def _avg_ref(state_dicts, weights):
    total = sum(float(w) for w in weights)
    return {k: (sum(float(w) * sd[k].double() for w, sd in zip(weights, state_dicts)) / total).to(v.dtype)
            for k, v in state_dicts[0].items()}


def _avg_hand(f):
    a, b = _sd(w=[1.0, 2.0], b=[0.0]), _sd(w=[3.0, 6.0], b=[4.0])
    expect_close(f([a, b], [1.0, 3.0]), {"w": _t(2.5, 5.0), "b": _t(3.0)}, "(1*a + 3*b) / 4")


def _avg_uniform(f):
    sds = [_sd(w=[[float(i), 2.0 * i]]) for i in range(4)]
    expect_close(f(sds, [1, 1, 1, 1]), {"w": _t(1.5, 3.0).view(1, 2)}, "uniform average of 4 state dicts")


def _avg_random(f):
    sds = [{"x": torch.randn(5, 3), "y": torch.randn(7)} for _ in range(3)]
    w = [0.2, 0.5, 0.3]
    expect_close(f(sds, w), _avg_ref(sds, w), "weighted average of 3 random state dicts")


def _avg_unnormalised(f):
    sds = [{"x": torch.randn(4)} for _ in range(2)]
    expect_close(f(sds, [2.0, 6.0]), _avg_ref(sds, [2.0, 6.0]), "weights 2 and 6 (divide by their sum)")


def _avg_dtype(f):
    sds = [{"x": torch.randn(16).to(torch.bfloat16)} for _ in range(3)]
    got = f(sds, [1.0, 1.0, 1.0])
    expect_true(got["x"].dtype == torch.bfloat16, f"a bfloat16 input must give a bfloat16 result, got {got['x'].dtype}")
    expect_close(got, _avg_ref(sds, [1.0, 1.0, 1.0]), "average of bfloat16 tensors (computed in float32)")


def _avg_errors(f):
    a, b = _sd(w=[1.0]), _sd(w=[2.0])
    expect_raises(ValueError, f, [a, b], [1.0], what="2 state dicts but 1 weight")
    expect_raises(ValueError, f, [a, b], [1.0, -1.0], what="weights summing to 0")
    expect_raises(ValueError, f, [a, _sd(v=[2.0])], [1.0, 1.0], what="state dicts with different keys")


register(Question(
    id="merge.weighted_average", notebook=NB, function="weighted_average", points=2,
    description="sum_i w_i theta_i / sum_i w_i for every tensor, in float32, in the inputs' dtype",
    visible=[("two state dicts by hand", _avg_hand), ("uniform average", _avg_uniform),
             ("three random state dicts", _avg_random)],
    hidden=[("unnormalised weights", _avg_unnormalised), ("bfloat16 keeps its dtype", _avg_dtype),
            ("bad input raises ValueError", _avg_errors)],
))


# ---- task arithmetic -------------------------------------------------------------------------

def _ta_hand(f):
    base = _sd(w=[1.0, 1.0, 1.0])
    fts = [_sd(w=[2.0, 1.0, 0.0]), _sd(w=[1.0, 3.0, 1.0])]
    # task vectors [1, 0, -1] and [0, 2, 0]
    expect_close(f(base, fts, [1.0, 1.0]), {"w": _t(2.0, 3.0, 0.0)}, "base + tau_1 + tau_2")
    expect_close(f(base, fts, [0.5, -1.0]), {"w": _t(1.5, -1.0, 0.5)}, "base + 0.5 tau_1 - tau_2")


def _ta_negate(f):
    base, ft = _sd(w=[0.5, -0.5]), _sd(w=[1.5, 0.5])
    expect_close(f(base, [ft], [-1.0]), {"w": _t(-0.5, -1.5)}, "base - tau (negation)")


def _ta_random(f):
    base = {"x": torch.randn(3, 4), "y": torch.randn(2)}
    fts = [{k: v + torch.randn_like(v) for k, v in base.items()} for _ in range(3)]
    s = [0.3, 0.7, -0.2]
    expected = {k: (base[k].double() + sum(si * (ft[k].double() - base[k].double()) for si, ft in zip(s, fts))).float()
                for k in base}
    expect_close(f(base, fts, s), expected, "three task vectors with scales 0.3, 0.7, -0.2")


def _ta_zero(f):
    base = {"x": torch.randn(5)}
    fts = [{"x": torch.randn(5)}]
    expect_close(f(base, fts, [0.0]), base, "scale 0 gives the base back")


def _ta_errors(f):
    base, ft = _sd(w=[0.0]), _sd(w=[1.0])
    expect_raises(ValueError, f, base, [ft, ft], [1.0], what="2 fine-tunes but 1 scale")
    expect_raises(ValueError, f, base, [_sd(v=[1.0])], [1.0], what="a fine-tune with other tensors than the base")


register(Question(
    id="merge.task_arithmetic", notebook=NB, function="task_arithmetic", points=2,
    description="theta_base + sum_i s_i (theta_i - theta_base) on state dicts",
    visible=[("two task vectors by hand", _ta_hand), ("negation", _ta_negate)],
    hidden=[("three random task vectors", _ta_random), ("scale 0", _ta_zero),
            ("bad input raises ValueError", _ta_errors)],
))


# ---- TIES: trim ----------------------------------------------------------------------------

def _trim_ref(delta, density):
    k = max(1, int(density * delta.numel()))
    flat = delta.reshape(-1)
    keep = flat.abs().argsort(descending=True, stable=True)[:k]
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.view_as(delta)


def _trim_hand(f):
    expect_close(f(_t(0.1, -0.9, 0.5, -0.3), 0.5), _t(0.0, -0.9, 0.5, 0.0), "top 2 of 4 by magnitude")


def _trim_2d(f):
    d = torch.tensor([[3.0, -1.0, 0.2], [-4.0, 0.5, 2.0]])
    expect_close(f(d, 1 / 3), torch.tensor([[3.0, 0.0, 0.0], [-4.0, 0.0, 0.0]]), "top 2 of a [2, 3] delta")


def _trim_random(f):
    d = torch.randn(8, 25)
    expect_close(f(d, 0.2), _trim_ref(d, 0.2), "top 20% of a random [8, 25] delta")


def _trim_density_one(f):
    d = torch.randn(10)
    expect_close(f(d, 1.0), d, "density 1 keeps everything")


def _trim_at_least_one(f):
    expect_close(f(_t(0.1, -0.9, 0.5, -0.3), 0.1), _t(0.0, -0.9, 0.0, 0.0),
                 "density 0.1 of 4 entries keeps at least the largest one")


def _trim_errors(f):
    expect_raises(ValueError, f, torch.randn(4), 0.0, what="density 0")
    expect_raises(ValueError, f, torch.randn(4), 1.5, what="density 1.5")


register(Question(
    id="merge.ties_trim", notebook=NB, function="ties_trim", points=1,
    description="keep the max(1, int(density * numel)) largest-magnitude entries of a delta, zero the rest",
    visible=[("by hand", _trim_hand), ("a 2-D delta", _trim_2d)],
    hidden=[("random delta, density 0.2", _trim_random), ("density 1", _trim_density_one),
            ("keeps at least one entry", _trim_at_least_one), ("bad density raises ValueError", _trim_errors)],
))


# ---- TIES: elect -----------------------------------------------------------------------------

def _elect_hand(f):
    deltas = torch.tensor([[3.0, 0.0, 0.0, -2.0], [0.0, 2.0, 0.0, -4.0], [2.0, -3.0, 0.0, 0.0]])
    # sums [5, -1, 0, -6]; a zero sum counts as +1
    expect_close(f(deltas), _t(1.0, -1.0, 1.0, -1.0), "elected signs")


def _elect_mass(f):
    deltas = torch.tensor([[1.0, 1.0], [1.0, 1.0], [-5.0, -0.5]])
    expect_close(f(deltas), _t(-1.0, 1.0), "the sign of the total mass, not the majority count")


def _elect_random(f):
    deltas = torch.randn(4, 6, 5)
    expect_close(f(deltas), torch.where(deltas.sum(0) >= 0, 1.0, -1.0), "elected signs of 4 random [6, 5] deltas")


def _elect_dtype(f):
    deltas = torch.randn(3, 7, dtype=D)
    got = f(deltas)
    expect_true(got.dtype == D, f"float64 deltas must give float64 signs, got {got.dtype}")
    expect_close(got, torch.where(deltas.sum(0) >= 0, 1.0, -1.0).to(D), "elected signs in float64")


register(Question(
    id="merge.ties_elect", notebook=NB, function="ties_elect", points=1,
    description="sign of sum_i delta_i per entry, +1 where the sum is 0; deltas [M, ...] -> [...]",
    visible=[("by hand", _elect_hand), ("mass beats count", _elect_mass)],
    hidden=[("random [4, 6, 5]", _elect_random), ("keeps the dtype", _elect_dtype)],
))


# ---- TIES: disjoint mean ---------------------------------------------------------------------

def _dm_ref(deltas, sign):
    agree = (deltas.sign() == sign).to(deltas.dtype)
    count = agree.sum(0)
    return (deltas * agree).sum(0) / count.clamp(min=1)


def _dm_hand(f):
    deltas = torch.tensor([[3.0, 0.0, 0.0, -2.0], [0.0, 2.0, 0.0, -4.0], [2.0, -3.0, 0.0, 0.0]])
    sign = _t(1.0, -1.0, 1.0, -1.0)
    expect_close(f(deltas, sign), _t(2.5, -3.0, 0.0, -3.0), "mean of the agreeing non-zero deltas")


def _dm_zeros_dont_count(f):
    deltas = torch.tensor([[4.0], [0.0], [0.0], [0.0]])
    expect_close(f(deltas, _t(1.0)), _t(4.0), "zeros (trimmed entries) are not averaged in")


def _dm_random(f):
    deltas = torch.randn(5, 4, 3)
    deltas[deltas.abs() < 0.5] = 0.0
    sign = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    expect_close(f(deltas, sign), _dm_ref(deltas, sign), "disjoint mean of 5 random [4, 3] deltas")


def _dm_none_agree(f):
    deltas = torch.tensor([[-1.0, 0.0], [-2.0, 0.0]])
    expect_close(f(deltas, _t(1.0, 1.0)), _t(0.0, 0.0), "no agreeing delta gives 0 (no division by zero)")


register(Question(
    id="merge.ties_disjoint_mean", notebook=NB, function="ties_disjoint_mean", points=1,
    description="per entry, the mean of the deltas whose sign equals the elected sign (0 if none)",
    visible=[("by hand", _dm_hand), ("zeros are not averaged in", _dm_zeros_dont_count)],
    hidden=[("random deltas", _dm_random), ("no agreeing delta", _dm_none_agree)],
))


# ---- greedy soup -----------------------------------------------------------------------------

def _scalar_models(*values):
    return [{"w": torch.tensor([v])} for v in values]


def _closeness(target):
    return lambda sd: -abs(float(sd["w"][0]) - target)


def _soup_hand(f):
    soup, chosen = f(_scalar_models(0.0, 1.5, 0.8, 3.0), _closeness(1.0))
    # by own score: 0.8, 1.5, 0.0, 3.0; adding 1.5 gives 1.15 (better), then 0.0 (0.767) and 3.0 (1.77) are worse
    expect_equal(list(chosen), [2, 1], "chosen indices, in the order they were added")
    expect_close(soup["w"], _t(1.15), "the soup's weight")


def _soup_starts_with_best(f):
    soup, chosen = f(_scalar_models(5.0, 0.9, 2.0), _closeness(1.0))
    expect_equal(list(chosen), [1], "only the best model (every addition makes it worse)")
    expect_close(soup["w"], _t(0.9), "the soup is the best model")


def _soup_ties_kept(f):
    soup, chosen = f(_scalar_models(2.0, 0.0), lambda sd: 1.0)
    expect_equal(len(chosen), 2, "number of chosen models when adding one leaves the score unchanged (>= keeps it)")
    expect_close(soup["w"], _t(1.0), "the soup's weight")


def _soup_uniform_average(f):
    soup, chosen = f(_scalar_models(1.0, 1.2, 0.7, 1.3), _closeness(1.0))
    # own scores: 1.0, 1.2 (-.2), 1.3 (-.3), 0.7 (-.3, later index): 1.0; +1.2 -> 1.1 worse than 1.0
    expect_equal(list(chosen), [0], "chosen indices")
    soup, chosen = f(_scalar_models(0.6, 1.2, 1.6, 0.7), _closeness(1.0))
    # own: 1.2 (-.2), 0.7 (-.3), 0.6 (-.4), 1.6 (-.6); 1.2 -> +0.7 = 0.95 keep -> +0.6 = .833 worse -> +1.6 = 1.1667 worse
    expect_equal(list(chosen), [1, 3], "chosen indices")
    expect_close(soup["w"], _t(0.95), "the soup's weight (a uniform average of the chosen models)")


register(Question(
    id="merge.greedy_soup", notebook=NB, function="greedy_soup", points=2,
    description="sort by own score; add a model to the uniform average only if the score does not drop; "
                "return (soup_state_dict, chosen_indices)",
    visible=[("by hand", _soup_hand), ("starts with the best model", _soup_starts_with_best)],
    hidden=[("a tie keeps the model", _soup_ties_kept), ("uniform average of the chosen", _soup_uniform_average)],
))
