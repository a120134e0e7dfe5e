"""labkit.merge on tensors and state dicts: golden values computed by hand (float64), properties,
and every error path. The YAML runner is tested in test_merge_io.py."""
import math

import pytest
import torch
from torch import nn

from labkit import merge as M

F64 = torch.float64


def t(*values):
    return torch.tensor(values, dtype=F64)


def close(got, expected, atol=1e-6):
    expected = expected if isinstance(expected, torch.Tensor) else torch.tensor(expected, dtype=F64)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert torch.allclose(got.to(F64), expected.to(F64), atol=atol, rtol=0), (got, expected)


# ------------------------------------------------------------------------------ per-tensor methods


def test_linear_golden():
    close(M.linear([t(1, 2), t(3, 6)], [1, 3]), [2.5, 5.0])               # (1*1+3*3)/4, (2+18)/4
    close(M.linear([t(1, 2), t(3, 6)], [1, 3], normalize=False), [10.0, 20.0])
    with pytest.raises(ValueError, match="sum to 0"):
        M.linear([t(1.0), t(2.0)], [1, -1])
    with pytest.raises(ValueError, match="2 tensors but 1 weights"):
        M.linear([t(1.0), t(2.0)], [1])


def test_slerp_golden():
    h = math.sqrt(0.5)
    close(M.slerp(0.5, t(1, 0), t(0, 1)), [h, h])
    close(M.slerp(1 / 3, t(1, 0), t(0, 1)), [math.sqrt(3) / 2, 0.5])       # 30 degrees of 90
    close(M.slerp(0.5, t(2, 0), t(0, 1)), [2 * h, h])                        # angle from directions, norms kept
    close(M.slerp(0.0, t(2, 0), t(0, 1)), [2.0, 0.0])                        # t=0 is v0 (the base)
    close(M.slerp(1.0, t(2, 0), t(0, 1)), [0.0, 1.0])


def test_slerp_colinear_falls_back_to_lerp():
    v0, v1 = t(1, 1), t(2, 2.0001)
    close(M.slerp(0.25, v0, v1), 0.75 * v0 + 0.25 * v1)
    close(M.slerp(0.5, t(1, 0), t(-3, 0)), [-1.0, 0.0])                      # antiparallel: lerp too


def test_task_arithmetic_golden():
    base, a, b = t(1, 1, 1), t(2, 1, 0), t(1, 3, 1)
    # deltas [1,0,-1], [0,2,0]; weights 1, .5 -> [1,1,-1]; lambda .5 -> [.5,.5,-.5]
    close(M.task_arithmetic(base, [a, b], [1, 0.5], lambda_=0.5), [1.5, 1.5, 0.5])
    # normalize divides by the weight sum 1.5
    close(M.task_arithmetic(base, [a, b], [1, 0.5], normalize=True), [1 + 1 / 1.5, 1 + 1 / 1.5, 1 - 1 / 1.5])


TIES_DELTAS = [t(3, -1, 0.5, -2), t(-1, 2, 0.2, -4), t(2, -3, -0.1, 1)]


def test_ties_trim_elect_disjoint_mean_golden():
    base = torch.zeros(4, dtype=F64)
    xs = [base + d for d in TIES_DELTAS]
    # trim to 2 of 4: [3,0,0,-2], [0,2,0,-4], [2,-3,0,0]; signs of the sum [5,-1,0,-6]: + - + -
    # agreeing entries: (3+2)/2, -3/1, nothing (0), (-2-4)/2
    close(M.ties(base, xs, [1, 1, 1], density=0.5), [2.5, -3.0, 0.0, -3.0])
    close(M.ties(base, xs, [1, 1, 1], density=0.5, lambda_=2.0), [5.0, -6.0, 0.0, -6.0])
    # weights 1,2,1: weighted [3,0,0,-2], [0,4,0,-8], [2,-3,0,0]; sum [5,1,0,-10]: + + + -
    # weighted disjoint mean: (3+2)/(1+1), 4/2, 0, (-2-8)/(1+2)
    close(M.ties(base, xs, [1, 2, 1], density=0.5), [2.5, 2.0, 0.0, -10 / 3])
    # normalize=False sums the agreeing weighted deltas
    close(M.ties(base, xs, [1, 1, 1], density=0.5, normalize=False), [5.0, -3.0, 0.0, -6.0])


