"""Visible cases of notebooks/03_moe.ipynb: top-k gating, the load-balancing loss, grouping (token,
expert) pairs by expert, and sort-based dispatch.

Expected values are hand-computed or stored data (``visible_data.json``, including one value of
transformers' own load_balancing_loss_func); the hidden cases and the float64 references are in the
instructor bank (instructor/bank/moe.py).
"""
from __future__ import annotations

import math

import torch

from labkit.grading import Question, expect_close, expect_equal, register
from labkit.grading.bank._data import visible

NB = "03_moe"
D = torch.float64


def by_expert(weights, experts):
    """Rows reordered by expert id, so any order of the k chosen experts is accepted."""
    order = experts.argsort(-1)
    return weights.gather(-1, order), experts.gather(-1, order)


# ---- top-k gating ----------------------------------------------------------------------------------

def _gate_hand(f):
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.1, 0.1, 0.4 - 1e-3]], dtype=D))
    w, e = by_expert(*f(logits, 2))
    expect_equal(e.tolist(), [[2, 3], [0, 3]], "chosen experts (sorted by id)")
    expect_close(w, torch.tensor([[3 / 7, 4 / 7], [0.4 / 0.799, 0.399 / 0.799]], dtype=D), "weights: the top-2 "
                 "probabilities renormalised to sum to 1", check_dtype=False)


def _gate_random(f):
    d = visible("moe.top_k_gating/random")
    w, e = by_expert(*f(d["logits"], 2))
    expect_equal(e.tolist(), d["experts"].tolist(), "chosen experts for 10 tokens, 8 experts, top-2")
    expect_close(w.double(), d["weights"], "weights for 10 tokens, 8 experts, top-2", rtol=1e-5, atol=1e-6)


register(Question(
    id="moe.top_k_gating", notebook=NB, function="top_k_gating", points=2,
    description="Mixtral gate: softmax in float32 (float32 weights for float32 or lower-precision logits), "
                "top-k, renormalise; (weights [T, k], experts [T, k]); ValueError unless 1 <= k <= E",
    groups={"core": 3, "stable": 1, "dtype": 1, "errors": 1},
    implemented_by=["labkit.moe.softmax_topk", "labkit.moe.topk_softmax", "labkit.moe.Router",
                    "transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock"],
    visible=[("two tokens by hand", _gate_hand), ("random logits, top-2 of 8", _gate_random)],
))


# ---- load-balancing loss ---------------------------------------------------------------------------

def _lb_hand(f):
    ln3 = math.log(3.0)
    balanced = torch.tensor([[ln3, 0.0], [0.0, ln3]], dtype=D)  # p = (3/4, 1/4) and (1/4, 3/4)
    # float32 or float64 results are both accepted (the text does not fix the dtype of the loss)
    expect_close(f(balanced, 1), torch.tensor(1.0, dtype=D), "loss of 2 tokens on 2 experts, one each: "
                 "2 * (1/2 * 1/2 + 1/2 * 1/2)", check_dtype=False)
    collapsed = torch.tensor([[ln3, 0.0], [ln3, 0.0]], dtype=D)
    expect_close(f(collapsed, 1), torch.tensor(1.5, dtype=D), "loss when both tokens pick expert 0: "
                 "2 * (1 * 3/4 + 0 * 1/4)", check_dtype=False)


def _lb_transformers(f):
    d = visible("moe.load_balancing_loss/transformers")
    expect_close(f(d["logits"], 2).float(), d["expected"],
                 "loss vs transformers' load_balancing_loss_func (32 tokens, top-2 of 8)")


register(Question(
    id="moe.load_balancing_loss", notebook=NB, function="load_balancing_loss", points=2,
    description="E * sum_e f_e P_e for router logits [T, E] and top_k (Switch / Mixtral); f_e are counts "
                "(no gradient), P_e mean probabilities (the gradient flows through them)",
    groups={"core": 3, "gradient": 1},
    implemented_by=["labkit.moe.load_balancing_loss", "labkit.moe.moe_aux_loss",
                    "transformers.models.mixtral.modeling_mixtral.load_balancing_loss_func"],
    visible=[("balanced and collapsed by hand", _lb_hand), ("equals transformers", _lb_transformers)],
))


# ---- grouping pairs by expert -----------------------------------------------------------------------

def _sort_hand(f):
    experts = torch.tensor([[2, 0], [0, 3], [2, 1]])
    order, counts = f(experts, 4)
    expect_equal(order.tolist(), [1, 2, 5, 0, 4, 3], "order of the flattened pairs (stable: ties keep their order)")
    expect_equal(counts.tolist(), [2, 1, 2, 1], "tokens per expert")


def _sort_random(f):
    d = visible("moe.sort_by_expert/random")
    order, counts = f(d["experts"], 8)
    expect_equal(order.tolist(), d["order"].tolist(), "order of 100 pairs over 8 experts")
    expect_equal(counts.tolist(), d["counts"].tolist(), "tokens per expert")


register(Question(
    id="moe.sort_by_expert", notebook=NB, function="sort_by_expert", points=1,
    description="(order [T*K] stable sort of the flattened pairs by expert, counts [E] including unused "
                "experts) from experts [T, K]",
    groups={"core": 1},
    implemented_by=["labkit.moe_dispatch.sort_by_expert", "labkit.moe_dispatch.dispatch_sort"],
    visible=[("three tokens by hand", _sort_hand), ("50 tokens, top-2 of 8", _sort_random)],
))


# ---- sort-based dispatch ------------------------------------------------------------------------------

def _disp_stored(f, key, what):
    d = visible(key)
    got = f(d["x"], d["experts"], d["weights"], d["gate_up"], d["down"])
    expect_equal(tuple(got.shape), tuple(d["x"].shape), f"output shape {what}")
    expect_close(got, d["expected"], f"output {what}")


def _disp_small(f):
    # top-2: every token appears twice in the sorted pairs, so a scatter that loses writes
    # (y[token_idx] += rows, where token_idx repeats) fails here
    _disp_stored(f, "moe.sort_dispatch/small", "(5 tokens, top-2 of 3 experts)")


def _disp_starved(f):
    _disp_stored(f, "moe.sort_dispatch/starved", "(expert 1 receives no token)")


register(Question(
    id="moe.sort_dispatch", notebook=NB, function="sort_dispatch", points=3,
    description="y [T, D] = sum_j w_tj E_{e_tj}(x_t), computed by sorting pairs by expert, one matmul per "
                "expert segment, and scattering back with index_add_ (a token appears once per chosen expert); "
                "differentiable in x, the weights and both projections",
    groups={"core": 3, "gradient": 1},
    implemented_by=["labkit.moe_dispatch.dispatch", "labkit.moe_dispatch.dispatch_sort",
                    "labkit.moe_dispatch.dispatch_loop", "labkit.moe_dispatch.dispatch_grouped",
                    "labkit.moe_dispatch.dispatch_gather", "labkit.moe.MoELayer"],
    visible=[("5 tokens, top-2 of 3", _disp_small), ("an expert with no token", _disp_starved)],
))
