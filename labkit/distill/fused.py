"""A distillation loss that never holds the [tokens x vocab] logits of the whole batch.

An LM's last step is logits = h W^T (+ b): hidden states h [N, H] times the head W [V, H]. For
N = 8192 tokens and V = 128k the float32 logits of one model take 4 GiB, and a naive KD loss holds
several such tensors (student and teacher logits, their softmaxes, the gradient), forward and
backward. Liger Kernel's fused linear JSD (Hsu et al. 2024) avoids this by going chunk by chunk:

    for each chunk c of C tokens:
        z_S = h_c W_S^T,  z_T = h^T_c W_T^T                 [C, V], freed after the chunk
        loss += sum_tokens D(z_T, z_S)                      any divergence of ``losses``
        g = dD/dz_S                                         [C, V]
        grad h_c = g W_S        grad W_S += g^T h_c         the gradients, computed *in the forward*
    loss /= N_unmasked;  backward only scales the stored grad h, grad W by dL/dloss.

Peak memory is O(C V + N H + V H) instead of O(N V); the matmuls are the same three as autograd's
(z = h W^T, g W, g^T h), so the time is about the naive one. Gradients are computed only when grad is
enabled and some input requires it. The teacher may be given as hidden states + head (fully fused)
or as precomputed ``teacher_logits`` [N, V] (then only the student side is chunked).
"""
from __future__ import annotations

import torch

from .losses import DIVERGENCES, IGNORE_INDEX

FUSED_REDUCTIONS = ("token_mean", "sum", "batchmean")


