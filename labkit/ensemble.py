"""Ensembling: combining the *outputs* of several models.

Works for any models whose outputs live in the same space (same label set, or same tokenizer for
language models): members may differ in architecture, initialisation and training data. Only the
batched "stacked members" forward needs members of one architecture.

Conventions: the member axis is always first. Member logits are a list of tensors or one tensor
``[M, ..., V]`` (M members, V classes or vocabulary entries); weights are ``[M]`` (one per member)
or ``[M, ...]`` (one per member and position, e.g. predicted by a gating network). All combination
rules return log-probabilities ``[..., V]``.

Contents
  1. combination rules ........ linear_interpolate, log_linear_interpolate
  2. learned weights .......... fit_mixture_weights (EM), fit_log_linear_weights, GatingNetwork, train_gate
  3. negative evidence ........ dexperts, contrastive_logprobs
  4. token-level decoding ..... ensemble_next_token, EnsembleLM, member_logprobs
  5. getting members .......... bootstrap_indices, bagging, mc_dropout_logits, snapshot_lr, train_snapshots
     classifier combiners ..... soft_vote, hard_vote, out_of_fold_predictions, stacking_features, fit_stacker
  6. speed .................... stack_members, stacked_forward, loop_forward
  7. diagnostics .............. error_correlation, pairwise_disagreement, ensemble_report, member_contribution
"""
from __future__ import annotations

import copy
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


# ------------------------------------------------------------------------------------------------
# 4. Token-level ensemble decoding of causal LMs


