"""Key results and claim checks of a lab, collected by ``labkit labs`` into one report.

In a notebook::

    from labkit.report import record, claim
    record("best member accuracy", best_acc)
    claim("the ensemble beats its best member", ens_acc > best_acc, detail=f"{ens_acc:.3f} vs {best_acc:.3f}")

``claim`` prints one line without numbers ("claim ✓ the ensemble beats its best member"), so the
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


def claim(text: str, passed, detail: str = "") -> None:
    """Store whether a syllabus claim reproduced and print "claim ✓ text" (or "claim ✗ text").

    ``passed`` may be a bool, a NumPy bool or a one-element tensor; ``detail`` (numbers, kept out of the
    printed line) goes to the report.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"claim(): text must be a non-empty string, got {text!r}")
    if hasattr(passed, "numel") and passed.numel() != 1:
        raise ValueError(f"claim(): passed must be one boolean, got a tensor of shape {tuple(passed.shape)}")
    ok = bool(passed)
    _append({"type": "claim", "text": text, "passed": ok, "detail": str(detail), "time": time.time()})
    print(f"claim {'✓' if ok else '✗'} {text}")


def entries() -> list[dict]:
    """Everything recorded or claimed in this process so far."""
    return list(_ENTRIES)


def read_report_file(path: str | os.PathLike) -> dict:
    """{"records": {key: value}, "claims": [{"text", "passed", "detail"}]} from a LABKIT_REPORT_FILE.

    A key recorded twice keeps its last value; a line that is not JSON (a notebook killed mid-write)
    is skipped.
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
            claims.append({"text": e["text"], "passed": bool(e["passed"]), "detail": e.get("detail", "")})
    return {"records": records, "claims": claims}