def test_elect_sign_sum_vs_count():
    ds = [t(1, -5), t(1, 1), t(1, 1)]
    close(M.elect_sign(ds, "sum"), [1.0, -1.0])      # -5+1+1 < 0
    close(M.elect_sign(ds, "count"), [1.0, 1.0])     # two positive signs out of three
    close(M.elect_sign([t(0.0), t(0.0)], "sum"), [1.0])  # ties go to +, as in mergekit
    with pytest.raises(ValueError, match="consensus"):
        M.elect_sign(ds, "vote")


def test_magnitude_trim_golden_and_edges():
    d = t(0.1, -0.9, 0.5, -0.3)
    close(M.magnitude_trim(d, 0.5), [0, -0.9, 0.5, 0])
    close(M.magnitude_trim(d, 0.5, rescale_norm="l1"), torch.tensor([0, -0.9, 0.5, 0], dtype=F64) * (1.8 / 1.4))
    close(M.magnitude_trim(d, 1.0), d)
    close(M.magnitude_trim(d, 0.1), [0, -0.9, 0, 0])  # int(0.4) = 0 but a positive density keeps one
    close(M.magnitude_trim(d, 0.0), [0, 0, 0, 0])
    close(M.magnitude_trim(d, 0.5, threshold=0.3), [0, -0.9, 0.5, -0.3])
    close(M.magnitude_trim(t(1, -1, 1, 0.5), 0.5), [1, -1, 0, 0])  # ties at the cut: first ones kept


def test_consume_gives_the_same_merge_and_otherwise_leaves_inputs_alone():
    torch.manual_seed(0)
    base = torch.randn(50)
    xs = [base + torch.randn(50) for _ in range(3)]
    keep = [x.clone() for x in xs]
    for method, params in [("ties", {"density": 0.3}), ("dare_ties", {"density": 0.5}), ("task_arithmetic", {})]:
        glob, per_model = M.resolve_params(method, params, 3, fill_weight=1.0)
        a = M.merge_tensor(method, base, xs, glob, per_model, name="w")
        assert all(torch.equal(x, k) for x, k in zip(xs, keep))
        b = M.merge_tensor(method, base, [x.clone() for x in xs], glob, per_model, name="w", consume=True)
        assert torch.equal(a, b), method


def test_breadcrumbs_golden():
    d = t(0.3, -1.0, 0.1, 0.7, -0.5, 0.9, 0.2, -0.8, 0.4, 0.6)
    # n=10, keep 5, gamma .1 removes the largest (|-1.0|), then the 4 smallest (.1 .2 .3 .4)
    close(M.breadcrumbs_trim(d, 0.5, gamma=0.1), [0, 0, 0, 0.7, -0.5, 0.9, 0, -0.8, 0, 0.6])
    # gamma too large for the density: outlier removal shrinks so that 9 entries stay (drops |-1.0|)
    close(M.breadcrumbs_trim(d, 0.9, gamma=0.5), [0.3, 0, 0.1, 0.7, -0.5, 0.9, 0.2, -0.8, 0.4, 0.6])
    # int(gamma n) = 0: no outlier removed, the density cut still applies
    close(M.breadcrumbs_trim(d, 0.8, gamma=0.01), [0.3, -1.0, 0, 0.7, -0.5, 0.9, 0, -0.8, 0.4, 0.6])
    base = torch.zeros(10, dtype=F64)
    close(M.breadcrumbs(base, [d, d], [1, 1], density=0.5, gamma=0.1),
          2 * M.breadcrumbs_trim(d, 0.5, gamma=0.1))


