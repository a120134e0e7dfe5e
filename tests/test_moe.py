"""labkit.moe and labkit.moe_dispatch: backends against the reference loop, routers, losses against
transformers, capacity accounting, interop with transformers' MoE blocks, upcycling."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig
from transformers.models.mixtral.modeling_mixtral import (MixtralSparseMoeBlock, MixtralTopKRouter,
                                                          load_balancing_loss_func)

from labkit import moe
from labkit import moe_dispatch as md
from labkit.moe import MoELayer

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_case(T, D, F_, E, K, seed=0, starve=(), drop=(), dtype=torch.float32, device="cpu"):
    """Random tokens and experts; experts in ``starve`` get no tokens, slots in ``drop`` are dropped."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    gate_up = torch.randn(E, 2 * F_, D, generator=g) / math.sqrt(D)
    down = torch.randn(E, D, F_, generator=g) / math.sqrt(F_)
    logits = torch.randn(T, E, generator=g)
    for e in starve:
        logits[:, e] = -1e4
    weights, experts = moe.softmax_topk(logits, K)
    experts = experts.clone()
    weights = weights.clone()
    for t, j in drop:
        experts[t, j], weights[t, j] = E, 0.0
    to = dict(device=device)
    return (x.to(dtype=dtype, **to), experts.to(**to), weights.to(**to), gate_up.to(dtype=dtype, **to),
            down.to(dtype=dtype, **to))


def run_backend(backend, x, experts, weights, gate_up, down, capacity=None):
    x, weights, gate_up, down = (t.detach().clone().requires_grad_() for t in (x, weights, gate_up, down))
    y = md.dispatch(x, experts, weights, gate_up, down, backend=backend, capacity=capacity)
    g = torch.Generator().manual_seed(1)
    y.backward(torch.randn(y.shape, generator=g).to(y.device, y.dtype))
    return [y.detach(), x.grad, gate_up.grad, down.grad, weights.grad]


CASES = {
    "13 tokens, expert 3 starved, a dropped slot": dict(T=13, D=16, F_=8, E=5, K=2, starve=(3,), drop=((2, 1),)),
    "1 token, top-1": dict(T=1, D=16, F_=8, E=4, K=1),
    "7 tokens, top-3 of 8": dict(T=7, D=8, F_=12, E=8, K=3, starve=(0, 5)),
    "31 tokens, every slot of token 0 dropped": dict(T=31, D=16, F_=4, E=6, K=2, drop=((0, 0), (0, 1))),
}


