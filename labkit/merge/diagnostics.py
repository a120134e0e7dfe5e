"""Diagnostics of merges: how similar task vectors are, how often their signs conflict, how much
mass trimming removes, and the loss/accuracy along the segment between two models."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .methods import magnitude_trim
from .state_dict import TaskVector, interpolate


def cosine_matrix(task_vectors: Sequence[TaskVector]) -> torch.Tensor:
    """[T, T] cosine similarities between task vectors (near 0: nearly orthogonal, little interference)."""
    n = len(task_vectors)
    out = torch.eye(n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = task_vectors[i].cosine(task_vectors[j])
    return out


def sign_conflict_rate(task_vectors: Sequence[TaskVector], density: float = 1.0) -> dict[str, float]:
    """Per tensor, the fraction of entries where the (trimmed to ``density``) task vectors have both
    a positive and a negative value: the interference TIES's sign election resolves."""
    out = {}
    for k in task_vectors[0].deltas:
        ds = [magnitude_trim(tv.deltas[k], density) for tv in task_vectors]
        pos = torch.stack([d > 0 for d in ds]).any(0)
        neg = torch.stack([d < 0 for d in ds]).any(0)
        out[k] = float((pos & neg).float().mean())
    return out


def trimmed_mass(task_vector: TaskVector, density: float, per_tensor: bool = False):
    """The fraction of a task vector's L1 mass that magnitude trimming to ``density`` removes
    (per tensor, as mergekit trims). Small values are why TIES can drop 80% of entries."""
    removed, total, out = 0.0, 0.0, {}
    for k, d in task_vector.deltas.items():
        kept = magnitude_trim(d, density)
        r, t = float((d - kept).abs().sum()), float(d.abs().sum())
        out[k] = r / t if t > 0 else 0.0
        removed, total = removed + r, total + t
    return out if per_tensor else (removed / total if total > 0 else 0.0)


def interpolation_curve(a, b, evaluate: Callable[[dict], object], alphas: Sequence[float] | None = None) -> list[dict]:
    """Evaluate (1 - alpha) theta_a + alpha theta_b along the segment. ``evaluate(state_dict)``
    returns a number or a dict of numbers (e.g. loss and accuracy). Returns one dict per alpha."""
    alphas = [i / 10 for i in range(11)] if alphas is None else [float(x) for x in alphas]
    rows = []
    for alpha in alphas:
        result = evaluate(interpolate(a, b, alpha))
        rows.append({"alpha": alpha, **(result if isinstance(result, dict) else {"value": float(result)})})
    return rows

