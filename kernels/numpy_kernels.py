"""NumPy kernels: the reference implementation of the kernel contract (see kernels/__init__.py)."""

from __future__ import annotations

from functools import partial

import numpy as np

from kernels import LEAKY_SLOPE
from kernels import _generic as g

_OPS = g.Ops(
    xp=np,
    activation=partial(g.activation_forward, np),
    set_losses=partial(g.set_losses, np),
    activation_with_derivative=partial(g.activation_with_derivative, np),
    softmax_cross_entropy_gradient=partial(g.softmax_cross_entropy_gradient, np),
)


def affine_forward(x, W, b):
    out = x @ W
    out += b
    return out


def affine_backward(dout, x, W, need_dx=True):
    dx = dout @ W.T if need_dx else None
    return dx, x.T @ dout, dout.sum(axis=0)


def activation_forward(kind, x, alpha=LEAKY_SLOPE):
    return g.activation_forward(np, kind, x, alpha)


def activation_backward(kind, dout, x, y, alpha=LEAKY_SLOPE):
    return g.activation_backward(np, kind, dout, x, y, alpha)


def softmax(scores):
    _, e, total = g.log_softmax_parts(np, scores)
    return e / total


def softmax_cross_entropy(scores, target):
    return g.softmax_cross_entropy(np, scores, target)


def softmax_cross_entropy_backward(probs, target, dout=1.0):
    return g.softmax_cross_entropy_backward(np, probs, target, dout)


def network_gradient(weights, biases, x, labels, activation, alpha=LEAKY_SLOPE):
    return g.network_gradient(np, _OPS, weights, biases, x, labels, activation, alpha)


def numerical_gradient_batched(weights, biases, x, labels, activation, alpha, weight_decay, h, progress=None):
    return g.numerical_gradient_batched(_OPS, weights, biases, x, labels, activation, alpha, weight_decay, h, progress)


def numerical_gradient_incremental(
    weights, biases, x, labels, activation, alpha, weight_decay, h, progress=None, kinks=None
):
    return g.numerical_gradient_incremental(
        _OPS, weights, biases, x, labels, activation, alpha, weight_decay, h, progress, kinks=kinks
    )


def numerical_gradient_series(
    weights, biases, x, labels, activation, alpha, weight_decay, h, progress=None, kinks=None
):
    return g.numerical_gradient_series(
        _OPS, weights, biases, x, labels, activation, alpha, weight_decay, h, progress, kinks=kinks
    )
