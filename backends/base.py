"""The Backend object and the errors raised when one cannot be created."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

Array = Any  # numpy.ndarray or cupy.ndarray


class BackendError(Exception):
    """Base class of every error about choosing or creating a backend."""


class UnknownBackendError(BackendError, ValueError):
    """The name is not one of the known backends."""


class BackendNotInstalledError(BackendError, ImportError):
    """The backend is known but its library is not installed (the message names the pip extra)."""


class NoCudaDeviceError(BackendError, RuntimeError):
    """cupy is installed but no usable CUDA device was found."""


def to_numpy(a: Array) -> np.ndarray:
    """A host numpy array for ``a`` (numpy or cupy array, or anything numpy accepts).

    cupy arrays are recognised through sys.modules, so this never imports cupy.
    """
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(a, cupy.ndarray):
        return cupy.asnumpy(a)
    return np.asarray(a)


@dataclass(frozen=True)
class Backend:
    """A compute backend: ``name``, its array module ``xp`` and its ``kernels`` module.

    ``kernels`` defines every name in kernels.KERNEL_NAMES with the same contract.
    """

    name: str
    xp: ModuleType
    kernels: ModuleType
    _sync: Any = field(default=None, repr=False, compare=False)

    def asarray(self, a: Array, dtype: Any = None) -> Array:
        """``a`` as an array of this backend (copied to the device where needed)."""
        return self.xp.asarray(a, dtype=dtype)

    def to_numpy(self, a: Array) -> np.ndarray:
        """``a`` as a host numpy array."""
        return to_numpy(a)

    def synchronize(self) -> None:
        """Wait until the device has finished all queued work (a no-op on the CPU)."""
        if self._sync is not None:
            self._sync()

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"
