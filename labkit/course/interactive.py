"""Sliders in the labs that also work where nobody can move them.

In JupyterLab, Notebook and Colab, :func:`interact` is ``ipywidgets.interact``. In a headless run (the
environment variable ``LABKIT_HEADLESS=1``, which ``labkit labs``, the notebook tests and the grader set)
it draws the figure once, at the controls' initial values, and says so.

Why: a kernel client that executes notebooks without a browser (nbclient, which nbconvert, ``labkit
labs`` and nbgrader use) can wait forever on a cell that creates an ``interact``: the kernel goes idle
and the client keeps waiting (seen here in 02_merging; upstream: jupyter/nbconvert#1921,
jupyter/nbclient#312). Nobody moves a slider in a headless run, so the static figure loses nothing
there; the browser test (tests/test_browser.py) runs the real sliders in JupyterLab.
"""
from __future__ import annotations

import os

HEADLESS_ENV = "LABKIT_HEADLESS"


def headless() -> bool:
    """True when the notebook runs without a front end that could show widgets (``LABKIT_HEADLESS=1``)."""
    return os.environ.get(HEADLESS_ENV, "").strip().lower() in ("1", "true", "yes")


def interact(draw, **controls):
    """``ipywidgets.interact(draw, **controls)``, or one static ``draw(**initial values)`` when headless.

    ``controls`` are ipywidgets controls (``FloatSlider``, ``Dropdown``, ``fixed`` ...); each must have an
    initial ``.value``. A control without one is a mistake in the lab, named in the error.
    """
    import ipywidgets

    if not headless():
        return ipywidgets.interact(draw, **controls)
    values = {}
    for name, control in controls.items():
        if not hasattr(control, "value"):
            raise TypeError(f"interact: control {name!r} ({type(control).__name__}) has no initial .value to "
                            "draw with; pass an ipywidgets control or ipywidgets.fixed(value)")
        values[name] = control.value
    shown = ", ".join(f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v!r}" for k, v in values.items()
                      if not isinstance(controls[k], ipywidgets.fixed))
    print(f"(headless run: drawn once at {shown}; in JupyterLab or Colab this is a slider)")
    return draw(**values)
