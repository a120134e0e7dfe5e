"""Key results and claim checks of a lab, collected by ``labkit labs`` into one report.

In a notebook::

    from labkit.report import record, claim
    record("best member accuracy", best_acc)
    claim(1, "the ensemble beats its best member", ens_acc > best_acc, detail=f"{ens_acc:.3f} vs {best_acc:.3f}")

The first argument of ``claim`` is the number of the syllabus claim it tests (1-20, ``SYLLABUS_CLAIMS``),
or a tuple of them; it comes first and has no default, so a claim cannot be made without one. A check
that tests no syllabus claim is a plain assertion or print, not a ``claim``. ``claim`` prints one line
with the syllabus number and without results ("claim ✓ [1] the ensemble beats its best member"), so the
notebook's output stays the same across runs and devices (nbval compares it); the numbers go to the
report. When the environment variable ``LABKIT_REPORT_FILE`` names a file, each call appends one JSON
line to it (``labkit labs`` sets it per notebook); the entries are also kept in memory (``entries()``).
"""
from __future__ import annotations

import json
import math
import os
import time

_ENTRIES: list[dict] = []

# The claims of the course syllabus the labs reproduce, by number (short forms of the syllabus text).
SYLLABUS_CLAIMS = {
    1: "An ensemble beats its best member; the gain grows with member diversity",
    2: "Linear vs log-linear interpolation: OR vs AND behaviour",
    3: "Learned mixture weights (~100 examples) beat uniform weights when members specialise",
    4: "A negative (anti-expert) coefficient steers generation away from a behaviour",
    5: "Averaging independently initialised models fails; averaging fine-tunes of one base works",
    6: "Greedy soup >= best single in-distribution; uniform soup more robust under shift",
    7: "Averaged-model accuracy correlates with ensemble accuracy and rarely exceeds it",
    8: "Adding task vectors gives multi-task skill; negating one removes that skill",
    9: "TIES beats plain averaging on a multi-task merge with interference",
    10: "Distilling an ensemble recovers most of its gain in a single model",
    11: "Top-k routing cuts FLOPs by E/k; experts specialise; dense vs MoE at equal active parameters",
    12: "Stacking beats a cascade when the first stage loses information",
    13: "Iterative refinement improves outputs when the feedback is accurate, not when it is not",
    14: "A distilled student copies its teacher's mistakes as well as its successes",
    15: "Forward KL covers the teacher's modes, reverse KL seeks one mode",
    16: "On-policy distillation beats off-policy at the same teacher forward passes",
    17: "A top-k teacher log-prob cache keeps nearly all of full-logit distillation's gain",
    18: "Distillation works across architectures, where weight averaging cannot",
    19: "Masked iterative refinement improves with the number of refinement steps",
    20: "Stopping refinement per example when confident saves most compute at nearly the same quality",
}


def _plain(value):
    """A JSON-friendly copy: tensors and NumPy values become Python numbers or lists; NaN/inf become strings."""
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu()
        value = value.item() if value.numel() == 1 else value.tolist()
    elif hasattr(value, "tolist") and type(value).__module__.startswith("numpy"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def _append(entry: dict) -> None:
    _ENTRIES.append(entry)
    path = os.environ.get("LABKIT_REPORT_FILE")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def record(key: str, value) -> None:
    """Store a key result of the lab (a number, a short string, a small list or dict). Prints nothing."""
    if not isinstance(key, str) or not key.strip():
        raise ValueError(f"record(): key must be a non-empty string, got {key!r}")
    _append({"type": "record", "key": key, "value": _plain(value), "time": time.time()})


def _syllabus_numbers(syllabus) -> list[int]:
    """[n, ...] from one syllabus claim number or a tuple/list of them; a clear error for anything else."""
    numbers = list(syllabus) if isinstance(syllabus, (tuple, list)) else [syllabus]
    bad = [n for n in numbers if isinstance(n, bool) or not isinstance(n, int) or n not in SYLLABUS_CLAIMS]
    if not numbers or bad:
        raise ValueError(f"claim(): the first argument must be the syllabus claim number(s) it tests "
                         f"(1-{max(SYLLABUS_CLAIMS)}), got {syllabus!r}; a check that tests no syllabus "
                         "claim is a plain assertion or print")
    return sorted(set(numbers))


def claim(syllabus, text: str, passed, detail: str = "") -> None:
    """Store whether a syllabus claim reproduced and print "claim ✓ [n] text" (or "claim ✗ [n] text").

    ``syllabus`` is the number (1-20, see ``SYLLABUS_CLAIMS``) of the syllabus claim this check tests,
    or a tuple of numbers. ``passed`` may be a bool, a NumPy bool or a one-element tensor; ``detail``
    (numbers, kept out of the printed line) goes to the report.
    """
    numbers = _syllabus_numbers(syllabus)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"claim(): text must be a non-empty string, got {text!r}")
    if hasattr(passed, "numel") and passed.numel() != 1:
        raise ValueError(f"claim(): passed must be one boolean, got a tensor of shape {tuple(passed.shape)}")
    ok = bool(passed)
    _append({"type": "claim", "syllabus": numbers, "text": text, "passed": ok, "detail": str(detail),
             "time": time.time()})
    print(f"claim {'✓' if ok else '✗'} [{', '.join(map(str, numbers))}] {text}")


def entries() -> list[dict]:
    """Everything recorded or claimed in this process so far."""
    return list(_ENTRIES)


def read_report_file(path: str | os.PathLike) -> dict:
    """{"records": {key: value}, "claims": [{"syllabus", "text", "passed", "detail"}]} from a LABKIT_REPORT_FILE.

    A key recorded twice keeps its last value; a line that is not JSON (a notebook killed mid-write)
    is skipped. A claim written before claims carried syllabus numbers has ``"syllabus": []``.
    """
    records, claims = {}, []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        if e.get("type") == "record":
            records[e["key"]] = e["value"]
        elif e.get("type") == "claim":
            claims.append({"syllabus": list(e.get("syllabus", [])), "text": e["text"], "passed": bool(e["passed"]),
                           "detail": e.get("detail", "")})
    return {"records": records, "claims": claims}
