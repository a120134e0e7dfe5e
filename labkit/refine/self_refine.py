"""Self-refinement: generate a draft, get feedback, revise, until the feedback accepts or N rounds.

    y_0 = generate(x);   for r = 0, 1, ...:  f_r = feedback(x, y_r);  stop if f_r.accept or r = N;
                                              y_{r+1} = revise(x, y_r, f_r)

Self-Refine (Madaan et al. 2023) uses one LLM for all three roles; self-correction with a trained
corrector (Welleck et al. 2022) trains the reviser; deliberation networks (Xia et al. 2017) revise a
first-pass draft with a second decoder. What makes refinement work is the feedback: with an exact
verifier a correct answer is accepted and never touched, so refinement can only help; a verifier that
errs stops on wrong answers and sends correct ones to be "fixed"; a model judging itself tends to accept
its own mistakes (Huang et al. 2024: without external feedback GPT-4 on GSM8K fell 95.5 -> 91.5 -> 89.0).

Every role is a plain callable on lists, so any model plugs in (a zoo LM, a Hub model, a rule):
    generate(inputs) -> outputs;  feedback(inputs, outputs) -> [Feedback];  revise(inputs, outputs, feedbacks) -> outputs
The loop never sees labels: it stops on ``Feedback.accept`` only. ``score(input, output)`` (which may read
labels) is called only to record each round for figures.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

FEEDBACK_TOKENS = {True: "y", False: "n"}


@dataclass(frozen=True)
class Feedback:
    """A verdict on one output: ``accept`` stops the loop; ``message`` is what the reviser reads."""
    accept: bool
    message: str = ""


@dataclass(frozen=True)
class Round:
    """One recorded round: the output judged, the feedback on it, and its score (None without ``score``)."""
    round: int
    output: str
    feedback: Feedback
    score: float | None = None


def should_stop(feedback: Feedback, round_index: int, max_rounds: int) -> bool:
    """The stopping rule: stop when the feedback accepts, or after ``max_rounds`` revisions."""
    return feedback.accept or round_index >= max_rounds


def self_refine(inputs, generate, feedback, revise, max_rounds: int = 3, score=None) -> list[list[Round]]:
    """Run the generate -> feedback -> revise loop on every input, batched; return each input's rounds.

    Inputs whose feedback accepts leave the batch, so later rounds call ``feedback`` and ``revise`` on the
    still-open inputs only. The final answer of input i is ``rounds[i][-1].output``.
    """
    inputs = list(inputs)
    if max_rounds < 0:
        raise ValueError(f"max_rounds must be >= 0, got {max_rounds}")
    for name, fn in (("generate", generate), ("feedback", feedback), ("revise", revise)):
        if not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    outputs = _checked(generate(inputs), len(inputs), "generate")
    history = [[] for _ in inputs]
    live = list(range(len(inputs)))
    for r in range(max_rounds + 1):
        live_inputs = [inputs[i] for i in live]
        verdicts = _checked(feedback(live_inputs, [outputs[i] for i in live]), len(live), "feedback")
        for i, fb in zip(live, verdicts):
            if not isinstance(fb, Feedback):
                raise TypeError(f"feedback must return Feedback objects, got {type(fb).__name__}")
            history[i].append(Round(r, outputs[i], fb, None if score is None else score(inputs[i], outputs[i])))
        open_rows = [(i, fb) for i, fb in zip(live, verdicts) if not should_stop(fb, r, max_rounds)]
        if not open_rows:
            break
        live = [i for i, _ in open_rows]
        revised = _checked(revise([inputs[i] for i in live], [outputs[i] for i in live], [fb for _, fb in open_rows]),
                           len(live), "revise")
        for i, y in zip(live, revised):
            outputs[i] = y
    return history


def _checked(values, n, name):
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{name} returned {len(values)} items for {n} inputs")
    return values


def final_outputs(history) -> list[str]:
    return [rounds[-1].output for rounds in history]


def accuracy_by_round(history, is_correct, max_rounds: int) -> list[float]:
    """Accuracy of the current answers after each round r = 0..max_rounds (finished inputs keep theirs)."""
    acc = []
    for r in range(max_rounds + 1):
        current = [rounds[min(r, len(rounds) - 1)].output for rounds in history]
        acc.append(sum(is_correct(i, y) for i, y in enumerate(current)) / len(current))
    return acc


# ----------------------------------------------------------------------------- the kit's tasks: checker, prompts


def check_answer(prompt: str, answer: str) -> bool:
    """The task's exact checker, computed from the prompt alone (no reference answer needed)."""
    if len(prompt) < 3 or prompt[1] != ":" or not prompt.endswith("="):
        raise ValueError(f"not a task prompt: {prompt!r} (expected 'x:...=')")
    kind, body = prompt[0], prompt[2:-1]
    if kind == "c":
        return answer == body
    if kind == "r":
        return answer == body[::-1]
    if kind == "s":
        return answer == "".join(sorted(body))
    if kind == "a":
        a, b = body.split("+")
        return answer == str(int(a) + int(b))
    if kind == "n":
        q, s = body.split("|")
        return answer == str(s.count(q))
    if kind == "m" and body.isdigit():  # data's 'max' task shares the prefix with 'perm': digits tell them apart
        return answer == max(body)
    if kind == "m":  # 'perm': any rearrangement of the letters, many right answers
        return sorted(answer) == sorted(body)
    if kind == "d":
        return answer == "".join(sorted(body, reverse=True))
    if kind == "u":
        return answer == "".join(dict.fromkeys(body))
    if kind == "i":
        return answer == "".join(str((int(c) + 1) % 10) for c in body)
    raise ValueError(f"no checker for task prefix {kind!r} in prompt {prompt!r}")


