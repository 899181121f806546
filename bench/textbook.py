"""The baseline: a straightforward layered two-layer net, written the way the textbook does it.

Plain NumPy objects Affine / Sigmoid / SoftmaxWithLoss, one after the other: softmax with the
row maximum subtracted, cross-entropy as -sum(t * log(y + 1e-7)) / N on one-hot targets, backward
(y - t) / N, and every Affine computing dx (the first one too). The numerical gradient is the
textbook loop: each parameter moved by +h and -h in place, a full forward pass each time.
Nothing here is tuned; gradgap's nets are measured against it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

LOG_EPSILON = 1e-7  # the textbook's guard inside log()


class Affine:
    """out = x @ W + b. W: (in, out), b: (out,)."""

    def __init__(self, W: np.ndarray, b: np.ndarray) -> None:
        self.W, self.b = W, b
        self.x = self.dW = self.db = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.x = x
        return x @ self.W + self.b

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """dout: (N, out) -> dx (N, in); sets dW and db."""
        self.dW = self.x.T @ dout
        self.db = dout.sum(axis=0)
        return dout @ self.W.T


class Sigmoid:
    """out = 1 / (1 + exp(-x)), elementwise."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.out = 1.0 / (1.0 + np.exp(-x))
        return self.out

    def backward(self, dout: np.ndarray) -> np.ndarray:
        return dout * (1.0 - self.out) * self.out


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, C) scores, the row maximum subtracted first."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def cross_entropy_error(y: np.ndarray, t: np.ndarray) -> float:
    """Mean cross-entropy of probabilities y (N, C) against one-hot t (N, C)."""
    return float(-np.sum(t * np.log(y + LOG_EPSILON)) / y.shape[0])


class SoftmaxWithLoss:
    """Softmax, then cross-entropy; backward gives (y - t) / N."""

    def forward(self, scores: np.ndarray, t: np.ndarray) -> float:
        self.t = t
        self.y = softmax(scores)
        return cross_entropy_error(self.y, t)

    def backward(self, dout: float = 1.0) -> np.ndarray:
        return (self.y - self.t) * dout / self.t.shape[0]


class TextbookTwoLayerNet:
    """Affine -> Sigmoid -> Affine -> SoftmaxWithLoss on copies of the given float64 params W1, b1, W2, b2."""

    def __init__(self, params: dict[str, np.ndarray]) -> None:
        self.params = {name: np.array(params[name], dtype=np.float64) for name in ("W1", "b1", "W2", "b2")}
        self.layers = [
            Affine(self.params["W1"], self.params["b1"]),
            Sigmoid(),
            Affine(self.params["W2"], self.params["b2"]),
        ]
        self.last_layer = SoftmaxWithLoss()

    def predict(self, x: np.ndarray) -> np.ndarray:
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def loss(self, x: np.ndarray, t: np.ndarray) -> float:
        """x: (N, 784) float64; t: (N, 10) one-hot."""
        return self.last_layer.forward(self.predict(x), t)

    def gradient(self, x: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
        """Backprop through every layer: {"W1", "b1", "W2", "b2"}."""
        self.loss(x, t)
        dout = self.last_layer.backward(1.0)
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        first, second = self.layers[0], self.layers[2]
        return {"W1": first.dW, "b1": first.db, "W2": second.dW, "b2": second.db}

    def numerical_gradient(self, x: np.ndarray, t: np.ndarray, h: float = 1e-4) -> dict[str, np.ndarray]:
        """The textbook loop over every parameter: {"W1", "b1", "W2", "b2"}, float64."""
        return {
            name: central_differences(lambda: self.loss(x, t), p, list(np.ndindex(*p.shape)), h).reshape(p.shape)
            for name, p in self.params.items()
        }

    def numerical_gradient_at(
        self, x: np.ndarray, t: np.ndarray, sample: Sequence[tuple[str, tuple[int, ...]]], h: float = 1e-4
    ) -> np.ndarray:
        """The same loop over the sampled (name, index) parameters only, in their order: float64 (len(sample),)."""
        runs = itertools.groupby(sample, key=lambda item: item[0])
        return np.concatenate(
            [
                central_differences(lambda: self.loss(x, t), self.params[name], [idx for _, idx in run], h)
                for name, run in runs
            ]
        )


def central_differences(
    loss: Callable[[], float], p: np.ndarray, indices: Sequence[tuple[int, ...]], h: float
) -> np.ndarray:
    """(loss(p + h) - loss(p - h)) / 2h for each index of p, moved in place and put back."""
    grad = np.empty(len(indices))
    for k, idx in enumerate(indices):
        original = p[idx]
        p[idx] = original + h
        loss_plus = loss()
        p[idx] = original - h
        loss_minus = loss()
        p[idx] = original
        grad[k] = (loss_plus - loss_minus) / (2 * h)
    return grad
