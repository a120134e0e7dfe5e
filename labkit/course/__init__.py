"""The course machinery around the labs: building the notebooks from their sources (``build``),
running them headless into a report (``labs``, ``report``), kernels in the current environment
(``kernel``) and the nbval plugin the notebook tests use (``nbval_plugin``).

The repository's URL is one setting, ``[project.urls] Repository`` in pyproject.toml: every Colab
badge, the install cell and the student release take it from :func:`repo_url`.
"""
from __future__ import annotations

from pathlib import Path

_PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def repo_url() -> str:
    """The kit's git repository (``[project.urls] Repository``), e.g. "https://github.com/OWNER/labkit".

    Read from the checkout's pyproject.toml when there is one (so an edit takes effect without a
    reinstall), else from the installed package's metadata.
    """
    urls = {}
    try:
        import tomllib  # Python >= 3.11
    except ImportError:
        tomllib = None
    if tomllib is not None and _PYPROJECT.is_file():
        urls = tomllib.loads(_PYPROJECT.read_text(encoding="utf-8")).get("project", {}).get("urls", {})
    else:
        from importlib.metadata import PackageNotFoundError, metadata

        try:
            for entry in metadata("labkit").get_all("Project-URL") or []:
                label, _, url = entry.partition(",")
                urls[label.strip()] = url.strip()
        except PackageNotFoundError:
            pass
    url = urls.get("Repository")
    if not url:
        raise RuntimeError(f"no repository URL: set [project.urls] Repository in {_PYPROJECT}")
    return url.rstrip("/")


def colab_url(notebook: str, branch: str = "main") -> str:
    """The Colab link that opens ``notebooks/<notebook>.ipynb`` of the repository (GitHub only)."""
    prefix = "https://github.com/"
    url = repo_url()
    if not url.startswith(prefix):
        raise ValueError(f"Colab opens notebooks from GitHub only; the repository URL is {url}")
    return f"https://colab.research.google.com/github/{url[len(prefix):]}/blob/{branch}/notebooks/{notebook}.ipynb"
