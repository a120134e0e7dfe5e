"""labkit.distill.losses against plain float64 references written out here, term by term."""
import math

import pytest
import torch
import torch.nn.functional as F

from labkit.distill import (cross_entropy, distillation_loss, forward_kl, generalized_jsd, reverse_kl,
                            shift_labels, total_variation)

F64 = torch.float64  # every reference is computed in float64


def _probs(logits, T=1.0):
    z = logits / T
    e = (z - z.max(-1, keepdim=True).values).exp()
    return e / e.sum(-1, keepdim=True)


def ref_kl(p, q):
    """sum_v p log(p / q) per row, 0 log 0 = 0, written with plain loops over rows."""
    out = torch.zeros(p.shape[:-1], dtype=F64)
    flat_p, flat_q, flat_out = p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1]), out.view(-1)
    for r in range(flat_p.shape[0]):
        total = 0.0
        for a, b in zip(flat_p[r].tolist(), flat_q[r].tolist()):
            if a > 0:
                total += a * math.log(a / b)
        flat_out[r] = total
    return out


def ref_jsd(pt, ps, beta):
    m = (1 - beta) * ps + beta * pt
    return beta * ref_kl(pt, m) + (1 - beta) * ref_kl(ps, m)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 7, generator=g, dtype=F64) * 2
    t = torch.randn(2, 5, 7, generator=g, dtype=F64) * 2
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 2, 6, -100]])
    return s, t, labels


def _token_mean(per_token, labels):
    mask = labels != -100
    return per_token[mask].sum() / mask.sum()


def test_forward_and_reverse_kl_match_reference_with_t2(batch):
    s, t, labels = batch
    for T in (1.0, 2.5):
        ps, pt = _probs(s, T), _probs(t, T)
        want_f = T ** 2 * _token_mean(ref_kl(pt, ps), labels)
        want_r = T ** 2 * _token_mean(ref_kl(ps, pt), labels)
        assert torch.allclose(forward_kl(s, t, labels, temperature=T), want_f, atol=1e-12)
        assert torch.allclose(reverse_kl(s, t, labels, temperature=T), want_r, atol=1e-12)
        # without the factor: T^2 times smaller
        assert torch.allclose(forward_kl(s, t, labels, temperature=T, scale_t2=False), want_f / T ** 2, atol=1e-12)
    assert not torch.allclose(forward_kl(s, t, labels), reverse_kl(s, t, labels))


def test_f_kl_div_convention_is_kl_of_target_given_input(batch):
    s, t, _ = batch
    s_logp, t_logp = F.log_softmax(s, -1), F.log_softmax(t, -1)
    # F.kl_div(input, target) = KL(target || input): the student's log-probs go in as input for forward KL
    via_torch = F.kl_div(s_logp, t_logp, reduction="sum", log_target=True)
    assert torch.allclose(via_torch, forward_kl(s, t, reduction="sum"), atol=1e-12)
    assert not torch.allclose(via_torch, reverse_kl(s, t, reduction="sum"))
    # and F.kl_div's batchmean divides by the first axis, like ours
    assert torch.allclose(F.kl_div(s_logp, t_logp, reduction="batchmean", log_target=True),
                          forward_kl(s, t, reduction="batchmean"), atol=1e-12)


def test_every_reduction(batch):
    s, t, labels = batch
    per = ref_kl(_probs(t), _probs(s))
    mask = labels != -100
    n, V = int(mask.sum()), s.shape[-1]
    expected = {"sum": per[mask].sum(), "token_mean": per[mask].sum() / n,
                "batchmean": per[mask].sum() / s.shape[0], "mean": per[mask].sum() / (n * V)}
    for reduction, want in expected.items():
        assert torch.allclose(forward_kl(s, t, labels, reduction=reduction), want, atol=1e-12), reduction
    none = forward_kl(s, t, labels, reduction="none")
    assert none.shape == labels.shape and (none[~mask] == 0).all()
    assert torch.allclose(none[mask], per[mask], atol=1e-12)
    # gradient accumulation: divide by the global count, not this micro-batch's
    assert torch.allclose(forward_kl(s, t, labels, num_items_in_batch=3 * n), per[mask].sum() / (3 * n), atol=1e-12)


