"""Token-level ensemble decoding of causal language models that share a tokenizer.

At every step each member scores the next token given the same prefix; the scores are combined by a
rule from ``combination.py`` and one token is chosen for the whole ensemble. ``EnsembleLM`` keeps a
KV cache per member, so a step costs M single-token forwards. It refuses what would silently go wrong:
tokenizers that give the same id to different tokens, a request longer than a member's context, and
by default it stops each row at a member's end-of-sequence token.

  ensemble_next_token, member_logprobs, align_to_vocab, EnsembleLM
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from ..models import check_same_vocab
from .combination import _as_members, combine

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


def _eos_ids(model) -> list[int]:
    """A member's end-of-sequence id(s), from its generation config, else its model config."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def local_tokenizer(model):
    """The tokenizer saved next to a member's weights (its local ``name_or_path`` folder), or None.

    Reads local files only; a member built in memory, or loaded from a hub id, has none to offer.
    """
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path or not os.path.isdir(path) or not any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):  # a folder with a partial or foreign tokenizer: nothing to compare
        return None


class EnsembleLM:
    """Token-level ensemble of Hugging Face causal LMs sharing a tokenizer.

    At every step each member scores the next token given the same prefix, the scores are combined
    by ``rule`` (linear: OR; log-linear: AND, negative weights allowed) with ``weights`` ([M] fixed,
    or a callable such as a trained ``GatingNetwork`` mapping member log-probs [M, B, V] to per-row
    weights [M, B]), and one token is chosen for the whole ensemble. Every member keeps its own KV
    cache (``past_key_values``), so a step costs M single-token forwards, not M full re-reads.

    Token ids must mean the same thing in every member. Members with different vocabulary sizes are
    refused unless ``token_maps`` (one LongTensor per member, see ``align_to_vocab``) aligns them to a
    shared vocabulary for the linear rule. Tokenizers with the same size but different token -> id
    maps are refused too (``labkit.models.check_same_vocab``, naming the first differing token): the
    ``tokenizers`` given (one per member, None to skip one), or by default those saved in the members'
    local checkpoint folders. ``allow_vocab_mismatch=True`` (implied by ``token_maps``) is the override
    for users who know their ids agree.
    """

    def __init__(self, members, weights=None, rule: str = "linear", token_maps=None, tokenizers=None,
                 allow_vocab_mismatch: bool = False):
        self.members = list(members)
        if not self.members:
            raise ValueError("EnsembleLM needs at least one member")
        self.rule, self.weights, self.token_maps = rule, weights, None
        if tokenizers is not None and len(tokenizers) != len(self.members):
            raise ValueError(f"tokenizers has {len(tokenizers)} entries for {len(self.members)} members "
                             "(one per member, None to skip one)")
        if token_maps is None and not allow_vocab_mismatch:
            if tokenizers is None:
                tokenizers = [local_tokenizer(m) for m in self.members]
            check_same_vocab(tokenizers, names=[f"member {i}" for i in range(len(self.members))])
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
            logits = [align_to_vocab(lg, tm.to(lg.device)) for lg, tm in zip(logits, self.token_maps)]
        return torch.stack(logits).float()

    def _weights_for(self, member_logits: torch.Tensor):
        """Fixed weights [M], or per-row weights [M, B] from a gate that reads the member log-probs."""
        if callable(self.weights):
            return self.weights(F.log_softmax(member_logits, -1))
        return self.weights

    def eos_token_ids(self) -> list[int]:
        """Every member's end-of-sequence id(s), in the shared vocabulary (through ``token_maps``)."""
        ids = set()
        for i, m in enumerate(self.members):
            for e in _eos_ids(m):
                if self.token_maps is None:
                    ids.add(e)
                else:  # the shared ids this member reads as its EOS
                    ids.update((self.token_maps[i] == e).nonzero().flatten().tolist())
        return sorted(ids)

    def context_length(self) -> tuple[int, int] | None:
        """(shortest ``max_position_embeddings`` among the members, index of that member), or None."""
        limits = [(getattr(m.config, "max_position_embeddings", None), i) for i, m in enumerate(self.members)]
        limits = [(n, i) for n, i in limits if n is not None]
        return min(limits) if limits else None

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 20,
                 do_sample: bool = False, temperature: float = 1.0, generator: torch.Generator | None = None,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int = 0, return_logprobs: bool = False,
                 ignore_eos: bool = False):
        """Generate from left-padded prompts [B, T]; returns ids [B, T + new] (and per-step log-probs [B, new, V]).

        A row is done when it emits an end-of-sequence token: ``eos_token_id`` (one id or a list, in the
        shared vocabulary) or, by default, any member's own EOS (``eos_token_ids``); ``ignore_eos=True``
        runs all ``max_new_tokens`` steps. Done rows are filled with ``pad_token_id`` and generation
        stops when every row is done. Sampling draws from ``generator`` for reproducibility.

        The longest prompt plus ``max_new_tokens`` must fit every member's ``max_position_embeddings``:
        past it a model sees positions it was never trained on, so the request is refused up front
        (even if EOS might have stopped it earlier). ``max_new_tokens=0`` returns the prompts (and
        log-probs of shape [B, 0, V]).
        """
        from transformers import DynamicCache

        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.vocab_size):
            raise ValueError(f"input_ids hold ids outside the shared vocabulary [0, {self.vocab_size}): "
                             f"min {int(input_ids.min())}, max {int(input_ids.max())}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
        if (attention_mask[:, -1] == 0).any():
            raise ValueError("prompts must be left-padded: the last column of attention_mask must be all ones")
        if do_sample and temperature <= 0:
            raise ValueError(f"sampling needs temperature > 0, got {temperature}")
        if not 0 <= pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id must be a token id in [0, {self.vocab_size}), got {pad_token_id}")
        limit = self.context_length()
        longest = int(attention_mask.sum(1).max()) if input_ids.shape[0] else 0
        if limit is not None and longest + max_new_tokens > limit[0]:
            raise ValueError(f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds member "
                             f"{limit[1]}'s context length (max_position_embeddings={limit[0]}): use at most "
                             f"{max(0, limit[0] - longest)} new tokens or a shorter prompt")
        if ignore_eos:
            eos = []
        elif eos_token_id is None:
            eos = self.eos_token_ids()
        else:
            eos = [int(e) for e in (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])]
            bad = [e for e in eos if not 0 <= e < self.vocab_size]
            if bad:
                raise ValueError(f"eos_token_id {bad} is outside the shared vocabulary [0, {self.vocab_size})")
        eos = torch.tensor(eos, dtype=input_ids.dtype, device=input_ids.device)
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
            if eos.numel():
                done |= torch.isin(token, eos)
                if done.all():
                    break
            # the next step feeds only the new token; earlier keys/values are in each member's cache
            step_ids, step_pos = token[:, None], step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        ids = torch.cat(out, dim=1)
        if return_logprobs:
            if not steps_lp:  # max_new_tokens == 0
                return ids, torch.zeros(input_ids.shape[0], 0, self.vocab_size, device=input_ids.device)
            return ids, torch.stack(steps_lp, dim=1)
        return ids
