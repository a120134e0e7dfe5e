"""The one entry point for the labs' benchmarks: ``labkit bench NAME``.

Each benchmark lives in ``labkit/benchmarks/NAME.py`` and defines ``run(smoke: bool) -> dict`` that
returns ``{"title": str, "baseline": str, "columns": [...], "rows": [{...}, ...], "notes": str}``;
rows hold raw figures and the ratio against the baseline a user would otherwise pick. This module
times things, prints the table and writes ``bench/results/NAME-<device>.json`` with the device name
and library versions, so results from different machines can be compared side by side.
"""
from __future__ import annotations

import importlib
import json
import platform
import re
import statistics
import time
from pathlib import Path

import torch

from ..device import device_name, get_device, synchronize

BENCHMARKS = ("ensemble", "merge", "moe", "distill", "refine")
RESULTS_DIR = Path("bench/results")


def time_fn(fn, *, warmup: int = 2, repeat: int = 5, device=None, min_time: float = 0.0) -> dict:
    """Median wall time of ``fn()`` in seconds (GPU work synchronised), plus min and all samples."""
    device = torch.device(device) if device is not None else get_device()
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    start_all = time.perf_counter()
    while len(samples) < repeat or (time.perf_counter() - start_all) < min_time:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - t0)
        if len(samples) >= 1000:
            break
    return {"median_s": statistics.median(samples), "min_s": min(samples), "samples": len(samples)}


def peak_memory(fn, device=None) -> int | None:
    """Peak bytes allocated on a CUDA device while running ``fn()``; None where torch cannot tell."""
    device = torch.device(device) if device is not None else get_device()
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def environment() -> dict:
    import numpy

    env = {
        "device": device_name(),
        "device_type": get_device().type,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:  # transformers is a dependency, but a benchmark must still report without it
        env["transformers"] = None
    return env


def format_table(columns: list[str], rows: list[dict]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def run_benchmark(name: str, smoke: bool = False, out_dir: Path | str = RESULTS_DIR) -> Path:
    """Run benchmark ``name``, print its table and write its JSON; return the JSON path."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    module = importlib.import_module(f"labkit.benchmarks.{name}")
    result = module.run(smoke=smoke)
    env = environment()
    print(f"== labkit bench {name}: {result['title']}")
    print(f"   device: {env['device']}   torch {env['torch']}   baseline: {result['baseline']}")
    print(format_table(result["columns"], result["rows"]))
    if result.get("notes"):
        print(result["notes"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{slug(env['device'])}{'-smoke' if smoke else ''}.json"
    payload = {"benchmark": name, "smoke": smoke, "environment": env, **result}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"   wrote {path}")
    return path
