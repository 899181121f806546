"""Numba-JIT backend: numpy arrays, kernels compiled for the CPU (parallel where it pays)."""

import numpy as np

from backends.base import Backend, BackendNotInstalledError


def create_backend() -> Backend:
    try:
        import numba  # noqa: F401
        import scipy.linalg  # noqa: F401  (np.dot inside njit needs SciPy's BLAS)
        import threadpoolctl  # noqa: F401
    except ImportError as err:
        raise BackendNotInstalledError(
            f"backend 'numba' needs numba, scipy and threadpoolctl ({err}): pip install 'gradgap[numba]'"
        ) from err
    from kernels import numba_kernels

    return Backend(name="numba", xp=np, kernels=numba_kernels)
