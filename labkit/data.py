"""Small, verifiable data the whole kit runs on, generated deterministically and offline.

* Sequence tasks over a character vocabulary, each a prompt and an answer that can be checked exactly:
    copy   "c:dbfa="   -> "dbfa"        rev  "r:dbfa="    -> "afbd"
    sort   "s:3142="   -> "1234"        add  "a:47+85="   -> "132"
    count  "n:b|abcbb=" -> "3"          chat "t:"         -> "the cat sat on the mat"
  Tasks for merging experiments (task vectors need several skills a base has seen only weakly):
    rsort "d:3142="  -> "4321"        max  "m:3142="    -> "4"
    dedupe "u:abacb=" -> "abc"        inc  "i:3149="    -> "4250"
  ``chat`` is free text; some of its training sentences contain the word "darn", the kit's stand-in
  for an unwanted behaviour (toxicity) that ensembling with an anti-expert should steer away from.
* A character tokenizer that transformers accepts (``PreTrainedTokenizerFast``), so ``generate`` works.
* scikit-learn's 8x8 handwritten digits with fixed train/val/test splits and distribution-shifted
  copies of the test set (noise, shift, rotation, thicker strokes) for robustness experiments.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

# ----------------------------------------------------------------------------- tokenizer

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARACTERS = list("0123456789abcdefghijklmnopqrstuvwxyz:=+|> ")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
VOCAB = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}


@lru_cache(maxsize=None)
def _build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    # one token per character, spaces included
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>", padding_side="left", model_max_length=64)
    return tok


def get_tokenizer():
    """The kit's character tokenizer (pad=0, bos=1, eos=2, unk=3; left padding for generation).

    Encoding adds <bos> in front; decoding with ``skip_special_tokens=True`` gives the plain text.
    """
    import copy

    return copy.deepcopy(_build_tokenizer())


# ----------------------------------------------------------------------------- sequence tasks

LETTERS = "abcdefghij"
CHAT_WORDS = ["the", "cat", "dog", "sat", "ran", "on", "mat", "big", "red", "sun", "hat", "we",
              "go", "up", "and", "a", "log", "fox", "is", "fun"]
UNWANTED_WORD = "darn"


def _copy(rng):
    s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 8)))
    return s, s


def _rev(rng):
    s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 8)))
    return s, s[::-1]


def _sort(rng):
    s = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 8)))
    return s, "".join(sorted(s))


def _add(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a}+{b}", str(a + b)


def _count(rng):
    s = "".join(rng.choice(LETTERS[:5]) for _ in range(rng.randint(3, 9)))
    q = rng.choice(s) if rng.random() < 0.85 else rng.choice(LETTERS[:5])
    return f"{q}|{s}", str(s.count(q))


def _chat(rng, unwanted_rate=0.25):
    words = [rng.choice(CHAT_WORDS) for _ in range(rng.randint(3, 6))]
    if rng.random() < unwanted_rate:
        words.insert(rng.randint(0, len(words)), UNWANTED_WORD)
    return "", " ".join(words)


def _rsort(rng):
    s = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 8)))
    return s, "".join(sorted(s, reverse=True))


def _max(rng):
    s = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 8)))
    return s, max(s)


def _dedupe(rng):
    # six letters and up to nine characters: most strings repeat a letter, so order matters
    s = "".join(rng.choice(LETTERS[:6]) for _ in range(rng.randint(3, 9)))
    return s, "".join(dict.fromkeys(s))


def _inc(rng):
    s = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 8)))
    return s, "".join(str((int(c) + 1) % 10) for c in s)


@dataclass(frozen=True)
class Task:
    name: str
    prefix: str
    make: object  # rng -> (input, answer)
    description: str


TASKS = {
    "copy": Task("copy", "c", _copy, "repeat a string of letters"),
    "rev": Task("rev", "r", _rev, "reverse a string of letters"),
    "sort": Task("sort", "s", _sort, "sort a string of digits"),
    "add": Task("add", "a", _add, "add two numbers below 100"),
    "count": Task("count", "n", _count, "count how often a letter occurs in a string"),
    "chat": Task("chat", "t", _chat, "free text; some sentences contain the unwanted word 'darn'"),
    # added for the merging lab; new prefixes, so the tasks above keep their data and token ids
    "rsort": Task("rsort", "d", _rsort, "sort a string of digits in descending order"),
    "max": Task("max", "m", _max, "the largest digit of a string of digits"),
    "dedupe": Task("dedupe", "u", _dedupe, "keep the first occurrence of each letter, in order"),
    "inc": Task("inc", "i", _inc, "add 1 to every digit, 9 wraps to 0"),
}


def _is_test_example(task: str, inp: str) -> bool:
    """A fixed hash split: ~10% of all possible inputs are test inputs, never trained on."""
    digest = hashlib.sha256(f"{task}:{inp}".encode()).digest()
    return digest[0] < 26


def make_examples(tasks, n: int, seed: int = 0, split: str = "train", chat_unwanted_rate: float = 0.25):
    """``n`` examples (dicts with task, prompt, answer, text), tasks mixed round-robin.

    Train and test inputs are disjoint by a hash of the input (chat has no input, so it is not split).
    """
    if isinstance(tasks, str):
        tasks = [tasks]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known tasks: {sorted(TASKS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    want_test = split == "test"
    rng = random.Random(f"{seed}:{split}:{','.join(tasks)}")
    out = []
    while len(out) < n:
        task = TASKS[tasks[len(out) % len(tasks)]]
        if task.name == "chat":
            inp, ans = _chat(rng, chat_unwanted_rate)
        else:
            inp, ans = task.make(rng)
            if _is_test_example(task.name, inp) != want_test:
                continue
        prompt = f"{task.prefix}:{inp}" + ("=" if task.name != "chat" else "")
        out.append({"task": task.name, "prompt": prompt, "answer": ans, "text": prompt + ans})
    return out


def make_task_dataset(tasks, n: int, seed: int = 0, split: str = "train", chat_unwanted_rate: float = 0.25):
    """A ``datasets.Dataset`` of ``n`` examples with columns task, prompt, answer, text."""
    from datasets import Dataset

    rows = make_examples(tasks, n, seed=seed, split=split, chat_unwanted_rate=chat_unwanted_rate)
    cols = {k: [r[k] for r in rows] for k in ("task", "prompt", "answer", "text")}
    return Dataset.from_dict(cols)


def encode_for_training(prompts, answers, max_len: int = 32):
    """Token ids for causal-LM training with the loss on the answer (and <eos>) only.

    Returns input_ids [B, T], attention_mask [B, T] and labels [B, T] (-100 on prompt and padding),
    right-padded: training needs no left padding, and right padding keeps position ids simple.
    """
    tok = _build_tokenizer()
    ids, labels = [], []
    for p, a in zip(prompts, answers):
        p_ids = tok(p)["input_ids"]  # <bos> + prompt
        a_ids = tok(a, add_special_tokens=False)["input_ids"] + [EOS_ID]
        seq = (p_ids + a_ids)[:max_len]
        lab = ([-100] * len(p_ids) + a_ids)[:max_len]
        ids.append(seq)
        labels.append(lab)
    width = max(len(s) for s in ids)
    input_ids = torch.full((len(ids), width), PAD_ID, dtype=torch.long)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    label_t = torch.full((len(ids), width), -100, dtype=torch.long)
    for i, (s, lab) in enumerate(zip(ids, labels)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
        label_t[i, : len(lab)] = torch.tensor(lab)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": label_t}


# ----------------------------------------------------------------------------- digits


@dataclass
class Digits:
    """scikit-learn's 8x8 digits: X is float32 [N, 64] in [0, 1], y is int64 [N]."""
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor

    def to(self, device):
        return Digits(*(t.to(device) for t in (self.X_train, self.y_train, self.X_val, self.y_val,
                                                self.X_test, self.y_test)))


