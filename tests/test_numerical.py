"""Numerical gradients: every method on every backend gives the NumPy naive central differences."""

from __future__ import annotations

import numpy as np
import pytest

from kernels import ACTIVATIONS
from nets import MultiLayerNet, TwoLayerNet
from nets.gradient import gradient_check, numerical_gradient
from nets.optimizers import SGD
from tests.conftest import assert_gradients_close, session_gradient

METHODS = ("naive", "batched", "incremental", "series")
ATOL = 2e-11  # absolute, against the NumPy naive loop (its own float64 cancellation is ~5e-12 at h = 1e-4)
# Another backend's naive loop is the reference's own loop on that backend's kernels (which tests/test_kernels.py
# checks element by element): it runs on every 8th element of W1 and every other parameter, 9,060 of 39,760.
NAIVE_W1_STRIDE = 8


def snapshot(net):
    return {name: net.backend.to_numpy(p).copy() for name, p in net.params.items()}


def assert_params_unchanged(net, before):
    for name, p in net.params.items():
        assert np.array_equal(net.backend.to_numpy(p), before[name]), f"{name} changed"


# ---------------------------------------------------------------- the seed setting, real MNIST


@pytest.fixture(scope="session")
def reference_states(mnist_train, mnist_batch):
    """state -> (parameters, the NumPy naive gradient over all 39,760 of them), once per session; the
    untimed benchmarks take their NumPy naive references of the fresh net from it (bench.common.session_gradient)."""
    x, t = mnist_batch
    x_train, t_train = mnist_train
    states = {}
    fresh = TwoLayerNet(784, 50, 10, seed=0)
    trained = TwoLayerNet(784, 50, 10, seed=0)
    optimizer, rng = SGD(lr=0.1), np.random.default_rng(0)
    for _ in range(100):
        pick = rng.choice(len(x_train), 100)
        optimizer.update(trained.params, trained.gradient(x_train[pick], t_train[pick]))
    for label, net in (("fresh", fresh), ("after 100 SGD steps", trained)):
        states[label] = (snapshot(net), session_gradient(net, x, t, "naive"))
    return states


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("state", ["fresh", "after 100 SGD steps"])
def test_seed_setting_agrees_with_numpy_naive(backend, method, state, reference_states, mnist_batch):
    params, reference = reference_states[state]
    if backend.name == "numpy" and method == "naive":
        pytest.skip("this is the reference itself")
    net = TwoLayerNet(784, 50, 10, seed=0, backend=backend)
    for name, value in params.items():
        net.params[name][...] = backend.asarray(value)
    x, t = mnist_batch
    if method == "naive":  # the same loop as the reference, on other kernels: every 8th element of W1 and the rest
        entries = {name: list(np.ndindex(*value.shape)) for name, value in params.items()}
        entries["W1"] = entries["W1"][::NAIVE_W1_STRIDE]
        got = net.numerical_gradient(backend.asarray(x), t, method=method, entries=entries)
        picked = {name: np.zeros(value.shape, dtype=bool) for name, value in params.items()}
        for name, indices in entries.items():
            picked[name][tuple(np.array(indices).T)] = True
        expected = {name: np.where(picked[name], want, 0.0) for name, want in reference.items()}
    else:  # shared with the untimed benchmarks of the same net and batch (bench/bench_gap.py), once per session
        got = session_gradient(net, backend.asarray(x), t, method)
        expected = reference
    assert all(g.dtype == np.float64 for g in got.values())
    assert_gradients_close(got, expected, atol=ATOL, context=f"{backend.name}/{method}/{state}")
    assert_params_unchanged(net, params)
    assert_gradients_close(net.gradient(backend.asarray(x), t), reference, rtol=1e-5, atol=1e-8, context="backprop")


def test_the_references_are_the_plain_loops_numbers(reference_states, mnist_batch):
    """The references come from bench.common.naive_in_threads (the loop's entries split between threads, one BLAS
    thread each): the plain loop gives the same numbers bit for bit, here at 359 entries of every array (an odd
    stride: both threads' shares)."""
    x, t = mnist_batch
    for state, (params, reference) in reference_states.items():
        net = TwoLayerNet(784, 50, 10, seed=0)
        for name, value in params.items():
            net.params[name][...] = value
        entries = {name: list(np.ndindex(*value.shape)) for name, value in params.items()}
        entries["W1"], entries["W2"] = entries["W1"][::197], entries["W2"][::5]
        got = net.numerical_gradient(x, t, method="naive", entries=entries)
        for name, indices in entries.items():
            rows = tuple(np.array(indices).T)
            assert np.array_equal(got[name][rows], reference[name][rows]), f"{state}: {name}"


@pytest.mark.parametrize("method", ["batched", "incremental", "series"])
def test_repeated_calls_are_bit_identical(backend, method, mnist_batch):
    x, t = mnist_batch
    hidden = 8 if method == "batched" else 50  # brute force on the full seed net costs seconds per call
    net = TwoLayerNet(784, hidden, 10, seed=0, backend=backend)
    xb = backend.asarray(x)
    first = net.numerical_gradient(xb, t, method=method)
    second = net.numerical_gradient(xb, t, method=method)
    for name in first:
        assert np.array_equal(backend.to_numpy(first[name]), backend.to_numpy(second[name])), name


