"""Input checks done once at the public boundary: what was wrong, and what was expected.

Host inputs (numpy arrays, lists) are checked on the host before they are copied to a device.
Inputs that already live on a device (an array of a backend whose xp is not numpy) are checked
there, by reductions whose few result numbers are the only thing copied back. Reading those
numbers waits for the device: an out-of-range label must raise *before* a kernel indexes with it
(the CuPy kernels read ``scores[labels[r]]`` unchecked, so a bad label reads outside the array),
and a check cannot raise before its result exists, so a first look at a device array always
costs one synchronisation. What can be avoided is repeating it: the verdict on a device input
(x, t) is remembered for as long as that very array object lives, so a training step or a
benchmark that passes the same batch to gradient(), loss() and gradient() again synchronises
once, not on every call, and a step does no host round trip of its data. The price, stated
here: writing NaN or a bad label into a device array *in place* after it was validated is not
noticed. Parameters, which optimizers change in place, are never remembered.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import numpy as np

from backends import Backend, to_numpy

Array = Any
FLOAT_DTYPES = ("float32", "float64")
_FLOATS = (np.dtype("float32"), np.dtype("float64"))


class _DeviceVerdicts:
    """Device arrays that passed a check, by identity, for as long as each array lives (weak refs)."""

    def __init__(self) -> None:
        self._passed: dict[int, tuple[weakref.ref, tuple[Any, ...]]] = {}

    def passed(self, a: Array, check: tuple[Any, ...]) -> bool:
        entry = self._passed.get(id(a))
        return entry is not None and entry[0]() is a and entry[1] == check

    def remember(self, a: Array, check: tuple[Any, ...]) -> None:
        key = id(a)

        def forget(ref: weakref.ref, key: int = key) -> None:
            if self._passed.get(key, (None,))[0] is ref:
                del self._passed[key]

        self._passed[key] = (weakref.ref(a, forget), check)


_device_verdicts = _DeviceVerdicts()


def _on_device(backend: Backend, a: Any) -> bool:
    """Whether ``a`` is an array of a device backend (reading its values waits for the device)."""
    return backend.xp is not np and isinstance(a, backend.xp.ndarray)


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
    if _on_device(backend, x):
        if not _device_verdicts.passed(x, ("finite",)):
            check_finite(backend, x, "x")
            _device_verdicts.remember(x, ("finite",))
        return x
    host = np.asarray(x)  # what backend.asarray would make of it on a numpy backend (subclasses dropped)
    check_finite(backend, host, "x")  # on the host, before the copy to the backend
    return backend.asarray(host)


def check_finite(backend: Backend, a: Array, name: str) -> None:
    """ValueError if ``a`` holds NaN or Inf (one reduction; a full scan only when that is not finite).

    ``a`` is checked where it lives: numpy arrays on the host, device arrays on the device.
    """
    xp = backend.xp if _on_device(backend, a) else np
    flat = a.reshape(-1)
    with np.errstate(over="ignore"):  # squares of finite values can overflow: then the full check decides
        total = float(xp.dot(flat, flat))  # one BLAS pass: NaN and Inf propagate
    if not math.isfinite(total) and not bool(xp.isfinite(a).all()):
        bad = int((~xp.isfinite(a)).sum())
        raise ValueError(f"{name} contains {bad} NaN or Inf value(s); inputs must be finite")


def check_targets(backend: Backend, t: Any, batch: int, n_classes: int) -> Array:
    """Integer labels (batch,) int64 in [0, n_classes) on the backend, from labels or one-hot rows (batch, C).

    Validated before any kernel sees them, so no backend ever gets an out-of-range index: host
    input on the host (then copied once), device input on the device (see the module docstring).
    """
    if _on_device(backend, t):
        check = ("targets", batch, n_classes)
        known = _device_verdicts.passed(t, check)
        labels = _checked_labels(backend.xp, t, batch, n_classes, check_values=not known)
        if not known:
            _device_verdicts.remember(t, check)
        return labels
    return backend.asarray(_checked_labels(np, to_numpy(t), batch, n_classes, check_values=True))


def _checked_labels(xp, t: Array, batch: int, n_classes: int, check_values: bool) -> Array:
    """int64 labels (batch,) of xp from labels or one-hot rows, after the checks of check_targets.

    Shape and dtype come from the metadata; values are checked by reductions (on a device, the few
    numbers they give are the only thing read back) unless check_values is False (a device array
    whose verdict is remembered). The values behind a message are fetched only to write it.
    """
    if t.ndim == 2:
        if tuple(t.shape) != (batch, n_classes):
            raise ValueError(f"one-hot t has shape {tuple(t.shape)}; expected ({batch}, {n_classes})")
        if t.dtype == np.bool_ or t.dtype.kind not in "iuf":
            raise TypeError(f"one-hot t must be numeric 0/1; got dtype {t.dtype}")
        hot = t == 1
        if check_values:
            row_ok = ((t == 0) | hot).all(axis=1) & (hot.sum(axis=1) == 1)
            if not bool(row_ok.all()):  # the one value read back
                rows = to_numpy(xp.flatnonzero(~row_ok)[:5])
                raise ValueError(f"t is 2-D but not one-hot: rows {rows.tolist()} are not a single 1 among 0s")
        return hot.argmax(axis=1).astype(np.int64)
    if t.ndim != 1:
        raise ValueError(f"t must be labels (batch,) or one-hot (batch, {n_classes}); got shape {tuple(t.shape)}")
    if t.dtype == np.bool_ or t.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers in [0, {n_classes}); got dtype {t.dtype}")
    if t.shape[0] != batch:
        raise ValueError(f"t has {t.shape[0]} labels but x has {batch} samples")
    if check_values and t.size:
        low, high = to_numpy(xp.stack([t.min(), t.max()])).tolist()  # two numbers read back
        if low < 0 or high >= n_classes:
            raise ValueError(f"labels must be integers in [0, {n_classes}); got min {low}, max {high}, dtype {t.dtype}")
    return t.astype(np.int64, copy=False)


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
