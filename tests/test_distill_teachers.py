"""Teachers and caches (top-k, sampled), hidden-state distillation and int8 quantisation."""
import math

import pytest
import torch
import torch.nn.functional as F

from labkit.distill import (HiddenProjector, cache_storage, cached_forward_kl, capture_features,
                            ensemble_teacher_logprobs, forward_kl, hidden_state_loss, quantize_dynamic_int8,
                            sampled_cache, teacher_logits, topk_cache, uniform_layer_map, weight_only_int8,
                            model_size_bytes)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 4, 9, generator=g, dtype=torch.float64) * 2
    t = torch.randn(2, 4, 9, generator=g, dtype=torch.float64) * 2
    labels = torch.tensor([[-100, 1, 2, 3], [-100, -100, 4, 5]])
    return s, t, labels


@pytest.mark.parametrize("missing", ["renormalize", "other"])
def test_topk_cache_with_k_equal_vocab_is_the_full_loss(logits, missing):
    s, t, labels = logits
    cache = topk_cache(t, k=9, missing=missing, temperature=2.0, value_dtype=torch.float64)
    got = cached_forward_kl(s, cache, labels)
    assert torch.allclose(got, forward_kl(s, t, labels, temperature=2.0), atol=1e-10)


def test_topk_cache_small_k_reference(logits):
    s, t, labels = logits
    k = 3
    cache_r = topk_cache(t, k=k, missing="renormalize", value_dtype=torch.float64)
    cache_o = topk_cache(t, k=k, missing="other", value_dtype=torch.float64)
    p_t, logp_s = F.softmax(t, -1), F.log_softmax(s, -1)  # the student's log-probs over the FULL vocabulary
    want_r, want_o = torch.zeros(2, 4), torch.zeros(2, 4)
    for b in range(2):
        for i in range(4):
            top = p_t[b, i].argsort(descending=True)[:k]
            kept = p_t[b, i, top].sum()
            q = p_t[b, i, top] / kept
            want_r[b, i] = (q * (q.log() - logp_s[b, i, top])).sum()
            s_other = 1 - logp_s[b, i, top].exp().sum()
            want_o[b, i] = (p_t[b, i, top] * (p_t[b, i, top].log() - logp_s[b, i, top])).sum() + \
                (1 - kept) * (torch.log(1 - kept) - torch.log(s_other))
    mask = labels != -100
    assert torch.allclose(cached_forward_kl(s, cache_r, labels), want_r[mask].mean().double(), atol=1e-10)
    assert torch.allclose(cached_forward_kl(s, cache_o, labels), want_o[mask].mean().double(), atol=1e-10)
    # both are biased estimates of the full loss at small k (here they differ from it)
    full = forward_kl(s, t, labels)
    assert not torch.allclose(cached_forward_kl(s, cache_r, labels), full, atol=1e-3)


def test_cache_storage_numbers():
    t = torch.randn(3, 5, 50000)
    cache = topk_cache(t, k=64)
    assert cache.indices.dtype == torch.int32 and cache.logprobs.dtype == torch.float16  # V > 32768 needs int32
    rep = cache_storage(cache, full_dtype=torch.float16)
    assert rep["tokens"] == 15 and rep["bytes_per_token"] == 64 * (4 + 2)
    assert rep["full_bytes_per_token"] == 50000 * 2 and rep["cache_bytes"] == 15 * 384
    assert rep["saving"] == pytest.approx(100000 / 384)
    small = topk_cache(t[..., :1000], k=8)
    assert small.indices.dtype == torch.int16 and cache_storage(small)["bytes_per_token"] == 8 * 4
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[:, 2:] = True
    assert cache_storage(small, mask=mask)["tokens"] == 9
    samples = sampled_cache(t[..., :1000], num_samples=16)
    assert cache_storage(samples)["bytes_per_token"] == 16 * 2


