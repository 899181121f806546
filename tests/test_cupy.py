"""The CuPy backend against the NumPy reference: every kernel, loss and gradient (needs a CUDA device).

Every test takes the ``gpu`` fixture: the cupy backend, skipped with the backend's own error message
where cupy is not installed or no CUDA device can be used (``--require-backend cupy`` turns that skip
into a failure). Node ids carry "backend=cupy", so conftest marks every test here ``gpu``:

    python -m pytest -m gpu tests -q --require-backend cupy

Tolerances: float64 kernels, losses and backprop gradients agree with NumPy to 1e-10 relative to the
array's largest magnitude (cuBLAS and NumPy's BLAS add in different orders, so an element that nearly
cancels differs in its own last digits); float32 to 1e-5; numerical gradients agree with NumPy's naive
loop to 1e-9 absolute; repeated calls are bit-identical.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from backends import get_backend, to_numpy
from kernels import ACTIVATIONS, KERNEL_NAMES, GradientProblem
from nets import MultiLayerNet, TwoLayerNet
from nets.gradient import numerical_gradient
from tests.conftest import assert_gradients_close, make_backend

pytestmark = pytest.mark.gpu

REL = {"float64": 1e-10, "float32": 1e-5}
NUMERICAL_ATOL = 1e-9
METHODS = ("naive", "batched", "incremental")
DTYPES = ("float64", "float32")


@pytest.fixture(params=["cupy"], ids=["backend=cupy"])
def gpu(request):
    """The cupy backend; skipped with the reason where it cannot be created."""
    return make_backend(request, request.param)


@pytest.fixture
def ref():
    """The NumPy reference backend."""
    return get_backend("numpy")


def assert_matches(be, got, want, *, rel: float = REL["float64"], context: str = "") -> None:
    """got (a device array of ``be``) equals want (host): same shape and dtype, then values to ``rel``."""
    assert isinstance(got, be.xp.ndarray), f"{context}: got a {type(got).__name__}, not a device array"
    got, want = to_numpy(got), np.asarray(want)
    assert (got.shape, got.dtype) == (want.shape, want.dtype), (
        f"{context}: {got.shape} {got.dtype} vs {want.shape} {want.dtype}"
    )
    scale = float(np.abs(want).max()) if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=rel, atol=rel * scale, err_msg=context)


def assert_same_bits(first: dict, second: dict, context: str) -> None:
    for name in first:
        assert np.array_equal(to_numpy(first[name]), to_numpy(second[name])), f"{context}: {name} changed between calls"


# --- kernels --------------------------------------------------------------------------------------


def test_kernel_module_has_the_contract(gpu):
    assert gpu.name == "cupy" and gpu.xp.__name__ == "cupy"
    assert [name for name in KERNEL_NAMES if not callable(getattr(gpu.kernels, name, None))] == []


@pytest.mark.parametrize("dtype", DTYPES)
def test_affine_matches_numpy(gpu, ref, dtype):
    rng = np.random.default_rng(1)
    x, W, b, dout = (rng.standard_normal(shape).astype(dtype) for shape in [(7, 13), (13, 5), (5,), (7, 5)])
    x_d, W_d, b_d, dout_d = (gpu.asarray(a) for a in (x, W, b, dout))
    assert_matches(gpu, gpu.kernels.affine_forward(x_d, W_d, b_d), ref.kernels.affine_forward(x, W, b), rel=REL[dtype])
    for need_dx in (True, False):
        got = gpu.kernels.affine_backward(dout_d, x_d, W_d, need_dx)
        want = ref.kernels.affine_backward(dout, x, W, need_dx)
        assert (got[0] is None) is (not need_dx)
        for name, g, w in zip(("dx", "dW", "db"), got, want, strict=True):
            if w is not None:
                assert_matches(gpu, g, w, rel=REL[dtype], context=f"affine_backward {name}")


def activation_inputs(dtype: str) -> np.ndarray:
    x = np.random.default_rng(2).standard_normal((6, 9)) * 4
    x[0, :6] = [-1000.0, -30.0, -0.0, 0.0, 30.0, 1000.0]
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_activation_matches_numpy(gpu, ref, kind, dtype):
    x = activation_inputs(dtype)
    dout = np.random.default_rng(3).standard_normal(x.shape).astype(dtype)
    want_y = ref.kernels.activation_forward(kind, x)
    y = gpu.kernels.activation_forward(kind, gpu.asarray(x))
    assert_matches(gpu, y, want_y, rel=REL[dtype], context=f"{kind} forward")
    assert np.isfinite(to_numpy(y)).all()
    dx = gpu.kernels.activation_backward(kind, gpu.asarray(dout), gpu.asarray(x), y)
    want_dx = ref.kernels.activation_backward(kind, dout, x, want_y)
    assert_matches(gpu, dx, want_dx, rel=REL[dtype], context=f"{kind} backward")


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_is_overflow_safe(gpu, dtype):
    x = gpu.asarray(np.array([-1000.0, -745.0, -100.0, 0.0, 100.0, 1000.0], dtype=dtype))
    y = to_numpy(gpu.kernels.activation_forward("sigmoid", x))
    assert np.isfinite(y).all() and ((y >= 0) & (y <= 1)).all()
    assert (y[0], y[3], y[5]) == (0.0, 0.5, 1.0)


def score_rows(dtype: str, batch: int = 6, n_classes: int = 7) -> np.ndarray:
    scores = np.random.default_rng(4).standard_normal((batch, n_classes)) * 3
    scores[0, :3] = [1000.0, -1000.0, 999.0]
    scores[1] = -1000.0
    return scores.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_matches_numpy(gpu, ref, dtype):
    scores = score_rows(dtype)
    probs = gpu.kernels.softmax(gpu.asarray(scores))
    assert_matches(gpu, probs, ref.kernels.softmax(scores), rel=REL[dtype])
    np.testing.assert_allclose(to_numpy(probs).sum(axis=1), 1.0, rtol=10 * REL[dtype])


@pytest.mark.parametrize("batch", [6, 1537])  # 1537: more rows than the fused kernel's block has threads
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_cross_entropy_is_fused_and_matches_numpy(gpu, ref, dtype, batch):
    scores = score_rows(dtype, batch=batch, n_classes=10)
    labels = np.random.default_rng(5).integers(0, 10, batch)
    want_loss, want_probs = ref.kernels.softmax_cross_entropy(scores, labels)
    for labels_on_device in (gpu.asarray(labels), gpu.asarray(labels.astype(np.int32))):
        loss, probs = gpu.kernels.softmax_cross_entropy(gpu.asarray(scores), labels_on_device)
        assert loss.shape == () and loss.dtype == scores.dtype, "the loss stays on the device as a 0-d array"
        assert_matches(gpu, loss, want_loss, rel=REL[dtype], context="loss")
        assert_matches(gpu, probs, want_probs, rel=REL[dtype], context="probs")
    onehot = np.eye(10, dtype=dtype)[labels]
    loss, probs = gpu.kernels.softmax_cross_entropy(gpu.asarray(scores), gpu.asarray(onehot))
    want_loss, want_probs = ref.kernels.softmax_cross_entropy(scores, onehot)
    assert_matches(gpu, loss, want_loss, rel=REL[dtype], context="one-hot loss")
    assert_matches(gpu, probs, want_probs, rel=REL[dtype], context="one-hot probs")


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_cross_entropy_backward_matches_numpy(gpu, ref, dtype):
    probs = ref.kernels.softmax(score_rows(dtype, batch=9, n_classes=10))
    labels = np.random.default_rng(6).integers(0, 10, 9)
    for target in (labels, np.eye(10, dtype=dtype)[labels]):
        for dout in (1.0, 2.5):
            got = gpu.kernels.softmax_cross_entropy_backward(gpu.asarray(probs), gpu.asarray(target), dout)
            want = ref.kernels.softmax_cross_entropy_backward(probs, target, dout)
            assert_matches(gpu, got, want, rel=REL[dtype], context=f"target ndim {target.ndim}, dout {dout}")


def test_kernels_do_not_synchronize_with_the_host(gpu):
    """A training step and the two-layer incremental gradient queue work without waiting for the device.

    (The batched method and deep layers of the incremental one wait once per call or layer, on purpose:
    they size their work by the number of non-zero inputs.)
    """
    cupyx = pytest.importorskip("cupyx")
    allow_synchronize = getattr(cupyx, "allow_synchronize", None)
    if allow_synchronize is None:
        pytest.skip("this cupy has no cupyx.allow_synchronize to detect host synchronization with")
    rng = np.random.default_rng(7)
    x, W1, W2 = (gpu.asarray(rng.standard_normal(shape)) for shape in [(20, 12), (12, 9), (9, 5)])
    b1, b2 = gpu.xp.zeros(9), gpu.xp.zeros(5)
    labels = gpu.asarray(rng.integers(0, 5, 20))
    k = gpu.kernels
    with allow_synchronize(False):
        a = k.affine_forward(x, W1, b1)
        z = k.activation_forward("sigmoid", a)
        scores = k.affine_forward(z, W2, b2)
        loss, probs = k.softmax_cross_entropy(scores, labels)
        dscores = k.softmax_cross_entropy_backward(probs, labels)
        dz, _, _ = k.affine_backward(dscores, z, W2)
        k.activation_backward("sigmoid", dz, a, z)
        k.numerical_gradient_incremental(GradientProblem([W1, W2], [b1, b2], "sigmoid", 0.01, 0.0, 1e-4), x, labels)
    gpu.synchronize()
    assert np.isfinite(float(loss))


def test_synchronize_waits_for_queued_work(gpu):
    a = gpu.xp.ones((1024, 1024))
    for _ in range(4):
        a = a @ a / 1024
    gpu.synchronize()
    assert gpu.xp.cuda.get_current_stream().done
    assert float(a[0, 0]) == 1.0


# --- nets -----------------------------------------------------------------------------------------

NETS = {
    "two-layer": lambda act, backend, dtype: TwoLayerNet(
        12, 9, 5, activation=act, weight_init_std=0.5, seed=3, backend=backend, dtype=dtype
    ),
    "deep-decay": lambda act, backend, dtype: MultiLayerNet(
        10, [8, 7, 6], 4, activation=act, weight_decay_lambda=0.05, seed=4, backend=backend, dtype=dtype
    ),
    "one-layer": lambda act, backend, dtype: MultiLayerNet(
        9, [], 4, activation=act, seed=5, backend=backend, dtype=dtype
    ),
}


def make_batch(net, dtype: str = "float64", batch: int = 11, seed: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Inputs in [0, 1) with zeros, like MNIST's background, and one input that is 0 for the whole batch."""
    rng = np.random.default_rng(seed)
    x = rng.random((batch, net.input_size))
    x[x < 0.35] = 0.0
    x[:, 1] = 0.0
    return x.astype(dtype), rng.integers(0, net.output_size, batch)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", NETS)
