"""gradient_check: planted backprop bugs are found at the right entries, kinks are told from bugs,
float32 nets give no false failures, a custom activation with a wrong derivative is caught in its
region, and python -m nets.gradcheck exits 0 / 1 / 2 and writes JSON.

Bugs are planted by subclassing the net and changing what its gradient() returns; the numerics
themselves are the library's, on every backend the fixture provides.
"""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kernels.activations import Activation
from nets import MultiLayerNet, TwoLayerNet, gradcheck
from nets.gradient import ROUNDING_ULPS, SAFETY, GradientCheck, gradient_check

METHODS = ("naive", "batched", "incremental", "series")


# ----------------------------------------------------------------------------- activations (NumPy forms)


def _softplus(x):
    return np.logaddexp(0.0, x)


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _sigmoid_wrong_above_1(x):  # softplus' = sigmoid, but 1.5x too large where x > 1
    return np.where(x > 1, 1.5, 1.0) * _sigmoid(x)


def _sigmoid_wrong_above_0(x):
    return np.where(x > 0, 1.5, 1.0) * _sigmoid(x)


SOFTPLUS = Activation("softplus", _softplus, _sigmoid)
SOFTPLUS_WRONG_ABOVE_1 = Activation("softplus-wrong-above-1", _softplus, _sigmoid_wrong_above_1)
SOFTPLUS_WRONG_ABOVE_0 = Activation("softplus-wrong-above-0", _softplus, _sigmoid_wrong_above_0)


@functools.cache  # one set of jitted forms per session: the Numba loops compile once per form
def numba_softplus(wrong: bool) -> Activation:
    """The same activation with Numba-jitted scalar forms (the Numba kernels then run those)."""
    numba = pytest.importorskip("numba")
    forward = numba.njit(lambda x: math.log1p(math.exp(-abs(x))) + max(x, 0.0))
    if wrong:
        derivative = numba.njit(lambda x: (1.5 if x > 1 else 1.0) / (1.0 + math.exp(-x)))
        return Activation("softplus-wrong-above-1", _softplus, _sigmoid_wrong_above_1, forward, derivative)
    derivative = numba.njit(lambda x: 1.0 / (1.0 + math.exp(-x)))
    return Activation("softplus", _softplus, _sigmoid, forward, derivative)


# ----------------------------------------------------------------------------- data and planted bugs