def default_chunk_size(num_tokens: int, hidden: int, vocab: int) -> int:
    """Liger's rule: C = next power of two of ceil(N / ceil(V / H)), so a chunk of logits [C, V] is
    about as large as all the hidden states [N, H]; at least 64 tokens (tiny chunks waste Python time)."""
    per_chunk = -(-num_tokens // -(-vocab // hidden))
    return max(64, 1 << (per_chunk - 1).bit_length())


def _check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits, labels,
                  divergence, chunk_size, reduction):
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {sorted(DIVERGENCES)}, got {divergence!r}")
    if reduction not in FUSED_REDUCTIONS:
        raise ValueError(f"reduction must be one of {FUSED_REDUCTIONS} for the fused loss, got {reduction!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if student_weight.ndim != 2 or student_hidden.shape[-1] != student_weight.shape[1]:
        raise ValueError(f"student_weight must be [V, H] with H = student_hidden's width "
                         f"{student_hidden.shape[-1]}, got {tuple(student_weight.shape)}")
    n = student_hidden.shape[:-1].numel()
    if teacher_logits is not None:
        if teacher_hidden is not None or teacher_weight is not None:
            raise ValueError("give the teacher either as teacher_logits or as teacher_hidden + teacher_weight")
        if teacher_logits.shape[-1] != student_weight.shape[0]:
            raise ValueError(f"teacher_logits has vocabulary size {teacher_logits.shape[-1]} but student_weight "
                             f"has {student_weight.shape[0]}")
        if teacher_logits.shape[:-1].numel() != n:
            raise ValueError(f"teacher_logits scores {teacher_logits.shape[:-1].numel()} positions, "
                             f"student_hidden {n}")
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("the teacher is missing: give teacher_hidden and teacher_weight, or teacher_logits")
        if teacher_weight.ndim != 2 or teacher_hidden.shape[-1] != teacher_weight.shape[1]:
            raise ValueError(f"teacher_weight must be [V, H_t] with H_t = teacher_hidden's width "
                             f"{teacher_hidden.shape[-1]}, got {tuple(teacher_weight.shape)}")
        if teacher_weight.shape[0] != student_weight.shape[0]:
            raise ValueError(f"teacher_weight has vocabulary size {teacher_weight.shape[0]} but student_weight "
                             f"has {student_weight.shape[0]}: teacher and student must share one vocabulary")
        if teacher_hidden.shape[:-1].numel() != n:
            raise ValueError(f"teacher_hidden holds {teacher_hidden.shape[:-1].numel()} positions, "
                             f"student_hidden {n}")
    if labels is not None and labels.numel() != n:
        raise ValueError(f"labels has {labels.numel()} positions but student_hidden has {n}")


class _FusedLinearDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, teacher_chunk, mask, loss_fn, chunk_size, scale, need_grad):
        n = h.shape[0]
        acc = torch.promote_types(w.dtype, torch.float32)  # accumulate bf16 chunks in float32
        total = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.zeros_like(h) if need_grad[0] else None
        grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if need_grad[1] else None
        grad_b = torch.zeros(b.shape, dtype=acc, device=b.device) if (b is not None and need_grad[2]) else None
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            chunk_mask = mask[start:stop]
            if not bool(chunk_mask.any()):
                continue  # a fully masked chunk adds nothing to the loss or the gradients
            z_teacher = teacher_chunk(start, stop)
            with torch.enable_grad():
                h_c = h[start:stop].detach().requires_grad_(need_grad[0])
                w_c = w.detach().requires_grad_(need_grad[1])
                b_c = b.detach().requires_grad_(need_grad[2]) if b is not None else None
                z_student = h_c @ w_c.T
                if b_c is not None:
                    z_student = z_student + b_c
                labels_c = torch.where(chunk_mask, 0, IGNORE_INDEX)
                loss_c = loss_fn(z_student, z_teacher, labels_c).sum() * scale
                wrt = [t for t in (h_c, w_c, b_c) if t is not None and t.requires_grad]
                grads = list(torch.autograd.grad(loss_c, wrt)) if wrt else []
            total += loss_c.detach().to(acc)
            if need_grad[0]:
                grad_h[start:stop] = grads.pop(0)
            if need_grad[1]:
                grad_w += grads.pop(0)
            if grad_b is not None:
                grad_b += grads.pop(0)
        ctx.save_for_backward(grad_h, grad_w.to(w.dtype) if grad_w is not None else None,
                              grad_b.to(b.dtype) if grad_b is not None else None)
        return total.to(h.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_output.to(g.dtype)  # noqa: E731
        return scale(grad_h), scale(grad_w), scale(grad_b), None, None, None, None, None, None


def fused_linear_distill_loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, *,
                              teacher_logits=None, student_bias=None, teacher_bias=None, labels=None,
                              divergence: str = "forward_kl", chunk_size: int | None = None,
                              reduction: str = "token_mean", num_items_in_batch=None,
                              **divergence_kwargs) -> torch.Tensor:
    """Distillation loss D(softmax(h_T W_T^T / T) || softmax(h_S W_S^T / T)) over chunks of tokens.

    student_hidden [..., H] and student_weight [V, H] (the LM head; ``student_bias`` [V] optional);
    the teacher as teacher_hidden [..., H_t] + teacher_weight [V, H_t] (+ teacher_bias), or as
    teacher_logits [..., V]. labels [...] with -100 masked (aligned with the hidden states).
    divergence: a name in ``losses.DIVERGENCES``, with its kwargs (temperature, beta, scale_t2...).
    reduction: 'token_mean' (/ unmasked tokens or ``num_items_in_batch``), 'sum', or 'batchmean'
    (/ size of the first axis). chunk_size: tokens per chunk (default ``default_chunk_size``).
    Equal to ``naive_linear_distill_loss`` within float rounding, values and gradients, with at most
    ``chunk_size`` x V logits alive at a time.
    """
    if chunk_size is None:
        chunk_size = default_chunk_size(student_hidden.shape[:-1].numel(), student_hidden.shape[-1],
                                        student_weight.shape[0])
    _check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits, labels,
                  divergence, chunk_size, reduction)
    h = student_hidden.reshape(-1, student_hidden.shape[-1])
    mask = (labels.reshape(-1) != IGNORE_INDEX).to(h.device) if labels is not None else \
        torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
    count = int(mask.sum())
    if count == 0 and num_items_in_batch is None:
        raise ValueError("labels: every position is masked (-100), so there is nothing to distil")
    if reduction == "sum":
        scale = 1.0
    elif reduction == "batchmean":
        scale = 1.0 / max(student_hidden.shape[0], 1)
    else:
        scale = 1.0 / max(int(num_items_in_batch) if num_items_in_batch is not None else count, 1)

    if teacher_logits is not None:
        flat_teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1]).detach()
        teacher_chunk = lambda a, z: flat_teacher[a:z]  # noqa: E731
    else:
        h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
        w_t = teacher_weight.detach()
        b_t = teacher_bias.detach() if teacher_bias is not None else None

        def teacher_chunk(a, z):
            z_t = h_t[a:z] @ w_t.T
            return z_t + b_t if b_t is not None else z_t

    fn = DIVERGENCES[divergence]

    def loss_fn(z_student, z_teacher, labels_c):
        return fn(z_student, z_teacher, labels_c, reduction="none", **divergence_kwargs)

    grad_on = torch.is_grad_enabled()
    need_grad = (grad_on and student_hidden.requires_grad, grad_on and student_weight.requires_grad,
                 grad_on and student_bias is not None and student_bias.requires_grad)
    return _FusedLinearDivergence.apply(h, student_weight, student_bias, teacher_chunk, mask, loss_fn,
                                        chunk_size, scale, need_grad)


def naive_linear_distill_loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, *,
                              teacher_logits=None, student_bias=None, teacher_bias=None, labels=None,
                              divergence: str = "forward_kl", reduction: str = "token_mean",
                              num_items_in_batch=None, **divergence_kwargs) -> torch.Tensor:
    """The same loss with the full logits materialised and plain autograd: the reference and baseline."""
    _check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits, labels,
                  divergence, 1, reduction)
    z_student = student_hidden @ student_weight.T
    if student_bias is not None:
        z_student = z_student + student_bias
    if teacher_logits is None:
        with torch.no_grad():
            teacher_logits = teacher_hidden @ teacher_weight.T
            if teacher_bias is not None:
                teacher_logits = teacher_logits + teacher_bias
    teacher_logits = teacher_logits.detach().reshape(z_student.shape)
    if labels is not None:
        labels = labels.reshape(z_student.shape[:-1])
    return DIVERGENCES[divergence](z_student, teacher_logits, labels, reduction=reduction,
                                   num_items_in_batch=num_items_in_batch, **divergence_kwargs)
