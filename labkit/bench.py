"""The benchmark runner and timing helpers; the module lives in :mod:`labkit.benchmarks`."""
from .benchmarks import (BENCHMARKS, RESULTS_DIR, environment, format_table, peak_memory, run_benchmark, slug,
                         time_fn)

__all__ = ["BENCHMARKS", "RESULTS_DIR", "environment", "format_table", "peak_memory", "run_benchmark", "slug",
           "time_fn"]
