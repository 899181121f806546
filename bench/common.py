"""Shared pieces of the benchmark suite: the seed setting, data, profiles, checks and timing.

Every benchmark checks its result against the NumPy reference, then times the call with
``Backend.synchronize()`` inside the timed function, and records what it measured in
``benchmark.extra_info`` (the keys bench/report.py reads: see ``describe``).
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from backends import Backend, to_numpy

T = TypeVar("T")
Array = Any

REPO = Path(__file__).resolve().parent.parent
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"
MNIST_TRAIN_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")

# The seed setting: one gradient of a 784-50-10 sigmoid net on 100 MNIST images, float64.
SEED_SIZES = (784, 50, 10)
SEED_BATCH = 100
SEED_N_PARAMS = 39_760
SEED_NUMERICAL_S = 45.0  # the seed's measured time for one numerical gradient
SEED_BACKPROP_S = 0.01  # and for one backprop gradient
DEEP_HIDDEN = (100, 100, 100, 100)  # MultiLayerNet(784, [100] * 4, 10), relu, He init
STEP = 1e-4
NUMERICAL_METHODS = ("naive", "batched", "incremental")
GAP_METHODS = ("backprop", *NUMERICAL_METHODS)
LARGEST_BATCH = 10_000

# Checks: numerical gradients of a smooth net match backprop to NUMERICAL_ATOL; two ways of
# computing the same central differences match to the same absolute tolerance; the same
# float64 computation on two backends agrees to FLOAT64_RTOL relative (FLOAT32_RTOL in float32).
NUMERICAL_ATOL = 1e-9
FLOAT64_RTOL = 1e-10
FLOAT32_RTOL = 1e-5
CHECK_SAMPLE = 200  # parameters at which every numerical method is compared with the NumPy naive loop
SMOOTH_ACTIVATIONS = ("sigmoid", "tanh")  # no kinks: central differences agree with backprop


@dataclass(frozen=True)
class Profile:
    """How much to measure. naive_sample: parameters the naive loop is timed on (None: all)."""

    name: str
    budget_s: float  # timed seconds aimed at per benchmark
    min_rounds: int
    max_rounds: int
    min_round_s: float  # fast calls are repeated (iterations) until a round lasts this long
    one_call_when_slow: bool  # slow methods: one timed call, checked right after it (not before)
    naive_sample: int | None
    deep_naive_sample: int
    scaling_naive_sample: int
    batch_sizes: tuple[int, ...]  # scaling sweeps of the numerical methods
    backprop_batch_sizes: tuple[int, ...]  # forward / backprop sweep (cheap: reaches LARGEST_BATCH)
    hidden_sizes: tuple[int, ...]
    depths: tuple[int, ...]
    incremental_depths: tuple[int, ...]
    kernel_dtypes: tuple[str, ...]  # elementary kernels; forward and backprop always run both dtypes

    def plan(self, seconds_per_call: float) -> tuple[int, int]:
        """(rounds, iterations) for a call that takes seconds_per_call."""
        iterations = max(1, math.ceil(self.min_round_s / max(seconds_per_call, 1e-9)))
        rounds = int(self.budget_s / (seconds_per_call * iterations))
        return min(self.max_rounds, max(self.min_rounds, rounds)), iterations


PROFILES = {
    "quick": Profile(
        name="quick",
        budget_s=0.4,
        min_rounds=1,
        max_rounds=25,
        min_round_s=1e-3,
        one_call_when_slow=True,
        naive_sample=400,
        deep_naive_sample=200,
        scaling_naive_sample=100,
        batch_sizes=(1, 10, 100),
        backprop_batch_sizes=(1, 10, 100, 1000, LARGEST_BATCH),
        hidden_sizes=(10, 50, 400),
        depths=(1, 2, 3, 4),
        incremental_depths=(),
        kernel_dtypes=("float64",),
    ),
    "full": Profile(
        name="full",
        budget_s=5.0,
        min_rounds=2,
        max_rounds=200,
        min_round_s=5e-3,
        one_call_when_slow=False,
        naive_sample=None,
        deep_naive_sample=2000,
        scaling_naive_sample=400,
        batch_sizes=(1, 3, 10, 30, 100, 300, 1000, 3000, LARGEST_BATCH),
        backprop_batch_sizes=(1, 3, 10, 30, 100, 300, 1000, 3000, LARGEST_BATCH),
        hidden_sizes=(10, 25, 50, 100, 200, 400),
        depths=(1, 2, 3, 4, 5),
        incremental_depths=(1, 2, 3, 4, 5),
        kernel_dtypes=("float64", "float32"),
    ),
}


# ---------------------------------------------------------------- data


def mnist_dir() -> Path | None:
    """GRADGAP_DATA_DIR, else ../shared/data/mnist, if it holds the training files; else None."""
    env = os.environ.get("GRADGAP_DATA_DIR")
    for candidate in ([Path(env).expanduser()] if env else []) + [SHARED_MNIST]:
        if all((candidate / name).exists() for name in MNIST_TRAIN_FILES):
            return candidate
    return None


@dataclass(frozen=True)
class Batch:
    """Host data: x (n, 784) float64 in [0, 1], t (n,) int64 labels; source "mnist" or "synthetic"."""

    x: np.ndarray
    t: np.ndarray
    source: str

    def first(self, n: int) -> Batch:
        """The first n samples."""
        if n > len(self.t):
            raise ValueError(f"asked for {n} samples; only {len(self.t)} loaded")
        return Batch(self.x[:n], self.t[:n], self.source)

    def on(self, backend: Backend, dtype: str = "float64") -> tuple[Array, Array]:
        """(x in dtype, labels) as arrays of the backend."""
        return backend.asarray(self.x, dtype=dtype), backend.asarray(self.t)


def load_data(n: int) -> Batch:
    """The first n MNIST training images (pixel / 255, float64) and labels, else synthetic data.

    Synthetic data (when the files are not found) has the same shape and sparsity: pixels of a
    central 20x20 box non-zero with probability 0.37 (19% of all pixels, like MNIST), values in
    (0, 1], labels uniform in 0..9, seeded.
    """
    directory = mnist_dir()
    if directory is not None:
        from nets.data import load_mnist

        (images, labels), _ = load_mnist(normalize=False, data_dir=directory)
        return Batch(images[:n].astype(np.float64) / 255.0, labels[:n].astype(np.int64), "mnist")
    rng = np.random.default_rng(0)
    x = np.zeros((n, 28, 28))
    box = (n, 20, 20)
    x[:, 4:24, 4:24] = np.where(rng.random(box) < 0.37, 1.0 - rng.random(box), 0.0)
    return Batch(x.reshape(n, 784), rng.integers(0, 10, n).astype(np.int64), "synthetic")


# ---------------------------------------------------------------- checks


def assert_close(got: Any, want: Any, *, rtol: float = 0.0, atol: float = 0.0, context: str = "") -> None:
    """Arrays (or dicts of arrays) agree: |got - want| <= atol + rtol * |want|; names the worst element."""
    if not isinstance(want, dict):
        got, want = {"value": got}, {"value": want}
    assert set(got) == set(want), f"{context}: keys {sorted(got)} vs {sorted(want)}"
    problems = []
    for name in want:
        a, b = to_numpy(got[name]).astype(np.float64), to_numpy(want[name]).astype(np.float64)
        if a.shape != b.shape:
            problems.append(f"{name}: shape {a.shape}, expected {b.shape}")
        elif not np.allclose(a, b, rtol=rtol, atol=atol):
            i = np.unravel_index(np.argmax(np.abs(a - b) - rtol * np.abs(b)), b.shape)
            problems.append(f"{name}{list(i)}: {a[i]:.10e} vs reference {b[i]:.10e} (|diff| {abs(a[i] - b[i]):.2e})")
    assert not problems, f"{context}: results differ (rtol={rtol}, atol={atol})\n  " + "\n  ".join(problems)


def assert_same_computation(got: Any, want: Any, dtype: str, context: str) -> None:
    """The same computation on another backend: FLOAT64_RTOL (FLOAT32_RTOL) relative to the largest value."""
    rtol = FLOAT64_RTOL if dtype == "float64" else FLOAT32_RTOL
    want_dict = want if isinstance(want, dict) else {"value": want}
    scale = max(float(np.max(np.abs(to_numpy(w)))) for w in want_dict.values())
    assert_close(got, want, rtol=rtol, atol=rtol * scale, context=context)


# ---------------------------------------------------------------- the naive loop on a sample


ParamIndex = tuple[str, tuple[int, ...]]


def sample_parameters(shapes: dict[str, tuple[int, ...]], n: int, seed: int = 0) -> list[ParamIndex]:
    """n parameters drawn at random, spread over every array in proportion to its size (at least one each)."""
    rng = np.random.default_rng(seed)
    total = sum(math.prod(shape) for shape in shapes.values())
    sample: list[ParamIndex] = []
    for name, shape in shapes.items():
        size = math.prod(shape)
        k = min(size, max(1, round(n * size / total)))
        for flat in np.sort(rng.choice(size, k, replace=False)):
            sample.append((name, tuple(int(i) for i in np.unravel_index(flat, shape))))
    return sample


def naive_at(net: Any, x: Array, labels: Array, sample: Sequence[ParamIndex], h: float = STEP) -> np.ndarray:
    """The naive method's textbook loop, over the sampled parameters only: float64 (len(sample),).

    Same work per parameter as net.numerical_gradient(method="naive"): the element is moved to
    p + h and p - h in place, the loss is a full forward pass through the backend's kernels
    each time, and the element is put back. Used to time naive on a sample and scale it.
    """
    if net.weight_decay_lambda:
        raise ValueError("naive_at covers nets without weight decay")
    kernels, xp = net.backend.kernels, net.backend.xp
    params = {name: p.astype(xp.float64, copy=False) for name, p in net.params.items()}
    x = x.astype(xp.float64, copy=False)
    n_layers = net.n_layers

    def loss() -> float:
        z = x
        for m in range(1, n_layers + 1):
            z = kernels.affine_forward(z, params[f"W{m}"], params[f"b{m}"])
            if m < n_layers:
                z = kernels.activation_forward(net.activation, z)
        return float(kernels.softmax_cross_entropy(z, labels)[0])

    grad = np.empty(len(sample))
    for k, (name, idx) in enumerate(sample):
        p = params[name]
        original = p[idx].copy()
        try:
            p[idx] = original + h
            loss_plus = loss()
            p[idx] = original - h
            loss_minus = loss()
        finally:
            p[idx] = original
        grad[k] = (loss_plus - loss_minus) / (2 * h)
    return grad


def values_at(grads: dict[str, Array], sample: Sequence[ParamIndex]) -> np.ndarray:
    """The gradient entries at the sampled parameters, float64 on the host."""
    host = {name: to_numpy(g) for name, g in grads.items()}
    return np.array([host[name][idx] for name, idx in sample], dtype=np.float64)


# ---------------------------------------------------------------- timing


def synced(backend: Backend, compute: Callable[..., T], *args: Any) -> T:
    """Run compute and wait for the device, so that a timer stopped afterwards saw all the work."""
    result = compute(*args)
    backend.synchronize()
    return result


def measure(
    benchmark: Any,
    backend: Backend,
    compute: Callable[..., Any],
    check: Callable[[Any], None],
    profile: Profile,
    args: Sequence[Any] = (),
    slow: bool = False,
) -> None:
    """Check compute(*args) against the reference, then time it (synchronized) as the profile plans.

    The checked call also warms up (caches; JIT compilation is done by warm_up) and sizes the
    rounds. With benchmarks disabled, compute runs once and its result is checked. A slow method
    (tens of seconds a call) in a profile with one_call_when_slow runs once, timed, and that
    result is checked: a result that fails is dropped from the saved results (has_error).
    """
    call_args = (backend, compute, *args)
    if benchmark.disabled or (slow and profile.one_call_when_slow):
        benchmark.extra_info["checked"] = "after its one timed call" if benchmark.enabled else "untimed"
        result = benchmark.pedantic(synced, args=call_args)
        try:
            check(result)
        except AssertionError:
            benchmark.has_error = True  # pytest-benchmark leaves it out of the JSON
            raise
        return
    benchmark.extra_info["checked"] = "before timing"
    start = time.perf_counter()
    result = synced(*call_args)
    seconds = time.perf_counter() - start
    check(result)
    if seconds < profile.min_round_s:  # first calls are slow: size fast calls on warm ones
        seconds = min(_timed(call_args) for _ in range(5))
    rounds, iterations = profile.plan(seconds)
    benchmark.pedantic(synced, args=call_args, rounds=rounds, iterations=iterations)


def _timed(call_args: tuple) -> float:
    start = time.perf_counter()
    synced(*call_args)
    return time.perf_counter() - start


# ---------------------------------------------------------------- what was measured


def thread_counts(backend_name: str) -> dict[str, int | None]:
    """{"threads": the backend's compute threads, "blas_threads": BLAS threads} (None where unknown)."""
    blas = blas_threads()
    if backend_name == "numba":
        import numba

        return {"threads": int(numba.get_num_threads()), "blas_threads": blas}
    if backend_name == "cupy":
        return {"threads": None, "blas_threads": blas}
    return {"threads": blas, "blas_threads": blas}


def blas_threads() -> int | None:
    """The largest thread count of the loaded BLAS libraries (threadpoolctl), None without it."""
    if importlib.util.find_spec("threadpoolctl") is None:
        return None
    from threadpoolctl import threadpool_info

    counts = [lib["num_threads"] for lib in threadpool_info() if lib.get("user_api") == "blas"]
    return max(counts) if counts else None


def describe(
    benchmark: Any,
    *,
    suite: str,
    group: str,
    backend: str,
    method: str,
    sizes: Sequence[int],
    n_params: int,
    batch: int,
    dtype: str,
    data: str,
    profile: Profile,
    **more: Any,
) -> None:
    """Set the benchmark's group and extra_info (the record bench/report.py reads)."""
    benchmark.group = group
    benchmark.extra_info.update(
        suite=suite,
        backend=backend,
        method=method,
        net="-".join(str(n) for n in sizes),
        n_params=int(n_params),
        batch=int(batch),
        dtype=dtype,
        data=data,
        profile=profile.name,
        **thread_counts(backend),
    )
    benchmark.extra_info.update(more)


def mark_estimate(benchmark: Any, n_sampled: int, n_params: int) -> None:
    """Record that the timing covers n_sampled of n_params parameters and is scaled to all of them."""
    benchmark.extra_info.update(estimate=True, scaled_from=int(n_sampled), scale=n_params / n_sampled)


def n_params_of(sizes: Sequence[int]) -> int:
    """Weights and biases of a fully connected net with these layer sizes."""
    return sum(n_in * n_out + n_out for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=False))


