"""Visible cases of notebooks/05_refinement.ipynb: the stacking input builder, which positions one
Mask-Predict step re-masks, and the self-refine loop's stopping rule.

Expected values are written out by hand below; the hidden cases and the float64 references are in the
instructor bank (instructor/bank/refine.py).
"""
from __future__ import annotations

import torch

from labkit.grading import Question, expect_close, expect_equal, expect_true, register

NB = "05_refinement"


# ---- the stacking input builder -----------------------------------------------------------------

def _stack_two(f):
    a = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    b = torch.tensor([[0.5, 0.4, 0.1], [0.3, 0.3, 0.4]])
    expect_close(f([a, b]), torch.tensor([[0.7, 0.2, 0.1, 0.5, 0.4, 0.1], [0.1, 0.1, 0.8, 0.3, 0.3, 0.4]]),
                 "two members [2, 3] -> [2, 6]: row n is member 1's probabilities, then member 2's")


def _stack_order(f):
    a = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    c = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    expect_close(f([a, b, c]), torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0]]),
                 "three members: member-major order (all of member 1's classes first), not class-major")


register(Question(
    id="refine.stacking_inputs", notebook=NB, function="stacking_inputs", points=2,
    description="the stacker's input from M members' class probabilities: a list of M tensors [N, C] or one "
                "tensor [M, N, C] -> [N, M*C], row n = [member 1's C probabilities, member 2's, ...] (member-major); "
                "the input's dtype; ValueError when the members' shapes differ",
    groups={"core": 3, "tensor": 1, "errors": 1},
    implemented_by=["labkit.refine.stacking_inputs", "labkit.refine.pipelines.stacking_inputs",
                    "labkit.ensemble.stacking_features", "labkit.ensemble.members.stacking_features"],
    visible=[("two members, three classes", _stack_two), ("member-major order", _stack_order)],
))


# ---- which positions one Mask-Predict step re-masks ----------------------------------------------

def _remask_basic(f):
    conf = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.95, 0.6, 0.8, 0.7]], dtype=torch.float64)
    # L = 8, T = 4, t = 1: n = floor(8 * 3 / 4) = 6 -> all but the two most confident (0.95 at 4, 0.9 at 0)
    expect_equal(f(conf, 1, 4), torch.tensor([[False, True, True, True, False, True, True, True]]),
                 "t=1 of T=4, L=8: re-mask the n = 6 least confident positions")
    # t = 3: n = floor(8 * 1 / 4) = 2 -> positions 1 (0.1) and 3 (0.3)
    expect_equal(f(conf, 3, 4), torch.tensor([[False, True, False, True, False, False, False, False]]),
                 "t=3 of T=4, L=8: re-mask the n = 2 least confident positions")


def _remask_rows(f):
    conf = torch.tensor([[0.2, 0.8, 0.1, 0.7, 0.6], [0.9, 0.1, 0.5, 0.3, 0.95]], dtype=torch.float64)
    # L = 5, T = 3, t = 1: n = floor(5 * 2 / 3) = 3 in every row, each row its own lowest three
    expect_equal(f(conf, 1, 3), torch.tensor([[True, False, True, False, True], [False, True, True, True, False]]),
                 "two rows, L=5, T=3, t=1: n = floor(10/3) = 3 least confident in each row")


register(Question(
    id="refine.remask_positions", notebook=NB, function="remask_positions", points=2,
    description="bool [B, L], True at the n = floor(L (T - t) / T) least confident positions of each row "
                "(confidence [B, L], t = iteration, T = iterations); ties go to the earlier position; "
                "n = 0 at t = T; ValueError for T < 1 or t outside [0, T]",
    groups={"core": 3, "ties": 1, "errors": 1},
    implemented_by=["labkit.refine.lowest_confidence", "labkit.refine.masked.lowest_confidence",
                    "labkit.refine.remask_count", "labkit.refine.masked.remask_count",
                    "labkit.refine.mask_predict_step", "labkit.refine.masked.mask_predict_step"],
    visible=[("one row, t=1 and t=3 of T=4", _remask_basic), ("two rows, T=3", _remask_rows)],
))


# ---- the self-refine loop's stopping rule ---------------------------------------------------------

def _stop_accept(f):
    expect_true(bool(f(True, 0, 3)), "accepted in round 0 of 3: stop")
    expect_true(not f(False, 0, 3), "rejected in round 0 of 3: revise again (do not stop)")


def _stop_budget(f):
    expect_true(not f(False, 2, 3), "rejected in round 2 of max_rounds=3: one more revision")
    expect_true(bool(f(False, 3, 3)), "rejected in round 3 of max_rounds=3: the budget is spent, stop")


register(Question(
    id="refine.should_stop", notebook=NB, function="should_stop", points=1,
    description="should_stop(accepted, round_index, max_rounds) with accepted the feedback's verdict (a bool): "
                "True when accepted, or when round_index >= max_rounds "
                "(round 0 judges the first draft, so max_rounds revisions are allowed); never reads labels; "
                "max_rounds = 0 stops at once",
    groups={"core": 2, "edges": 1},
    implemented_by=["labkit.refine.should_stop", "labkit.refine.self_refine.should_stop"],
    visible=[("accept stops, reject continues", _stop_accept), ("the round budget", _stop_budget)],
))
