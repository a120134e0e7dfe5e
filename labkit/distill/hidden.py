"""Hidden-state distillation: match the student's intermediate features to the teacher's.

Output distillation only sees the last layer; matching chosen hidden layers gives the student a
signal at every depth (FitNets, Romero et al. 2015: "hints" through a learned regressor; TinyBERT,
Jiao et al. 2020: uniform layer mapping; DistillKit's hidden-state mode). When the widths differ a
learned linear projection W_l maps the student's width to the teacher's; it trains with the student
and is thrown away afterwards. Works across architectures (a CNN's pooled features into an MLP's).

    L = (1/|pairs|) sum_{(s, t) in pairs} mean_positions  d(W_s h^S_s, h^T_t)
    d = mean squared error over the width, or 1 - cosine similarity

Shapes: hidden states [..., H] (``[B, L, H]`` from ``output_hidden_states=True``; index 0 is the
embeddings, i the output of block i), masks [...] (bool; padding and prompt excluded when wanted).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def uniform_layer_map(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Pairs (student layer, teacher layer) for hidden_states indices 1..n: student block i ↔ teacher
    block round(i * n_teacher / n_student) (TinyBERT's uniform strategy); the last layers always meet."""
    if n_student < 1 or n_teacher < 1:
        raise ValueError(f"layer counts must be >= 1, got n_student={n_student}, n_teacher={n_teacher}")
    return [(i, max(1, round(i * n_teacher / n_student))) for i in range(1, n_student + 1)]


class HiddenProjector(nn.Module):
    """One linear map per layer pair from the student's width to the teacher's (FitNets' regressor).

    ``student_widths`` and ``teacher_widths`` are per pair; where they are equal and
    ``identity_when_equal`` is True the pair is compared directly (no parameters).
    """

    def __init__(self, student_widths, teacher_widths, identity_when_equal: bool = True):
        super().__init__()
        student_widths, teacher_widths = list(student_widths), list(teacher_widths)
        if len(student_widths) != len(teacher_widths):
            raise ValueError(f"student_widths has {len(student_widths)} entries but teacher_widths has "
                             f"{len(teacher_widths)}: give one width per layer pair")
        self.maps = nn.ModuleList(
            nn.Identity() if (s == t and identity_when_equal) else nn.Linear(s, t, bias=False)
            for s, t in zip(student_widths, teacher_widths))
        self.student_widths, self.teacher_widths = student_widths, teacher_widths

    def forward(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[-1] != self.student_widths[i]:
            raise ValueError(f"student hidden state of pair {i} has width {hidden.shape[-1]}, "
                             f"the projector expects {self.student_widths[i]}")
        return self.maps[i](hidden)


def hidden_state_loss(student_hidden, teacher_hidden, pairs, projector: HiddenProjector | None = None,
                      mask: torch.Tensor | None = None, kind: str = "mse") -> torch.Tensor:
    """Distance between chosen student and teacher hidden states (see the module docstring).

    student_hidden / teacher_hidden: sequences of tensors [..., H_s] / [..., H_t] (e.g. the
    ``hidden_states`` tuples of two HF models); pairs: [(student index, teacher index), ...];
    projector: one map per pair, needed when widths differ; mask [...]: positions that count.
    The teacher side is detached: the teacher is not trained.
    """
    if kind not in ("mse", "cosine"):
        raise ValueError(f"kind must be 'mse' or 'cosine', got {kind!r}")
    if not pairs:
        raise ValueError("pairs is empty: choose at least one (student layer, teacher layer) pair")
    total = 0.0
    for i, (s, t) in enumerate(pairs):
        if not (0 <= s < len(student_hidden)) or not (0 <= t < len(teacher_hidden)):
            raise ValueError(f"pair {i} = ({s}, {t}) is out of range: the student has {len(student_hidden)} "
                             f"hidden states, the teacher {len(teacher_hidden)}")
        hs, ht = student_hidden[s], teacher_hidden[t].detach()
        if projector is not None:
            hs = projector(i, hs)
        if hs.shape != ht.shape:
            raise ValueError(f"pair {i}: student hidden state {tuple(hs.shape)} (after projection) and teacher "
                             f"{tuple(ht.shape)} differ; give a HiddenProjector for different widths")
        if kind == "mse":
            per_position = (hs.float() - ht.float()).pow(2).mean(-1)
        else:
            per_position = 1.0 - F.cosine_similarity(hs.float(), ht.float(), dim=-1)
        if mask is not None:
            m = mask.to(per_position.dtype)
            if int(m.sum()) == 0:
                raise ValueError("mask: every position is masked, so there is nothing to match")
            total = total + (per_position * m).sum() / m.sum()
        else:
            total = total + per_position.mean()
    return total / len(pairs)


def capture_features(model: nn.Module, module_names, inputs):
    """Run ``model(inputs)`` and return (output, [output of each named submodule]) via forward hooks.

    For models without ``output_hidden_states`` (the kit's digit classifiers): e.g.
    ``capture_features(mlp, ["layers.0", "layers.1"], x)``. Grad flows as in a normal forward.
    """
    modules = dict(model.named_modules())
    missing = [n for n in module_names if n not in modules]
    if missing:
        raise ValueError(f"module_names {missing} not in the model; it has {sorted(n for n in modules if n)}")
    captured: dict[str, torch.Tensor] = {}
    handles = [modules[n].register_forward_hook(lambda mod, inp, out, n=n: captured.__setitem__(n, out))
               for n in module_names]
    try:
        out = model(inputs)
    finally:
        for h in handles:
            h.remove()
    # convolution maps [N, C, H, W] become feature vectors [N, C*H*W]
    return out, [captured[n].flatten(1) if captured[n].ndim == 4 else captured[n] for n in module_names]