def test_gradient_check_of_the_seed_net_on_three_images(backend, mnist_batch):
    x, t = mnist_batch
    net = TwoLayerNet(784, 50, 10, seed=0, backend=backend)
    diffs = gradient_check(net, backend.asarray(x[:3]), t[:3], method="incremental")
    assert set(diffs) == {"W1", "b1", "W2", "b2"}
    assert all(value <= 1e-9 for value in diffs.values()), diffs


# ---------------------------------------------------------------- every layer, activation, decay


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_all_methods_agree_on_a_deep_net(backend, activation):
    rng = np.random.default_rng(11)
    x = rng.random((9, 15)) * (rng.random((9, 15)) < 0.6)  # zeros, like MNIST pixels
    t = rng.integers(0, 4, 9)
    kwargs = dict(activation=activation, weight_init_std=0.5, weight_decay_lambda=0.02, seed=3)
    reference = MultiLayerNet(15, [8, 7, 6], 4, **kwargs).numerical_gradient(x, t, method="naive")
    net = MultiLayerNet(15, [8, 7, 6], 4, backend=backend, **kwargs)
    before = snapshot(net)
    for method in METHODS:
        got = net.numerical_gradient(backend.asarray(x), t, method=method)
        assert_gradients_close(got, reference, atol=ATOL, context=f"{backend.name}/{activation}/{method}")
        assert_params_unchanged(net, before)
    assert_gradients_close(net.gradient(backend.asarray(x), t), reference, rtol=1e-5, atol=1e-8, context="backprop")


def test_float32_net_is_differenced_in_float64(backend):
    rng = np.random.default_rng(2)
    x, t = rng.random((6, 10)), rng.integers(0, 3, 6)
    net32 = TwoLayerNet(10, 5, 3, weight_init_std=0.5, backend=backend, dtype="float32")
    net64 = TwoLayerNet(10, 5, 3, weight_init_std=0.5, dtype="float64")
    for name, p in net32.params.items():
        net64.params[name][...] = backend.to_numpy(p).astype(np.float64)
    x32 = x.astype(np.float32)
    reference = net64.numerical_gradient(x32.astype(np.float64), t)
    before = snapshot(net32)
    for method in METHODS:
        got = net32.numerical_gradient(backend.asarray(x32), t, method=method)
        assert all(g.dtype == np.float64 for g in got.values())
        assert_gradients_close(got, reference, atol=1e-9, context=f"float32/{method}")
        assert_params_unchanged(net32, before)


@pytest.mark.parametrize("h", [0, -1e-4, float("nan"), float("inf")])
def test_bad_step_is_an_error(h):
    net = TwoLayerNet(4, 3, 2)
    with pytest.raises(ValueError, match="h must be a positive finite number"):
        net.numerical_gradient(np.ones((2, 4)), [0, 1], h=h)
    with pytest.raises(ValueError, match="h must be a positive finite number"):
        numerical_gradient(lambda a: float(a.sum()), np.ones(3), h=h)


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="unknown method 'fast'; valid: naive, batched, incremental, series"):
        TwoLayerNet(4, 3, 2).numerical_gradient(np.ones((2, 4)), [0, 1], method="fast")


# ---------------------------------------------------------------- the generic textbook function


def himmelblau(p):
    x, y = p[0], p[1]
    return (x**2 + y - 11) ** 2 + (x + y**2 - 7) ** 2


def himmelblau_gradient(x, y):
    return np.array([4 * x * (x**2 + y - 11) + 2 * (x + y**2 - 7), 2 * (x**2 + y - 11) + 4 * y * (x + y**2 - 7)])


@pytest.mark.parametrize("point", [(0.0, 0.0), (3.0, 2.0), (-2.805118, 3.131312), (1.5, -0.7)])
def test_himmelblau_gradient(point):
    p = np.array(point)
    got = numerical_gradient(himmelblau, p)
    # central differences are exact for quadratics; Himmelblau is quartic: error h^2/6 f''' ~ 1e-7
    np.testing.assert_allclose(got, himmelblau_gradient(*point), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(p, np.array(point))


def test_generic_function_two_dimensional_and_float64_result():
    W = np.arange(6.0).reshape(2, 3) / 10
    got = numerical_gradient(lambda a: float(np.sum(a**2)), W)
    assert got.shape == (2, 3) and got.dtype == np.float64
    np.testing.assert_allclose(got, 2 * W, rtol=1e-9)


@pytest.mark.parametrize("exception", [ValueError, KeyboardInterrupt])
def test_generic_function_restores_the_array_when_f_raises(exception):
    x = np.random.default_rng(0).standard_normal((4, 5))
    original = x.copy()
    calls = {"n": 0}

    def f(a):
        calls["n"] += 1
        if calls["n"] == 14:  # mid-way, while an element is moved to x - h
            raise exception("stop")
        return float(np.sum(a**3))

    with pytest.raises(exception):
        numerical_gradient(f, x)
    assert np.array_equal(x, original)