def test_masked_positions_do_not_matter(batch):
    s, t, labels = batch
    s2 = s.clone()
    s2[labels == -100] = 1e4  # garbage where masked
    assert torch.allclose(forward_kl(s, t, labels), forward_kl(s2, t, labels), atol=1e-12)


def test_jsd_endpoints_are_the_two_kls_exactly(batch):
    s, t, labels = batch
    assert torch.equal(generalized_jsd(s, t, labels, beta=0.0), forward_kl(s, t, labels))
    assert torch.equal(generalized_jsd(s, t, labels, beta=1.0), reverse_kl(s, t, labels))


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_interior_matches_reference(batch, beta):
    s, t, labels = batch
    raw = _token_mean(ref_jsd(_probs(t), _probs(s), beta), labels)
    assert torch.allclose(generalized_jsd(s, t, labels, beta=beta, normalize=False), raw, atol=1e-12)
    assert torch.allclose(generalized_jsd(s, t, labels, beta=beta), raw / (beta * (1 - beta)), atol=1e-12)


def test_jsd_half_is_symmetric_and_bounded_by_log2(batch):
    s, t, _ = batch
    a = generalized_jsd(s, t, beta=0.5, normalize=False, reduction="none")
    b = generalized_jsd(t, s, beta=0.5, normalize=False, reduction="none")
    assert torch.allclose(a, b, atol=1e-12) and (a <= math.log(2) + 1e-12).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_jsd_has_no_jump_near_the_ends(batch, dtype):
    tol = 1e-3
    s, t, labels = (x.to(dtype) if x.is_floating_point() else x for x in batch)
    fwd, rev = forward_kl(s, t, labels), reverse_kl(s, t, labels)
    near0 = generalized_jsd(s, t, labels, beta=1e-6)
    near1 = generalized_jsd(s, t, labels, beta=1 - 1e-6)
    assert abs(near0.item() - fwd.item()) < tol * fwd.item()
    assert abs(near1.item() - rev.item()) < tol * rev.item()
    if dtype == torch.float64:  # continuous: the gap shrinks in proportion to the distance from the end
        gap = lambda b: abs(generalized_jsd(s, t, labels, beta=b).item() - fwd.item())  # noqa: E731
        assert gap(1e-7) < 0.2 * gap(1e-6)
    # the unnormalised (TRL) interior does jump: it tends to 0 at the ends
    assert generalized_jsd(s, t, labels, beta=1e-6, normalize=False).item() < 1e-4


def test_total_variation_reference(batch):
    s, t, labels = batch
    tv = 0.5 * (_probs(t) - _probs(s)).abs().sum(-1)
    assert torch.allclose(total_variation(s, t, labels), _token_mean(tv, labels), atol=1e-12)
    assert 0 <= total_variation(s, t).item() <= 1


def test_identical_distributions_give_zero(batch):
    s, _, labels = batch
    for fn in (forward_kl, reverse_kl, total_variation):
        assert fn(s, s + 3.0, labels).abs().item() < 1e-12  # a shift of the logits is the same distribution
    assert generalized_jsd(s, s, labels, beta=0.3).abs().item() < 1e-12


def test_teacher_zeros_give_finite_losses_and_gradients(batch):
    s, t, labels = batch
    t = t.clone()
    t[..., 0] = -math.inf  # a token the teacher rules out (e.g. a masked vocabulary entry)
    s = s.clone().requires_grad_()
    for loss in (forward_kl(s, t, labels), generalized_jsd(s, t, labels, beta=0.3),
                 generalized_jsd(s, t, labels, beta=0.8), total_variation(s, t, labels)):
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    pt, ps = _probs(t), _probs(s.detach())
    assert torch.allclose(forward_kl(s, t, labels), _token_mean(ref_kl(pt, ps), labels), atol=1e-12)
    assert torch.allclose(generalized_jsd(s, t, labels, beta=0.3, normalize=False),
                          _token_mean(ref_jsd(pt, ps, 0.3), labels), atol=1e-12)


