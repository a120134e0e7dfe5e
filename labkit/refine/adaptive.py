"""Adaptive computation: refine every example only as long as it needs, in one batch.

A fixed number of refinement steps T spends T forward passes on every example, easy or hard. With
per-example stopping, example b stops after s_b <= T steps, when a stopping signal fires:

* confidence: min over the answer slot of p(token) >= tau (the model is sure of every token), or
* verifier acceptance: the task's checker accepts the current answer (decoded from the state).

Finished examples leave the batch, so the next forward pass runs on the live rows only. Compute is
counted as the number of rows pushed through the model, sum_t |live_t| = sum_b s_b (vs B * T with a
fixed budget). The idea goes back to Adaptive Computation Time (Graves 2016) and the Universal
Transformer's per-position halting (Dehghani et al. 2019); here it is the per-example version for
Mask-Predict, which is "anytime": after every iteration the slot holds a complete answer.

Rows never interact (fixed-width layout, no cross-row normalisation), so the batched run with early
exit gives exactly the tokens of running each example alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .masked import ANSWER_WIDTH, MASK_ID, decode_answers, encode_prompts, mask_predict_step, remask_count


@dataclass
class AdaptiveResult:
    """Final state (tensors [B, ...]), steps used per example [B], and the compute spent."""
    state: dict
    steps_used: torch.Tensor
    forward_passes: int   # batched model calls (sequential latency)
    row_passes: int       # rows pushed through the model: sum over calls of live batch size


def run_adaptive(step, state: dict, max_steps: int, stop=None, early_exit: bool = True) -> AdaptiveResult:
    """Run ``step`` up to ``max_steps`` times on a batch, dropping rows once ``stop`` says they are done.

    state: {name: tensor [B, ...]}; step(live_state, t) -> live_state; stop(live_state, t) -> bool [b].
    With ``early_exit=False`` every row runs ``max_steps`` steps (``stop`` is ignored): the fixed budget.
    """
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if not state:
        raise ValueError("state must hold at least one tensor")
    sizes = {k: v.shape[0] for k, v in state.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"state tensors must share the batch size, got {sizes}")
    final = {k: v.clone() for k, v in state.items()}
    B = next(iter(sizes.values()))
    device = next(iter(final.values())).device
    live = torch.arange(B, device=device)
    steps_used = torch.zeros(B, dtype=torch.long)
    passes = row_passes = 0
    for t in range(max_steps):
        sub = step({k: v[live] for k, v in final.items()}, t)
        passes, row_passes = passes + 1, row_passes + len(live)
        for k, v in sub.items():
            final[k][live] = v
        steps_used[live.cpu()] = t + 1
        if early_exit and stop is not None:
            done = torch.as_tensor(stop(sub, t), dtype=torch.bool, device=device)
            if done.shape != live.shape:
                raise ValueError(f"stop must return one flag per live row ({len(live)}), got shape {tuple(done.shape)}")
            live = live[~done]
            if len(live) == 0:
                break
    return AdaptiveResult(final, steps_used, passes, row_passes)


# ----------------------------------------------------------------------------- stopping signals


def confident(threshold: float):
    """stop when every slot position's confidence is >= ``threshold``."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    return lambda state, t: state["confidence"].min(1).values >= threshold


def verified(prompts, checker):
    """stop when ``checker(prompt, answer)`` accepts the decoded answer (the state carries row indices)."""
    def stop(state, t):
        answers = decode_answers(state["tokens"].cpu())
        return torch.tensor([bool(checker(prompts[i], a)) for i, a in zip(state["row"].tolist(), answers)])
    return stop


# ----------------------------------------------------------------------------- adaptive Mask-Predict


@torch.no_grad()
def adaptive_mask_predict(model, prompts, max_steps: int, threshold: float | None = None, checker=None,
                          early_exit: bool = True, one_at_a_time: bool = False) -> dict:
    """Mask-Predict with up to ``max_steps`` iterations and per-example stopping.

    Stops an example when its confidence reaches ``threshold`` or ``checker`` accepts its answer (either
    or both; neither means the fixed budget). ``one_at_a_time=True`` runs each prompt alone (the
    reference the batched run must equal). Returns answers, steps_used [B], forward_passes, row_passes.
    """
    if threshold is None and checker is None and early_exit:
        early_exit = False
    prompts = list(prompts)
    if one_at_a_time:
        runs = [adaptive_mask_predict(model, [p], max_steps, threshold, checker, early_exit) for p in prompts]
        return {"answers": [a for r in runs for a in r["answers"]],
                "steps_used": torch.cat([r["steps_used"] for r in runs]),
                "forward_passes": sum(r["forward_passes"] for r in runs),
                "row_passes": sum(r["row_passes"] for r in runs)}
    device = next(model.parameters()).device
    ids, mask = encode_prompts(prompts)
    B, L = len(prompts), ANSWER_WIDTH
    state = {"prompt_ids": ids.to(device), "prompt_mask": mask.to(device),
             "tokens": torch.full((B, L), MASK_ID, dtype=torch.long, device=device),
             "confidence": torch.zeros(B, L, dtype=torch.float64, device=device),
             "row": torch.arange(B, device=device)}

    def step(s, t):
        n = L if t == 0 else remask_count(t, max_steps, L)
        tokens, conf, _ = mask_predict_step(model, s["prompt_ids"], s["prompt_mask"], s["tokens"], s["confidence"], n)
        return {**s, "tokens": tokens, "confidence": conf}

    signals = [f for f in (confident(threshold) if threshold is not None else None,
                           verified(prompts, checker) if checker is not None else None) if f is not None]
    stop = (lambda s, t: torch.stack([torch.as_tensor(f(s, t)).cpu() for f in signals]).any(0)) if signals else None
    was_training = model.training
    model.eval()
    result = run_adaptive(step, state, max_steps, stop, early_exit)
    model.train(was_training)
    return {"answers": decode_answers(result.state["tokens"].cpu()), "steps_used": result.steps_used,
            "forward_passes": result.forward_passes, "row_passes": result.row_passes}
