"""Combining member outputs: the rules, weights learned for them, and negative evidence.

Conventions: the member axis is always first. Member logits are a list of tensors or one tensor
``[M, ..., V]`` (M members, V classes or vocabulary entries); weights are ``[M]`` (one per member)
or ``[M, ...]`` (one per member and position, e.g. predicted by a gating network). All combination
rules return log-probabilities ``[..., V]``.

  1. combination rules ........ linear_interpolate, log_linear_interpolate, combine
  2. learned weights .......... fit_mixture_weights (EM), fit_log_linear_weights, GatingNetwork, train_gate
  3. negative evidence ........ dexperts, contrastive_logprobs
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------
# 1. Combination rules


def _as_members(logits, name: str = "logits") -> torch.Tensor:
    """A list of member tensors or one tensor [M, ..., V] -> one floating tensor [M, ..., V]."""
    if isinstance(logits, (list, tuple)):
        if len(logits) == 0:
            raise ValueError(f"{name} is an empty list: an ensemble needs at least one member")
        shapes = {tuple(t.shape) for t in logits}
        if len(shapes) != 1:
            raise ValueError(f"{name}: members have different shapes {sorted(shapes)}; "
                             "all members must score the same positions over the same vocabulary")
        logits = torch.stack(list(logits))
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a tensor [M, ..., V] or a list of tensors, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {logits.dtype}")
    if logits.ndim < 2:
        raise ValueError(f"{name} must have a member axis and a vocabulary axis [M, ..., V], got shape {tuple(logits.shape)}")
    return logits


def _as_weights(weights, logits: torch.Tensor, rule: str) -> torch.Tensor:
    """Check weights against member logits [M, ..., V]; return them shaped [M, ..., 1] to broadcast.

    Per-member weights are [M]; per-position weights are [M, ...] matching logits.shape[:-1] (or
    broadcastable to it). Linear weights must be >= 0 and sum to 1 over members; log-linear weights
    may be any finite numbers (negative ones subtract evidence).
    """
    M = logits.shape[0]
    if weights is None:
        weights = torch.full((M,), 1.0 / M)
    weights = torch.as_tensor(weights, dtype=logits.dtype, device=logits.device)
    if weights.ndim == 0 or weights.shape[0] != M:
        raise ValueError(f"weights must have the member axis first with {M} entries (one per member), "
                         f"got shape {tuple(weights.shape)}")
    if weights.ndim > logits.ndim - 1:
        raise ValueError(f"weights shape {tuple(weights.shape)} has more axes than the logits' positions "
                         f"{tuple(logits.shape[:-1])}")
    weights = weights.reshape(*weights.shape, *([1] * (logits.ndim - weights.ndim)))  # [M, ..., 1]
    try:
        torch.broadcast_shapes(weights.shape, logits.shape)
    except RuntimeError:
        raise ValueError(f"weights shape {tuple(weights.shape)} does not broadcast against logits "
                         f"{tuple(logits.shape)}; per-position weights must be [M, ...] = logits.shape[:-1]") from None
    if not torch.isfinite(weights).all():
        raise ValueError("weights contain NaN or infinite values")
    if rule == "linear":
        if (weights < 0).any():
            raise ValueError(f"linear interpolation needs non-negative weights, got min {weights.min().item():.4g}; "
                             "use log_linear_interpolate for negative (subtracted) members")
        total = weights.sum(0)
        if not torch.allclose(total, torch.ones_like(total), atol=1e-4):
            bad = total.flatten()[(total.flatten() - 1).abs().argmax()].item()
            raise ValueError(f"linear interpolation weights must sum to 1 over members, got a sum of {bad:.6g}")
    return weights


def linear_interpolate(logits, weights=None) -> torch.Tensor:
    """Linear interpolation (mixture of experts' outputs; "OR"): log sum_m w_m softmax(logits_m).

        P(y|x) = sum_m w_m P_m(y|x),   w_m >= 0,  sum_m w_m = 1

    Computed in log space: logsumexp_m(log w_m + log_softmax(logits_m)), so tiny probabilities do
    not underflow. A token survives if *any* member with weight > 0 likes it. Classic use: n-gram /
    neural LM interpolation (Jelinek & Mercer 1980), ensembles of NMT systems.

    logits: [M, ..., V] or a list of M tensors [..., V]; weights: [M] or [M, ...] (default uniform).
    Returns log-probabilities [..., V].
    """
    logits = _as_members(logits)
    weights = _as_weights(weights, logits, "linear")
    log_w = torch.log(weights)  # log 0 = -inf: a zero-weight member drops out exactly
    return torch.logsumexp(log_w + F.log_softmax(logits, dim=-1), dim=0)


def log_linear_interpolate(logits, weights=None) -> torch.Tensor:
    """Log-linear interpolation (product of experts; "AND"): log_softmax(sum_m w_m log_softmax(logits_m)).

        P(y|x) = (1/Z(x)) prod_m P_m(y|x)^{w_m}

    The product must be renormalised (the Z). A member giving a token (near) zero probability vetoes
    it. Weights may be negative: a negative member pushes probability away from what it likes
    (Hinton 2002, products of experts; Liu et al. 2021, DExperts).

    logits: [M, ..., V] or a list; weights: [M] or [M, ...] (default uniform). Returns log-probs [..., V].
    """
    logits = _as_members(logits)
    weights = _as_weights(weights, logits, "log_linear")
    scaled = weights * F.log_softmax(logits, dim=-1)
    scaled = torch.where(weights == 0, torch.zeros_like(scaled), scaled)  # 0 * -inf would be NaN
    return F.log_softmax(scaled.sum(0), dim=-1)


def combine(logits, weights=None, rule: str = "linear") -> torch.Tensor:
    """Dispatch to a rule by name ("linear" or "log_linear"), or call ``rule(logits, weights)``."""
    if callable(rule):
        return rule(_as_members(logits), weights)
    if rule == "linear":
        return linear_interpolate(logits, weights)
    if rule in ("log_linear", "log-linear", "loglinear"):
        return log_linear_interpolate(logits, weights)
    raise ValueError(f"unknown rule {rule!r}: use 'linear', 'log_linear' or a callable(logits, weights)")


# ------------------------------------------------------------------------------------------------
# 2. Learned weights


def target_logprobs(logprobs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Each member's log-probability of the correct output: [M, ..., V], targets [...] -> [M, N].

    ``mask`` [...] (bool) keeps only the positions that count (e.g. answer tokens); positions are
    flattened into N. This is all that fitting context-independent weights needs: a cache of these
    numbers, not the members themselves.
    """
    logprobs = _as_members(logprobs, "logprobs")
    if targets.shape != logprobs.shape[1:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal logprobs.shape[1:-1] = {tuple(logprobs.shape[1:-1])}")
    picked = logprobs.gather(-1, targets.expand(logprobs.shape[0], *targets.shape).unsqueeze(-1)).squeeze(-1)  # [M, ...]
    if mask is not None:
        if mask.shape != targets.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal targets shape {tuple(targets.shape)}")
        return picked[:, mask.bool()]
    return picked.reshape(picked.shape[0], -1)


def fit_mixture_weights(target_lp: torch.Tensor, iters: int = 1000, tol: float = 1e-10) -> torch.Tensor:
    """Context-independent linear-interpolation weights by expectation-maximisation on the simplex.

    Maximises sum_n log sum_m w_m P_m(y_n|x_n) over w >= 0, sum w = 1 (Dempster et al. 1977; the
    standard way to tune LM interpolation weights on held-out data):
        E-step: r_mn = w_m P_m(y_n|x_n) / sum_k w_k P_k(y_n|x_n)
        M-step: w_m = (1/N) sum_n r_mn
    Every step keeps w on the simplex and never lowers the likelihood; only M-1 numbers are fitted,
    so ~100 labelled tokens are plenty.

    target_lp: [M, N] member log-probs of the correct outputs (see ``target_logprobs``). Stops after
    ``iters`` steps or when no weight moves by more than ``tol``. Returns [M].
    """
    if target_lp.ndim != 2:
        raise ValueError(f"target_lp must be [M, N] (members x examples), got shape {tuple(target_lp.shape)}")
    if target_lp.shape[1] == 0:
        raise ValueError("target_lp has no examples (N = 0): cannot fit weights")
    if not torch.isfinite(target_lp).any(0).all():
        raise ValueError("some example has probability 0 under every member: its likelihood is -inf for any weights")
    M, N = target_lp.shape
    log_w = torch.full((M,), -math.log(M), dtype=target_lp.dtype, device=target_lp.device)
    for _ in range(iters):
        joint = log_w[:, None] + target_lp                               # [M, N]
        log_r = joint - torch.logsumexp(joint, dim=0)                    # E-step: log r_mn
        new_log_w = torch.logsumexp(log_r, dim=1) - math.log(N)          # M-step: log mean_n r_mn
        moved = (new_log_w.exp() - log_w.exp()).abs().max().item()
        log_w = new_log_w
        if moved <= tol:
            break
    return log_w.exp()


def fit_log_linear_weights(logprobs: torch.Tensor, targets: torch.Tensor, steps: int = 100,
                           l2: float = 0.0) -> torch.Tensor:
    """Context-independent log-linear weights by maximum likelihood (unconstrained, may be negative).

        maximise sum_n log softmax(sum_m w_m log P_m(.|x_n))[y_n] - l2 * ||w||^2

    This is a logistic regression whose features are the members' log-probabilities, so the
    objective is concave and L-BFGS finds the optimum (Och & Ney 2002 tune log-linear MT feature
    weights the same way). logprobs: [M, N, V]; targets: [N]. Returns w [M].
    """
    logprobs = _as_members(logprobs, "logprobs")
    if logprobs.ndim != 3 or targets.shape != logprobs.shape[1:2]:
        raise ValueError(f"need logprobs [M, N, V] and targets [N], got {tuple(logprobs.shape)} and {tuple(targets.shape)}")
    logprobs = F.log_softmax(logprobs.detach(), dim=-1)
    w = torch.full((logprobs.shape[0],), 1.0 / logprobs.shape[0], dtype=logprobs.dtype,
                   device=logprobs.device, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=steps, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        mixed = F.log_softmax(torch.einsum("m,mnv->nv", w, logprobs), dim=-1)
        loss = F.nll_loss(mixed, targets) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def member_features(logprobs: torch.Tensor) -> torch.Tensor:
    """Cheap per-context gate features from member outputs: each member's entropy and max log-prob.

    logprobs [M, ..., V] -> features [..., 2M]. A member that is confident here is likely an expert
    for this context; these numbers come from the cache, so the gate never needs the members.
    """
    logprobs = F.log_softmax(logprobs, dim=-1)
    entropy = torch.special.entr(logprobs.exp()).sum(-1)   # [M, ...]; 0 log 0 = 0
    top = logprobs.max(-1).values                     # [M, ...]
    return torch.cat([entropy, top], dim=0).movedim(0, -1)


class GatingNetwork(nn.Module):
    """A small network that predicts per-context mixture weights: w(x) = softmax(MLP(features(x))).

    The context-dependent linear interpolation of Jacobs et al. 1991 ("Adaptive mixtures of local
    experts") with frozen experts. forward(member_logprobs [M, ..., V], features=None) -> weights
    [M, ...] (member axis first, summing to 1). Features default to ``member_features``; pass your
    own [..., n_features] (e.g. a hidden state) with a matching ``n_features``.
    """

    def __init__(self, n_members: int, n_features: int | None = None, hidden: int = 32, feature_fn=member_features):
        super().__init__()
        self.n_members = n_members
        self.feature_fn = feature_fn
        n_features = 2 * n_members if n_features is None else n_features
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.Tanh(), nn.Linear(hidden, n_members))

    def forward(self, member_logprobs: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        if member_logprobs.shape[0] != self.n_members:
            raise ValueError(f"gate was built for {self.n_members} members, got {member_logprobs.shape[0]}")
        if features is None:
            features = self.feature_fn(member_logprobs)
        dtype = self.net[0].weight.dtype
        return F.softmax(self.net(features.to(dtype)), dim=-1).movedim(-1, 0).to(member_logprobs.dtype)


def train_gate(gate: GatingNetwork, member_logprobs: torch.Tensor, targets: torch.Tensor,
               features: torch.Tensor | None = None, steps: int = 300, lr: float = 1e-2, seed: int = 0) -> list[float]:
    """Train a gate by maximum likelihood on cached member outputs (members are never called).

        minimise -(1/N) sum_n log sum_m g_m(x_n) P_m(y_n|x_n)

    member_logprobs: [M, N, V] cached log-probs; targets [N]; features [N, F] (optional).
    Full-batch Adam, seeded; returns the loss curve.
    """
    member_logprobs = F.log_softmax(_as_members(member_logprobs, "member_logprobs").detach(), dim=-1)
    if member_logprobs.ndim != 3 or targets.shape != member_logprobs.shape[1:2]:
        raise ValueError(f"need member_logprobs [M, N, V] and targets [N], got "
                         f"{tuple(member_logprobs.shape)} and {tuple(targets.shape)}")
    torch.manual_seed(seed)
    target_lp = target_logprobs(member_logprobs, targets)  # [M, N]
    opt = torch.optim.Adam(gate.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        weights = gate(member_logprobs, features)            # [M, N]
        loss = -torch.logsumexp(torch.log(weights) + target_lp, dim=0).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ------------------------------------------------------------------------------------------------
# 3. Negative evidence


def dexperts(core_logits: torch.Tensor, expert_logits: torch.Tensor, anti_logits: torch.Tensor,
             alpha: float = 1.0) -> torch.Tensor:
    """DExperts (Liu et al. 2021): log_softmax(z_core + alpha * (z_expert - z_anti)).

    A log-linear mix with weights (1, alpha, -alpha): tokens the anti-expert likes more than the
    expert are pushed down. Per-member normalisers cancel inside the final softmax, so mixing
    logits or log-probs gives the same result. All inputs [..., V]; returns log-probs [..., V].
    """
    return log_linear_interpolate([core_logits, expert_logits, anti_logits], [1.0, alpha, -alpha])


def contrastive_logprobs(expert_logits: torch.Tensor, amateur_logits: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Contrastive decoding (Li et al. 2023): expert minus amateur over the expert's plausible set.

        V_head = {v : p_exp(v) >= alpha * max_w p_exp(w)}
        score(v) = log p_exp(v) - log p_ama(v)  if v in V_head  else  -inf

    The plausibility threshold stops the difference from rewarding tokens both models find absurd.
    Returned renormalised as log_softmax(score), so argmax is the paper's greedy choice and the
    output can be sampled from. Inputs [..., V]; returns [..., V].
    """
    if expert_logits.shape != amateur_logits.shape:
        raise ValueError(f"expert_logits {tuple(expert_logits.shape)} and amateur_logits "
                         f"{tuple(amateur_logits.shape)} must have the same shape")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha is a probability ratio threshold in [0, 1], got {alpha}")
    lp_exp = F.log_softmax(expert_logits, dim=-1)
    lp_ama = F.log_softmax(amateur_logits, dim=-1)
    plausible = lp_exp >= lp_exp.max(-1, keepdim=True).values + math.log(alpha) if alpha > 0 else torch.ones_like(lp_exp, dtype=torch.bool)
    score = torch.where(plausible, lp_exp - lp_ama, torch.full_like(lp_exp, -math.inf))
    return F.log_softmax(score, dim=-1)