def test_dare_rescale_variants_and_seed():
    torch.manual_seed(0)
    d = torch.randn(2000, dtype=torch.float32)
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    a = M.random_drop(d, 0.3, g(1))                        # mergekit: match the L1 norm
    assert torch.equal(a, M.random_drop(d, 0.3, g(1)))     # seeded: reproducible
    assert not torch.equal(a, M.random_drop(d, 0.3, g(2)))
    kept = a != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.05
    assert math.isclose(a.abs().sum().item(), d.abs().sum().item(), rel_tol=1e-5)
    b = M.random_drop(d, 0.3, g(1), rescale_norm="density")  # DARE paper: divide by 1 - p
    assert torch.equal(b != 0, kept)                           # same mask for the same seed
    close(b[kept], d[kept] / 0.3, atol=1e-5)
    close(M.random_drop(d, 0.3, g(1), rescale_norm=None)[kept], d[kept])
    # 1/(1-p) is unbiased: averaged over many draws the delta comes back
    mean = torch.stack([M.random_drop(d[:50], 0.5, g(s), rescale_norm="density") for s in range(400)]).mean(0)
    assert (mean - d[:50]).abs().max() < 0.35
    with pytest.raises(ValueError, match="rescale_norm"):
        M.rescale_to_norm(d, d, "l3")


def test_rescale_to_norm_golden():
    orig, masked = t(3, -4, 0), t(3, 0, 0)
    close(M.rescale_to_norm(masked, orig, "l1"), [7.0, 0, 0])
    close(M.rescale_to_norm(masked, orig, "l2"), [5.0, 0, 0])
    close(M.rescale_to_norm(masked, orig, "linf"), [4.0, 0, 0])
    close(M.rescale_to_norm(masked, orig, "density", density=0.5), [6.0, 0, 0])
    close(M.rescale_to_norm(t(0, 0, 0), orig, "l1"), [0.0, 0, 0])  # nothing kept: no division by 0


def test_model_stock_golden():
    base = torch.zeros(2, dtype=F64)
    close(M.model_stock(base, [t(1, 0), t(0, 1)]), [0.0, 0.0])          # orthogonal: t = 0, the base
    close(M.model_stock(base, [t(1, 0), t(2, 0)]), [1.5, 0.0])          # colinear: t = 1, the average
    c = 1 / math.sqrt(2)
    tt = 2 * c / (1 + c)                                                # N = 2
    close(M.model_stock(base, [t(1, 0), t(1, 1)]), [tt * 1.0, tt * 0.5])
    # filter_wise: one angle per row
    base2 = torch.zeros(2, 2, dtype=F64)
    got = M.model_stock(base2, [t(1, 0, 1, 0).view(2, 2), t(0, 1, 2, 0).view(2, 2)], filter_wise=True)
    close(got, [[0.0, 0.0], [1.5, 0.0]])
    with pytest.raises(ValueError, match="at least 2"):
        M.model_stock(base, [t(1, 0)])


# ------------------------------------------------------------------------------ registry, merge()


def sd(**tensors):
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()}


def test_registry_uses_mergekit_names_and_defaults():
    assert set(M.METHODS) >= {"linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties",
                              "breadcrumbs", "model_stock"}
    assert M.METHODS["ties"].params["normalize"] is True and M.METHODS["ties"].params["rescale"] is False
    assert M.METHODS["dare_ties"].params["normalize"] is False and M.METHODS["dare_ties"].params["rescale"] is True
    assert M.METHODS["task_arithmetic"].params["lambda"] == 1.0
    assert M.METHODS["breadcrumbs"].model_params["gamma"] == 0.01
    assert M.METHODS["linear"].params["normalize"] is True
    with pytest.raises(ValueError, match="unknown merge method 'frankenmerge'"):
        M.get_method("frankenmerge")