# ---------------------------------------------------------------- gradients of one net, checked


class GradientCase:
    """One net and batch on a backend, its NumPy twin, and the references its gradients must match.

    make_net(backend_name) builds the net (the same weights on every backend). Numerical
    gradients are checked at CHECK_SAMPLE parameters against the NumPy naive loop (the same
    central differences) and, for smooth activations, everywhere against NumPy backprop.
    """

    def __init__(
        self, backend: Backend, reference: Backend, batch: Batch, make_net: Callable[[str], Any], dtype: str = "float64"
    ) -> None:
        self.backend, self.dtype, self.data = backend, dtype, batch.source
        self.net = make_net(backend.name)
        self.x, self.t = batch.on(backend, dtype)
        self.twin = make_net(reference.name)
        self.rx, self.rt = batch.on(reference, dtype)
        self.batch = len(batch.t)
        self.sizes = list(self.net.sizes)
        self.n_params = int(self.net.n_params)
        self.shapes = {name: tuple(p.shape) for name, p in self.twin.params.items()}
        self.check_sample = sample_parameters(self.shapes, CHECK_SAMPLE, seed=1)
        self.smooth = self.net.activation in SMOOTH_ACTIVATIONS
        self.context = f"{backend.name} {'-'.join(map(str, self.sizes))} {self.net.activation} B={self.batch} {dtype}"

    def backprop_reference(self) -> dict[str, np.ndarray]:
        return self.twin.gradient(self.rx, self.rt)

    def naive_reference(self, sample: Sequence[ParamIndex]) -> np.ndarray:
        return naive_at(self.twin, self.rx, self.rt, sample)

    def gradient(self, method: str, naive_sample: int | None = None) -> tuple[Callable[[], Any], Callable, int | None]:
        """(compute, check, n_sampled): the call to time, its check, and the sample size if naive is sampled."""
        if method == "backprop":
            want = self.backprop_reference()
            return (
                partial(self.net.gradient, self.x, self.t),
                lambda got: assert_same_computation(got, want, self.dtype, f"{self.context} backprop"),
                None,
            )
        if method == "naive" and naive_sample is not None and naive_sample < self.n_params:
            sample = sample_parameters(self.shapes, naive_sample, seed=0)
            return (
                partial(naive_at, self.net, self.x, self.t, sample),
                partial(self._check_sampled, sample),
                len(sample),
            )
        return (
            partial(self.net.numerical_gradient, self.x, self.t, method=method),
            partial(self._check_numerical, method),
            None,
        )

    def _check_numerical(self, method: str, got: dict[str, Array]) -> None:
        context = f"{self.context} {method}"
        if self.smooth:
            assert_close(got, self.backprop_reference(), atol=NUMERICAL_ATOL, context=f"{context} vs backprop")
        assert_close(
            values_at(got, self.check_sample),
            self.naive_reference(self.check_sample),
            atol=NUMERICAL_ATOL,
            context=f"{context} vs the NumPy naive loop at {len(self.check_sample)} parameters",
        )

    def _check_sampled(self, sample: Sequence[ParamIndex], got: np.ndarray) -> None:
        context = f"{self.context} naive at {len(sample)} sampled parameters"
        if self.smooth:
            assert_close(
                got, values_at(self.backprop_reference(), sample), atol=NUMERICAL_ATOL, context=f"{context} vs backprop"
            )
        if self.backend.name != "numpy":  # on NumPy the timed loop is the reference itself
            assert_close(got, self.naive_reference(sample), atol=NUMERICAL_ATOL, context=f"{context} vs NumPy")


