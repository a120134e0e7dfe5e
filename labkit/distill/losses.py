"""Distillation losses on logits: how far a student's next-token (or class) distribution is from a teacher's.

Every loss takes ``student_logits`` and ``teacher_logits`` of one shape ``[..., V]`` (V classes or
vocabulary entries; ``[N, V]`` for classifiers, ``[B, L, V]`` for language models) and optional
``labels`` ``[...]`` whose entries equal to -100 are masked out (prompt and padding tokens).

Conventions (libraries differ here, and several shipped bugs came from these):
  * p_T = softmax(teacher / T), p_S = softmax(student / T); T is the distillation temperature.
  * forward KL = KL(p_T || p_S) = sum_v p_T (log p_T - log p_S)   (Hinton et al. 2015; "mode covering")
    reverse KL = KL(p_S || p_T)                                    (MiniLLM, Gu et al. 2024; "mode seeking")
    ``F.kl_div(input, target)`` computes KL(target || input): input is the *student's* log-probs for
    forward KL. The tests pin this.
  * ``scale_t2=True`` multiplies by T^2 (Hinton; DistillKit). TRL and Liger do not; pass False to match.
  * Reductions sum over the vocabulary first, then over unmasked positions:
      'token_mean' : / number of unmasked tokens (GKD / TRL; the default). Under gradient
                     accumulation pass ``num_items_in_batch`` = unmasked tokens in the *global* batch,
                     so every token weighs the same whatever micro-batch it falls in.
      'batchmean'  : / size of the first axis (F.kl_div's definition; per example for [N, V],
                     per sequence -- a sequence-level sum -- for [B, L, V]).
      'sum'        : the plain sum.
      'mean'       : / (unmasked tokens x V), the element-wise mean of F.kl_div / TRL's 'mean'; rarely
                     what you want (it shrinks the loss by V).
      'none'       : per-position values [...] with masked positions set to 0.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
REDUCTIONS = ("token_mean", "batchmean", "sum", "mean", "none")


# ------------------------------------------------------------------------------------------------
# checks and the shared reduce step


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor [..., V], got "
                             f"{getattr(t, 'dtype', type(t).__name__)}")
        if t.ndim < 1 or t.shape[-1] < 2:
            raise ValueError(f"{name} must have a vocabulary axis of size >= 2, got shape {tuple(t.shape)}")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"teacher_logits has vocabulary size {teacher_logits.shape[-1]} but student_logits has "
                         f"{student_logits.shape[-1]}: teacher and student must share one vocabulary")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"teacher_logits has shape {tuple(teacher_logits.shape)} but student_logits has "
                         f"{tuple(student_logits.shape)}: they must score the same positions")


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def token_mask(labels: torch.Tensor | None, positions_shape: torch.Size, device) -> torch.Tensor:
    """Boolean mask [...] of the positions that count: ``labels != -100`` (all True without labels)."""
    if labels is None:
        return torch.ones(positions_shape, dtype=torch.bool, device=device)
    if tuple(labels.shape) != tuple(positions_shape):
        raise ValueError(f"labels has shape {tuple(labels.shape)} but the logits score positions "
                         f"{tuple(positions_shape)}: labels must be aligned with the logits (shift them first)")
    return (labels != IGNORE_INDEX).to(device)


def reduce_per_token(per_token: torch.Tensor, mask: torch.Tensor, reduction: str = "token_mean",
                     vocab_size: int | None = None, num_items_in_batch: int | torch.Tensor | None = None):
    """Reduce per-position losses [...] (already summed over V) by ``reduction``; see the module docstring."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))  # a 0 * inf = NaN never leaks
    if reduction == "none":
        return per_token
    count = mask.sum()
    if num_items_in_batch is None and int(count) == 0:
        raise ValueError("labels: every position is masked (-100), so there is nothing to distil; "
                         "check the label shift, or pass num_items_in_batch under gradient accumulation")
    total = per_token.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / max(per_token.shape[0], 1) if per_token.ndim else total
    denom = count if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=total.device)
    denom = denom.to(total.dtype).clamp_min(1)
    if reduction == "mean":
        return total / (denom * vocab_size)
    return total / denom


def _prepare(student_logits, teacher_logits, labels, temperature):
    _check_logits(student_logits, teacher_logits)
    _check_temperature(temperature)
    mask = token_mask(labels, student_logits.shape[:-1], student_logits.device)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # bf16 log-softmax loses the tails
    student_logp = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    return student_logp, teacher_logp, mask


