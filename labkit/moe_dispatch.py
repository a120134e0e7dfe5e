"""Compatibility alias: the dispatch backends now live in ``labkit.moe.backends``.

``from labkit import moe_dispatch as md`` keeps working: this module *is* ``labkit.moe.backends``
(one module object, so setting or patching an attribute through either name affects both).
"""
import sys

from .moe import backends as _backends

sys.modules[__name__] = _backends
