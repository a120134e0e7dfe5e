"""Pipelines: what a cascade's second stage sees, the lost information, stacking inputs and folds."""
from collections import Counter, defaultdict

import pytest
import torch

import labkit.ensemble
from labkit.refine import pipelines
from labkit.refine.pipelines import (Cascade, Stacking, count_pipeline, count_task_tensors, kfold_indices,
                                     run_cascade, stack_classifiers, stacking_inputs, train_pipeline)


def test_stacking_reuses_the_ensemble_lab_functions():
    assert pipelines.out_of_fold_predictions is labkit.ensemble.out_of_fold_predictions
    assert pipelines.fit_stacker is labkit.ensemble.fit_stacker


def test_stacking_inputs_shape_and_content():
    p1 = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    p2 = torch.tensor([[0.5, 0.5, 0.0], [0.3, 0.3, 0.4]])
    got = stacking_inputs([p1, p2])
    assert got.shape == (2, 6)
    assert torch.equal(got, torch.tensor([[0.7, 0.2, 0.1, 0.5, 0.5, 0.0], [0.1, 0.1, 0.8, 0.3, 0.3, 0.4]]))
    assert torch.equal(stacking_inputs(torch.stack([p1, p2])), got)


def test_kfold_covers_every_row_once():
    folds = kfold_indices(23, 5, seed=1)
    tested = torch.cat([te for _, te in folds]).sort().values
    assert torch.equal(tested, torch.arange(23))
    for tr, te in folds:
        assert set(tr.tolist()).isdisjoint(te.tolist()) and len(tr) + len(te) == 23
    with pytest.raises(ValueError, match="k must"):
        kfold_indices(5, 1)


def test_stack_classifiers_on_out_of_fold_predictions():
    # two "members": one right on even classes only, one right everywhere but unsure; out-of-fold on purpose
    g = torch.Generator().manual_seed(0)
    X = torch.randn(120, 4, generator=g)
    y = torch.arange(120) % 3

    def centroid(X_tr, y_tr, X_te):  # nearest class mean, a real fit on the training fold
        means = torch.stack([X_tr[y_tr == c].mean(0) for c in range(3)])
        return torch.softmax(-torch.cdist(X_te, means), -1)

    def prior(X_tr, y_tr, X_te):
        return torch.bincount(y_tr, minlength=3).float().div(len(y_tr)).expand(len(X_te), 3)
    out = stack_classifiers({"centroid": centroid, "prior": prior}, X, y, X[:10], k=4)
    assert out["oof"].shape == (2, 120, 3) and out["test_probs"].shape == (2, 10, 3)
    assert out["stacked"].shape == (10, 3) and torch.allclose(out["stacked"].sum(1), torch.ones(10, dtype=torch.float64))
    assert torch.allclose(out["averaged"], out["test_probs"].mean(0))


def test_count_task_tensors_and_the_information_a_histogram_drops():
    d = count_task_tensors(2000, seed=0)
    for i, r in enumerate(d["rows"][:50]):
        q, s = r["prompt"][2:-1].split("|")
        assert d["histogram"][i].tolist() == [float(s.count(c)) for c in "abcde"]
        assert d["y"][i].item() == s.count(q)
    # best possible accuracy from the histogram alone (majority answer per histogram): clearly below 1
    by_hist = defaultdict(Counter)
    for h, y in zip(map(tuple, d["histogram"].tolist()), d["y"].tolist()):
        by_hist[h][y] += 1
    bayes = sum(c.most_common(1)[0][1] for c in by_hist.values()) / len(d["y"])
    assert bayes < 0.8


class Spy(torch.nn.Module):
    def __init__(self, d_out):
        super().__init__()
        self.lin = torch.nn.LazyLinear(d_out)
        self.seen = None

    def forward(self, x):
        self.seen = x
        return self.lin(x)


def test_cascade_stage2_sees_only_z_and_stacking_sees_x_and_z():
    x = torch.randn(6, 59)
    for cls, width in ((Cascade, 5), (Stacking, 64)):
        s1, s2 = Spy(5), Spy(10)
        logits, z = cls(s1, s2)(x)
        assert logits.shape == (6, 10) and s2.seen.shape == (6, width)
        assert torch.equal(s2.seen[:, -5:], z)
        if cls is Stacking:
            assert torch.equal(s2.seen[:, :59], x)


def test_train_pipeline_errors_and_stage_by_stage_training_fits_the_histogram():
    d = count_task_tensors(600, seed=0)
    pipe = count_pipeline("cascade", hidden=32)
    with pytest.raises(ValueError, match="z_target"):
        train_pipeline(pipe, d["x"], d["y"], mode="stages")
    with pytest.raises(ValueError, match="mode"):
        train_pipeline(pipe, d["x"], d["y"], mode="joint")
    with pytest.raises(ValueError, match="kind"):
        count_pipeline("chain")
    hist = train_pipeline(pipe, d["x"], d["y"], d["histogram"], steps=150)
    assert hist["stage1_loss"][-1] < hist["stage1_loss"][0] / 2


def test_run_cascade_records_intermediates_and_stacks_inputs():
    upper = lambda xs: [x.upper() for x in xs]  # noqa: E731
    first = lambda xs: [x[0] if isinstance(x, str) else x[0] + x[1][0] for x in xs]  # noqa: E731
    out = run_cascade([upper, first], ["ab", "cd"])
    assert out["intermediates"] == [["AB", "CD"], ["A", "C"]] and out["outputs"] == ["A", "C"]
    # stacked: stage 2 gets (input, stage-1 output) pairs
    assert run_cascade([upper, first], ["ab", "cd"], stack=True)["outputs"] == ["abA", "cdC"]
    with pytest.raises(ValueError, match="stage 1 returned 1 outputs for 2 inputs"):
        run_cascade([upper, lambda xs: ["x"]], ["ab", "cd"])
