"""The ensembling question bank: the package's own functions pass every case, plausible mistakes fail."""
import torch

from labkit import ensemble as ens
from labkit.grading import run_question

QUESTIONS = {
    "ensemble.linear_interpolate": ens.linear_interpolate,
    "ensemble.log_linear_interpolate": ens.log_linear_interpolate,
    "ensemble.fit_mixture_weights": lambda target_lp, iters=200: ens.fit_mixture_weights(target_lp, iters),
    "ensemble.bootstrap_indices": ens.bootstrap_indices,
    "ensemble.ensemble_next_token": lambda logits, weights, rule: ens.ensemble_next_token(logits, weights, rule),
}


def test_reference_answers_pass_every_case():
    for qid, fn in QUESTIONS.items():
        result = run_question(qid, fn, hidden=True)
        assert result.passed == result.total, result.verdict()


def test_plausible_mistakes_fail():
    def without_replacement(n, k, seed):
        if n < 1 or k < 1:
            raise ValueError("bad")
        gen = torch.Generator().manual_seed(seed)
        return torch.stack([torch.randperm(n, generator=gen) for _ in range(k)])

    def mean_of_logits(logits, weights):  # mixes logits instead of probabilities
        w = torch.as_tensor(weights, dtype=logits.dtype)
        return torch.log_softmax((w.reshape(*w.shape, *[1] * (logits.ndim - w.ndim)) * logits).sum(0), -1)

    def unnormalised_log_linear(logits, weights):  # forgets to renormalise the product
        w = torch.as_tensor(weights, dtype=logits.dtype)
        return (w.reshape(*w.shape, *[1] * (logits.ndim - w.ndim)) * torch.log_softmax(logits, -1)).sum(0)

    mistakes = {
        "ensemble.linear_interpolate": mean_of_logits,
        "ensemble.log_linear_interpolate": unnormalised_log_linear,
        "ensemble.fit_mixture_weights": lambda t, iters=200: torch.full((t.shape[0],), 1 / t.shape[0], dtype=t.dtype),
        "ensemble.bootstrap_indices": without_replacement,
        "ensemble.ensemble_next_token": lambda logits, w, rule: ens.ensemble_next_token(logits, w, "linear"),
    }
    for qid, fn in mistakes.items():
        result = run_question(qid, fn, hidden=True)
        assert result.passed < result.total, f"{qid}: a wrong answer passed every case"