def data(batch: int = 4, n_in: int = 6, n_out: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """x (batch, n_in) in (0.1, 1): every input moves every unit; labels covering the classes."""
    rng = np.random.default_rng(seed)
    return 0.1 + 0.9 * rng.random((batch, n_in)), np.arange(batch) % n_out


def every_index(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    return [tuple(int(i) for i in idx) for idx in np.ndindex(*shape)]


class ScaledW2(TwoLayerNet):
    """Backward off by a factor on one parameter: dW2 5% too large."""

    def gradient(self, x, t):
        grads = super().gradient(x, t)
        grads["W2"] = grads["W2"] * 1.05
        return grads


class TransposedW2(MultiLayerNet):
    """A square hidden-to-hidden weight gradient returned transposed."""

    def gradient(self, x, t):
        grads = super().gradient(x, t)
        grads["W2"] = grads["W2"].T.copy()
        return grads


class BiasWithoutDerivative(TwoLayerNet):
    """A wrong bias gradient: db1 sums dL/da1 over the batch, forgetting the activation's derivative."""

    def gradient(self, x, t):
        grads = super().gradient(x, t)
        be = self.backend
        scores = be.to_numpy(self.predict(x)).astype(np.float64)
        probs = np.exp(scores - scores.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        probs[np.arange(len(t)), be.to_numpy(t)] -= 1
        dout = probs / len(t)  # dL/dscores
        grads["b1"] = be.asarray((dout @ be.to_numpy(self.params["W2"]).T).sum(axis=0), dtype=self.dtype)
        return grads


def plain_twin(net):
    """The same net without the planted bug (the base class, same weights)."""
    base = type(net).__mro__[1]
    twin = base.__new__(base)
    twin.__dict__.update(net.__dict__)
    return twin


# ----------------------------------------------------------------------------- planted bugs are found


@pytest.mark.parametrize("method", ["naive", "incremental"])
def test_a_backward_off_by_a_factor_on_one_parameter_is_found_at_every_entry(backend, method):
    x, t = data()
    net = ScaledW2(6, 5, 3, activation="sigmoid", weight_init_std=0.5, seed=1, backend=backend.name)
    true = plain_twin(net).gradient(x, t)
    assert np.abs(backend.to_numpy(true["W2"])).min() > 1e-5  # so 5% of every entry is far above any bound
    report = gradient_check(net, x, t, method=method)
    assert report.verdict == "mismatch"
    assert report.mismatches() == {"W2": every_index((5, 3))}
    assert all(e.param == "W2" and e.verdict == "mismatch" for e in report.worst[:5])
    worst = report.params["W2"].worst[0]
    assert worst.error == pytest.approx(0.05 * abs(worst.numerical), rel=1e-6)
    assert gradient_check(plain_twin(net), x, t, method=method).verdict == "agrees"  # the control


@pytest.mark.parametrize("method", ["naive", "incremental"])
def test_a_transposed_weight_gradient_is_found_off_the_diagonal(backend, method):
    x, t = data(n_in=5)
    net = TransposedW2(5, [4, 4], 3, activation="tanh", weight_init_std=0.8, seed=2, backend=backend.name)
    true = backend.to_numpy(plain_twin(net).gradient(x, t)["W2"])
    assert np.abs(true - true.T)[~np.eye(4, dtype=bool)].min() > 1e-5  # every off-diagonal pair differs
    report = gradient_check(net, x, t, method=method)
    off_diagonal = [(i, j) for i in range(4) for j in range(4) if i != j]
    assert report.mismatches() == {"W2": off_diagonal}
    assert report.params["W2"].indices("agrees") == [(i, i) for i in range(4)]  # the diagonal is right
    assert gradient_check(plain_twin(net), x, t, method=method).verdict == "agrees"


@pytest.mark.parametrize("method", ["naive", "incremental"])
def test_a_wrong_bias_gradient_is_found_and_nothing_else(backend, method):
    x, t = data()
    net = BiasWithoutDerivative(6, 5, 3, activation="sigmoid", weight_init_std=0.5, seed=3, backend=backend.name)
    report = gradient_check(net, x, t, method=method)
    assert report.mismatches() == {"b1": [(j,) for j in range(5)]}
    assert report.params["W1"].counts == {"agrees": 30, "kink": 0, "mismatch": 0}
    entry = report.params["b1"].worst[0]
    assert entry.label.startswith("b1[") and entry.error > SAFETY * entry.bound
    assert report["b1"] > 1e3 * report["W1"]  # still seed 001's mapping {name: mean |difference|}


# ----------------------------------------------------------------------------- kinks


def net_on_a_kink(backend_name: str, activation: str) -> tuple[TwoLayerNet, np.ndarray, np.ndarray]:
    """A 6-5-3 net whose unit 2 has pre-activation 1e-6 for sample 1: every W1[:, 2], b1[2] move crosses it."""
    x, t = data()
    net = TwoLayerNet(6, 5, 3, activation=activation, weight_init_std=0.5, seed=1, backend=backend_name)
    b1 = net.backend.to_numpy(net.params["b1"]).copy()
    z = x @ net.backend.to_numpy(net.params["W1"]) + b1
    b1[2] += 1e-6 - z[1, 2]
    net.params["b1"][...] = net.backend.asarray(b1)
    return net, x, t


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_a_sample_on_a_kink_gives_kink_never_mismatch(backend, method, activation):
    net, x, t = net_on_a_kink(backend.name, activation)
    report = gradient_check(net, x, t, method=method)
    assert report.verdict == "kink" and report.kinks_reported
    assert report.mismatches() == {}
    assert report.params["W1"].indices("kink") == [(i, 2) for i in range(6)]
    assert report.params["b1"].indices("kink") == [(2,)]
    assert report.params["W2"].counts["kink"] == report.params["b2"].counts["kink"] == 0
    kinked = [e for e in report.worst if e.verdict == "kink"]
    assert kinked and all(e.kink == (1, 1, 2) and e.kink_step == "h" for e in kinked)
    # without the attribution these would be failures: the difference averages two slopes
    assert all(e.error > SAFETY * e.bound for e in kinked)


def test_kinks_of_a_deeper_layer_name_the_layer(backend):
    x, t = data(n_in=5)
    net = MultiLayerNet(5, [4, 4], 3, activation="relu", seed=4, backend=backend.name)
    W1, b1, W2 = (backend.to_numpy(net.params[n]) for n in ("W1", "b1", "W2"))
    z2 = np.maximum(x @ W1 + b1, 0) @ W2
    b2 = np.zeros(4)
    b2[1] = 1e-7 - z2[0, 1]  # sample 0, unit 1 of hidden layer 2 sits on the kink
    net.params["b2"][...] = backend.asarray(b2)
    found = {}
    for method in ("naive", "incremental", "series"):
        kinks = {}
        net.numerical_gradient(x, t, method=method, kinks=kinks)
        assert sorted(kinks) == sorted(net.params) and all(k.dtype == np.int64 for k in kinks.values())
        found[method] = {name: sorted(rows[:, 0].tolist()) for name, rows in kinks.items()}
        assert kinks["b2"].tolist() == [[1, 0, 2, 1]]  # flat index 1: (sample 0, layer 2, unit 1)
    assert found["naive"] == found["incremental"] == found["series"]
    report = gradient_check(net, x, t, method="naive")
    assert report.mismatches() == {} and (1,) in report.params["b2"].indices("kink")


def test_smooth_nets_report_no_kinks(backend):
    x, t = data()
    net = TwoLayerNet(6, 5, 3, activation="tanh", weight_init_std=0.5, backend=backend.name)
    kinks = {}
    net.numerical_gradient(x, t, kinks=kinks)
    assert {name: rows.shape for name, rows in kinks.items()} == {name: (0, 4) for name in net.params}


# ----------------------------------------------------------------------------- float32, the bound, the report


@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
@pytest.mark.parametrize("method", ["naive", "incremental"])
def test_float32_nets_are_checked_in_float64_without_false_failures(backend, mnist_train, activation, method):
    x_train, t_train = mnist_train
    x, t = x_train[:5].astype(np.float32), t_train[:5]
    net = TwoLayerNet(784, 4, 10, activation=activation, weight_init_std=0.1, backend=backend.name, dtype="float32")
    before = {name: backend.to_numpy(p).copy() for name, p in net.params.items()}
    report = gradient_check(net, x, t, method=method)
    assert report.dtype == "float32" and report.mismatches() == {}
    assert any("float64 twin" in note for note in report.notes)
    for name, p in net.params.items():  # the net is untouched and still float32
        assert p.dtype == np.float32 and np.array_equal(backend.to_numpy(p), before[name])
    # what a float32 comparison would have said: its rounding alone is far above the float64 bound
    own = {name: backend.to_numpy(g).astype(np.float64) for name, g in net.gradient(x, t).items()}
    assert any((np.abs(own[name] - p.numerical) > SAFETY * p.bound).any() for name, p in report.params.items())


def test_the_bound_is_richardson_plus_rounding_and_the_report_is_seed_001s_mapping():
    x, t = data()
    net = TwoLayerNet(6, 5, 3, activation="sigmoid", weight_init_std=0.5, seed=1)
    h = 1e-3
    report = gradient_check(net, x, t, method="incremental", h=h)
    assert isinstance(report, GradientCheck) and list(report) == ["W1", "b1", "W2", "b2"]
    backprop = net.gradient(x, t)
    numeric = net.numerical_gradient(x, t, method="incremental", h=h)
    numeric_2h = net.numerical_gradient(x, t, method="incremental", h=2 * h)
    scale = abs(net.loss(x, t)) + np.abs(net.predict(x)).max(axis=1).mean()
    rounding = 1.5 * ROUNDING_ULPS * np.finfo(np.float64).eps * scale / h
    for name in net.params:
        assert report[name] == pytest.approx(np.mean(np.abs(backprop[name] - numeric[name])), rel=1e-12)
        p = report.params[name]
        np.testing.assert_allclose(p.bound, np.abs(numeric_2h[name] - numeric[name]) / 3 + rounding, rtol=1e-12)
        assert p.max_abs == pytest.approx(np.abs(backprop[name] - numeric[name]).max(), rel=1e-12)
        assert 0 <= p.mean_rel <= p.max_rel < 1e-4
        assert (p.error <= p.bound).all()  # measured: a correct backprop sits inside 1x the bound, SAFETY is margin
    assert dict(report) == {name: report.params[name].mean_abs for name in net.params}


def test_the_cost_is_measured_in_the_same_call(backend):
    x, t = data()
    net = TwoLayerNet(6, 5, 3, activation="relu", weight_init_std=0.5, seed=1, backend=backend.name)
    for method, passes in (("naive", 4 * 53 + 2), ("batched", 4 * 53), ("incremental", None), ("series", None)):
        cost = gradient_check(net, x, t, method=method).cost
        assert (cost.method, cost.backend, cost.n_params, cost.forward_passes) == (method, backend.name, 53, passes)
        assert 0 < cost.backprop_s and 0 < cost.forward_s
        assert cost.total_s >= cost.numerical_s + cost.richardson_s + cost.kinks_s
        assert cost.ratio_to_backprop == pytest.approx(cost.total_s / cost.backprop_s)
        assert (cost.kinks_s > 0) == (method == "batched")  # batched takes its kinks from extra incremental passes


def test_bad_arguments_are_rejected():
    x, t = data()
    net = TwoLayerNet(6, 5, 3)
    with pytest.raises(ValueError, match="unknown method 'exact'"):
        gradient_check(net, x, t, method="exact")
    with pytest.raises(ValueError, match="h must be a positive finite number"):
        gradient_check(net, x, t, h=0)
    with pytest.raises(ValueError, match="safety must be a finite number > 0"):
        gradient_check(net, x, t, safety=-1)
    with pytest.raises(ValueError, match="worst must be an int >= 0"):
        gradient_check(net, x, t, worst=1.5)
    with pytest.raises(ValueError, match="'batched' does not report kinks"):
        net.numerical_gradient(x, t, method="batched", kinks={})


# ----------------------------------------------------------------------------- custom activations


def softplus_net(backend_name, activation):
    """6-4-3, unit 0's pre-activation near 3 for every sample (x > 1), the others in (-1, 1)."""
    net = TwoLayerNet(6, 4, 3, activation=activation, weight_init_std=0.1, seed=5, backend=backend_name)
    net.params["b1"][...] = net.backend.asarray(np.array([3.0, 0.0, 0.0, 0.0]))
    return net


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("forms", ["numpy", "numba"])
def test_a_wrong_custom_derivative_is_a_mismatch_exactly_in_its_region(backend, method, forms):
    if forms == "numba" and backend.name != "numba":
        pytest.skip("the Numba forms are used by the numba backend only")
    x, t = data()
    wrong = SOFTPLUS_WRONG_ABOVE_1 if forms == "numpy" else numba_softplus(wrong=True)
    net = softplus_net(backend.name, wrong)
    z = x @ backend.to_numpy(net.params["W1"]) + backend.to_numpy(net.params["b1"])
    assert (z[:, 0] > 1).all() and (np.abs(z[:, 1:]) < 1).all()  # only unit 0 lives in the wrong region
    report = gradient_check(net, x, t, method=method)
    assert report.mismatches() == {"W1": [(i, 0) for i in range(6)], "b1": [(0,)]}
    right = SOFTPLUS if forms == "numpy" else numba_softplus(wrong=False)
    assert gradient_check(softplus_net(backend.name, right), x, t, method=method).verdict == "agrees"


def test_custom_activation_numerical_gradients_agree_across_methods(backend):
    x, t = data(n_in=5)
    net = MultiLayerNet(5, [4, 4], 3, activation=SOFTPLUS, seed=6, weight_decay_lambda=0.1, backend=backend.name)
    reference = net.numerical_gradient(x, t, method="naive")
    for method in METHODS[1:]:
        got = net.numerical_gradient(x, t, method=method)
        for name, want in reference.items():
            np.testing.assert_allclose(backend.to_numpy(got[name]), backend.to_numpy(want), rtol=0, atol=1e-10)
    assert "Activation('softplus')" in repr(net)


def test_numba_runs_the_jitted_forms_when_given():
    """NumPy forms that are deliberately wrong, jitted forms that are right: the numba kernels use the latter."""
    numba_backend = pytest.importorskip("backends").get_backend("numba")
    right = numba_softplus(wrong=False)
    mixed = Activation("mixed", _sigmoid, _softplus, right.numba_forward, right.numba_derivative)
    x = np.linspace(-4, 4, 24).reshape(4, 6)
    k = numba_backend.kernels
    np.testing.assert_allclose(k.activation_forward(mixed, x), _softplus(x), rtol=1e-13)
    np.testing.assert_allclose(k.activation_backward(mixed, np.ones_like(x), x, x), _sigmoid(x), rtol=1e-13)
    assert k.activation_forward(mixed, x.astype(np.float32)).dtype == np.float32
    numpy_kernels = pytest.importorskip("backends").get_backend("numpy").kernels
    np.testing.assert_array_equal(numpy_kernels.activation_forward(mixed, x), _sigmoid(x))  # NumPy: its own forms
    # the same through a net: a wrong NumPy derivative, a right jitted one; backprop on numba uses the jitted one
    wrong_numpy_derivative = Activation(
        "mixed", _softplus, _sigmoid_wrong_above_1, right.numba_forward, right.numba_derivative
    )
    x, t = data()
    for name, verdict in (("numba", "agrees"), ("numpy", "mismatch")):
        assert gradient_check(softplus_net(name, wrong_numpy_derivative), x, t, method="incremental").verdict == verdict


def test_activation_codes_do_not_depend_on_the_order_of_activations():
    """ACTIVATIONS reversed before the kernels load: the compiled branches still compute each name's function."""
    code = """
import numpy as np
import kernels
kernels.ACTIVATIONS = tuple(reversed(kernels.ACTIVATIONS))
from kernels import numba_kernels, numpy_kernels
x = np.linspace(-3, 3, 13)
for name in kernels.ACTIVATIONS:
    want = numpy_kernels.activation_forward(name, x, 0.01)
    np.testing.assert_allclose(numba_kernels.activation_forward(name, x), want, rtol=1e-14, err_msg=name)
    dwant = numpy_kernels.activation_backward(name, np.ones_like(x), x, want, 0.01)
    got = numba_kernels.activation_backward(name, np.ones_like(x), x, want)
    np.testing.assert_allclose(got, dwant, rtol=1e-14, err_msg=name)
print("ok")
"""
    pytest.importorskip("numba")
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_an_activation_that_is_not_elementwise_is_rejected():
    summed = Activation("summed", lambda x: x.sum(axis=1), lambda x: np.ones_like(x))
    with pytest.raises(ValueError, match="'summed': its forward must be elementwise"):
        TwoLayerNet(6, 4, 3, activation=summed)
    with pytest.raises(TypeError, match="forward must be callable"):
        Activation("broken", None, _sigmoid)


# ----------------------------------------------------------------------------- the CLI


def run_cli(capsys, *args):
    code = gradcheck.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_agrees_exit_0_and_json(capsys, mnist_dir, tmp_path):
    path = tmp_path / "report.json"
    code, out, _ = run_cli(capsys, "--hidden", 8, "--method", "incremental", "--json", path, "--data-dir", mnist_dir)
    assert code == 0, out
    assert "OK: backprop agrees" in out and "verdict agrees" in out and "worst entries" in out
    saved = json.loads(path.read_text())
    assert saved["verdict"] == "agrees" and saved["mismatches"] == [] and saved["net"]["sizes"] == [784, 8, 10]
    assert list(saved["mean_abs"]) == ["W1", "b1", "W2", "b2"] and saved["cost"]["method"] == "incremental"


def test_cli_mismatch_exit_1_with_a_custom_activation(capsys, mnist_dir, tmp_path):
    path = tmp_path / "report.json"
    spec = "tests.test_gradient_check:SOFTPLUS_WRONG_ABOVE_0"
    code, out, err = run_cli(
        capsys, "--hidden", 8, "--method", "incremental", "--activation", spec, "--json", path, "--data-dir", mnist_dir
    )
    assert code == 1 and "FAIL:" in err and "entries mismatch" in err
    assert "softplus-wrong-above-0" in out and "mismatch" in out
    saved = json.loads(path.read_text())
    assert saved["verdict"] == "mismatch" and {e["param"] for e in saved["mismatches"]} == {"W1", "b1"}
    code, out, _ = run_cli(
        capsys, "--hidden", 8, "--method", "incremental", "--activation", "tests.test_gradient_check:SOFTPLUS",
        "--data-dir", mnist_dir,
    )  # fmt: skip
    assert code == 0, out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--activation", "no_such_module_xyz:thing"], "cannot load activation 'no_such_module_xyz:thing'"),
        (["--activation", "tests.test_gradient_check:MISSING"], "cannot load activation"),
        (["--activation", "tests.test_gradient_check:_softplus"], "is a function, not a kernels.activations"),
        (["--activation", "softmax"], "unknown activation 'softmax'"),
        (["--batch", "0"], "--batch must be in [1, 60000]"),
        (["--h", "-1"], "--h must be a positive finite number"),
        (["--backend", "tpu"], "unknown backend 'tpu'"),
    ],
)
def test_cli_bad_input_exit_2(capsys, mnist_dir, args, message):
    code, out, err = run_cli(capsys, *args, "--data-dir", mnist_dir)
    assert code == 2 and message in err and out == ""
