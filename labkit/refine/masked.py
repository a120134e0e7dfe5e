"""Masked iterative refinement: fill an answer from all-[MASK] in a few parallel steps.

A bidirectional (non-causal) transformer, ``BertForMaskedLM`` from a small config, reads the prompt and an
answer slot of ``L`` positions. Every position of the slot sees every other one, so a step can revise any
token given all the others, which a left-to-right model cannot.

Layout of one row (fixed widths, so a row's computation never depends on the other rows of its batch)::

    [<pad> ... <pad> <bos> p_1 ... p_k] [a_1 ... a_m <eos> ... <eos>]
     prompt, left-padded to P            answer slot of L positions, <eos>-filled after the answer

Training (Ghazvininejad et al. 2019, "Mask-Predict", EMNLP): mask n ~ U{1..L} random slot positions and
minimise the cross-entropy of the original tokens at the masked positions only.

Decoding, with ``T`` iterations over a slot of length ``L`` (the paper's N):

* Mask-Predict: iteration 0 predicts every position. Iteration t = 1..T-1 re-masks the
  n_t = floor(L (T - t) / T) least confident positions and predicts them again; a position keeps the
  confidence p(token) it had when it was last predicted.
* Masked diffusion with confidence-based unmasking (MDLM, Sahoo et al. 2024; LLaDA, Nie et al. 2025):
  committed tokens never change; at step t the model predicts every still-masked position and commits
  the most confident ones, so that k_t = floor(L (T - t) / T) positions stay masked (linear schedule).

Why iterate at all: if every position has one right token given the prompt (sort, add), one parallel pass
can already be right. When many answers are right (the lab's 'perm' task: any rearrangement of the
letters), each position's marginal spreads over them and a single pass mixes answers (duplicated and
missing letters, the "multi-modality problem" of non-autoregressive decoding, Gu et al. 2018); every
iteration conditions the re-predicted positions on the kept ones and settles on one answer.

Sampling (``temperature > 0``) draws from softmax(logits / temperature) computed in float64 on the CPU
with a seeded generator: low precision flattens the tail and flatters quality. ``temperature == 0`` is
greedy. Vocabulary: the kit's ``labkit.data.VOCAB`` has no spare id, so [MASK] is one id past it
(``MASK_ID == len(VOCAB)``): the masked model's vocabulary is one larger and no existing id changes.
"""
from __future__ import annotations

import math

import torch

from labkit.data import BOS_ID, EOS_ID, PAD_ID, UNK_ID, VOCAB, get_tokenizer
from labkit.models import LM_SIZES

MASK_ID = len(VOCAB)
MASKED_VOCAB_SIZE = len(VOCAB) + 1
PROMPT_WIDTH = 16
ANSWER_WIDTH = 8
# the slot may hold characters and <eos>; never padding, <bos>, <unk> or [MASK]
_FORBIDDEN = (PAD_ID, BOS_ID, UNK_ID, MASK_ID)


def masked_lm_config(size: str = "small"):
    """A ``BertConfig`` with the kit's LM sizes, the kit's vocabulary plus [MASK], and no dropout."""
    from transformers import BertConfig

    if size not in LM_SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(LM_SIZES)}")
    return BertConfig(vocab_size=MASKED_VOCAB_SIZE, max_position_embeddings=64, type_vocab_size=1,
                      pad_token_id=PAD_ID, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      tie_word_embeddings=True, **LM_SIZES[size])


def make_masked_lm(size: str = "small", seed: int = 0):
    """A freshly initialised bidirectional ``BertForMaskedLM`` over the kit's vocabulary plus [MASK]."""
    from transformers import BertForMaskedLM

    torch.manual_seed(seed)
    return BertForMaskedLM(masked_lm_config(size))


# ----------------------------------------------------------------------------- encoding