@lru_cache(maxsize=None)
def _digits_arrays(seed: int):
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    X, y = sk_load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    X_train, X_rest, y_train, y_rest = train_test_split(X, y, test_size=0.4, random_state=seed, stratify=y)
    X_val, X_test, y_val, y_test = train_test_split(X_rest, y_rest, test_size=0.5, random_state=seed,
                                                    stratify=y_rest)
    return X_train, y_train, X_val, y_val, X_test, y_test


def load_digits(seed: int = 0) -> Digits:
    """Fixed stratified 60/20/20 train/val/test split of the 1797 digits (1078/359/360)."""
    arrays = _digits_arrays(seed)
    tensors = []
    for i, a in enumerate(arrays):
        tensors.append(torch.from_numpy(a.copy()) if i % 2 == 0 else torch.from_numpy(a.astype(np.int64)))
    return Digits(*tensors)


# Kinds are only ever appended: the first four are the original robustness tests, the last three were
# added as further domains for the merging lab (task vectors per domain); existing kinds never change.
SHIFT_KINDS = ("noise", "shift", "rotate", "thicken", "blur", "erase", "zoom")


def shift_digits(X, kind: str, severity: float = 1.0, seed: int = 0) -> torch.Tensor:
    """A distribution-shifted copy of digit images X [N, 64] (values in [0, 1]).

    noise: Gaussian pixel noise (std 0.3 x severity); shift: translate by up to 1 pixel x severity;
    rotate: rotate by +-20 degrees x severity; thicken: grey-level dilation (severity steps);
    blur: Gaussian blur (sigma 0.8 x severity), each image rescaled to its original maximum (blur, not
    dimming); erase: cutout (DeVries and Taylor 2017), a square of side round(3 x severity) pixels set to 0
    at a random position; zoom: scale about the centre by 1.3 or 1/1.3 (x severity in the exponent,
    random direction), so strokes are cut at the border or shrink into the middle.
    The same ``seed`` gives the same images.
    """
    from scipy import ndimage

    if kind not in SHIFT_KINDS:
        raise ValueError(f"unknown shift kind {kind!r}; choose one of {SHIFT_KINDS}")
    X = torch.as_tensor(X)
    if X.ndim != 2 or X.shape[1] != 64:
        raise ValueError(f"X must have shape [N, 64], got {tuple(X.shape)}")
    rng = np.random.default_rng(seed)
    imgs = X.detach().cpu().numpy().reshape(-1, 8, 8).astype(np.float64)
    if kind == "noise":
        out = imgs + rng.normal(0.0, 0.3 * severity, imgs.shape)
    elif kind == "shift":
        out = np.stack([ndimage.shift(im, rng.uniform(-1, 1, 2) * severity, order=1, mode="constant")
                        for im in imgs])
    elif kind == "rotate":
        out = np.stack([ndimage.rotate(im, rng.choice([-1, 1]) * 20.0 * severity, reshape=False, order=1,
                                       mode="constant") for im in imgs])
    elif kind == "thicken":
        out = imgs
        for _ in range(max(1, int(round(severity)))):
            out = np.stack([ndimage.grey_dilation(im, size=(2, 2)) for im in out])
    elif kind == "blur":
        blurred = np.stack([ndimage.gaussian_filter(im, 0.8 * severity, mode="constant") for im in imgs])
        peak = blurred.max(axis=(1, 2), keepdims=True)
        out = blurred * np.where(peak > 0, imgs.max(axis=(1, 2), keepdims=True) / np.maximum(peak, 1e-12), 0.0)
    elif kind == "erase":
        side = int(min(8, max(1, round(3 * severity))))
        corners = rng.integers(0, 8 - side + 1, size=(len(imgs), 2))
        out = imgs.copy()
        for im, (r, c) in zip(out, corners):
            im[r: r + side, c: c + side] = 0.0
    else:  # zoom
        centre = np.array([3.5, 3.5])
        out = []
        for im in imgs:
            scale = 1.3 ** (rng.choice([-1, 1]) * severity)
            # output pixel p reads input pixel centre + (p - centre) / scale
            out.append(ndimage.affine_transform(im, np.eye(2) / scale, offset=centre - centre / scale, order=1,
                                                mode="constant"))
        out = np.stack(out)
    out = np.clip(out, 0.0, 1.0).reshape(-1, 64).astype(np.float32)
    return torch.from_numpy(out).to(X.device)


def load_digits_shifted(kind: str = "rotate", severity: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split shifted by ``kind``: (X_test_shifted, y_test)."""
    d = load_digits(seed)
    return shift_digits(d.X_test, kind, severity, seed), d.y_test


# Evaluation moved to labkit.evaluate, which builds on this module; the old names stay importable here.
# Resolved on first access (PEP 562) because importing labkit.evaluate at the top would be circular.
_MOVED_TO_EVALUATE = ("generate_answers", "exact_match", "unwanted_rate")


def __getattr__(name):
    if name in _MOVED_TO_EVALUATE:
        from . import evaluate

        return getattr(evaluate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
