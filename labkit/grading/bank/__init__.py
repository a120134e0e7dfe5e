"""Question banks: one module per topic (welcome.py, ensemble.py, merge.py, moe.py, ...).

Each module declares its questions with ``labkit.grading.register(Question(...))`` at import time.
``labkit.grading`` imports every module here on first use (``load_banks``).
"""
