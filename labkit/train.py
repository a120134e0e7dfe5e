"""One training loop for the whole kit: AdamW, linear warm-up then cosine decay, gradient clipping,
bf16 autocast on CUDA, optional ``tqdm.auto`` progress, and periodic evaluation (exact match for
sequence tasks, accuracy for digit classifiers). Silent unless ``progress=True``.

LoRA (``add_lora`` / ``merge_lora``): train low-rank adapters with the same loop, then fold them into
the weights, so the fine-tune is a plain model whose task vector has rank <= r in every adapted matrix.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .data import encode_for_training
from .device import autocast, get_device
from .evaluate import accuracy, exact_match, predict_logits  # noqa: F401 (predict_logits: importable here)


def cosine_schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warm-up to 1 over ``warmup`` steps, then cosine to 0.1."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(model, lr, weight_decay):
    # no weight decay on biases and norm gains: decaying them only fights the normalisation
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))


def _optimizer_step(model, opt, loss, grad_clip) -> float:
    """Backward, clip the global gradient norm, step; return the loss as a float."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.item()


def _set_lr(opt, lr, step, steps, warmup) -> None:
    for group in opt.param_groups:
        group["lr"] = lr * cosine_schedule(step, steps, warmup)


def _progress_bar(total, enabled, desc):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