def test_net_forward_and_backprop_match_numpy(gpu, case, activation, dtype):
    net, net_ref = NETS[case](activation, gpu.name, dtype), NETS[case](activation, "numpy", dtype)
    x, t = make_batch(net_ref, dtype)
    rel = REL[dtype]
    assert_matches(gpu, net.predict(x), net_ref.predict(x), rel=rel, context="predict")
    loss, want = net.loss(x, t), net_ref.loss(x, t)
    assert isinstance(loss, float) and abs(loss - want) <= rel * abs(want), (loss, want)
    assert net.accuracy(x, t) == net_ref.accuracy(x, t)
    grads, want_grads = net.gradient(x, t), net_ref.gradient(x, t)
    for name in net_ref.params:
        assert_matches(gpu, grads[name], want_grads[name], rel=rel, context=f"{case}/{activation} d{name}")
    assert net.loss(x, t) == loss
    assert_same_bits(grads, net.gradient(x, t), f"{case}/{activation} backprop")


def test_targets_and_inputs_on_the_device(gpu):
    net, net_ref = NETS["two-layer"]("relu", gpu.name, "float64"), NETS["two-layer"]("relu", "numpy", "float64")
    x, t = make_batch(net_ref)
    want = net_ref.loss(x, t)
    onehot = np.eye(net.output_size)[t]
    for x_in, t_in in [
        (gpu.asarray(x), gpu.asarray(t)),
        (x, gpu.asarray(t.astype(np.int32))),
        (x, gpu.asarray(onehot)),
    ]:
        assert abs(net.loss(x_in, t_in) - want) <= REL["float64"] * want
    bad = t.copy()
    bad[3] = net.output_size
    with pytest.raises(ValueError, match="labels must be integers"):
        net.loss(x, gpu.asarray(bad))
    onehot[2, 0] = 2.0
    with pytest.raises(ValueError, match="not one-hot"):
        net.loss(x, gpu.asarray(onehot))


