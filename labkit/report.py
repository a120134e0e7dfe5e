"""``record`` and ``claim`` for the notebooks; the module lives in :mod:`labkit.course.report`."""
from .course.report import claim, entries, read_report_file, record

__all__ = ["claim", "entries", "read_report_file", "record"]
