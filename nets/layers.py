"""Layers with forward/backward that dispatch their arithmetic to the net's backend kernels.

Shapes: Affine maps (batch, in) -> (batch, out); activations keep the shape; SoftmaxWithLoss
takes scores (batch, classes) and integer labels (batch,) (nets validate labels beforehand).
"""

from __future__ import annotations

from typing import Any

from backends import Backend
from kernels import LEAKY_SLOPE
from kernels.activations import Activation as ActivationFunction

Array = Any


class Layer:
    """Base class: remembers what backward needs; backward before forward is a RuntimeError."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._ready = False

    def _check_forward_done(self) -> None:
        if not self._ready:
            raise RuntimeError(f"{type(self).__name__}.backward() called before forward()")


class Affine(Layer):
    """y = x @ W + b. W: (in, out), b: (out,). ``need_dx=False`` skips dL/dx (first layer)."""

    def __init__(self, W: Array, b: Array, backend: Backend, need_dx: bool = True) -> None:
        super().__init__(backend)
        self.W, self.b, self.need_dx = W, b, need_dx
        self.dW = self.db = None

    def forward(self, x: Array) -> Array:
        """x: (batch, in) -> (batch, out), in W's dtype."""
        self.x = x
        self._ready = True
        return self.backend.kernels.affine_forward(x, self.W, self.b)

    def backward(self, dout: Array) -> Array | None:
        """dout: (batch, out) -> dL/dx (batch, in), or None when need_dx is False; sets dW, db."""
        self._check_forward_done()
        dx, self.dW, self.db = self.backend.kernels.affine_backward(dout, self.x, self.W, self.need_dx)
        return dx


class Activation(Layer):
    """Elementwise ``activation``: one of kernels.ACTIVATIONS, or a kernels.activations.Activation."""

    activation: str | ActivationFunction = ""

    def __init__(
        self, backend: Backend, alpha: float = LEAKY_SLOPE, activation: str | ActivationFunction | None = None
    ) -> None:
        super().__init__(backend)
        self.alpha = alpha
        if activation is not None:
            self.activation = activation

    def forward(self, x: Array) -> Array:
        """x: any shape -> f(x), same shape and dtype."""
        self.x = x
        self.y = self.backend.kernels.activation_forward(self.activation, x, self.alpha)
        self._ready = True
        return self.y

    def backward(self, dout: Array) -> Array:
        """dL/dy (shape of x) -> dL/dx = dout * f'(x)."""
        self._check_forward_done()
        return self.backend.kernels.activation_backward(self.activation, dout, self.x, self.y, self.alpha)


class Relu(Activation):
    activation = "relu"


class Sigmoid(Activation):
    activation = "sigmoid"


class Tanh(Activation):
    activation = "tanh"


class LeakyRelu(Activation):
    activation = "leaky_relu"


ACTIVATION_LAYERS = {cls.activation: cls for cls in (Relu, Sigmoid, Tanh, LeakyRelu)}


def activation_layer(activation: str | ActivationFunction, backend: Backend, alpha: float = LEAKY_SLOPE) -> Activation:
    """The layer for a built-in activation name (Relu, Sigmoid, ...) or for a user-defined Activation."""
    if isinstance(activation, str):
        return ACTIVATION_LAYERS[activation](backend, alpha)
    return Activation(backend, alpha, activation=activation)


class SoftmaxWithLoss(Layer):
    """Softmax + mean cross-entropy, fused. forward(scores, labels) -> loss (0-d array)."""

    def forward(self, scores: Array, labels: Array) -> Array:
        self.labels = labels
        self.loss, self.probs = self.backend.kernels.softmax_cross_entropy(scores, labels)
        self._ready = True
        return self.loss

    def backward(self, dout: float = 1.0) -> Array:
        """dL/dscores = dout * (probs - onehot) / batch."""
        self._check_forward_done()
        return self.backend.kernels.softmax_cross_entropy_backward(self.probs, self.labels, dout)
