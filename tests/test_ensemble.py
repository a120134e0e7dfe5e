"""Tests for labkit.ensemble: hand-computed float64 golden values, a brute-force decoding reference,
scikit-learn consistency for voting/stacking, and every error path."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from labkit import ensemble as ens

D = torch.float64


def logits_of(probs, shift=0.0):
    """Logits whose softmax is ``probs`` (plus an arbitrary shift, which softmax must ignore)."""
    return torch.log(torch.tensor(probs, dtype=D)) + shift


# ------------------------------------------------------------------------------------------------
# 1. combination rules


def test_linear_golden_by_hand():
    a, b = logits_of([0.5, 0.25, 0.25], 3.0), logits_of([0.1, 0.2, 0.7], -1.0)
    got = ens.linear_interpolate([a, b], [0.3, 0.7])
    # 0.3 * [.5 .25 .25] + 0.7 * [.1 .2 .7]
    expected = torch.tensor([0.22, 0.215, 0.565], dtype=D)
    torch.testing.assert_close(got.exp(), expected, rtol=0, atol=1e-15)
    assert got.dtype == D
    # a stacked tensor with the member axis first gives the same answer
    torch.testing.assert_close(ens.linear_interpolate(torch.stack([a, b]), torch.tensor([0.3, 0.7])), got)


def test_log_linear_golden_by_hand():
    a, b = logits_of([1 / 2, 1 / 4, 1 / 4], 2.0), logits_of([1 / 8, 1 / 2, 3 / 8])
    # weights (1, 1): product [1/16, 1/8, 3/32] renormalised = [2/9, 4/9, 3/9]
    got = ens.log_linear_interpolate([a, b], [1.0, 1.0])
    torch.testing.assert_close(got.exp(), torch.tensor([2 / 9, 4 / 9, 3 / 9], dtype=D), rtol=0, atol=1e-15)
    # weights (2, -1): p_a^2 / p_b = [2, 1/8, 1/6], sum 55/24 -> [48/55, 3/55, 4/55]
    got = ens.log_linear_interpolate([a, b], [2.0, -1.0])
    torch.testing.assert_close(got.exp(), torch.tensor([48 / 55, 3 / 55, 4 / 55], dtype=D), rtol=0, atol=1e-14)
    # default weights are uniform: geometric mean renormalised
    geo = torch.sqrt(torch.tensor([1 / 16, 1 / 8, 3 / 32], dtype=D))
    torch.testing.assert_close(ens.log_linear_interpolate([a, b]).exp(), geo / geo.sum())


def test_or_vs_and_with_zero_probabilities():
    # A likes tokens {0, 1}, B likes {1, 2}; each gives the other's favourite probability exactly 0
    a = torch.tensor([0.0, 0.0, -math.inf], dtype=D)
    b = torch.tensor([-math.inf, 0.0, 0.0], dtype=D)
    linear = ens.linear_interpolate([a, b]).exp()
    torch.testing.assert_close(linear, torch.tensor([0.25, 0.5, 0.25], dtype=D))  # OR: keeps all three
    log_linear = ens.log_linear_interpolate([a, b]).exp()
    torch.testing.assert_close(log_linear, torch.tensor([0.0, 1.0, 0.0], dtype=D))  # AND: only the shared one
    # a zero-weight member that assigns -inf must not produce NaN (0 * -inf)
    only_a = ens.log_linear_interpolate([a, b], [1.0, 0.0]).exp()
    torch.testing.assert_close(only_a, torch.tensor([0.5, 0.5, 0.0], dtype=D))
    assert not ens.linear_interpolate([a, b], [1.0, 0.0]).isnan().any()


def test_per_position_weights_select_members():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, dtype=D)  # [M, B, T, V]
    weights = torch.zeros(2, 3, 4, dtype=D)
    weights[0, :, :2], weights[1, :, 2:] = 1.0, 1.0  # first two positions from member 0, rest from member 1
    expected = torch.cat([F.log_softmax(logits[0, :, :2], -1), F.log_softmax(logits[1, :, 2:], -1)], dim=1)
    torch.testing.assert_close(ens.linear_interpolate(logits, weights), expected)
    torch.testing.assert_close(ens.log_linear_interpolate(logits, weights), expected)
    # per-row weights [M, B] broadcast over T
    row_w = torch.tensor([[0.2, 0.5, 1.0], [0.8, 0.5, 0.0]], dtype=D)
    got = ens.linear_interpolate(logits, row_w)
    for r in range(3):
        mix = row_w[0, r] * logits[0, r].softmax(-1) + row_w[1, r] * logits[1, r].softmax(-1)
        torch.testing.assert_close(got[r].exp(), mix)


def test_rules_return_normalised_log_probs_and_keep_dtype():
    logits = torch.randn(3, 2, 7, dtype=torch.float32) * 5
    for fn, w in [(ens.linear_interpolate, [0.2, 0.3, 0.5]), (ens.log_linear_interpolate, [1.5, -0.7, 0.4])]:
        out = fn(logits, w)
        assert out.shape == (2, 7) and out.dtype == torch.float32
        torch.testing.assert_close(out.exp().sum(-1), torch.ones(2))
    assert ens.combine(logits, None, "log-linear").shape == (2, 7)
    torch.testing.assert_close(ens.combine(logits, None, lambda member_logits, w: member_logits[0]), logits[0])


@pytest.mark.parametrize("weights, match", [
    ([0.5, 0.5, 0.0], "3 entries|member axis first"),
    ([[0.5, 0.5]], "member axis first"),
    ([-0.5, 1.5], "non-negative"),
    ([0.3, 0.3], "sum to 1"),
    ([float("nan"), 1.0], "NaN"),
    (torch.full((2, 5), 0.5), "does not broadcast"),
    (torch.full((2, 3, 4), 0.5), "more axes"),
])
def test_linear_weight_errors(weights, match):
    logits = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=match):
        ens.linear_interpolate(logits, weights)


def test_log_linear_accepts_negative_but_not_nonfinite():
    logits = torch.randn(2, 4)
    ens.log_linear_interpolate(logits, [1.0, -2.0])  # fine
    with pytest.raises(ValueError, match="NaN or infinite"):
        ens.log_linear_interpolate(logits, [1.0, float("inf")])
    with pytest.raises(ValueError, match="member axis first"):
        ens.log_linear_interpolate(logits, [1.0])


def test_logits_errors():
    with pytest.raises(ValueError, match="different shapes"):
        ens.linear_interpolate([torch.randn(4), torch.randn(5)])
    with pytest.raises(ValueError, match="empty list"):
        ens.linear_interpolate([])
    with pytest.raises(TypeError, match="floating point"):
        ens.linear_interpolate(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="tensor"):
        ens.linear_interpolate(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="member axis and a vocabulary axis"):
        ens.linear_interpolate(torch.randn(4))
    with pytest.raises(ValueError, match="unknown rule"):
        ens.combine(torch.randn(2, 4), None, "geometric")


# ------------------------------------------------------------------------------------------------
# 2. learned weights


def test_em_golden_two_members():
    # P_a(y_n) = (0.8, 0.2), P_b(y_n) = (0.2, 0.4). d/dw of sum log(w a + (1-w) b) = 0 gives
    # 0.6 (0.4 - 0.2 w) = 0.2 (0.2 + 0.6 w)  ->  w = 5/6.
    target_lp = torch.log(torch.tensor([[0.8, 0.2], [0.2, 0.4]], dtype=D))
    w = ens.fit_mixture_weights(target_lp, iters=5000, tol=1e-14)
    torch.testing.assert_close(w, torch.tensor([5 / 6, 1 / 6], dtype=D), rtol=0, atol=1e-8)
    # a member that is better everywhere takes all the weight
    w = ens.fit_mixture_weights(torch.log(torch.tensor([[0.9, 0.8], [0.1, 0.2]], dtype=D)), iters=5000)
    assert w[0] > 0.999


def test_em_matches_scipy_and_is_monotone():
    from scipy.optimize import minimize

    gen = torch.Generator().manual_seed(1)
    target_lp = F.log_softmax(torch.randn(3, 60, 8, generator=gen, dtype=D) * 2, -1)[..., 0]  # [M, N]
    w = ens.fit_mixture_weights(target_lp, iters=5000, tol=1e-14)
    P = target_lp.exp().numpy()

    def nll(z):  # softmax parametrisation: unconstrained, independent of EM
        v = np.exp(z - z.max())
        v = v / v.sum()
        return -np.log(v @ P).sum()

    res = minimize(nll, np.zeros(3), method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000})
    v = np.exp(res.x - res.x.max())
    np.testing.assert_allclose(w.numpy(), v / v.sum(), atol=2e-4)
    assert abs(w.sum().item() - 1) < 1e-12
    # EM never lowers the likelihood
    lls = [torch.logsumexp(torch.log(ens.fit_mixture_weights(target_lp, iters=i, tol=-1))[:, None] + target_lp, 0).sum()
           for i in range(1, 8)]
    assert all(b >= a - 1e-12 for a, b in zip(lls, lls[1:]))


def test_em_errors():
    with pytest.raises(ValueError, match=r"\[M, N\]"):
        ens.fit_mixture_weights(torch.zeros(3))
    with pytest.raises(ValueError, match="no examples"):
        ens.fit_mixture_weights(torch.zeros(2, 0))
    with pytest.raises(ValueError, match="probability 0 under every member"):
        ens.fit_mixture_weights(torch.tensor([[-1.0, -math.inf], [-2.0, -math.inf]]))


def test_target_logprobs_and_mask():
    lp = torch.log_softmax(torch.randn(2, 3, 4, 5, dtype=D), -1)
    targets = torch.randint(0, 5, (3, 4))
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[1, 2] = mask[2, 0] = True
    got = ens.target_logprobs(lp, targets, mask)
    expected = torch.stack([lp[:, 1, 2, targets[1, 2]], lp[:, 2, 0, targets[2, 0]]], dim=1)
    torch.testing.assert_close(got, expected)
    assert ens.target_logprobs(lp, targets).shape == (2, 12)
    with pytest.raises(ValueError, match="targets shape"):
        ens.target_logprobs(lp, targets[:2])
    with pytest.raises(ValueError, match="mask shape"):
        ens.target_logprobs(lp, targets, mask[:2])


def test_log_linear_weights_match_scipy():
    from scipy.optimize import minimize

    gen = torch.Generator().manual_seed(2)
    lp = F.log_softmax(torch.randn(3, 80, 6, generator=gen, dtype=D), -1)
    y = torch.randint(0, 6, (80,), generator=gen)
    w = ens.fit_log_linear_weights(lp, y, steps=200)
    L, yy = lp.numpy(), y.numpy()

    def nll(v):
        s = np.einsum("m,mnv->nv", v, L)
        s = s - s.max(1, keepdims=True)
        return -(s[np.arange(len(yy)), yy] - np.log(np.exp(s).sum(1))).mean()

    ref = minimize(nll, np.ones(3) / 3, method="BFGS", options={"gtol": 1e-10}).x
    np.testing.assert_allclose(w.numpy(), ref, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[M, N, V\]"):
        ens.fit_log_linear_weights(lp, y[:5])


def specialised_cache(n=200, seed=0):
    """Two members, each right on its own half of the contexts and vague on the other half."""
    gen = torch.Generator().manual_seed(seed)
    V = 6
    y = torch.randint(0, V, (n,), generator=gen)
    task = torch.arange(n) % 2
    good, vague = torch.full((n, V), -2.0, dtype=D), torch.zeros(n, V, dtype=D)
    good[torch.arange(n), y] = 3.0
    vague += torch.randn(n, V, generator=gen, dtype=D) * 0.1
    m0 = torch.where(task[:, None] == 0, good, vague)
    m1 = torch.where(task[:, None] == 1, good, vague)
    return torch.stack([m0, m1]).log_softmax(-1), y, task


def test_gate_beats_fixed_weights_on_specialised_members():
    lp, y, task = specialised_cache()
    gate = ens.GatingNetwork(n_members=2, hidden=8)
    losses = ens.train_gate(gate, lp, y, steps=150, lr=0.05, seed=0)
    assert losses[-1] < losses[0]
    target_lp = ens.target_logprobs(lp, y)
    fixed_w = ens.fit_mixture_weights(target_lp)
    fixed_nll = -torch.logsumexp(torch.log(fixed_w)[:, None] + target_lp, 0).mean().item()
    assert losses[-1] < fixed_nll - 0.3
    with torch.no_grad():
        w = gate(lp)  # [M, N]
    assert w.shape == (2, 200)
    torch.testing.assert_close(w.sum(0), torch.ones(200, dtype=D))
    assert (w[0, task == 0] > 0.9).all() and (w[1, task == 1] > 0.9).all()
    # the learned weights credit each member with its own half
    contrib = ens.member_contribution(target_lp, w)
    torch.testing.assert_close(contrib, torch.tensor([0.5, 0.5], dtype=D), atol=0.05, rtol=0)


def test_gate_with_own_features_and_errors():
    lp, y, task = specialised_cache(n=100)
    gate = ens.GatingNetwork(n_members=2, n_features=1, hidden=4)
    ens.train_gate(gate, lp, y, features=task[:, None].double(), steps=100, lr=0.1)
    w = gate(lp, task[:, None].double())
    assert (w[0, task == 0] > 0.8).all()
    with pytest.raises(ValueError, match="built for 2 members"):
        gate(lp[:1])
    with pytest.raises(ValueError, match=r"\[M, N, V\]"):
        ens.train_gate(gate, lp, y[:3])


def test_member_features_and_contribution_by_hand():
    lp = torch.log(torch.tensor([[[0.5, 0.5]], [[1.0, 0.0]]], dtype=D))  # [M=2, N=1, V=2]
    feats = ens.member_features(lp)  # [N, 2M] = entropies then max log-probs
    torch.testing.assert_close(feats, torch.tensor([[math.log(2), 0.0, math.log(0.5), 0.0]], dtype=D))
    # weights (0.5, 0.5), P(correct) = (0.6, 0.2) -> responsibilities (0.75, 0.25)
    c = ens.member_contribution(torch.log(torch.tensor([[0.6], [0.2]], dtype=D)), [0.5, 0.5])
    torch.testing.assert_close(c, torch.tensor([0.75, 0.25], dtype=D))


# ------------------------------------------------------------------------------------------------
# 3. negative evidence


def test_dexperts_equals_logit_arithmetic():
    gen = torch.Generator().manual_seed(3)
    core, expert, anti = (torch.randn(4, 9, generator=gen, dtype=D) for _ in range(3))
    got = ens.dexperts(core, expert, anti, alpha=2.0)
    torch.testing.assert_close(got, F.log_softmax(core + 2.0 * (expert - anti), -1))
    # hand example: anti-expert loves token 0, expert is neutral -> token 0 is pushed down
    core = torch.zeros(3, dtype=D)
    anti = torch.log(torch.tensor([0.5, 0.25, 0.25], dtype=D))
    expert = torch.log(torch.tensor([1 / 3, 1 / 3, 1 / 3], dtype=D))
    torch.testing.assert_close(ens.dexperts(core, expert, anti, 1.0).exp(), torch.tensor([0.2, 0.4, 0.4], dtype=D))


def test_contrastive_decoding_by_hand():
    expert = logits_of([0.6, 0.3, 0.1])
    amateur = logits_of([0.5, 0.1, 0.4], 5.0)
    # alpha 0.4: plausible = {p >= 0.24} = {0, 1}; scores log(.6/.5), log(.3/.1) -> [1.2, 3] / 4.2
    got = ens.contrastive_logprobs(expert, amateur, alpha=0.4).exp()
    torch.testing.assert_close(got, torch.tensor([1.2 / 4.2, 3 / 4.2, 0.0], dtype=D))
    # without the threshold the implausible token 2 (0.1 vs 0.4) still loses, token 1 wins
    assert ens.contrastive_logprobs(expert, amateur, alpha=0.0).argmax().item() == 1
    # a tiny threshold lets through everything the expert gives > alpha * max
    assert ens.contrastive_logprobs(expert, amateur, alpha=0.16).exp()[2] > 0
    with pytest.raises(ValueError, match="same shape"):
        ens.contrastive_logprobs(expert, amateur[:2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ens.contrastive_logprobs(expert, amateur, alpha=1.5)


# ------------------------------------------------------------------------------------------------
# 4. token-level decoding: EnsembleLM vs a brute-force reference


def tiny_llama(seed, vocab=24, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(D).eval()
    with torch.no_grad():  # sharper, more varied next-token distributions than the default init
        model.lm_head.weight.mul_(40)
    return model


@pytest.fixture(scope="module")
def members():
    return [tiny_llama(0), tiny_llama(1), tiny_llama(2, layers=1)]


def padded_prompts():
    # three prompts of lengths 5, 2, 4, left-padded with 0
    ids = torch.tensor([[3, 4, 5, 6, 7], [0, 0, 0, 8, 9], [0, 10, 11, 12, 13]])
    mask = (ids != 0).long()
    return ids, mask


def brute_force_generate(models, ids, mask, weights, rule, steps, generator=None, temperature=1.0, eos=None):
    """Recompute every member's full forward on the whole sequence at every step (no cache)."""
    ids, mask = ids.clone(), mask.clone()
    done = torch.zeros(len(ids), dtype=torch.bool)
    all_lp = []
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        lps = torch.stack([F.log_softmax(m(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1], -1)
                           for m in models])  # [M, B, V]
        w = weights(lps) if callable(weights) else torch.as_tensor(weights, dtype=D)
        w = w.reshape(len(models), -1, 1)
        if rule == "linear":
            lp = torch.log((w * lps.exp()).sum(0))
        else:
            lp = F.log_softmax((w * lps).sum(0), -1)
        if generator is None:
            tok = lp.argmax(-1)
        else:
            tok = torch.multinomial(F.softmax(lp / temperature, -1), 1, generator=generator)[:, 0]
        tok = torch.where(done, torch.zeros_like(tok), tok)
        if eos is not None:
            done |= torch.isin(tok, torch.as_tensor(eos))
        ids = torch.cat([ids, tok[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        all_lp.append(lp)
        if eos is not None and done.all():
            break
    return ids, torch.stack(all_lp, 1)


@pytest.mark.parametrize("rule, weights", [("linear", [0.5, 0.3, 0.2]), ("log_linear", [1.0, 0.8, -0.5])])
@pytest.mark.parametrize("sample", [False, True])
@pytest.mark.parametrize("ignore_eos", [False, True])
def test_ensemble_lm_equals_brute_force(members, rule, weights, sample, ignore_eos):
    """By default a row stops at the members' EOS (id 2 in tiny_llama's config); ignore_eos runs on."""
    ids, mask = padded_prompts()
    lm = ens.EnsembleLM(members, weights=weights, rule=rule)
    gen_a = torch.Generator().manual_seed(7) if sample else None
    gen_b = torch.Generator().manual_seed(7) if sample else None
    got, got_lp = lm.generate(ids, mask, max_new_tokens=6, do_sample=sample, temperature=0.9, generator=gen_a,
                              return_logprobs=True, ignore_eos=ignore_eos)
    ref, ref_lp = brute_force_generate(members, ids, mask, weights, rule, 6, gen_b, 0.9,
                                       eos=None if ignore_eos else [2])
    assert torch.equal(got, ref)
    torch.testing.assert_close(got_lp, ref_lp.float(), rtol=0, atol=1e-5)
    assert got.shape == (3, 5 + 6)
    assert len(set(map(tuple, got[:, 5:].tolist()))) > 1  # the rows really differ: not a degenerate test


def test_ensemble_lm_with_gate_equals_brute_force(members):
    ids, mask = padded_prompts()
    torch.manual_seed(0)
    gate = ens.GatingNetwork(n_members=3, hidden=4).to(D)
    lm = ens.EnsembleLM(members, weights=gate, rule="linear")
    got = lm.generate(ids, mask, max_new_tokens=5)
    ref, _ = brute_force_generate(members, ids, mask, lambda lps: gate(lps), "linear", 5)
    assert torch.equal(got, ref)


def test_padding_does_not_change_outputs(members):
    ids, mask = padded_prompts()
    lm = ens.EnsembleLM(members[:2], weights=[0.5, 0.5], rule="log_linear")
    batched = lm.generate(ids, mask, max_new_tokens=4)
    for row in range(len(ids)):
        alone = ids[row, mask[row].bool()][None]
        torch.testing.assert_close(lm.generate(alone, max_new_tokens=4)[0, -4:], batched[row, -4:])


def test_single_member_greedy_equals_transformers_generate(members):
    ids, mask = padded_prompts()
    model = members[0]
    ours = ens.EnsembleLM([model], weights=[1.0]).generate(ids, mask, max_new_tokens=5)
    theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                            pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


def test_eos_stops_and_pads(members):
    ids, mask = padded_prompts()
    lm = ens.EnsembleLM(members, weights=[0.4, 0.4, 0.2])
    free = lm.generate(ids, mask, max_new_tokens=6, ignore_eos=True)
    eos = free[0, 6].item()  # the token row 0 emits at its second step
    got = lm.generate(ids, mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    ref, _ = brute_force_generate(members, ids, mask, [0.4, 0.4, 0.2], "linear", 6, eos=eos)
    assert torch.equal(got, ref)
    assert (got[0, 7:] == 0).all()


def test_ensemble_lm_refuses_different_vocabularies():
    a, b = tiny_llama(0, vocab=24), tiny_llama(1, vocab=28)
    with pytest.raises(ValueError, match=r"different vocabulary sizes \[24, 28\]"):
        ens.EnsembleLM([a, b])
    maps = [torch.arange(24), torch.arange(24)]
    with pytest.raises(ValueError, match="rule='linear'"):
        ens.EnsembleLM([a, b], rule="log_linear", token_maps=maps)
    with pytest.raises(ValueError, match="2 maps for 1 members"):
        ens.EnsembleLM([a], token_maps=maps)
    with pytest.raises(ValueError, match="outside member 0"):
        ens.EnsembleLM([a, b], token_maps=[torch.arange(24) + 1, torch.arange(24)])
    with pytest.raises(ValueError, match="length 24"):
        ens.EnsembleLM([a, b], token_maps=[torch.arange(24), torch.arange(20)])


def test_token_maps_align_a_padded_vocabulary(members):
    """Member b2 = b with 4 extra vocabulary rows; mapped onto the shared 24 tokens it must act as b."""
    a, b = members[0], members[1]
    b2 = tiny_llama(1)
    b2.resize_token_embeddings(28)
    with torch.no_grad():
        b2.load_state_dict({k: v for k, v in b.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k},
                           strict=False)
        b2.model.embed_tokens.weight[:24] = b.model.embed_tokens.weight
        b2.lm_head.weight[:24] = b.lm_head.weight
        b2.lm_head.weight[24:] = 5 * b.lm_head.weight[:4]  # extra tokens carry real probability mass
    ids, mask = padded_prompts()
    aligned = ens.EnsembleLM([a, b2], weights=[0.5, 0.5], token_maps=[torch.arange(24), torch.arange(24)])
    plain = ens.EnsembleLM([a, b], weights=[0.5, 0.5])
    out_aligned, lp_aligned = aligned.generate(ids, mask, max_new_tokens=5, return_logprobs=True)
    out_plain, lp_plain = plain.generate(ids, mask, max_new_tokens=5, return_logprobs=True)
    assert torch.equal(out_aligned, out_plain)
    torch.testing.assert_close(lp_aligned, lp_plain, atol=1e-6, rtol=0)


def test_align_to_vocab_missing_tokens_and_feedback_error(members):
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    aligned = ens.align_to_vocab(logits, torch.tensor([2, -1, 0, 1]))
    torch.testing.assert_close(aligned, torch.tensor([[3.0, -math.inf, 1.0, 2.0]]))
    # member 1 lacks shared token 5: it cannot consume a prompt that contains it
    a, b = members[0], members[1]
    tm = torch.arange(24)
    tm_missing = tm.clone()
    tm_missing[5] = -1
    lm = ens.EnsembleLM([a, b], token_maps=[tm, tm_missing])
    ids, mask = padded_prompts()
    with pytest.raises(ValueError, match=r"member 1 has no token for shared id\(s\) \[5\]"):
        lm.generate(ids, mask, max_new_tokens=1)


def test_generate_errors(members):
    lm = ens.EnsembleLM(members[:2], weights=[0.5, 0.5])
    ids, mask = padded_prompts()
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        lm.generate(ids[0], max_new_tokens=1)
    with pytest.raises(ValueError, match="must match input_ids"):
        lm.generate(ids, mask[:, :3], max_new_tokens=1)
    right_padded = torch.tensor([[3, 4, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        lm.generate(right_padded, (right_padded != 0).long(), max_new_tokens=1)
    with pytest.raises(ValueError, match="temperature > 0"):
        lm.generate(ids, mask, max_new_tokens=1, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="integer token ids, got torch.float32"):
        lm.generate(ids.float(), mask, max_new_tokens=1)
    with pytest.raises(ValueError, match=r"outside the shared vocabulary \[0, 24\): min 3, max 24"):
        lm.generate(torch.tensor([[3, 24]]), max_new_tokens=1)
    with pytest.raises(ValueError, match=r"\[M\] = \[2\]"):
        ens.EnsembleLM(members[:2], weights=[1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="at least one member"):
        ens.EnsembleLM([])


# ------------------------------------------------------------------------------------------------
# 4b. EnsembleLM under bad input: lengths, EOS, context length, tokenizers (issue 10)


def test_generate_stops_at_each_members_own_eos():
    """Member a ends at token x, member b at token y: a row stops at whichever it emits first."""
    a, b = tiny_llama(0), tiny_llama(1)
    ids, mask = padded_prompts()
    free = ens.EnsembleLM([a, b]).generate(ids, mask, max_new_tokens=6, ignore_eos=True)
    x = free[0, 6].item()                                     # row 0's second new token
    y = next(t for t in free[1, 5:].tolist() if t != x)       # a token row 1 emits that is not x
    for model, eos in ((a, x), (b, y)):
        model.config.eos_token_id = model.generation_config.eos_token_id = eos
    lm = ens.EnsembleLM([a, b])
    assert lm.eos_token_ids() == sorted({x, y})
    got = lm.generate(ids, mask, max_new_tokens=6)
    ref, _ = brute_force_generate([a, b], ids, mask, [0.5, 0.5], "linear", 6, eos=[x, y])
    assert torch.equal(got, ref)
    assert (got[0, 7:] == 0).all()                            # row 0 stopped at x and was padded
    stop = 5 + free[1, 5:].tolist().index(y) if x not in free[1, 5:].tolist() else None
    if stop is not None:
        assert (got[1, stop + 1:] == 0).all()
    # an explicit eos_token_id replaces the members' ids; ignore_eos runs the full length
    assert torch.equal(lm.generate(ids, mask, max_new_tokens=6, ignore_eos=True), free)
    only_x, _ = brute_force_generate([a, b], ids, mask, [0.5, 0.5], "linear", 6, eos=[x])
    assert torch.equal(lm.generate(ids, mask, max_new_tokens=6, eos_token_id=x), only_x)
    with pytest.raises(ValueError, match=r"eos_token_id \[24\] is outside the shared vocabulary \[0, 24\)"):
        lm.generate(ids, mask, max_new_tokens=2, eos_token_id=24)


def test_generate_eos_through_token_maps():
    """With token_maps, a member's EOS (its own id) is read in the shared vocabulary."""
    a, b = tiny_llama(0), tiny_llama(1)
    a.generation_config.eos_token_id = 7
    b.generation_config.eos_token_id = 3
    b.config.eos_token_id = 3
    to_b = torch.arange(24).roll(1)  # shared id s is member b's id s - 1 (mod 24): b's 3 is shared 4
    lm = ens.EnsembleLM([a, b], token_maps=[torch.arange(24), to_b])
    assert lm.eos_token_ids() == [4, 7]


def test_generate_max_new_tokens_validation(members):
    lm = ens.EnsembleLM(members[:2], weights=[0.5, 0.5])
    ids, mask = padded_prompts()
    for bad in (-1, 2.5, True, None):
        with pytest.raises(ValueError, match=f"max_new_tokens must be an int >= 0, got {bad!r}"):
            lm.generate(ids, mask, max_new_tokens=bad)
    out, lp = lm.generate(ids, mask, max_new_tokens=0, return_logprobs=True)
    assert torch.equal(out, ids) and lp.shape == (3, 0, 24)
    assert torch.equal(lm.generate(ids, mask, max_new_tokens=0), ids)
    one, lp1 = lm.generate(ids, mask, max_new_tokens=1, return_logprobs=True, ignore_eos=True)
    assert one.shape == (3, 6) and lp1.shape == (3, 1, 24)
    with pytest.raises(ValueError, match=r"pad_token_id must be a token id in \[0, 24\)"):
        lm.generate(ids, mask, max_new_tokens=1, pad_token_id=-1)


def test_generate_refuses_to_run_past_the_shortest_context():
    long_ctx, short_ctx = tiny_llama(0), tiny_llama(1)  # 64 positions; the second is told it has 16
    short_ctx.config.max_position_embeddings = 16
    lm = ens.EnsembleLM([long_ctx, short_ctx])
    ids, mask = padded_prompts()                        # longest prompt: 5 tokens
    assert lm.context_length() == (16, 1)
    assert lm.generate(ids, mask, max_new_tokens=11, ignore_eos=True).shape == (3, 16)
    with pytest.raises(ValueError, match=r"longest prompt \(5 tokens\) \+ max_new_tokens \(12\) exceeds member 1's "
                                         r"context length \(max_position_embeddings=16\): use at most 11 new tokens"):
        lm.generate(ids, mask, max_new_tokens=12)
    # positions count real tokens, not left padding: two real tokens in a width-3 batch leave 14
    padded = torch.tensor([[0, 3, 4], [0, 0, 5]])
    assert lm.generate(padded, (padded != 0).long(), max_new_tokens=14, ignore_eos=True).shape == (2, 17)
    with pytest.raises(ValueError, match="at most 14 new tokens"):
        lm.generate(padded, (padded != 0).long(), max_new_tokens=15)


def test_ensemble_lm_checks_tokenizers(members):
    vocab = {f"t{i}": i for i in range(24)}
    swapped = dict(vocab, t5=6, t6=5)                   # same size, ids 5 and 6 exchanged
    a, b = members[0], members[1]
    with pytest.raises(ValueError, match="id 5 is 't5' in member 0 but 't6' in member 1"):
        ens.EnsembleLM([a, b], tokenizers=[vocab, swapped])
    ens.EnsembleLM([a, b], tokenizers=[vocab, dict(vocab)])
    ens.EnsembleLM([a, b], tokenizers=[vocab, None])                          # a member without one is skipped
    ens.EnsembleLM([a, b], tokenizers=[vocab, swapped], allow_vocab_mismatch=True)  # the explicit override
    ens.EnsembleLM([a, b], tokenizers=[vocab, swapped], token_maps=[torch.arange(24)] * 2)  # maps say how ids match
    with pytest.raises(ValueError, match="tokenizers has 1 entries for 2 members"):
        ens.EnsembleLM([a, b], tokenizers=[vocab])


def test_ensemble_lm_reads_tokenizers_saved_with_the_members(tmp_path):
    """Members loaded from folders are checked with the tokenizers saved next to them (no argument)."""
    import json

    from transformers import LlamaForCausalLM

    from labkit.data import VOCAB, get_tokenizer

    tok = get_tokenizer()
    for name in ("a", "same", "swapped"):
        tiny_llama(0, vocab=len(VOCAB)).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    spec = json.loads((tmp_path / "swapped" / "tokenizer.json").read_text())
    v = spec["model"]["vocab"]
    v["a"], v["b"] = v["b"], v["a"]
    (tmp_path / "swapped" / "tokenizer.json").write_text(json.dumps(spec))
    a, same, swapped = (LlamaForCausalLM.from_pretrained(tmp_path / n) for n in ("a", "same", "swapped"))
    ens.EnsembleLM([a, same])
    with pytest.raises(ValueError, match=f"id {VOCAB['a']} is 'a' in member 0 but 'b' in member 1"):
        ens.EnsembleLM([a, swapped])
    ens.EnsembleLM([a, swapped], allow_vocab_mismatch=True)
    assert ens.decode.local_tokenizer(tiny_llama(0)) is None  # built in memory: nothing to read


def test_ensemble_next_token_step():
    member_logits = torch.log(torch.tensor([[[0.6, 0.4, 0.0]], [[0.0, 0.45, 0.55]]], dtype=D))  # [M=2, B=1, V=3]
    tok, lp = ens.ensemble_next_token(member_logits, [0.5, 0.5], "linear")
    assert tok.tolist() == [1]  # 0.3, 0.425, 0.275
    torch.testing.assert_close(lp.exp(), torch.tensor([[0.3, 0.425, 0.275]], dtype=D))
    # sampling is reproducible from the generator and follows the distribution
    draws = [ens.ensemble_next_token(member_logits.expand(2, 4000, 3), [0.5, 0.5], "linear", 1.0,
                                     torch.Generator().manual_seed(s))[0] for s in (0, 0, 1)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    freq = torch.bincount(draws[0], minlength=3).double() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.3, 0.425, 0.275], dtype=D), atol=0.03, rtol=0)
    with pytest.raises(ValueError, match="temperature"):
        ens.ensemble_next_token(member_logits, None, "linear", -1.0)


def test_member_logprobs_cache_matches_generation(members):
    ids, mask = padded_prompts()
    lp = ens.member_logprobs(members, ids, mask)  # [M, B, T, V]
    assert lp.shape == (3, 3, 5, 24)
    lm = ens.EnsembleLM(members, weights=[0.2, 0.3, 0.5], rule="log_linear")
    _, step_lp = lm.generate(ids, mask, max_new_tokens=1, return_logprobs=True)
    torch.testing.assert_close(ens.log_linear_interpolate(lp[:, :, -1], [0.2, 0.3, 0.5]), step_lp[:, 0], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# 5. getting members


def test_bootstrap_indices():
    idx = ens.bootstrap_indices(10_000, 3, seed=0)
    assert idx.shape == (3, 10_000) and idx.dtype == torch.long
    assert idx.min() >= 0 and idx.max() < 10_000
    assert torch.equal(idx, ens.bootstrap_indices(10_000, 3, seed=0))
    assert not torch.equal(idx, ens.bootstrap_indices(10_000, 3, seed=1))
    assert not torch.equal(idx[0], idx[1])
    unique_frac = [len(row.unique()) / 10_000 for row in idx]
    assert all(abs(f - (1 - 1 / math.e)) < 0.01 for f in unique_frac)
    for bad in [(0, 3), (10, 0), (2.5, 3)]:
        with pytest.raises(ValueError):
            ens.bootstrap_indices(*bad)


def test_bagging_passes_resamples():
    X, y = torch.arange(20.0)[:, None], torch.arange(20)
    seen = ens.bagging(lambda Xb, yb, s: (Xb[:, 0].long().tolist(), yb.tolist(), s), X, y, k=3, seed=4)
    idx = ens.bootstrap_indices(20, 3, seed=4)
    assert [s[0] for s in seen] == idx.tolist() and [s[1] for s in seen] == idx.tolist()
    assert len({s[2] for s in seen}) == 3
    with pytest.raises(ValueError, match="rows"):
        ens.bagging(lambda *a: None, X, y[:5], k=2)


def test_mc_dropout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).double().eval()
    x = torch.randn(5, 4, dtype=D)
    state = torch.get_rng_state()
    out = ens.mc_dropout_logits(model, x, k=3000, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert out.shape == (3000, 5, 3) and not model[1].training
    assert torch.equal(out, ens.mc_dropout_logits(model, x, k=3000, seed=0))
    assert not torch.equal(out[0], out[1])
    # inverted dropout: the mean of the thinned networks is the eval-mode output (in expectation)
    torch.testing.assert_close(out.mean(0), model(x).detach(), atol=0.1, rtol=0)
    with pytest.raises(ValueError, match="no dropout layer"):
        ens.mc_dropout_logits(nn.Linear(4, 3), x.float(), k=2)


def test_snapshot_schedule_and_training():
    assert ens.snapshot_lr(0, 10, 0.1) == pytest.approx(0.1)
    assert ens.snapshot_lr(5, 10, 0.1) == pytest.approx(0.05)
    assert ens.snapshot_lr(10, 10, 0.1) == pytest.approx(0.1)  # restart
    assert ens.snapshot_lr(9, 10, 0.1) == pytest.approx(0.05 * (math.cos(0.9 * math.pi) + 1))
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(64, 4, generator=gen)
    y = (X[:, 0] > 0).long()
    torch.manual_seed(0)
    snaps = ens.train_snapshots(nn.Linear(4, 2), X, y, cycles=3, steps_per_cycle=10, lr_max=0.1, batch_size=16)
    assert len(snaps) == 3
    assert not torch.equal(snaps[0].weight, snaps[2].weight)


# ------------------------------------------------------------------------------------------------
# classifier combiners vs scikit-learn


@pytest.fixture(scope="module")
def sk_data():
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=240, n_features=6, n_informative=4, n_classes=3, random_state=0)
    return X[:180], y[:180], X[180:], y[180:]


def sk_members():
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import GaussianNB
    from sklearn.tree import DecisionTreeClassifier

    return [("lr", LogisticRegression(max_iter=1000)), ("nb", GaussianNB()),
            ("tree", DecisionTreeClassifier(max_depth=3, random_state=0))]


def test_voting_matches_sklearn(sk_data):
    from sklearn.ensemble import VotingClassifier

    X, y, Xt, _ = sk_data
    for weights in (None, [1, 2, 1]):
        soft = VotingClassifier(sk_members(), voting="soft", weights=weights).fit(X, y)
        probs = torch.tensor(np.stack([m.predict_proba(Xt) for m in soft.estimators_]))
        torch.testing.assert_close(ens.soft_vote(probs, weights), torch.tensor(soft.predict_proba(Xt)))
        hard = VotingClassifier(sk_members(), voting="hard", weights=weights).fit(X, y)
        preds = torch.tensor(np.stack([m.predict(Xt) for m in hard.estimators_]))
        assert ens.hard_vote(preds, 3, weights).tolist() == hard.predict(Xt).tolist()


def test_hard_vote_ties_by_hand():
    preds = torch.tensor([[2, 0, 1], [1, 0, 2], [0, 1, 1]])  # columns: a three-way tie, 0 wins, 1 wins
    assert ens.hard_vote(preds, 3).tolist() == [0, 0, 1]
    assert ens.hard_vote(preds, 3, [1, 3, 1]).tolist() == [1, 0, 2]
    with pytest.raises(ValueError, match="integer labels"):
        ens.hard_vote(preds.double(), 3)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        ens.hard_vote(preds, 2)
    with pytest.raises(ValueError, match=r"\[M\] = \[3\]"):
        ens.hard_vote(preds, 3, [1, 1])
    with pytest.raises(ValueError, match="non-negative"):
        ens.soft_vote(torch.rand(2, 4, 3), [1.0, -1.0])


@pytest.mark.parametrize("n_classes", [3, 2])
def test_stacking_matches_sklearn(n_classes):
    from sklearn.base import clone
    from sklearn.datasets import make_classification
    from sklearn.ensemble import StackingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    X, y = make_classification(n_samples=200, n_features=6, n_informative=4, n_classes=n_classes, random_state=1)
    X, y, Xt = X[:150], y[:150], X[150:]
    cv = StratifiedKFold(5)
    final = LogisticRegression(tol=1e-12, max_iter=10_000)
    sk = StackingClassifier(sk_members(), final_estimator=final, cv=cv).fit(X, y)

    def fit_predict_with(est):
        return lambda Xa, ya, Xb: clone(est).fit(Xa, ya).predict_proba(Xb)

    folds = list(cv.split(X, y))
    oof = torch.stack([ens.out_of_fold_predictions(fit_predict_with(est), X, y, folds) for _, est in sk_members()])
    stacker = ens.fit_stacker(ens.stacking_features(oof), torch.tensor(y))
    test_probs = torch.tensor(np.stack([m.predict_proba(Xt) for m in sk.estimators_]))
    got = stacker(ens.stacking_features(test_probs))
    torch.testing.assert_close(got, torch.tensor(sk.predict_proba(Xt)), atol=1e-5, rtol=0)
    assert ens.stacking_features(oof).shape == (150, 3 * (1 if n_classes == 2 else n_classes))


def test_stacking_errors():
    with pytest.raises(ValueError, match="without an out-of-fold prediction"):
        ens.out_of_fold_predictions(lambda a, b, c: np.ones((len(c), 2)), np.zeros((6, 1)), np.zeros(6),
                                    [(np.arange(3, 6), np.arange(3))])
    with pytest.raises(ValueError, match="labels 0..K-1"):
        ens.fit_stacker(torch.randn(4, 2), torch.tensor([0, 2, 2, 0]))


# ------------------------------------------------------------------------------------------------
# 6. batched members


def test_stacked_forward_equals_loop():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 4)).double().eval()
              for _ in range(5)]
    x = torch.randn(7, 8, dtype=D)
    params, buffers, skeleton = ens.stack_members(models)
    assert params["0.weight"].shape == (5, 16, 8)
    torch.testing.assert_close(ens.stacked_forward(params, buffers, skeleton, x), ens.loop_forward(models, x))
    with pytest.raises(ValueError, match="one architecture"):
        ens.stack_members([models[0], nn.Sequential(nn.Linear(8, 4))])


# ------------------------------------------------------------------------------------------------
# 7. diagnostics


def test_error_correlation_and_disagreement_by_hand():
    y = torch.tensor([0, 0, 0, 0])
    preds = torch.tensor([[1, 0, 1, 0],   # errors on 0, 2
                          [2, 0, 2, 0],   # errors on 0, 2 (different wrong labels)
                          [0, 1, 0, 1]])  # errors on 1, 3
    corr = ens.error_correlation(preds, y)
    torch.testing.assert_close(corr, torch.tensor([[1.0, 1, -1], [1, 1, -1], [-1, -1, 1]], dtype=D))
    dis = ens.pairwise_disagreement(preds)
    torch.testing.assert_close(dis, torch.tensor([[0.0, 0.5, 1.0], [0.5, 0, 1.0], [1.0, 1.0, 0]], dtype=D))
    with pytest.raises(ValueError, match=r"\[M, N\]"):
        ens.error_correlation(preds, y[:2])
    with pytest.raises(ValueError, match=r"\[M, N\]"):
        ens.pairwise_disagreement(preds[0])


def test_ensemble_report_gain():
    # three members each wrong on a different example: majority of probabilities is always right
    y = torch.tensor([0, 1, 2])
    probs = torch.full((3, 3, 3), 0.1, dtype=D)
    for m in range(3):
        for n in range(3):
            probs[m, n, y[n] if m != n else (y[n] + 1) % 3] = 0.8
    rep = ens.ensemble_report(probs, y)
    assert rep["member_acc"] == pytest.approx([2 / 3] * 3)
    assert rep["ensemble_acc"] == 1.0 and rep["gain"] == pytest.approx(1 / 3)
    assert rep["disagreement"] == pytest.approx(2 / 3)
    assert rep["error_corr"] == pytest.approx(-0.5)


# ------------------------------------------------------------------------------------------------
# on a GPU: the same answers as on the CPU


@pytest.mark.gpu
def test_gpu_matches_cpu(members):
    cuda = torch.device("cuda")
    ids, mask = padded_prompts()
    for rule, weights in [("linear", [0.5, 0.3, 0.2]), ("log_linear", [1.0, 0.8, -0.5])]:
        cpu_ids, cpu_lp = ens.EnsembleLM(members, weights, rule).generate(ids, mask, max_new_tokens=5, return_logprobs=True)
        gpu_members = [m.to(cuda) for m in members]
        try:
            gpu_ids, gpu_lp = ens.EnsembleLM(gpu_members, weights, rule).generate(ids.to(cuda), mask.to(cuda), max_new_tokens=5,
                                                                                  return_logprobs=True)
        finally:
            for m in members:
                m.to("cpu")
        assert torch.equal(gpu_ids.cpu(), cpu_ids)
        torch.testing.assert_close(gpu_lp.cpu(), cpu_lp, atol=1e-5, rtol=0)
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(cuda) for _ in range(4)]
    x = torch.randn(32, 8, device=cuda)
    params, buffers, skeleton = ens.stack_members(models)
    torch.testing.assert_close(ens.stacked_forward(params, buffers, skeleton, x), ens.loop_forward(models, x),
                               atol=1e-4, rtol=1e-4)


def test_package_layout_and_public_names():
    """The rules file stands alone; every name of the one-file module is still importable from the package."""
    import ast
    import pathlib

    root = pathlib.Path(ens.__file__).parent
    tree = ast.parse((root / "combination.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"decode", "members", "transformers"}, imported
    for name in ens.__all__:
        assert getattr(ens, name).__module__.startswith("labkit.ensemble."), name
    assert ens.combine.__module__ == "labkit.ensemble.combination"  # the function, not a module