@pytest.mark.parametrize("backend", ["sort", "grouped", "gather", "auto"])
@pytest.mark.parametrize("case", list(CASES))
def test_backend_matches_reference_loop(backend, case):
    args = make_case(**CASES[case])
    ref = run_backend("loop", *args)
    got = run_backend(backend, *args)
    for name, a, b in zip(["output", "grad x", "grad gate_up_proj", "grad down_proj", "grad weights"], got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{backend}: {name}")


def test_starved_expert_gets_zero_gradient_and_reference_is_hand_computed():
    x, experts, weights, gate_up, down = make_case(T=9, D=16, F_=8, E=4, K=2, starve=(1,))
    out = run_backend("grouped", x, experts, weights, gate_up, down)
    assert out[2][1].abs().max() == 0 and out[3][1].abs().max() == 0
    # float64 by hand: y_t = sum_j w_tj * down_e (silu(gate_e x) * up_e x)
    xd, gu, dn = x.double(), gate_up.double(), down.double()
    want = torch.zeros_like(xd)
    for t in range(x.shape[0]):
        for j in range(experts.shape[1]):
            e = int(experts[t, j])
            h = gu[e] @ xd[t]
            want[t] += float(weights[t, j]) * (dn[e] @ (F.silu(h[:8]) * h[8:]))
    torch.testing.assert_close(out[0].double(), want, rtol=1e-5, atol=1e-5)


def test_sort_backend_with_capacity_buffer_matches_loop():
    x, experts, weights, gate_up, down = make_case(T=20, D=16, F_=8, E=4, K=2)
    cap = moe.expert_capacity(20, 2, 4, 1.0)
    experts, weights, dropped = moe.apply_capacity(experts, weights, 4, cap)
    assert dropped.any()
    ref = run_backend("loop", x, experts, weights, gate_up, down)
    got = run_backend("sort", x, experts, weights, gate_up, down, capacity=cap)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_grouped_falls_back_on_unaligned_rows_and_empty_batch():
    args = make_case(T=5, D=6, F_=3, E=3, K=2)  # 6 * 4 bytes is not a multiple of 16
    assert not md.grouped_mm_supported(args[0], args[3], args[4])
    for a, b in zip(run_backend("grouped", *args), run_backend("loop", *args)):
        torch.testing.assert_close(a, b)
    x, experts, weights, gate_up, down = make_case(T=4, D=16, F_=8, E=3, K=2)
    y = md.dispatch(x[:0], experts[:0], weights[:0], gate_up, down)
    assert y.shape == (0, 16)


def test_choose_backend_on_cpu():
    x, experts, weights, gate_up, down = make_case(T=64, D=16, F_=8, E=4, K=2)
    assert md.choose_backend(x[:1], 2, gate_up, down) == "grouped"
    assert md.choose_backend(torch.randn(1000, 16), 2, gate_up, down) == "loop"
    assert md.choose_backend(torch.randn(1000, 16, requires_grad=True), 2, gate_up, down) == "grouped"
    assert md.choose_backend(x.double(), 2, gate_up.double(), down.double()) == "loop"


def test_dispatch_errors():
    x, experts, weights, gate_up, down = make_case(T=4, D=16, F_=8, E=3, K=2)
    with pytest.raises(ValueError, match="backend"):
        md.dispatch(x, experts, weights, gate_up, down, backend="fast")
    with pytest.raises(ValueError, match="x must be"):
        md.dispatch(x[None], experts, weights, gate_up, down)
    with pytest.raises(ValueError, match="hidden size"):
        md.dispatch(x[:, :8], experts, weights, gate_up, down)
    with pytest.raises(ValueError, match="down_proj"):
        md.dispatch(x, experts, weights, gate_up, down[:, :, :4])
    with pytest.raises(ValueError, match="weights"):
        md.dispatch(x, experts, weights[:, :1], gate_up, down)
    with pytest.raises(TypeError, match="experts"):
        md.dispatch(x, experts.float(), weights, gate_up, down)
    with pytest.raises(ValueError, match="experts must be"):
        md.dispatch(x, experts[:3], weights[:3], gate_up, down)


def test_sort_by_expert_offsets_and_stability():
    experts = torch.tensor([[2, 0], [0, 3], [2, 1], [4, 0]])  # 4 = sentinel for E = 4
    perm, sorted_e, offsets = md.sort_by_expert(experts, 4)
    assert sorted_e.tolist() == [0, 0, 0, 1, 2, 2, 3, 4]
    assert perm.tolist() == [1, 2, 7, 5, 0, 4, 3, 6]  # stable: ties keep their flat order
    assert offsets.tolist() == [3, 4, 6, 7]


# ------------------------------------------------------------------------------------------ routers
def test_softmax_topk_equals_transformers_mixtral_router():
    cfg = MixtralConfig(hidden_size=16, num_local_experts=6, num_experts_per_tok=2)
    router = MixtralTopKRouter(cfg)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(11, 16)
    logits, scores, indices = router(x)
    weights, experts = moe.softmax_topk(moe.router_logits(x, router.weight), 2)
    assert torch.equal(experts, indices)
    torch.testing.assert_close(weights, scores)
    torch.testing.assert_close(weights.sum(-1), torch.ones(11))


def test_topk_softmax_is_softmax_over_kept_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    w, e = moe.topk_softmax(logits, 2)
    assert e.tolist() == [[1, 2]]
    want = torch.tensor([math.exp(3), math.exp(2)]) / (math.exp(3) + math.exp(2))
    torch.testing.assert_close(w[0], want)
    w2, e2 = moe.softmax_topk(logits, 2)  # same experts and, renormalised, the same weights
    assert torch.equal(e, e2)
    torch.testing.assert_close(w, w2)
    w3, _ = moe.softmax_topk(logits, 2, renormalize=False)
    torch.testing.assert_close(w3, torch.softmax(logits, -1)[:, [1, 2]])


def test_noisy_gating_only_in_training():
    torch.manual_seed(0)
    r = moe.Router(8, 4, 2, "topk_softmax", noisy=True)
    x = torch.randn(64, 8)
    r.eval()
    assert torch.equal(r(x).logits, moe.router_logits(x, r.weight))
    r.train()
    noisy = r(x).logits - moe.router_logits(x, r.weight)
    # noise weights start at zero: std softplus(0) = log 2
    assert abs(noisy.std().item() - math.log(2)) < 0.1
    with pytest.raises(ValueError, match="noisy"):
        moe.Router(8, 4, 2, "softmax_topk", noisy=True)


def test_sigmoid_router_equals_transformers_deepseek_v3():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = DeepseekV3Config(hidden_size=16, n_routed_experts=8, num_experts_per_tok=3, n_group=1, topk_group=1,
                           routed_scaling_factor=2.5, norm_topk_prob=True)
    ref = DeepseekV3TopkRouter(cfg)
    torch.nn.init.normal_(ref.weight)
    ref.e_score_correction_bias.copy_(torch.linspace(-0.5, 0.5, 8))
    x = torch.randn(10, 16)
    _, ref_w, ref_e = ref(x)
    w, e = moe.sigmoid_topk(moe.router_logits(x, ref.weight), 3, ref.e_score_correction_bias, scale=2.5)
    order_ref, order = ref_e.argsort(-1), e.argsort(-1)
    assert torch.equal(e.gather(1, order), ref_e.gather(1, order_ref))
    torch.testing.assert_close(w.gather(1, order), ref_w.gather(1, order_ref))


def test_sigmoid_bias_moves_selection_but_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    _, e = moe.sigmoid_topk(logits, 1)
    assert e.item() == 0
    w, e = moe.sigmoid_topk(logits, 1, bias=torch.tensor([0.0, 0.0, 2.0]), renormalize=False)
    assert e.item() == 2 and abs(w.item() - 0.5) < 1e-7  # sigmoid(0), unbiased score
    bias = moe.update_selection_bias(torch.zeros(3), torch.tensor([6.0, 3.0, 0.0]), 0.1)
    torch.testing.assert_close(bias, torch.tensor([-0.1, 0.0, 0.1]))


def test_sigmoid_router_updates_bias_in_training_only():
    r = moe.Router(4, 4, 1, "sigmoid", bias_update_rate=0.01)
    with torch.no_grad():
        r.weight.zero_()
        r.weight[0, 0] = 5.0  # expert 0 wins every token
    x = torch.ones(8, 4)
    r.eval()
    r(x)
    assert r.selection_bias.abs().max() == 0
    r.train()
    r(x)
    torch.testing.assert_close(r.selection_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))


