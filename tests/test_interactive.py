"""labkit.course.interactive: a slider in a live notebook, one static figure in a headless run."""
import pytest

from labkit.course import interactive


def test_headless_draws_once_at_the_initial_values(monkeypatch, capsys):
    ipywidgets = pytest.importorskip("ipywidgets")
    monkeypatch.setenv("LABKIT_HEADLESS", "1")
    calls = []
    out = interactive.interact(lambda lam, ax: calls.append((lam, ax)) or "drawn",
                               lam=ipywidgets.FloatSlider(value=0.7, min=0, max=1), ax=ipywidgets.fixed(None))
    assert calls == [(0.7, None)] and out == "drawn"
    printed = capsys.readouterr().out
    assert "lam = 0.7" in printed and "ax" not in printed  # a fixed argument is not a control to mention


def test_live_notebook_gets_the_real_interact(monkeypatch):
    ipywidgets = pytest.importorskip("ipywidgets")
    monkeypatch.delenv("LABKIT_HEADLESS", raising=False)
    seen = {}
    monkeypatch.setattr(ipywidgets, "interact", lambda draw, **controls: seen.update(controls) or "widget")
    slider = ipywidgets.IntSlider(value=2)
    assert interactive.interact(lambda k: None, k=slider) == "widget" and seen == {"k": slider}


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("0", False), ("", False)])
def test_headless_flag(monkeypatch, value, expected):
    monkeypatch.setenv("LABKIT_HEADLESS", value)
    assert interactive.headless() is expected


def test_a_control_without_a_value_is_named(monkeypatch):
    monkeypatch.setenv("LABKIT_HEADLESS", "1")
    with pytest.raises(TypeError, match="control 'lam' \\(list\\)"):
        interactive.interact(lambda lam: None, lam=[0.1, 0.2])
