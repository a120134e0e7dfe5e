"""Training loops for distillation, the tooling around the methods (``losses``, ``sampling``, ``teachers``).

``distill_classifier``: a teacher (one classifier, a list = an ensemble, or precomputed logits) into a
student classifier. ``distill_lm``: a teacher LM into a student LM, with the data from the dataset
(off-policy), the teacher's generations (sequence-level KD), the student's own generations (on-policy,
GKD), or per-token reverse-KL rewards on the student's samples; plus plain label training as the
baseline. Both use AdamW with ``labkit.train``'s warm-up + cosine schedule and gradient clipping, and
count the teacher's forward passes so methods can be compared at an equal teacher budget.
"""
from __future__ import annotations

import torch

from ..data import exact_match
from ..device import autocast, get_device
from ..train import accuracy, cosine_schedule
from .hidden import HiddenProjector, capture_features, hidden_state_loss
from .losses import DIVERGENCES, cross_entropy, distillation_loss, shift_labels
from .sampling import (completion_batch, generate_completions, offpolicy_batch, on_policy_batch,
                       on_policy_reverse_kl_loss, token_logprobs)
from .teachers import (SampledCache, TopKCache, cached_forward_kl, ensemble_teacher_logprobs, sampled_cache,
                       teacher_logits, topk_cache)

LM_MODES = ("labels", "off_policy", "seq_kd", "on_policy", "on_policy_rkl", "cached")


def make_optimizer(model, lr: float, weight_decay: float = 0.01):
    # no decay on biases and norm gains (vectors), as in labkit.train
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))


