"""Shared pieces of the benchmark suite and the tests: the seed setting, data, profiles, checks, timing.

Every benchmark checks its result against the NumPy reference, then times the call with
``Backend.synchronize()`` inside the timed function, and records what it measured in
``benchmark.extra_info`` (the keys bench/report/results.py reads: see ``describe`` and ``mark_estimate``).
tests/conftest.py and bench/conftest.py both take their helpers from here (``assert_close``,
``assert_gradients_close``, ``mnist_dir``, ``SHARED_MNIST``, ``session_gradient``); bench/plugin.py
holds the pytest options and the backend fixture they share. Deterministic results that tests and
untimed benchmarks both need (the seed net's NumPy naive references, its batched gradients) are
computed once per pytest session (``once``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import socket
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from backends import Backend, to_numpy
from bench.textbook import central_differences

T = TypeVar("T")
Array = Any

REPO = Path(__file__).resolve().parent.parent
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"  # developer and CI checkouts have this sibling
MNIST_FILE_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
PROBE_TIMEOUT_S = 3.0  # a download mirror that does not accept a connection this fast counts as unreachable

# The seed setting: one gradient of a 784-50-10 sigmoid net on 100 MNIST images, float64.
SEED_SIZES = (784, 50, 10)
SEED_BATCH = 100
SEED_N_PARAMS = 39_760
SEED_NUMERICAL_S = 45.0  # the seed's measured time for one numerical gradient
SEED_BACKPROP_S = 0.01  # and for one backprop gradient
DEEP_HIDDEN = (100, 100, 100, 100)  # MultiLayerNet(784, [100] * 4, 10), relu, He init
STEP = 1e-4
NUMERICAL_METHODS = ("naive", "batched", "incremental", "series")
# Timed in this order: the cheap methods first, then the brute-force ones, whose large temporaries leave the
# allocator in a state that slows the sub-millisecond calls measured after them (seen: series 1.4 ms when timed
# next to backprop, 2.5 ms when timed after batched in the same run). Backprop and series see the same state.
GAP_METHODS = ("backprop", "series", "incremental", "batched", "naive")
LARGEST_BATCH = 10_000
DGEMM_SIZE = 1000  # the roofline's matmul: (n, n) @ (n, n), float64

# Checks: numerical gradients of a smooth net match backprop to NUMERICAL_ATOL; two ways of
# computing the same central differences match to the same absolute tolerance; the same
# float64 computation on two backends agrees to FLOAT64_RTOL relative (FLOAT32_RTOL in float32).
NUMERICAL_ATOL = 1e-9
FLOAT64_RTOL = 1e-10
FLOAT32_RTOL = 1e-5
CHECK_SAMPLE = 200  # parameters at which a numerical method is compared with the NumPy naive loop (default)
SMOOTH_ACTIVATIONS = ("sigmoid", "tanh")  # no kinks: central differences agree with backprop


@dataclass(frozen=True)
class Profile:
    """How much to measure.

    naive_sample: parameters the naive loop of the gap group (and the textbook's) is timed on,
    None: every parameter. An empty sweep tuple leaves that sweep out; deep_methods and
    seed_methods name the numerical methods each group times (backprop always runs).
    """

    name: str
    budget_s: float  # timed seconds aimed at per benchmark
    min_rounds: int
    max_rounds: int
    min_round_s: float  # fast calls are repeated (iterations) until a round lasts this long
    one_call_when_slow: bool  # slow methods: one timed call, checked right after it (not before)
    naive_sample: int | None
    gradcheck_all: bool  # torch.autograd.gradcheck over every parameter (else b1, W2, b2 only)
    deep_naive_sample: int
    deep_methods: tuple[str, ...]
    check_sample: int  # parameters at which each numerical gradient is compared with the NumPy naive loop
    scaling_naive_sample: int
    batch_sizes: tuple[int, ...]  # scaling sweeps of the numerical methods
    backprop_batch_sizes: tuple[int, ...]  # forward / backprop sweep (cheap: reaches LARGEST_BATCH)
    hidden_sizes: tuple[int, ...]
    depths: tuple[int, ...]  # backprop and sampled naive
    incremental_depths: tuple[int, ...]
    series_depths: tuple[int, ...]
    kernel_dtypes: tuple[str, ...]  # elementary kernels; forward and backprop always run both dtypes
    distributed: str  # the setup of bench_distributed.py (see SETUPS there)

    def plan(self, seconds_per_call: float) -> tuple[int, int]:
        """(rounds, iterations) for a call that takes seconds_per_call."""
        iterations = max(1, math.ceil(self.min_round_s / max(seconds_per_call, 1e-9)))
        rounds = int(self.budget_s / (seconds_per_call * iterations))
        return min(self.max_rounds, max(self.min_rounds, rounds)), iterations


PROFILES = {
    # pytest (--benchmark-only, or --benchmark-disable: each benchmark once, checked): a few minutes when
    # timed, well under one when not; the naive loops on samples, short sweeps, the deep net without its
    # slow methods.
    "quick": Profile(
        name="quick",
        budget_s=0.4,
        min_rounds=1,
        max_rounds=25,
        min_round_s=1e-3,
        one_call_when_slow=True,
        naive_sample=400,
        gradcheck_all=False,
        deep_naive_sample=100,
        deep_methods=("naive", "series"),  # the deep net's incremental: ~6 s a call, standard and full
        check_sample=100,
        scaling_naive_sample=50,
        batch_sizes=(1, 100),
        backprop_batch_sizes=(1, 10, 100, 1000, LARGEST_BATCH),
        hidden_sizes=(10, 100),
        depths=(1, 2),
        incremental_depths=(),
        series_depths=(1, 2, 3),
        kernel_dtypes=("float64",),
        distributed="quick",
    ),
    # python -m bench.report (default): <= 5 minutes on 2 cores; the naive loop over all 39,760
    # parameters once on every backend and the textbook's; no scaling sweeps but series' depth.
    "standard": Profile(
        name="standard",
        budget_s=0.5,
        min_rounds=1,
        max_rounds=50,
        min_round_s=2e-3,
        one_call_when_slow=True,
        naive_sample=None,
        gradcheck_all=False,
        deep_naive_sample=200,
        deep_methods=("naive", "incremental", "series"),
        check_sample=CHECK_SAMPLE,
        scaling_naive_sample=100,
        batch_sizes=(),
        backprop_batch_sizes=(1, 100, LARGEST_BATCH),
        hidden_sizes=(),
        depths=(1, 2, 3, 4, 5),
        incremental_depths=(),
        series_depths=(1, 2, 3, 4, 5),
        kernel_dtypes=("float64",),
        distributed="quick",
    ),
    # python -m bench.report --profile full: every parameter, the long sweeps, several rounds.
    "full": Profile(
        name="full",
        budget_s=5.0,
        min_rounds=2,
        max_rounds=200,
        min_round_s=5e-3,
        one_call_when_slow=False,
        naive_sample=None,
        gradcheck_all=True,
        deep_naive_sample=2000,
        deep_methods=("naive", "batched", "incremental", "series"),
        check_sample=CHECK_SAMPLE,
        scaling_naive_sample=400,
        batch_sizes=(1, 3, 10, 30, 100, 300, 1000, 3000, LARGEST_BATCH),
        backprop_batch_sizes=(1, 3, 10, 30, 100, 300, 1000, 3000, LARGEST_BATCH),
        hidden_sizes=(10, 25, 50, 100, 200, 400),
        depths=(1, 2, 3, 4, 5),
        incremental_depths=(1, 2, 3, 4, 5),
        series_depths=(1, 2, 3, 4, 5),
        kernel_dtypes=("float64", "float32"),
        distributed="full",
    ),
}
DEFAULT_PROFILE = "quick"  # what pytest uses; python -m bench.report runs "standard"


def library_methods() -> tuple[str, ...]:
    """The numerical-gradient methods this version of nets offers (net.numerical_gradient(method=...))."""
    from nets.networks import NUMERICAL_METHODS as offered

    return tuple(offered)


# ---------------------------------------------------------------- data


def complete_mnist(directory: Path) -> bool:
    """directory holds the four canonical MNIST file names (their contents are checked by load_mnist)."""
    return all((directory / name).is_file() for name in MNIST_FILE_NAMES)


def mnist_dir() -> Path | None:
    """The first directory holding the four MNIST files, without downloading: load_mnist's directory
    (GRADGAP_DATA_DIR, else its user cache), then the checkout's sibling ../shared/data/mnist; else None."""
    from nets.data import default_data_dir

    for candidate in (default_data_dir(), SHARED_MNIST):
        if complete_mnist(candidate):
            return candidate
    return None


@dataclass(frozen=True)
class Batch:
    """Host data: x (n, 784) float64 in [0, 1], t (n,) int64 labels.

    source: "mnist" or "synthetic". origin: where the data came from ("GRADGAP_DATA_DIR",
    "cache", "shared", "downloaded" (into path), "synthetic"). path: the MNIST directory used.
    reason: why synthetic data stands in for MNIST (None for MNIST).
    """

    x: np.ndarray
    t: np.ndarray
    source: str
    origin: str = "synthetic"
    path: str | None = None
    reason: str | None = None

    def first(self, n: int) -> Batch:
        """The first n samples."""
        if n > len(self.t):
            raise ValueError(f"asked for {n} samples; only {len(self.t)} loaded")
        return Batch(self.x[:n], self.t[:n], self.source, self.origin, self.path, self.reason)

    def on(self, backend: Backend, dtype: str = "float64") -> tuple[Array, Array]:
        """(x in dtype, labels) as arrays of the backend."""
        return backend.asarray(self.x, dtype=dtype), backend.asarray(self.t)

    def info(self) -> dict[str, Any]:
        """What extra_info and machine_info record about the data (see ``describe``)."""
        record: dict[str, Any] = {"data": self.source, "data_origin": self.origin}
        if self.path is not None:
            record["data_path"] = self.path
        if self.reason is not None:
            record["data_fallback_reason"] = self.reason
        return record


def load_data(n: int, mirrors: Sequence[str] | None = None) -> Batch:
    """The first n MNIST training images (pixel / 255, float64) and labels, else synthetic data.

    Where from, in order: load_mnist's directory (GRADGAP_DATA_DIR, else its user cache) if it
    holds the files; the checkout's sibling ../shared/data/mnist if it does; else load_mnist
    downloads them into its directory (mirrors: the argument, else GRADGAP_MNIST_MIRRORS, else
    nets.data's defaults; a mirror that accepts no connection within PROBE_TIMEOUT_S is not
    tried, so no network fails in seconds). Only when all of that fails: ``synthetic_batch(n)``,
    with the reason in Batch.reason.
    """
    from nets.data import MnistDataError, default_data_dir, load_mnist, mirror_list

    target = default_data_dir()
    problems = []
    own = "GRADGAP_DATA_DIR" if os.environ.get("GRADGAP_DATA_DIR") else "cache"
    for origin, directory in ((own, target), ("shared", SHARED_MNIST)):
        if complete_mnist(directory):
            try:
                (images, labels), _ = load_mnist(normalize=False, data_dir=directory)
            except MnistDataError as err:
                problems.append(f"{directory}: {err}")
                continue
            return _mnist_batch(images, labels, n, origin, directory)
    urls = mirror_list(mirrors)
    reachable, unreachable = [], []
    for url in urls:
        problem = _unreachable(url)
        (unreachable if problem else reachable).append(f"{url} ({problem})" if problem else url)
    if not reachable:
        problems.append(
            f"the MNIST files are not in {target} or {SHARED_MNIST}, and no download mirror accepted a "
            f"connection within {PROBE_TIMEOUT_S:g} s: " + ("; ".join(unreachable) or "no mirror configured")
        )
    else:
        try:
            (images, labels), _ = load_mnist(normalize=False, data_dir=target, mirrors=reachable)
        except (MnistDataError, OSError) as err:
            problems.append(f"downloading into {target} failed: {err}")
        else:
            return _mnist_batch(images, labels, n, "downloaded", target)
    batch = synthetic_batch(n)
    return Batch(batch.x, batch.t, "synthetic", "synthetic", None, "; ".join(problems))


def _mnist_batch(images: np.ndarray, labels: np.ndarray, n: int, origin: str, directory: Path) -> Batch:
    x = images[:n].reshape(n, -1).astype(np.float64) / 255.0
    return Batch(x, labels[:n].astype(np.int64), "mnist", origin, str(directory))


def _unreachable(url: str) -> str | None:
    """None if url's host accepts a TCP connection within PROBE_TIMEOUT_S, else why not."""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        return "not a URL with a host"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as err:
        return f"{type(err).__name__}: {err}"


# Synthetic pixels: non-zero with probability SYNTHETIC_PEAK * exp(-(d / SYNTHETIC_RADIUS) ** SYNTHETIC_POWER),
# d the distance from the image centre with columns stretched by 1 / SYNTHETIC_ASPECT. Fitted to MNIST's
# training images: 19.1% non-zero pixels; 501 of 784 columns non-zero in the first 100 images, 673 in
# 10,000, 717 in 60,000 (the fit gives 19.1%, ~500, ~677, ~714).
SYNTHETIC_PEAK, SYNTHETIC_RADIUS, SYNTHETIC_POWER, SYNTHETIC_ASPECT = 0.835, 8.69, 3.48, 0.85


def synthetic_pixel_density() -> np.ndarray:
    """(784,) float64: the probability that each pixel of a synthetic image is non-zero."""
    row, col = np.mgrid[0:28, 0:28]
    distance = np.hypot(row - 14.0, (col - 14.0) / SYNTHETIC_ASPECT)
    return (SYNTHETIC_PEAK * np.exp(-((distance / SYNTHETIC_RADIUS) ** SYNTHETIC_POWER))).reshape(784)


def synthetic_batch(n: int, seed: int = 0) -> Batch:
    """n seeded synthetic images of MNIST's shape and sparsity, per pixel and per column.

    Pixel k is non-zero with probability synthetic_pixel_density()[k] (MNIST's falloff from the
    centre, so the first 100 images leave ~280 of 784 columns all zero, as MNIST's do); non-zero
    values are 1 - U**2 in (0, 1] (mean 2/3; MNIST's is 0.68); labels uniform in 0..9.
    x: (n, 784) float64; t: (n,) int64.
    """
    rng = np.random.default_rng(seed)
    on = rng.random((n, 784)) < synthetic_pixel_density()
    x = np.where(on, 1.0 - rng.random((n, 784)) ** 2, 0.0)
    return Batch(x, rng.integers(0, 10, n).astype(np.int64), "synthetic")


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


def assert_gradients_close(numeric: dict, reference: dict, *, rtol: float = 0.0, atol: float = 1e-9, context=""):
    """Every array of ``numeric`` matches ``reference`` (same keys and shapes); names the worst element."""
    assert_close(numeric, reference, rtol=rtol, atol=atol, context=context)


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


def sample_digest(sample: Sequence[ParamIndex]) -> str:
    """16 hex digits identifying the sampled parameters (names and indices, in order)."""
    text = ";".join(f"{name}{list(idx)}" for name, idx in sample)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def grouped(sample: Sequence[ParamIndex]) -> dict[str, list[tuple[int, ...]]]:
    """{name: [index, ...]}: the sample as net.numerical_gradient's ``entries``."""
    entries: dict[str, list[tuple[int, ...]]] = {}
    for name, idx in sample:
        entries.setdefault(name, []).append(idx)
    return entries


def naive_at(net: Any, x: Array, labels: Array, sample: Sequence[ParamIndex], h: float = STEP) -> np.ndarray:
    """The library's naive loop (net.numerical_gradient(method="naive", entries=...)) over the
    sampled parameters only: float64 (len(sample),), in the sample's order."""
    grads = net.numerical_gradient(x, labels, method="naive", h=h, entries=grouped(sample))
    return values_at(grads, sample)


def values_at(grads: dict[str, Array], sample: Sequence[ParamIndex]) -> np.ndarray:
    """The gradient entries at the sampled parameters, float64 on the host."""
    host = {name: to_numpy(g) for name, g in grads.items()}
    return np.array([host[name][idx] for name, idx in sample], dtype=np.float64)


def _plain_activation(activation: str, z: np.ndarray, alpha: float) -> np.ndarray:
    if activation == "relu":
        return np.maximum(z, 0.0)
    if activation == "leaky_relu":
        return np.where(z > 0, z, alpha * z)
    if activation == "sigmoid":
        return 0.5 * (1.0 + np.tanh(0.5 * z))
    if activation == "tanh":
        return np.tanh(z)
    raise ValueError(f"no plain NumPy form for activation {activation!r}")


def independent_differences(net: Any, x: np.ndarray, t: np.ndarray, sample: Sequence[ParamIndex], h: float = STEP):
    """Central differences at the sampled parameters by a loop of its own: plain NumPy, no gradgap kernel.

    The reference for the sampled naive loop on every backend (NumPy included): its forward pass
    (x @ W + b, the activation, a log-sum-exp cross-entropy, 0.5 * lambda * sum W**2) shares no
    code with the library. x: (B, I) float64 host array; t: (B,) int labels. Returns (len(sample),).
    """
    params = {name: to_numpy(p).astype(np.float64) for name, p in net.params.items()}
    n_layers, decay = net.n_layers, net.weight_decay_lambda

    def loss() -> float:
        z = x
        for m in range(1, n_layers + 1):
            z = z @ params[f"W{m}"] + params[f"b{m}"]
            if m < n_layers:
                z = _plain_activation(net.activation, z, net.alpha)
        top = z.max(axis=1, keepdims=True)
        log_sum = np.log(np.exp(z - top).sum(axis=1)) + top[:, 0]
        value = float(np.mean(log_sum - z[np.arange(len(t)), t]))
        return value + 0.5 * decay * sum(float(np.sum(params[f"W{m}"] ** 2)) for m in range(1, n_layers + 1))

    return np.array([central_differences(loss, params[name], [idx], h)[0] for name, idx in sample])


# ---------------------------------------------------------------- one computation per session, by content

# Deterministic results (tests/test_numerical.py checks that repeated calls are bit-identical), keyed by
# content_key of everything they depend on: the tests and the untimed benchmarks of one pytest run compute
# the seed net's references and slow gradients once. Nothing that patches the library may use them.
_SESSION_RESULTS: dict[str, Any] = {}


def content_key(*parts: Any) -> str:
    """SHA-256 (hex) of parts: arrays of any backend by dtype, shape and bytes; dicts by sorted key; else repr."""
    sha = hashlib.sha256()

    def add(part: Any) -> None:
        if isinstance(part, dict):
            for name in sorted(part):
                sha.update(f"{name}=".encode())
                add(part[name])
        elif hasattr(part, "shape") and hasattr(part, "dtype"):
            host = np.ascontiguousarray(to_numpy(part))
            sha.update(f"array {host.dtype.str} {host.shape}:".encode())
            sha.update(host.reshape(-1).view(np.uint8))
        else:
            sha.update(repr(part).encode())
        sha.update(b";")

    for part in parts:
        add(part)
    return sha.hexdigest()


def net_contents(net: Any) -> tuple | None:
    """What a net's losses depend on (class, backend, sizes, activation, alpha, weight decay, parameters with
    their dtype), or None where that cannot be told by value: a user-defined activation object."""
    if not isinstance(net.activation, str):
        return None
    return (
        type(net).__name__,
        net.backend.name,
        tuple(net.sizes),
        net.activation,
        net.alpha,
        net.weight_decay_lambda,
        dict(net.params),
    )


def gradient_key(net: Any, x: Array, labels: Array, method: str, h: float = STEP) -> str | None:
    """content_key of net.numerical_gradient(x, labels, method=method, h=h); None if the net has no net_contents."""
    contents = net_contents(net)
    return None if contents is None else content_key("numerical_gradient", *contents, x, labels, method, float(h))


def _copied(result: Any) -> Any:
    if isinstance(result, dict):
        return {name: value.copy() for name, value in result.items()}
    return result.copy()


def once(key: str | None, compute: Callable[[], T]) -> T:
    """A copy of compute()'s result, computed the first time this session asks for key (None: always computed)."""
    if key is None:
        return compute()
    if key not in _SESSION_RESULTS:
        _SESSION_RESULTS[key] = compute()
    return _copied(_SESSION_RESULTS[key])


def session_gradient(net: Any, x: Array, labels: Array, method: str, h: float = STEP) -> dict[str, Array]:
    """net.numerical_gradient(x, labels, method=method, h=h), computed once per session for the same contents
    (gradient_key) and handed out as copies: the parameters are left as they were either way. The naive loop
    runs as naive_in_threads (the same numbers)."""
    if method == "naive":
        compute = partial(naive_in_threads, net, x, labels, h)
    else:
        compute = partial(net.numerical_gradient, x, labels, method=method, h=h)
    return once(gradient_key(net, x, labels, method, h), compute)


def session_naive_at(net: Any, x: Array, labels: Array, sample: Sequence[ParamIndex], h: float = STEP) -> np.ndarray:
    """naive_at(net, x, labels, sample, h), once per session; taken from this session's whole naive gradient of
    the same net and batch where one was computed (the loop's differences of an entry do not depend on which
    other entries it visits: each is moved and put back exactly; tests/test_bench_checks.py checks it)."""
    full_key = gradient_key(net, x, labels, "naive", h)
    if full_key is not None and full_key in _SESSION_RESULTS:
        return values_at(_SESSION_RESULTS[full_key], sample)
    contents = net_contents(net)
    key = None if contents is None else content_key("naive_at", *contents, x, labels, list(sample), float(h))
    return once(key, partial(naive_at, net, x, labels, sample, h))


def naive_in_threads(net: Any, x: Array, labels: Array, h: float = STEP, threads: int | None = None) -> dict:
    """net.numerical_gradient(x, labels, method="naive", h=h) on a NumPy net, its entries split between threads
    (default: the usable CPUs, at most 2), each running the library's loop over its share with BLAS held to one
    thread. The same numbers: an entry's differences do not depend on which other entries the loop visits, the
    loop never writes the net's own arrays (it moves float64 copies), and OpenBLAS splits a product's output, not
    its sums, between threads (tests/test_bench_checks.py and tests/test_numerical.py check the result against
    the plain loop, bit for bit). Faster on two free cores, and on a busy machine no two BLAS pools spin
    against each other.
    """
    if threads is None:
        threads = min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if net.backend.name != "numpy" or threads < 2 or importlib.util.find_spec("threadpoolctl") is None:
        return net.numerical_gradient(x, labels, method="naive", h=h)
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    every = [(name, idx) for name, p in net.params.items() for idx in np.ndindex(*p.shape)]
    shares = [grouped(every[k::threads]) for k in range(threads)]
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(threads) as pool:
        loop = partial(net.numerical_gradient, x, labels, method="naive", h=h)
        parts = list(pool.map(lambda share: loop(entries=share), shares))
    grads = parts[0]
    for share, part in zip(shares[1:], parts[1:], strict=True):
        for name, indices in share.items():
            rows = tuple(np.array(indices).T)
            grads[name][rows] = part[name][rows]
    return grads


class Shareable:
    """A benchmark's call (``compute()``, what a timed run times) and the same result shared within the session
    (``shared()``, e.g. session_gradient): what an untimed run (--benchmark-disable) checks."""

    def __init__(self, compute: Callable[[], Any], shared: Callable[[], Any]) -> None:
        self.compute, self.shared = compute, shared

    def __call__(self) -> Any:
        return self.compute()


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
    rounds. With benchmarks disabled, compute runs once and its result is checked; a ``Shareable``
    compute gives its session-shared result instead (the same call on the same contents, e.g. the
    seed net's batched gradient that tests/test_numerical.py computed in this run). A slow method
    (seconds a call) in a profile with one_call_when_slow runs once, timed, and that result is
    checked: a result that fails is dropped from the saved results (has_error).
    """
    if benchmark.disabled and isinstance(compute, Shareable):
        compute = compute.shared
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
    data: Batch | str,
    profile: Profile,
    **more: Any,
) -> None:
    """Set the benchmark's group and extra_info (the record bench/report/results.py reads).

    Keys always set: suite, backend, method, net ("784-50-10"), n_params, batch, dtype,
    profile, threads, blas_threads, and from the data (``Batch.info``): data ("mnist" or
    "synthetic"), data_origin ("GRADGAP_DATA_DIR", "cache", "shared", "downloaded",
    "synthetic"), data_path (the MNIST directory, when MNIST) and data_fallback_reason (why
    synthetic data stood in, when it did). ``measure`` adds checked ("before timing", "after
    its one timed call", "untimed").

    Keys some benchmarks add (``more``): activation; sweep and x (scaling); flops (float: the
    floating-point operations of ONE WHOLE gradient or call by this method, counted by
    ``flops_per_call``; divide by the (scaled) seconds for the achieved rate) and flops_how;
    dgemm
    ({"n", "dtype", "blas_threads"}: the roofline's matmul; its flops is 2 n^3).
    Estimates (``mark_estimate``): estimate (True), scaled_from, scale, estimate_how, and
    sample_digest where a sample of parameters was timed (the gap group's NumPy naive loop and
    the textbook's loop (peers) share one: the same parameters, same run).
    """
    benchmark.group = group
    data_info = data.info() if isinstance(data, Batch) else {"data": data}
    benchmark.extra_info.update(
        suite=suite,
        backend=backend,
        method=method,
        net="-".join(str(n) for n in sizes),
        n_params=int(n_params),
        batch=int(batch),
        dtype=dtype,
        profile=profile.name,
        **data_info,
        **thread_counts(backend),
    )
    benchmark.extra_info.update(more)


def mark_estimate(
    benchmark: Any,
    n_sampled: int,
    n_params: int,
    how: str | None = None,
    sample: Sequence[ParamIndex] | None = None,
) -> None:
    """Record that the timing covers n_sampled of n_params parameters and is scaled to all of them.

    extra_info: estimate=True, scaled_from=n_sampled, scale=n_params / n_sampled (the report
    multiplies the measured seconds by it), estimate_how (how the sample was drawn and scaled),
    and with ``sample``: sample_digest (``sample_digest(sample)``; equal digests: the same parameters).
    """
    if sample is not None:
        benchmark.extra_info["sample_digest"] = sample_digest(sample)
    benchmark.extra_info.update(
        estimate=True,
        scaled_from=int(n_sampled),
        scale=n_params / n_sampled,
        estimate_how=how
        or (
            f"timed on {n_sampled:,} of {n_params:,} parameters (drawn at random, seeded, from every array "
            f"in proportion to its size), scaled by {n_params / n_sampled:,.1f}: each parameter costs "
            "the naive loop the same two full forward passes"
        ),
    )


# ---------------------------------------------------------------- the roofline: FLOPs per gradient

# The Taylor order the series method sums at h = 1e-4 on the benchmark's nets: every pair of the seed
# net and of 784-[100]*4-10 relu/tanh on the first 100 MNIST images needs K = 3 (measured with
# kernels' order selection; relu pairs whose direction leaves the loss flat need 1, counted as 3).
SERIES_ORDER = 3


def flops_per_call(
    method: str,
    sizes: Sequence[int],
    batch: int,
    nonzeros: Sequence[int] | None = None,
    active_inputs: int | None = None,
    orders: int = SERIES_ORDER,
    piecewise: bool = False,
) -> float:
    """Floating-point operations of one call of ``method`` on a dense net with these layer sizes.

    How they were counted (what each method computes, not what a profiler saw): a GEMM
    (m, k) @ (k, n) is 2 m k n; an elementwise pass is 1 per element (the activation, adding a
    bias, one term of a sum); softmax + cross-entropy is 3 per score. s = sizes (s[0] inputs,
    s[L] classes C), B = batch, layer k maps s[k] -> s[k+1].

    - forward (net.loss): sum_k (2 B s[k] s[k+1] + B s[k+1]) + B s[k+1] per hidden activation + 3 B C.
    - backprop (net.gradient): the forward pass, then per layer dW (2 B s[k] s[k+1]), db
      (B s[k+1]), dx for k >= 1 (2 B s[k] s[k+1]) and the activation's derivative (2 B s[k]),
      plus 2 B C for the loss.
    - naive: two forward passes per parameter: 2 P forward, P = sum_k s[k+1] (s[k] + 1).
    - batched: the same full passes per parameter, but the input features that are zero for
      the whole batch (s[0] - active_inputs of them) are left out of x @ W1 and their rows of W1
      are not moved: 2 P' forward', P' and forward' counted with active_inputs inputs.
    - incremental: per moved weight of hidden layer k (k <= L - 2) and sign, only the
      (sample, input) pairs with a non-zero input are recomputed: nonzeros[k] + B of them (the
      bias is an input of ones), each for every unit j: its activation (1), the rank-1 update of
      the next pre-activation (2 s[k+2]), then every later layer (2 s[m] s[m+1] + s[m]) and the
      loss (3 C); layer L - 2 (the next one is the output) takes 4 C from the cached softmax.
      The last layer: 3 per (sample, input, class) and sign (log1p/expm1 on the base softmax).
    - series (what docs/series.md's implementation computes, K = ``orders`` the order summed, odd =
      ceil(K / 2)): the forward pass with f' (counted as forward); the output layer: the log
      recurrence per (sample, class) (K^2) and odd GEMMs 2 B s[L-1] C; the output-feeding layer
      L - 2: per (sample, unit) the K moments over the classes (2 K C), the log recurrence (K^2) and,
      smooth, the composition with the activation's series (K^3 / 3), then odd GEMMs 2 B s[L-2] s[L-1].
      Every hidden layer k <= L - 3, relu/leaky: the backward logit Jacobian (2 B C s[k+1] s[k+2]
      + B C s[k+1]), the exact next-layer radius (2 B s[k+1] s[k+2]), the radius-bound chains
      (2 B s[j] s[j+1] per step, one chain per later layer), per pair the loss series along its
      direction (C + 2 C + 2 K C + K^2), odd GEMMs 2 B s[k] s[k+1]; smooth: per pair K + 3 vectors
      (the K orders, the first-order direction and two remainder references) carried through every
      later layer (2 s[m] s[m+1] each, plus K^2 s[m+1] for composing the series), the loss series
      (2 K C + K^2), odd GEMMs. Not counted (data-dependent, small at h = 1e-4): the exact carry of
      the pairs the radius bound does not clear and the direct evaluations where a bound fails.

    nonzeros[k]: non-zero entries of layer k's input over the batch (default B s[k], dense);
    active_inputs: input features non-zero somewhere in the batch (default s[0]).
    """
    s = list(sizes)
    n_layers = len(s) - 1
    B, C = batch, s[-1]
    nonzeros = list(nonzeros) if nonzeros is not None else [B * s[k] for k in range(n_layers)]
    active = s[0] if active_inputs is None else active_inputs

    def forward(widths: Sequence[int]) -> float:
        total = 3.0 * B * C
        for k in range(n_layers):
            total += 2.0 * B * widths[k] * widths[k + 1] + B * widths[k + 1]
            if k < n_layers - 1:
                total += B * widths[k + 1]
        return total

    def n_params(widths: Sequence[int]) -> int:
        return sum(widths[k + 1] * (widths[k] + 1) for k in range(n_layers))

    if method == "forward":
        return forward(s)
    if method == "backprop":
        total = forward(s) + 2.0 * B * C
        for k in range(n_layers):
            total += 2.0 * B * s[k] * s[k + 1] + B * s[k + 1]
            if k >= 1:
                total += 2.0 * B * s[k] * s[k + 1] + 2.0 * B * s[k]
        return total
    if method == "naive":
        return 2.0 * n_params(s) * forward(s)
    if method == "batched":
        widths = [active, *s[1:]]
        return 2.0 * n_params(widths) * forward(widths)
    if method == "incremental":
        total = 2.0 * 3.0 * B * s[n_layers - 1] * C
        for k in range(n_layers - 1):
            pairs = nonzeros[k] + B
            if k == n_layers - 2:
                per_pair = 1.0 + 4.0 * C
            else:
                per_pair = 1.0 + 2.0 * s[k + 2] + 3.0 * C
                per_pair += sum(2.0 * s[m] * s[m + 1] + s[m] for m in range(k + 2, n_layers))
            total += 2.0 * pairs * s[k + 1] * per_pair
        return total
    if method == "series":
        K, odd = orders, math.ceil(orders / 2)
        smooth = not piecewise
        total = forward(s) + B * sum(s[1:n_layers])  # the base pass, with f' of every hidden layer
        total += K * K * B * C + odd * 2.0 * B * s[n_layers - 1] * C
        if n_layers >= 2:
            feeding = n_layers - 2
            per_pair = 2.0 * K * C + K * K + (K**3 / 3.0 if smooth else 0.0)
            total += B * s[feeding + 1] * per_pair + odd * 2.0 * B * s[feeding] * s[feeding + 1]
        for k in range(n_layers - 2):
            total += odd * 2.0 * B * s[k] * s[k + 1]
            pairs = B * s[k + 1]
            if piecewise:
                total += 2.0 * B * C * s[k + 1] * s[k + 2] + B * C * s[k + 1]  # logit Jacobian
                total += 2.0 * B * s[k + 1] * s[k + 2]  # next-layer radius
                if k + 2 <= n_layers - 2:  # the bound chain from hidden layer k + 2 back to layer 0
                    total += sum(2.0 * B * s[j + 1] * s[j + 2] for j in range(k + 1))
                total += pairs * (3.0 * C + 2.0 * K * C + K * K)
            else:
                later = sum(2.0 * s[m] * s[m + 1] + K * K * s[m + 1] for m in range(k + 1, n_layers))
                total += pairs * ((K + 3) * later + 2.0 * K * C + K * K)
        return total
    raise ValueError(f"no FLOP count for method {method!r}")


def layer_nonzeros(net: Any, x: np.ndarray) -> list[int]:
    """Non-zero entries of each layer's input (x, then every hidden activation) over the batch."""
    counts = [int(np.count_nonzero(x))]
    z = x
    for m in range(1, net.n_layers):
        pre = z @ to_numpy(net.params[f"W{m}"]).astype(np.float64) + to_numpy(net.params[f"b{m}"])
        z = _plain_activation(net.activation, pre, net.alpha)
        counts.append(int(np.count_nonzero(z)))
    return counts


def flops_record(method: str, net: Any, x: np.ndarray) -> dict[str, Any]:
    """extra_info's flops and flops_how for one call of ``method`` on this net and host batch x."""
    sizes = list(net.sizes)
    piecewise = net.activation in ("relu", "leaky_relu")
    count = flops_per_call(
        method,
        sizes,
        x.shape[0],
        nonzeros=layer_nonzeros(net, x),
        active_inputs=int(np.count_nonzero((x != 0).any(axis=0))),
        piecewise=piecewise,
    )
    how = f"counted by bench.common.flops_per_call({method!r}, {sizes}, B={x.shape[0]}, data's non-zeros"
    if method == "series":
        how += (
            f", K={SERIES_ORDER}, {'relu' if piecewise else 'smooth'}; exact carry and direct evaluations not counted"
        )
    return {"flops": count, "flops_how": how + ")"}


# ---------------------------------------------------------------- gradients of one net, checked


class GradientCase:
    """One net and batch on a backend, its NumPy twin, and the references its gradients must match.

    make_net(backend_name) builds the net (the same weights on every backend). Numerical
    gradients are checked at check_sample parameters against the NumPy naive loop (the same
    central differences) and, for smooth activations, everywhere against NumPy backprop. The
    naive loop timed on a sample is checked against ``independent_differences`` (a plain NumPy
    loop of its own) on every backend, NumPy included.
    """

    def __init__(
        self,
        backend: Backend,
        reference: Backend,
        batch: Batch,
        make_net: Callable[[str], Any],
        dtype: str = "float64",
        check_sample: int = CHECK_SAMPLE,
    ) -> None:
        self.backend, self.dtype, self.data = backend, dtype, batch
        self.net = make_net(backend.name)
        self.x, self.t = batch.on(backend, dtype)
        self.twin = make_net(reference.name)
        self.rx, self.rt = batch.on(reference, dtype)
        self.host_x, self.host_t = batch.x, batch.t
        self.batch = len(batch.t)
        self.sizes = list(self.net.sizes)
        self.n_params = int(self.net.n_params)
        self.shapes = {name: tuple(p.shape) for name, p in self.twin.params.items()}
        self.check_sample = sample_parameters(self.shapes, check_sample, seed=1)
        self.smooth = self.net.activation in SMOOTH_ACTIVATIONS
        self.context = f"{backend.name} {'-'.join(map(str, self.sizes))} {self.net.activation} B={self.batch} {dtype}"

    def backprop_reference(self) -> dict[str, np.ndarray]:
        return self.twin.gradient(self.rx, self.rt)

    def naive_reference(self, sample: Sequence[ParamIndex]) -> np.ndarray:
        """The NumPy naive loop at the sample: once per session (session_naive_at)."""
        return session_naive_at(self.twin, self.rx, self.rt, sample)

    def flops(self, method: str) -> dict[str, Any]:
        return flops_record(method, self.twin, self.host_x)

    def gradient(
        self, method: str, naive_sample: int | None = None
    ) -> tuple[Callable[[], Any], Callable, list[ParamIndex] | None]:
        """(compute, check, sample): the call to time, its check, and the sampled parameters if naive is sampled."""
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
                partial(self.check_sampled, sample),
                sample,
            )
        return (
            Shareable(
                partial(self.net.numerical_gradient, self.x, self.t, method=method),
                partial(session_gradient, self.net, self.x, self.t, method),
            ),
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

    def check_sampled(self, sample: Sequence[ParamIndex], got: np.ndarray) -> None:
        """The sampled naive loop's values (len(sample),) against a plain NumPy loop and, if smooth, backprop."""
        context = f"{self.context} naive at {len(sample)} sampled parameters"
        got = np.asarray(got, dtype=np.float64)
        assert got.shape == (len(sample),), f"{context}: shape {got.shape}, expected ({len(sample)},)"
        if self.smooth:
            assert_close(
                got, values_at(self.backprop_reference(), sample), atol=NUMERICAL_ATOL, context=f"{context} vs backprop"
            )
        host_x = self.host_x.astype(np.float64)
        contents = net_contents(self.twin)
        key = None if contents is None else content_key("independent", *contents, host_x, self.host_t, list(sample))
        want = once(key, partial(independent_differences, self.twin, host_x, self.host_t, sample))
        assert_close(got, want, atol=NUMERICAL_ATOL, context=f"{context} vs an independent plain NumPy loop")


def warm_up(backend: Backend) -> None:
    """Run every code path the suite times once on tiny inputs (JIT compilation, device set-up).

    Compilation then happens neither in a timed round nor in the call that sizes the rounds.
    """
    from nets import MultiLayerNet, TwoLayerNet

    methods = [m for m in NUMERICAL_METHODS if m in library_methods()]
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
                for method in methods:
                    net.numerical_gradient(xb, tb, method=method)
        kernels = backend.kernels
        for activation in ("sigmoid", "relu"):
            kernels.activation_backward(activation, xb, xb, kernels.activation_forward(activation, xb))
        kernels.softmax_cross_entropy_backward(kernels.softmax_cross_entropy(sb, tb)[1], tb)
        W = backend.asarray(rng.random((6, 3)), dtype=dtype)
        for need_dx in (False, True):
            kernels.affine_backward(sb, xb, W, need_dx)
    backend.synchronize()
