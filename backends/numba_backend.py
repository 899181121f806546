"""Numba-JIT backend: numpy arrays, kernels compiled for the CPU (parallel where it pays)."""

import numpy as np

from backends.base import Backend, BackendNotInstalledError


def create_backend() -> Backend:
    try:
        import numba  # noqa: F401
        import threadpoolctl  # noqa: F401
    except ImportError as err:
        raise BackendNotInstalledError(
            f"backend 'numba' needs numba and threadpoolctl ({err}): pip install 'gradgap[numba]'"
        ) from err
    from kernels import numba_kernels

    return Backend(name="numba", xp=np, kernels=numba_kernels)
