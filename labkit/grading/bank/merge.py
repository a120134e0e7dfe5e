"""Visible cases of notebooks/02_merging.ipynb: weighted averaging of state dicts, task-vector
arithmetic, the three steps of TIES (trim, elect, disjoint mean) and the greedy soup.

Expected values are hand-computed or stored data (``visible_data.json``); the hidden cases and the
float64 references are in the instructor bank (instructor/bank/merge.py).
"""
from __future__ import annotations

import torch

from labkit.grading import DeclaredCallable, Question, expect_close, expect_equal, register
from labkit.grading.bank._data import visible

NB = "02_merging"


def _t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def _sd(dtype=torch.float32, **tensors):
    return {k: torch.tensor(v, dtype=dtype) for k, v in tensors.items()}


# ---- weighted averaging ----------------------------------------------------------------------

def _avg_hand(f):
    a, b = _sd(w=[1.0, 2.0], b=[0.0]), _sd(w=[3.0, 6.0], b=[4.0])
    expect_close(f([a, b], [1.0, 3.0]), {"w": _t(2.5, 5.0), "b": _t(3.0)}, "(1*a + 3*b) / 4")


def _avg_uniform(f):
    sds = [_sd(w=[[float(i), 2.0 * i]]) for i in range(4)]
    expect_close(f(sds, [1, 1, 1, 1]), {"w": _t(1.5, 3.0).view(1, 2)}, "uniform average of 4 state dicts")


def _avg_random(f):
    d = visible("merge.weighted_average/three random")
    sds = [{"x": x, "y": y} for x, y in zip(d["x"], d["y"])]
    expect_close(f(sds, [0.2, 0.5, 0.3]), {"x": d["expected_x"], "y": d["expected_y"]},
                 "weighted average of 3 random state dicts")


