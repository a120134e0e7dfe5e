"""The measured digits side of the merging lab (syllabus claims 6-9), with fair hyperparameters and statistics.

Tooling around ``labkit.merge``'s methods (imports point from here to the methods, never back):

  domain_sets        clean and shifted digits per domain: validation (shift seed 1) and test (seed 0)
  correctness        per-example right/wrong of many state dicts of one classifier, in one vectorised pass
  bootstrap_ci       percentile bootstrap over test examples (paired: every row is resampled the same way)
  best_on_validation the candidate with the best validation score (test data never enters the choice)
  tuned_merges       averaging vs task arithmetic vs TIES over a subset of domains, each method's lambda
                     (and TIES density) chosen on validation, reported on test, with normalised accuracy
  soup_study         best single, uniform soup and greedy soup per ingredient set, on test and under shift
  average_vs_ensemble, ingredient_spread   the evidence for (or against) claims 6 and 7

Everything scores per-example correctness ([candidates, examples] booleans), so the notebook can give
each comparison a bootstrap confidence interval over test examples and a spread over ingredient sets.
"""
from __future__ import annotations

import itertools
from typing import Callable, Sequence

import numpy as np
import torch
from torch.func import functional_call, vmap

from ..data import shift_digits
from ..device import get_device
from .state_dict import TaskVector, as_state_dict, greedy_soup, merge, uniform_soup

# Hyperparameter grids searched on validation. TIES's lambda scales a disjoint *mean* of the task vectors,
# task arithmetic's a *sum*, so TIES's useful range is higher.
TA_LAMBDAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25, 1.5)
TIES_LAMBDAS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
TIES_DENSITIES = (0.1, 0.2, 0.3, 0.5, 0.7)


# ----------------------------------------------------------------------------- data and scoring


def domain_sets(digits, domains: Sequence[str], val_seed: int = 1, test_seed: int = 0) -> dict:
    """{"val": {"clean": (X, y), domain: (X_shifted, y), ...}, "test": {...}}.

    Validation and test digits are different images, and their shifts use different seeds (the
    task fine-tunes were trained on training digits shifted with seed 100)."""
    out = {}
    for split, seed in (("val", val_seed), ("test", test_seed)):
        X, y = getattr(digits, f"X_{split}"), getattr(digits, f"y_{split}")
        out[split] = {"clean": (X, y), **{k: (shift_digits(X, k, seed=seed), y) for k in domains}}
    return out


@torch.no_grad()
def correctness(model: torch.nn.Module, states: Sequence[dict], sets: dict, device=None) -> dict[str, torch.Tensor]:
    """{set name: bool [len(states), N]}: whether each state dict (loaded into ``model``'s architecture)
    classifies each example of each (X, y) set correctly. One ``vmap`` over the stacked parameters;
    ``model`` itself only lends its architecture (it is moved to ``device`` and put in eval mode)."""
    if not states:
        raise ValueError("correctness needs at least one state dict")
    device = torch.device(device) if device is not None else get_device()
    model = model.to(device).eval()
    names = [k for k, _ in model.named_parameters()]
    stacked = {}
    for k in names:
        missing = [i for i, s in enumerate(states) if k not in s]
        if missing:
            raise ValueError(f"state dict {missing[0]} has no tensor {k!r}")
        stacked[k] = torch.stack([s[k].to(device, torch.float32) for s in states])
    X = torch.cat([x for x, _ in sets.values()]).to(device)
    logits = vmap(lambda p, x: functional_call(model, p, (x,)), in_dims=(0, None))(stacked, X)
    pred = logits.argmax(-1).cpu()
    out, start = {}, 0
    for name, (x, y) in sets.items():
        out[name] = pred[:, start: start + len(x)] == torch.as_tensor(y).cpu()
        start += len(x)
    return out


@torch.no_grad()
def probabilities(model: torch.nn.Module, states: Sequence[dict], X: torch.Tensor, device=None) -> torch.Tensor:
    """Softmax probabilities [len(states), N, C] of each state dict on X (for ensembles)."""
    device = torch.device(device) if device is not None else get_device()
    model = model.to(device).eval()
    stacked = {k: torch.stack([s[k].to(device, torch.float32) for s in states]) for k, _ in model.named_parameters()}
    logits = vmap(lambda p, x: functional_call(model, p, (x,)), in_dims=(0, None))(stacked, X.to(device))
    return logits.softmax(-1).cpu()


