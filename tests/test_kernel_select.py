"""select=(layer, start, stop): every numerical-gradient kernel computes W[:, start:stop] and b[start:stop]
alone, and that is the corresponding slice of its full call, bit for bit (kernels/__init__.py).

incremental and batched compute exactly the selected columns' work (or the chunks holding them);
series computes the selected layer whole and slices it, which is why it is bit for bit too.
"""

from __future__ import annotations

import numpy as np
import pytest

from kernels import GradientProblem, xp_kernels
from kernels.activations import Activation
from nets import MultiLayerNet

METHODS = ("batched", "incremental", "series")
NETS = {  # sizes; three or more layers, so that every kind of layer is there
    "deep": [12, 9, 7, 6, 4],
    "two-hidden": [10, 8, 5, 3],
}


def problem_of(backend, sizes, activation, seed=3):
    """(GradientProblem, x, labels) on ``backend``: a net with weight decay and a sparse batch (one input all 0)."""
    net = MultiLayerNet(sizes[0], sizes[1:-1], sizes[-1], activation=activation, weight_init_std=0.6, seed=seed)
    rng = np.random.default_rng(seed)
    x = rng.random((9, sizes[0])) * (rng.random((9, sizes[0])) < 0.5)
    x[:, 0] = 0.0
    labels = rng.integers(0, sizes[-1], 9)
    weights = [backend.asarray(net.params[f"W{m}"]) for m in range(1, net.n_layers + 1)]
    biases = [backend.asarray(net.params[f"b{m}"]) for m in range(1, net.n_layers + 1)]
    problem = GradientProblem(weights, biases, activation, net.alpha, 0.03, 1e-3)
    return problem, backend.asarray(x), backend.asarray(labels)


