import os
import shutil
from pathlib import Path

import pytest

# Tests run in smoke mode unless told otherwise, and never show progress bars.
os.environ.setdefault("LABKIT_MODE", "smoke")
os.environ.setdefault("TQDM_DISABLE", "1")
# Notebooks executed by the tests (nbval, nbgrader, the grader) draw their sliders' figures statically:
# labkit.course.interactive says why. The browser test takes it out again for its JupyterLab.
os.environ.setdefault("LABKIT_HEADLESS", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is available on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def playwright_chromium():
    """(playwright.sync_api, path of a Chromium) for the browser tests, which skip with the reason when
    either is missing. The Chromium is $LABKIT_CHROMIUM, else the first of chromium, chromium-browser,
    google-chrome on the PATH."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (make browser-setup)")
    explicit = os.environ.get("LABKIT_CHROMIUM")
    if explicit:
        chromium = explicit if Path(explicit).is_file() else None
    else:
        chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if chromium is None:
        pytest.skip("no Chromium found (make browser-setup, or set LABKIT_CHROMIUM)")
    return sync_api, chromium