def distill_step(model, optimizer, loss: torch.Tensor, grad_clip: float | None = 1.0) -> float:
    """One optimiser step on ``loss``: zero grads, backward, clip the global norm, step; the loss as a float."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    optimizer.step()
    return loss.item()


class ForwardCounter:
    """Counts forward calls and rows scored of a model (a hook; ``remove()`` detaches it)."""

    def __init__(self, model):
        self.calls, self.rows = 0, 0
        self._handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        self.calls += 1
        first = args[0] if args else kwargs.get("input_ids")
        self.rows += int(first.shape[0]) if isinstance(first, torch.Tensor) else 0

    def remove(self):
        self._handle.remove()


def _teacher_fn(teacher, weights, rule):
    if isinstance(teacher, (list, tuple)):
        return lambda x: ensemble_teacher_logprobs(teacher, x, weights, rule)
    return lambda x: teacher_logits(teacher, x)


def distill_classifier(student, teacher, X, y=None, steps: int = 1000, batch_size: int = 64, lr: float = 3e-3,
                       temperature: float = 4.0, alpha: float = 0.9, divergence: str = "forward_kl",
                       weights=None, rule: str = "linear", augment=None, X_val=None, y_val=None,
                       weight_decay: float = 1e-4, grad_clip: float = 1.0, seed: int = 0, device=None,
                       hidden_pairs=None, hidden_weight: float = 1.0, **divergence_kwargs) -> dict:
    """Train ``student`` on soft targets from ``teacher`` (Hinton et al. 2015).

    teacher: a classifier, a list of classifiers (an ensemble combined by ``rule`` with ``weights``),
    or a tensor of teacher logits / log-probs [N, C] for X. Loss: alpha * D_T + (1 - alpha) * CE(y)
    (``losses.distillation_loss``). augment(xb, generator) -> xb transforms each batch; a live
    teacher then scores the transformed inputs (a larger transfer set).
    hidden_pairs: [(student module name, teacher module name), ...] adds hidden_weight x
    ``hidden_state_loss`` through a learned ``HiddenProjector`` (one teacher model only; FitNets).
    Returns {"loss": [...], "val_accuracy": float or None, "projector": the projector or None}.
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    if alpha < 1 and y is None:
        raise ValueError("y is needed when alpha < 1 (the cross-entropy term)")
    device = torch.device(device) if device is not None else get_device()
    X = torch.as_tensor(X).to(device)
    y = torch.as_tensor(y).to(device) if y is not None else None
    student.to(device).train()
    if isinstance(teacher, torch.Tensor):
        if augment is not None:
            raise ValueError("teacher is a fixed logits tensor, so inputs cannot be augmented; pass the model(s)")
        if teacher.shape[0] != X.shape[0]:
            raise ValueError(f"teacher logits cover {teacher.shape[0]} rows but X has {X.shape[0]}")
        fixed = teacher.to(device)
    else:
        members = teacher if isinstance(teacher, (list, tuple)) else [teacher]
        for m in members:
            m.to(device)
        score = _teacher_fn(teacher, weights, rule)
        fixed = score(X) if augment is None else None
    projector = None
    trained: torch.nn.Module = student
    if hidden_pairs:
        if not isinstance(teacher, torch.nn.Module):
            raise ValueError("hidden_pairs needs one teacher model (not an ensemble or a logits tensor)")
        s_names, t_names = [p[0] for p in hidden_pairs], [p[1] for p in hidden_pairs]
        with torch.no_grad():
            _, s_feats = capture_features(student, s_names, X[:2])
            _, t_feats = capture_features(teacher.eval(), t_names, X[:2])
        projector = HiddenProjector([f.shape[-1] for f in s_feats], [f.shape[-1] for f in t_feats]).to(device)
        trained = torch.nn.ModuleList([student, projector])  # one optimiser for both
    gen = torch.Generator().manual_seed(seed)
    opt = make_optimizer(trained, lr, weight_decay)
    warmup = max(1, steps // 20)
    history = {"loss": [], "val_accuracy": None, "projector": projector}
    for step in range(steps):
        idx = torch.randint(0, len(X), (min(batch_size, len(X)),), generator=gen).to(device)
        xb = X[idx]
        if augment is not None:
            xb = augment(xb, gen)
        for group in opt.param_groups:
            group["lr"] = lr * cosine_schedule(step, steps, warmup)
        if projector is not None:
            with torch.no_grad():
                target, t_feats = capture_features(teacher.eval(), t_names, xb)
            with autocast(device):
                logits, s_feats = capture_features(student, s_names, xb)
            pairs = [(i, i) for i in range(len(s_feats))]
            extra = hidden_weight * hidden_state_loss(s_feats, t_feats, pairs, projector)
        else:
            target = score(xb) if augment is not None else fixed[idx]
            with autocast(device):
                logits = student(xb)
            extra = 0.0
        loss = distillation_loss(logits.float(), target.float(), y[idx] if y is not None else None, alpha=alpha,
                                 divergence=divergence, temperature=temperature, **divergence_kwargs)
        history["loss"].append(distill_step(trained, opt, loss + extra, grad_clip))
    student.eval()
    if X_val is not None:
        history["val_accuracy"] = accuracy(student, X_val, y_val)
    return history


@torch.no_grad()
def lm_teacher_cache(teacher, data, kind: str = "topk", k: int = 8, missing: str = "renormalize",
                     temperature: float = 1.0, max_len: int = 32, batch_size: int = 256, seed: int = 0,
                     device=None) -> tuple[dict, object]:
    """Score a prompt/answer dataset with ``teacher`` once and keep a sparse cache of its outputs.

    Returns (batch, cache): the dataset as one right-padded batch [N, L] (``offpolicy_batch``) and a
    ``TopKCache`` (kind='topk', k values + indices per position) or ``SampledCache`` (kind='sampled',
    k draws per position) over every position [N, L] of the logits. Pass both to
    ``distill_lm(mode='cached', cache=...)``; ``cache_storage(cache, mask=shift_labels(batch["labels"]) != -100)``
    gives the bytes of the answer tokens, the only ones a training run reads.
    """
    if kind not in ("topk", "sampled"):
        raise ValueError(f"kind must be 'topk' or 'sampled', got {kind!r}")
    device = torch.device(device) if device is not None else get_device()
    teacher.to(device).eval()
    batch = offpolicy_batch(list(data["prompt"]), list(data["answer"]), max_len, device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    parts = []
    for start in range(0, batch["input_ids"].shape[0], batch_size):
        rows = {k_: v[start:start + batch_size] for k_, v in batch.items()}
        logits = teacher_logits(teacher, rows).float().cpu()
        parts.append(topk_cache(logits, k, missing, temperature) if kind == "topk"
                     else sampled_cache(logits, k, temperature, gen))
    first = parts[0]
    if kind == "topk":
        cache = TopKCache(torch.cat([p.indices for p in parts]), torch.cat([p.logprobs for p in parts]),
                          first.vocab_size, missing, temperature)
    else:
        cache = SampledCache(torch.cat([p.indices for p in parts]), first.vocab_size, temperature)
    return batch, cache


def _cache_rows(cache, idx, width):
    if isinstance(cache, TopKCache):
        return TopKCache(cache.indices[idx, :width], cache.logprobs[idx, :width], cache.vocab_size, cache.missing,
                         cache.temperature)
    return SampledCache(cache.indices[idx, :width], cache.vocab_size, cache.temperature)


def distill_lm(student, teacher, data, steps: int, mode: str = "off_policy", divergence: str = "forward_kl",
               temperature: float = 1.0, alpha: float = 1.0, lmbda: float = 1.0, batch_size: int = 64,
               lr: float = 1e-3, max_new_tokens: int = 8, sample_temperature: float = 1.0, max_len: int = 32,
               weight_decay: float = 0.01, grad_clip: float = 1.0, eval_data=None, seed: int = 0, device=None,
               cache=None, **divergence_kwargs) -> dict:
    """Distil ``teacher`` into ``student`` on prompt/answer ``data`` (a Dataset or dict of lists).

    mode:
      'labels'        cross-entropy on the dataset answers, no teacher (the baseline);
      'off_policy'    dataset sequences, teacher scores every answer position (word-level KD);
      'seq_kd'        the teacher's greedy answers to every prompt replace the dataset's (generated once,
                      before training), then cross-entropy (alpha = 0) or KD on them (Kim & Rush 2016);
      'on_policy'     a fraction ``lmbda`` of each batch is the student's sampled answers, the teacher
                      scores all rows (GKD; lmbda = 0 equals off_policy);
      'on_policy_rkl' the student samples, each token gets log p_T - log p_S as its reward
                      (``sampling.on_policy_reverse_kl_loss``);
      'cached'        forward KL from a sparse teacher cache, ``cache=lm_teacher_cache(...)`` (teacher may be
                      None: it was run once, when the cache was built).
    Returns {"loss", "teacher_calls", "teacher_rows", "exact_match" (on eval_data, or None)}.
    """
    if mode not in LM_MODES:
        raise ValueError(f"mode must be one of {LM_MODES}, got {mode!r}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {sorted(DIVERGENCES)}, got {divergence!r}")
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    device = torch.device(device) if device is not None else get_device()
    prompts, answers = list(data["prompt"]), list(data["answer"])
    if not prompts:
        raise ValueError("data is empty: distill_lm needs prompts and answers")
    student.to(device).train()
    if mode == "cached":
        if cache is None:
            raise ValueError("mode 'cached' needs cache=(batch, cache) from lm_teacher_cache")
        pool, sparse = cache
        pool = {k: v.to(device) for k, v in pool.items()}
        if pool["input_ids"].shape[0] != len(prompts):
            raise ValueError(f"cache covers {pool['input_ids'].shape[0]} examples but data has {len(prompts)}")
    counter = None
    if teacher is not None:
        teacher.to(device).eval()
        counter = ForwardCounter(teacher)
    elif mode not in ("labels", "cached"):
        raise ValueError(f"mode {mode!r} needs a teacher")
    try:
        if mode == "seq_kd":
            prompt_ids, completions = [], []
            for start in range(0, len(prompts), 256):
                p, c = generate_completions(teacher, prompts[start:start + 256], max_new_tokens, do_sample=False)
                prompt_ids += p
                completions += c
            pool = completion_batch(prompt_ids, completions, max_len, device)
        elif mode in ("labels", "off_policy"):
            pool = offpolicy_batch(prompts, answers, max_len, device)
        gen = torch.Generator().manual_seed(seed)
        opt = make_optimizer(student, lr, weight_decay)
        warmup = max(1, steps // 20)
        history = {"loss": []}
        for step in range(steps):
            idx = torch.randint(0, len(prompts), (min(batch_size, len(prompts)),), generator=gen)
            for group in opt.param_groups:
                group["lr"] = lr * cosine_schedule(step, steps, warmup)
            if mode in ("on_policy", "on_policy_rkl"):
                frac = 1.0 if mode == "on_policy_rkl" else lmbda
                batch = on_policy_batch(student, [prompts[i] for i in idx], [answers[i] for i in idx], frac,
                                        max_new_tokens, sample_temperature, seed=seed * 100003 + step,
                                        max_len=max_len, device=device)
                batch.pop("on_policy")
                student.train()
            else:
                batch = {k: v[idx.to(device)] for k, v in pool.items()}
                width = int(batch["attention_mask"].sum(1).max())
                batch = {k: v[:, :width] for k, v in batch.items()}
            labels = shift_labels(batch["labels"])
            if mode == "cached":
                with autocast(device):
                    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = cached_forward_kl(s_logits.float(), _cache_rows(sparse, idx, width), labels)
            elif mode == "on_policy_rkl":
                with torch.no_grad():
                    t_lp = token_logprobs(teacher, batch)
                with autocast(device):
                    s_lp = token_logprobs(student, batch)
                loss = on_policy_reverse_kl_loss(s_lp.float(), t_lp.float(), labels != -100)
            else:
                with autocast(device):
                    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                if mode in ("labels",) or (mode == "seq_kd" and alpha == 0):
                    loss = cross_entropy(s_logits.float(), labels)
                else:
                    t_logits = teacher_logits(teacher, batch)
                    loss = distillation_loss(s_logits.float(), t_logits.float(), labels, alpha=alpha,
                                             divergence=divergence, temperature=temperature, **divergence_kwargs)
            history["loss"].append(distill_step(student, opt, loss, grad_clip))
    finally:
        if counter is not None:
            counter.remove()
    student.eval()
    history["teacher_calls"] = counter.calls if counter else 0
    history["teacher_rows"] = counter.rows if counter else 0
    history["exact_match"] = exact_match(student, eval_data) if eval_data is not None else None
    return history
