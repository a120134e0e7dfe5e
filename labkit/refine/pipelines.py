"""Pipelines: a cascade passes only the first stage's output on; stacking passes the input as well.

    cascade:   z = f_1(x),  y = f_2(z)            (ASR then MT: the translator never hears the audio)
    stacking:  z = f_1(x),  y = f_2([x ; z])      (Wolpert 1992, "Stacked generalization")

A cascade is easy to build and to inspect (z is a readable intermediate result), but whatever f_1 drops
is gone for good; stacking keeps it. The lab's demonstration task is built from the kit's ``count`` task
("n:b|abcbb=" -> "3"): stage 1 summarises the string as a letter histogram (how often each of a..e
occurs), which is exactly what counting needs, except the query letter, which the summary drops.

Pieces are ``nn.Module`` stages over tensors, trainable stage by stage (stage 1 on its intermediate
target, then stage 2 on stage 1's frozen outputs) or end to end (both on the final loss; z is then no
longer forced to be a histogram). ``run_cascade`` does the same with any callables (e.g. zoo LMs on
strings), recording every intermediate output.

Stacking classifiers (the Kaggle recipe): the meta-model is trained on *out-of-fold* member predictions,
so it learns how far to trust each member on data the member never saw. ``stack_classifiers`` builds
that from ``labkit.ensemble.out_of_fold_predictions``, ``stacking_features`` and ``fit_stacker``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from labkit.data import make_examples
from labkit.ensemble import fit_stacker, out_of_fold_predictions, stacking_features

COUNT_LETTERS = "abcde"
COUNT_MAX_LEN = 9
# feature layout of a count example: query one-hot [5], then per string position a one-hot over a..e + empty
COUNT_FEATURES = len(COUNT_LETTERS) + COUNT_MAX_LEN * (len(COUNT_LETTERS) + 1)


# ----------------------------------------------------------------------------- the demonstration task


def count_task_tensors(n: int, seed: int = 0, split: str = "train") -> dict:
    """``n`` count examples as tensors: x [n, 59] features, histogram [n, 5] (float counts of a..e in the
    string: stage 1's target), y [n] (the answer: the query letter's count, 0..9), and the raw rows."""
    rows = make_examples("count", n, seed=seed, split=split)
    x = torch.zeros(n, COUNT_FEATURES)
    hist = torch.zeros(n, len(COUNT_LETTERS))
    y = torch.zeros(n, dtype=torch.long)
    width = len(COUNT_LETTERS) + 1
    for i, r in enumerate(rows):
        q, s = r["prompt"][2:-1].split("|")
        x[i, COUNT_LETTERS.index(q)] = 1.0
        for j in range(COUNT_MAX_LEN):
            k = COUNT_LETTERS.index(s[j]) if j < len(s) else len(COUNT_LETTERS)
            x[i, len(COUNT_LETTERS) + j * width + k] = 1.0
        for c in s:
            hist[i, COUNT_LETTERS.index(c)] += 1
        y[i] = int(r["answer"])
    return {"x": x, "histogram": hist, "y": y, "rows": rows}


def mlp(d_in: int, d_out: int, hidden: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, d_out))


# ----------------------------------------------------------------------------- composable pipelines


class Cascade(nn.Module):
    """y = stage2(stage1(x)): stage 2 sees only the intermediate z [N, Z]. forward -> (logits, z)."""

    def __init__(self, stage1: nn.Module, stage2: nn.Module):
        super().__init__()
        self.stage1, self.stage2 = stage1, stage2

    def intermediate(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage1(x)

    def stage2_input(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return z

    def forward(self, x):
        z = self.intermediate(x)
        return self.stage2(self.stage2_input(x, z)), z


class Stacking(Cascade):
    """y = stage2([x ; stage1(x)]): stage 2 sees the input and the intermediate, [N, D + Z]."""

    def stage2_input(self, x, z):
        return torch.cat([x, z], dim=-1)


def count_pipeline(kind: str, hidden: int = 128, seed: int = 0) -> Cascade:
    """A cascade or stacking pipeline for the count task: stage 1 x -> histogram [5], stage 2 -> 10 classes."""
    if kind not in ("cascade", "stacking"):
        raise ValueError(f"kind must be 'cascade' or 'stacking', got {kind!r}")
    torch.manual_seed(seed)
    z = len(COUNT_LETTERS)
    stage1 = mlp(COUNT_FEATURES, z, hidden)
    if kind == "cascade":
        return Cascade(stage1, mlp(z, 10, hidden))
    return Stacking(stage1, mlp(COUNT_FEATURES + z, 10, hidden))


def _fit(module_params, loss_fn, n, steps, batch_size, lr, seed):
    opt = torch.optim.AdamW(module_params, lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        loss = loss_fn(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def train_pipeline(pipe: Cascade, x, y, z_target=None, mode: str = "stages", steps: int = 1500,
                   batch_size: int = 128, lr: float = 3e-3, seed: int = 0) -> dict:
    """Train a pipeline. ``mode='stages'``: stage 1 by MSE to ``z_target``, then stage 2 by cross-entropy on
    stage 1's frozen outputs. ``mode='end_to_end'``: both stages on the final cross-entropy only."""
    if mode not in ("stages", "end_to_end"):
        raise ValueError(f"mode must be 'stages' or 'end_to_end', got {mode!r}")
    if mode == "stages" and z_target is None:
        raise ValueError("mode='stages' needs z_target, the intermediate target of stage 1")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    device = next(pipe.parameters()).device
    x, y = x.to(device), y.to(device)
    pipe.train()
    history = {}
    if mode == "end_to_end":
        history["loss"] = _fit(list(pipe.parameters()), lambda i: F.cross_entropy(pipe(x[i])[0], y[i]),
                               len(x), steps, batch_size, lr, seed)
    else:
        z_target = z_target.to(device)
        history["stage1_loss"] = _fit(list(pipe.stage1.parameters()),
                                      lambda i: F.mse_loss(pipe.stage1(x[i]), z_target[i]),
                                      len(x), steps, batch_size, lr, seed)
        with torch.no_grad():
            z = pipe.stage1(x)  # stage 2 trains on what stage 1 really outputs, not on the targets
        history["stage2_loss"] = _fit(list(pipe.stage2.parameters()),
                                      lambda i: F.cross_entropy(pipe.stage2(pipe.stage2_input(x[i], z[i])), y[i]),
                                      len(x), steps, batch_size, lr, seed + 1)
    pipe.eval()
    return history