@functools.cache
def numpy_naive(case: str, activation: str, dtype: str) -> dict[str, np.ndarray]:
    net = NETS[case](activation, "numpy", dtype)
    return net.numerical_gradient(*make_batch(net, dtype), method="naive")


def check_numerical(be, net, x, t, method: str, want: dict, context: str) -> None:
    """Matches ``want`` to NUMERICAL_ATOL, float64 device arrays, params untouched, bit-identical on repeat."""
    before = {name: to_numpy(p).copy() for name, p in net.params.items()}
    got = net.numerical_gradient(x, t, method=method)
    for name, grad in got.items():
        assert isinstance(grad, be.xp.ndarray) and grad.dtype == np.float64, f"{context}: {name} {type(grad)}"
    assert_gradients_close(got, want, atol=NUMERICAL_ATOL, context=context)
    for name, p in net.params.items():
        assert np.array_equal(to_numpy(p), before[name]), f"{context}: {name} was modified"
    if method != "naive":
        assert_same_bits(got, net.numerical_gradient(x, t, method=method), context)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", NETS)
def test_numerical_gradient_matches_numpy_naive(gpu, case, activation, method):
    net = NETS[case](activation, gpu.name, "float64")
    x, t = make_batch(net)
    check_numerical(gpu, net, x, t, method, numpy_naive(case, activation, "float64"), f"{case}/{activation}/{method}")


