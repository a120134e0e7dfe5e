"""The kit's models: small transformers-native language models and small digit classifiers.

Language models are plain ``LlamaForCausalLM`` / ``MixtralForCausalLM`` built from configs in code,
so ``save_pretrained`` / ``from_pretrained`` / ``generate`` and every Hugging Face tool work on them.
Digit classifiers are small ``nn.Module``s saved as safetensors plus a JSON config.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .data import BOS_ID, EOS_ID, PAD_ID, VOCAB

# hidden, layers, heads, MLP width. "small" is the workhorse of the labs (~0.5M parameters).
LM_SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    "small": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256),
    "medium": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=6, intermediate_size=384),
}


def _common_lm_config(size: str) -> dict:
    if size not in LM_SIZES:
        raise ValueError(f"unknown LM size {size!r}; choose one of {sorted(LM_SIZES)}")
    return dict(vocab_size=len(VOCAB), max_position_embeddings=64, pad_token_id=PAD_ID,
                bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=True,
                rms_norm_eps=1e-5, **LM_SIZES[size])


def llama_config(size: str = "small"):
    from transformers import LlamaConfig

    return LlamaConfig(**_common_lm_config(size), num_key_value_heads=LM_SIZES[size]["num_attention_heads"])


def make_llama(size: str = "small", seed: int = 0):
    """A freshly initialised Llama-style causal LM over the kit's character vocabulary."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(size))


def mixtral_config(size: str = "small", num_experts: int = 4, top_k: int = 2, expert_width: int | None = None):
    """A Mixtral-style config: same attention as ``size``, MLPs replaced by ``num_experts`` experts.

    ``expert_width`` defaults to the dense MLP width divided by ``top_k``, so the active parameters per
    token match the dense model of the same size (the fair comparison for MoE vs dense).
    """
    from transformers import MixtralConfig

    cfg = _common_lm_config(size)
    if expert_width is None:
        expert_width = cfg["intermediate_size"] // top_k
    cfg["intermediate_size"] = expert_width
    return MixtralConfig(**cfg, num_key_value_heads=cfg["num_attention_heads"], num_local_experts=num_experts,
                         num_experts_per_tok=top_k, router_aux_loss_coef=0.01, output_router_logits=False)


def make_mixtral(size: str = "small", num_experts: int = 4, top_k: int = 2, expert_width: int | None = None,
                 seed: int = 0):
    """A freshly initialised Mixtral-style sparse MoE causal LM (see ``mixtral_config``)."""
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    return MixtralForCausalLM(mixtral_config(size, num_experts, top_k, expert_width))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- digit classifiers


class DigitMLP(nn.Module):
    """x [N, 64] -> logits [N, 10]: Linear-ReLU(-Dropout) blocks, then a Linear head.

    ``self.layers`` holds only the Linear layers in order, which is what permutation alignment needs.
    """

    def __init__(self, hidden: tuple[int, ...] = (128, 128), dropout: float = 0.0, in_features: int = 64,
                 num_classes: int = 10):
        super().__init__()
        self.config = dict(kind="mlp", hidden=list(hidden), dropout=dropout, in_features=in_features,
                           num_classes=num_classes)
        widths = [in_features, *hidden, num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = self.dropout(torch.relu(layer(x)))
        return self.layers[-1](x)


class DigitCNN(nn.Module):
    """x [N, 64] seen as 1x8x8 images -> logits [N, 10]: two 3x3 convolutions, pooling, a Linear head."""

    def __init__(self, channels: int = 16, dropout: float = 0.0, num_classes: int = 10):
        super().__init__()
        self.config = dict(kind="cnn", channels=channels, dropout=dropout, num_classes=num_classes)
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)   # [N, C, 8, 8]
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)  # [N, 2C, 4, 4] after pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * channels * 2 * 2, num_classes)

    def forward(self, x):
        x = x.view(-1, 1, 8, 8)
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.head(self.dropout(x.flatten(1)))


