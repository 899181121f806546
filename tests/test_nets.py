"""Networks: initialisation, params semantics, backprop correctness, same numbers on every backend."""

from __future__ import annotations

import numpy as np
import pytest

from backends import get_backend
from kernels import ACTIVATIONS
from nets import MultiLayerNet, TwoLayerNet
from tests.conftest import assert_gradients_close


@pytest.fixture
def small_batch():
    rng = np.random.default_rng(3)
    return rng.random((8, 12)), rng.integers(0, 5, 8)


def test_two_layer_init_is_the_seed_rule():
    net = TwoLayerNet(784, 50, 10, weight_init_std=0.01, seed=0)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(net.params["W1"], 0.01 * rng.standard_normal((784, 50)))
    np.testing.assert_array_equal(net.params["W2"], 0.01 * rng.standard_normal((50, 10)))
    assert not net.params["b1"].any() and not net.params["b2"].any()
    assert net.n_params == 39_760 and list(net.params) == ["W1", "b1", "W2", "b2"]


@pytest.mark.parametrize(("rule", "gain"), [("he", 2.0), ("xavier", 1.0)])
def test_multilayer_init_scales(rule, gain):
    net = MultiLayerNet(400, [300, 200], 10, weight_init_std=rule, seed=1)
    for m, n_in in enumerate([400, 300, 200], start=1):
        assert abs(net.params[f"W{m}"].std() - np.sqrt(gain / n_in)) < 0.05 * np.sqrt(gain / n_in)
    assert list(net.params) == ["W1", "b1", "W2", "b2", "W3", "b3"]


def test_params_are_the_arrays_the_layers_use(small_batch):
    x, t = small_batch
    net = TwoLayerNet(12, 6, 5, weight_init_std=0.5)
    before = net.loss(x, t)
    net.params["W1"][...] = 0.0  # in place
    assert net.loss(x, t) != before
    net.params["W1"] = np.full((12, 6), 0.1)  # rebinding the dict entry is honoured too
    hidden = 1 / (1 + np.exp(-(x @ np.full((12, 6), 0.1) + net.params["b1"])))  # sigmoid, the default
    np.testing.assert_allclose(net.predict(x), hidden @ net.params["W2"] + net.params["b2"], rtol=1e-12, atol=0)
    assert net.layers[0].W is net.params["W1"]


def test_loss_accuracy_accept_labels_or_one_hot(small_batch):
    x, t = small_batch
    net = TwoLayerNet(12, 6, 5, weight_init_std=0.5)
    onehot = np.eye(5)[t]
    assert net.loss(x, t) == net.loss(x, onehot)
    assert net.accuracy(x, t) == net.accuracy(x, onehot)
    assert_gradients_close(net.gradient(x, onehot), net.gradient(x, t), atol=0)
    scores = net.predict(x)
    assert net.accuracy(x, t) == np.mean(scores.argmax(axis=1) == t)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backprop_matches_central_differences(activation, small_batch):
    x, t = small_batch
    net = MultiLayerNet(12, [7, 6], 5, activation=activation, weight_init_std=0.4, weight_decay_lambda=0.05, seed=2)
    assert_gradients_close(net.gradient(x, t), net.numerical_gradient(x, t), rtol=1e-6, atol=1e-8, context=activation)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_backend_computes_the_same_numbers(other_backend, activation):
    rng = np.random.default_rng(5)
    x, t = rng.standard_normal((33, 20)), rng.integers(0, 7, 33)
    nets = [
        MultiLayerNet(20, [16, 9], 7, activation=activation, weight_decay_lambda=0.01, seed=4, backend=be)
        for be in (get_backend("numpy"), other_backend)
    ]
    ref, other = nets
    xb = other_backend.asarray(x)
    np.testing.assert_allclose(other_backend.to_numpy(other.predict(xb)), ref.predict(x), rtol=1e-10)
    assert other.loss(xb, t) == pytest.approx(ref.loss(x, t), rel=1e-10, abs=0)
    assert other.accuracy(xb, t) == ref.accuracy(x, t)
    got, want = other.gradient(xb, t), ref.gradient(x, t)
    for name in want:
        np.testing.assert_allclose(other_backend.to_numpy(got[name]), want[name], rtol=1e-10, atol=0, err_msg=name)


