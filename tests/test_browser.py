"""The labs in a real browser: JupyterLab in headless Chromium runs every lab and drives its widgets.

nbval (``make test``) already executes each notebook in a kernel, but nothing there renders a widget: a
slider whose JavaScript fails, or an ``interact`` whose output never redraws, passes nbval. This test
starts JupyterLab from the project environment (a free local port, a token, temporary runtime, config,
data and settings folders, ``--allow-root`` when run as root) on a scratch copy of the notebooks, opens
each lab notebook (``notebooks/0*.ipynb``) in Chromium driven by Playwright, runs all cells with
``LABKIT_MODE=smoke`` and ``OMP_NUM_THREADS=1`` in the server's environment, and asserts:

* every code cell ran and none has an error output;
* every ``application/vnd.jupyter.widget-view+json`` output is rendered as a widget in the page (no
  "Error displaying widget", no placeholder text);
* moving each slider (keyboard on its handle, as a user would) changes its readout and redraws the
  cell's other output (the ``interact`` figure).

Screenshots of each notebook and of each widget before and after its slider moves go to
``reports/browser/`` (gitignored), for a person to look at when it fails.

Runtime trade-off: this executes every lab a second time (nbval is the first), all cells, in one
JupyterLab server and one browser for all labs, one kernel at a time. Measured on the 2-core CPU while
about seven other jobs shared it (load average 9-10): 6.6 to 9 min wall for the four labs (00: 32-50 s,
01: 91-116 s, 02: 78-87 s, 03: 189-269 s, server start 7-13 s) but only 2.4 CPU-minutes in all (server,
kernels, Chromium), so about 3 minutes on an otherwise idle 2-core machine, on one of ``make test``'s
two workers. Running
only the widget cells, or showing the stored outputs of the heavy labs instead of executing them,
would save those minutes but would miss what only a browser run finds in the other cells (a front-end
error, an output JupyterLab cannot render, a cell that depends on the browser's state), so all cells run.

It needs Chromium and Playwright (``make browser-setup``) and skips with a one-line reason otherwise.
Chromium is found as ``$LABKIT_CHROMIUM`` or ``chromium`` / ``chromium-browser`` / ``google-chrome``
on the PATH; Playwright's own browser download is not used.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
LABS = sorted(p.name for p in (REPO / "notebooks").glob("0*.ipynb"))
SCREENSHOTS = REPO / "reports" / "browser"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
# seconds: one lab's run-all in smoke mode on a busy 2-core CPU stays well under this
RUN_ALL_TIMEOUT_S = 600
REDRAW_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_lab_settings(settings_dir: Path) -> None:
    """Render every cell (no windowing, so off-screen widgets are in the DOM) and fetch no news."""
    notebook = settings_dir / "@jupyterlab" / "notebook-extension"
    notebook.mkdir(parents=True)
    (notebook / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    apputils = settings_dir / "@jupyterlab" / "apputils-extension"
    apputils.mkdir(parents=True)
    (apputils / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))


@pytest.fixture(scope="module")
def browser_tools(playwright_chromium):
    pytest.importorskip("jupyterlab", reason="jupyterlab is not installed (make install)")
    return playwright_chromium


@pytest.fixture(scope="module")
def lab_server(browser_tools, tmp_path_factory):
    """A JupyterLab server on a scratch copy of the notebooks; yields (base URL, token, scratch dir)."""
    tmp = tmp_path_factory.mktemp("jupyterlab")
    scratch = tmp / "notebooks"
    scratch.mkdir()
    for name in LABS:
        shutil.copy2(REPO / "notebooks" / name, scratch / name)
    settings = tmp / "settings"
    _write_lab_settings(settings)
    port, token = _free_port(), uuid.uuid4().hex
    env = dict(os.environ, LABKIT_MODE="smoke", OMP_NUM_THREADS="1", JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
               JUPYTER_CONFIG_DIR=str(tmp / "config"), JUPYTER_DATA_DIR=str(tmp / "data"),
               JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"),
               JUPYTER_PREFER_ENV_PATH="1", PYDEVD_DISABLE_FILE_VALIDATION="1")
    env.pop("LABKIT_REPORT_FILE", None)
    env.pop("LABKIT_HEADLESS", None)  # the real sliders, not their static figures
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={scratch}",
           "--LabApp.expose_app_in_browser=True"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log_path = tmp / "jupyterlab.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=scratch, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with code {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer within 180 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base, token, scratch
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser(browser_tools, lab_server):
    sync_api, chromium = browser_tools
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True)
        try:
            yield b
        finally:
            b.close()


# JavaScript run in the page: JupyterLab's own application object (exposed by expose_app_in_browser)
_OPEN_NOTEBOOK = """async (path) => {
  const app = window.jupyterapp;
  const panel = await app.commands.execute('docmanager:open', {path, factory: 'Notebook'});
  await panel.context.ready;
  await panel.sessionContext.ready;
  app.shell.activateById(panel.id);
  return panel.sessionContext.session !== null;
}"""

_RUN_ALL = """async ([path, timeoutMs]) => {
  const app = window.jupyterapp;
  const panel = app.shell.widgets('main').find(w => w.context && w.context.path === path);
  app.shell.activateById(panel.id);
  const timer = new Promise(resolve => setTimeout(() => resolve('timeout'), timeoutMs));
  const ran = app.commands.execute('notebook:run-all-cells');
  return await Promise.race([ran.then(ok => ok ? 'ok' : 'failed'), timer]);
}"""

# per code cell: its index, whether it ran, and its outputs as nbformat JSON
_CELL_OUTPUTS = """(path) => {
  const app = window.jupyterapp;
  const panel = app.shell.widgets('main').find(w => w.context && w.context.path === path);
  return panel.content.widgets.map((cell, i) => cell.model.type !== 'code' ? null : {
    index: i, executionCount: cell.model.executionCount, outputs: cell.model.outputs.toJSON(),
    source: cell.model.sharedModel.getSource().slice(0, 200)});
}"""

_SHUTDOWN = """async (path) => {
  const app = window.jupyterapp;
  const panel = app.shell.widgets('main').find(w => w.context && w.context.path === path);
  await panel.sessionContext.shutdown();
  panel.dispose();
}"""


_KERNEL_IDLE = """(path) => {
  const panel = window.jupyterapp.shell.widgets('main').find(w => w.context && w.context.path === path);
  const kernel = panel && panel.sessionContext.session && panel.sessionContext.session.kernel;
  return kernel !== null && kernel !== undefined && kernel.status === 'idle';
}"""


def _wait_kernel_idle(page, notebook: str) -> None:
    """Wait until the kernel has finished what the page asked of it (e.g. redraws queued by a slider)."""
    page.wait_for_function(_KERNEL_IDLE, arg=notebook, timeout=REDRAW_TIMEOUT_S * 1000)


def _cell(page, index: int):
    return page.locator(".jp-Notebook .jp-Cell").nth(index)


def _outputs_without_sliders(cell_locator) -> str:
    """What the cell's outputs show, sliders taken out: their text and their images' data.

    Text and image data, not the HTML: JupyterLab rewrites attributes (an empty ``style``) when it
    re-renders an output, so identical HTML is not a sign that nothing was redrawn, nor the reverse.
    """
    return cell_locator.evaluate("""(cell) => {
      const area = cell.querySelector('.jp-Cell-outputArea');
      if (!area) return '';
      const copy = area.cloneNode(true);
      copy.querySelectorAll('.widget-slider').forEach(s => s.remove());
      const images = [...copy.querySelectorAll('img')].map(i => i.getAttribute('src') || '');
      return copy.textContent + '\\n' + images.join('\\n');
    }""")


@pytest.mark.parametrize("notebook", LABS)
def test_lab_runs_and_widgets_work_in_browser(browser, lab_server, notebook):
    base, token, _ = lab_server
    stem = Path(notebook).stem
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(f"{base}/lab?token={token}&reset", wait_until="domcontentloaded")
        page.wait_for_function("() => window.jupyterapp && window.jupyterapp.started", timeout=120_000)
        page.evaluate("() => window.jupyterapp.restored")
        assert page.evaluate(_OPEN_NOTEBOOK, notebook), f"{notebook}: no kernel session started"
        t0 = time.monotonic()
        result = page.evaluate(_RUN_ALL, [notebook, RUN_ALL_TIMEOUT_S * 1000])
        run_seconds = time.monotonic() - t0
        cells = [c for c in page.evaluate(_CELL_OUTPUTS, notebook) if c is not None]
        page.screenshot(path=str(SCREENSHOTS / f"{stem}.png"))

        errors = [(c["index"] + 1, c["source"].strip().splitlines()[:1], o.get("ename"), o.get("evalue"))
                  for c in cells for o in c["outputs"] if o.get("output_type") == "error"]
        assert not errors, f"{notebook}: error output in cell(s): " + "; ".join(
            f"cell {i} {first}: {name}: {value}" for i, first, name, value in errors)
        assert result == "ok", f"{notebook}: run all cells ended '{result}' after {run_seconds:.0f} s"
        not_run = [c["index"] + 1 for c in cells if c["executionCount"] is None]
        assert not not_run, f"{notebook}: code cells that did not run: {not_run}"

        widget_cells = [c for c in cells if any(WIDGET_MIME in o.get("data", {}) for o in c["outputs"])]
        for c in widget_cells:
            _check_widget_cell(page, notebook, stem, c)
        print(f"{notebook}: ran in {run_seconds:.0f} s, {len(widget_cells)} widget cell(s) checked")
    finally:
        try:
            page.evaluate(_SHUTDOWN, notebook)
        except Exception:  # noqa: BLE001 - the page may be gone already; the server's exit stops the kernel
            pass
        page.close()


def _check_widget_cell(page, notebook: str, stem: str, cell: dict) -> None:
    index = cell["index"]
    where = f"{notebook} cell {index + 1}"
    locator = _cell(page, index)
    locator.scroll_into_view_if_needed()
    # The cell's output area has one child per output of the model, in order. A widget output is rendered
    # when its child holds the widget's element; ipywidgets' renderer leaves only text ("Loading
    # widget...", "Error displaying widget") when the model or its JavaScript fails.
    widget_positions = [j for j, o in enumerate(cell["outputs"]) if WIDGET_MIME in o.get("data", {})]
    check = """([cell, positions]) => {
      const area = cell.querySelector('.jp-Cell-outputArea');
      if (!area) return false;
      const outs = [...area.children].filter(c => c.classList.contains('jp-OutputArea-child'))
        .map(c => c.querySelector(':scope > .jp-OutputArea-output'));
      return positions.every(j => outs[j] && outs[j].querySelector(':scope > .jupyter-widgets'));
    }"""
    try:
        page.wait_for_function(check, arg=[locator.element_handle(), widget_positions], timeout=60_000)
    except Exception as e:  # noqa: BLE001 - say what the page shows instead of a bare timeout
        html = locator.locator(".jp-Cell-outputArea").evaluate("(a) => a.outerHTML")
        pytest.fail(f"{where}: widget output(s) {widget_positions} not rendered within 60 s "
                    f"({type(e).__name__}); the output area holds: {html[:1500]}")
    shot = SCREENSHOTS / f"{stem}-cell{index + 1}-before.png"
    locator.screenshot(path=str(shot))
    # ipywidgets draws an error icon (its text hidden until clicked) where a view's JavaScript failed
    broken = locator.locator(".jupyter-widgets-error-widget").count()
    assert broken == 0, f"{where}: {broken} widget view(s) failed to render (ipywidgets' error icon; see {shot})"

    sliders = locator.locator(".widget-slider")
    for k in range(sliders.count()):
        _wait_kernel_idle(page, notebook)  # the previous slider's redraws are done: they cannot pass for this one's
        slider = sliders.nth(k)
        readout = slider.locator(".widget-readout")
        before_value = readout.inner_text() if readout.count() else None
        before = _outputs_without_sliders(locator)
        handle = slider.locator(".noUi-handle")
        handle.focus()
        for _ in range(3):
            handle.press("ArrowRight")
        if before_value is not None and readout.inner_text() == before_value:
            for _ in range(3):  # already at its maximum: move the other way
                handle.press("ArrowLeft")
        if readout.count():
            assert readout.inner_text() != before_value, f"{where}: slider {k + 1} did not move ({before_value})"
        # the kernel recomputes and the front end redraws: wait for outputs that differ and then hold still
        deadline, candidate = time.monotonic() + REDRAW_TIMEOUT_S, None
        while True:
            now = _outputs_without_sliders(locator)
            if now != before and now == candidate:
                break
            candidate = now if now != before else None
            if time.monotonic() > deadline:
                pytest.fail(f"{where}: moving slider {k + 1} ({before_value} -> {readout.inner_text()}) did not "
                            f"change its output within {REDRAW_TIMEOUT_S} s")
            page.wait_for_timeout(500)
        if "data:image" in before:
            assert "data:image" in now, f"{where}: after moving slider {k + 1} the figure is gone"
        stderr = locator.locator('[data-mime-type="application/vnd.jupyter.stderr"]')
        raised = [t for t in stderr.all_inner_texts() if "Traceback" in t]
        assert not raised, f"{where}: moving slider {k + 1} raised: {raised[0][-500:]}"
        locator.screenshot(path=str(SCREENSHOTS / f"{stem}-cell{index + 1}-slider{k + 1}-after.png"))