def ensemble_next_token(member_logits, weights=None, rule: str = "linear", temperature: float = 0.0,
                        generator: torch.Generator | None = None):
    """One ensemble decoding step: combine members' next-token logits [M, B, V], pick tokens [B].

        p(y_t | y_<t, x) = rule_m(P_m(y_t | y_<t, x); w),   y_t = argmax p  or  y_t ~ p^(1/T)

    temperature 0 is greedy (ties go to the lowest token id); otherwise sample with ``generator``
    (on the logits' device). Returns (tokens [B], log-probs [B, V]) where log-probs are the
    combined distribution before temperature.
    """
    logprobs = combine(member_logits, weights, rule)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if temperature == 0:
        return logprobs.argmax(-1), logprobs
    probs = F.softmax(logprobs / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1), logprobs


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left padding: a row's real tokens get positions 0, 1, 2, ... (pads get 0, they are masked)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def member_logprobs(models, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cache every member's next-token log-probs on a (left-padded) batch: [M, B, T, V].

    Position t holds log P_m(x_{t+1} | x_<=t). This cache is what weights and gates are fitted on.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    positions = position_ids_from_mask(attention_mask)
    outs = [F.log_softmax(m(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits.float(), -1)
            for m in models]
    return _as_members(outs, "member log-probs")


def align_to_vocab(logits: torch.Tensor, token_map: torch.Tensor) -> torch.Tensor:
    """Project one member's logits [..., V_m] onto a shared vocabulary [..., V] via ``token_map``.

    token_map [V]: for each shared token id, the member's id for it, or -1 when the member lacks it
    (probability 0 there: the member abstains, which only the linear rule tolerates). The member's
    mass on tokens outside the shared vocabulary is dropped and the rest renormalised.
    """
    gathered = logits.gather(-1, token_map.clamp(min=0).expand(*logits.shape[:-1], -1))
    return torch.where(token_map >= 0, gathered, torch.full_like(gathered, -math.inf))


class EnsembleLM:
    """Token-level ensemble of Hugging Face causal LMs sharing a tokenizer.

    At every step each member scores the next token given the same prefix, the scores are combined
    by ``rule`` (linear: OR; log-linear: AND, negative weights allowed) with ``weights`` ([M] fixed,
    or a callable such as a trained ``GatingNetwork`` mapping member log-probs [M, B, V] to per-row
    weights [M, B]), and one token is chosen for the whole ensemble. Every member keeps its own KV
    cache (``past_key_values``), so a step costs M single-token forwards, not M full re-reads.

    Members with different vocabulary sizes are refused unless ``token_maps`` (one LongTensor per
    member, see ``align_to_vocab``) aligns them to a shared vocabulary for the linear rule.
    """

    def __init__(self, members, weights=None, rule: str = "linear", token_maps=None):
        self.members = list(members)
        if not self.members:
            raise ValueError("EnsembleLM needs at least one member")
        self.rule, self.weights, self.token_maps = rule, weights, None
        sizes = [m.config.vocab_size for m in self.members]
        if token_maps is None:
            if len(set(sizes)) > 1:
                raise ValueError(f"members have different vocabulary sizes {sizes}: their token ids do not mean the "
                                 "same thing. Use members that share a tokenizer, or pass token_maps=[...] "
                                 "(one [V] LongTensor per member) to align them explicitly (linear rule only)")
            self.vocab_size = sizes[0]
        else:
            if len(token_maps) != len(self.members):
                raise ValueError(f"token_maps has {len(token_maps)} maps for {len(self.members)} members")
            if rule != "linear":
                raise ValueError("token_maps alignment needs rule='linear': under a log-linear rule a member that lacks "
                                 "a token gives it probability 0 and vetoes it")
            self.vocab_size = len(token_maps[0])
            for i, (tm, size) in enumerate(zip(token_maps, sizes)):
                if tm.ndim != 1 or len(tm) != self.vocab_size:
                    raise ValueError(f"token_maps[{i}] must be a 1-D map of length {self.vocab_size}, got {tuple(tm.shape)}")
                if tm.max() >= size or tm.min() < -1:
                    raise ValueError(f"token_maps[{i}] holds ids outside member {i}'s vocabulary [0, {size}) (or -1)")
            self.token_maps = [tm.long() for tm in token_maps]
        if not callable(weights) and weights is not None:
            w = torch.as_tensor(weights)
            if w.shape != (len(self.members),):
                raise ValueError(f"fixed weights must be [M] = [{len(self.members)}], got {tuple(w.shape)}")

    def _member_ids(self, i: int, ids: torch.Tensor) -> torch.Tensor:
        if self.token_maps is None:
            return ids
        mapped = self.token_maps[i].to(ids.device)[ids]
        if (mapped < 0).any():
            raise ValueError(f"member {i} has no token for shared id(s) {ids[mapped < 0].unique().tolist()}")
        return mapped

    def _member_logits(self, logits: list[torch.Tensor]) -> torch.Tensor:
        """Member next-token logits (each [B, V_m]) -> [M, B, V] over the shared vocabulary."""
        if self.token_maps is not None:
            logits = [align_to_vocab(l, tm.to(l.device)) for l, tm in zip(logits, self.token_maps)]
        return torch.stack(logits).float()

    def _weights_for(self, member_logits: torch.Tensor):
        """Fixed weights [M], or per-row weights [M, B] from a gate that reads the member log-probs."""
        if callable(self.weights):
            return self.weights(F.log_softmax(member_logits, -1))
        return self.weights

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 20,
                 do_sample: bool = False, temperature: float = 1.0, generator: torch.Generator | None = None,
                 eos_token_id: int | None = None, pad_token_id: int = 0, return_logprobs: bool = False):
        """Generate from left-padded prompts [B, T]; returns ids [B, T + new] (and per-step log-probs [B, new, V]).

        Rows that emitted ``eos_token_id`` are filled with ``pad_token_id``; generation stops when all
        rows are done. Sampling draws from ``generator`` for reproducibility.
        """
        from transformers import DynamicCache

        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
        if (attention_mask[:, -1] == 0).any():
            raise ValueError("prompts must be left-padded: the last column of attention_mask must be all ones")
        if do_sample and temperature <= 0:
            raise ValueError(f"sampling needs temperature > 0, got {temperature}")
        temp = temperature if do_sample else 0.0

        mask, positions = attention_mask.long(), position_ids_from_mask(attention_mask)
        caches = [DynamicCache(config=m.config) for m in self.members]
        step_ids, step_pos = input_ids, positions
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        out, steps_lp = [input_ids], []
        for _ in range(max_new_tokens):
            logits = [m(input_ids=self._member_ids(i, step_ids), attention_mask=mask, position_ids=step_pos,
                        past_key_values=cache, use_cache=True).logits[:, -1]            # [B, V_m]
                      for i, (m, cache) in enumerate(zip(self.members, caches))]
            member_logits = self._member_logits(logits)                                 # [M, B, V]
            token, combined = ensemble_next_token(member_logits, self._weights_for(member_logits),
                                                  self.rule, temp, generator)            # [B], [B, V]
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            out.append(token[:, None])
            steps_lp.append(combined)
            if eos_token_id is not None:
                done |= token == eos_token_id
                if done.all():
                    break
            # the next step feeds only the new token; earlier keys/values are in each member's cache
            step_ids, step_pos = token[:, None], step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        ids = torch.cat(out, dim=1)
        if return_logprobs:
            return ids, torch.stack(steps_lp, dim=1)
        return ids