def test_float32_net_runs_in_float32(backend, small_batch):
    x, t = small_batch
    net = TwoLayerNet(12, 6, 5, weight_init_std=0.5, backend=backend, dtype="float32")
    x32 = backend.asarray(x.astype(np.float32))
    assert net.predict(x32).dtype == np.float32
    assert all(g.dtype == np.float32 for g in net.gradient(x32, t).values())
    ref = TwoLayerNet(12, 6, 5, weight_init_std=0.5)
    assert net.loss(x32, t) == pytest.approx(ref.loss(x.astype(np.float32).astype(np.float64), t), rel=1e-5)


def test_weight_decay_adds_lambda_w(small_batch):
    x, t = small_batch
    plain = MultiLayerNet(12, [6], 5, seed=1)
    decayed = MultiLayerNet(12, [6], 5, weight_decay_lambda=0.3, seed=1)
    g0, g1 = plain.gradient(x, t), decayed.gradient(x, t)
    np.testing.assert_allclose(g1["W1"], g0["W1"] + 0.3 * plain.params["W1"], rtol=1e-14)
    np.testing.assert_array_equal(g1["b1"], g0["b1"])
    penalty = 0.15 * sum(np.sum(plain.params[k] ** 2) for k in ("W1", "W2"))
    assert decayed.loss(x, t) == pytest.approx(plain.loss(x, t) + penalty, rel=1e-14)


def test_layout_of_inputs_does_not_matter(backend, small_batch):
    x, t = small_batch
    net = TwoLayerNet(12, 6, 5, weight_init_std=0.5, backend=backend)
    want = backend.to_numpy(net.predict(backend.asarray(x)))
    fortran = np.asfortranarray(x)
    readonly = x.copy()
    readonly.setflags(write=False)
    strided = np.repeat(x, 2, axis=1)[:, ::2]
    for variant in (fortran, readonly, strided):
        np.testing.assert_array_equal(backend.to_numpy(net.predict(backend.asarray(variant))), want)
        grads = net.gradient(backend.asarray(variant), t)
        assert all(np.isfinite(backend.to_numpy(g)).all() for g in grads.values())


# -- validation of inputs that live on a device -------------------------------------------------------------
# cupy cannot run on this machine, so a stand-in device array module stands for it: numpy memory in an
# ndarray subclass, with the calls that read values back (dot for the finiteness check, stack for the
# label range) counted. The real CuPy path is the same code with cupy as xp (tests/test_cupy.py on a GPU).


class _DeviceArray(np.ndarray):
    """numpy memory posing as a device array (a type of its own, like cupy.ndarray)."""


def _device_backend():
    import types

    from backends import Backend
    from kernels import numpy_kernels

    xp = types.ModuleType("stand_in_device_xp")
    xp.__dict__.update({name: getattr(np, name) for name in ("float64", "int64", "isfinite", "flatnonzero")})
    xp.ndarray = _DeviceArray
    xp.reads = 0

    def counted(function):
        def read_back(*args, **kwargs):
            xp.reads += 1
            return function(*args, **kwargs)

        return read_back

    xp.dot, xp.stack = counted(np.dot), counted(np.stack)
    xp.asarray = lambda a, dtype=None: np.asarray(a, dtype=dtype).view(_DeviceArray)
    return Backend(name="stand-in-device", xp=xp, kernels=numpy_kernels)


