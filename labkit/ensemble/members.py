"""Getting members, combining classifiers, running members fast, and diagnosing an ensemble.

  1. getting members .......... bootstrap_indices, bagging, mc_dropout_logits, snapshot_lr, train_snapshots
     classifier combiners ..... soft_vote, hard_vote, out_of_fold_predictions, stacking_features, fit_stacker
  2. speed .................... stack_members, stacked_forward, loop_forward
  3. diagnostics .............. error_correlation, pairwise_disagreement, ensemble_report, member_contribution
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .combination import _as_members

# ------------------------------------------------------------------------------------------------
# 1. Getting members, and combining classifiers


def bootstrap_indices(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Bagging's resampler (Breiman 1996): k bootstrap samples of n indices drawn with replacement.

    Returns LongTensor [k, n], reproducible from ``seed``. Each resample holds about 1 - 1/e = 63.2%
    of the distinct examples, so members see different data and make different errors.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (dataset size) must be a positive int, got {n!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k (number of resamples) must be a positive int, got {k!r}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (k, n), generator=generator)


def bagging(fit_fn, X: torch.Tensor, y: torch.Tensor, k: int, seed: int = 0) -> list:
    """Train k members on bootstrap resamples: [fit_fn(X[idx], y[idx], member_seed) for idx in resamples]."""
    if len(X) != len(y):
        raise ValueError(f"X has {len(X)} rows but y has {len(y)}")
    idx = bootstrap_indices(len(X), k, seed).to(X.device)
    return [fit_fn(X[i], y[i], seed * 1000 + j) for j, i in enumerate(idx)]


def mc_dropout_logits(model: nn.Module, x: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Test-time (Monte Carlo) dropout: k stochastic forwards with dropout on -> [k, N, C].

    Each dropout mask is a different thinned network, an implicit ensemble (Srivastava et al. 2014;
    Gal & Ghahramani 2016 read it as approximate Bayesian inference). Only dropout layers are
    switched to train mode (batch-norm statistics stay frozen); the global RNG is left untouched.
    """
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    if not dropouts:
        raise ValueError(f"{type(model).__name__} has no dropout layer: MC dropout would return k identical members")
    was_training = [m.training for m in dropouts]
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for m in dropouts:
                m.train()
            return torch.stack([model(x) for _ in range(k)])
    finally:
        for m, flag in zip(dropouts, was_training):
            m.train(flag)


def snapshot_lr(step: int, steps_per_cycle: int, lr_max: float) -> float:
    """Snapshot ensembles' cyclic cosine schedule (Huang et al. 2017, "Train 1, get M for free").

        lr(t) = lr_max / 2 * (cos(pi * (t mod C) / C) + 1)

    The rate restarts high every C steps and anneals to ~0, where a snapshot is saved.
    """
    return lr_max / 2 * (math.cos(math.pi * (step % steps_per_cycle) / steps_per_cycle) + 1)


