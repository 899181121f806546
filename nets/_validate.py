"""Input checks done once at the public boundary: what was wrong, and what was expected."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from backends import Backend, to_numpy

Array = Any
FLOAT_DTYPES = ("float32", "float64")
_FLOATS = (np.dtype("float32"), np.dtype("float64"))


def check_dtype(dtype: Any) -> np.dtype:
    """numpy dtype for float32/float64; TypeError for anything else."""
    try:
        resolved = np.dtype(dtype)
    except TypeError as err:
        raise TypeError(f"dtype must be one of {FLOAT_DTYPES}; got {dtype!r}") from err
    if resolved.name not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {FLOAT_DTYPES}; got {resolved.name}")
    return np.dtype(resolved.name)  # native byte order


def check_features(backend: Backend, x: Any, input_size: int, dtype: np.dtype) -> Array:
    """x as a (batch, input_size) array of the backend in ``dtype``, finite, batch >= 1."""
    if not hasattr(x, "dtype"):
        x = np.asarray(x)
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must be float32 or float64; got dtype {x.dtype} (convert with x.astype({dtype.name!r}))")
    if x.dtype != dtype:
        raise TypeError(f"x is {x.dtype} but the net is {dtype.name}; convert with x.astype({dtype.name!r})")
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (batch, {input_size}); got {x.ndim}-D with shape {tuple(x.shape)}")
    if x.shape[1] != input_size:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected (batch, {input_size}) to match the input layer")
    if x.shape[0] == 0:
        raise ValueError(f"x is an empty batch (shape {tuple(x.shape)}); need at least one sample")
    x = backend.asarray(x)
    check_finite(backend, x, "x")
    return x


def check_finite(backend: Backend, a: Array, name: str) -> None:
    """ValueError if ``a`` holds NaN or Inf (one reduction; a full scan only when that is not finite)."""
    flat = a.reshape(-1)
    with np.errstate(over="ignore"):  # squares of finite values can overflow: then the full check decides
        total = float(backend.xp.dot(flat, flat))  # one BLAS pass: NaN and Inf propagate
    if not math.isfinite(total) and not bool(backend.xp.isfinite(a).all()):
        bad = int((~backend.xp.isfinite(a)).sum())
        raise ValueError(f"{name} contains {bad} NaN or Inf value(s); inputs must be finite")


def check_targets(backend: Backend, t: Any, batch: int, n_classes: int) -> Array:
    """Integer labels (batch,) in [0, n_classes) on the backend, from labels or one-hot rows.

    Validated on the host, so no backend ever sees an out-of-range index.
    """
    host = to_numpy(t)
    if host.ndim == 2:
        if host.shape != (batch, n_classes):
            raise ValueError(f"one-hot t has shape {host.shape}; expected ({batch}, {n_classes})")
        if host.dtype == np.bool_ or host.dtype.kind not in "iuf":
            raise TypeError(f"one-hot t must be numeric 0/1; got dtype {host.dtype}")
        hot = host == 1
        if not (((host == 0) | hot).all() and (hot.sum(axis=1) == 1).all()):
            rows = np.flatnonzero(~((((host == 0) | hot).all(axis=1)) & (hot.sum(axis=1) == 1)))
            raise ValueError(f"t is 2-D but not one-hot: rows {rows[:5].tolist()} are not a single 1 among 0s")
        return backend.asarray(hot.argmax(axis=1).astype(np.int64))
    if host.ndim != 1:
        raise ValueError(f"t must be labels (batch,) or one-hot (batch, {n_classes}); got shape {host.shape}")
    if host.dtype == np.bool_ or host.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers in [0, {n_classes}); got dtype {host.dtype}")
    if host.shape[0] != batch:
        raise ValueError(f"t has {host.shape[0]} labels but x has {batch} samples")
    if host.size and (host.min() < 0 or host.max() >= n_classes):
        raise ValueError(
            f"labels must be integers in [0, {n_classes}); got min {host.min()}, max {host.max()}, dtype {host.dtype}"
        )
    return backend.asarray(host.astype(np.int64, copy=False))


def check_step(h: Any) -> float:
    """The finite-difference step: a finite float > 0."""
    if isinstance(h, (str, bytes, bool)):
        raise TypeError(f"h must be a positive finite number; got {h!r}")
    try:
        step = float(h)
    except (TypeError, ValueError) as err:
        raise TypeError(f"h must be a positive finite number; got {h!r}") from err
    if not math.isfinite(step) or step <= 0:
        raise ValueError(f"h must be a positive finite number; got {h!r}")
    return step


def check_sizes(sizes: Any) -> list[int]:
    """Layer sizes as a list of positive ints; ValueError naming them otherwise."""
    message = f"layer sizes must be positive integers; got {sizes}"
    checked = []
    for n in sizes:
        if isinstance(n, (bool, str, bytes)):
            raise ValueError(message)
        try:
            as_int = int(n)
        except (TypeError, ValueError, OverflowError) as err:
            raise ValueError(message) from err
        if as_int != n or as_int < 1:
            raise ValueError(message)
        checked.append(as_int)
    return checked


def check_nonnegative(value: Any, name: str) -> float:
    """A finite float >= 0 (weight decay and the like)."""
    if isinstance(value, (str, bytes, bool)) or value is None:
        raise TypeError(f"{name} must be a number >= 0; got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a number >= 0; got {value!r}") from err
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"{name} must be >= 0; got {value!r}")
    return number


def check_choice(value: Any, valid: tuple[str, ...], what: str) -> str:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
    return value