def test_expert_choice_balances_exactly():
    torch.manual_seed(0)
    logits = torch.randn(12, 4)
    w, e = moe.expert_choice(logits, capacity=3)
    assert e.shape == (12, 4)
    counts = [(e == k).sum().item() for k in range(4)]
    assert counts == [3, 3, 3, 3]
    probs = torch.softmax(logits, -1)
    for k in range(4):  # expert k took its 3 highest-scoring tokens
        chosen = set(torch.where(e[:, k] == k)[0].tolist())
        assert chosen == set(probs[:, k].topk(3).indices.tolist())
        torch.testing.assert_close(w[list(chosen), k], probs[list(chosen), k])
    assert (w[e == 4] == 0).all()
    with pytest.raises(ValueError, match="capacity"):
        moe.expert_choice(logits, capacity=13)


def test_router_math_is_float32_for_bf16_inputs():
    r = moe.Router(8, 4, 2).to(torch.bfloat16)
    out = r(torch.randn(5, 8, dtype=torch.bfloat16))
    assert out.logits.dtype == torch.float32 and out.weights.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast must not pull the router into bf16
        x = torch.randn(5, 8)
        assert moe.router_logits(x, torch.randn(4, 8)).dtype == torch.float32


def test_router_errors():
    with pytest.raises(ValueError, match="kind"):
        moe.Router(8, 4, 2, "hash")
    with pytest.raises(ValueError, match="top_k"):
        moe.Router(8, 4, 5)
    with pytest.raises(ValueError, match="top_k"):
        moe.softmax_topk(torch.randn(3, 4), 0)
    with pytest.raises(ValueError, match="logits"):
        moe.softmax_topk(torch.randn(4), 1)