def train_lm(model, data, steps: int, batch_size: int = 128, lr: float = 3e-3, warmup: int | None = None,
             weight_decay: float = 0.01, grad_clip: float = 1.0, eval_data=None, eval_every: int | None = None,
             device=None, seed: int = 0, progress: bool = False, max_len: int = 32, callback=None,
             extra_loss=None) -> dict:
    """Train a causal LM on prompt/answer pairs with the loss on the answer tokens only.

    data: a ``datasets.Dataset`` (or list of dicts) with ``prompt`` and ``answer``.
    eval_data: evaluated by greedy exact match every ``eval_every`` steps and at the end.
    callback(step, model): called after each evaluation (e.g. to keep checkpoints).
    extra_loss(outputs) -> tensor: added to the loss (e.g. an MoE load-balancing loss).
    Returns a history: {"loss": [per step], "eval": [(step, exact_match), ...]}.
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    device = torch.device(device) if device is not None else get_device()
    model.to(device).train()
    prompts, answers = list(data["prompt"]), list(data["answer"])
    if not prompts:
        raise ValueError("train_lm needs a non-empty dataset")
    enc = encode_for_training(prompts, answers, max_len=max_len)
    enc = {k: v.to(device) for k, v in enc.items()}
    n = enc["input_ids"].shape[0]
    gen = torch.Generator().manual_seed(seed)
    opt = _optimizer(model, lr, weight_decay)
    warmup = max(1, steps // 20) if warmup is None else warmup
    history = {"loss": [], "eval": []}
    bar = _progress_bar(steps, progress, "train_lm")

    def evaluate(step):
        model.eval()
        em = exact_match(model, eval_data)
        model.train()
        history["eval"].append((step, em))
        if callback is not None:
            callback(step, model)
        if bar is not None:
            bar.set_postfix(exact_match=f"{em:.3f}")

    for step in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen).to(device)
        batch = {k: v[idx] for k, v in enc.items()}
        width = int(batch["attention_mask"].sum(1).max())  # trim shared right padding
        batch = {k: v[:, :width] for k, v in batch.items()}
        _set_lr(opt, lr, step, steps, warmup)
        with autocast(device):
            out = model(**batch)
            loss = out.loss if extra_loss is None else out.loss + extra_loss(out)
        history["loss"].append(_optimizer_step(model, opt, loss, grad_clip))
        if bar is not None:
            bar.update(1)
            bar.set_description(f"train_lm loss {history['loss'][-1]:.3f}")
        if eval_data is not None and eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            evaluate(step + 1)
    if eval_data is not None:
        evaluate(steps)
    if bar is not None:
        bar.close()
    model.eval()
    return history


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) B A x with W frozen, A [r, in] small random, B [out, r] zero at the start
    (so training starts from the unchanged model). Hu et al. (2021), "LoRA: Low-Rank Adaptation of Large
    Language Models"."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features, device=base.weight.device) / base.in_features ** 0.5)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))

    def forward(self, x):
        return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A: what merging adds to W."""
        return self.scale * self.lora_B @ self.lora_A


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model: nn.Module, rank: int = 4, alpha: float | None = None, targets=LORA_TARGETS) -> nn.Module:
    """Freeze every parameter and wrap each ``nn.Linear`` whose name ends with one of ``targets`` in a
    ``LoRALinear`` (alpha defaults to 2 r, i.e. scale 2); ``train_lm`` then trains only the adapters."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    alpha = 2.0 * rank if alpha is None else alpha
    for p in model.parameters():
        p.requires_grad_(False)
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    if not found:
        raise ValueError(f"no nn.Linear named one of {list(targets)} in {type(model).__name__}")
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, LoRALinear(module, rank, alpha))
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W <- W + (alpha / r) B A), put the plain ``nn.Linear`` back
    and make every parameter trainable again: the model has its original structure and state-dict keys."""
    adapted = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not adapted:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to merge (call add_lora first)")
    for name, module in adapted:
        module.base.weight += module.delta_weight().to(module.base.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def train_classifier(model, X, y, steps: int = 1000, batch_size: int = 64, lr: float = 3e-3,
                     warmup: int | None = None, weight_decay: float = 1e-4, grad_clip: float = 1.0,
                     X_val=None, y_val=None, eval_every: int | None = None, augment=None,
                     label_smoothing: float = 0.0, device=None, seed: int = 0, progress: bool = False,
                     callback=None, sample_weight_idx=None) -> dict:
    """Train a classifier with cross-entropy on minibatches drawn with a seeded generator.

    augment(xb, generator) -> xb: applied to each training batch (e.g. pixel noise).
    sample_weight_idx: optional index tensor (e.g. a bootstrap resample) that replaces 0..N-1 as the
    pool minibatches are drawn from; that is how bagging trains on a resample without copying data.
    callback(step, model): after each evaluation (checkpoints along a run).
    Returns {"loss": [...], "eval": [(step, val_accuracy), ...]}.
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    if len(X) != len(y):
        raise ValueError(f"X has {len(X)} rows but y has {len(y)}")
    device = torch.device(device) if device is not None else get_device()
    model.to(device).train()
    X, y = torch.as_tensor(X).to(device), torch.as_tensor(y).to(device)
    pool = torch.arange(len(X)) if sample_weight_idx is None else torch.as_tensor(sample_weight_idx).cpu()
    gen = torch.Generator().manual_seed(seed)
    opt = _optimizer(model, lr, weight_decay)
    warmup = max(1, steps // 20) if warmup is None else warmup
    history = {"loss": [], "eval": []}
    bar = _progress_bar(steps, progress, "train_classifier")

    def evaluate(step):
        acc = accuracy(model, X_val, y_val)
        model.train()
        history["eval"].append((step, acc))
        if callback is not None:
            callback(step, model)

    for step in range(steps):
        idx = pool[torch.randint(0, len(pool), (min(batch_size, len(pool)),), generator=gen)].to(device)
        xb, yb = X[idx], y[idx]
        if augment is not None:
            xb = augment(xb, gen)
        _set_lr(opt, lr, step, steps, warmup)
        with autocast(device):
            loss = F.cross_entropy(model(xb).float(), yb, label_smoothing=label_smoothing)
        history["loss"].append(_optimizer_step(model, opt, loss, grad_clip))
        if bar is not None:
            bar.update(1)
        if X_val is not None and eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            evaluate(step + 1)
    if X_val is not None:
        evaluate(steps)
    if bar is not None:
        bar.close()
    model.eval()
    return history
