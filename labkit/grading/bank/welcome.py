"""Visible cases of notebooks/00_welcome.ipynb: four warm-up functions that the later labs build on.

Expected values are hand-computed or stored data (``visible_data.json``); the hidden cases and the
float64 references are in the instructor bank (instructor/bank/welcome.py).
"""
from __future__ import annotations

import math

import torch

from labkit.grading import Question, expect_close, expect_true, register
from labkit.grading.bank._data import visible

NB = "00_welcome"


# ---- softmax with a temperature --------------------------------------------------------------

def _sm_hand(f):
    logits = torch.tensor([0.0, math.log(2), math.log(3), math.log(4)])
    expect_close(f(logits, 1.0), torch.tensor([0.1, 0.2, 0.3, 0.4]), "probabilities")


def _sm_t2(f):
    logits = torch.tensor([0.0, 2 * math.log(2)])  # at T=2: exp(0)=1, exp(ln 2)=2
    expect_close(f(logits, 2.0), torch.tensor([1 / 3, 2 / 3]), "probabilities at T=2")


def _sm_batch(f):
    d = visible("welcome.softmax/batch")
    expect_close(f(d["logits"], 0.5), d["expected"], "probabilities [4, 10] at T=0.5")


register(Question(
    id="welcome.softmax", notebook=NB, function="softmax_with_temperature", points=2,
    description="softmax(logits / T) over the last dimension, in the input's dtype; default T=1; "
                "stable for large logits; ValueError for T <= 0",
    groups={"core": 3, "stable": 1, "errors": 1},
    implemented_by=[],  # torch.softmax is a tool the exercise may use; the kit has no such function
    visible=[("T=1 on log([1, 2, 3, 4])", _sm_hand), ("T=2 flattens [0, 2 ln 2]", _sm_t2),
             ("batch [4, 10] at T=0.5", _sm_batch)],
))


# ---- accuracy --------------------------------------------------------------------------------

def _acc_hand(f):
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 4.0], [1.0, 2.0]])
    labels = torch.tensor([0, 1, 1, 1])  # argmax is 0, 1, 0, 1: three of four right
    expect_close(f(logits, labels), 0.75, "accuracy")


def _acc_all(f):
    logits = torch.eye(5)
    expect_close(f(logits, torch.arange(5)), 1.0, "accuracy of a perfect classifier")


def _acc_type(f):
    got = f(torch.eye(3), torch.tensor([0, 1, 1]))
    expect_true(type(got) is float, f"accuracy should be a Python float (use .item()), got {type(got).__name__}")


register(Question(
    id="welcome.accuracy", notebook=NB, function="accuracy", points=1,
    description="fraction of rows whose argmax equals the label, as a Python float; ValueError on a length mismatch",
    groups={"core": 2, "errors": 1},
    implemented_by=["labkit.train.accuracy"],
    visible=[("three of four right", _acc_hand), ("perfect classifier", _acc_all),
             ("returns a Python float", _acc_type)],
))


# ---- weighted average of member probabilities (an ensemble, in one line) ------------------------

def _avg_uniform(f):
    probs = torch.tensor([[[0.2, 0.8]], [[0.6, 0.4]]])  # [M=2, N=1, C=2]
    expect_close(f(probs), torch.tensor([[0.4, 0.6]]), "uniform average")


def _avg_weighted(f):
    probs = torch.tensor([[[0.2, 0.8]], [[0.6, 0.4]]])
    expect_close(f(probs, torch.tensor([0.25, 0.75])), torch.tensor([[0.5, 0.5]]), "average with weights (0.25, 0.75)")


register(Question(
    id="welcome.average_probs", notebook=NB, function="average_probs", points=2,
    description="sum_m w_m P_m over the member dimension of [M, N, C]; uniform by default; ValueError when "
                "the weights do not match the members or do not sum to 1",
    groups={"core": 3, "errors": 1},
    implemented_by=["labkit.ensemble.soft_vote", "labkit.ensemble.linear_interpolate"],
    visible=[("two members, uniform", _avg_uniform), ("two members, weights (0.25, 0.75)", _avg_weighted)],
))


# ---- agreement between two classifiers ---------------------------------------------------------

def _agree_hand(f):
    expect_close(f(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 0, 3, 0])), 0.5, "agreement")


register(Question(
    id="welcome.agreement", notebook=NB, function="agreement", points=1,
    description="fraction of examples on which two classifiers predict the same label; ValueError when the "
                "shapes differ",
    groups={"core": 2, "errors": 1},
    implemented_by=["labkit.ensemble.pairwise_disagreement"],
    visible=[("two of four agree", _agree_hand)],
))
