"""The models a capstone spec builds (``spec.KINDS``), one nn.Module each: X [N, 64] -> logits [N, 10].

A checkpoint and a merge are one classifier (``Single``); the others combine classifiers, each in the
way its lab taught: ``Ensemble`` (lab 1), ``MixtureOfExperts`` (lab 3), ``Cascade`` (lab 5). The
members are the kit's own DigitMLP / DigitCNN built from configs and safetensors (``spec.py``).
"""
from __future__ import annotations

import torch
from torch import nn

NUM_CLASSES = 10


class Single(nn.Module):
    """One classifier (kinds checkpoint and merge): logits = model(x)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


class Ensemble(nn.Module):
    """Members' outputs combined per example, with weights w (sum 1):

    mean_prob   log sum_m w_m softmax(z_m)       (a linear mixture of probabilities)
    mean_logit  sum_m w_m z_m                    (a log-linear mixture, up to normalisation)
    vote        sum_m w_m onehot(argmax z_m)     (weighted votes; a tie goes to the lower class)
    """

    def __init__(self, members: list[nn.Module], rule: str, weights: list[float]):
        super().__init__()
        self.members, self.rule = nn.ModuleList(members), rule
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32))

    def forward(self, x):
        z = torch.stack([m(x) for m in self.members])        # [M, N, 10]
        w = self.weights.to(z.device).view(-1, 1, 1)
        if self.rule == "mean_logit":
            return (w * z).sum(0)
        if self.rule == "mean_prob":
            return torch.log((w * torch.softmax(z, -1)).sum(0).clamp_min(1e-30))
        votes = nn.functional.one_hot(z.argmax(-1), z.shape[-1]).float()
        return (w * votes).sum(0)


class MixtureOfExperts(nn.Module):
    """Sparse top-k routing over whole classifiers (Shazeer et al. 2017; Mixtral's gating):

    p = softmax(router(x)); keep the k largest p_e and renormalise them to g_e (sum 1);
    logits = sum_{e in top k} g_e z_e(x). Each expert runs only on the examples routed to it.
    """

    def __init__(self, router: nn.Linear, experts: list[nn.Module], top_k: int):
        super().__init__()
        self.router, self.experts, self.top_k = router, nn.ModuleList(experts), top_k

    def forward(self, x):
        from ..moe.routing import softmax_topk

        gates, chosen = softmax_topk(self.router(x), self.top_k)   # [N, k], [N, k]
        out = torch.zeros(len(x), NUM_CLASSES, device=x.device)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.nonzero(chosen == e, as_tuple=True)
            if len(rows):
                out.index_add_(0, rows, gates[rows, slot, None] * expert(x[rows]))
        return out


class Cascade(nn.Module):
    """Stages tried in order: an example stops at the first stage whose max softmax probability
    reaches that stage's threshold (the last stage takes whatever is left). logits = the stopping
    stage's logits. Each stage runs only on the examples still undecided (Viola & Jones 2001)."""

    def __init__(self, stages: list[nn.Module], thresholds: list[float]):
        super().__init__()
        self.stages, self.thresholds = nn.ModuleList(stages), list(thresholds)

    def forward(self, x):
        return self.run(x)[0]

    def run(self, x):
        """(logits [N, 10], exit stage [N] int64)."""
        out = torch.zeros(len(x), NUM_CLASSES, device=x.device)
        exit_stage = torch.full((len(x),), len(self.stages) - 1, dtype=torch.int64, device=x.device)
        todo = torch.arange(len(x), device=x.device)
        for i, stage in enumerate(self.stages):
            if len(todo) == 0:
                break
            z = stage(x[todo])
            last = i == len(self.stages) - 1
            done = torch.ones(len(todo), dtype=torch.bool, device=x.device) if last else \
                torch.softmax(z, -1).amax(-1) >= self.thresholds[i]
            out[todo[done]] = z[done]
            exit_stage[todo[done]] = i
            todo = todo[~done]
        return out, exit_stage
