"""NumPy kernels: the reference implementation of the kernel contract (see kernels/__init__.py).

Every kernel is the one of kernels.xp_kernels, bound to NumPy's Ops (xp_kernels.generic_ops(numpy)).
"""

from __future__ import annotations

import numpy as np

from kernels import KERNEL_NAMES, xp_kernels

__all__ = list(KERNEL_NAMES)

OPS = xp_kernels.generic_ops(np)

globals().update(xp_kernels.bound(OPS))
