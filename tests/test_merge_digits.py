"""The digits side of the merging lab: new shift kinds, the new zoo entries and labkit.merge.digits_study."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from labkit import data, merge, zoo
from labkit.evaluate import accuracy
from labkit.merge import digits_study as ds

ORIGINAL_KINDS = ("noise", "shift", "rotate", "thicken")
NEW_KINDS = ("blur", "erase", "zoom")


def _original_shift_digits(X, kind, severity=1.0, seed=0):
    """labkit.data.shift_digits as committed before blur/erase/zoom were added (four kinds), verbatim."""
    rng = np.random.default_rng(seed)
    imgs = X.detach().cpu().numpy().reshape(-1, 8, 8).astype(np.float64)
    if kind == "noise":
        out = imgs + rng.normal(0.0, 0.3 * severity, imgs.shape)
    elif kind == "shift":
        out = np.stack([ndimage.shift(im, rng.uniform(-1, 1, 2) * severity, order=1, mode="constant")
                        for im in imgs])
    elif kind == "rotate":
        out = np.stack([ndimage.rotate(im, rng.choice([-1, 1]) * 20.0 * severity, reshape=False, order=1,
                                       mode="constant") for im in imgs])
    else:
        out = imgs
        for _ in range(max(1, int(round(severity)))):
            out = np.stack([ndimage.grey_dilation(im, size=(2, 2)) for im in out])
    out = np.clip(out, 0.0, 1.0).reshape(-1, 64).astype(np.float32)
    return torch.from_numpy(out)


@pytest.fixture(scope="module")
def digits():
    return data.load_digits()


# ----------------------------------------------------------------------------- shift kinds


def test_shift_kinds_only_appended():
    assert data.SHIFT_KINDS[:4] == ORIGINAL_KINDS and set(NEW_KINDS) <= set(data.SHIFT_KINDS)


@pytest.mark.parametrize("kind", ORIGINAL_KINDS)
@pytest.mark.parametrize("seed,severity", [(0, 1.0), (1, 1.0), (100, 1.0), (3, 2.0), (5, 0.5)])
def test_original_kinds_bit_identical(digits, kind, seed, severity):
    X = digits.X_test[:120]
    assert torch.equal(data.shift_digits(X, kind, severity, seed), _original_shift_digits(X, kind, severity, seed))


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_new_kinds_shape_range_and_determinism(digits, kind):
    X = digits.X_test
    out = data.shift_digits(X, kind, seed=0)
    assert out.shape == X.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert (out - X).abs().mean() > 0.01
    assert torch.equal(out, data.shift_digits(X, kind, seed=0))
    if kind != "blur":  # blur draws no random numbers: the same for every seed
        assert not torch.equal(out, data.shift_digits(X, kind, seed=1))


def test_erase_zeroes_one_square_and_only_removes_ink(digits):
    X = digits.X_test[:50]
    out = data.shift_digits(X, "erase", seed=2)
    assert bool((out <= X).all())
    for x, o in zip(X.view(-1, 8, 8), out.view(-1, 8, 8)):
        changed = (x != o).nonzero()
        if len(changed):  # every changed pixel lies in one 3x3 square
            assert int(changed[:, 0].max() - changed[:, 0].min()) < 3
            assert int(changed[:, 1].max() - changed[:, 1].min()) < 3
    side5 = data.shift_digits(torch.ones(4, 64), "erase", severity=5 / 3, seed=0)
    assert (side5 == 0).sum(-1).tolist() == [25] * 4


def test_blur_keeps_each_image_peak_and_zoom_one_is_identity(digits):
    X = digits.X_test[:50]
    blurred = data.shift_digits(X, "blur")
    assert torch.allclose(blurred.max(-1).values, X.max(-1).values, atol=1e-6)
    # a blurred one-pixel image spreads to its neighbours
    dot = torch.zeros(1, 64)
    dot[0, 27] = 1.0
    assert int((data.shift_digits(dot, "blur") > 0.1).sum()) > 1
    assert torch.allclose(data.shift_digits(X, "zoom", severity=0.0), X, atol=1e-6)
    # zooming out shrinks a full square: the border ring empties
    full = torch.ones(8, 64)
    z = data.shift_digits(full, "zoom", severity=1.0, seed=0).view(-1, 8, 8)
    assert float(z.sum()) < 8 * 64


# ----------------------------------------------------------------------------- zoo entries


def test_new_task_and_soup_entries_share_their_recipes():
    task = {k: zoo.RECIPES[f"digits/task-{k}"] for k in zoo.DIGIT_TASK_DOMAINS}
    strip = lambda r: {k: v for k, v in r.items() if k not in ("description", "seed", "train_shift")}  # noqa: E731
    assert all(strip(r) == strip(task["rotate"]) for r in task.values())
    assert [r["seed"] for r in task.values()] == list(range(40, 40 + len(task)))
    assert set(zoo.DIGIT_TASK_DOMAINS) <= set(data.SHIFT_KINDS)
    for s in range(1, zoo.SOUP_SETS):
        for i in range(8):
            r, r0 = zoo.RECIPES[f"digits/soup-s{s}-ft{i}"], zoo.RECIPES[f"digits/soup-ft{i}"]
            assert {k: v for k, v in r.items() if k not in ("description", "seed", "store_dtype")} == \
                {k: v for k, v in r0.items() if k not in ("description", "seed")}
            assert r["seed"] != r0["seed"]


# ----------------------------------------------------------------------------- statistics


def test_bootstrap_ci_by_hand():
    # the mean of 3 draws from [0, 0, 1] is k/3 with k ~ Binomial(3, 1/3): P = 8/27, 12/27, 6/27, 1/27.
    # 5% quantile: 0 (P(0) = 0.30); 95% quantile: 2/3 (P(<= 1/3) = 0.74 < 0.95 <= P(<= 2/3) = 0.96)
    est, lo, hi = ds.bootstrap_ci([0, 0, 1], n_boot=20000, level=0.9)
    assert est == pytest.approx(1 / 3) and lo == 0 and hi == pytest.approx(2 / 3)
    assert ds.bootstrap_ci([0.5] * 7) == pytest.approx((0.5, 0.5, 0.5))


def test_bootstrap_ci_is_paired_and_takes_a_statistic():
    rng = np.random.default_rng(0)
    a = (rng.random(300) < 0.7).astype(float)
    # two identical rows: the difference is 0 in every resample
    diff = ds.bootstrap_ci(np.stack([a, a]), lambda m: m[..., 0] - m[..., 1])
    assert diff == (0.0, 0.0, 0.0)
    # b is a plus one more right answer: the paired difference is never negative, and 1/300 on the full sample
    b = a.copy()
    b[np.argmin(a)] = 1.0
    est, lo, hi = ds.bootstrap_ci(np.stack([b, a]), lambda m: m[..., 0] - m[..., 1])
    assert est == pytest.approx(1 / 300) and lo >= 0 and hi > 0
    with pytest.raises(ValueError, match="level"):
        ds.bootstrap_ci([1, 0], level=1.5)
    with pytest.raises(ValueError, match="at least one example"):
        ds.bootstrap_ci(np.zeros((2, 0)))


def test_best_on_validation_first_on_ties_and_spread():
    assert ds.best_on_validation({"a": 0.5, "b": 0.9, "c": 0.9}) == "b"
    with pytest.raises(ValueError):
        ds.best_on_validation({})
    assert ds.spread([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(2 ** 0.5), "min": 1.0, "max": 3.0}


def test_cyclic_subsets_balanced():
    items = list("abcdefg")
    for size in range(1, 7):
        subs = ds.cyclic_subsets(items, size)
        assert len(subs) == 7 and all(len(set(s)) == size for s in subs)
        assert all(sum(x in s for s in subs) == size for x in items)
    assert ds.cyclic_subsets(items, 7) == [tuple(items)]
    with pytest.raises(ValueError):
        ds.cyclic_subsets(items, 8)


# ----------------------------------------------------------------------------- scoring and tuned merges


@pytest.fixture(scope="module")
def small_study(digits):
    base = zoo.load("digits/soup-base", device="cpu")
    fts = {k: zoo.load(f"digits/task-{k}", device="cpu").state_dict() for k in ("rotate", "thicken")}
    sets = ds.domain_sets(digits, list(fts))
    return base, fts, sets


def test_correctness_matches_per_model_accuracy(small_study):
    base, fts, sets = small_study
    states = [base.state_dict(), fts["rotate"]]
    c = ds.correctness(base, states, sets["test"], device="cpu")
    probe = zoo.load("digits/soup-base", device="cpu")
    for i, sd in enumerate(states):
        probe.load_state_dict(sd)
        for name, (X, y) in sets["test"].items():
            assert float(c[name][i].float().mean()) == pytest.approx(accuracy(probe, X, y), abs=1e-9)


def test_ties_candidates_equal_merge_with_lambda(small_study):
    base, fts, _ = small_study
    cands = ds.merge_candidates(base.state_dict(), list(fts.values()), ta_lambdas=(0.5,), ties_lambdas=(1.5,),
                                ties_densities=(0.2,))
    direct = merge.merge("ties", list(fts.values()), base.state_dict(), weight=1.0, density=0.2, device="cpu",
                         **{"lambda": 1.5})
    assert all(torch.allclose(cands["TIES"][(0.2, 1.5)][k], direct[k], atol=1e-6) for k in direct)
    ta = merge.merge("task_arithmetic", list(fts.values()), base.state_dict(), weight=0.5, device="cpu")
    assert all(torch.allclose(cands["task arithmetic"][(0.5,)][k], ta[k], atol=1e-6) for k in ta)


def test_tuned_merges_never_look_at_test(small_study):
    base, fts, sets = small_study
    domains = list(fts)
    ft_test = {k: ds.correctness(base, [fts[k]], {k: sets["test"][k]}, "cpu")[k][0] for k in domains}
    grids = dict(ta_lambdas=(0.2, 0.6, 1.0), ties_lambdas=(0.5, 1.0, 2.0), ties_densities=(0.2, 0.5))
    honest = ds.tuned_merges(base, base.state_dict(), fts, domains, sets, ft_test, "cpu", **grids)
    # adversarial test labels: every test answer replaced by a wrong one (and the test images scrambled)
    adversarial = {"val": sets["val"], "test": {k: (X.flip(0), (y + 1) % 10) for k, (X, y) in sets["test"].items()}}
    attacked = ds.tuned_merges(base, base.state_dict(), fts, domains, adversarial, ft_test, "cpu", **grids)
    for m in honest:
        assert honest[m]["hyper"] == attacked[m]["hyper"] and honest[m]["val"] == attacked[m]["val"]
        assert honest[m]["test"]["clean"] != attacked[m]["test"]["clean"]
    assert 0 < honest["TIES"]["val"] <= 1
    assert set(honest["TIES"]["normalised"]) == set(domains)


def test_soup_study_and_average_vs_ensemble(digits):
    base = zoo.load("digits/soup-base", device="cpu")
    members = [zoo.load(f"digits/soup-ft{i}", device="cpu").state_dict() for i in range(3)]
    sets = ds.domain_sets(digits, ["noise"])
    (study,) = ds.soup_study(base, [members], sets, "cpu")
    assert study["val"]["greedy soup"] >= study["val"]["best single"]
    assert study["best"] == int(np.argmax(study["individual_val"]))
    # a one-member subset: its average and its ensemble are the member itself
    r = ds.average_vs_ensemble(base, members, [(1,), (0, 2)], sets["test"], "cpu")
    assert torch.equal(r["clean"]["average"][0], r["clean"]["ensemble"][0])
    assert r["noise"]["average"].shape == (2, len(digits.y_test))