def test_merge_state_dicts_matches_tensor_functions():
    base = sd(a=[0, 0, 0, 0], b=[1.0, 2.0])
    ms = [sd(a=d.tolist(), b=[1.5, 2.0]) for d in TIES_DELTAS]
    out = M.merge("ties", ms, base, density=0.5)
    close(out["a"], [2.5, -3.0, 0.0, -3.0])
    assert out["a"].dtype == torch.float32
    out = M.merge("task_arithmetic", ms[:2], base, weight=[1, 0.5], lambda_=0.5)
    close(out["b"], [1.0 + 0.5 * 0.75, 2.0])
    assert torch.equal(M.merge("task_arithmetic", ms[:2], base, **{"lambda": 0.5}, weight=[1, 0.5])["b"], out["b"])
    close(M.merge("linear", ms[:2], weight=[1, 3])["b"], [1.5, 2.0])
    close(M.merge("slerp", ms[:1], base, t=0.0)["b"], [1.0, 2.0])


def test_ties_trim_scope_model_vs_tensor():
    base = sd(a=[0, 0], b=[0, 0])
    ft = sd(a=[10, 9], b=[1, 2])
    per_tensor = M.merge("ties", [ft], base, density=0.5)
    close(per_tensor["a"], [10, 0]), close(per_tensor["b"], [0, 2])
    whole_model = M.merge("ties", [ft], base, density=0.5, trim_scope="model")  # top 2 of all 4 entries
    close(whole_model["a"], [10, 9]), close(whole_model["b"], [0, 0])
    with pytest.raises(ValueError, match="applies to .ties. only"):
        M.merge("task_arithmetic", [ft], base, trim_scope="model")
    with pytest.raises(ValueError, match="trim_scope"):
        M.merge("ties", [ft], base, trim_scope="layer")


def test_dare_merge_seeded_and_rescale_modes():
    torch.manual_seed(0)
    base = {"w": torch.zeros(500)}
    ms = [{"w": torch.randn(500)} for _ in range(2)]
    a = M.merge("dare_linear", ms, base, density=0.4, seed=3)
    assert torch.equal(a["w"], M.merge("dare_linear", ms, base, density=0.4, seed=3)["w"])
    assert not torch.equal(a["w"], M.merge("dare_linear", ms, base, density=0.4, seed=4)["w"])
    paper = M.merge("dare_linear", ms, base, density=0.4, seed=3, rescale_norm="density")
    assert torch.equal(paper["w"] != 0, a["w"] != 0)
    # each model's drop differs (not the same mask for every model)
    m0 = M.merge("dare_linear", ms[:1] * 2, base, weight=[1, 0], density=0.4, seed=3)["w"] != 0
    m1 = M.merge("dare_linear", ms[:1] * 2, base, weight=[0, 1], density=0.4, seed=3)["w"] != 0
    assert not torch.equal(m0, m1)
    no_rescale = M.merge("dare_ties", ms, base, density=0.4, seed=3, rescale=False)
    assert no_rescale["w"].abs().sum() < a["w"].abs().sum()


def test_merge_computes_in_float32_and_keeps_dtype():
    torch.manual_seed(0)
    ms = [{"w": torch.randn(64).half()} for _ in range(3)]
    out = M.merge("linear", ms, weight=[0.2, 0.3, 0.5])
    assert out["w"].dtype == torch.float16
    expected = sum(w * m["w"].float() for w, m in zip([0.2, 0.3, 0.5], ms)) / 1.0
    assert torch.equal(out["w"], expected.half())
    assert M.merge("linear", ms, out_dtype=torch.bfloat16)["w"].dtype == torch.bfloat16


def test_merge_copies_integer_buffers_and_accepts_modules():
    a, b = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    a.num_batches_tracked += 5
    with torch.no_grad():
        a.weight.fill_(1.0), b.weight.fill_(3.0)
    out = M.merge("linear", [a, b])
    close(out["weight"], [2.0, 2.0, 2.0])
    assert out["num_batches_tracked"].item() == 5 and out["num_batches_tracked"].dtype == torch.int64