def ranges(n_out):
    """Column ranges of a layer: all, the first, the last, and a few in the middle."""
    return sorted({(0, n_out), (0, 1), (n_out - 1, n_out), (1, max(2, n_out // 2)), (n_out // 3, n_out - 1 or 1)})


def kernel_of(backend, method):
    return getattr(backend.kernels, f"numerical_gradient_{method}")


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh", "leaky_relu"])
@pytest.mark.parametrize("case", list(NETS))
@pytest.mark.parametrize("method", METHODS)
def test_select_is_the_slice_of_the_full_call(backend, method, case, activation):
    """Every layer, several column ranges: the same bits, progress counts the selected parameters, and the
    kinks are the full call's rows of the selected entries, under that layer's names only."""
    sizes = NETS[case]
    problem, x, labels = problem_of(backend, sizes, activation)
    kernel = kernel_of(backend, method)
    full_kinks = None if method == "batched" else {}
    dWs, dbs = kernel(problem, x, labels, kinks=full_kinks)
    for layer in range(problem.n_layers):
        n_in, n_out = sizes[layer], sizes[layer + 1]
        for start, stop in ranges(n_out):
            if not start < stop:
                continue
            context = f"{backend.name}/{method}/{case}/{activation} select=({layer}, {start}, {stop})"
            done, kinks = [], None if method == "batched" else {}
            dW, db = kernel(problem, x, labels, progress=done.append, kinks=kinks, select=(layer, start, stop))
            dW, db = backend.to_numpy(dW), backend.to_numpy(db)
            want_W = np.ascontiguousarray(backend.to_numpy(dWs[layer])[:, start:stop])
            want_b = np.ascontiguousarray(backend.to_numpy(dbs[layer])[start:stop])
            assert dW.shape == (n_in, stop - start) and db.shape == (stop - start,), context
            assert dW.dtype == np.float64 and db.dtype == np.float64, context
            assert dW.tobytes() == want_W.tobytes(), f"{context}: max |diff| {np.abs(dW - want_W).max():.2e}"
            assert db.tobytes() == want_b.tobytes(), f"{context}: max |diff| {np.abs(db - want_b).max():.2e}"
            assert sum(done) == (n_in + 1) * (stop - start), context
            if kinks is None:
                continue
            assert sorted(kinks) == sorted([f"W{layer + 1}", f"b{layer + 1}"]), context
            for name, rows in kinks.items():
                every = backend.to_numpy(full_kinks[name])
                unit = every[:, 0] % n_out
                want = every[(unit >= start) & (unit < stop)]
                assert np.array_equal(backend.to_numpy(rows), want), f"{context}: kinks[{name!r}]"


def test_select_of_a_user_defined_activation(backend):
    """An Activation (incremental's generic loop; series falls back to it): the same slices."""
    softplus = Activation(
        "softplus", forward=lambda v: np.logaddexp(0.0, v), derivative=lambda v: 0.5 * (1 + np.tanh(v / 2))
    )
    problem, x, labels = problem_of(backend, NETS["deep"], softplus)
    for method in ("incremental", "series"):
        kernel = kernel_of(backend, method)
        dWs, dbs = kernel(problem, x, labels)
        for layer, start, stop in [(0, 2, 6), (2, 0, 6), (3, 1, 3)]:
            dW, db = kernel(problem, x, labels, select=(layer, start, stop))
            assert np.array_equal(backend.to_numpy(dW), backend.to_numpy(dWs[layer])[:, start:stop]), method
            assert np.array_equal(backend.to_numpy(db), backend.to_numpy(dbs[layer])[start:stop]), method


def test_batched_select_skips_the_chunks_it_does_not_need(monkeypatch):
    """With chunks of a few parameters, a bias range evaluates a few chunks' sets, not the whole net's,
    and still gives the full call's numbers (the kept chunks are the full call's chunks)."""
    from backends import get_backend

    backend = get_backend("numpy")
    problem, x, labels = problem_of(backend, NETS["deep"], "tanh")
    sets = []
    real = xp_kernels._batched_losses
    monkeypatch.setattr(xp_kernels, "_batched_losses", lambda *args: sets.append(args[-1]) or real(*args))
    kernel = backend.kernels.numerical_gradient_batched
    dWs, dbs = kernel(problem, x, labels, chunk_bytes=60_000)
    everything, sets[:] = sum(sets), []
    dW, db = kernel(problem, x, labels, select=(1, 2, 4), chunk_bytes=60_000)
    assert np.array_equal(db, dbs[1][2:4]) and np.array_equal(dW, dWs[1][:, 2:4])
    assert 0 < sum(sets) < everything / 3, (sum(sets), everything)


def test_incremental_select_computes_only_those_columns(monkeypatch):
    from backends import get_backend

    backend = get_backend("numpy")
    problem, x, labels = problem_of(backend, NETS["deep"], "relu")
    asked = []
    real = xp_kernels._hidden_layer_differences
    monkeypatch.setattr(
        xp_kernels, "_hidden_layer_differences", lambda *args: asked.append((args[8], args[9])) or real(*args)
    )
    backend.kernels.numerical_gradient_incremental(problem, x, labels, select=(1, 3, 5))
    assert asked == [(1, range(3, 5))]


@pytest.mark.parametrize(
    ("select", "error", "match"),
    [
        ((4, 0, 1), ValueError, "select layer 4 is not one of the net's layers 0..3"),
        ((0, 3, 3), ValueError, "select columns 3:3 are not a non-empty range of layer 0's 9"),
        ((1, 0, 8), ValueError, "select columns 0:8 are not a non-empty range of layer 1's 7"),
        ((0, 1), TypeError, "select must be None or"),
        ((0, 1.5, 3), TypeError, "select must be None or"),
    ],
)
@pytest.mark.parametrize("method", METHODS)
def test_a_bad_select_says_what_is_wrong(backend, method, select, error, match):
    problem, x, labels = problem_of(backend, NETS["deep"], "relu")
    with pytest.raises(error, match=match):
        kernel_of(backend, method)(problem, x, labels, select=select)


def test_batched_takes_no_kinks(backend):
    problem, x, labels = problem_of(backend, NETS["two-hidden"], "relu")
    with pytest.raises(ValueError, match="does not report kinks"):
        backend.kernels.numerical_gradient_batched(problem, x, labels, kinks={})
