"""pytest plugin for ``pytest --nbval``: warnings and progress bars never fail a notebook.

nbval 0.11 compares every output of a cell with the stored one, stderr streams included, so a warning
printed in one run and not in the other (or a tqdm bar's text) fails the cell. This plugin removes,
from both sides of the comparison,
  * stderr stream outputs (warnings, logging, tqdm's text bars), and
  * progress-bar widget outputs (``tqdm.auto`` in Jupyter: a display with widget-view data),
before nbval compares. Errors still fail (nbval raises on an error output before comparing), and
stdout, results and figures are compared as before.

Enable it with ``-p labkit.course.nbval_plugin`` (on the command line or in pytest's ``addopts``).
"""
from __future__ import annotations

_WIDGET = "application/vnd.jupyter.widget-view+json"


def drop_volatile(outputs):
    """The outputs without stderr streams and widget displays (the things that differ run to run)."""
    keep = []
    for o in outputs or []:
        kind = o.get("output_type")
        if kind == "stream" and o.get("name") == "stderr":
            continue
        if kind == "display_data" and _WIDGET in (o.get("data") or {}):
            continue
        keep.append(o)
    return keep


def pytest_configure(config):
    try:
        from nbval.plugin import IPyNbCell
    except ImportError:  # nbval not installed: nothing to adjust
        return
    original = IPyNbCell.compare_outputs
    if getattr(original, "_labkit_patched", False):
        return

    def compare_outputs(self, test, ref, skip_compare=None):
        return original(self, drop_volatile(test), drop_volatile(ref), skip_compare)

    compare_outputs._labkit_patched = True
    IPyNbCell.compare_outputs = compare_outputs
