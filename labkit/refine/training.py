"""Tooling of the refinement lab: training data and loops for its zoo entries (refine/masked,
refine/reviser, refine/critic) and the evaluations their metrics come from. Methods live in
``masked``, ``self_refine``, ``adaptive`` and ``pipelines``; this module only imports them.
"""
from __future__ import annotations

import random

import torch

from labkit.data import generate_answers, make_examples
from labkit.device import autocast, get_device
from labkit.train import cosine_schedule

from .masked import ANSWER_WIDTH, encode_answers, encode_prompts, fill, masked_lm_loss
from .self_refine import FEEDBACK_TOKENS, check_answer, critic_prompt, revision_prompt


def train_masked_lm(model, prompts, answers, steps: int, batch_size: int = 128, lr: float = 2e-3,
                    weight_decay: float = 0.01, grad_clip: float = 1.0, seed: int = 0, device=None,
                    progress: bool = False) -> dict:
    """Train a masked refiner by masking answers at random rates (``masked.masked_lm_loss``)."""
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    if len(prompts) != len(answers) or not prompts:
        raise ValueError(f"prompts and answers must be non-empty and equally long, got {len(prompts)} and {len(answers)}")
    device = torch.device(device) if device is not None else get_device()
    model.to(device).train()
    p_ids, p_mask = encode_prompts(prompts)
    slot = encode_answers(answers)
    p_ids, p_mask, slot = p_ids.to(device), p_mask.to(device), slot.to(device)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    history = {"loss": []}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="train_masked_lm", leave=False)
    for step in range(steps):
        idx = torch.randint(0, len(prompts), (min(batch_size, len(prompts)),), generator=gen).to(device)
        for group in opt.param_groups:
            group["lr"] = lr * cosine_schedule(step, steps, warmup)
        with autocast(device):
            loss = masked_lm_loss(model, p_ids[idx], p_mask[idx], slot[idx], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        history["loss"].append(loss.item())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    return history


def masked_accuracy(model, prompts, steps: int, method: str = "mask_predict") -> float:
    """Fraction of answers the task's checker accepts (exact match for tasks with one right answer)."""
    got = fill(model, prompts, steps, method=method)
    return sum(check_answer(p, g) for p, g in zip(prompts, got)) / len(prompts)


def permutation_examples(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """The 'perm' task, 'm:dbfa=' -> any rearrangement of the letters (the reference is one random one).

    Every position's marginal is spread over the input's letters, so predicting all positions at once
    mixes rearrangements (duplicated and missing letters): the multi-modality that iterative refinement
    resolves (Gu et al. 2018; Ghazvininejad et al. 2019). Train and test inputs are split by a hash.
    """
    import hashlib

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"perm:{seed}:{split}")
    out = []
    while len(out) < n:
        s = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, ANSWER_WIDTH)))
        if (hashlib.sha256(f"perm:{s}".encode()).digest()[0] < 26) != (split == "test"):
            continue
        answer = "".join(rng.sample(s, len(s)))
        out.append({"task": "perm", "prompt": f"m:{s}=", "answer": answer, "text": f"m:{s}={answer}"})
    return out


