"""Hidden cases and float64 references of notebooks/02_merging.ipynb (instructor only)."""
from __future__ import annotations

import torch

from labkit.grading import DeclaredCallable, add_hidden, expect_close, expect_equal, expect_raises, expect_true
from labkit.grading.bank.merge import closeness, scalar_models

D = torch.float64


def _t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def _sd(dtype=torch.float32, **tensors):
    return {k: torch.tensor(v, dtype=dtype) for k, v in tensors.items()}


# ---- references ------------------------------------------------------------------------------

def _avg_ref(state_dicts, weights):
    total = sum(float(w) for w in weights)
    return {k: (sum(float(w) * sd[k].double() for w, sd in zip(weights, state_dicts)) / total).to(v.dtype)
            for k, v in state_dicts[0].items()}


def _trim_ref(delta, density):
    k = max(1, int(density * delta.numel()))
    flat = delta.reshape(-1)
    keep = flat.abs().argsort(descending=True, stable=True)[:k]
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.view_as(delta)


def _dm_ref(deltas, sign):
    agree = (deltas.sign() == sign).to(deltas.dtype)
    count = agree.sum(0)
    return (deltas * agree).sum(0) / count.clamp(min=1)


def _visible_average():
    sds = [{"x": torch.randn(5, 3), "y": torch.randn(7)} for _ in range(3)]
    ref = _avg_ref(sds, [0.2, 0.5, 0.3])
    return {"x": [sd["x"] for sd in sds], "y": [sd["y"] for sd in sds], "expected_x": ref["x"], "expected_y": ref["y"]}


VISIBLE_DATA = {"merge.weighted_average/three random": _visible_average}


# ---- weighted averaging ----------------------------------------------------------------------

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


add_hidden("merge.weighted_average", [
    ("unnormalised weights", _avg_unnormalised, "core"), ("bfloat16 keeps its dtype", _avg_dtype, "dtype"),
    ("bad input raises ValueError", _avg_errors, "errors"),
])


# ---- task arithmetic -------------------------------------------------------------------------

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


add_hidden("merge.task_arithmetic", [
    ("three random task vectors", _ta_random, "core"), ("scale 0", _ta_zero, "core"),
    ("bad input raises ValueError", _ta_errors, "errors"),
])


# ---- TIES ------------------------------------------------------------------------------------

def _trim_random(f):
    d = torch.randn(8, 25)
    expect_close(f(d, 0.2), _trim_ref(d, 0.2), "top 20% of a random [8, 25] delta")


def _trim_density_one(f):
    d = torch.randn(10)
    expect_close(f(d, 1.0), d, "density 1 keeps everything")


def _trim_errors(f):
    expect_raises(ValueError, f, torch.randn(4), 0.0, what="density 0")
    expect_raises(ValueError, f, torch.randn(4), 1.5, what="density 1.5")


add_hidden("merge.ties_trim", [
    ("random delta, density 0.2", _trim_random, "core"), ("density 1", _trim_density_one, "core"),
    ("bad density raises ValueError", _trim_errors, "errors"),
])


def _elect_random(f):
    deltas = torch.randn(4, 6, 5)
    expect_close(f(deltas), torch.where(deltas.sum(0) >= 0, 1.0, -1.0), "elected signs of 4 random [6, 5] deltas")


def _elect_dtype(f):
    deltas = torch.randn(3, 7, dtype=D)
    got = f(deltas)
    expect_true(got.dtype == D, f"float64 deltas must give float64 signs, got {got.dtype}")
    expect_close(got, torch.where(deltas.sum(0) >= 0, 1.0, -1.0).to(D), "elected signs in float64")


add_hidden("merge.ties_elect", [("random [4, 6, 5]", _elect_random, "core"), ("keeps the dtype", _elect_dtype, "core")])


def _dm_random(f):
    deltas = torch.randn(5, 4, 3)
    deltas[deltas.abs() < 0.5] = 0.0
    sign = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    expect_close(f(deltas, sign), _dm_ref(deltas, sign), "disjoint mean of 5 random [4, 3] deltas")


def _dm_none_agree(f):
    deltas = torch.tensor([[-1.0, 0.0], [-2.0, 0.0]])
    expect_close(f(deltas, _t(1.0, 1.0)), _t(0.0, 0.0), "no agreeing delta gives 0 (no division by zero)")


add_hidden("merge.ties_disjoint_mean", [("random deltas", _dm_random, "core"),
                                        ("no agreeing delta", _dm_none_agree, "core")])


# ---- greedy soup -----------------------------------------------------------------------------

def _soup_ties_kept(f):
    soup, chosen = f(scalar_models(2.0, 0.0), DeclaredCallable("constant", value=1.0))
    expect_equal(len(chosen), 2, "number of chosen models when adding one leaves the score unchanged (>= keeps it)")
    expect_close(soup["w"], _t(1.0), "the soup's weight")


def _soup_uniform_average(f):
    soup, chosen = f(scalar_models(1.0, 1.2, 0.7, 1.3), closeness(1.0))
    # own scores: 1.0, 1.2 (-.2), 1.3 (-.3), 0.7 (-.3, later index): 1.0; +1.2 -> 1.1 worse than 1.0
    expect_equal(list(chosen), [0], "chosen indices")
    soup, chosen = f(scalar_models(0.6, 1.2, 1.6, 0.7), closeness(1.0))
    # own: 1.2 (-.2), 0.7 (-.3), 0.6 (-.4), 1.6 (-.6); 1.2 -> +0.7 = 0.95 keep -> +0.6 = .833 worse
    # -> +1.6 = 1.1667 worse
    expect_equal(list(chosen), [1, 3], "chosen indices")
    expect_close(soup["w"], _t(0.95), "the soup's weight (a uniform average of the chosen models)")


add_hidden("merge.greedy_soup", [("a tie keeps the model", _soup_ties_kept, "ties"),
                                 ("uniform average of the chosen", _soup_uniform_average, "core")])
