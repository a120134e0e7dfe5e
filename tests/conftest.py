import os

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