def warm_up(backend: Backend) -> None:
    """Run every code path the suite times once on tiny inputs (JIT compilation, device set-up).

    Compilation then happens neither in a timed round nor in the call that sizes the rounds.
    """
    from nets import MultiLayerNet, TwoLayerNet

    rng = np.random.default_rng(0)
    x, scores, t = rng.random((3, 6)), rng.random((3, 3)), np.array([0, 1, 2])
    for dtype in ("float64", "float32"):
        xb, sb, tb = backend.asarray(x, dtype=dtype), backend.asarray(scores, dtype=dtype), backend.asarray(t)
        nets = (
            TwoLayerNet(6, 4, 3, backend=backend, dtype=dtype),
            MultiLayerNet(6, [4, 4], 3, backend=backend, dtype=dtype),
        )
        for net in nets:
            net.loss(xb, tb)
            net.gradient(xb, tb)
            if dtype == "float64":
                for method in NUMERICAL_METHODS:
                    net.numerical_gradient(xb, tb, method=method)
        kernels = backend.kernels
        for kind in ("sigmoid", "relu"):
            kernels.activation_backward(kind, xb, xb, kernels.activation_forward(kind, xb))
        kernels.softmax_cross_entropy_backward(kernels.softmax_cross_entropy(sb, tb)[1], tb)
        W = backend.asarray(rng.random((6, 3)), dtype=dtype)
        for need_dx in (False, True):
            kernels.affine_backward(sb, xb, W, need_dx)
    backend.synchronize()
