"""Where the distillation data comes from: whose sequences the teacher is asked to score.

  * off-policy (word-level KD): dataset sequences; the student matches the teacher's next-token
    distribution at every answer position of a fixed dataset (Hinton et al. 2015 applied per token).
  * sequence-level KD (Kim & Rush 2016): the teacher's own generations replace the dataset's answers
    and the student trains on them with plain cross-entropy ("distil the narrow task you need": the
    teacher writes the data).
  * on-policy (GKD, Agarwal et al. 2024): a fraction ``lmbda`` of the batch is the *student's own*
    generations, which the teacher then scores; the student learns on the states it actually visits,
    fixing the train/inference mismatch of off-policy data.
  * the per-token reverse-KL signal of on-policy distillation (MiniLLM, Gu et al. 2024; Thinking
    Machines' "on-policy distillation", 2025): for each token y_t the student sampled,
        a_t = log p_T(y_t | y_<t) - log p_S(y_t | y_<t),
    a per-token reward whose expectation under the student is -KL(p_S || p_T); maximising it with a
    policy gradient minimises the reverse KL from sampled tokens only.

Batches follow ``labkit.data.encode_for_training``: right-padded ``input_ids`` [B, L],
``attention_mask`` [B, L] and ``labels`` [B, L] with -100 on prompt and padding (unshifted, as
Hugging Face models take them; ``losses.shift_labels`` aligns them with the logits).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import BOS_ID, EOS_ID, PAD_ID, encode_for_training, get_tokenizer
from .losses import IGNORE_INDEX, shift_labels


def offpolicy_batch(prompts, answers, max_len: int = 32, device=None) -> dict:
    """Dataset answers as a training batch (off-policy): ``encode_for_training`` on ``device``."""
    batch = encode_for_training(list(prompts), list(answers), max_len=max_len)
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def completion_batch(prompt_ids, completion_ids, max_len: int = 32, device=None) -> dict:
    """Token-id prompts and completions (lists of lists) -> a right-padded batch; labels on completions."""
    rows, labels = [], []
    for p, c in zip(prompt_ids, completion_ids):
        rows.append((list(p) + list(c))[:max_len])
        labels.append(([IGNORE_INDEX] * len(p) + list(c))[:max_len])
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    label_t = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labels)):
        input_ids[i, :len(r)] = torch.tensor(r)
        attention[i, :len(r)] = 1
        label_t[i, :len(lab)] = torch.tensor(lab)
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": label_t}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


@torch.no_grad()
def generate_completions(model, prompts, max_new_tokens: int = 12, do_sample: bool = True,
                         temperature: float = 1.0, seed: int = 0) -> tuple[list, list]:
    """Complete each prompt (strings) with ``model``; return (prompt ids, completion ids) per row.

    Completions stop after <eos> (kept, so the student learns to stop) or at ``max_new_tokens``.
    Sampling uses torch's global generator seeded with ``seed`` (what ``generate`` draws from).
    In GKD the temperature is the *sampling* temperature, not a loss temperature.
    """
    tok = get_tokenizer()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    enc = tok(list(prompts), return_tensors="pt", padding=True).to(device)  # left padding
    if do_sample:
        torch.manual_seed(seed)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                         temperature=temperature if do_sample else None, top_k=None, top_p=None,
                         pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID)
    model.train(was_training)
    width = enc["input_ids"].shape[1]
    prompt_ids, completions = [], []
    for row, mask, new in zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist(), out[:, width:].tolist()):
        prompt_ids.append([t for t, m in zip(row, mask) if m])
        cut = new.index(EOS_ID) + 1 if EOS_ID in new else len(new)
        completions.append([t for t in new[:cut] if t != PAD_ID])
    return prompt_ids, completions


def sequence_kd_batch(teacher, prompts, max_new_tokens: int = 12, max_len: int = 32, device=None) -> dict:
    """Sequence-level KD (Kim & Rush 2016): the teacher's greedy answers become the labels.

    Kim & Rush use beam search for the teacher's mode; greedy is the cheap approximation. The
    student then trains on this batch with ordinary cross-entropy (or a token-level loss on top).
    """
    prompt_ids, completions = generate_completions(teacher, prompts, max_new_tokens, do_sample=False)
    return completion_batch(prompt_ids, completions, max_len, device)


def on_policy_batch(student, prompts, answers, lmbda: float = 1.0, max_new_tokens: int = 12,
                    temperature: float = 1.0, seed: int = 0, max_len: int = 32, device=None) -> dict:
    """GKD's data mix (Agarwal et al. 2024): ``round(lmbda * B)`` rows get the student's sampled
    completions, the others keep the dataset answers. Returns the batch plus ``on_policy`` [B] (bool).

    lmbda = 0 is off-policy distillation, lmbda = 1 fully on-policy. The rows are chosen with a
    generator seeded by ``seed`` (TRL flips one coin per batch; a fixed count per batch has the same
    mean with less variance).
    """
    if not isinstance(lmbda, (int, float)) or not (0.0 <= lmbda <= 1.0):
        raise ValueError(f"lmbda must be a number in [0, 1], got {lmbda!r}")
    prompts, answers = list(prompts), list(answers)
    if len(prompts) != len(answers):
        raise ValueError(f"prompts has {len(prompts)} rows but answers has {len(answers)}")
    n_student = int(round(lmbda * len(prompts)))
    chosen = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))[:n_student]
    on_policy = torch.zeros(len(prompts), dtype=torch.bool)
    on_policy[chosen] = True
    tok = get_tokenizer()
    prompt_ids = [tok(p)["input_ids"] for p in prompts]
    completions = [tok(a, add_special_tokens=False)["input_ids"] + [EOS_ID] for a in answers]
    if n_student:
        rows = chosen.tolist()
        _, generated = generate_completions(student, [prompts[i] for i in rows], max_new_tokens,
                                            do_sample=True, temperature=temperature, seed=seed)
        for i, c in zip(rows, generated):
            completions[i] = c
    batch = completion_batch(prompt_ids, completions, max_len, device)
    batch["on_policy"] = on_policy.to(batch["input_ids"].device)
    return batch


def token_logprobs(model, batch: dict) -> torch.Tensor:
    """log p(y_t | y_<t) of every labelled token under ``model``: [B, L] aligned with the logits
    (position t holds the log-prob of token t+1), 0 where masked. Grad flows when it is enabled."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = shift_labels(batch["labels"])
    mask = targets != IGNORE_INDEX
    logp = F.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, logp, torch.zeros_like(logp))


