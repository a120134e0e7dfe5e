"""The nbval plugin under its old name (``-p labkit.grading.nbval_plugin``); it lives in
:mod:`labkit.course.nbval_plugin`."""
from ..course.nbval_plugin import drop_volatile, pytest_configure

__all__ = ["drop_volatile", "pytest_configure"]