@pytest.mark.parametrize("method", METHODS)
def test_numerical_gradient_of_a_float32_net(gpu, method):
    net = NETS["two-layer"]("sigmoid", gpu.name, "float32")
    x, t = make_batch(net, "float32")
    check_numerical(gpu, net, x, t, method, numpy_naive("two-layer", "sigmoid", "float32"), f"float32/{method}")


@pytest.mark.parametrize("chunk_bytes", [1, 2**16])
@pytest.mark.parametrize("method", ["batched", "incremental"])
def test_numerical_gradient_in_small_chunks(gpu, monkeypatch, method, chunk_bytes):
    """A small chunk budget splits the perturbed sets (batched) and the units (deep layers) into many chunks."""
    monkeypatch.setattr(gpu.kernels, "_MAX_CHUNK_BYTES", chunk_bytes)
    net = NETS["deep-decay"]("relu", gpu.name, "float64")
    x, t = make_batch(net)
    want = numpy_naive("deep-decay", "relu", "float64")
    check_numerical(gpu, net, x, t, method, want, f"{method} in chunks of {chunk_bytes} bytes")


SELECT_METHODS = ("batched", "incremental", "series")


def device_problem(gpu, net) -> GradientProblem:
    """The net's float64 parameters on the device, as the kernels take them (weight decay, h = 1e-3)."""
    weights = [net.params[f"W{m}"].astype(np.float64) for m in range(1, net.n_layers + 1)]
    biases = [net.params[f"b{m}"].astype(np.float64) for m in range(1, net.n_layers + 1)]
    return GradientProblem(weights, biases, net.activation, net.alpha, 0.02, 1e-3)


