"""Questions of notebooks/03_moe.ipynb: top-k gating, the load-balancing loss, grouping (token, expert)
pairs by expert, and sort-based dispatch.

Expected values are hand-computed or come from the plain float64 references below (explicit loops,
no labkit.moe), except one case that compares with transformers' own load_balancing_loss_func.
"""
from __future__ import annotations

import math

import torch

from labkit.grading import Question, expect_close, expect_equal, expect_raises, expect_true, register

NB = "03_moe"
D = torch.float64


# ---- references -----------------------------------------------------------------------------------

def _gating_ref(logits, k):
    p = torch.softmax(logits.double(), -1)
    w, e = torch.topk(p, k, dim=-1)
    return w / w.sum(-1, keepdim=True), e


def _by_expert(weights, experts):
    """Rows reordered by expert id, so any order of the k chosen experts is accepted."""
    order = experts.argsort(-1)
    return weights.gather(-1, order), experts.gather(-1, order)


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
    w, e = _gating_ref(logits, K)
    return w, e


def _weights(E, D_, F_):
    return torch.randn(E, 2 * F_, D_, dtype=D) / math.sqrt(D_), torch.randn(E, D_, F_, dtype=D) / math.sqrt(F_)


# ---- top-k gating ----------------------------------------------------------------------------------

def _gate_hand(f):
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.1, 0.1, 0.4 - 1e-3]], dtype=D))
    w, e = _by_expert(*f(logits, 2))
    expect_equal(e.tolist(), [[2, 3], [0, 3]], "chosen experts (sorted by id)")
    expect_close(w, torch.tensor([[3 / 7, 4 / 7], [0.4 / 0.799, 0.399 / 0.799]], dtype=D),
                 "weights: the top-2 probabilities renormalised to sum to 1")


def _gate_random(f):
    logits = torch.randn(10, 8) * 2
    w, e = _by_expert(*f(logits, 2))
    rw, re = _by_expert(*_gating_ref(logits, 2))
    expect_equal(e.tolist(), re.tolist(), "chosen experts for 10 tokens, 8 experts, top-2")
    expect_close(w.double(), rw, "weights for 10 tokens, 8 experts, top-2", rtol=1e-5, atol=1e-6)


def _gate_top1(f):
    logits = torch.randn(6, 5, dtype=D)
    w, e = f(logits, 1)
    expect_equal(tuple(w.shape), (6, 1), "shape of the weights for top-1")
    expect_close(w, torch.ones(6, 1, dtype=D), "top-1 weights (one expert, renormalised: exactly 1)")
    expect_equal(e[:, 0].tolist(), logits.argmax(-1).tolist(), "top-1 experts")


def _gate_all(f):
    logits = torch.randn(4, 3, dtype=D)
    w, e = _by_expert(*f(logits, 3))
    expect_close(w, torch.softmax(logits, -1), "k = E: the weights are the full softmax")


def _gate_large(f):
    logits = torch.tensor([[1000.0, 999.0, -1000.0, 0.0]])
    w, e = f(logits, 2)
    expect_true(bool(torch.isfinite(w).all()), "weights of logits near ±1000 must be finite (use torch.softmax, "
                                               "not exp / sum)")
    w, e = _by_expert(w, e)
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


register(Question(
    id="moe.top_k_gating", notebook=NB, function="top_k_gating", points=2,
    description="Mixtral gate: softmax in float32, top-k, renormalise; (weights [T, k], experts [T, k])",
    visible=[("two tokens by hand", _gate_hand), ("random logits, top-2 of 8", _gate_random)],
    hidden=[("top-1 weights are 1", _gate_top1), ("k = E gives the softmax", _gate_all),
            ("logits near ±1000", _gate_large), ("bf16 logits give float32 weights", _gate_float32),
            ("k out of range raises ValueError", _gate_bad)],
))


# ---- load-balancing loss ---------------------------------------------------------------------------

def _lb_hand(f):
    ln3 = math.log(3.0)
    balanced = torch.tensor([[ln3, 0.0], [0.0, ln3]], dtype=D)  # p = (3/4, 1/4) and (1/4, 3/4)
    expect_close(f(balanced, 1), torch.tensor(1.0, dtype=D), "loss of 2 tokens on 2 experts, one each: "
                                                             "2 * (1/2 * 1/2 + 1/2 * 1/2)")
    collapsed = torch.tensor([[ln3, 0.0], [ln3, 0.0]], dtype=D)
    expect_close(f(collapsed, 1), torch.tensor(1.5, dtype=D), "loss when both tokens pick expert 0: "
                                                              "2 * (1 * 3/4 + 0 * 1/4)")


def _lb_transformers(f):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = torch.randn(32, 8)
    want = load_balancing_loss_func((logits,), 8, 2)
    expect_close(f(logits, 2).float(), want, "loss vs transformers' load_balancing_loss_func (32 tokens, top-2 of 8)")


def _lb_random(f):
    logits = torch.randn(40, 4, dtype=D) * 2
    expect_close(f(logits, 1), _lb_ref(logits, 1), "loss for 40 tokens, top-1 of 4")


def _lb_grad(f):
    logits = torch.randn(16, 6, dtype=D, requires_grad=True)
    got = torch.autograd.grad(f(logits, 2), logits)[0]
    ref_logits = logits.detach().clone().requires_grad_()
    want = torch.autograd.grad(_lb_ref(ref_logits, 2), ref_logits)[0]
    expect_close(got, want, "gradient w.r.t. the logits (only the mean probabilities P carry gradient; the "
                            "token fractions f are counts)")