def encode_prompts(prompts, width: int = PROMPT_WIDTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (ids [B, P], attention mask [B, P]): <bos> + characters, left-padded to ``width``."""
    tok = get_tokenizer()
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    for i, p in enumerate(prompts):
        row = tok(p)["input_ids"]
        if len(row) > width:
            raise ValueError(f"prompt {p!r} has {len(row)} tokens with <bos>, more than width={width}")
        ids[i, width - len(row):] = torch.tensor(row)
    return ids, (ids != PAD_ID).long()


def encode_answers(answers, width: int = ANSWER_WIDTH) -> torch.Tensor:
    """Answers -> slot ids [B, L]: one token per character, then <eos> up to ``width``."""
    tok = get_tokenizer()
    ids = torch.full((len(answers), width), EOS_ID, dtype=torch.long)
    for i, a in enumerate(answers):
        row = tok(a, add_special_tokens=False)["input_ids"]
        if len(row) > width:
            raise ValueError(f"answer {a!r} is longer than the answer slot (width={width})")
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return ids


def decode_answers(slot: torch.Tensor) -> list[str]:
    """Slot ids [B, L] -> strings, cut at the first <eos>; [MASK] shows as '_' (for step-by-step figures)."""
    tok = get_tokenizer()
    out = []
    for row in slot.tolist():
        chars = []
        for t in row:
            if t == EOS_ID:
                break
            chars.append("_" if t == MASK_ID else tok.convert_ids_to_tokens(t))
        out.append("".join(chars))
    return out


def mask_answers(slot: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Training noise: per row draw n ~ U{1..L} and mask n random positions.

    Returns (noisy slot [B, L] with MASK_ID at masked positions, masked [B, L] bool).
    """
    B, L = slot.shape
    n = torch.randint(1, L + 1, (B, 1), generator=generator)
    ranks = torch.rand(B, L, generator=generator).argsort(1).argsort(1)  # a random rank per position
    masked = (ranks < n).to(slot.device)
    return slot.masked_fill(masked, MASK_ID), masked


def masked_lm_loss(model, prompt_ids, prompt_mask, slot, generator) -> torch.Tensor:
    """Cross-entropy of the true tokens at the masked slot positions (mean over masked positions)."""
    noisy, masked = mask_answers(slot, generator)
    logits = slot_logits(model, prompt_ids, prompt_mask, noisy)
    return torch.nn.functional.cross_entropy(logits[masked].float(), slot[masked])


# ----------------------------------------------------------------------------- one forward pass


def slot_logits(model, prompt_ids, prompt_mask, slot) -> torch.Tensor:
    """Logits [B, L, V] of the answer slot given prompt [B, P] and current slot [B, L] (may hold [MASK])."""
    ids = torch.cat([prompt_ids, slot], 1)
    attention = torch.cat([prompt_mask, torch.ones_like(slot)], 1)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, prompt_ids.shape[1]:]
    forbidden = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    forbidden[list(_FORBIDDEN)] = True
    return logits.masked_fill(forbidden, float("-inf"))


def predict_tokens(logits, temperature: float = 0.0, generator: torch.Generator | None = None):
    """Tokens [B, L] and their probabilities [B, L] (float64) from logits [B, L, V].

    Greedy when ``temperature == 0``; otherwise one draw from softmax(logits / temperature) in float64.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logp = torch.log_softmax(logits.double() / (temperature or 1.0), dim=-1)
    if temperature == 0:
        conf, tokens = logp.max(-1)
        return tokens, conf.exp()
    probs = logp.exp().cpu()  # draw on the CPU: one seeded generator gives the same draws on every device
    tokens = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(probs.shape[:-1])
    conf = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens.to(logits.device), conf.to(logits.device)


# ----------------------------------------------------------------------------- schedules


def remask_count(t: int, iterations: int, length: int) -> int:
    """Mask-Predict's schedule: n_t = floor(L (T - t) / T) positions re-masked at iteration t (0 < t < T)."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if not 0 <= t <= iterations:
        raise ValueError(f"t must lie in [0, {iterations}], got {t}")
    return (length * (iterations - t)) // iterations


def lowest_confidence(confidence: torch.Tensor, n) -> torch.Tensor:
    """Bool [B, L]: True at the ``n`` least confident positions of each row (ties: the earlier position).

    ``n`` is an int or a [B] tensor of per-row counts.
    """
    if confidence.ndim != 2:
        raise ValueError(f"confidence must be [B, L], got shape {tuple(confidence.shape)}")
    B, L = confidence.shape
    n = torch.as_tensor(n, device=confidence.device).expand(B)
    if (n < 0).any() or (n > L).any():
        raise ValueError(f"n must lie in [0, {L}], got {n.tolist()}")
    order = torch.sort(confidence, dim=1, stable=True).indices  # ascending: least confident first
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(L, device=confidence.device).expand(B, L))
    return rank < n.unsqueeze(1)


