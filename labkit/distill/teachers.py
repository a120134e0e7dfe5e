"""Teachers: one model, an ensemble, or a cache of what a teacher said, stored beside the dataset.

  * ``teacher_logits``: one model's logits on a batch (a classifier's ``x`` or an LM's token batch).
  * ``ensemble_teacher_logprobs``: the ensemble's combined log-probs through ``labkit.ensemble``'s
    rules (linear = mixture of the members' probabilities, log_linear = product of experts), so the
    student copies the *ensemble* -- what Hinton et al. (2015) first proposed distillation for.
  * ``topk_cache`` / ``cached_forward_kl``: keep only the teacher's k most likely tokens per position
    (DistillKit's offline logits). The mass outside the top k is either renormalised away or kept as one
    "other" bucket. The student's log-probs always use the full vocabulary's logsumexp: only the teacher
    is sparse. Top-k targets are biased (the tail is cut).
  * ``sampled_cache``: K tokens sampled from the teacher per position instead (Anshumann et al., ACL
    2025, "Sparse Logit Sampling"); the empirical distribution is an unbiased estimate of p_T, so the
    cross-entropy gradient is unbiased, at a storage of K indices per token.
  * ``cache_storage``: bytes of a cache against the full logits it replaces.

Shapes: logits [..., V]; a cache holds ``indices`` [..., k] and (top-k) ``logprobs`` [..., k].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ensemble import combine
from .losses import _check_temperature, reduce_per_token, token_mask

# ------------------------------------------------------------------------------------------------
# live teachers


@torch.no_grad()
def teacher_logits(model, inputs) -> torch.Tensor:
    """Logits of one frozen teacher: a classifier on ``x`` [N, ...] -> [N, C], or a causal LM on a
    token batch ``{"input_ids", "attention_mask"}`` -> [B, L, V]. The model is put in eval mode."""
    was_training = model.training
    model.eval()
    try:
        if isinstance(inputs, dict):
            kwargs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
            return model(**kwargs).logits
        return model(inputs)
    finally:
        model.train(was_training)


@torch.no_grad()
def ensemble_teacher_logprobs(models, inputs, weights=None, rule: str = "linear") -> torch.Tensor:
    """Log-probs [..., V] of an ensemble teacher: ``labkit.ensemble.combine`` over each member's logits.

        linear:     p(y) = sum_m w_m p_m(y)                 (Hinton et al. 2015 distil the average)
        log_linear: p(y) ∝ prod_m p_m(y)^{w_m}

    The result is a valid "logits" tensor for every loss (softmax(log p / T) is the tempered ensemble).
    """
    models = list(models)
    if not models:
        raise ValueError("models is empty: an ensemble teacher needs at least one member")
    return combine([teacher_logits(m, inputs) for m in models], weights, rule)


# ------------------------------------------------------------------------------------------------
# sparse caches


def _index_dtype(vocab_size: int) -> torch.dtype:
    return torch.int16 if vocab_size <= 2 ** 15 else torch.int32


@dataclass
class TopKCache:
    """The teacher's k largest log-probs per position: ``logprobs`` [..., k] (log p_T at ``temperature``,
    unnormalised over the k) and ``indices`` [..., k]; ``missing`` says how the rest is treated."""
    indices: torch.Tensor
    logprobs: torch.Tensor
    vocab_size: int
    missing: str = "renormalize"
    temperature: float = 1.0


@dataclass
class SampledCache:
    """``indices`` [..., K]: K tokens drawn from p_T (at ``temperature``) per position, with repeats."""
    indices: torch.Tensor
    vocab_size: int
    temperature: float = 1.0


MISSING = ("renormalize", "other")


@torch.no_grad()
def topk_cache(teacher_logits: torch.Tensor, k: int, missing: str = "renormalize", temperature: float = 1.0,
               value_dtype: torch.dtype = torch.float16) -> TopKCache:
    """Keep the top-k teacher log-probs per position (DistillKit-style offline distillation).

        log p_T = log_softmax(teacher_logits / T);  keep (i_1..i_k, log p_T(i_1..i_k))

    missing='renormalize': target p_T(i_j) / sum_j p_T(i_j) over the k tokens (the tail is dropped);
    missing='other': the k tokens plus one bucket with mass 1 - sum_j p_T(i_j) (the tail's total is kept).
    The missing mass is recomputed from the stored values, so both cost k values + k indices per token.
    """
    vocab = teacher_logits.shape[-1]
    if not isinstance(k, int) or not (1 <= k <= vocab):
        raise ValueError(f"k must be an integer in [1, vocabulary size {vocab}], got {k!r}")
    if missing not in MISSING:
        raise ValueError(f"missing must be one of {MISSING}, got {missing!r}")
    _check_temperature(temperature)
    dtype = torch.promote_types(teacher_logits.dtype, torch.float32)
    logp = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    values, indices = logp.topk(k, dim=-1)
    return TopKCache(indices.to(_index_dtype(vocab)), values.to(value_dtype), vocab, missing, temperature)


@torch.no_grad()
def sampled_cache(teacher_logits: torch.Tensor, num_samples: int, temperature: float = 1.0,
                  generator: torch.Generator | None = None) -> SampledCache:
    """Sample ``num_samples`` tokens per position from p_T = softmax(teacher_logits / T).

    The empirical distribution p_hat(v) = count(v) / K satisfies E[p_hat] = p_T, so
    -sum_v p_hat(v) log p_S(v) is an unbiased estimate of the cross-entropy H(p_T, p_S), whose
    gradient is forward KL's (Anshumann et al., ACL 2025). Storage: K indices per token, no values.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    _check_temperature(temperature)
    vocab = teacher_logits.shape[-1]
    probs = F.softmax(teacher_logits.float() / temperature, dim=-1).reshape(-1, vocab)
    if generator is not None and generator.device != probs.device:
        probs_for_sampling = probs.to(generator.device)
    else:
        probs_for_sampling = probs
    draws = torch.multinomial(probs_for_sampling, num_samples, replacement=True, generator=generator)
    draws = draws.to(teacher_logits.device).reshape(*teacher_logits.shape[:-1], num_samples)
    return SampledCache(draws.to(_index_dtype(vocab)), vocab, temperature)


def _sparse_target(cache, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(indices [..., k] long, target log-probs [..., k], log of the 'other' mass [...] or None)."""
    idx = cache.indices.long()
    if isinstance(cache, SampledCache):
        k = idx.shape[-1]
        counts = (idx.unsqueeze(-1) == idx.unsqueeze(-2)).sum(-1)  # repeats of each draw: [..., K]
        # each draw carries weight 1/K and target prob count/K: sum_j (1/K) f(p_hat(i_j)) = sum_v p_hat(v) f(v)
        return idx, (counts.to(dtype) / k).log(), None
    values = cache.logprobs.to(dtype)
    if cache.missing == "renormalize":
        return idx, values - torch.logsumexp(values, dim=-1, keepdim=True), None
    kept = torch.logsumexp(values, dim=-1).clamp_max(0.0)
    return idx, values, torch.log(-torch.expm1(kept))  # log(1 - kept mass); -inf when nothing is missing


def cached_forward_kl(student_logits: torch.Tensor, cache, labels=None, scale_t2: bool = True,
                      reduction: str = "token_mean", num_items_in_batch=None) -> torch.Tensor:
    """Forward KL from a sparse teacher cache (top-k or sampled) to the student:

        top-k, renormalize:  sum_j q_j (log q_j - log p_S(i_j)),   q_j = p_T(i_j) / sum_l p_T(i_l)
        top-k, other:        sum_j p_T(i_j) (log p_T(i_j) - log p_S(i_j)) + r_T (log r_T - log r_S),
                             r = 1 - sum_j p(i_j), the mass outside the k tokens
        sampled:             (1/K) sum_j (log p_hat(i_j) - log p_S(i_j))

    log p_S = log_softmax(student_logits / T) over the *full* vocabulary (T = the cache's temperature).
    With k = V both top-k forms equal ``forward_kl`` on the full logits. Shapes: student_logits [..., V],
    cache indices [..., k], labels [...]. Reductions as in ``losses``.
    """
    if student_logits.shape[-1] != cache.vocab_size:
        raise ValueError(f"student_logits has vocabulary size {student_logits.shape[-1]} but the cache was built "
                         f"over {cache.vocab_size} tokens")
    if tuple(student_logits.shape[:-1]) != tuple(cache.indices.shape[:-1]):
        raise ValueError(f"cache covers positions {tuple(cache.indices.shape[:-1])} but student_logits scores "
                         f"{tuple(student_logits.shape[:-1])}")
    temperature = cache.temperature
    mask = token_mask(labels, student_logits.shape[:-1], student_logits.device)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s_logp = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    idx, t_logq, t_log_other = _sparse_target(cache, dtype)
    idx, t_logq = idx.to(s_logp.device), t_logq.to(s_logp.device)
    s_at = s_logp.gather(-1, idx)
    if isinstance(cache, SampledCache):
        per_token = (t_logq - s_at).mean(-1)
    else:
        q = t_logq.exp()
        per_token = (q * (t_logq - s_at)).sum(-1)
    if t_log_other is not None:
        t_log_other = t_log_other.to(s_logp.device)
        s_kept = torch.logsumexp(s_at, dim=-1).clamp_max(0.0)
        s_log_other = torch.log(-torch.expm1(s_kept))
        r = t_log_other.exp()
        per_token = per_token + torch.where(r > 0, r * (t_log_other - s_log_other), torch.zeros_like(r))
    loss = reduce_per_token(per_token, mask, reduction, cache.vocab_size, num_items_in_batch)
    return loss * temperature ** 2 if scale_t2 else loss


def cache_storage(cache, mask: torch.Tensor | None = None, full_dtype: torch.dtype = torch.float16) -> dict:
    """Bytes of a cache against storing the full teacher logits (in ``full_dtype``) for the same tokens.

    Counts the unmasked positions only when ``mask`` [...] is given (prompt tokens need no teacher).
    Returns tokens, bytes_per_token, full_bytes_per_token, cache_bytes, full_bytes and saving (x).
    """
    positions = cache.indices.shape[:-1]
    tokens = int(mask.sum()) if mask is not None else int(torch.tensor(positions).prod()) if len(positions) else 1
    per_token = cache.indices.shape[-1] * cache.indices.element_size()
    if isinstance(cache, TopKCache):
        per_token += cache.logprobs.shape[-1] * cache.logprobs.element_size()
    full_per_token = cache.vocab_size * torch.empty((), dtype=full_dtype).element_size()
    return {"tokens": tokens, "bytes_per_token": per_token, "full_bytes_per_token": full_per_token,
            "cache_bytes": per_token * tokens, "full_bytes": full_per_token * tokens,
            "saving": full_per_token / per_token}


# ------------------------------------------------------------------------------------------------
# diagnostics


def mistake_agreement(student_pred: torch.Tensor, teacher_pred: torch.Tensor, y: torch.Tensor) -> dict:
    """How much a student copies its teacher's mistakes (syllabus claim 14).

    On the examples the teacher gets wrong: ``same_mistake`` = fraction where the student predicts the
    teacher's very (wrong) label; ``student_also_wrong`` = fraction where the student is wrong at all.
    ``agreement`` = overall fraction of equal predictions. Inputs: predicted labels [N] and targets [N].
    """
    student_pred, teacher_pred, y = (torch.as_tensor(t).cpu() for t in (student_pred, teacher_pred, y))
    if not (student_pred.shape == teacher_pred.shape == y.shape) or student_pred.ndim != 1:
        raise ValueError(f"student_pred {tuple(student_pred.shape)}, teacher_pred {tuple(teacher_pred.shape)} "
                         f"and y {tuple(y.shape)} must be label vectors [N] of one length")
    wrong = teacher_pred != y
    n_wrong = int(wrong.sum())
    return {"agreement": (student_pred == teacher_pred).float().mean().item(), "teacher_errors": n_wrong,
            "same_mistake": (student_pred[wrong] == teacher_pred[wrong]).float().mean().item() if n_wrong else None,
            "student_also_wrong": (student_pred[wrong] != y[wrong]).float().mean().item() if n_wrong else None}