@pytest.mark.parametrize("chunk_bytes", [2**16, None], ids=["small-chunks", "default-chunks"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("method", SELECT_METHODS)
def test_select_is_the_slice_of_the_full_call(gpu, monkeypatch, method, activation, chunk_bytes):
    """select=(layer, start, stop) gives W[:, start:stop] and b[start:stop] of the full call, bit for bit, with
    progress counting them and kinks holding the full call's rows of those entries (every layer, deep ones
    computed in skipped chunks of units when the budget is small)."""
    if chunk_bytes is not None:
        monkeypatch.setattr(gpu.kernels, "_MAX_CHUNK_BYTES", chunk_bytes)
    net = NETS["deep-decay"](activation, gpu.name, "float64")
    x, t = make_batch(net)
    x_d, t_d = gpu.asarray(x.astype(np.float64)), gpu.asarray(t.astype(np.int64))
    problem = device_problem(gpu, net)
    kernel = getattr(gpu.kernels, f"numerical_gradient_{method}")
    kinks_full = None if method == "batched" else {}
    dWs, dbs = kernel(problem, x_d, t_d, kinks=kinks_full)
    for layer in range(net.n_layers):
        n_out = net.sizes[layer + 1]
        for start, stop in sorted({(0, n_out), (0, 1), (n_out - 1, n_out), (1, max(2, n_out // 2))}):
            done = []
            kinks = None if method == "batched" else {}
            dW, db = kernel(problem, x_d, t_d, progress=done.append, kinks=kinks, select=(layer, start, stop))
            context = f"{method}/{activation} select=({layer}, {start}, {stop})"
            assert isinstance(dW, gpu.xp.ndarray) and dW.flags.c_contiguous, context
            assert np.array_equal(to_numpy(dW), to_numpy(dWs[layer])[:, start:stop]), context
            assert np.array_equal(to_numpy(db), to_numpy(dbs[layer])[start:stop]), context
            assert sum(done) == (net.sizes[layer] + 1) * (stop - start), context
            if kinks is not None:
                assert sorted(kinks) == sorted([f"W{layer + 1}", f"b{layer + 1}"]), context
                for name, rows in kinks.items():
                    full = to_numpy(kinks_full[name])
                    unit = full[:, 0] % n_out
                    want = full[(unit >= start) & (unit < stop)]
                    assert np.array_equal(to_numpy(rows), want), f"{context} {name}"


def test_select_of_a_user_defined_activation(gpu):
    """An Activation takes the generic loop on the device too; its selection is the full call's slice."""
    from kernels.activations import Activation

    softplus = Activation(
        "softplus", forward=lambda v: gpu.xp.logaddexp(0.0, v), derivative=lambda v: 0.5 * (1 + gpu.xp.tanh(v / 2))
    )
    net = MultiLayerNet(12, [9, 7], 5, activation=softplus, weight_init_std=0.5, seed=3, backend=gpu.name)
    x, t = make_batch(net)
    x_d, t_d = gpu.asarray(x.astype(np.float64)), gpu.asarray(t.astype(np.int64))
    problem = device_problem(gpu, net)
    for method in ("incremental", "series"):
        kernel = getattr(gpu.kernels, f"numerical_gradient_{method}")
        dWs, dbs = kernel(problem, x_d, t_d)
        dW, db = kernel(problem, x_d, t_d, select=(0, 2, 6))
        assert np.array_equal(to_numpy(dW), to_numpy(dWs[0])[:, 2:6]), method
        assert np.array_equal(to_numpy(db), to_numpy(dbs[0])[2:6]), method


def test_textbook_numerical_gradient_on_device_arrays(gpu):
    values = np.random.default_rng(9).standard_normal((3, 4))
    a = gpu.asarray(values)
    grad = numerical_gradient(lambda v: (v**3).sum(), a, h=1e-4)
    assert isinstance(grad, gpu.xp.ndarray) and grad.dtype == np.float64
    np.testing.assert_allclose(to_numpy(grad), 3 * values**2 + 1e-8, rtol=0, atol=1e-8)
    assert np.array_equal(to_numpy(a), values)
    calls = []

    def interrupted(v):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return v.sum()

    with pytest.raises(KeyboardInterrupt):
        numerical_gradient(interrupted, a)
    assert np.array_equal(to_numpy(a), values), "the perturbed element is put back when f is interrupted"


@pytest.mark.slow
def test_mnist_nets_match_numpy(gpu, mnist_dir):
    """The textbook's 784-50-10 sigmoid net and a 784-100-100-10 ReLU net on 100 MNIST images."""
    from nets.data import load_mnist

    (x_train, t_train), _ = load_mnist(data_dir=mnist_dir, dtype="float64")
    x, t = x_train[:100], t_train[:100]
    for make in (
        lambda be: TwoLayerNet(784, 50, 10, backend=be),
        lambda be: MultiLayerNet(784, [100, 100], 10, activation="relu", backend=be),
    ):
        net, net_ref = make(gpu.name), make("numpy")
        grads, want_grads = net.gradient(x, t), net_ref.gradient(x, t)
        for name in net_ref.params:
            assert_matches(gpu, grads[name], want_grads[name], context=f"{net!r} backprop d{name}")
        want = net_ref.numerical_gradient(x, t, method="incremental")
        for method in ("batched", "incremental"):
            check_numerical(gpu, net, x, t, method, want, f"{net!r} {method}")


# --- fused backprop (kernels._cupy_backprop) --------------------------------------------------------

# Shapes that reach every branch of the fused kernels: the seed net (784-50-10, batch 100); a deep net
# with weight decay, more rows than the output kernel's block has threads (1100 > 512), hidden widths
# over one column-sum block (70, 40 > 32) and more classes than that block has warps (20 > 16).
FUSED_NETS = {
    "seed": (lambda act, be, dtype: TwoLayerNet(784, 50, 10, activation=act, backend=be, dtype=dtype), 100),
    "deep-decay-wide": (
        lambda act, be, dtype: MultiLayerNet(
            30, [70, 40], 20, activation=act, weight_decay_lambda=0.01, seed=6, backend=be, dtype=dtype
        ),
        1100,
    ),
}


def device_inputs(gpu, net, dtype: str, batch: int) -> tuple[np.ndarray, np.ndarray, object, object]:
    """(x, t) on the host and on the device (labels int64, as nets hands them to the kernels)."""
    x, t = make_batch(net, dtype, batch=batch, seed=10)
    return x, t, gpu.asarray(x), gpu.asarray(t.astype(np.int64))


def kernel_args(net, x_d, t_d) -> tuple[list, list, object, object]:
    weights = [net.params[f"W{m}"] for m in range(1, net.n_layers + 1)]
    biases = [net.params[f"b{m}"] for m in range(1, net.n_layers + 1)]
    return weights, biases, x_d, t_d


@pytest.mark.parametrize("raw_cublas", [True, False], ids=["raw-cublas", "cupy-matmul"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", FUSED_NETS)
def test_fused_backprop_matches_numpy(gpu, ref, monkeypatch, case, activation, dtype, raw_cublas):
    """The fused path is taken, and its loss, dWs and dbs (kernel level) and net.gradient (weight decay
    added by nets) match NumPy to 1e-10 (float64) / 1e-5 (float32) relative; repeat calls are bit-identical."""
    monkeypatch.setattr(gpu.kernels, "_FUSED_BACKPROP", True)
    monkeypatch.setattr(gpu.kernels, "_RAW_CUBLAS", raw_cublas)
    make, batch = FUSED_NETS[case]
    net, net_ref = make(activation, gpu.name, dtype), make(activation, "numpy", dtype)
    x, t, x_d, t_d = device_inputs(gpu, net, dtype, batch)
    args = kernel_args(net, x_d, t_d)
    assert gpu.kernels._FUSED_BACKPROP and gpu.kernels._backprop.fusable(*args, activation), "not the fused path"
    rel, context = REL[dtype], f"{case}/{activation}/{dtype}/{'raw' if raw_cublas else 'matmul'}"
    loss, dWs, dbs = gpu.kernels.network_gradient(*args, activation, net.alpha)
    ref_args = kernel_args(net_ref, x, t.astype(np.int64))
    want_loss, want_dWs, want_dbs = ref.kernels.network_gradient(*ref_args, activation, net.alpha)
    assert loss.shape == () and isinstance(loss, gpu.xp.ndarray), "the loss stays on the device as a 0-d array"
    assert_matches(gpu, loss, want_loss, rel=rel, context=f"{context} loss")
    for m, (got_W, want_W, got_b, want_b) in enumerate(zip(dWs, want_dWs, dbs, want_dbs, strict=True), start=1):
        assert_matches(gpu, got_W, want_W, rel=rel, context=f"{context} dW{m}")
        assert_matches(gpu, got_b, want_b, rel=rel, context=f"{context} db{m}")
    again = gpu.kernels.network_gradient(*args, activation, net.alpha)
    assert np.array_equal(to_numpy(again[0]), to_numpy(loss)), f"{context}: loss changed between calls"
    for name, first, second in zip(("dW", "db"), (dWs, dbs), (again[1], again[2]), strict=True):
        for m, (a, b) in enumerate(zip(first, second, strict=True), start=1):
            assert np.array_equal(to_numpy(a), to_numpy(b)), f"{context}: {name}{m} changed between calls"
    grads, want_grads = net.gradient(x_d, t_d), net_ref.gradient(x, t)
    for name in net_ref.params:
        assert_matches(gpu, grads[name], want_grads[name], rel=rel, context=f"{context} net.gradient d{name}")
    assert_same_bits(grads, net.gradient(x_d, t_d), f"{context} net.gradient")


@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
def test_generic_backprop_still_matches_numpy(gpu, ref, monkeypatch, activation):
    """_FUSED_BACKPROP = False (the lead's one-line switch) gives the generic path, which must stay correct."""
    monkeypatch.setattr(gpu.kernels, "_FUSED_BACKPROP", False)
    make, batch = FUSED_NETS["deep-decay-wide"]
    net, net_ref = make(activation, gpu.name, "float64"), make(activation, "numpy", "float64")
    x, t, x_d, t_d = device_inputs(gpu, net, "float64", batch)
    grads, want = net.gradient(x_d, t_d), net_ref.gradient(x, t)
    for name in net_ref.params:
        assert_matches(gpu, grads[name], want[name], context=f"generic {activation} d{name}")


def test_backprop_off_the_fused_path_matches_numpy(gpu, ref):
    """Inputs the fused kernels do not take (a user-defined Activation; F-ordered x; int32 labels at the
    kernel level) go to the generic implementation and give the NumPy numbers."""
    from kernels.activations import Activation

    softplus = Activation(
        "softplus", forward=lambda v: np.logaddexp(0.0, v), derivative=lambda v: 1.0 / (1.0 + np.exp(-v))
    )
    net = TwoLayerNet(12, 9, 5, activation=softplus, weight_init_std=0.5, seed=3, backend=gpu.name)
    net_ref = TwoLayerNet(12, 9, 5, activation=softplus, weight_init_std=0.5, seed=3, backend="numpy")
    x, t, x_d, t_d = device_inputs(gpu, net, "float64", 11)
    assert not gpu.kernels._backprop.fusable(*kernel_args(net, x_d, t_d), softplus)
    grads, want = net.gradient(x_d, t_d), net_ref.gradient(x, t)
    for name in want:
        assert_matches(gpu, grads[name], want[name], context=f"softplus d{name}")
    net, net_ref = NETS["two-layer"]("tanh", gpu.name, "float64"), NETS["two-layer"]("tanh", "numpy", "float64")
    x, t, x_d, t_d = device_inputs(gpu, net, "float64", 11)
    fortran_x = gpu.xp.asfortranarray(x_d)
    assert not gpu.kernels._backprop.fusable(*kernel_args(net, fortran_x, t_d), "tanh")
    assert not gpu.kernels._backprop.fusable(*kernel_args(net, x_d, t_d.astype(np.int32)), "tanh")
    _, dWs, _ = gpu.kernels.network_gradient(*kernel_args(net, fortran_x, t_d), "tanh", net.alpha)
    want = net_ref.gradient(x, t)
    assert_matches(gpu, dWs[0], want["W1"], context="F-ordered x dW1")


def test_backprop_does_not_synchronize(gpu):
    """net.gradient on device inputs seen before (their checks are remembered) queues its work without
    waiting for the device: no host round trip in a training step."""
    cupyx = pytest.importorskip("cupyx")
    allow_synchronize = getattr(cupyx, "allow_synchronize", None)
    if allow_synchronize is None:
        pytest.skip("this cupy has no cupyx.allow_synchronize to detect host synchronization with")
    for make, batch in FUSED_NETS.values():
        net = make("relu", gpu.name, "float64")
        _, _, x_d, t_d = device_inputs(gpu, net, "float64", batch)
        net.gradient(x_d, t_d)  # the first look at x_d and t_d validates them (one read back each)
        gpu.synchronize()
        with allow_synchronize(False):
            grads = net.gradient(x_d, t_d)
        gpu.synchronize()
        assert all(np.isfinite(to_numpy(g)).all() for g in grads.values())