register(Question(
    id="merge.weighted_average", notebook=NB, function="weighted_average", points=2,
    description="sum_i w_i theta_i / sum_i w_i for every tensor, computed in float32 and returned in the inputs' "
                "dtype; ValueError on a weight count mismatch, weights summing to 0, or different keys",
    groups={"core": 3, "dtype": 1, "errors": 1},
    implemented_by=["labkit.merge.linear", "labkit.merge.merge", "labkit.merge.average_checkpoints",
                    "labkit.merge.uniform_soup", "labkit.merge.interpolate", "labkit.merge.merge_tensor"],
    visible=[("two state dicts by hand", _avg_hand), ("uniform average", _avg_uniform),
             ("three random state dicts", _avg_random)],
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


register(Question(
    id="merge.task_arithmetic", notebook=NB, function="task_arithmetic", points=2,
    description="theta_base + sum_i s_i (theta_i - theta_base) on state dicts; ValueError on a scale count "
                "mismatch or a fine-tune with other tensors than the base",
    groups={"core": 3, "errors": 1},
    implemented_by=["labkit.merge.task_arithmetic", "labkit.merge.generalized_task_arithmetic",
                    "labkit.merge.TaskVector", "labkit.merge.merge", "labkit.merge.merge_tensor"],
    visible=[("two task vectors by hand", _ta_hand), ("negation", _ta_negate)],
))


# ---- TIES: trim ----------------------------------------------------------------------------

def _trim_hand(f):
    expect_close(f(_t(0.1, -0.9, 0.5, -0.3), 0.5), _t(0.0, -0.9, 0.5, 0.0), "top 2 of 4 by magnitude")


def _trim_2d(f):
    d = torch.tensor([[3.0, -1.0, 0.2], [-4.0, 0.5, 2.0]])
    expect_close(f(d, 1 / 3), torch.tensor([[3.0, 0.0, 0.0], [-4.0, 0.0, 0.0]]), "top 2 of a [2, 3] delta")


def _trim_at_least_one(f):
    expect_close(f(_t(0.1, -0.9, 0.5, -0.3), 0.1), _t(0.0, -0.9, 0.0, 0.0),
                 "density 0.1 of 4 entries keeps at least the largest one (max(1, int(0.1 * 4)) = 1)")


register(Question(
    id="merge.ties_trim", notebook=NB, function="ties_trim", points=1,
    description="keep the max(1, int(density * numel)) largest-magnitude entries of a delta, zero the rest; "
                "ValueError for a density outside (0, 1]",
    groups={"core": 3, "errors": 1},
    implemented_by=["labkit.merge.magnitude_trim", "labkit.merge.ties", "labkit.merge.merge_tensor"],
    visible=[("by hand", _trim_hand), ("a 2-D delta", _trim_2d), ("keeps at least one entry", _trim_at_least_one)],
))


# ---- TIES: elect -----------------------------------------------------------------------------

def _elect_hand(f):
    deltas = torch.tensor([[3.0, 0.0, 0.0, -2.0], [0.0, 2.0, 0.0, -4.0], [2.0, -3.0, 0.0, 0.0]])
    # sums [5, -1, 0, -6]; a zero sum counts as +1
    expect_close(f(deltas), _t(1.0, -1.0, 1.0, -1.0), "elected signs")


def _elect_mass(f):
    deltas = torch.tensor([[1.0, 1.0], [1.0, 1.0], [-5.0, -0.5]])
    expect_close(f(deltas), _t(-1.0, 1.0), "the sign of the total mass, not the majority count")


register(Question(
    id="merge.ties_elect", notebook=NB, function="ties_elect", points=1,
    description="sign of sum_i delta_i per entry, +1 where the sum is 0, in the deltas' dtype; deltas [M, ...] -> [...]",
    groups={"core": 1},
    implemented_by=["labkit.merge.elect_sign", "labkit.merge.ties", "labkit.merge.merge_tensor"],
    visible=[("by hand", _elect_hand), ("mass beats count", _elect_mass)],
))


# ---- TIES: disjoint mean ---------------------------------------------------------------------

def _dm_hand(f):
    deltas = torch.tensor([[3.0, 0.0, 0.0, -2.0], [0.0, 2.0, 0.0, -4.0], [2.0, -3.0, 0.0, 0.0]])
    sign = _t(1.0, -1.0, 1.0, -1.0)
    expect_close(f(deltas, sign), _t(2.5, -3.0, 0.0, -3.0), "mean of the agreeing non-zero deltas")


def _dm_zeros_dont_count(f):
    deltas = torch.tensor([[4.0], [0.0], [0.0], [0.0]])
    expect_close(f(deltas, _t(1.0)), _t(4.0), "zeros (trimmed entries) are not averaged in")


register(Question(
    id="merge.ties_disjoint_mean", notebook=NB, function="ties_disjoint_mean", points=1,
    description="per entry, the mean of the deltas whose sign equals the elected sign (0 if none)",
    groups={"core": 1},
    implemented_by=["labkit.merge.ties", "labkit.merge.generalized_task_arithmetic", "labkit.merge.merge_tensor"],
    visible=[("by hand", _dm_hand), ("zeros are not averaged in", _dm_zeros_dont_count)],
))


# ---- greedy soup -----------------------------------------------------------------------------

def scalar_models(*values):
    return [{"w": torch.tensor([v])} for v in values]


def closeness(target):
    """The soup's score: minus the distance of its one weight from ``target`` (sent to the kernel by name)."""
    return DeclaredCallable("closeness", target=target)


def _soup_hand(f):
    soup, chosen = f(scalar_models(0.0, 1.5, 0.8, 3.0), closeness(1.0))
    # by own score: 0.8, 1.5, 0.0, 3.0; adding 1.5 gives 1.15 (better), then 0.0 (0.767) and 3.0 (1.77) are worse
    expect_equal(list(chosen), [2, 1], "chosen indices, in the order they were added")
    expect_close(soup["w"], _t(1.15), "the soup's weight")


def _soup_starts_with_best(f):
    soup, chosen = f(scalar_models(5.0, 0.9, 2.0), closeness(1.0))
    expect_equal(list(chosen), [1], "only the best model (every addition makes it worse)")
    expect_close(soup["w"], _t(0.9), "the soup is the best model")


register(Question(
    id="merge.greedy_soup", notebook=NB, function="greedy_soup", points=2,
    description="sort by own score; add a model to the uniform average only if the score does not drop (a tie "
                "keeps it); return (soup_state_dict, chosen_indices)",
    groups={"core": 3, "ties": 1},
    implemented_by=["labkit.merge.greedy_soup"],
    visible=[("by hand", _soup_hand), ("starts with the best model", _soup_starts_with_best)],
))