def mask_predict_step(model, prompt_ids, prompt_mask, tokens, confidence, n, temperature=0.0, generator=None):
    """One Mask-Predict iteration: re-mask the ``n`` least confident positions, predict them again.

    tokens [B, L], confidence [B, L] -> (tokens, confidence, remasked [B, L]); positions not re-masked keep
    their token and confidence.
    """
    remasked = lowest_confidence(confidence, n)
    logits = slot_logits(model, prompt_ids, prompt_mask, tokens.masked_fill(remasked, MASK_ID))
    new_tokens, new_conf = predict_tokens(logits, temperature, generator)
    return (torch.where(remasked, new_tokens, tokens), torch.where(remasked, new_conf, confidence), remasked)


@torch.no_grad()
def mask_predict(model, prompt_ids, prompt_mask, iterations: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None, trace: bool = False):
    """Fill the answer slot in ``iterations`` forward passes (Ghazvininejad et al. 2019).

    Returns tokens [B, L]; with ``trace=True`` also a list of per-iteration dicts (tokens, confidence,
    remasked) for figures. Iteration 0 re-masks everything (the slot starts as all [MASK]).
    """
    B, L = prompt_ids.shape[0], ANSWER_WIDTH
    remask_count(0, iterations, L)  # validates ``iterations``
    device = prompt_ids.device
    tokens = torch.full((B, L), MASK_ID, dtype=torch.long, device=device)
    confidence = torch.zeros(B, L, dtype=torch.float64, device=device)
    steps = []
    for t in range(iterations):
        n = L if t == 0 else remask_count(t, iterations, L)
        tokens, confidence, remasked = mask_predict_step(model, prompt_ids, prompt_mask, tokens, confidence, n,
                                                         temperature, generator)
        steps.append({"tokens": tokens.cpu(), "confidence": confidence.cpu(), "remasked": remasked.cpu()})
    return (tokens, steps) if trace else tokens


@torch.no_grad()
def masked_diffusion(model, prompt_ids, prompt_mask, steps: int, temperature: float = 0.0,
                     generator: torch.Generator | None = None, trace: bool = False):
    """Fill the slot by unmasking the most confident predictions over ``steps`` passes; never re-mask.

    After step t (1-based) k_t = floor(L (T - t) / T) positions are still masked; the last step commits all.
    """
    B, L = prompt_ids.shape[0], ANSWER_WIDTH
    remask_count(0, steps, L)
    tokens = torch.full((B, L), MASK_ID, dtype=torch.long, device=prompt_ids.device)
    history = []
    for t in range(1, steps + 1):
        masked = tokens == MASK_ID
        guess, conf = predict_tokens(slot_logits(model, prompt_ids, prompt_mask, tokens), temperature, generator)
        # committed positions count as certain, so the k least confident are always still-masked ones
        conf = conf.masked_fill(~masked, math.inf)
        stay_masked = lowest_confidence(conf, remask_count(t, steps, L))
        commit = masked & ~stay_masked
        tokens = torch.where(commit, guess, tokens)
        history.append({"tokens": tokens.cpu(), "confidence": conf.cpu(), "committed": commit.cpu()})
    return (tokens, history) if trace else tokens


def fill(model, prompts, steps: int, method: str = "mask_predict", temperature: float = 0.0, seed: int = 0,
         batch_size: int = 512) -> list[str]:
    """Answers (strings) for ``prompts`` by ``method`` ('mask_predict' or 'diffusion') in ``steps`` passes."""
    methods = {"mask_predict": mask_predict, "diffusion": masked_diffusion}
    if method not in methods:
        raise ValueError(f"method must be one of {sorted(methods)}, got {method!r}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = encode_prompts(prompts[start: start + batch_size])
        out += decode_answers(methods[method](model, ids.to(device), mask.to(device), steps, temperature, generator))
    model.train(was_training)
    return out


def left_to_right(causal_model, prompts, forward_passes: int) -> list[str]:
    """The baseline at equal compute: a causal LM decoding greedily with ``forward_passes`` passes, one token
    each (an answer of m characters plus <eos> needs m + 1). Unfinished answers are returned as they stand."""
    from labkit.data import generate_answers

    if forward_passes < 1:
        raise ValueError(f"forward_passes must be >= 1, got {forward_passes}")
    return generate_answers(causal_model, list(prompts), max_new_tokens=forward_passes)
