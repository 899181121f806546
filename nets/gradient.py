"""Numerical gradients: the textbook function, the three methods for nets, and gradient_check."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from nets import _validate as v

if TYPE_CHECKING:
    from nets.networks import _FeedForwardNet

Array = Any
_PROGRESS_EVERY = 256


def numerical_gradient(
    f: Callable[[Array], Any], x: Array, h: float = 1e-4, *, progress: Callable[[int], None] | None = None
) -> Array:
    """Central differences of the scalar function f at x, textbook semantics.

    Each element of x (numpy or cupy array, any shape) is moved to x + h and x - h in place,
    f(x) is called with the perturbed array, and the element is put back, also when f raises
    or is interrupted. Returns float64 (f(x + h) - f(x - h)) / 2h, shaped like x.
    ``progress``, if given, is called with the number of elements finished, every 256 elements.
    """
    step = v.check_step(h)
    if not hasattr(x, "dtype") or x.dtype.name not in v.FLOAT_DTYPES:
        raise TypeError(
            f"x must be a floating-point array; got {type(x).__name__} with dtype {getattr(x, 'dtype', None)}"
        )
    xp = _array_module(x)
    grad = xp.zeros(x.shape, dtype=xp.float64)
    for count, idx in enumerate(np.ndindex(*x.shape), start=1):
        original = x[idx].copy()
        try:
            x[idx] = original + step
            loss_plus = float(f(x))
            x[idx] = original - step
            loss_minus = float(f(x))
        finally:
            x[idx] = original
        grad[idx] = (loss_plus - loss_minus) / (2 * step)
        if progress is not None and (count % _PROGRESS_EVERY == 0 or count == x.size):
            progress(count % _PROGRESS_EVERY or _PROGRESS_EVERY)
    return grad


def _array_module(a: Array):
    module = type(a).__module__.split(".")[0]
    if module == "cupy":
        import cupy

        return cupy
    return np


def gradient_check(net: _FeedForwardNet, x: Any, t: Any, method: str = "naive", h: float = 1e-4) -> dict[str, float]:
    """{param: mean |backprop - numerical|}, as the textbook's gradient check prints it."""
    numeric = net.numerical_gradient(x, t, method=method, h=h)
    backprop = net.gradient(x, t)
    to_numpy = net.backend.to_numpy
    return {
        name: float(np.mean(np.abs(to_numpy(backprop[name]).astype(np.float64) - to_numpy(numeric[name]))))
        for name in net.params
    }


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int, desc: str) -> Iterator[Callable[[int], None] | None]:
    if not enabled:
        yield None
        return
    try:
        from tqdm.auto import tqdm
    except ImportError as err:
        raise ImportError("progress=True needs tqdm: pip install 'gradgap[bench]' (or pip install tqdm)") from err
    with tqdm(total=total, desc=desc, unit="param", unit_scale=True) as bar:
        yield bar.update


def network_numerical_gradient(
    net: _FeedForwardNet, x: Array, labels: Array, method: str, h: float, progress: bool = False
) -> dict[str, Array]:
    """Dispatch of net.numerical_gradient (inputs already validated): float64 results on the backend."""
    xp = net.backend.xp
    n_layers = net.n_layers
    x64 = x.astype(xp.float64, copy=False)
    with _progress_bar(progress, net.n_params, f"{method} numerical gradient ({net.backend.name})") as update:
        if method == "naive":
            return _naive(net, x64, labels, h, update)
        weights = [net.params[f"W{m}"].astype(xp.float64, copy=False) for m in range(1, n_layers + 1)]
        biases = [net.params[f"b{m}"].astype(xp.float64, copy=False) for m in range(1, n_layers + 1)]
        kernel = getattr(net.backend.kernels, f"numerical_gradient_{method}")
        dWs, dbs = kernel(weights, biases, x64, labels, net.activation, net.alpha, net.weight_decay_lambda, h, update)
    grads = {}
    for m in range(n_layers):
        grads[f"W{m + 1}"], grads[f"b{m + 1}"] = dWs[m], dbs[m]
    return grads


def _naive(net: _FeedForwardNet, x: Array, labels: Array, h: float, update) -> dict[str, Array]:
    """The textbook loop: two full forward passes per parameter, each element perturbed in place.

    The loop moves elements of float64 copies of the parameters, so the net's own arrays are
    never written (not even by an interrupt between a move and its undo), and a float32 net is
    differenced in float64, where h = 1e-4 is not lost to rounding.
    """
    be = net.backend
    kernels, xp = be.kernels, be.xp
    names = list(net.params)
    params64 = {name: net.params[name].astype(xp.float64, copy=True) for name in names}
    n_layers = net.n_layers
    decay = net.weight_decay_lambda

    def loss(_: Array) -> float:
        z = x
        for m in range(1, n_layers + 1):
            z = kernels.affine_forward(z, params64[f"W{m}"], params64[f"b{m}"])
            if m < n_layers:
                z = kernels.activation_forward(net.activation, z, net.alpha)
        value = float(kernels.softmax_cross_entropy(z, labels)[0])
        if decay:
            value += 0.5 * decay * sum(float(xp.sum(params64[f"W{m}"] ** 2)) for m in range(1, n_layers + 1))
        return value

    grads = {}
    for name in names:
        grads[name] = numerical_gradient(loss, params64[name], h, progress=update)
    return grads
