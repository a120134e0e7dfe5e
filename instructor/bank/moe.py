"""Hidden cases and float64 references of notebooks/03_moe.ipynb (instructor only).

References use explicit loops, no labkit.moe; one stored visible value comes from transformers' own
load_balancing_loss_func.
"""
from __future__ import annotations

import math

import torch

from labkit.grading import add_hidden, call_with_grad, expect_close, expect_equal, expect_raises, expect_true
from labkit.grading.bank.moe import by_expert

D = torch.float64


# ---- references -----------------------------------------------------------------------------------

def _gating_ref(logits, k):
    p = torch.softmax(logits.double(), -1)
    w, e = torch.topk(p, k, dim=-1)
    return w / w.sum(-1, keepdim=True), e


def _lb_ref(logits, k):
    T, E = logits.shape
    p = torch.softmax(logits.double(), -1)
    chosen = torch.topk(p, k, dim=-1).indices
    f = torch.zeros(E, dtype=D)
    for t in range(T):
        for e in chosen[t].tolist():
            f[e] += 1.0 / T
    return E * (f * p.mean(0)).sum()


def _expert_ref(x, gate_up, down, e):
    F_ = down.shape[2]
    h = gate_up[e].double() @ x.double()
    return down[e].double() @ (torch.nn.functional.silu(h[:F_]) * h[F_:])


def _dispatch_ref(x, experts, weights, gate_up, down):
    y = torch.zeros(x.shape, dtype=D)
    for t in range(x.shape[0]):
        for j in range(experts.shape[1]):
            y[t] += weights[t, j].double() * _expert_ref(x[t], gate_up, down, int(experts[t, j]))
    return y


def _routing(T, E, K, starve=()):
    logits = torch.randn(T, E, dtype=D)
    for e in starve:
        logits[:, e] = -1e9
    return _gating_ref(logits, K)


def _weights(E, D_, F_):
    return torch.randn(E, 2 * F_, D_, dtype=D) / math.sqrt(D_), torch.randn(E, D_, F_, dtype=D) / math.sqrt(F_)


def _dispatch_data(T, E, K, D_, F_, starve=()):
    x = torch.randn(T, D_, dtype=D)
    w, e = _routing(T, E, K, starve)
    gate_up, down = _weights(E, D_, F_)
    return {"x": x, "experts": e, "weights": w, "gate_up": gate_up, "down": down,
            "expected": _dispatch_ref(x, e, w, gate_up, down)}


def _visible_gate():
    logits = torch.randn(10, 8) * 2
    w, e = by_expert(*_gating_ref(logits, 2))
    return {"logits": logits, "weights": w, "experts": e}


def _visible_lb():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = torch.randn(32, 8)
    return {"logits": logits, "expected": load_balancing_loss_func((logits,), 8, 2)}


def _visible_sort():
    experts = torch.stack([torch.randperm(8)[:2] for _ in range(50)])
    flat = experts.reshape(-1)
    order = torch.tensor(sorted(range(flat.numel()), key=lambda i: (int(flat[i]), i)))
    counts = torch.tensor([int((flat == e).sum()) for e in range(8)])
    return {"experts": experts, "order": order, "counts": counts}


VISIBLE_DATA = {
    "moe.top_k_gating/random": _visible_gate,
    "moe.load_balancing_loss/transformers": _visible_lb,
    "moe.sort_by_expert/random": _visible_sort,
    "moe.sort_dispatch/small": lambda: _dispatch_data(5, 3, 2, 4, 6),
    "moe.sort_dispatch/starved": lambda: _dispatch_data(9, 4, 2, 8, 4, starve=(1,)),
}


# ---- top-k gating ----------------------------------------------------------------------------------

def _gate_top1(f):
    logits = torch.randn(6, 5, dtype=D)
    w, e = f(logits, 1)
    expect_equal(tuple(w.shape), (6, 1), "shape of the weights for top-1")
    expect_close(w, torch.ones(6, 1, dtype=D), "top-1 weights (one expert, renormalised: exactly 1)", check_dtype=False)
    expect_equal(e[:, 0].tolist(), logits.argmax(-1).tolist(), "top-1 experts")


def _gate_all(f):
    logits = torch.randn(4, 3, dtype=D)
    w, e = by_expert(*f(logits, 3))
    expect_close(w, torch.softmax(logits, -1), "k = E: the weights are the full softmax", check_dtype=False)


def _gate_large(f):
    logits = torch.tensor([[1000.0, 999.0, -1000.0, 0.0]])
    w, e = f(logits, 2)
    expect_true(bool(torch.isfinite(w).all()), "weights of logits near ±1000 must be finite (use torch.softmax, "
                                               "not exp / sum)")
    w, e = by_expert(w, e)
    expect_close(w.double(), torch.tensor([[1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))]], dtype=D),
                 "weights of logits near ±1000", rtol=1e-5, atol=1e-6)


def _gate_float32(f):
    logits = (torch.randn(5, 4) * 4).to(torch.bfloat16)
    w, _ = f(logits, 2)
    expect_equal(w.dtype, torch.float32, "dtype of the weights for bf16 logits (router math runs in float32)")


