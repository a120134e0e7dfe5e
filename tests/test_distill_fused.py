"""The chunked (fused) loss equals the naive one, values and gradients, in float64; and on CUDA."""
import pytest
import torch

from labkit.distill import fused_linear_distill_loss, naive_linear_distill_loss


def _problem(dtype=torch.float64, device="cpu", n=(3, 11), h=6, ht=9, v=23, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).to(device)  # noqa: E731
    p = {
        "student_hidden": mk(*n, h).requires_grad_(),
        "student_weight": mk(v, h).requires_grad_(),
        "teacher_hidden": mk(*n, ht),
        "teacher_weight": mk(v, ht),
    }
    if bias:
        p["student_bias"] = mk(v).requires_grad_()
        p["teacher_bias"] = mk(v)
    labels = torch.randint(0, v, n, generator=g)
    labels[0, :4] = -100
    labels[2, -2:] = -100
    p["labels"] = labels.to(device)
    return p


def _grads(loss, p):
    wrt = [p[k] for k in ("student_hidden", "student_weight", "student_bias") if k in p]
    return torch.autograd.grad(loss, wrt)


@pytest.mark.parametrize("divergence,kwargs", [
    ("forward_kl", {"temperature": 2.0}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.3, "temperature": 1.5}),
    ("tv", {}),
])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 100])
def test_fused_equals_naive_values_and_gradients(divergence, kwargs, chunk_size):
    p = _problem(bias=chunk_size == 4)
    naive = naive_linear_distill_loss(**p, divergence=divergence, **kwargs)
    fused = fused_linear_distill_loss(**p, divergence=divergence, chunk_size=chunk_size, **kwargs)
    assert torch.allclose(fused, naive, rtol=1e-10, atol=1e-12)
    for a, b in zip(_grads(fused, p), _grads(naive, p)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reduction", ["sum", "batchmean", "token_mean"])
def test_fused_reductions_and_upstream_gradient(reduction):
    p = _problem()
    naive = naive_linear_distill_loss(**p, reduction=reduction)
    fused = fused_linear_distill_loss(**p, reduction=reduction, chunk_size=5)
    assert torch.allclose(fused, naive, rtol=1e-10)
    # a non-unit upstream gradient (the loss is scaled) must scale the stored gradients
    for a, b in zip(_grads(3.5 * fused, p), _grads(3.5 * naive, p)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    counted = fused_linear_distill_loss(**p, chunk_size=5, num_items_in_batch=100)
    assert torch.allclose(counted, naive_linear_distill_loss(**p, reduction="sum") / 100, rtol=1e-10)


def test_fused_with_precomputed_teacher_logits():
    p = _problem()
    t_logits = p["teacher_hidden"] @ p["teacher_weight"].T
    q = {k: v for k, v in p.items() if not k.startswith("teacher")}
    fused = fused_linear_distill_loss(**q, teacher_logits=t_logits, chunk_size=4)
    naive = naive_linear_distill_loss(**p)
    assert torch.allclose(fused, naive, rtol=1e-10)
    for a, b in zip(_grads(fused, q), _grads(naive, p)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_fused_trains_through_a_module_and_skips_grads_under_no_grad():
    torch.manual_seed(0)
    proj = torch.nn.Linear(4, 6, dtype=torch.float64)
    p = _problem()
    x = torch.randn(3, 11, 4, dtype=torch.float64)
    p["student_hidden"] = proj(x)
    fused_linear_distill_loss(**p, chunk_size=8).backward()
    g_fused = proj.weight.grad.clone()
    proj.weight.grad = None
    p["student_hidden"] = proj(x)
    naive_linear_distill_loss(**p).backward()
    assert torch.allclose(g_fused, proj.weight.grad, rtol=1e-9)
    with torch.no_grad():
        value = fused_linear_distill_loss(**p, chunk_size=8)
    assert not value.requires_grad


def test_fused_errors():
    p = _problem()
    with pytest.raises(ValueError, match="teacher_weight has vocabulary size"):
        fused_linear_distill_loss(**{**p, "teacher_weight": p["teacher_weight"][:-1]})
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_distill_loss(**p, chunk_size=0)
    with pytest.raises(ValueError, match="every position is masked"):
        fused_linear_distill_loss(**{**p, "labels": torch.full_like(p["labels"], -100)})
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_distill_loss(**p, reduction="mean")
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_distill_loss(**p, temperature=0.0)
    with pytest.raises(ValueError, match="the teacher is missing"):
        fused_linear_distill_loss(p["student_hidden"], p["student_weight"])


@pytest.mark.gpu
def test_fused_matches_naive_on_cuda():
    p = _problem(dtype=torch.float32, device="cuda", n=(4, 300), h=64, ht=96, v=5000)
    naive = naive_linear_distill_loss(**p, divergence="jsd", beta=0.5)
    fused = fused_linear_distill_loss(**p, divergence="jsd", beta=0.5, chunk_size=256)
    assert torch.allclose(fused, naive, rtol=1e-4)
    for a, b in zip(_grads(fused, p), _grads(naive, p)):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)


def test_default_chunk_size_follows_liger_rule():
    from labkit.distill import default_chunk_size

    assert default_chunk_size(8192, 4096, 128256) == 256  # ~N H / V rounded up to a power of two
    assert default_chunk_size(10, 8, 50000) == 64
    assert default_chunk_size(3000, 256, 48) == 4096  # a tiny vocabulary: one chunk holds everything


def test_benchmark_rows_compare_fused_with_naive_on_one_problem():
    from labkit.benchmarks.distill import _measure

    rows = _measure(H=16, V=512, N=128, dtype=torch.float32, device=torch.device("cpu"), warmup=0, repeat=1)
    methods = [r["method"] for r in rows]
    assert methods[:2] == ["naive", "fused"]
    fused = rows[1]
    assert fused["chunk"] == 64 and fused["loss_diff"] < 1e-4 and rows[0]["time_vs_naive"] == 1
    assert {"V", "N", "H", "ms", "peak_MiB", "memory_vs_naive"} <= set(fused)