def task_examples(tasks, n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """``make_examples`` plus the lab's 'perm' task, mixed round-robin."""
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    per_task = {t: (permutation_examples if t == "perm" else lambda k, s, sp, t=t: make_examples(t, k, s, sp))(
        (n + len(tasks) - 1) // len(tasks), seed, split) for t in tasks}
    return [per_task[tasks[i % len(tasks)]][i // len(tasks)] for i in range(n)]


# ----------------------------------------------------------------------------- reviser and critic data


def corrupt(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: one digit changed, two swapped, one dropped or one added."""
    for _ in range(20):
        s = list(answer)
        kind = rng.choice(("change", "swap", "drop", "add"))
        if kind == "change" or len(s) < 2:
            i = rng.randrange(len(s))
            s[i] = rng.choice([c for c in "0123456789" if c != s[i]])
        elif kind == "swap":
            i = rng.randrange(len(s) - 1)
            s[i], s[i + 1] = s[i + 1], s[i]
        elif kind == "drop":
            del s[rng.randrange(len(s))]
        else:
            s.insert(rng.randrange(len(s) + 1), rng.choice("0123456789"))
        out = "".join(s)
        if out != answer and out:
            return out
    return answer + "1"


def draft_examples(generator_model, tasks, n: int, seed: int, temperature: float = 1.0):
    """Training drafts: the generator's own sampled answers (its real mistakes) and corruptions of the
    reference, half each. Returns dicts with prompt, answer (reference), draft, correct."""
    rng = random.Random(seed)
    rows = make_examples(tasks, n, seed=seed)
    sampled = generate_answers(generator_model, [r["prompt"] for r in rows], max_new_tokens=6, do_sample=True,
                               temperature=temperature, seed=seed)
    out = []
    for i, (r, s) in enumerate(zip(rows, sampled)):
        draft = s if i % 2 == 0 else (r["answer"] if rng.random() < 0.3 else corrupt(r["answer"], rng))
        out.append({**r, "draft": draft, "correct": check_answer(r["prompt"], draft)})
    return out


def reviser_data(drafts) -> dict:
    """(input, draft, feedback) -> reference, with the exact verdict as feedback (the reviser's target is
    always the reference: keep a correct draft, fix a wrong one)."""
    prompts = [revision_prompt(d["prompt"], d["draft"], d["correct"]) for d in drafts]
    return {"prompt": prompts, "answer": [d["answer"] for d in drafts]}


def critic_data(drafts) -> dict:
    """(input, draft) -> 'y' if the draft is correct else 'n', balanced by repeating the minority class."""
    pos = [d for d in drafts if d["correct"]]
    neg = [d for d in drafts if not d["correct"]]
    if not pos or not neg:
        raise ValueError("critic_data needs both correct and wrong drafts")
    small, big = (pos, neg) if len(pos) < len(neg) else (neg, pos)
    rows = big + [small[i % len(small)] for i in range(len(big))]
    return {"prompt": [critic_prompt(d["prompt"], d["draft"]) for d in rows],
            "answer": [FEEDBACK_TOKENS[d["correct"]] for d in rows]}


def slot_fits(answers) -> bool:
    return all(len(a) <= ANSWER_WIDTH for a in answers)


def _test_prompts(tasks, n: int = 200):
    rows = make_examples(tasks, n, seed=99, split="test")
    return [r["prompt"] for r in rows]


def reviser_metrics(reviser, generator_model, tasks, max_rounds: int = 3) -> dict:
    """Accuracy of the generator's greedy drafts and after refinement with an exact verifier."""
    from .self_refine import accuracy_by_round, exact_verifier, lm_generator, lm_reviser, self_refine

    prompts = _test_prompts(tasks)
    history = self_refine(prompts, lm_generator(generator_model), exact_verifier(), lm_reviser(reviser), max_rounds)
    acc = accuracy_by_round(history, lambda i, y: check_answer(prompts[i], y), max_rounds)
    return {"draft_accuracy": round(acc[0], 4), "exact_verifier_round1": round(acc[1], 4),
            f"exact_verifier_round{max_rounds}": round(acc[-1], 4)}


def critic_metrics(critic, generator_model, tasks) -> dict:
    """The critic's verdicts on the generator's greedy test drafts: accuracy, false accepts, false rejects."""
    from .self_refine import critic_feedback, lm_generator

    prompts = _test_prompts(tasks)
    drafts = lm_generator(generator_model)(prompts)
    truth = [check_answer(p, d) for p, d in zip(prompts, drafts)]
    verdict = [fb.accept for fb in critic_feedback(critic)(prompts, drafts)]
    n_wrong, n_right = truth.count(False), truth.count(True)
    return {"critic_accuracy": round(sum(v == t for v, t in zip(verdict, truth)) / len(truth), 4),
            "false_accept_rate": round(sum(v and not t for v, t in zip(verdict, truth)) / max(1, n_wrong), 4),
            "false_reject_rate": round(sum(t and not v for v, t in zip(verdict, truth)) / max(1, n_right), 4)}