def make_classifier(config: dict) -> nn.Module:
    config = dict(config)
    kind = config.pop("kind", None)
    if kind == "mlp":
        return DigitMLP(hidden=tuple(config["hidden"]), dropout=config.get("dropout", 0.0),
                        in_features=config.get("in_features", 64), num_classes=config.get("num_classes", 10))
    if kind == "cnn":
        return DigitCNN(channels=config["channels"], dropout=config.get("dropout", 0.0),
                        num_classes=config.get("num_classes", 10))
    raise ValueError(f"unknown classifier kind {kind!r} in config (expected 'mlp' or 'cnn')")


def save_classifier(model: nn.Module, directory) -> None:
    """Write ``classifier.json`` and ``model.safetensors`` into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "classifier.json").write_text(json.dumps(model.config, indent=1) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))


def load_classifier(directory, device=None) -> nn.Module:
    from safetensors.torch import load_file

    directory = Path(directory)
    model = make_classifier(json.loads((directory / "classifier.json").read_text()))
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    return model.to(device) if device is not None else model


# ----------------------------------------------------------------------------- Hugging Face checkpoints


def load_pretrained(name_or_path, device=None, dtype=None, allow_download: bool | None = None):
    """Load a causal LM and its tokenizer from a local ``save_pretrained`` folder or a Hub id.

    The kit is offline by default: a Hub id is looked up only in the local cache unless
    ``allow_download=True`` (or ``LABKIT_ALLOW_DOWNLOAD=1``), which Colab users set to try bigger models.
    Returns ``(model, tokenizer)``; the tokenizer is None when the folder has none.
    """
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .device import get_device

    if allow_download is None:
        allow_download = os.environ.get("LABKIT_ALLOW_DOWNLOAD", "") == "1"
    local = Path(name_or_path).exists()
    if not local and not allow_download:
        hint = "" if "/" in str(name_or_path) else " (a Hub id looks like 'org/name')"
        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, local_files_only=True, dtype=dtype)
        except OSError as e:
            raise FileNotFoundError(
                f"{name_or_path!r} is neither a local folder nor in the Hugging Face cache{hint}; labkit does "
                "not download by default: pass allow_download=True or set LABKIT_ALLOW_DOWNLOAD=1") from e
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, local_files_only=not allow_download,
                                                     dtype=dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=not allow_download)
    except (OSError, ValueError):
        tokenizer = None
    device = torch.device(device) if device is not None else get_device()
    return model.to(device).eval(), tokenizer


def check_same_vocab(tokenizers, names=None, allow_mismatch: bool = False) -> None:
    """Refuse to combine models whose tokenizers give different ids to the same tokens.

    Ensembling logits and merging embeddings both index by token id: two tokenizers with the same
    vocabulary *size* but a different token -> id map combine unrelated rows, silently. ``tokenizers``
    are objects with ``get_vocab()`` (transformers tokenizers) or plain ``{token: id}`` dicts; ``None``
    entries (a model saved without a tokenizer) are skipped. Raises ValueError naming the two models
    and the first token (in id order) on which they differ. ``allow_mismatch=True`` is the override for
    users who map vocabularies themselves (e.g. ``EnsembleLM(token_maps=...)``).
    """
    if allow_mismatch:
        return
    names = list(names) if names is not None else [f"model {i}" for i in range(len(tokenizers))]
    vocabs = [(n, t if isinstance(t, dict) else t.get_vocab()) for n, t in zip(names, tokenizers)
              if t is not None]
    if len(vocabs) < 2:
        return
    ref_name, ref = vocabs[0]
    ref_by_id = {i: tok for tok, i in ref.items()}
    for name, vocab in vocabs[1:]:
        if vocab == ref:
            continue
        by_id = {i: tok for tok, i in vocab.items()}
        for i in sorted(set(ref_by_id) | set(by_id)):
            a, b = ref_by_id.get(i), by_id.get(i)
            if a != b:
                raise ValueError(
                    f"tokenizers differ: id {i} is {a!r} in {ref_name} but {b!r} in {name} "
                    f"(vocabularies of {len(ref)} and {len(vocab)} tokens); models must share a "
                    "tokenizer to be combined token by token")
        raise ValueError(f"tokenizers differ between {ref_name} and {name} (same ids, different tokens)")
