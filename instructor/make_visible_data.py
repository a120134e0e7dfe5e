"""Write labkit/grading/bank/visible_data.json: inputs and expected values of the visible cases that use
random inputs, computed with the instructor bank's float64 references.

    .venv/bin/python instructor/make_visible_data.py

Every entry is made under ``torch.manual_seed(0)``, so rerunning it reproduces the file.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build() -> dict:
    from labkit.grading import load_instructor_bank
    from labkit.grading.bank._data import to_json

    load_instructor_bank(ROOT / "instructor" / "bank")
    out = {}
    for name, module in sorted(sys.modules.items()):
        if not name.startswith("labkit_instructor_bank."):
            continue
        for key, make in sorted(getattr(module, "VISIBLE_DATA", {}).items()):
            torch.manual_seed(0)
            out[key] = {k: to_json(v) for k, v in make().items()}
    return out


if __name__ == "__main__":
    from labkit.grading.bank._data import PATH

    PATH.write_text(json.dumps(build(), indent=None, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {PATH}")
