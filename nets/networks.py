"""TwoLayerNet and MultiLayerNet: affine/activation stacks ending in softmax + cross-entropy."""

from __future__ import annotations

from typing import Any

import numpy as np

from backends import Backend, get_backend
from kernels import ACTIVATIONS, LEAKY_SLOPE
from nets import _validate as v
from nets.layers import ACTIVATION_LAYERS, Affine, SoftmaxWithLoss

Array = Any
NUMERICAL_METHODS = ("naive", "batched", "incremental")


class _FeedForwardNet:
    """Shared machinery: parameters W1, b1, ..., WL, bL and the layer stack that uses them."""

    def __init__(
        self,
        sizes: list[int],
        activation: str,
        init_scales: list[float],
        weight_decay_lambda: float,
        seed: int | None,
        backend: str | Backend | None,
        dtype: Any,
    ) -> None:
        self.backend = get_backend(backend)
        self.dtype = v.check_dtype(dtype)
        self.activation = v.check_choice(activation, ACTIVATIONS, "activation")
        self.sizes = v.check_sizes(sizes)
        self.weight_decay_lambda = v.check_nonnegative(weight_decay_lambda, "weight_decay_lambda")
        self.alpha = LEAKY_SLOPE
        rng = np.random.default_rng(seed)  # drawn on the host: the same numbers on every backend
        self.params: dict[str, Array] = {}
        for layer, (n_in, n_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:], strict=True), start=1):
            weights = init_scales[layer - 1] * rng.standard_normal((n_in, n_out))
            self.params[f"W{layer}"] = self.backend.asarray(weights, dtype=self.dtype)
            self.params[f"b{layer}"] = self.backend.asarray(np.zeros(n_out), dtype=self.dtype)
        self._build_layers()

    @property
    def n_layers(self) -> int:
        return len(self.sizes) - 1

    @property
    def input_size(self) -> int:
        return self.sizes[0]

    @property
    def output_size(self) -> int:
        return self.sizes[-1]

    @property
    def n_params(self) -> int:
        return sum(int(p.size) for p in self.params.values())

    def _build_layers(self) -> None:
        self.layers = []
        for layer in range(1, self.n_layers + 1):
            self.layers.append(
                Affine(self.params[f"W{layer}"], self.params[f"b{layer}"], self.backend, need_dx=layer > 1)
            )
            if layer < self.n_layers:
                self.layers.append(ACTIVATION_LAYERS[self.activation](self.backend, self.alpha))
        self.last_layer = SoftmaxWithLoss(self.backend)

    def _check_params(self) -> None:
        """The layers must still use the arrays in params (replacing a dict entry rebinds them)."""
        for layer in range(1, self.n_layers + 1):
            affine = self.layers[2 * (layer - 1)]
            if affine.W is not self.params[f"W{layer}"] or affine.b is not self.params[f"b{layer}"]:
                self._build_layers()
                return

    def _inputs(self, x: Any, t: Any) -> tuple[Array, Array]:
        x = v.check_features(self.backend, x, self.input_size, self.dtype)
        return x, v.check_targets(self.backend, t, x.shape[0], self.output_size)

    def _check_params_finite(self) -> None:
        for name, p in self.params.items():
            v.check_finite(self.backend, p, f"params[{name!r}]")

    def _scores(self, x: Array) -> Array:
        self._check_params()
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def _weight_decay(self) -> float:
        if not self.weight_decay_lambda:
            return 0.0
        xp = self.backend.xp
        total = sum(float(xp.sum(self.params[f"W{m}"].astype(xp.float64) ** 2)) for m in range(1, self.n_layers + 1))
        return 0.5 * self.weight_decay_lambda * total

    def predict(self, x: Any) -> Array:
        """Scores (batch, output_size) before the softmax, on the net's backend."""
        return self._scores(v.check_features(self.backend, x, self.input_size, self.dtype))

    def loss(self, x: Any, t: Any) -> float:
        """Mean cross-entropy (plus 0.5 * weight_decay_lambda * sum W**2). t: labels or one-hot."""
        x, labels = self._inputs(x, t)
        return float(self.last_layer.forward(self._scores(x), labels)) + self._weight_decay()

    def accuracy(self, x: Any, t: Any) -> float:
        """Fraction of samples whose highest score is the label."""
        x, labels = self._inputs(x, t)
        return float((self._scores(x).argmax(axis=1) == labels).mean())

    def gradient(self, x: Any, t: Any) -> dict[str, Array]:
        """Backpropagation: {name: dL/dparam}, arrays like params (one fused pass of the backend).

        Non-finite parameters are not checked here (a hot path): they show as NaN in the loss.
        """
        x, labels = self._inputs(x, t)
        n_layers = self.n_layers
        weights = [self.params[f"W{m}"] for m in range(1, n_layers + 1)]
        biases = [self.params[f"b{m}"] for m in range(1, n_layers + 1)]
        _, dWs, dbs = self.backend.kernels.network_gradient(weights, biases, x, labels, self.activation, self.alpha)
        grads = {}
        for m in range(n_layers):
            dW = dWs[m]
            if self.weight_decay_lambda:
                dW += self.weight_decay_lambda * weights[m]
            grads[f"W{m + 1}"], grads[f"b{m + 1}"] = dW, dbs[m]
        return grads

    def numerical_gradient(
        self, x: Any, t: Any, method: str = "naive", h: float = 1e-4, progress: bool = False
    ) -> dict[str, Array]:
        """Central differences (f(p + h) - f(p - h)) / 2h for every parameter, in float64.

        method: "naive" (the textbook loop), "batched" (parallel brute force) or "incremental"
        (recomputes only what each perturbation changes). The parameters are left exactly as
        they were, also when interrupted. progress=True shows a tqdm bar.
        """
        from nets.gradient import network_numerical_gradient

        v.check_choice(method, NUMERICAL_METHODS, "method")
        step = v.check_step(h)
        x, labels = self._inputs(x, t)
        self._check_params_finite()
        return network_numerical_gradient(self, x, labels, method, step, progress)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(sizes={self.sizes}, activation={self.activation!r}, "
            f"backend={self.backend.name!r}, dtype={self.dtype.name!r})"
        )


