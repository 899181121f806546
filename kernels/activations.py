"""Activations: the one table of codes for the built-in names, and user-defined elementwise activations.

The built-in activations are named by strings (kernels.ACTIVATIONS). The compiled kernels (the
Numba branches and the CUDA switch) select them by an integer code, and ACTIVATION_CODES is the
only place those codes are defined: both kernel modules read it, so reordering ACTIVATIONS changes
nothing. A code is compiled into the kernels (and Numba caches the compiled branches), so the
numbers are fixed; a new activation gets the next free code.

A user-defined activation is an ``Activation``: a name plus a NumPy forward and derivative, and
optionally Numba and CuPy forms. Every kernel accepts ``activation`` as a built-in name (a str) or
an Activation and tells them apart with ``isinstance(activation, str)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kernels import ACTIVATIONS

Array = Any

ACTIVATION_CODES: dict[str, int] = {"relu": 0, "sigmoid": 1, "tanh": 2, "leaky_relu": 3}
# Built-ins with a kink: piecewise linear, branch ``z > 0`` (x for z > 0, else 0 or alpha * z).
KINKED_ACTIVATIONS = ("relu", "leaky_relu")

if set(ACTIVATION_CODES) != set(ACTIVATIONS):  # pragma: no cover - guards an edit of one table without the other
    raise ImportError(f"ACTIVATION_CODES {sorted(ACTIVATION_CODES)} do not cover ACTIVATIONS {sorted(ACTIVATIONS)}")


@dataclass(frozen=True, eq=False, repr=False)
class Activation:
    """A user-defined elementwise activation f and its derivative f'.

    forward, derivative: NumPy forms, f(x) and f'(x) for a float array x of any shape; the result
        is taken in x's shape and dtype. Required: every backend can fall back to them (Numba
        calls them on its host arrays).
    numba_forward, numba_derivative: optional Numba-jitted scalar functions (float -> float),
        e.g. ``numba.njit(lambda x: math.log1p(math.exp(x)))``; the Numba kernels loop over them
        in compiled code. Without them Numba uses the NumPy forms.
    cupy_forward, cupy_derivative: optional callables on CuPy arrays (a ``cupy.ElementwiseKernel``
        taking x qualifies); without them CuPy calls the NumPy forms with the CuPy array, which
        works when they use only ufuncs and functions CuPy dispatches (``np.exp``, ``np.where``...).

    Instances compare and hash by identity. A user-defined activation has no known kinks: the
    gradient check attributes kinks only for the built-in relu and leaky_relu.
    """

    name: str
    forward: Callable[[Array], Array]
    derivative: Callable[[Array], Array]
    numba_forward: Callable[[float], float] | None = None
    numba_derivative: Callable[[float], float] | None = None
    cupy_forward: Callable[[Array], Array] | None = None
    cupy_derivative: Callable[[Array], Array] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Activation name must be a non-empty str; got {self.name!r}")
        for field in ("forward", "derivative"):
            if not callable(getattr(self, field)):
                raise TypeError(f"Activation {self.name!r}: {field} must be callable; got {getattr(self, field)!r}")
        for field in ("numba_forward", "numba_derivative", "cupy_forward", "cupy_derivative"):
            value = getattr(self, field)
            if value is not None and not callable(value):
                raise TypeError(f"Activation {self.name!r}: {field} must be callable or None; got {value!r}")
        if (self.numba_forward is None) != (self.numba_derivative is None):
            raise ValueError(f"Activation {self.name!r}: give both numba_forward and numba_derivative, or neither")
        if (self.cupy_forward is None) != (self.cupy_derivative is None):
            raise ValueError(f"Activation {self.name!r}: give both cupy_forward and cupy_derivative, or neither")

    def __repr__(self) -> str:
        return f"Activation({self.name!r})"


def activation_name(activation: str | Activation) -> str:
    """The display name of a built-in name or an Activation."""
    return activation if isinstance(activation, str) else activation.name
