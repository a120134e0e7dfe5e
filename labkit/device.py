"""Device, seeding and run mode: the few switches every other module reads.

The run mode decides how big experiments are:
  * ``smoke``: small sizes and few steps, so every notebook runs on a 2-core CPU in minutes;
  * ``full``: the real sizes, the default when a GPU is present.
Set it with the environment variable ``LABKIT_MODE=smoke|full``.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

MODES = ("smoke", "full")


def get_device(prefer: str | None = None) -> torch.device:
    """Return the best available device: cuda > mps > cpu (or ``prefer`` / ``LABKIT_DEVICE``)."""
    prefer = prefer or os.environ.get("LABKIT_DEVICE")
    if prefer:
        dev = torch.device(prefer)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {prefer!r} was asked for, but CUDA is not available here")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError(f"device {prefer!r} was asked for, but MPS is not available here")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_name(device: torch.device | str | None = None) -> str:
    """A human-readable name of the device, e.g. 'NVIDIA H100 80GB HBM3' or 'cpu (2 threads)'."""
    device = torch.device(device) if device is not None else get_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return f"cpu ({torch.get_num_threads()} threads)"


def run_mode() -> str:
    """``'smoke'`` or ``'full'``: from ``LABKIT_MODE``, else full on a GPU and smoke on a CPU."""
    mode = os.environ.get("LABKIT_MODE", "").strip().lower()
    if mode:
        if mode not in MODES:
            raise ValueError(f"LABKIT_MODE={mode!r} is not one of {MODES}")
        return mode
    return "full" if get_device().type == "cuda" else "smoke"


def is_smoke() -> bool:
    return run_mode() == "smoke"


def by_mode(smoke, full):
    """Pick a size by run mode: ``steps = by_mode(smoke=50, full=2000)``."""
    return smoke if is_smoke() else full


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); return a CPU generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def set_deterministic(enabled: bool = True) -> None:
    """Ask torch for deterministic kernels (slower on a GPU; used by tests and zoo builds)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.deterministic = enabled
        torch.backends.cudnn.benchmark = not enabled


def autocast(device: torch.device | str):
    """bf16 autocast on CUDA, a no-op elsewhere (CPU bf16 is slow and changes numerics)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work, so timers measure the work and not its launch."""
    device = torch.device(device) if device is not None else get_device()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