# ---------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_equals_transformers(masked):
    torch.manual_seed(0)
    layers = tuple(torch.randn(2 * 9, 8, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    kw = dict(attention_mask=mask) if masked else {}
    want = load_balancing_loss_func(layers, 8, 2, **kw)
    got = moe.load_balancing_loss(layers, 2, **kw)
    torch.testing.assert_close(got, want)
    g1 = torch.autograd.grad(got, layers[0])[0]
    g2 = torch.autograd.grad(want, layers[0])[0]
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(moe.load_balancing_loss(layers[1], 2), load_balancing_loss_func((layers[1],), 8, 2))


def test_load_balancing_loss_values():
    E, K = 4, 2
    balanced = torch.zeros(8, E)  # uniform probabilities; ties broken so every expert gets 4 slots
    for t in range(8):
        balanced[t, (2 * t) % E] = balanced[t, (2 * t + 1) % E] = 1e-4
    assert abs(moe.load_balancing_loss(balanced, K).item() - K) < 1e-3
    collapsed = torch.tensor([[10.0, 9.0, 0.0, 0.0]]).repeat(8, 1)  # all to experts 0 and 1
    assert moe.load_balancing_loss(collapsed, K).item() > 1.9 * K
    with pytest.raises(ValueError, match="attention_mask"):
        moe.load_balancing_loss(balanced, K, attention_mask=torch.ones(3))


def test_router_z_loss():
    assert abs(moe.router_z_loss(torch.zeros(5, 4)).item() - math.log(4) ** 2) < 1e-6
    logits = torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=torch.float64)
    want = (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(moe.router_z_loss(logits), want)  # float64 stays float64


# ---------------------------------------------------------------------------- capacity and stats
def test_apply_capacity_first_choices_first():
    # token 0..3; first choices: 0,0,0,1; second choices: 1,1,0,0; capacity 2 per expert
    experts = torch.tensor([[0, 1], [0, 1], [0, 0], [1, 0]])
    experts[2, 1] = 2
    weights = torch.full((4, 2), 0.5)
    kept, w, dropped = moe.apply_capacity(experts, weights, 3, capacity=2)
    # expert 0: first choices of tokens 0, 1 fill it -> token 2's first choice and token 3's second drop
    # expert 1: token 3's first choice, then token 0's second; token 1's second drops
    assert kept.tolist() == [[0, 1], [0, 3], [3, 2], [1, 3]]
    assert dropped.tolist() == [[False, False], [False, True], [True, False], [False, True]]
    assert w[dropped].abs().sum() == 0 and (w[~dropped] == 0.5).all()
    stats = moe.routing_stats(kept, 3, dropped)
    assert stats["tokens_per_expert"] == [2, 2, 1] and stats["dropped"] == 3
    assert stats["drop_rate"] == 3 / 8 and stats["min"] == 1 and stats["max"] == 2
    assert abs(stats["cv"] - torch.tensor([2.0, 2, 1]).std(unbiased=False).item() / (5 / 3)) < 1e-6
    assert moe.expert_capacity(10, 2, 4, 1.25) == 7
    with pytest.raises(ValueError, match="capacity_factor"):
        moe.expert_capacity(10, 2, 4, 0)


def test_layer_capacity_drops_and_dropless():
    torch.manual_seed(0)
    layer = MoELayer(16, 8, 4, 2, capacity_factor=0.5, backend="sort")
    with torch.no_grad():
        layer.router.weight.normal_()
    x = torch.randn(3, 10, 16)
    y = layer(x)
    st = layer.stats()
    assert st["dropped"] > 0 and max(st["tokens_per_expert"]) <= moe.expert_capacity(30, 2, 4, 0.5)
    assert abs(st["drop_rate"] - st["dropped"] / 60) < 1e-12
    layer.capacity_factor = None
    layer.backend = "loop"
    y_free = layer(x)
    assert layer.stats()["dropped"] == 0 and not torch.allclose(y, y_free)
    # dropless reproduced by hand from the router's decision
    r = layer.router(x.reshape(-1, 16))
    want = md.dispatch_loop(x.reshape(-1, 16), r.experts, r.weights, layer.experts.gate_up_proj,
                            layer.experts.down_proj)
    torch.testing.assert_close(y_free.reshape(-1, 16), want)


# ---------------------------------------------------------------------------------------- layers
@pytest.mark.parametrize("kind", moe.ROUTERS)
def test_layer_runs_each_router_with_backward(kind):
    torch.manual_seed(0)
    layer = MoELayer(16, 8, 4, 2, kind, z_loss_coef=1e-3, num_shared_experts=1)
    x = torch.randn(2, 5, 16, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    (y.pow(2).mean() + layer.aux_loss).backward()
    assert layer.router.weight.grad.abs().sum() > 0 and x.grad is not None
    assert layer.last_experts.shape[:2] == (2, 5)


def test_layer_outputs_match_across_backends():
    torch.manual_seed(0)
    layer = MoELayer(16, 8, 6, 2, capacity_factor=1.0, init_std=0.3)
    x = torch.randn(4, 7, 16)
    outs = []
    for b in md.BACKENDS:
        layer.backend = b
        outs.append(layer(x))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-5)


def test_shared_experts_add_a_dense_block():
    torch.manual_seed(0)
    layer = MoELayer(16, 8, 4, 2, num_shared_experts=2, init_std=0.3)
    assert layer.shared_experts.gate_proj.out_features == 16
    x = torch.randn(6, 16)
    y = layer(x)
    shared = layer.shared_experts(x)
    layer.shared_experts = None
    torch.testing.assert_close(y, layer(x) + shared)
    counts = MoELayer(16, 8, 4, 2).num_params()
    assert counts["active"] == 4 * 16 + 2 * 3 * 16 * 8 and counts["total"] == 4 * 16 + 4 * 3 * 16 * 8


def test_layer_errors():
    with pytest.raises(ValueError, match="backend"):
        MoELayer(16, 8, 4, 2, backend="cuda")
    with pytest.raises(ValueError, match="capacity_factor"):
        MoELayer(16, 8, 4, 2, capacity_factor=-1)
    layer = MoELayer(16, 8, 4, 2)
    with pytest.raises(RuntimeError, match="forward"):
        layer.stats()
    with pytest.raises(ValueError, match="hidden size"):
        layer(torch.randn(3, 8))
    with pytest.raises(TypeError, match="not a transformers"):
        MoELayer.from_transformers(torch.nn.Linear(3, 3))


def test_moe_flops_saving_is_e_over_k():
    f = moe.moe_flops(100, 64, 128, 8, 2)
    assert f["saving"] == 4 and f["routed"] == 2 * 100 * 2 * 3 * 64 * 128


# ---------------------------------------------------------------------------------------- interop
def _randomise(module, std=0.3):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_from_mixtral_block_same_outputs_and_grads(impl):
    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=16, intermediate_size=8, num_local_experts=4, num_experts_per_tok=2)
    block = _randomise(MixtralSparseMoeBlock(cfg)).eval()
    block.experts.config._experts_implementation = impl
    layer = MoELayer.from_transformers(block)
    x = torch.randn(2, 9, 16)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = block(x1), layer(x2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y_ref.pow(2).sum().backward()
    y.pow(2).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.experts.gate_up_proj.grad, block.experts.gate_up_proj.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.router.weight.grad, block.gate.weight.grad, rtol=1e-4, atol=1e-5)


def test_from_qwen_moe_blocks():
    from transformers import Qwen2MoeConfig, Qwen3MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    q2 = Qwen2MoeConfig(hidden_size=16, moe_intermediate_size=8, shared_expert_intermediate_size=12,
                        num_experts=6, num_experts_per_tok=2, norm_topk_prob=False)
    b2 = _randomise(Qwen2MoeSparseMoeBlock(q2))
    l2 = MoELayer.from_transformers(b2)
    assert l2.shared_gate is not None and not l2.router.renormalize
    torch.testing.assert_close(l2(x), b2(x), rtol=1e-5, atol=1e-5)
    q3 = Qwen3MoeConfig(hidden_size=16, moe_intermediate_size=8, num_experts=6, num_experts_per_tok=3,
                        norm_topk_prob=True)
    b3 = _randomise(Qwen3MoeSparseMoeBlock(q3))
    torch.testing.assert_close(MoELayer.from_transformers(b3)(x), b3(x), rtol=1e-5, atol=1e-5)


def test_from_transformers_keeps_float64_exactly():
    """A float64 block converts without a float32 round trip: weights bit-identical, outputs to 1e-12."""
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=16, intermediate_size=8, num_local_experts=4, num_experts_per_tok=2)
    block = _randomise(MixtralSparseMoeBlock(cfg)).double().eval()
    with torch.no_grad():  # values that float32 cannot hold: a float32 copy would round them
        block.experts.gate_up_proj.add_(1e-12)
    layer = MoELayer.from_transformers(block)
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    assert torch.equal(layer.experts.gate_up_proj, block.experts.gate_up_proj)
    assert torch.equal(layer.experts.down_proj, block.experts.down_proj)
    assert torch.equal(layer.router.weight, block.gate.weight)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    # transformers' router rounds its softmax to float32, so the float64 reference is written out here
    x2 = x.reshape(-1, 16)
    probs = torch.softmax(x2 @ block.gate.weight.T, -1)
    w, e = probs.topk(2, -1)
    w = w / w.sum(-1, keepdim=True)
    ref = torch.zeros_like(x2)
    for t in range(len(x2)):
        for j in range(2):
            gu = block.experts.gate_up_proj[e[t, j]] @ x2[t]
            h = F.silu(gu[:8]) * gu[8:]
            ref[t] += w[t, j] * (block.experts.down_proj[e[t, j]] @ h)
    torch.testing.assert_close(layer(x).reshape(-1, 16), ref, rtol=0, atol=1e-12)
    assert (layer(x).reshape(-1, 16) - ref).abs().max() < (block(x).reshape(-1, 16) - ref).abs().max()
    q2 = Qwen2MoeConfig(hidden_size=16, moe_intermediate_size=8, shared_expert_intermediate_size=12,
                        num_experts=6, num_experts_per_tok=2)
    b2 = _randomise(Qwen2MoeSparseMoeBlock(q2)).double()
    l2 = MoELayer.from_transformers(b2)
    assert torch.equal(l2.shared_experts.up_proj.weight, b2.shared_expert.up_proj.weight)
    assert torch.equal(l2.shared_gate.weight, b2.shared_expert_gate.weight)
    assert {p.dtype for p in l2.parameters()} == {torch.float64}
    with pytest.raises(TypeError, match="dtype from the block"):
        MoELayer.from_transformers(block, dtype=torch.float32)