def _gate_bad(f):
    logits = torch.randn(3, 4)
    expect_raises(ValueError, f, logits, 0, what="k = 0")
    expect_raises(ValueError, f, logits, 5, what="k = 5 > 4 experts")


add_hidden("moe.top_k_gating", [
    ("top-1 weights are 1", _gate_top1, "core"), ("k = E gives the softmax", _gate_all, "core"),
    ("logits near ±1000", _gate_large, "stable"), ("bf16 logits give float32 weights", _gate_float32, "dtype"),
    ("k out of range raises ValueError", _gate_bad, "errors"),
])


# ---- load-balancing loss ---------------------------------------------------------------------------

def _lb_random(f):
    logits = torch.randn(40, 4, dtype=D) * 2
    expect_close(f(logits, 1), _lb_ref(logits, 1), "loss for 40 tokens, top-1 of 4", check_dtype=False)


def _lb_grad(f):
    logits = torch.randn(16, 6, dtype=D)
    _, grads = call_with_grad(f, (logits, 2), wrt=(0,))
    expect_true(grads is not None and grads[0] is not None, "no gradient reached the logits: keep the mean "
                                                            "probabilities P differentiable")
    ref_logits = logits.detach().clone().requires_grad_()
    want = torch.autograd.grad(_lb_ref(ref_logits, 2), ref_logits)[0]
    expect_close(grads[0], want, "gradient w.r.t. the logits (only the mean probabilities P carry gradient; the "
                                 "token fractions f are counts)", check_dtype=False)


def _lb_minimum(f):
    E, k = 4, 2
    logits = torch.zeros(8, E, dtype=D)
    for t in range(8):  # near-uniform probabilities, and every expert chosen 4 times
        logits[t, (2 * t) % E] = logits[t, (2 * t + 1) % E] = 1e-6
    expect_close(f(logits, k), torch.tensor(float(k), dtype=D), "loss of perfectly balanced routing (= k)",
                 rtol=1e-5, atol=1e-5, check_dtype=False)


add_hidden("moe.load_balancing_loss", [
    ("top-1 of 4, random", _lb_random, "core"), ("balanced routing gives k", _lb_minimum, "core"),
    ("gradient flows through P only", _lb_grad, "gradient"),
])


# ---- grouping pairs by expert -----------------------------------------------------------------------

def _sort_unused(f):
    experts = torch.tensor([[1, 0], [0, 2], [1, 2]])
    order, counts = f(experts, 6)
    expect_equal(counts.tolist(), [2, 2, 2, 0, 0, 0], "tokens per expert, experts 3-5 unused (length E)")


def _sort_single(f):
    order, counts = f(torch.tensor([[3]]), 4)
    expect_equal(order.tolist(), [0], "order for one token, top-1")
    expect_equal(counts.tolist(), [0, 0, 0, 1], "counts for one token, top-1")


add_hidden("moe.sort_by_expert", [("unused experts still counted", _sort_unused, "core"),
                                  ("one token", _sort_single, "core")])


# ---- sort-based dispatch ------------------------------------------------------------------------------

def _disp_case(f, T, E, K, D_, F_, starve=(), what=""):
    d = _dispatch_data(T, E, K, D_, F_, starve)
    got = f(d["x"], d["experts"], d["weights"], d["gate_up"], d["down"])
    expect_equal(tuple(got.shape), (T, D_), f"output shape {what}")
    expect_close(got, d["expected"], f"output {what}")


def _disp_single(f):
    _disp_case(f, 1, 4, 1, 6, 4, what="(one token, top-1)")


def _disp_odd(f):
    _disp_case(f, 7, 8, 3, 5, 3, starve=(0, 6), what="(7 tokens, top-3 of 8, D=5, F=3)")


def _disp_grad(f):
    x = torch.randn(6, 4, dtype=D)
    w, e = _routing(6, 3, 2)
    gate_up, down = _weights(3, 4, 5)
    weight = torch.arange(24, dtype=D).view(6, 4)
    _, grads = call_with_grad(f, (x, e, w, gate_up, down), wrt=(0, 2, 3, 4), weight=weight)
    expect_true(grads is not None, "the answer did not return a tensor")
    ref_inputs = [t.clone().requires_grad_() for t in (x, w, gate_up, down)]
    y_ref = _dispatch_ref(ref_inputs[0], e, ref_inputs[1], ref_inputs[2], ref_inputs[3])
    ref = torch.autograd.grad((y_ref * weight).sum(), ref_inputs)
    for name, g, r in zip(["x", "weights", "gate_up_proj", "down_proj"], grads, ref):
        expect_true(g is not None, f"no gradient reached {name}: keep the computation differentiable")
        expect_close(g, r, f"gradient w.r.t. {name}")


add_hidden("moe.sort_dispatch", [
    ("one token", _disp_single, "core"), ("odd sizes", _disp_odd, "core"), ("gradients", _disp_grad, "gradient"),
])
