"""The reference backend: plain NumPy."""

import numpy as np

from backends.base import Backend


def create_backend() -> Backend:
    from kernels import numpy_kernels

    return Backend(name="numpy", xp=np, kernels=numpy_kernels)
