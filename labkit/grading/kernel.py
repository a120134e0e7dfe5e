"""Kernels in the current environment; the module lives in :mod:`labkit.course.kernel`."""
from ..course.kernel import CurrentEnvKernelManager, CurrentEnvKernelSpecManager

__all__ = ["CurrentEnvKernelManager", "CurrentEnvKernelSpecManager"]
