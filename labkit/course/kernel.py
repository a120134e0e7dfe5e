"""Kernels that run this very Python environment, whatever kernelspecs the machine has installed.

A user-level "python3" kernelspec (``~/.local/share/jupyter/kernels/python3``) may point at another
interpreter without labkit; grading and ``labkit labs`` must not depend on that, so they start
ipykernel with ``sys.executable`` (nbval's ``--nbval-current-env`` does the same).
"""
from __future__ import annotations

import ipykernel.kernelspec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager


class CurrentEnvKernelSpecManager(KernelSpecManager):
    """Answers every kernel name with ipykernel's own spec for the running interpreter."""

    def get_kernel_spec(self, kernel_name):
        return self.kernel_spec_class(resource_dir=ipykernel.kernelspec.RESOURCES,
                                      **ipykernel.kernelspec.get_kernel_dict())


class CurrentEnvKernelManager(AsyncKernelManager):
    """An AsyncKernelManager (what nbclient uses) that starts ipykernel in the current environment."""

    def __init__(self, **kwargs):
        kwargs.setdefault("kernel_spec_manager", CurrentEnvKernelSpecManager())
        super().__init__(**kwargs)
