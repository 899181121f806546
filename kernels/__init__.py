"""Pure compute kernels, one module per backend, all with the same contract.

Kernels receive arrays already on the right device and in the right dtype and check nothing:
validation happens once, in nets/. This package imports nothing of the rest of the project.
kernels/xp_kernels.py holds the kernels written once against an array module xp (numpy or cupy);
numpy_kernels is that module bound to NumPy, numba_kernels and cupy_kernels replace what they fuse.

Contract (every backend module defines each name in KERNEL_NAMES):

    affine_forward(x, W, b) -> out                          x (B, I), W (I, O), b (O,) -> (B, O)
    affine_backward(dout, x, W, need_dx=True) -> (dx, dW, db)      dx is None when not needed
    activation_forward(activation, x, alpha=LEAKY_SLOPE) -> y       activation in ACTIVATIONS (or an
                                                            Activation), y: x's shape and dtype
    activation_backward(activation, dout, x, y, alpha=LEAKY_SLOPE) -> dx
    softmax(scores) -> probs                                (B, C), rows sum to 1, stable for +-1e3
    softmax_cross_entropy(scores, target) -> (loss, probs)  target: labels (B,) int or one-hot (B, C);
                                                            loss: mean over the batch (0-d array)
    softmax_cross_entropy_backward(probs, target, dout=1.0) -> dscores = dout * (probs - onehot) / B
    network_gradient(weights, biases, x, labels, activation, alpha) -> (loss, dWs, dbs)
                                                            fused backprop of the whole stack (labels (B,))
    numerical_gradient_batched(problem, x, labels, progress=None, kinks=None, select=None) -> (dWs, dbs)
    numerical_gradient_incremental(problem, x, labels, progress=None, kinks=None, select=None) -> (dWs, dbs)
    numerical_gradient_series(problem, x, labels, progress=None, kinks=None, select=None) -> (dWs, dbs)
                                                            docs/series.md

The numerical-gradient kernels take the net as a GradientProblem (float64 weights and biases, the
activation, alpha, the weight-decay coefficient and the step h), x float64 (B, I) and integer
labels (B,); the loss is the mean softmax cross-entropy plus 0.5 * weight_decay * sum(W ** 2) over
every layer. They return float64 central differences (f(p + h) - f(p - h)) / 2h for every
parameter and never modify their inputs. ``progress`` is None or a callable taking the number of
parameters just finished. ``activation`` is a built-in name or a kernels.activations.Activation
(series then evaluates directly, like incremental).

Part of the parameters (``select``): None (every parameter: lists dWs, dbs), or (layer, start, stop)
with layer 0-based: only W_layer[:, start:stop] and b_layer[start:stop] are computed, returned as
the pair (dW (I, stop - start), db (stop - start,)). Each is that slice of the full call, bit for
bit (see each method's docstring for what it computes to get there); progress counts the selected
parameters, kinks gets the selected entries' rows (indexed in the whole parameter) under that layer's
two names only.

Kink diagnostics (incremental and series; batched takes kinks=None only): ``kinks`` is None or a
dict that the kernel fills with kinks["W1"], kinks["b1"], ..., kinks["WL"], kinks["bL"], one int64
array (n, 4) per parameter (on the backend's device), one row per parameter entry whose +h or -h
perturbation moves some relu/leaky_relu pre-activation across the branch point (the branch is
``z > 0``) for some sample:

    column 0: flat index of the entry in that parameter (row-major, like W.reshape(-1))
    column 1: a sample b whose pass crosses (the lowest such b)
    column 2: the hidden layer m of the crossing unit, 1-based: z_m = a_(m-1) @ W_m + b_m
    column 3: the unit index within z_m (the first crossing met along the pass)

Rows are sorted by entry. Smooth activations (sigmoid, tanh, user-defined) give empty (0, 4)
arrays, and so does the output layer. Finding them costs no extra pass: incremental compares the
pre-activations it recomputes with the base pass; series proves every other (sample, input, unit)
triple stays inside its kink radius and compares those it evaluates directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

KERNEL_NAMES = (
    "affine_forward",
    "affine_backward",
    "activation_forward",
    "activation_backward",
    "softmax",
    "softmax_cross_entropy",
    "softmax_cross_entropy_backward",
    "network_gradient",
    "numerical_gradient_batched",
    "numerical_gradient_incremental",
    "numerical_gradient_series",
)

ACTIVATIONS = ("relu", "sigmoid", "tanh", "leaky_relu")
LEAKY_SLOPE = 0.01


@dataclass(frozen=True, eq=False)
class GradientProblem:
    """The net a numerical-gradient kernel differentiates, in the kernel's arrays.

    weights, biases: float64 W_m (I_m, O_m) and b_m (O_m,) on the backend's device, layer 1 first
        (kept as tuples; the arrays themselves are never written).
    activation: a name in ACTIVATIONS or a kernels.activations.Activation; alpha: the leaky_relu slope.
    weight_decay: lambda of the 0.5 * lambda * sum(W ** 2) term; h: the step of the central difference.
    """

    weights: Sequence[Any]
    biases: Sequence[Any]
    activation: Any
    alpha: float
    weight_decay: float
    h: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", tuple(self.weights))
        object.__setattr__(self, "biases", tuple(self.biases))
        if len(self.weights) != len(self.biases):
            raise ValueError(f"{len(self.weights)} weight matrices but {len(self.biases)} bias vectors")

    @property
    def n_layers(self) -> int:
        return len(self.weights)

    def __repr__(self) -> str:
        shapes = ", ".join("x".join(str(n) for n in W.shape) for W in self.weights)
        return (
            f"GradientProblem(weights [{shapes}], activation={self.activation!r}, alpha={self.alpha}, "
            f"weight_decay={self.weight_decay}, h={self.h})"
        )
