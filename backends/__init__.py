"""Backend registry: turns a name into a Backend (numpy, numba or cupy).

Selection order: the ``name`` argument, else the GRADGAP_BACKEND environment variable, else
"numpy". An empty value counts as unset. Importing this package loads neither numba nor cupy:
only selecting their backend does.
"""

from __future__ import annotations

import importlib
import os

from backends.base import (
    Backend,
    BackendError,
    BackendNotInstalledError,
    NoCudaDeviceError,
    UnknownBackendError,
    to_numpy,
)

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "BackendError",
    "BackendNotInstalledError",
    "NoCudaDeviceError",
    "UnknownBackendError",
    "available_backends",
    "get_backend",
    "to_numpy",
]

_BACKEND_MODULES = {
    "numpy": "backends.numpy_backend",
    "numba": "backends.numba_backend",
    "cupy": "backends.cupy_backend",
}
BACKEND_NAMES: tuple[str, ...] = tuple(_BACKEND_MODULES)
_cache: dict[str, Backend] = {}


def get_backend(name: str | Backend | None = None) -> Backend:
    """Return the Backend called ``name`` (else $GRADGAP_BACKEND, else "numpy").

    Raises UnknownBackendError (a ValueError) for a name that is not one of BACKEND_NAMES,
    BackendNotInstalledError (an ImportError) when its library is missing, and
    NoCudaDeviceError when cupy is installed but no CUDA device can be used.
    """
    if isinstance(name, Backend):
        return name
    unset = name is None or name == ""
    chosen = (os.environ.get("GRADGAP_BACKEND") or "numpy") if unset else name
    if not isinstance(chosen, str) or chosen not in _BACKEND_MODULES:
        source = "GRADGAP_BACKEND" if unset else "argument"
        raise UnknownBackendError(
            f"unknown backend {chosen!r} (from the {source}); valid names: {', '.join(BACKEND_NAMES)}"
        )
    if chosen not in _cache:
        _cache[chosen] = importlib.import_module(_BACKEND_MODULES[chosen]).create_backend()
    return _cache[chosen]


def available_backends() -> list[str]:
    """Names of the backends that can be created on this machine, in BACKEND_NAMES order."""
    names = []
    for name in BACKEND_NAMES:
        try:
            get_backend(name)
        except BackendError:
            continue
        names.append(name)
    return names