def test_alpha_mixes_soft_and_hard(batch):
    s, t, labels = batch
    T, alpha = 3.0, 0.7
    mask = labels != -100
    logp = torch.log(_probs(s))
    nll = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    ce = nll[mask].mean()
    soft = T ** 2 * _token_mean(ref_kl(_probs(t, T), _probs(s, T)), labels)
    got = distillation_loss(s, t, labels, alpha=alpha, temperature=T)
    assert torch.allclose(got, alpha * soft + (1 - alpha) * ce, atol=1e-12)
    assert torch.allclose(distillation_loss(s, t, labels, alpha=0.0), ce, atol=1e-12)
    assert torch.allclose(cross_entropy(s, labels), F.cross_entropy(s.reshape(-1, 7), labels.reshape(-1)), atol=1e-12)
    jsd = distillation_loss(s, t, labels, alpha=1.0, divergence="jsd", beta=0.4)
    assert torch.allclose(jsd, generalized_jsd(s, t, labels, beta=0.4))


def test_t2_keeps_the_gradient_scale():
    # Hinton's argument: the soft-target gradient scales as 1/T^2; times T^2 it stays of order 1
    g = torch.Generator().manual_seed(1)
    s = torch.randn(64, 10, generator=g, dtype=F64).requires_grad_()
    t = torch.randn(64, 10, generator=g, dtype=F64)
    norms = []
    for T in (5.0, 20.0):
        (grad,) = torch.autograd.grad(forward_kl(s, t, temperature=T), s)
        norms.append(grad.norm().item())
    assert 0.7 < norms[0] / norms[1] < 1.5  # without T^2 this ratio would be about 16


def test_shift_labels():
    labels = torch.tensor([[-100, 5, 6, 2]])
    assert shift_labels(labels).tolist() == [[5, 6, 2, -100]]


def test_bad_input_errors(batch):
    s, t, labels = batch
    with pytest.raises(ValueError, match="vocabulary size"):
        forward_kl(s, t[..., :6])
    with pytest.raises(ValueError, match="teacher_logits has shape"):
        forward_kl(s, t[:1])
    with pytest.raises(ValueError, match="labels has shape"):
        forward_kl(s, t, labels[:, :4])
    for T in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            reverse_kl(s, t, temperature=T)
    for beta in (-0.1, 1.5):
        with pytest.raises(ValueError, match="beta"):
            generalized_jsd(s, t, beta=beta)
    with pytest.raises(ValueError, match="every position is masked"):
        forward_kl(s, t, torch.full_like(labels, -100))
    # under gradient accumulation an empty micro-batch is legitimate: 0
    assert forward_kl(s, t, torch.full_like(labels, -100), num_items_in_batch=10).item() == 0
    with pytest.raises(ValueError, match="reduction"):
        forward_kl(s, t, reduction="avg")
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(s, t, labels, alpha=2.0)
    with pytest.raises(ValueError, match="divergence"):
        distillation_loss(s, t, labels, divergence="kl")
    with pytest.raises(ValueError, match="student_logits must be a floating-point"):
        forward_kl(labels, t)


def test_trl_oracle(batch):
    trl = pytest.importorskip("trl", reason="trl is not installed (an optional oracle, not a dependency)")
    try:  # TRL >= 1.x keeps GKD under trl.experimental
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        from trl import GKDTrainer

    s, t, labels = batch
    for beta in (0.0, 0.3, 0.5, 1.0):
        want = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, reduction="batchmean")
        got = generalized_jsd(s, t, labels, beta=beta, normalize=False, scale_t2=False)
        assert torch.allclose(got, want.to(got.dtype), atol=1e-10), (trl.__version__, beta)
