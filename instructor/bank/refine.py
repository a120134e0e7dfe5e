"""Hidden cases and float64 references of notebooks/05_refinement.ipynb (instructor only).

References are written independently of labkit.refine and of the notebook's solutions: plain loops
and sorts in float64.
"""
from __future__ import annotations

import torch

from labkit.grading import add_hidden, expect_close, expect_equal, expect_raises, expect_true

D = torch.float64


# ---- references -------------------------------------------------------------------------------

def _stack_ref(members):
    rows = []
    for n in range(members[0].shape[0]):
        row = []
        for m in members:
            row += m[n].tolist()
        rows.append(row)
    return torch.tensor(rows, dtype=members[0].dtype)


def _remask_ref(conf, t, T):
    B, L = conf.shape
    n = (L * (T - t)) // T
    out = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        # least confident first; ties: the earlier position (sort key (value, index))
        order = sorted(range(L), key=lambda j: (conf[b, j].item(), j))
        for j in order[:n]:
            out[b, j] = True
    return out


# ---- stacking inputs --------------------------------------------------------------------------

def _stack_random(f):
    g = torch.Generator().manual_seed(5)
    members = [torch.softmax(torch.randn(7, 10, generator=g, dtype=D), -1) for _ in range(4)]
    expect_close(f(members), _stack_ref(members), "four members [7, 10] -> [7, 40] (float64 kept)")


def _stack_tensor(f):
    g = torch.Generator().manual_seed(6)
    probs = torch.softmax(torch.randn(3, 5, 4, generator=g), -1)
    expect_close(f(probs), _stack_ref(list(probs)), "one tensor [M=3, N=5, C=4] -> [5, 12]")


def _stack_one(f):
    p = torch.tensor([[0.25, 0.5, 0.25], [0.6, 0.1, 0.3]])
    expect_close(f([p]), p, "one member: its own probabilities")


def _stack_bad(f):
    expect_raises(ValueError, f, [torch.rand(4, 3), torch.rand(5, 3)], what="members with 4 and 5 rows")
    expect_raises(ValueError, f, [torch.rand(4, 3), torch.rand(4, 2)], what="members with 3 and 2 classes")


add_hidden("refine.stacking_inputs", [
    ("four members, float64", _stack_random), ("one member", _stack_one),
    ("one [M, N, C] tensor", _stack_tensor, "tensor"), ("members of different shapes", _stack_bad, "errors"),
])


# ---- re-masked positions ------------------------------------------------------------------------

def _remask_random(f):
    g = torch.Generator().manual_seed(7)
    conf = torch.rand(6, 8, generator=g, dtype=D)
    for t in (1, 2, 5, 9):
        expect_equal(f(conf, t, 10), _remask_ref(conf, t, 10), f"B=6, L=8, T=10, t={t}")


def _remask_last(f):
    conf = torch.rand(3, 8, dtype=D)
    expect_equal(f(conf, 4, 4), torch.zeros(3, 8, dtype=torch.bool), "t = T: nothing is re-masked")
    expect_equal(f(conf, 0, 4), torch.ones(3, 8, dtype=torch.bool), "t = 0: everything is masked")


def _remask_ties(f):
    conf = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.5, 0.5], [0.9, 0.2, 0.2, 0.9, 0.2, 0.1]], dtype=D)
    expect_equal(f(conf, 1, 2), _remask_ref(conf, 1, 2), "ties (equal confidence) go to the earlier position")


def _remask_bad(f):
    conf = torch.rand(2, 8, dtype=D)
    expect_raises(ValueError, f, conf, 1, 0, what="iterations T = 0")
    expect_raises(ValueError, f, conf, 5, 4, what="t = 5 > T = 4")


add_hidden("refine.remask_positions", [
    ("random confidences, several t", _remask_random), ("t = T and t = 0", _remask_last),
    ("ties", _remask_ties, "ties"), ("bad t or T", _remask_bad, "errors"),
])


# ---- stopping rule -------------------------------------------------------------------------------

def _stop_grid(f):
    for r in range(5):
        for accept in (True, False):
            want = accept or r >= 4
            expect_true(bool(f(accept, r, 4)) == want,
                        f"accept={accept}, round {r} of max_rounds=4: should_stop must be {want}")


def _stop_zero(f):
    expect_true(bool(f(False, 0, 0)), "max_rounds=0: stop after judging the first draft")
    expect_true(isinstance(f(False, 1, 3), bool), "return a bool")


add_hidden("refine.should_stop", [("every round and verdict", _stop_grid), ("max_rounds = 0, a bool", _stop_zero, "edges")])
