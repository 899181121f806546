"""TwoLayerNet and MultiLayerNet: affine/activation stacks ending in softmax + cross-entropy."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np

from backends import Backend, get_backend
from kernels import ACTIVATIONS, LEAKY_SLOPE, GradientProblem
from kernels.activations import KINKED_ACTIVATIONS, Activation
from nets import _validate as validate
from nets.gradient import numerical_gradient as _elementwise_differences
from nets.layers import Affine, SoftmaxWithLoss, activation_layer
from nets.progress import Progress

Array = Any
NUMERICAL_METHODS = ("naive", "batched", "incremental", "series")


class _FeedForwardNet:
    """Shared machinery: parameters W1, b1, ..., WL, bL and the layer stack that uses them."""

    def __init__(
        self,
        sizes: list[int],
        activation: str | Activation,
        init_scales: list[float],
        weight_decay_lambda: float,
        seed: int | None,
        backend: str | Backend | None,
        dtype: Any,
    ) -> None:
        self.backend = get_backend(backend)
        self.dtype = validate.check_dtype(dtype)
        self.sizes = validate.check_sizes(sizes)
        self.activation = _check_activation(activation, self.backend, self.dtype)
        self.weight_decay_lambda = validate.check_nonnegative(weight_decay_lambda, "weight_decay_lambda")
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
                self.layers.append(activation_layer(self.activation, self.backend, self.alpha))
        self.last_layer = SoftmaxWithLoss(self.backend)

    def _check_params(self) -> None:
        """The layers must still use the arrays in params (replacing a dict entry rebinds them)."""
        for layer in range(1, self.n_layers + 1):
            affine = self.layers[2 * (layer - 1)]
            if affine.W is not self.params[f"W{layer}"] or affine.b is not self.params[f"b{layer}"]:
                self._build_layers()
                return

    def _inputs(self, x: Any, t: Any) -> tuple[Array, Array]:
        x = validate.check_features(self.backend, x, self.input_size, self.dtype)
        return x, validate.check_targets(self.backend, t, x.shape[0], self.output_size)

    def checked_inputs(self, x: Any, t: Any) -> tuple[Array, Array]:
        """The checks numerical_gradient does, as one call: (x (batch, input_size) in the net's dtype,
        labels (batch,) int64) on the backend; ValueError/TypeError for bad x or t or non-finite parameters."""
        x, labels = self._inputs(x, t)
        self._check_params_finite()
        return x, labels

    def _check_params_finite(self) -> None:
        for name, p in self.params.items():
            validate.check_finite(self.backend, p, f"params[{name!r}]")

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
        return self._scores(validate.check_features(self.backend, x, self.input_size, self.dtype))

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
        self,
        x: Any,
        t: Any,
        method: str = "naive",
        h: float = 1e-4,
        progress: bool = False,
        entries: dict[str, Any] | None = None,
        kinks: dict[str, np.ndarray] | None = None,
    ) -> dict[str, Array]:
        """Central differences (f(p + h) - f(p - h)) / 2h for every parameter, in float64.

        method: "naive" (the textbook loop), "batched" (parallel brute force), "incremental"
        (recomputes only what each perturbation changes) or "series". The parameters are left
        exactly as they were, also when interrupted. progress=True shows a tqdm bar.
        entries (naive only): {name: iterable of index tuples}; only those elements are
        differenced (the textbook loop over a chosen subset), every other element of the result is 0.
        kinks (naive, incremental, series): a dict to fill with {name: int64 array (n, 4)}, a row
        (flat index into the parameter, sample, hidden layer m (1-based), unit) for each entry whose
        +h or -h move carries a relu/leaky_relu pre-activation z_m across the branch ``z > 0`` for
        some sample (one crossing per entry). The naive loop finds them by comparing each perturbed
        pass's activation pattern with the base pass's; the kernels know them at no extra pass.
        """
        validate.check_choice(method, NUMERICAL_METHODS, "method")
        step = validate.check_step(h)
        if entries is not None:
            if method != "naive":
                raise ValueError(f"entries selects elements for the naive loop only; method is {method!r}")
            unknown = sorted(set(entries) - set(self.params))
            if unknown:
                raise ValueError(f"entries names {unknown}; the parameters are {list(self.params)}")
        if kinks is not None:
            if not isinstance(kinks, dict):
                raise TypeError(f"kinks must be a dict to fill (or None); got {type(kinks).__name__}")
            if method == "batched":
                raise ValueError("method 'batched' does not report kinks; naive, incremental and series do")
        x, labels = self._inputs(x, t)
        self._check_params_finite()
        xp = self.backend.xp
        x64 = x.astype(xp.float64, copy=False)
        if entries is not None:
            entries = {name: list(indices) for name, indices in entries.items()}
        total = self.n_params if entries is None else sum(len(indices) for indices in entries.values())
        desc = f"{method} numerical gradient ({self.backend.name})"
        with Progress(progress, total, desc, unit="param", unit_scale=True) as bar:
            if method == "naive":
                return self._naive_numerical_gradient(x64, labels, step, bar.callback, entries, kinks)
            n_layers = self.n_layers
            weights = [self.params[f"W{m}"].astype(xp.float64, copy=False) for m in range(1, n_layers + 1)]
            biases = [self.params[f"b{m}"].astype(xp.float64, copy=False) for m in range(1, n_layers + 1)]
            problem = GradientProblem(weights, biases, self.activation, self.alpha, self.weight_decay_lambda, step)
            kernel = getattr(self.backend.kernels, f"numerical_gradient_{method}")
            dWs, dbs = kernel(problem, x64, labels, bar.callback, kinks=kinks)
        grads = {}
        for m in range(n_layers):
            grads[f"W{m + 1}"], grads[f"b{m + 1}"] = dWs[m], dbs[m]
        return grads

    def _naive_numerical_gradient(
        self,
        x: Array,
        labels: Array,
        h: float,
        update: Callable[[int], None] | None,
        entries: dict[str, list] | None,
        kinks: dict[str, np.ndarray] | None,
    ) -> dict[str, Array]:
        """The textbook loop: two full forward passes per parameter, each element perturbed in place.

        x: float64 (B, I); labels: int (B,). The loop moves elements of float64 copies of the
        parameters, so the net's own arrays are never written (not even by an interrupt between a
        move and its undo), and a float32 net is differenced in float64, where h = 1e-4 is not lost
        to rounding. With ``kinks`` (a dict), every pass of a relu/leaky_relu net also keeps its
        activation pattern (z_m > 0 per hidden layer), and an entry whose +h or -h pattern differs
        from the base pass's gets a row (flat index, sample, layer, unit).
        """
        kernels, xp = self.backend.kernels, self.backend.xp
        params64 = {name: p.astype(xp.float64, copy=True) for name, p in self.params.items()}
        n_layers, decay = self.n_layers, self.weight_decay_lambda
        track = kinks is not None and isinstance(self.activation, str) and self.activation in KINKED_ACTIVATIONS
        patterns: list[list[Array]] = []  # patterns of the passes since the last entry finished

        # the loop moves elements of these very arrays in place; the lists only save look-ups per pass
        layers = [(params64[f"W{m}"], params64[f"b{m}"]) for m in range(1, n_layers + 1)]
        hidden, (W_out, b_out) = layers[:-1], layers[-1]
        affine, activate = kernels.affine_forward, kernels.activation_forward
        activation, alpha = self.activation, self.alpha

        def loss(_: Array) -> float:
            z, pattern = x, []
            for W, b in hidden:
                z = affine(z, W, b)
                if track:
                    pattern.append(z > 0)
                z = activate(activation, z, alpha)
            value = float(kernels.softmax_cross_entropy(affine(z, W_out, b_out), labels)[0])
            if decay:
                value += 0.5 * decay * sum(float(xp.sum(W**2)) for W, _ in layers)
            if track:
                patterns.append(pattern)
            return value

        grads = {}
        if track:
            loss(None)
            base = patterns.pop()
        for name, P in params64.items():
            chosen = None if entries is None else entries.get(name, [])
            if not track:
                grads[name] = _elementwise_differences(loss, P, h, progress=update, entries=chosen)
                continue
            order = iter(np.ndindex(*P.shape) if chosen is None else [tuple(np.atleast_1d(i)) for i in chosen])
            rows: list[tuple[int, int, int, int]] = []

            def check_entry(order=order, rows=rows, shape=P.shape) -> None:
                """After each pair of passes (the loop visits entries in ``order``): compare patterns."""
                flat = int(np.ravel_multi_index(next(order), shape))
                crossing = _first_crossing(xp, base, patterns[0]) or _first_crossing(xp, base, patterns[1])
                if crossing is not None:
                    rows.append((flat, *crossing))
                patterns.clear()

            grads[name] = _elementwise_differences(_pairwise(loss, check_entry), P, h, progress=update, entries=chosen)
            kinks[name] = np.array(rows, dtype=np.int64).reshape(-1, 4)
        if kinks is not None and not track:
            kinks.update({name: np.zeros((0, 4), dtype=np.int64) for name in params64})
        return grads

    def astype(self, dtype: Any) -> _FeedForwardNet:
        """A twin of this net (same class, activation, backend and weights) whose parameters are in ``dtype``.

        The twin owns its arrays (copies); float32 -> float64 is exact, so its loss is the float64
        evaluation of this net's loss. The gradient check uses it to check a float32 net in float64.
        """
        twin = copy.copy(self)
        twin.dtype = validate.check_dtype(dtype)
        twin.params = {name: p.astype(twin.dtype, copy=True) for name, p in self.params.items()}
        twin._build_layers()
        return twin

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
        sizes = validate.check_sizes([input_size, *hidden_size_list, output_size])
        if isinstance(weight_init_std, str):
            rule = validate.check_choice(
                weight_init_std.lower(), ("he", "relu", "xavier", "sigmoid"), "weight_init_std"
            )
            gain = 2.0 if rule in ("he", "relu") else 1.0
            scales = [float(np.sqrt(gain / n_in)) for n_in in sizes[:-1]]
        else:
            scales = [_fixed_scale(weight_init_std)] * (len(sizes) - 1)
        super().__init__(sizes, activation, scales, weight_decay_lambda, seed, backend, dtype)


def _pairwise(loss: Callable[[Array], float], after_pair: Callable[[], None]) -> Callable[[Array], float]:
    """loss, calling after_pair() after every second call (the +h and -h passes of one entry)."""
    calls = 0

    def counted(p: Array) -> float:
        nonlocal calls
        value = loss(p)
        calls += 1
        if calls % 2 == 0:
            after_pair()
        return value

    return counted


def _first_crossing(xp, base: list[Array], moved: list[Array]) -> tuple[int, int, int] | None:
    """(sample, layer m (1-based), unit) of the first pre-activation whose sign pattern moved, else None."""
    for m, (was, now) in enumerate(zip(base, moved, strict=True), start=1):
        changed = was != now
        if bool(changed.any()):
            sample, unit = (int(i) for i in xp.argwhere(changed)[0])
            return sample, m, unit
    return None


def _check_activation(activation: Any, backend: Backend, dtype: np.dtype) -> str | Activation:
    """A built-in name, or an Activation whose forms give arrays of the input's shape on this backend."""
    if isinstance(activation, Activation):
        probe = backend.asarray(np.linspace(-3.0, 3.0, 8).reshape(2, 4), dtype=dtype)
        for what, call in (
            ("forward", lambda: backend.kernels.activation_forward(activation, probe)),
            ("derivative", lambda: backend.kernels.activation_backward(activation, probe, probe, probe)),
        ):
            try:
                result = call()
            except Exception as err:
                raise TypeError(
                    f"activation {activation.name!r}: its {what} fails on a (2, 4) {dtype.name} array: {err}"
                ) from err
            if tuple(result.shape) != (2, 4):
                raise ValueError(
                    f"activation {activation.name!r}: its {what} must be elementwise (same shape); "
                    f"a (2, 4) input gave shape {tuple(result.shape)}"
                )
        return activation
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}, or a kernels.activations.Activation"
        )
    return activation


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