def test_sampled_cache_is_unbiased_for_the_cross_entropy_gradient():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(1, 12, generator=g, dtype=torch.float64) * 2
    s = torch.randn(1, 12, generator=g, dtype=torch.float64).requires_grad_()
    (full_grad,) = torch.autograd.grad(forward_kl(s, t), s)
    cache = sampled_cache(t.expand(4000, 12), num_samples=8, generator=g)
    s_many = s.expand(4000, 12)
    (sampled_grad,) = torch.autograd.grad(cached_forward_kl(s_many, cache, reduction="token_mean"), s)
    # 32000 draws: the Monte Carlo error of each gradient entry is about 0.005
    assert torch.allclose(sampled_grad, full_grad, atol=0.02)
    topk = topk_cache(t, k=2, value_dtype=torch.float64)
    (topk_grad,) = torch.autograd.grad(cached_forward_kl(s, topk), s)
    assert (topk_grad - full_grad).abs().max() > 0.05  # top-2 is visibly biased


def test_sampled_cache_value_counts_repeats():
    t = torch.tensor([[0.0, 0.0, -50.0]], dtype=torch.float64)
    cache = sampled_cache(t, num_samples=4, generator=torch.Generator().manual_seed(1))
    s = torch.zeros(1, 3, dtype=torch.float64)
    idx = cache.indices[0].tolist()
    p_hat = {v: idx.count(v) / 4 for v in set(idx)}
    want = sum(p * (math.log(p) - math.log(1 / 3)) for p in p_hat.values())
    assert cached_forward_kl(s, cache).item() == pytest.approx(want)


def test_cache_errors(logits):
    s, t, labels = logits
    with pytest.raises(ValueError, match="k must be"):
        topk_cache(t, k=0)
    with pytest.raises(ValueError, match="missing"):
        topk_cache(t, k=2, missing="drop")
    with pytest.raises(ValueError, match="vocabulary size"):
        cached_forward_kl(s[..., :5], topk_cache(t, k=2))
    with pytest.raises(ValueError, match="num_samples"):
        sampled_cache(t, num_samples=0)


def test_ensemble_teacher_uses_the_ensemble_rules():
    torch.manual_seed(0)
    members = [torch.nn.Linear(4, 5) for _ in range(3)]
    x = torch.randn(6, 4)
    with torch.no_grad():
        probs = torch.stack([F.softmax(m(x), -1) for m in members]).mean(0)
        geo = torch.stack([F.log_softmax(m(x), -1) for m in members]).mean(0)
    assert torch.allclose(ensemble_teacher_logprobs(members, x), probs.log(), atol=1e-6)
    assert torch.allclose(ensemble_teacher_logprobs(members, x, rule="log_linear"), F.log_softmax(geo, -1), atol=1e-6)
    assert torch.allclose(teacher_logits(members[0], x), members[0](x), atol=0)
    with pytest.raises(ValueError, match="models is empty"):
        ensemble_teacher_logprobs([], x)


def test_hidden_state_distillation_shapes_and_projection():
    assert uniform_layer_map(2, 4) == [(1, 2), (2, 4)]
    assert uniform_layer_map(3, 3) == [(1, 1), (2, 2), (3, 3)]
    student = [torch.randn(2, 5, 8, requires_grad=True) for _ in range(3)]
    teacher = [torch.randn(2, 5, 12) for _ in range(5)]
    pairs = uniform_layer_map(2, 4)
    proj = HiddenProjector([8, 8], [12, 12])
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, :2] = False
    loss = hidden_state_loss(student, teacher, pairs, proj, mask=mask)
    loss.backward()
    assert loss.ndim == 0 and proj.maps[0].weight.grad is not None and student[1].grad is not None
    want = sum(((proj(i, student[s]) - teacher[t]) ** 2).mean(-1)[mask].mean() for i, (s, t) in enumerate(pairs)) / 2
    assert torch.allclose(loss, want)
    same = HiddenProjector([12], [12])
    assert isinstance(same.maps[0], torch.nn.Identity)
    assert hidden_state_loss([teacher[1]], teacher, [(0, 1)], same, kind="cosine").abs().item() < 1e-6
    with pytest.raises(ValueError, match="give a HiddenProjector"):
        hidden_state_loss(student, teacher, pairs)
    with pytest.raises(ValueError, match="out of range"):
        hidden_state_loss(student, teacher, [(1, 9)], proj)
    with pytest.raises(ValueError, match="student_widths has 1 entries"):
        HiddenProjector([8], [12, 12])