def revision_prompt(prompt: str, draft: str, accepted: bool) -> str:
    """The reviser's input: 'a:47+85=' with draft '122' rejected -> 'a:47+85>122|n='."""
    return f"{prompt[:-1]}>{draft}|{FEEDBACK_TOKENS[bool(accepted)]}="


def critic_prompt(prompt: str, draft: str) -> str:
    """The critic's input: 'a:47+85=' with draft '122' -> 'a:47+85>122='; it answers 'y' or 'n'."""
    return f"{prompt[:-1]}>{draft}="


# ----------------------------------------------------------------------------- feedback sources


def exact_verifier(checker=check_answer):
    """Feedback from the task's checker: accept exactly the correct outputs."""
    return lambda inputs, outputs: [Feedback(bool(checker(x, y)), "") for x, y in zip(inputs, outputs)]


def noisy_verifier(error_rate: float, checker=check_answer, seed: int = 0):
    """The checker's verdict, flipped with probability ``error_rate`` (false accepts and false rejects).

    The flip is a hash of (seed, input, output), so the same pair always gets the same verdict, whatever
    the batch it is judged in.
    """
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"error_rate must lie in [0, 1], got {error_rate}")

    def judge(inputs, outputs):
        out = []
        for x, y in zip(inputs, outputs):
            u = int.from_bytes(hashlib.sha256(f"{seed}|{x}|{y}".encode()).digest()[:8], "big") / 2**64
            out.append(Feedback(bool(checker(x, y)) != (u < error_rate), ""))
        return out
    return judge


@torch.no_grad()
def _next_token_probs(model, prompts, token_chars):
    """P(next token = c | prompt) for each c in ``token_chars`` under a causal LM: [N, len(token_chars)]."""
    from labkit.data import get_tokenizer

    tok = get_tokenizer()
    device = next(model.parameters()).device
    enc = tok(list(prompts), return_tensors="pt", padding=True).to(device)
    position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # left padding: positions from 0
    logits = model(**enc, position_ids=position_ids).logits[:, -1].double()
    ids = [tok.convert_tokens_to_ids(c) for c in token_chars]
    return torch.softmax(logits, -1)[:, ids].cpu()


def critic_feedback(critic, threshold: float = 0.5):
    """A learned critic (a causal LM trained to answer 'y'/'n' after ``critic_prompt``): accept when
    P(y) / (P(y) + P(n)) >= threshold. The message is the critic's verdict."""
    def judge(inputs, outputs):
        p = _next_token_probs(critic, [critic_prompt(x, y) for x, y in zip(inputs, outputs)], "yn")
        p_yes = (p[:, 0] / p.sum(1)).tolist()
        return [Feedback(q >= threshold, f"critic P(correct)={q:.2f}") for q in p_yes]
    return judge


@torch.no_grad()
def sequence_probability(model, prompts, outputs) -> torch.Tensor:
    """p(output + <eos> | prompt) under a causal LM, in float64: [N]."""
    from labkit.data import encode_for_training

    device = next(model.parameters()).device
    enc = encode_for_training(prompts, outputs, max_len=64)
    logits = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1).cpu()
    labels = enc["labels"][:, 1:]
    token_lp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != -100)
    return token_lp.sum(1).exp()


def self_feedback(model, threshold: float = 0.5):
    """The model judges itself: accept when its own probability of the output is >= ``threshold``."""
    def judge(inputs, outputs):
        p = sequence_probability(model, inputs, outputs).tolist()
        return [Feedback(q >= threshold, f"self p={q:.2f}") for q in p]
    return judge


# ----------------------------------------------------------------------------- generators and revisers


def lm_generator(model, max_new_tokens: int = 6):
    """generate(inputs) by a causal LM's greedy answers."""
    from labkit.data import generate_answers

    return lambda inputs: generate_answers(model, list(inputs), max_new_tokens=max_new_tokens)


def lm_reviser(model, max_new_tokens: int = 6):
    """revise(inputs, drafts, feedbacks) by a causal LM trained on ``revision_prompt`` -> better answer."""
    from labkit.data import generate_answers

    def revise(inputs, drafts, feedbacks):
        prompts = [revision_prompt(x, y, fb.accept) for x, y, fb in zip(inputs, drafts, feedbacks)]
        return generate_answers(model, prompts, max_new_tokens=max_new_tokens)
    return revise