def _finish(per_token, mask, reduction, vocab_size, num_items_in_batch, temperature, scale_t2):
    loss = reduce_per_token(per_token, mask, reduction, vocab_size, num_items_in_batch)
    return loss * temperature ** 2 if scale_t2 else loss


def _kl_from_logprobs(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position from log-probs [..., V]; terms with p = 0 count 0 (0 log 0 = 0)."""
    p = p_logp.exp()
    return torch.where(p > 0, p * (p_logp - q_logp), torch.zeros_like(p)).sum(-1)


# ------------------------------------------------------------------------------------------------
# the divergences


def forward_kl(student_logits, teacher_logits, labels=None, temperature: float = 1.0, scale_t2: bool = True,
               reduction: str = "token_mean", num_items_in_batch=None) -> torch.Tensor:
    """Forward KL, the soft-target loss of knowledge distillation (Hinton, Vinyals & Dean 2015):

        L = T^2 * KL(p_T || p_S) = T^2 * sum_v p_T(v) (log p_T(v) - log p_S(v)),   p = softmax(logits / T)

    Mode covering: the student is punished wherever the teacher has mass the student lacks. The T^2
    keeps the gradient's size independent of T (it scales as 1/T^2 for large T), so soft and hard
    losses can be mixed with one alpha whatever the temperature. Equals
    ``F.kl_div(log p_S, log p_T, log_target=True)`` summed over V.

    student_logits, teacher_logits: [..., V]; labels: [...] (-100 = masked). Returns a scalar
    (or [...] with reduction='none').
    """
    s_logp, t_logp, mask = _prepare(student_logits, teacher_logits, labels, temperature)
    return _finish(_kl_from_logprobs(t_logp, s_logp), mask, reduction, s_logp.shape[-1], num_items_in_batch,
                   temperature, scale_t2)


def reverse_kl(student_logits, teacher_logits, labels=None, temperature: float = 1.0, scale_t2: bool = True,
               reduction: str = "token_mean", num_items_in_batch=None) -> torch.Tensor:
    """Reverse KL (MiniLLM, Gu et al. 2024; the GKD endpoint beta = 1):

        L = T^2 * KL(p_S || p_T) = T^2 * sum_v p_S(v) (log p_S(v) - log p_T(v))

    Mode seeking: the student is punished for mass where the teacher has little, not for missing some
    of the teacher's modes, so a small student settles on one mode instead of smearing over all.
    Shapes as ``forward_kl``.
    """
    s_logp, t_logp, mask = _prepare(student_logits, teacher_logits, labels, temperature)
    return _finish(_kl_from_logprobs(s_logp, t_logp), mask, reduction, s_logp.shape[-1], num_items_in_batch,
                   temperature, scale_t2)


def _log_mixture_ratios(s_logp: torch.Tensor, t_logp: torch.Tensor, beta: float):
    """(log m - log p_S, log m - log p_T) for m = (1 - beta) p_S + beta p_T, without forming log m.

    With d = log p_T - log p_S:  log m - log p_S = logaddexp(log(1 - beta), log beta + d), and
    log m - log p_T likewise. Each is computed directly: near the ends one of them is tiny, and
    subtracting two large log-probs would drown it in rounding; and where one distribution is 0
    (d = +-inf) the other ratio stays finite.
    """
    d = t_logp - s_logp
    log_b, log_1mb = d.new_tensor(math.log(beta)), d.new_tensor(math.log1p(-beta))
    return torch.logaddexp(log_1mb, log_b + d), torch.logaddexp(log_b, log_1mb - d)


def generalized_jsd(student_logits, teacher_logits, labels=None, beta: float = 0.5, temperature: float = 1.0,
                    scale_t2: bool = True, normalize: bool = True, reduction: str = "token_mean",
                    num_items_in_batch=None) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1), in TRL's convention:

        m = (1 - beta) p_S + beta p_T                     (a mixture of probabilities, not of logits)
        JSD_beta = beta KL(p_T || m) + (1 - beta) KL(p_S || m)
        L = T^2 * JSD_beta / (beta (1 - beta))             (normalize=True, the default)
        beta = 0: L = T^2 KL(p_T || p_S) (forward KL);    beta = 1: L = T^2 KL(p_S || p_T) (reverse KL)

    TRL's ``generalized_jsd_loss`` special-cases beta = 0 and beta = 1 as the two KLs but its interior
    formula tends to 0 at both ends (JSD_beta = beta KL(p_T || p_S) + O(beta^2)), a jump. Dividing by
    beta (1 - beta) removes it: L is continuous on [0, 1] and equals the two KLs at the ends. With
    ``normalize=False`` the interior is TRL's plain JSD_beta (at beta = 0.5 the symmetric JSD, at most
    log 2), endpoints still the KLs, as TRL does. Shapes as ``forward_kl``.
    """
    if not isinstance(beta, (int, float)) or not (0.0 <= beta <= 1.0):
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, labels, temperature, scale_t2, reduction,
                          num_items_in_batch)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, labels, temperature, scale_t2, reduction,
                          num_items_in_batch)
    s_logp, t_logp, mask = _prepare(student_logits, teacher_logits, labels, temperature)
    r_s, r_t = _log_mixture_ratios(s_logp, t_logp, beta)
    # KL(p || m) = -sum_v p (log m - log p); where p = 0 the term is 0 (r may be inf there)
    kl_teacher = -torch.where(t_logp > -math.inf, t_logp.exp() * r_t, 0.0).sum(-1)
    kl_student = -torch.where(s_logp > -math.inf, s_logp.exp() * r_s, 0.0).sum(-1)
    jsd = beta * kl_teacher + (1.0 - beta) * kl_student
    if normalize:
        jsd = jsd / (beta * (1.0 - beta))
    return _finish(jsd, mask, reduction, s_logp.shape[-1], num_items_in_batch, temperature, scale_t2)