def test_from_transformers_builds_in_place_without_a_float32_cpu_copy():
    """A meta-device bf16 block gives a meta bf16 layer (a CPU float32 copy could not copy from meta),
    and converting a float64 block allocates no float32 tensor at all (every aten op's outputs watched)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    cfg = MixtralConfig(hidden_size=16, intermediate_size=8, num_local_experts=4, num_experts_per_tok=2)
    with torch.device("meta"):
        meta_block = MixtralSparseMoeBlock(cfg).to(torch.bfloat16)
    layer = MoELayer.from_transformers(meta_block)
    assert {(p.device.type, p.dtype) for p in layer.parameters()} == {("meta", torch.bfloat16)}

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.seen.append((str(func), t.device.type, t.dtype, t.numel()))
            return out

    block = MixtralSparseMoeBlock(cfg).double()
    with Allocations() as watch:
        MoELayer.from_transformers(block)
    expert_sized = [s for s in watch.seen if s[3] >= 4 * 8 * 16]
    assert expert_sized, "the watcher saw no expert-sized tensor: it is not watching"
    assert all(dtype == torch.float64 for _, _, dtype, _ in expert_sized), \
        [s for s in expert_sized if s[2] != torch.float64]


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def test_upcycled_layer_equals_dense_mlp():
    model = tiny_llama()
    mlp = model.model.layers[0].mlp
    x = torch.randn(3, 4, 16)
    for kind in ("softmax_topk", "topk_softmax", "sigmoid"):
        layer = moe.upcycle_mlp(mlp, num_experts=4, top_k=2, router=kind)
        torch.testing.assert_close(layer(x), mlp(x), rtol=1e-5, atol=1e-6)
    noisy = moe.upcycle_mlp(mlp, 4, 2, noise_std=0.1, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(noisy.experts.gate_up_proj[0], noisy.experts.gate_up_proj[1])


def test_moefy_llama_keeps_logits_and_trains():
    model = tiny_llama()
    ids = torch.randint(0, 32, (2, 6))
    dense_logits = model(ids).logits
    moe.moefy(model, num_experts=4, top_k=2)
    assert len(moe.moe_layers(model)) == 2
    torch.testing.assert_close(model(ids).logits, dense_logits, rtol=1e-5, atol=1e-5)
    model.train()
    out = model(ids, labels=ids)
    (out.loss + moe.moe_aux_loss(model)).backward()
    assert model.model.layers[1].mlp.router.weight.grad.abs().sum() > 0
    fresh = moe.moefy(tiny_llama(), 4, 1, layers=[1], upcycle=False, intermediate_size=6)
    assert fresh.model.layers[1].mlp.experts.gate_up_proj.shape == (4, 12, 16)
    assert not isinstance(fresh.model.layers[0].mlp, MoELayer)
    with pytest.raises(ValueError, match="no MoELayer"):
        moe.moe_aux_loss(tiny_llama())
    with pytest.raises(TypeError, match="model.layers"):
        moe.moefy(torch.nn.Linear(2, 2))


def test_to_mixtral_same_logits_and_saves(tmp_path):
    from transformers import MixtralForCausalLM

    model = moe.moefy(tiny_llama(), num_experts=4, top_k=2, noise_std=0.2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in moe.moe_layers(model):
            layer.router.weight.normal_()
    ids = torch.randint(0, 32, (2, 7))
    mixtral = moe.to_mixtral(model)
    torch.testing.assert_close(mixtral(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    mixtral.save_pretrained(tmp_path)
    again = MixtralForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="MoELayer"):
        moe.to_mixtral(moe.moefy(tiny_llama(), 4, 2, layers=[0]))
    with pytest.raises(ValueError, match="Mixtral needs"):
        moe.to_mixtral(moe.moefy(tiny_llama(), 4, 2, num_shared_experts=1))


def test_moefy_kit_llama_with_kit_tokenizer_routes_and_generates():
    from labkit.data import generate_answers
    from labkit.models import make_llama

    model = moe.moefy(make_llama("tiny", seed=0), num_experts=4, top_k=2, router="sigmoid").eval()
    answers = generate_answers(model, ["c:abc=", "r:ab="], max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    last = moe.moe_layers(model)[0].last_experts
    assert last.shape[0] == 2 and last.shape[-1] == 2  # [B, 1, K] of the last decoding step


class CharTokenizer:
    """Just enough of a tokenizer for prompt_router_weights: left padding with id 0."""

    def __call__(self, texts, return_tensors="pt", padding=True):
        from transformers import BatchEncoding

        ids = [[3 + (ord(c) % 29) for c in t] for t in texts]
        n = max(map(len, ids))
        input_ids = torch.tensor([[0] * (n - len(i)) + i for i in ids])
        mask = torch.tensor([[0] * (n - len(i)) + [1] * len(i) for i in ids])
        return BatchEncoding({"input_ids": input_ids, "attention_mask": mask})


def test_moe_from_dense_finetunes():
    base, ft_a, ft_b = tiny_llama(0), tiny_llama(1), tiny_llama(2)
    gates = moe.prompt_router_weights(base, CharTokenizer(), [["abc", "abcd"], ["xyz"]], negative_prompts=[[], ["abc"]])
    assert gates.shape == (2, 2, 16)
    torch.testing.assert_close(gates.norm(dim=-1), torch.ones(2, 2))
    ids = torch.randint(0, 32, (2, 5))
    same = moe.moe_from_dense(base, [base, base], gates, top_k=1)  # identical experts: the base model
    torch.testing.assert_close(same(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)
    mixed = moe.moe_from_dense(base, [ft_a, ft_b], gates, top_k=1)
    layer = mixed.model.layers[1].mlp
    torch.testing.assert_close(layer.experts.down_proj[1], ft_b.model.layers[1].mlp.down_proj.weight)
    torch.testing.assert_close(mixed.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    with pytest.raises(ValueError, match="router_weights"):
        moe.moe_from_dense(base, [ft_a], gates)
    with pytest.raises(ValueError, match="prompts"):
        moe.prompt_router_weights(base, CharTokenizer(), [["a"], []])


# ------------------------------------------------------------------------------------------- GPU
@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sort", "grouped", "gather", "auto"])
def test_cuda_backends_match_loop_bf16(backend):
    args = make_case(T=300, D=64, F_=128, E=8, K=2, starve=(4,), drop=((0, 1),), dtype=torch.bfloat16, device="cuda")
    ref = run_backend("loop", *args)
    got = run_backend(backend, *args)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@needs_cuda
@pytest.mark.gpu
def test_cuda_auto_uses_grouped_gemm_for_prefill():
    x, experts, weights, gate_up, down = make_case(T=512, D=64, F_=128, E=8, K=2, dtype=torch.bfloat16, device="cuda")
    if torch.cuda.get_device_capability() >= (8, 0):
        assert md.choose_backend(x, 2, gate_up, down) == "grouped"
    assert md.choose_backend(x[:2].float(), 2, gate_up.float(), down.float()) == "gather"


# ---------------------------------------------------------------------------------------- layout
def test_package_layout_methods_never_import_tooling():
    """routing, layer and backends are what a student reads: no conversion, no distributed code in them."""
    import ast
    import pathlib

    import labkit.moe.backends

    root = pathlib.Path(moe.__file__).parent
    for method in ("routing", "layer", "backends"):
        tree = ast.parse((root / f"{method}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not imported & {"convert", "parallel", "transformers", "torch.distributed"}, (method, imported)
    assert md is labkit.moe.backends  # the old module name is the same module, not a copy
    assert moe.dispatch is md.dispatch and callable(moe.dispatch)
