"""Questions of notebooks/00_welcome.ipynb: four warm-up functions that the later labs build on.

Expected values are hand-computed or come from the float64 references below (written independently
of the notebook's solutions).
"""
from __future__ import annotations

import math

import torch

from labkit.grading import Question, expect_close, expect_raises, expect_true, register

NB = "00_welcome"


# ---- references (float64, deliberately plain) ------------------------------------------------

def _softmax_ref(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    z = logits.double() / temperature
    z = z - z.max(dim=-1, keepdim=True).values
    return (z.exp() / z.exp().sum(-1, keepdim=True)).to(logits.dtype)


def _accuracy_ref(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return sum(int(row.argmax()) == int(y) for row, y in zip(logits, labels)) / len(labels)


def _average_ref(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return torch.einsum("m,mnc->nc", weights.double(), probs.double()).to(probs.dtype)


# ---- softmax with a temperature --------------------------------------------------------------

def _sm_hand(f):
    logits = torch.tensor([0.0, math.log(2), math.log(3), math.log(4)])
    expect_close(f(logits, 1.0), torch.tensor([0.1, 0.2, 0.3, 0.4]), "probabilities")


def _sm_t2(f):
    logits = torch.tensor([0.0, 2 * math.log(2)])  # at T=2: exp(0)=1, exp(ln 2)=2
    expect_close(f(logits, 2.0), torch.tensor([1 / 3, 2 / 3]), "probabilities at T=2")


def _sm_batch(f):
    logits = torch.randn(4, 10) * 3
    expect_close(f(logits, 0.5), _softmax_ref(logits, 0.5), "probabilities [4, 10] at T=0.5")


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


register(Question(
    id="welcome.softmax", notebook=NB, function="softmax_with_temperature", points=2,
    description="softmax(logits / T) over the last dimension; ValueError for T <= 0",
    visible=[("T=1 on log([1, 2, 3, 4])", _sm_hand), ("T=2 flattens [0, 2 ln 2]", _sm_t2),
             ("batch [4, 10] at T=0.5", _sm_batch)],
    hidden=[("default temperature is 1", _sm_default), ("large logits stay finite", _sm_large),
            ("3-D input", _sm_3d), ("T <= 0 raises ValueError", _sm_bad_t)],
))


# ---- accuracy --------------------------------------------------------------------------------

def _acc_hand(f):
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 4.0], [1.0, 2.0]])
    labels = torch.tensor([0, 1, 1, 1])  # argmax is 0, 1, 0, 1: three of four right
    expect_close(f(logits, labels), 0.75, "accuracy")


def _acc_all(f):
    logits = torch.eye(5)
    expect_close(f(logits, torch.arange(5)), 1.0, "accuracy of a perfect classifier")


def _acc_random(f):
    logits, labels = torch.randn(200, 10), torch.randint(0, 10, (200,))
    expect_close(f(logits, labels), _accuracy_ref(logits, labels), "accuracy on 200 random examples")


def _acc_type(f):
    got = f(torch.eye(3), torch.tensor([0, 1, 1]))
    expect_true(isinstance(got, float), f"accuracy should be a Python float (use .item()), got {type(got).__name__}")


def _acc_mismatch(f):
    expect_raises(ValueError, f, torch.randn(4, 3), torch.tensor([0, 1, 2]), what="4 logits rows but 3 labels")


register(Question(
    id="welcome.accuracy", notebook=NB, function="accuracy", points=1,
    description="fraction of rows whose argmax equals the label, as a float; ValueError on a length mismatch",
    visible=[("three of four right", _acc_hand), ("perfect classifier", _acc_all)],
    hidden=[("200 random examples", _acc_random), ("returns a float", _acc_type),
            ("length mismatch raises ValueError", _acc_mismatch)],
))


# ---- weighted average of member probabilities (an ensemble, in one line) ------------------------

def _avg_uniform(f):
    probs = torch.tensor([[[0.2, 0.8]], [[0.6, 0.4]]])  # [M=2, N=1, C=2]
    expect_close(f(probs), torch.tensor([[0.4, 0.6]]), "uniform average")


def _avg_weighted(f):
    probs = torch.tensor([[[0.2, 0.8]], [[0.6, 0.4]]])
    expect_close(f(probs, torch.tensor([0.25, 0.75])), torch.tensor([[0.5, 0.5]]), "average with weights (0.25, 0.75)")


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


register(Question(
    id="welcome.average_probs", notebook=NB, function="average_probs", points=2,
    description="sum_m w_m P_m over the member dimension of [M, N, C]; uniform by default",
    visible=[("two members, uniform", _avg_uniform), ("two members, weights (0.25, 0.75)", _avg_weighted)],
    hidden=[("five members, random weights", _avg_many), ("default weights are uniform", _avg_default),
            ("bad weights raise ValueError", _avg_bad)],
))


# ---- agreement between two classifiers ---------------------------------------------------------

def _agree_hand(f):
    expect_close(f(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 0, 3, 0])), 0.5, "agreement")


def _agree_random(f):
    a, b = torch.randint(0, 3, (500,)), torch.randint(0, 3, (500,))
    expect_close(f(a, b), (a == b).double().mean().item(), "agreement of 500 random predictions")


def _agree_mismatch(f):
    expect_raises(ValueError, f, torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long),
                  what="predictions of different lengths")


register(Question(
    id="welcome.agreement", notebook=NB, function="agreement", points=1,
    description="fraction of examples on which two classifiers predict the same label",
    visible=[("two of four agree", _agree_hand)],
    hidden=[("500 random predictions", _agree_random), ("length mismatch raises ValueError", _agree_mismatch)],
))
