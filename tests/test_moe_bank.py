"""The MoE question bank: labkit's own functions pass every case, plausible mistakes fail."""
import torch

from labkit import moe
from labkit import moe_dispatch as md
from labkit.grading import run_question


def _sort_by_expert(experts, num_experts):
    perm, _, offsets = md.sort_by_expert(experts, num_experts)
    return perm, torch.diff(offsets, prepend=offsets.new_zeros(1))


REFERENCE = {
    "moe.top_k_gating": moe.softmax_topk,
    "moe.load_balancing_loss": moe.load_balancing_loss,
    "moe.sort_by_expert": _sort_by_expert,
    "moe.sort_dispatch": lambda x, e, w, gu, dn: md.dispatch(x, e, w, gu, dn, backend="sort"),
}


def test_reference_answers_pass_every_case():
    for qid, fn in REFERENCE.items():
        result = run_question(qid, fn, hidden=True)
        assert result.passed == result.total, result.verdict()


def test_other_backends_pass_sort_dispatch():
    for backend in ("loop", "grouped", "gather"):
        fn = lambda x, e, w, gu, dn, b=backend: md.dispatch(x, e, w, gu, dn, backend=b)  # noqa: E731
        result = run_question("moe.sort_dispatch", fn, hidden=True)
        assert result.passed == result.total, result.verdict()


def test_plausible_mistakes_fail():
    def no_renormalise(logits, k):
        if not 1 <= k <= logits.shape[-1]:
            raise ValueError("k")
        return torch.topk(torch.softmax(logits.float(), -1), k, -1)

    def topk_then_softmax_over_all(logits, k):  # keeps all experts' mass in the denominator
        return no_renormalise(logits, k)

    def counts_with_probs(logits, top_k):  # uses the probabilities for f too: not the Switch loss
        p = torch.softmax(logits, -1)
        return logits.shape[1] * (p.mean(0) ** 2).sum()

    def unstable_sort(experts, num_experts):
        flat = experts.reshape(-1)
        order = torch.argsort(flat, descending=True).flip(0)  # right groups, ties in reverse order
        return order, torch.bincount(flat)

    def forgets_weights(x, e, w, gu, dn):
        return md.dispatch(x, e, torch.ones_like(w), gu, dn, backend="loop")

    mistakes = {
        "moe.top_k_gating": no_renormalise,
        "moe.load_balancing_loss": counts_with_probs,
        "moe.sort_by_expert": unstable_sort,
        "moe.sort_dispatch": forgets_weights,
    }
    for qid, fn in mistakes.items():
        result = run_question(qid, fn, hidden=True)
        assert result.passed < result.total, f"{qid}: a wrong answer passed every case"
    assert run_question("moe.top_k_gating", topk_then_softmax_over_all).passed == 0