class TwoLayerNet(_FeedForwardNet):
    """input -> Affine -> activation -> Affine -> softmax; weights weight_init_std * N(0, 1), biases 0."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int,
        activation: str = "sigmoid",
        weight_init_std: float = 0.01,
        seed: int | None = 0,
        backend: str | Backend | None = None,
        dtype: Any = "float64",
    ) -> None:
        scale = _fixed_scale(weight_init_std)
        super().__init__([input_size, hidden_size, output_size], activation, [scale, scale], 0.0, seed, backend, dtype)


class MultiLayerNet(_FeedForwardNet):
    """Any number of hidden layers; weight_init_std "he" (sqrt(2/n_in)), "xavier" (sqrt(1/n_in)) or a float."""

    def __init__(
        self,
        input_size: int,
        hidden_size_list: list[int],
        output_size: int,
        activation: str = "relu",
        weight_init_std: float | str = "he",
        weight_decay_lambda: float = 0.0,
        seed: int | None = 0,
        backend: str | Backend | None = None,
        dtype: Any = "float64",
    ) -> None:
        if isinstance(hidden_size_list, (str, bytes)) or not hasattr(hidden_size_list, "__iter__"):
            raise TypeError(f"hidden_size_list must be a list of layer sizes; got {hidden_size_list!r}")
        sizes = v.check_sizes([input_size, *hidden_size_list, output_size])
        if isinstance(weight_init_std, str):
            rule = v.check_choice(weight_init_std.lower(), ("he", "relu", "xavier", "sigmoid"), "weight_init_std")
            gain = 2.0 if rule in ("he", "relu") else 1.0
            scales = [float(np.sqrt(gain / n_in)) for n_in in sizes[:-1]]
        else:
            scales = [_fixed_scale(weight_init_std)] * (len(sizes) - 1)
        super().__init__(sizes, activation, scales, weight_decay_lambda, seed, backend, dtype)


def _fixed_scale(value: Any) -> float:
    message = f"weight_init_std must be a positive number, 'he' or 'xavier'; got {value!r}"
    if isinstance(value, (str, bytes)):  # a rule name: TwoLayerNet takes numbers only
        raise ValueError(message)
    if isinstance(value, bool) or value is None:
        raise TypeError(message)
    try:
        scale = float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(message) from err
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(message)
    return scale