@torch.no_grad()
def pipeline_accuracy(pipe: Cascade, x, y) -> float:
    device = next(pipe.parameters()).device
    logits, _ = pipe(x.to(device))
    return (logits.argmax(-1).cpu() == y.cpu()).float().mean().item()


def run_cascade(stages, inputs, stack: bool = False, join=None) -> dict:
    """Run callables stage by stage on a list of inputs, keeping every intermediate output.

    Each stage maps a list of inputs to a list of outputs. With ``stack=True`` stage k > 0 receives
    ``join(original_input, previous_output)`` (default: ``(input, output)`` pairs) instead of the previous
    output alone. Returns {"outputs": final outputs, "intermediates": [outputs of each stage]}.
    """
    if not stages:
        raise ValueError("stages must hold at least one callable")
    join = join or (lambda x, z: (x, z))
    inputs = list(inputs)
    current, intermediates = inputs, []
    for k, stage in enumerate(stages):
        if k > 0 and stack:
            current = [join(x, z) for x, z in zip(inputs, current)]
        current = list(stage(current))
        if len(current) != len(inputs):
            raise ValueError(f"stage {k} returned {len(current)} outputs for {len(inputs)} inputs")
        intermediates.append(current)
    return {"outputs": current, "intermediates": intermediates}


# ----------------------------------------------------------------------------- stacking classifiers


def kfold_indices(n: int, k: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``k`` (train_idx, test_idx) folds over a seeded permutation of 0..n-1; every row is tested once."""
    if not 2 <= k <= n:
        raise ValueError(f"k must lie in [2, n={n}], got {k}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    chunks = perm.chunk(k)
    return [(torch.cat([c for j, c in enumerate(chunks) if j != i]), chunks[i]) for i in range(k)]


def stacking_inputs(member_probs) -> torch.Tensor:
    """The stacker's input: member probabilities, a list of M tensors [N, C] (or [M, N, C]) -> [N, M*C].

    Row n is [p_1(n) ... p_M(n)]: member 1's C class probabilities, then member 2's, and so on.
    """
    if isinstance(member_probs, (list, tuple)):
        shapes = [tuple(torch.as_tensor(p).shape) for p in member_probs]
        if len(set(shapes)) > 1:
            raise ValueError(f"member_probs: every member must have one shape [N, C], got {shapes}")
        member_probs = torch.stack([torch.as_tensor(p) for p in member_probs])
    probs = member_probs
    return stacking_features(probs)


def digit_member(config: dict, steps: int = 400, seed: int = 0, lr: float = 3e-3):
    """fit_predict(X_train, y_train, X_test) -> probabilities [n_test, 10] for a digits classifier."""
    from labkit.models import make_classifier
    from labkit.train import predict_logits, train_classifier

    def fit_predict(X_train, y_train, X_test):
        torch.manual_seed(seed)
        model = make_classifier(config)
        train_classifier(model, X_train, y_train, steps=steps, lr=lr, seed=seed)
        return torch.softmax(predict_logits(model, X_test).float(), -1).cpu()
    return fit_predict


def stack_classifiers(fit_predicts: dict, X, y, X_test, k: int = 5, seed: int = 0, C: float = 1.0) -> dict:
    """Stack members on out-of-fold predictions; compare with averaging their probabilities.

    Returns {"oof": [M, N, C] out-of-fold member probabilities, "test_probs": [M, N_test, C] members refit
    on all of X, "stacked": [N_test, C] stacker probabilities, "averaged": [N_test, C], "stacker": the
    fitted predict_proba}.
    """
    if not fit_predicts:
        raise ValueError("fit_predicts must name at least one member")
    folds = kfold_indices(len(X), k, seed)
    oof = torch.stack([out_of_fold_predictions(fp, X, y, folds) for fp in fit_predicts.values()])
    test_probs = torch.stack([torch.as_tensor(fp(X, y, X_test)) for fp in fit_predicts.values()])
    stacker = fit_stacker(stacking_inputs(oof), torch.as_tensor(y), C=C)
    return {"names": list(fit_predicts), "oof": oof, "test_probs": test_probs,
            "stacked": stacker(stacking_inputs(test_probs)), "averaged": test_probs.mean(0), "stacker": stacker}
