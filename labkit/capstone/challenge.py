"""The capstone challenge: handwritten digits under a mixture of distribution shifts, on a budget.

The task: classify 8x8 digits (``labkit.data.load_digits``) when a test image may be clean or
shifted in one of four ways (``labkit.data.shift_digits``): pixel noise, translation, rotation or
thickened strokes. Every example carries its domain, so you can see where a model fails.

What you get:
  ``load_public("train")`` / ``load_public("val")``  labelled data: the digits train / val splits
      under every domain of ``DOMAINS`` (one shifted copy per image and domain).
  ``POOL``  the zoo models to start from (``zoo.load(name)``): seeds, checkpoints, a soup's
      fine-tunes, domain "task" fine-tunes and one CNN.
The budget: a submission may spend at most ``BUDGET_MULTIPLIER`` times the inference FLOPs per
example of ``REFERENCE_MODEL`` (one pool MLP, ``labkit.capstone.cost``). A 2-member ensemble of pool
MLPs fits; a 3-member one does not, and neither does the CNN on its own (3.3x): merge, distil, route
or cascade. Latency is measured too, with a tolerance (``LATENCY_TOLERANCE``).

What you never get: the hidden split (``load_hidden``) the leaderboard scores on. It holds the
digits *test* split under every domain, with shift seeds that stay with the instructor; about
``PUBLIC_FRACTION`` of it gives the public score, the rest the private one revealed at the end.
The test split of ``labkit.data.load_digits`` is therefore off limits for the capstone: training or
selecting on it is training on the hidden images (the grader cannot tell; the rules forbid it).

Shapes: X [N, 64] float32 in [0, 1], y [N] int64 in 0..9, domain [N] int64 indexing ``DOMAINS``.
"""
from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..data import load_digits, shift_digits

# the shift mixture: domain name -> severity passed to labkit.data.shift_digits ("clean": no shift)
DOMAINS = ("clean", "noise", "shift", "rotate", "thicken")
SEVERITY = {"clean": 0.0, "noise": 1.0, "shift": 1.0, "rotate": 1.0, "thicken": 1.0}

# every pool model but the CNN is the same MLP (64-128-128-10), so they can be merged
POOL = (
    *(f"digits/mlp-s{s}" for s in range(5)),          # independent initialisations
    *(f"digits/ckpt-{s}" for s in (100, 200, 400, 800, 1500)),  # checkpoints of one run
    "digits/soup-base",                                # the soup's shared start
    *(f"digits/soup-ft{i}" for i in range(8)),         # fine-tunes of soup-base (a hyperparameter grid)
    "digits/task-noise", "digits/task-rotate", "digits/task-thicken",  # one domain each
    "digits/cnn-s0",                                   # another architecture (3.3x the FLOPs)
)
# "one pool model": the unit of cost
REFERENCE_MODEL = "digits/mlp-s0"
# hard gate on FLOPs per example: <= C x REFERENCE_MODEL's. 2 MLPs (2.0) pass, 3 (3.0) fail; an MoE
# with top_k 2 (2.0 plus a tiny router) passes
BUDGET_MULTIPLIER = 2.5
# the latency gate: measured latency <= C x (1 + tolerance) x the reference's, measured in the same
# run. Generous, because timings of millisecond models on a shared machine are noisy, and Python
# overhead (an MoE's dispatch, a cascade's bookkeeping) costs time that FLOPs do not show
LATENCY_TOLERANCE = 1.0

PUBLIC_FRACTION = 0.3
_PUBLIC_SEED = 1234  # the shift seeds of the public train / val data (the hidden split's are secret)

# SHA-256 of the instructor's hidden split (instructor/capstone/make_hidden.py prints it): the
# leaderboard refuses a hidden file with any other content (corrupted or tampered)
HIDDEN_SHA256 = "0ba56e39c2ed8e989a5f7919d877a3949e67a7a35f01ecca0d29e727b5192dcc"