def test_capture_features_across_architectures():
    from labkit.models import DigitCNN, DigitMLP

    cnn, mlp = DigitCNN(channels=4), DigitMLP(hidden=(16,))
    x = torch.rand(3, 64)
    out, (feat,) = capture_features(cnn, ["conv2"], x)
    assert out.shape == (3, 10) and feat.shape == (3, 8 * 4 * 4)
    _, (h,) = capture_features(mlp, ["layers.0"], x)
    proj = HiddenProjector([16], [128])
    loss = hidden_state_loss([h], [feat], [(0, 0)], proj)
    assert loss.ndim == 0
    with pytest.raises(ValueError, match="not in the model"):
        capture_features(mlp, ["conv9"], x)


def test_int8_quantisation_keeps_outputs_close_and_shrinks_size():
    from labkit.models import DigitMLP

    torch.manual_seed(0)
    model = DigitMLP(hidden=(128, 128)).eval()
    x = torch.rand(32, 64)
    with torch.no_grad():
        ref = model(x)
        dyn = quantize_dynamic_int8(model)(x)
        wo_model, nbytes = weight_only_int8(model)
        wo = wo_model(x)
    assert (dyn - ref).abs().max() < 0.05 and (wo - ref).abs().max() < 0.05
    assert not torch.equal(wo, ref)  # the weights really were rounded
    n_linear = sum(m.weight.numel() for m in model.layers)
    assert nbytes == n_linear + sum(m.out_features for m in model.layers) * 4
    assert model_size_bytes(quantize_dynamic_int8(model)) < 0.4 * model_size_bytes(model)
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_dynamic_int8(torch.nn.ReLU())


def test_cache_save_and_load_round_trip(tmp_path, logits):
    from labkit.distill import load_cache, save_cache

    _, t, _ = logits
    for cache in (topk_cache(t, k=3, missing="other", temperature=2.0), sampled_cache(t, num_samples=5)):
        path = save_cache(cache, tmp_path / "c.safetensors", overwrite=True)
        back = load_cache(path)
        assert type(back) is type(cache) and torch.equal(back.indices, cache.indices)
        assert back.vocab_size == 9 and back.temperature == cache.temperature
        if hasattr(cache, "logprobs"):
            assert torch.equal(back.logprobs, cache.logprobs) and back.missing == "other"
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_cache(cache, tmp_path / "c.safetensors")
    with pytest.raises(FileNotFoundError, match="no cache"):
        load_cache(tmp_path / "missing.safetensors")
    assert not list(tmp_path.glob("*.tmp"))


def test_mistake_agreement():
    from labkit.distill import mistake_agreement

    y = torch.tensor([0, 1, 2, 3, 4])
    teacher = torch.tensor([0, 2, 2, 1, 4])  # wrong on items 1 (says 2) and 3 (says 1)
    student = torch.tensor([0, 2, 2, 3, 0])  # copies the first mistake, gets the second right
    out = mistake_agreement(student, teacher, y)
    assert out == pytest.approx({"agreement": 0.6, "teacher_errors": 2, "same_mistake": 0.5, "student_also_wrong": 0.5})
    assert mistake_agreement(y, y, y)["same_mistake"] is None
    with pytest.raises(ValueError, match="label vectors"):
        mistake_agreement(student[:3], teacher, y)