def reverse_kl_token_signal(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                            mask: torch.Tensor) -> torch.Tensor:
    """Per-token on-policy signal a_t = log p_T(y_t) - log p_S(y_t) for tokens the student sampled.

    E_{y ~ p_S}[-a_t] = KL(p_S || p_T) at that position: a one-sample estimate of the reverse KL.
    Inputs [B, L] (from ``token_logprobs``), mask [B, L] bool; returns [B, L], 0 where masked, detached.
    """
    if student_logprobs.shape != teacher_logprobs.shape or student_logprobs.shape != mask.shape:
        raise ValueError(f"student_logprobs {tuple(student_logprobs.shape)}, teacher_logprobs "
                         f"{tuple(teacher_logprobs.shape)} and mask {tuple(mask.shape)} must have one shape")
    signal = (teacher_logprobs - student_logprobs).detach()
    return torch.where(mask, signal, torch.zeros_like(signal))


def on_policy_reverse_kl_loss(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                              mask: torch.Tensor, baseline: bool = True) -> torch.Tensor:
    """Policy-gradient loss of per-token on-policy distillation (REINFORCE, no discount):

        L = -(1/N) sum_t sg(a_t - b) log p_S(y_t),   a_t = log p_T(y_t) - log p_S(y_t),  y ~ p_S

    Its gradient estimates grad KL(p_S || p_T) at each sampled position (the score-function term;
    E[grad log p_S] = 0 removes the rest, and lets any constant b be subtracted). ``baseline=True``
    uses b = the batch mean of a_t: the same direction on average with much less variance (every a_t
    is mostly negative, and without it each step mainly pushes down whatever was sampled).
    N = number of unmasked tokens.
    """
    signal = reverse_kl_token_signal(student_logprobs, teacher_logprobs, mask)
    count = mask.sum()
    if int(count) == 0:
        raise ValueError("mask: every position is masked, so there is no sampled token to learn from")
    if baseline:
        signal = torch.where(mask, signal - signal.sum() / count, torch.zeros_like(signal))
    return -(signal * student_logprobs).sum() / count
