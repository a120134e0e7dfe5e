"""``labkit doctor``: what is installed, which device and mode the kit will use, and what is off."""
from __future__ import annotations

import importlib
import platform
import re
import sys

# The range each dependency is tested in: [lowest tested, first untested major/minor).
TESTED = {
    "torch": ("2.4", "3.0"),
    "numpy": ("1.26", "3.0"),
    "transformers": ("5.0", "6.0"),
    "datasets": ("3.0", "6.0"),
    "safetensors": ("0.4", "1.0"),
    "tokenizers": ("0.20", "1.0"),
    "sklearn": ("1.4", "2.0"),
    "scipy": ("1.11", "2.0"),
    "matplotlib": ("3.7", "4.0"),
    "tqdm": ("4.66", "5.0"),
    "ipywidgets": ("8.0", "9.0"),
    "yaml": ("6.0", "7.0"),
    "nbformat": ("5.9", "6.0"),
    "nbclient": ("0.10", "1.0"),
}


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("."):
        leading = re.match(r"\d+", piece)  # "4rc1" -> 4: a pre-release sorts with its release
        if leading is None:
            break
        parts.append(int(leading.group()))
        if leading.end() < len(piece):
            break
    return tuple(parts)


def check_versions() -> list[tuple[str, str | None, str]]:
    """(package, installed version or None, status) for every dependency; status 'ok', 'untested' or 'missing'."""
    rows = []
    for module, (low, high) in TESTED.items():
        try:
            version = getattr(importlib.import_module(module), "__version__", "unknown")
        except ImportError:
            rows.append((module, None, "missing"))
            continue
        v = _version_tuple(version)
        ok = _version_tuple(low) <= v < _version_tuple(high)
        rows.append((module, version, "ok" if ok else f"untested (tested: >={low},<{high})"))
    return rows


def doctor() -> int:
    from . import __version__
    from .device import device_name, get_device, run_mode

    print(f"labkit {__version__} on Python {platform.python_version()} ({sys.executable})")
    print(f"device: {get_device()} = {device_name()}    mode: {run_mode()}")
    problems = 0
    for module, version, status in check_versions():
        mark = "ok " if status == "ok" else "!! "
        problems += status != "ok"
        print(f"  {mark}{module:13s} {version or '-':12s} {'' if status == 'ok' else status}")
    try:
        from . import zoo

        entries = zoo.read_manifest()["entries"]
        print(f"zoo: {len(entries)} of {len(zoo.RECIPES)} entries built in {zoo.zoo_root()}")
    except Exception as e:  # doctor must report, never crash
        print(f"zoo: could not read the manifest: {e}")
        problems += 1
    if problems:
        print(f"WARNING: {problems} dependency or zoo problem(s) above; the kit may still work, but it "
              "was not tested that way. `pip install -c constraints.txt -e .` installs the tested versions.")
    return 0
