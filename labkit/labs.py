"""The ``labkit labs`` runner; the module lives in :mod:`labkit.course.labs`."""
from .course.labs import labs_cli, report_markdown, run_labs, run_notebook

__all__ = ["labs_cli", "report_markdown", "run_labs", "run_notebook"]
