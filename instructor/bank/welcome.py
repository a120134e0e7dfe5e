"""Hidden cases and float64 references of notebooks/00_welcome.ipynb (instructor only: not in the package).

``VISIBLE_DATA`` makes the stored inputs and expected values of the visible cases that use random
inputs (instructor/make_visible_data.py writes them to labkit/grading/bank/visible_data.json).
"""
from __future__ import annotations

import torch

from labkit.grading import add_hidden, expect_close, expect_raises


# ---- references (float64, deliberately plain) ------------------------------------------------

def _softmax_ref(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    z = logits.double() / temperature
    z = z - z.max(dim=-1, keepdim=True).values
    return (z.exp() / z.exp().sum(-1, keepdim=True)).to(logits.dtype)


def _accuracy_ref(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return sum(int(row.argmax()) == int(y) for row, y in zip(logits, labels)) / len(labels)


def _average_ref(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return torch.einsum("m,mnc->nc", weights.double(), probs.double()).to(probs.dtype)


def _visible_softmax_batch():
    logits = torch.randn(4, 10) * 3
    return {"logits": logits, "expected": _softmax_ref(logits, 0.5)}


VISIBLE_DATA = {"welcome.softmax/batch": _visible_softmax_batch}


# ---- softmax ---------------------------------------------------------------------------------

def _sm_default(f):
    logits = torch.randn(3, 6)
    expect_close(f(logits), _softmax_ref(logits, 1.0), "probabilities with the default temperature")


def _sm_large(f):
    logits = torch.tensor([[1000.0, 1000.0, 990.0], [-1000.0, -1000.0, -1000.0]])
    expect_close(f(logits, 1.0), _softmax_ref(logits, 1.0),
                 "probabilities of logits near ±1000 (subtract the max before exp)")


def _sm_3d(f):
    logits = torch.randn(2, 3, 5)
    expect_close(f(logits, 3.0), _softmax_ref(logits, 3.0), "probabilities [2, 3, 5] over the last dim")


def _sm_bad_t(f):
    expect_raises(ValueError, f, torch.randn(5), 0.0, what="temperature=0")
    expect_raises(ValueError, f, torch.randn(5), -1.0, what="temperature=-1")


add_hidden("welcome.softmax", [
    ("default temperature is 1", _sm_default, "core"), ("3-D input", _sm_3d, "core"),
    ("large logits stay finite", _sm_large, "stable"), ("T <= 0 raises ValueError", _sm_bad_t, "errors"),
])


# ---- accuracy --------------------------------------------------------------------------------

def _acc_random(f):
    logits, labels = torch.randn(200, 10), torch.randint(0, 10, (200,))
    expect_close(f(logits, labels), _accuracy_ref(logits, labels), "accuracy on 200 random examples")


def _acc_mismatch(f):
    expect_raises(ValueError, f, torch.randn(4, 3), torch.tensor([0, 1, 2]), what="4 logits rows but 3 labels")


add_hidden("welcome.accuracy", [
    ("200 random examples", _acc_random, "core"), ("length mismatch raises ValueError", _acc_mismatch, "errors"),
])


# ---- average_probs ---------------------------------------------------------------------------

def _avg_many(f):
    probs = torch.softmax(torch.randn(5, 7, 10), dim=-1)
    w = torch.softmax(torch.randn(5), dim=0)
    expect_close(f(probs, w), _average_ref(probs, w), "5 members [5, 7, 10] with random weights")


def _avg_default(f):
    probs = torch.softmax(torch.randn(3, 4, 6), dim=-1)
    expect_close(f(probs), _average_ref(probs, torch.full((3,), 1 / 3)), "3 members, default weights")


def _avg_bad(f):
    probs = torch.softmax(torch.randn(2, 3, 4), dim=-1)
    expect_raises(ValueError, f, probs, torch.tensor([0.5, 0.6]), what="weights summing to 1.1")
    expect_raises(ValueError, f, probs, torch.tensor([1 / 3, 1 / 3, 1 / 3]), what="3 weights for 2 members")


add_hidden("welcome.average_probs", [
    ("five members, random weights", _avg_many, "core"), ("default weights are uniform", _avg_default, "core"),
    ("bad weights raise ValueError", _avg_bad, "errors"),
])


# ---- agreement -------------------------------------------------------------------------------

def _agree_random(f):
    a, b = torch.randint(0, 3, (500,)), torch.randint(0, 3, (500,))
    expect_close(f(a, b), (a == b).double().mean().item(), "agreement of 500 random predictions")


def _agree_mismatch(f):
    expect_raises(ValueError, f, torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long),
                  what="predictions of different lengths")


add_hidden("welcome.agreement", [
    ("500 random predictions", _agree_random, "core"), ("length mismatch raises ValueError", _agree_mismatch, "errors"),
])