def _lb_minimum(f):
    E, k = 4, 2
    logits = torch.zeros(8, E, dtype=D)
    for t in range(8):  # near-uniform probabilities, and every expert chosen 4 times
        logits[t, (2 * t) % E] = logits[t, (2 * t + 1) % E] = 1e-6
    expect_close(f(logits, k), torch.tensor(float(k), dtype=D), "loss of perfectly balanced routing (= k)",
                 rtol=1e-5, atol=1e-5)


register(Question(
    id="moe.load_balancing_loss", notebook=NB, function="load_balancing_loss", points=2,
    description="E * sum_e f_e P_e for router logits [T, E] and top_k (Switch / Mixtral)",
    visible=[("balanced and collapsed by hand", _lb_hand), ("equals transformers", _lb_transformers)],
    hidden=[("top-1 of 4, random", _lb_random), ("gradient flows through P only", _lb_grad),
            ("balanced routing gives k", _lb_minimum)],
))


# ---- grouping pairs by expert -----------------------------------------------------------------------

def _sort_hand(f):
    experts = torch.tensor([[2, 0], [0, 3], [2, 1]])
    order, counts = f(experts, 4)
    expect_equal(order.tolist(), [1, 2, 5, 0, 4, 3], "order of the flattened pairs (stable: ties keep their order)")
    expect_equal(counts.tolist(), [2, 1, 2, 1], "tokens per expert")


def _sort_random(f):
    experts = torch.stack([torch.randperm(8)[:2] for _ in range(50)])
    order, counts = f(experts, 8)
    flat = experts.reshape(-1)
    expect_equal(order.tolist(), sorted(range(flat.numel()), key=lambda i: (int(flat[i]), i)),
                 "order of 100 pairs over 8 experts")
    expect_equal(counts.tolist(), [int((flat == e).sum()) for e in range(8)], "tokens per expert")


def _sort_unused(f):
    experts = torch.tensor([[1, 0], [0, 2], [1, 2]])
    order, counts = f(experts, 6)
    expect_equal(counts.tolist(), [2, 2, 2, 0, 0, 0], "tokens per expert, experts 3-5 unused (length E)")


def _sort_single(f):
    order, counts = f(torch.tensor([[3]]), 4)
    expect_equal(order.tolist(), [0], "order for one token, top-1")
    expect_equal(counts.tolist(), [0, 0, 0, 1], "counts for one token, top-1")


register(Question(
    id="moe.sort_by_expert", notebook=NB, function="sort_by_expert", points=1,
    description="(order [T*K] stable sort of the flattened pairs by expert, counts [E]) from experts [T, K]",
    visible=[("three tokens by hand", _sort_hand), ("50 tokens, top-2 of 8", _sort_random)],
    hidden=[("unused experts still counted", _sort_unused), ("one token", _sort_single)],
))


# ---- sort-based dispatch ------------------------------------------------------------------------------

def _disp_case(f, T, E, K, D_, F_, starve=(), what=""):
    x = torch.randn(T, D_, dtype=D)
    w, e = _routing(T, E, K, starve)
    gate_up, down = _weights(E, D_, F_)
    got = f(x, e, w, gate_up, down)
    expect_equal(tuple(got.shape), (T, D_), f"output shape {what}")
    expect_close(got, _dispatch_ref(x, e, w, gate_up, down), f"output {what}")


def _disp_small(f):
    _disp_case(f, 5, 3, 2, 4, 6, what="(5 tokens, top-2 of 3 experts)")


def _disp_starved(f):
    _disp_case(f, 9, 4, 2, 8, 4, starve=(1,), what="(expert 1 receives no token)")


def _disp_single(f):
    _disp_case(f, 1, 4, 1, 6, 4, what="(one token, top-1)")


def _disp_odd(f):
    _disp_case(f, 7, 8, 3, 5, 3, starve=(0, 6), what="(7 tokens, top-3 of 8, D=5, F=3)")


def _disp_grad(f):
    x = torch.randn(6, 4, dtype=D)
    w, e = _routing(6, 3, 2)
    gate_up, down = _weights(3, 4, 5)
    inputs = [t.clone().requires_grad_() for t in (x, w, gate_up, down)]
    y = f(inputs[0], e, inputs[1], inputs[2], inputs[3])
    grads = torch.autograd.grad((y * torch.arange(24, dtype=D).view(6, 4)).sum(), inputs, allow_unused=True)
    ref_inputs = [t.clone().requires_grad_() for t in (x, w, gate_up, down)]
    y_ref = _dispatch_ref(ref_inputs[0], e, ref_inputs[1], ref_inputs[2], ref_inputs[3])
    ref = torch.autograd.grad((y_ref * torch.arange(24, dtype=D).view(6, 4)).sum(), ref_inputs)
    for name, g, r in zip(["x", "weights", "gate_up_proj", "down_proj"], grads, ref):
        expect_true(g is not None, f"no gradient reached {name}: keep the computation differentiable")
        expect_close(g, r, f"gradient w.r.t. {name}")


register(Question(
    id="moe.sort_dispatch", notebook=NB, function="sort_dispatch", points=3,
    description="y [T, D] = sum_j w_tj E_{e_tj}(x_t), computed by sorting pairs by expert, one matmul per "
                "expert segment, and scattering back",
    visible=[("5 tokens, top-2 of 3", _disp_small), ("an expert with no token", _disp_starved)],
    hidden=[("one token", _disp_single), ("odd sizes", _disp_odd), ("gradients", _disp_grad)],
))