def test_merge_errors():
    base, x = sd(w=[0.0]), sd(w=[1.0])
    with pytest.raises(ValueError, match="needs a base model"):
        M.merge("ties", [x])
    with pytest.raises(ValueError, match="takes 1 model"):
        M.merge("slerp", [x, x], base, t=0.5)
    with pytest.raises(ValueError, match="needs parameter 't'"):
        M.merge("slerp", [x], base)
    with pytest.raises(ValueError, match="at least 2"):
        M.merge("model_stock", [x], base)
    with pytest.raises(ValueError, match="ignores a base"):
        M.merge("linear", [x], base)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['densty'\]"):
        M.merge("ties", [x], base, densty=0.5)
    with pytest.raises(ValueError, match="2 values for 1 models"):
        M.merge("ties", [x], base, weight=[1, 2])
    with pytest.raises(ValueError, match="tensor 'v' is in model 1 but missing from model 0"):
        M.merge("linear", [x, {"w": torch.ones(1), "v": torch.ones(1)}])
    with pytest.raises(ValueError, match="tensor 'w' has shape"):
        M.merge("linear", [x, {"w": torch.ones(2)}])
    with pytest.raises(TypeError, match="nn.Module or a state dict"):
        M.merge("linear", [x, [1.0]])


def test_checkpoint_average_and_soups():
    cks = [sd(w=[float(i)]) for i in range(6)]
    close(M.average_checkpoints(cks)["w"], [2.5])
    close(M.average_checkpoints(cks, last=2)["w"], [4.5])
    close(M.average_checkpoints(cks[:2], weights=[1, 3])["w"], [0.75])
    close(M.uniform_soup(cks[:3])["w"], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        M.average_checkpoints([])


def test_greedy_soup_golden():
    cands = [sd(w=[v]) for v in (0.0, 1.5, 0.8, 3.0)]
    evaluate = lambda s: -(s["w"].item() - 1.0) ** 2  # noqa: E731 (best at w = 1)
    r = M.greedy_soup(cands, evaluate)
    # order by own score: 0.8, 1.5, 0.0, 3.0; +1.5 -> 1.15 (better, kept); +0 -> .767 (worse); +3 -> 1.77 (worse)
    assert r.chosen == [2, 1]
    close(r.state_dict["w"], [1.15])
    assert math.isclose(r.score, -(0.15 ** 2), rel_tol=1e-5)
    assert [h[2] for h in r.history] == [True, True, False, False]
    assert r.score >= max(r.individual)  # never worse than the best single on the selection data
    with pytest.raises(ValueError):
        M.greedy_soup([], evaluate)


def test_task_vector_arithmetic():
    base, fa, fb = sd(w=[1.0, 1.0], s=[0.0]), sd(w=[2.0, 1.0], s=[1.0]), sd(w=[1.0, 3.0], s=[0.0])
    ta, tb = M.TaskVector.between(base, fa), M.TaskVector.between(base, fb)
    close((ta + tb).deltas["w"], [1.0, 2.0])
    close(sum([ta, tb]).deltas["w"], [1.0, 2.0])
    close((-ta).deltas["w"], [-1.0, 0.0])
    close((ta - tb).deltas["w"], [1.0, -2.0])
    close((0.5 * ta).deltas["w"], [0.5, 0.0]), close((ta * 2).deltas["s"], [2.0])
    close((ta + tb).apply_to(base)["w"], [2.0, 3.0])
    close(ta.apply_to(base, scale=-1.0)["w"], [0.0, 1.0])       # negation forgets the skill
    assert math.isclose(ta.norm(), math.sqrt(2))
    assert ta.cosine(tb) == 0.0  # orthogonal
    with pytest.raises(TypeError):
        ta * ta
    with pytest.raises(TypeError):
        ta + 1.0
    with pytest.raises(ValueError, match="different tensors"):
        ta + M.TaskVector({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="has no tensor 's'"):
        ta.apply_to(sd(w=[0.0, 0.0]))
    with pytest.raises(ValueError, match="shape"):
        ta.apply_to(sd(w=[0.0], s=[0.0]))


def test_task_vector_apply_keeps_dtype():
    base = {"w": torch.ones(3, dtype=torch.bfloat16), "step": torch.tensor(7)}
    ft = {"w": torch.full((3,), 2.0, dtype=torch.bfloat16), "step": torch.tensor(9)}
    tv = M.TaskVector.between(base, ft)
    assert set(tv.deltas) == {"w"}
    out = tv.apply_to(base, scale=3.0)
    assert out["w"].dtype == torch.bfloat16 and out["w"].tolist() == [4.0] * 3 and out["step"].item() == 7


# ------------------------------------------------------------------------------ alignment


def mlp(seed, widths=(5, 7, 6, 3)):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).double()


def test_permutation_keeps_function_and_weight_matching_undoes_it():
    a = mlp(0)
    names = M.linear_layer_names(a)
    assert names == ["0", "2", "4"]
    g = torch.Generator().manual_seed(1)
    perms = [torch.randperm(7, generator=g), torch.randperm(6, generator=g)]
    b = M.load_merged(a, M.permute_linear_chain(a.state_dict(), names, perms))
    x = torch.randn(10, 5, dtype=F64)
    assert torch.allclose(a(x), b(x))                          # same function ...
    assert not torch.allclose(a[0].weight, b[0].weight)        # ... different parameters
    aligned = M.align_mlp(a, b)
    for k, v in a.state_dict().items():
        assert torch.allclose(aligned.state_dict()[k], v), k   # alignment recovers A exactly
    assert torch.allclose(aligned(x), b(x))


def test_alignment_brings_independent_models_closer():
    a, b = mlp(0, (5, 32, 3)), mlp(1, (5, 32, 3))
    aligned = M.align_mlp(a, b)
    dist = lambda m: sum((m.state_dict()[k] - a.state_dict()[k]).pow(2).sum() for k in a.state_dict())  # noqa
    assert dist(aligned) < dist(b)
    x = torch.randn(10, 5, dtype=F64)
    assert torch.allclose(aligned(x), b(x))
    with pytest.raises(ValueError, match="different Linear layers"):
        M.align_mlp(a, mlp(0, (5, 32, 8, 3)))
    with pytest.raises(ValueError, match=">= 2"):
        M.weight_matching([(torch.ones(2, 2), None)], [(torch.ones(2, 2), None)])


# ------------------------------------------------------------------------------ diagnostics


def test_diagnostics_golden():
    ta = M.TaskVector({"w": t(1, -1, 0), "v": t(1.0)})
    tb = M.TaskVector({"w": t(-1, -1, 2), "v": t(0.0)})
    tc = M.TaskVector({"w": t(0, 0, 0), "v": t(-1.0)})
    rates = M.sign_conflict_rate([ta, tb])
    assert rates == {"w": pytest.approx(1 / 3), "v": 0.0}
    assert M.sign_conflict_rate([ta, tc])["v"] == 1.0
    cm = M.cosine_matrix([ta, tb, tc])
    close(cm[0, 1], (-1 + 1 + 0) / (math.sqrt(3) * math.sqrt(6)))
    close(cm.diagonal(), [1.0, 1.0, 1.0])
    assert torch.equal(cm, cm.T)
    tv = M.TaskVector({"w": t(4, -3, 2, 1)})
    assert M.trimmed_mass(tv, 0.5) == pytest.approx(0.3)      # removes |2|+|1| of 10
    assert M.trimmed_mass(tv, 0.5, per_tensor=True) == {"w": pytest.approx(0.3)}


def test_interpolation_curve_and_interpolate():
    a, b = sd(w=[0.0, 2.0]), sd(w=[4.0, 2.0])
    close(M.interpolate(a, b, 0.25)["w"], [1.0, 2.0])
    close(M.interpolate(a, b, 1.5)["w"], [6.0, 2.0])  # extrapolation
    rows = M.interpolation_curve(a, b, lambda s: {"loss": float(s["w"][0]), "acc": 1.0}, alphas=[0, 0.5, 1])
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    assert [r["loss"] for r in rows] == [0.0, 2.0, 4.0]
    rows = M.interpolation_curve(a, b, lambda s: float(s["w"][0]))
    assert len(rows) == 11 and rows[-1]["value"] == 4.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_merge_on_gpu_equals_cpu():
    torch.manual_seed(0)
    base = {"w": torch.randn(300, 40)}
    ms = [{"w": base["w"] + 0.1 * torch.randn(300, 40)} for _ in range(3)]
    for method, kw in [("ties", dict(density=0.3)), ("dare_ties", dict(density=0.5)), ("slerp", dict(t=0.3))]:
        models = ms[:1] if method == "slerp" else ms
        cpu = M.merge(method, models, base, device="cpu", **kw)["w"]
        gpu = M.merge(method, models, base, device="cuda", **kw)["w"]
        assert torch.allclose(cpu, gpu, atol=1e-5), method


def test_align_digit_mlp():
    models = pytest.importorskip("labkit.models")
    torch.manual_seed(0)
    a, b = models.DigitMLP(hidden=(16, 12)), models.DigitMLP(hidden=(16, 12))
    assert M.linear_layer_names(a) == ["layers.0", "layers.1", "layers.2"]
    aligned = M.align_mlp(a, b)
    x = torch.rand(8, 64)
    assert torch.allclose(aligned(x), b(x), atol=1e-6)
    names = M.linear_layer_names(a)
    perms = [torch.randperm(16), torch.randperm(12)]
    shuffled = M.load_merged(a, M.permute_linear_chain(a.state_dict(), names, perms))
    back = M.align_mlp(a, shuffled)
    assert all(torch.allclose(back.state_dict()[k], v) for k, v in a.state_dict().items())


def test_a_new_method_is_one_registry_entry(monkeypatch):
    """Registering a MergeMethod is all it takes: merge() resolves, validates and applies it."""
    from labkit.merge.registry import Param

    def midpoint(base, tensors, params, model_params):  # theta_base + alpha (mean_i theta_i - theta_base)
        return base + params["alpha"] * (sum(tensors) / len(tensors) - base)

    entry = M.MergeMethod("midpoint", (Param("alpha", 0.5, low=0.0, high=1.0),), needs_base=True, min_models=1,
                          combine=midpoint)
    monkeypatch.setitem(M.METHODS, "midpoint", entry)
    base, a, b = {"w": t(0.0, 2.0)}, {"w": t(2.0, 2.0)}, {"w": t(4.0, -2.0)}
    close(M.merge("midpoint", [a, b], base)["w"], [1.5, 1.0])          # mean (3, 0); halfway from (0, 2)
    close(M.merge("midpoint", [a, b], base, alpha=1.0)["w"], [3.0, 0.0])
    with pytest.raises(ValueError, match=r"'alpha' must be in \[0, 1\], not 2"):
        M.merge("midpoint", [a, b], base, alpha=2)
    with pytest.raises(ValueError, match="unknown parameter"):
        M.merge("midpoint", [a, b], base, density=0.5)
    with pytest.raises(ValueError, match="needs a base model"):
        M.merge("midpoint", [a, b])


def test_every_declared_parameter_has_a_type_and_its_default_is_valid():
    for method in M.METHODS.values():
        for p in method.parameters:
            assert p.kind in ("number", "bool"), (method.name, p.name)
            if p.default is not M.REQUIRED:
                assert p.check(p.default) == p.default, (method.name, p.name)