# ------------------------------------------------------------------------------------------------
# 5. Getting members, and combining classifiers


def bootstrap_indices(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Bagging's resampler (Breiman 1996): k bootstrap samples of n indices drawn with replacement.

    Returns LongTensor [k, n], reproducible from ``seed``. Each resample holds about 1 - 1/e = 63.2%
    of the distinct examples, so members see different data and make different errors.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (dataset size) must be a positive int, got {n!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k (number of resamples) must be a positive int, got {k!r}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (k, n), generator=generator)


def bagging(fit_fn, X: torch.Tensor, y: torch.Tensor, k: int, seed: int = 0) -> list:
    """Train k members on bootstrap resamples: [fit_fn(X[idx], y[idx], member_seed) for idx in resamples]."""
    if len(X) != len(y):
        raise ValueError(f"X has {len(X)} rows but y has {len(y)}")
    idx = bootstrap_indices(len(X), k, seed).to(X.device)
    return [fit_fn(X[i], y[i], seed * 1000 + j) for j, i in enumerate(idx)]


def mc_dropout_logits(model: nn.Module, x: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Test-time (Monte Carlo) dropout: k stochastic forwards with dropout on -> [k, N, C].

    Each dropout mask is a different thinned network, an implicit ensemble (Srivastava et al. 2014;
    Gal & Ghahramani 2016 read it as approximate Bayesian inference). Only dropout layers are
    switched to train mode (batch-norm statistics stay frozen); the global RNG is left untouched.
    """
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    if not dropouts:
        raise ValueError(f"{type(model).__name__} has no dropout layer: MC dropout would return k identical members")
    was_training = [m.training for m in dropouts]
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for m in dropouts:
                m.train()
            return torch.stack([model(x) for _ in range(k)])
    finally:
        for m, flag in zip(dropouts, was_training):
            m.train(flag)


def snapshot_lr(step: int, steps_per_cycle: int, lr_max: float) -> float:
    """Snapshot ensembles' cyclic cosine schedule (Huang et al. 2017, "Train 1, get M for free").

        lr(t) = lr_max / 2 * (cos(pi * (t mod C) / C) + 1)

    The rate restarts high every C steps and anneals to ~0, where a snapshot is saved.
    """
    return lr_max / 2 * (math.cos(math.pi * (step % steps_per_cycle) / steps_per_cycle) + 1)


def train_snapshots(model: nn.Module, X: torch.Tensor, y: torch.Tensor, cycles: int = 4, steps_per_cycle: int = 100,
                    lr_max: float = 0.1, batch_size: int = 64, seed: int = 0) -> list[nn.Module]:
    """Train one model with the cyclic schedule and keep a copy at the end of each cycle (the members)."""
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr_max, momentum=0.9)
    snapshots = []
    model.train()
    for step in range(cycles * steps_per_cycle):
        for group in opt.param_groups:
            group["lr"] = snapshot_lr(step, steps_per_cycle, lr_max)
        idx = torch.randint(0, len(X), (batch_size,), generator=generator).to(X.device)
        loss = F.cross_entropy(model(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % steps_per_cycle == 0:
            snapshots.append(copy.deepcopy(model).eval())
    model.eval()
    return snapshots


def soft_vote(probs, weights=None) -> torch.Tensor:
    """Soft voting: the (weighted) mean of member class probabilities [M, N, C] -> [N, C].

    Same as scikit-learn's VotingClassifier(voting="soft"): np.average(probas, weights=w).
    """
    probs = _as_members(probs, "probs")
    w = torch.ones(probs.shape[0]) if weights is None else torch.as_tensor(weights)
    w = w.to(probs.dtype).to(probs.device)
    if w.shape != (probs.shape[0],) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be [M] = [{probs.shape[0]}] non-negative with a positive sum, got {w.tolist()}")
    return torch.einsum("m,mnc->nc", w / w.sum(), probs)


def hard_vote(preds: torch.Tensor, n_classes: int, weights=None) -> torch.Tensor:
    """Hard (majority) voting over member labels [M, N] -> [N]: argmax_c sum_m w_m [pred_m = c].

    Ties go to the smallest label, as in scikit-learn's VotingClassifier(voting="hard").
    """
    if preds.ndim != 2 or preds.is_floating_point():
        raise ValueError(f"preds must be integer labels [M, N], got {preds.dtype} {tuple(preds.shape)}")
    if preds.min() < 0 or preds.max() >= n_classes:
        raise ValueError(f"labels must lie in [0, {n_classes}), got range [{preds.min()}, {preds.max()}]")
    w = torch.ones(preds.shape[0], dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != (preds.shape[0],):
        raise ValueError(f"weights must be [M] = [{preds.shape[0]}], got shape {tuple(w.shape)}")
    votes = torch.zeros(preds.shape[1], n_classes, dtype=torch.float64, device=preds.device)
    votes.scatter_add_(1, preds.T, w.to(preds.device).expand(preds.shape[1], -1).contiguous())  # [N, C]
    return votes.argmax(-1)


def out_of_fold_predictions(fit_predict, X, y, folds) -> torch.Tensor:
    """Out-of-fold member outputs for stacking (Wolpert 1992): every row predicted by a model that never saw it.

    fit_predict(X_train, y_train, X_test) -> [n_test, C]; folds: iterable of (train_idx, test_idx)
    covering every row once. Returns [N, C].
    """
    out, covered = None, torch.zeros(len(y), dtype=torch.bool)
    for train_idx, test_idx in folds:
        train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
        pred = torch.as_tensor(fit_predict(X[train_idx], y[train_idx], X[test_idx]))
        if out is None:
            out = torch.zeros(len(y), pred.shape[1], dtype=pred.dtype)
        out[test_idx] = pred
        covered[test_idx] = True
    if out is None or not covered.all():
        raise ValueError(f"folds leave {int((~covered).sum())} rows without an out-of-fold prediction")
    return out


def stacking_features(probs) -> torch.Tensor:
    """Meta-features for stacking: member probabilities [M, N, C] side by side -> [N, M*C].

    With two classes the first column is dropped (it is 1 - the second), as scikit-learn's
    StackingClassifier does.
    """
    probs = _as_members(probs, "probs")
    if probs.shape[-1] == 2:
        probs = probs[..., 1:]
    return probs.movedim(0, 1).reshape(probs.shape[1], -1)


def fit_stacker(features: torch.Tensor, y: torch.Tensor, C: float = 1.0, max_iter: int = 500):
    """Meta-model for stacking: multinomial logistic regression on out-of-fold meta-features.

        minimise  C * sum_n CE(W f_n + b, y_n) + 1/2 ||W||^2     (the intercept is not penalised)

    the objective of scikit-learn's default LogisticRegression (the StackingClassifier default final
    estimator), solved with L-BFGS in float64. With two classes it fits the equivalent single logit.
    Returns predict_proba(features [N, F]) -> [N, C].
    """
    X = features.detach().double()
    classes = torch.unique(y)
    if not torch.equal(classes, torch.arange(len(classes), device=classes.device)):
        raise ValueError(f"y must hold labels 0..K-1, got {classes.tolist()}")
    K = len(classes)
    out_dim = 1 if K == 2 else K
    W = torch.zeros(X.shape[1], out_dim, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(out_dim, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=max_iter, tolerance_grad=1e-12, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def logits_of(Z):
        z = Z.double() @ W + b
        return torch.cat([torch.zeros_like(z), z], 1) if K == 2 else z

    def closure():
        opt.zero_grad()
        loss = C * F.cross_entropy(logits_of(X), y, reduction="sum") + 0.5 * (W ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda Z: F.softmax(logits_of(Z), dim=-1).detach()


# ------------------------------------------------------------------------------------------------
# 6. Speed: one batched forward for members of one architecture


def stack_members(models: list[nn.Module]):
    """Stack K same-architecture members' parameters: ({name: [K, ...]}, {name: [K, ...]}, skeleton).

    The skeleton is a parameter-less copy (on the meta device) that ``stacked_forward`` runs with
    each member's weights via torch.func.functional_call.
    """
    shapes = [[(n, p.shape) for n, p in m.named_parameters()] for m in models]
    if any(s != shapes[0] for s in shapes):
        raise ValueError("stack_members needs members of one architecture (same parameter names and shapes)")
    params, buffers = torch.func.stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")
    return params, buffers, skeleton


def stacked_forward(params: dict, buffers: dict, skeleton: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """All K members on one batch in a single vectorised call: vmap(functional_call) -> [K, N, ...].

    Instead of K small kernels per layer (a Python loop), each layer runs as one batched matmul
    over the stacked weights [K, out, in] (torch.func, after functorch's model-ensembling recipe).
    """
    def one(p, b, inp):
        return torch.func.functional_call(skeleton, (p, b), (inp,))

    return torch.vmap(one, in_dims=(0, 0, None), randomness="different")(params, buffers, x)


def loop_forward(models: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """The baseline: members one after the other in a Python loop -> [K, N, ...]."""
    return torch.stack([m(x) for m in models])


# ------------------------------------------------------------------------------------------------
# 7. Diagnostics


def error_correlation(preds: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between members' error indicators e_mn = [pred_mn != y_n]: [M, N] -> [M, M].

    Ensembling helps when errors are less correlated than correct answers; at correlation 1 the
    members fail together and the ensemble equals any of them. A member with no errors (or only
    errors) has an undefined correlation (NaN).
    """
    if preds.ndim != 2 or preds.shape[1] != y.shape[0]:
        raise ValueError(f"preds must be [M, N] with N = len(y) = {y.shape[0]}, got {tuple(preds.shape)}")
    errors = (preds != y).double()
    return torch.corrcoef(errors)


def pairwise_disagreement(preds: torch.Tensor) -> torch.Tensor:
    """Fraction of examples on which two members predict different labels: [M, N] -> [M, M]."""
    if preds.ndim != 2:
        raise ValueError(f"preds must be [M, N], got shape {tuple(preds.shape)}")
    return (preds[:, None, :] != preds[None, :, :]).double().mean(-1)


def ensemble_report(probs, y: torch.Tensor, weights=None) -> dict:
    """Accuracy of each member and of the soft-vote ensemble, its gain over the best member, and diversity.

    probs [M, N, C]. Gain = acc(ensemble) - max_m acc(m); diversity = mean off-diagonal disagreement
    and error correlation (NaN pairs skipped).
    """
    probs = _as_members(probs, "probs")
    preds = probs.argmax(-1)
    member_acc = (preds == y).double().mean(-1)
    ens_acc = (soft_vote(probs, weights).argmax(-1) == y).double().mean().item()
    off = ~torch.eye(len(probs), dtype=torch.bool)
    corr = error_correlation(preds, y)[off]
    return {"member_acc": member_acc.tolist(), "best_member_acc": member_acc.max().item(),
            "ensemble_acc": ens_acc, "gain": ens_acc - member_acc.max().item(),
            "disagreement": pairwise_disagreement(preds)[off].mean().item() if len(probs) > 1 else 0.0,
            "error_corr": corr[~corr.isnan()].mean().item() if len(probs) > 1 else 1.0}


def member_contribution(target_lp: torch.Tensor, weights) -> torch.Tensor:
    """Each member's share of the ensemble's probability on the correct outputs (mean EM responsibility).

        c_m = (1/N) sum_n w_mn P_m(y_n|x_n) / sum_k w_kn P_k(y_n|x_n)

    target_lp [M, N]; weights [M] or per-example [M, N] (e.g. a gate's output). Sums to 1 over members.
    Unlike the raw weight, it credits a member only where it actually put probability on the answer.
    """
    weights = torch.as_tensor(weights, dtype=target_lp.dtype, device=target_lp.device)
    if weights.ndim == 1:
        weights = weights[:, None]
    joint = torch.log(weights) + target_lp
    return (joint - torch.logsumexp(joint, 0)).exp().mean(-1)