def _one_hot_with(row: int, column: int, value: float) -> np.ndarray:
    """One-hot rows (8, 5) of labels 0 1 2 3 4 0 1 2 with one entry changed."""
    t = np.eye(5)[[0, 1, 2, 3, 4, 0, 1, 2]]
    t[row, column] = value
    return t


BAD_TARGETS = {
    "negative label": np.array([0, -1, 2, 1, 0, 3, 4, 2]),
    "label too large": np.array([0, 1, 2, 5, 0, 3, 4, 2]),
    "float labels": np.zeros(8),
    "bool labels": np.zeros(8, dtype=bool),
    "too few labels": np.array([0, 1, 2]),
    "3-D": np.zeros((8, 5, 1), dtype=np.int64),
    "one-hot with a 2": _one_hot_with(row=2, column=2, value=2.0),
    "one-hot, two ones": _one_hot_with(row=3, column=0, value=1.0),
    "one-hot wrong shape": np.eye(4)[[0, 1, 2, 3, 0, 1, 2, 3]],
    "bool one-hot": np.eye(5, dtype=bool)[[0, 1, 2, 3, 4, 0, 1, 2]],
}


@pytest.mark.parametrize("case", list(BAD_TARGETS))
def test_device_targets_fail_like_host_targets(small_batch, case):
    x, _ = small_batch
    device = _device_backend()
    host_net, device_net = TwoLayerNet(12, 6, 5), TwoLayerNet(12, 6, 5, backend=device)
    t = BAD_TARGETS[case]
    with pytest.raises((TypeError, ValueError)) as on_host:
        host_net.gradient(x, t)
    with pytest.raises(on_host.type) as on_device:
        device_net.gradient(device.asarray(x), device.asarray(t))
    assert str(on_device.value) == str(on_host.value)


def test_device_inputs_are_checked_once_per_array(small_batch):
    x, t = small_batch
    device = _device_backend()
    net = TwoLayerNet(12, 6, 5, weight_init_std=0.5, backend=device)
    reference = TwoLayerNet(12, 6, 5, weight_init_std=0.5)
    x_dev, t_dev = device.asarray(x), device.asarray(t)
    onehot_dev = device.asarray(np.eye(5)[t])
    got = net.gradient(x_dev, t_dev)
    assert device.xp.reads == 2  # x's finiteness, the labels' range: the only values read back
    assert_gradients_close(got, reference.gradient(x, t), atol=1e-15)
    net.gradient(x_dev, t_dev)
    assert net.loss(x_dev, t_dev) == pytest.approx(reference.loss(x, t), rel=1e-15)
    assert device.xp.reads == 2  # the same arrays again: their verdicts are remembered
    assert net.accuracy(x_dev, onehot_dev) == reference.accuracy(x, t)
    assert device.xp.reads == 2  # a one-hot check reads back one bool (row_ok.all()), not counted here
    net.gradient(device.asarray(x), t_dev)
    assert device.xp.reads == 3  # a new x array is checked

    x_nan = device.asarray(x)
    x_nan[2, 3] = np.nan
    with pytest.raises(ValueError, match=r"^x contains 1 NaN or Inf value\(s\); inputs must be finite$"):
        net.gradient(x_nan, t_dev)
    with pytest.raises(ValueError, match="x contains 1 NaN"):
        net.gradient(x_nan, t_dev)  # a failed check is not remembered as passed


def test_parameters_on_a_device_are_checked_on_every_call(small_batch):
    x, t = small_batch
    device = _device_backend()
    net = TwoLayerNet(12, 6, 5, weight_init_std=0.5, backend=device)
    x_dev, t_dev = device.asarray(x), device.asarray(t)
    net.numerical_gradient(x_dev, t_dev, method="incremental")
    net.params["W2"][1, 1] = np.inf  # in place, as optimizers write: never trusted from a past verdict
    with pytest.raises(ValueError, match=r"params\['W2'\] contains 1 NaN or Inf"):
        net.numerical_gradient(x_dev, t_dev, method="incremental")