def train_snapshots(model: nn.Module, X: torch.Tensor, y: torch.Tensor, cycles: int = 4, steps_per_cycle: int = 100,
                    lr_max: float = 0.1, batch_size: int = 64, seed: int = 0) -> list[nn.Module]:
    """Train one model with the cyclic schedule and keep a copy at the end of each cycle (the members)."""
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr_max, momentum=0.9)
    snapshots = []
    model.train()
    for step in range(cycles * steps_per_cycle):
        for group in opt.param_groups:
            group["lr"] = snapshot_lr(step, steps_per_cycle, lr_max)
        idx = torch.randint(0, len(X), (batch_size,), generator=generator).to(X.device)
        loss = F.cross_entropy(model(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % steps_per_cycle == 0:
            snapshots.append(copy.deepcopy(model).eval())
    model.eval()
    return snapshots


def soft_vote(probs, weights=None) -> torch.Tensor:
    """Soft voting: the (weighted) mean of member class probabilities [M, N, C] -> [N, C].

    Same as scikit-learn's VotingClassifier(voting="soft"): np.average(probas, weights=w).
    """
    probs = _as_members(probs, "probs")
    w = torch.ones(probs.shape[0]) if weights is None else torch.as_tensor(weights)
    w = w.to(probs.dtype).to(probs.device)
    if w.shape != (probs.shape[0],) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be [M] = [{probs.shape[0]}] non-negative with a positive sum, got {w.tolist()}")
    return torch.einsum("m,mnc->nc", w / w.sum(), probs)


def hard_vote(preds: torch.Tensor, n_classes: int, weights=None) -> torch.Tensor:
    """Hard (majority) voting over member labels [M, N] -> [N]: argmax_c sum_m w_m [pred_m = c].

    Ties go to the smallest label, as in scikit-learn's VotingClassifier(voting="hard").
    """
    if preds.ndim != 2 or preds.is_floating_point():
        raise ValueError(f"preds must be integer labels [M, N], got {preds.dtype} {tuple(preds.shape)}")
    if preds.min() < 0 or preds.max() >= n_classes:
        raise ValueError(f"labels must lie in [0, {n_classes}), got range [{preds.min()}, {preds.max()}]")
    w = torch.ones(preds.shape[0], dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != (preds.shape[0],):
        raise ValueError(f"weights must be [M] = [{preds.shape[0]}], got shape {tuple(w.shape)}")
    votes = torch.zeros(preds.shape[1], n_classes, dtype=torch.float64, device=preds.device)
    votes.scatter_add_(1, preds.T, w.to(preds.device).expand(preds.shape[1], -1).contiguous())  # [N, C]
    return votes.argmax(-1)


def out_of_fold_predictions(fit_predict, X, y, folds) -> torch.Tensor:
    """Out-of-fold member outputs for stacking (Wolpert 1992): every row predicted by a model that never saw it.

    fit_predict(X_train, y_train, X_test) -> [n_test, C]; folds: iterable of (train_idx, test_idx)
    covering every row once. Returns [N, C].
    """
    out, covered = None, torch.zeros(len(y), dtype=torch.bool)
    for train_idx, test_idx in folds:
        train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
        pred = torch.as_tensor(fit_predict(X[train_idx], y[train_idx], X[test_idx]))
        if out is None:
            out = torch.zeros(len(y), pred.shape[1], dtype=pred.dtype)
        out[test_idx] = pred
        covered[test_idx] = True
    if out is None or not covered.all():
        raise ValueError(f"folds leave {int((~covered).sum())} rows without an out-of-fold prediction")
    return out


def stacking_features(probs) -> torch.Tensor:
    """Meta-features for stacking: member probabilities [M, N, C] side by side -> [N, M*C].

    With two classes the first column is dropped (it is 1 - the second), as scikit-learn's
    StackingClassifier does.
    """
    probs = _as_members(probs, "probs")
    if probs.shape[-1] == 2:
        probs = probs[..., 1:]
    return probs.movedim(0, 1).reshape(probs.shape[1], -1)


def fit_stacker(features: torch.Tensor, y: torch.Tensor, C: float = 1.0, max_iter: int = 500):
    """Meta-model for stacking: multinomial logistic regression on out-of-fold meta-features.

        minimise  C * sum_n CE(W f_n + b, y_n) + 1/2 ||W||^2     (the intercept is not penalised)

    the objective of scikit-learn's default LogisticRegression (the StackingClassifier default final
    estimator), solved with L-BFGS in float64. With two classes it fits the equivalent single logit.
    Returns predict_proba(features [N, F]) -> [N, C].
    """
    X = features.detach().double()
    classes = torch.unique(y)
    if not torch.equal(classes, torch.arange(len(classes), device=classes.device)):
        raise ValueError(f"y must hold labels 0..K-1, got {classes.tolist()}")
    K = len(classes)
    out_dim = 1 if K == 2 else K
    W = torch.zeros(X.shape[1], out_dim, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(out_dim, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=max_iter, tolerance_grad=1e-12, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def logits_of(Z):
        z = Z.double() @ W + b
        return torch.cat([torch.zeros_like(z), z], 1) if K == 2 else z

    def closure():
        opt.zero_grad()
        loss = C * F.cross_entropy(logits_of(X), y, reduction="sum") + 0.5 * (W ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda Z: F.softmax(logits_of(Z), dim=-1).detach()


# ------------------------------------------------------------------------------------------------
# 2. Speed: one batched forward for members of one architecture


def stack_members(models: list[nn.Module]):
    """Stack K same-architecture members' parameters: ({name: [K, ...]}, {name: [K, ...]}, skeleton).

    The skeleton is a parameter-less copy (on the meta device) that ``stacked_forward`` runs with
    each member's weights via torch.func.functional_call.
    """
    shapes = [[(n, p.shape) for n, p in m.named_parameters()] for m in models]
    if any(s != shapes[0] for s in shapes):
        raise ValueError("stack_members needs members of one architecture (same parameter names and shapes)")
    params, buffers = torch.func.stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")
    return params, buffers, skeleton


def stacked_forward(params: dict, buffers: dict, skeleton: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """All K members on one batch in a single vectorised call: vmap(functional_call) -> [K, N, ...].

    Instead of K small kernels per layer (a Python loop), each layer runs as one batched matmul
    over the stacked weights [K, out, in] (torch.func, after functorch's model-ensembling recipe).
    """
    def one(p, b, inp):
        return torch.func.functional_call(skeleton, (p, b), (inp,))

    return torch.vmap(one, in_dims=(0, 0, None), randomness="different")(params, buffers, x)


def loop_forward(models: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """The baseline: members one after the other in a Python loop -> [K, N, ...]."""
    return torch.stack([m(x) for m in models])


# ------------------------------------------------------------------------------------------------
# 3. Diagnostics


def error_correlation(preds: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between members' error indicators e_mn = [pred_mn != y_n]: [M, N] -> [M, M].

    Ensembling helps when errors are less correlated than correct answers; at correlation 1 the
    members fail together and the ensemble equals any of them. A member with no errors (or only
    errors) has an undefined correlation (NaN).
    """
    if preds.ndim != 2 or preds.shape[1] != y.shape[0]:
        raise ValueError(f"preds must be [M, N] with N = len(y) = {y.shape[0]}, got {tuple(preds.shape)}")
    errors = (preds != y).double()
    return torch.corrcoef(errors)


def pairwise_disagreement(preds: torch.Tensor) -> torch.Tensor:
    """Fraction of examples on which two members predict different labels: [M, N] -> [M, M]."""
    if preds.ndim != 2:
        raise ValueError(f"preds must be [M, N], got shape {tuple(preds.shape)}")
    return (preds[:, None, :] != preds[None, :, :]).double().mean(-1)


def ensemble_report(probs, y: torch.Tensor, weights=None) -> dict:
    """Accuracy of each member and of the soft-vote ensemble, its gain over the best member, and diversity.

    probs [M, N, C]. Gain = acc(ensemble) - max_m acc(m); diversity = mean off-diagonal disagreement
    and error correlation (NaN pairs skipped).
    """
    probs = _as_members(probs, "probs")
    preds = probs.argmax(-1)
    member_acc = (preds == y).double().mean(-1)
    ens_acc = (soft_vote(probs, weights).argmax(-1) == y).double().mean().item()
    off = ~torch.eye(len(probs), dtype=torch.bool)
    corr = error_correlation(preds, y)[off]
    return {"member_acc": member_acc.tolist(), "best_member_acc": member_acc.max().item(),
            "ensemble_acc": ens_acc, "gain": ens_acc - member_acc.max().item(),
            "disagreement": pairwise_disagreement(preds)[off].mean().item() if len(probs) > 1 else 0.0,
            "error_corr": corr[~corr.isnan()].mean().item() if len(probs) > 1 else 1.0}


def member_contribution(target_lp: torch.Tensor, weights) -> torch.Tensor:
    """Each member's share of the ensemble's probability on the correct outputs (mean EM responsibility).

        c_m = (1/N) sum_n w_mn P_m(y_n|x_n) / sum_k w_kn P_k(y_n|x_n)

    target_lp [M, N]; weights [M] or per-example [M, N] (e.g. a gate's output). Sums to 1 over members.
    Unlike the raw weight, it credits a member only where it actually put probability on the answer.
    """
    weights = torch.as_tensor(weights, dtype=target_lp.dtype, device=target_lp.device)
    if weights.ndim == 1:
        weights = weights[:, None]
    joint = torch.log(weights) + target_lp
    return (joint - torch.logsumexp(joint, 0)).exp().mean(-1)