def total_variation(student_logits, teacher_logits, labels=None, temperature: float = 1.0, scale_t2: bool = False,
                    reduction: str = "token_mean", num_items_in_batch=None) -> torch.Tensor:
    """Total variation distance (Wen et al. 2023, "f-Divergence Minimization for Sequence-Level KD"):

        L = 1/2 sum_v |p_T(v) - p_S(v)|     in [0, 1]

    Symmetric and bounded, so one bad token cannot dominate the batch. Not a KL, so no T^2 by default.
    Shapes as ``forward_kl``.
    """
    s_logp, t_logp, mask = _prepare(student_logits, teacher_logits, labels, temperature)
    tv = 0.5 * (t_logp.exp() - s_logp.exp()).abs().sum(-1)
    return _finish(tv, mask, reduction, s_logp.shape[-1], num_items_in_batch, temperature, scale_t2)


DIVERGENCES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": generalized_jsd,
               "tv": total_variation}


def cross_entropy(student_logits, labels, reduction: str = "token_mean", num_items_in_batch=None) -> torch.Tensor:
    """Cross-entropy with the hard labels at T = 1, reduced like the divergences (labels -100 masked)."""
    if labels is None:
        raise ValueError("labels are needed for the cross-entropy term (alpha < 1)")
    mask = token_mask(labels, student_logits.shape[:-1], student_logits.device)
    safe = torch.where(mask, labels, torch.zeros_like(labels)).long()
    nll = -F.log_softmax(student_logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return reduce_per_token(nll, mask, reduction, student_logits.shape[-1], num_items_in_batch)


def distillation_loss(student_logits, teacher_logits, labels=None, alpha: float = 1.0,
                      divergence: str = "forward_kl", temperature: float = 1.0, reduction: str = "token_mean",
                      num_items_in_batch=None, **divergence_kwargs) -> torch.Tensor:
    """Soft targets mixed with hard labels (Hinton et al. 2015, section 2):

        L = alpha * D_T(teacher, student) + (1 - alpha) * CE(student at T = 1, labels)

    D_T is one of ``DIVERGENCES`` ('forward_kl' with its T^2 by default, 'reverse_kl', 'jsd' (pass
    beta=...), 'tv'). alpha = 1 is pure distillation (no labels needed), alpha = 0 plain training.
    Both terms use the same mask and reduction.
    """
    if not isinstance(alpha, (int, float)) or not (0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {sorted(DIVERGENCES)}, got {divergence!r}")
    loss = 0.0
    if alpha > 0:
        loss = alpha * DIVERGENCES[divergence](student_logits, teacher_logits, labels, temperature=temperature,
                                               reduction=reduction, num_items_in_batch=num_items_in_batch,
                                               **divergence_kwargs)
    if alpha < 1:
        _check_logits(student_logits, teacher_logits)
        loss = loss + (1 - alpha) * cross_entropy(student_logits, labels, reduction, num_items_in_batch)
    return loss


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Causal-LM labels [B, L] -> labels aligned with the logits [B, L]: position t predicts token t+1.

    Hugging Face models shift inside ``forward`` when given ``labels``; the distillation losses do not,
    so pass ``shift_labels(batch["labels"])`` beside ``model(...).logits``.
    """
    out = torch.full_like(labels, IGNORE_INDEX)
    out[..., :-1] = labels[..., 1:]
    return out