def domain_mixture(X: torch.Tensor, y: torch.Tensor, seeds: dict[str, list[int]]):
    """X [N, 64], y [N] under every domain: for domain d, one shifted copy of X per seed in
    ``seeds[d]`` ("clean" copies X as is). Returns (X [M, 64], y [M], domain [M]) in DOMAINS order."""
    xs, ys, ds = [], [], []
    for index, name in enumerate(DOMAINS):
        for seed in seeds[name]:
            xs.append(X.clone() if name == "clean" else shift_digits(X, name, SEVERITY[name], seed=seed))
            ys.append(y.clone())
            ds.append(torch.full((len(y),), index, dtype=torch.int64))
    return torch.cat(xs).float(), torch.cat(ys).long(), torch.cat(ds)


@lru_cache(maxsize=None)
def _public(split: str):
    digits = load_digits()
    X, y = {"train": (digits.X_train, digits.y_train), "val": (digits.X_val, digits.y_val)}[split]
    offset = {"train": 0, "val": 100}[split]
    seeds = {name: [_PUBLIC_SEED + offset + i] for i, name in enumerate(DOMAINS)}
    return domain_mixture(X, y, seeds)


def load_public(split: str):
    """The labelled data students may use: ``split`` "train" (5390 examples) or "val" (1795).

    Returns (X [N, 64] float32, y [N] int64, domain [N] int64): the digits train or val split,
    each image once per domain of ``DOMAINS`` (seeded, so the same on every machine).
    """
    if split not in ("train", "val"):
        raise ValueError(f"unknown public split {split!r}: choose 'train' or 'val' (the test split is hidden)")
    return tuple(t.clone() for t in _public(split))


# ----------------------------------------------------------------------------- instructor side


def default_hidden_path() -> Path:
    """``$LABKIT_CAPSTONE_HIDDEN``, else ``instructor/capstone/hidden.safetensors`` of the checkout."""
    env = os.environ.get("LABKIT_CAPSTONE_HIDDEN")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "instructor" / "capstone" / "hidden.safetensors"


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def public_mask(domain: torch.Tensor, fraction: float = PUBLIC_FRACTION, seed: int = 0) -> torch.Tensor:
    """A deterministic public/private assignment [N] bool: within each domain, a seeded random
    ``fraction`` of the examples is public (so both parts hold every domain in the same share)."""
    rng = np.random.default_rng(seed)
    public = np.zeros(len(domain), dtype=bool)
    for index in range(len(DOMAINS)):
        rows = np.flatnonzero(domain.numpy() == index)
        chosen = rng.permutation(rows)[: int(round(fraction * len(rows)))]
        public[chosen] = True
    return torch.from_numpy(public)


def load_hidden(path=None, sha256: str | None = None, with_metadata: bool = False):
    """The hidden split: (X [N, 64], y [N], domain [N], public [N] bool); with ``with_metadata``
    also the dict stored with it (how it was built, the reference frontier).

    Refuses (ValueError, one line) a missing file, or one whose SHA-256 is not ``sha256`` (default
    ``HIDDEN_SHA256``): a corrupted or tampered hidden split never scores anything.
    """
    from safetensors import safe_open

    path = Path(path) if path is not None else default_hidden_path()
    expected = sha256 or HIDDEN_SHA256
    if not path.is_file():
        raise ValueError(f"hidden split {path} does not exist: the instructor builds it with "
                         "`python instructor/capstone/make_hidden.py` (or pass --hidden PATH)")
    got = sha256_file(path)
    if got != expected:
        raise ValueError(f"hidden split {path}: SHA-256 {got[:16]}... is not the recorded {expected[:16]}... "
                         "(labkit.capstone.challenge.HIDDEN_SHA256): the file is corrupted or was modified; "
                         "rebuild it with `python instructor/capstone/make_hidden.py`")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in ("X", "y", "domain", "public")}
        metadata = f.metadata() or {}
    split = (tensors["X"].float(), tensors["y"].long(), tensors["domain"].long(), tensors["public"].bool())
    return (*split, {k: json.loads(v) for k, v in metadata.items()}) if with_metadata else split