# ----------------------------------------------------------------------------- statistics


def bootstrap_ci(rows, statistic: Callable[[np.ndarray], np.ndarray] | None = None, n_boot: int = 10000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(estimate, low, high): a percentile bootstrap interval over the examples (columns) of ``rows``.

    ``rows`` [R, N] (or [N]) holds per-example values (1/0 correctness, or differences) of R things
    measured on the same N test examples. Each resample draws N examples with replacement and uses the
    same draw for every row, so differences between rows are paired. ``statistic`` maps row means
    [..., R] to [...] (default: their mean); the estimate is the statistic on the full sample.
    10000 resamples by default: with 2000 the interval's ends still move by about 0.001 from one
    random seed to the next, enough to flip a verdict whose interval ends near 0.
    Efron and Tibshirani (1993), ch. 13.
    """
    rows = np.atleast_2d(np.asarray(rows, dtype=np.float64))
    if rows.shape[1] == 0:
        raise ValueError("bootstrap_ci needs at least one example (column)")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    statistic = statistic or (lambda means: means.mean(-1))
    n = rows.shape[1]
    rng = np.random.default_rng(seed)
    # resampling with replacement = multinomial counts per example; means are then one matrix product
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)  # [B, N]
    boot = np.asarray(statistic((counts @ rows.T) / n), dtype=np.float64)  # [B]
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return float(statistic(rows.mean(-1))), float(lo), float(hi)


def best_on_validation(val_scores: dict):
    """The key with the highest validation score; the first in insertion order on ties."""
    if not val_scores:
        raise ValueError("best_on_validation needs at least one candidate")
    top = max(val_scores.values())
    return next(k for k, v in val_scores.items() if v == top)


def spread(values) -> dict:
    """Mean, standard deviation (n - 1), min and max of a few per-seed numbers."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


# ----------------------------------------------------------------------------- task vectors: tuned merges


def merge_candidates(base: dict, finetuned: Sequence[dict], ta_lambdas=TA_LAMBDAS, ties_lambdas=TIES_LAMBDAS,
                     ties_densities=TIES_DENSITIES) -> dict[str, dict]:
    """{method: {hyperparameters: state dict}} for averaging, task arithmetic and TIES of ``finetuned``.

    Both task arithmetic and TIES are theta_base + lambda * tau for a tau that does not depend on lambda,
    so each tau is merged once and scaled; ``merge("ties", ..., lambda=x)`` gives the same tensors."""
    base = as_state_dict(base)
    out = {"averaging": {(): merge("linear", finetuned, weight=1.0, device="cpu")}}
    tau_sum = sum(TaskVector.between(base, ft) for ft in finetuned)
    out["task arithmetic"] = {(lam,): tau_sum.apply_to(base, scale=lam) for lam in ta_lambdas}
    out["TIES"] = {}
    for density in ties_densities:
        tau_ties = TaskVector.between(base, merge("ties", finetuned, base, weight=1.0, density=density, device="cpu"))
        out["TIES"].update({(density, lam): tau_ties.apply_to(base, scale=lam) for lam in ties_lambdas})
    return out


def tuned_merges(model, base: dict, finetuned: dict[str, dict], domains: Sequence[str], sets: dict,
                 ft_test: dict[str, torch.Tensor], device=None, **grids) -> dict:
    """Merge the fine-tunes of ``domains`` with each method, choose each method's hyperparameters by the
    mean validation accuracy over those domains, and report the chosen model on test.

    ``sets`` is ``domain_sets(...)``; ``ft_test[k]`` is fine-tune k's correctness [N] on test domain k.
    Returns {method: {"hyper": chosen, "val": mean val accuracy, "test": {set: accuracy},
    "normalised": {domain: merged / fine-tune accuracy}, "correct": {set: bool [N]}}}.
    Only ``sets["val"]`` enters the choice."""
    domains = list(domains)
    candidates = merge_candidates(base, [finetuned[k] for k in domains], **grids)
    out = {}
    for method, states in candidates.items():
        keys = list(states)
        val = correctness(model, [states[k] for k in keys], {k: sets["val"][k] for k in domains}, device)
        val_mean = torch.stack([val[k].float().mean(-1) for k in domains]).mean(0)
        chosen = best_on_validation({key: float(v) for key, v in zip(keys, val_mean)})
        test = {k: c[0] for k, c in correctness(model, [states[chosen]], sets["test"], device).items()}
        out[method] = {"hyper": chosen, "val": float(val_mean[keys.index(chosen)]),
                       "test": {k: float(c.float().mean()) for k, c in test.items()},
                       "normalised": {k: float(test[k].float().mean() / ft_test[k].float().mean()) for k in domains},
                       "correct": test}
    return out


def cyclic_subsets(items: Sequence, size: int) -> list[tuple]:
    """Every window of ``size`` consecutive items, wrapping around (each item in ``size`` windows):
    a balanced, fixed design for "merge k of n domains" with n subsets per k (one when size == n)."""
    n = len(items)
    if not 1 <= size <= n:
        raise ValueError(f"size must be between 1 and {n}, got {size}")
    if size == n:
        return [tuple(items)]
    return [tuple(items[(i + j) % n] for j in range(size)) for i in range(n)]


# ----------------------------------------------------------------------------- soups and ensembles


def soup_study(model, ingredient_sets: Sequence[Sequence[dict]], sets: dict, device=None) -> list[dict]:
    """For each ingredient set (fine-tunes of one base): the best single model by validation accuracy,
    the uniform soup and the greedy soup (chosen on validation), with per-example correctness on every
    test set. Returns one dict per set: {"individual_val", "chosen", "correct": {model: {set: bool [N]}}}."""
    X_val, y_val = sets["val"]["clean"]
    out = []
    for ingredients in ingredient_sets:
        states = [as_state_dict(m) for m in ingredients]
        val_acc = lambda sd: float(correctness(model, [sd], {"v": (X_val, y_val)}, device)["v"].float().mean())  # noqa: E731
        greedy = greedy_soup(states, val_acc)
        best = best_on_validation(dict(enumerate(greedy.individual)))
        models = {"best single": states[best], "uniform soup": uniform_soup(states), "greedy soup": greedy.state_dict}
        correct = correctness(model, list(models.values()), sets["test"], device)
        out.append({"individual_val": greedy.individual, "best": best, "chosen": greedy.chosen,
                    "val": {"best single": greedy.individual[best], "greedy soup": greedy.score,
                            "uniform soup": val_acc(models["uniform soup"])},
                    "correct": {name: {k: c[i] for k, c in correct.items()} for i, name in enumerate(models)}})
    return out


def average_vs_ensemble(model, members: Sequence[dict], subsets: Sequence[Sequence[int]], sets: dict,
                        device=None) -> dict[str, dict[str, torch.Tensor]]:
    """{set: {"average": bool [len(subsets), N], "ensemble": bool [len(subsets), N]}}: per-example
    correctness of the uniform average of each subset's parameters and of the mean of its probabilities."""
    states = [as_state_dict(m) for m in members]
    averaged = [uniform_soup([states[i] for i in s]) for s in subsets]
    avg_correct = correctness(model, averaged, sets, device)
    out = {}
    for name, (X, y) in sets.items():
        probs = probabilities(model, states, X, device)  # [M, N, C]
        ens = torch.stack([probs[list(s)].mean(0).argmax(-1) == torch.as_tensor(y).cpu() for s in subsets])
        out[name] = {"average": avg_correct[name], "ensemble": ens}
    return out


def ingredient_spread(base: dict, members: Sequence[dict], model, sets: dict, device=None) -> dict:
    """How different the ingredients are: accuracy range per test set, mean pairwise prediction
    disagreement, and parameter distances (pairwise ||theta_i - theta_j|| relative to the mean
    distance from the base, and the mean cosine between their deltas from the base)."""
    states = [as_state_dict(m) for m in members]
    taus = [TaskVector.between(base, s) for s in states]
    pairs = list(itertools.combinations(range(len(states)), 2))
    correct = correctness(model, states, sets, device)
    acc = {k: c.float().mean(-1) for k, c in correct.items()}
    disagreement = {}
    for name, (X, _) in sets.items():
        pred = probabilities(model, states, X, device).argmax(-1)
        disagreement[name] = float(np.mean([(pred[i] != pred[j]).float().mean().item() for i, j in pairs]))
    moved = float(np.mean([t.norm() for t in taus]))
    return {"accuracy_range": {k: (float(a.min()), float(a.max())) for k, a in acc.items()},
            "disagreement": disagreement, "distance_from_base": moved,
            "pairwise_distance_relative": float(np.mean([(taus[i] - taus[j]).norm() for i, j in pairs])) / moved,
            "mean_cosine": float(np.mean([taus[i].cosine(taus[j]) for i, j in pairs]))}
