"""Kernels of the seed setting (784-50-10, batch 100) on every backend, each group one kernel.

The elementary kernels (affine, activations, softmax + cross-entropy, forward and backward) are
called through the backend's kernel module with inputs taken from a real forward pass; "forward"
(net.loss) and "backprop" (net.gradient: forward + backward) run in float64 and float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from bench.common import (
    PROFILES,
    SEED_BATCH,
    SEED_N_PARAMS,
    SEED_SIZES,
    assert_same_computation,
    describe,
    flops_record,
    measure,
)
from nets import TwoLayerNet

NET_DTYPES = ("float64", "float32")


def _sigmoid(a: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-a))


def kernel_inputs(x: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
    """Host float64 arrays of one forward pass of the seed net, and seeded upstream gradients."""
    net = TwoLayerNet(*SEED_SIZES, seed=0, backend="numpy")
    W1, b1, W2, b2 = (np.asarray(net.params[name]) for name in ("W1", "b1", "W2", "b2"))
    a1 = x @ W1 + b1
    z1 = _sigmoid(a1)
    scores = z1 @ W2 + b2
    e = np.exp(scores - scores.max(axis=1, keepdims=True))
    rng = np.random.default_rng(2)
    return {
        "x": x,
        "W1": W1,
        "b1": b1,
        "W2": W2,
        "a1": a1,
        "z1": z1,
        "r1": np.maximum(a1, 0.0),
        "scores": scores,
        "probs": e / e.sum(axis=1, keepdims=True),
        "d_hidden": rng.standard_normal(a1.shape),
        "d_scores": rng.standard_normal(scores.shape),
    }


KERNEL_CALLS: dict[str, Callable[[Any, dict], Any]] = {
    "affine_forward": lambda k, a: k.affine_forward(a["x"], a["W1"], a["b1"]),
    "affine_backward_W1": lambda k, a: k.affine_backward(a["d_hidden"], a["x"], a["W1"], False),
    "affine_backward_W2": lambda k, a: k.affine_backward(a["d_scores"], a["z1"], a["W2"], True),
    "sigmoid_forward": lambda k, a: k.activation_forward("sigmoid", a["a1"]),
    "sigmoid_backward": lambda k, a: k.activation_backward("sigmoid", a["d_hidden"], a["a1"], a["z1"]),
    "relu_forward": lambda k, a: k.activation_forward("relu", a["a1"]),
    "relu_backward": lambda k, a: k.activation_backward("relu", a["d_hidden"], a["a1"], a["r1"]),
    "softmax_cross_entropy": lambda k, a: k.softmax_cross_entropy(a["scores"], a["t"]),
    "softmax_cross_entropy_backward": lambda k, a: k.softmax_cross_entropy_backward(a["probs"], a["t"]),
}


def pytest_generate_tests(metafunc):
    if "kernel" in metafunc.fixturenames:
        profile = PROFILES[metafunc.config.getoption("--gap-profile")]
        cases = [(name, dtype) for dtype in profile.kernel_dtypes for name in KERNEL_CALLS]
        metafunc.parametrize(("kernel", "dtype"), cases, ids=[f"{name}-{dtype}" for name, dtype in cases])


def as_dict(result: Any) -> dict[str, Any]:
    """A kernel's output(s) as {name: array}; outputs that are None (dx not asked for) are left out."""
    outputs = result if isinstance(result, tuple) else (result,)
    return {f"out{i}": out for i, out in enumerate(outputs) if out is not None}


def test_kernel(benchmark, backend, reference, kernel, dtype, data, profile):
    batch = data.first(SEED_BATCH)
    host = kernel_inputs(batch.x, batch.t)
    arrays = {name: backend.asarray(a, dtype=dtype) for name, a in host.items()}
    arrays["t"] = backend.asarray(batch.t)
    ref_arrays = {name: reference.asarray(a, dtype=dtype) for name, a in host.items()}
    ref_arrays["t"] = batch.t
    want = as_dict(KERNEL_CALLS[kernel](reference.kernels, ref_arrays))
    call = KERNEL_CALLS[kernel]

    def check(got):
        assert_same_computation(as_dict(got), want, dtype, f"{backend.name} {kernel} {dtype}")

    describe(
        benchmark,
        suite="kernels",
        group=f"kernel {kernel} {dtype} B={SEED_BATCH}",
        backend=backend.name,
        method=kernel,
        sizes=SEED_SIZES,
        n_params=SEED_N_PARAMS,
        batch=SEED_BATCH,
        dtype=dtype,
        data=batch,
        profile=profile,
    )
    measure(benchmark, backend, call, check, profile, args=(backend.kernels, arrays))


@pytest.mark.parametrize("dtype", NET_DTYPES)
@pytest.mark.parametrize("method", ["forward", "backprop"])
def test_net_pass(benchmark, backend, reference, method, dtype, data, profile):
    """forward: net.loss (one forward pass and the loss); backprop: net.gradient (forward + backward)."""
    batch = data.first(SEED_BATCH)
    net = TwoLayerNet(*SEED_SIZES, seed=0, backend=backend.name, dtype=dtype)
    twin = TwoLayerNet(*SEED_SIZES, seed=0, backend=reference.name, dtype=dtype)
    x, t = batch.on(backend, dtype)
    rx, rt = batch.on(reference, dtype)
    compute = net.loss if method == "forward" else net.gradient
    want = twin.loss(rx, rt) if method == "forward" else twin.gradient(rx, rt)

    def check(got):
        assert_same_computation(got, want, dtype, f"{backend.name} {method} {dtype}")

    describe(
        benchmark,
        suite="kernels",
        group=f"kernel {method} {dtype} B={SEED_BATCH}",
        backend=backend.name,
        method=method,
        sizes=SEED_SIZES,
        n_params=SEED_N_PARAMS,
        batch=SEED_BATCH,
        dtype=dtype,
        data=batch,
        profile=profile,
        **flops_record(method, twin, batch.x),
    )
    measure(benchmark, backend, compute, check, profile, args=(x, t))
