"""The "series" numerical gradient: the naive loop's central differences from Taylor series (docs/series.md).

References are the library's textbook loop (nets.gradient.numerical_gradient) over a fixed sample of
parameter entries: 16 per parameter array (input-weight rows restricted to pixels that are
non-zero somewhere in the batch, where the gradient is not trivially 0), plus, on relu nets, entries
whose perturbation crosses a kink (the fallback path). The full loop over the deep net's 110k
parameters would take minutes; the sample keeps the module within ~30 s on two free cores.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import kernels
from kernels import GradientProblem, xp_kernels
from nets import MultiLayerNet, TwoLayerNet
from nets.gradient import numerical_gradient
from nets.optimizers import SGD

ATOL = 2e-11  # absolute, against the NumPy naive loop (whose own float64 cancellation is ~5e-12 at h=1e-4)
PER_ARRAY = 16


def make_net(kind, backend="numpy"):
    if kind == "seed":
        return TwoLayerNet(784, 50, 10, activation="sigmoid", weight_init_std=0.01, seed=0, backend=backend)
    return MultiLayerNet(784, [100] * 4, 10, activation=kind, seed=0, backend=backend)


def train(net, mnist_train, steps=100):
    x_train, t_train = mnist_train
    optimizer, rng = SGD(lr=0.1), np.random.default_rng(0)
    for _ in range(steps):
        pick = rng.choice(len(x_train), 100)
        optimizer.update(net.params, net.gradient(x_train[pick], t_train[pick]))
    return net


def sample_entries(net, x, extra=None, seed=0):
    """{name: flat indices}: PER_ARRAY random entries per array (W1 rows of pixels used by the batch)."""
    rng = np.random.default_rng(seed)
    used_rows = np.flatnonzero((x != 0).any(axis=0))
    picks = {}
    for name, p in net.params.items():
        if name == "W1":
            rows = rng.choice(used_rows, PER_ARRAY)
            flat = rows * p.shape[1] + rng.integers(0, p.shape[1], PER_ARRAY)
        else:
            flat = rng.choice(p.size, min(PER_ARRAY, p.size), replace=False)
        if extra is not None and name in extra:
            flat = np.concatenate([flat, extra[name]])
        picks[name] = np.unique(flat)
    return picks


def naive_at(net, x, t, picks, h):
    """The library's textbook loop (nets.gradient.numerical_gradient), restricted to the picked entries of a
    NumPy net (restored after); the loss is the naive method's: NumPy kernels, a full forward pass."""
    k = net.backend.kernels
    n_layers = net.n_layers
    labels = np.asarray(t)

    def full_loss():
        z = x
        for m in range(1, n_layers + 1):
            z = k.affine_forward(z, net.params[f"W{m}"], net.params[f"b{m}"])
            if m < n_layers:
                z = k.activation_forward(net.activation, z, net.alpha)
        decay = net.weight_decay_lambda
        extra = (
            0.5 * decay * sum(float(np.sum(net.params[f"W{m}"] ** 2)) for m in range(1, n_layers + 1)) if decay else 0
        )
        return float(k.softmax_cross_entropy(z, labels)[0]) + extra

    reference = {}
    for name, flat in picks.items():
        view = net.params[name].reshape(-1)
        original = view[flat].copy()

        def loss(values, view=view, flat=flat):
            view[flat] = values
            return full_loss()

        try:
            reference[name] = numerical_gradient(loss, original.copy(), h)
        finally:
            view[flat] = original
    return reference


def assert_close_at(got, reference, picks, context):
    problems = []
    for name, flat in picks.items():
        values = np.asarray(got[name]).reshape(-1)[flat]
        diff = np.abs(values - reference[name])
        if not diff.max() <= ATOL:
            k = int(np.argmax(diff))
            problems.append(
                f"{name}.flat[{flat[k]}]: {values[k]:.15e} vs naive {reference[name][k]:.15e} ({diff[k]:.1e})"
            )
    assert not problems, f"{context}: not within {ATOL} of the naive loop\n  " + "\n  ".join(problems)


def kernel_args(net, x, t, weight_decay, h, backend=None):
    """The kernels' positional arguments (GradientProblem, x, labels) on ``backend``."""
    to = np.asarray if backend is None else backend.asarray
    n = net.n_layers
    weights = [to(np.asarray(net.params[f"W{m}"], dtype=np.float64)) for m in range(1, n + 1)]
    biases = [to(np.asarray(net.params[f"b{m}"], dtype=np.float64)) for m in range(1, n + 1)]
    problem = GradientProblem(weights, biases, net.activation, net.alpha, weight_decay, h)
    return problem, to(np.asarray(x, dtype=np.float64)), to(np.asarray(t))


def kink_entries(net, x, t, h, limit=6):
    """A few entries per array whose perturbation crosses a kink (the series kernel's diagnostics; they
    equal the incremental kernel's, see test_series_and_incremental_report_the_same_entries)."""
    kinks = {}
    net.backend.kernels.numerical_gradient_series(*kernel_args(net, x, t, 0.0, h), kinks=kinks)
    return {name: rows[:limit, 0] for name, rows in kinks.items() if rows.shape[0]}


# ---------------------------------------------------------------- agreement with the naive loop on MNIST

SLOW = pytest.mark.slow  # seconds each: smooth deep nets carry K Taylor orders; h = 1e-2 crosses ~250k relu kinks
CASES = [
    ("seed", "fresh", 1e-4),
    ("seed", "after 100 SGD steps", 1e-4),
    ("seed", "fresh", 1e-2),
    ("relu", "fresh", 1e-4),
    ("relu", "after 100 SGD steps", 1e-4),
    pytest.param(("relu", "fresh", 1e-2), marks=SLOW),
    pytest.param(("tanh", "fresh", 1e-4), marks=SLOW),
    pytest.param(("tanh", "after 100 SGD steps", 1e-4), marks=SLOW),
]
CASE_IDS = [f"{c[0]}-{c[1].split()[0]}-h={c[2]:g}" for c in (p.values[0] if hasattr(p, "values") else p for p in CASES)]


@pytest.fixture(scope="module")
def references(mnist_train, mnist_batch):
    """case -> (params, picks, naive values at the picks, backprop), computed on NumPy when first asked."""
    x, t = mnist_batch
    nets, done = {}, {}

    def get(case):
        kind, state, h = case
        if case not in done:
            if (kind, state) not in nets:
                net = make_net(kind)
                nets[kind, state] = train(net, mnist_train) if state != "fresh" else net
            net = nets[kind, state]
            extra = kink_entries(net, x, t, h) if kind == "relu" else None
            picks = sample_entries(net, x, extra)
            params = {name: p.copy() for name, p in net.params.items()}
            done[case] = params, picks, naive_at(net, x, t, picks, h), net.gradient(x, t)
        return done[case]

    return get


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_series_is_the_naive_central_difference(backend, case, references, mnist_batch):
    kind, state, h = case
    params, picks, reference, backprop = references(case)
    net = make_net(kind, backend=backend)
    for name, value in params.items():
        net.params[name][...] = backend.asarray(value)
    x, t = mnist_batch
    got = net.numerical_gradient(backend.asarray(x), t, method="series", h=h)
    got = {name: backend.to_numpy(value) for name, value in got.items()}
    assert all(value.dtype == np.float64 and value.shape == params[name].shape for name, value in got.items())
    assert_close_at(got, reference, picks, f"{backend.name}/{kind}/{state}/h={h}")
    for name, value in params.items():
        assert np.array_equal(backend.to_numpy(net.params[name]), value), f"{name} changed"
    if h == 1e-2:  # a central difference, not the derivative: far from backprop, yet on the loop's numbers
        gap = max(float(np.abs(got[name] - backprop[name]).max()) for name in got)
        assert gap > 1e3 * ATOL, f"h=1e-2 should differ from backprop by far more than {ATOL}; max gap {gap:.1e}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["relu", "tanh"])
def test_every_method_on_the_deep_net_with_a_few_images(backend, kind, mnist_batch):
    """naive (sampled), incremental and series on MultiLayerNet(784, [100]*4, 10) and 2 MNIST images: the
    incremental method recomputes every later layer per parameter (the full 100 images: 10-30 s here);
    batched, a full pass per parameter, is checked on the small nets of tests/test_numerical.py."""
    x, t = mnist_batch[0][:2], mnist_batch[1][:2]
    reference_net = make_net(kind)
    extra = kink_entries(reference_net, x, t, 1e-4) if kind == "relu" else None
    picks = sample_entries(reference_net, x, extra, seed=1)
    reference = naive_at(reference_net, x, t, picks, 1e-4)
    net = make_net(kind, backend=backend)
    for method in ("incremental", "series"):
        got = net.numerical_gradient(backend.asarray(x), t, method=method)
        got = {name: backend.to_numpy(value) for name, value in got.items()}
        assert_close_at(got, reference, picks, f"{backend.name}/{kind}/{method}")


# ---------------------------------------------------------------- small nets: every activation, decay, the fallback

SMALL_ACTIVATIONS = ("relu", "sigmoid", "tanh", "leaky_relu")


def small_problem(activation, h, seed=11):
    rng = np.random.default_rng(seed)
    x = rng.random((9, 15)) * (rng.random((9, 15)) < 0.6)
    t = rng.integers(0, 4, 9)
    net = MultiLayerNet(15, [8, 7, 6], 4, activation=activation, weight_init_std=0.5, weight_decay_lambda=0.02, seed=3)
    return net, x, t


def full_naive(net, x, t, h):
    return net.numerical_gradient(x, t, method="naive", h=h)


def assert_all_close(got, reference, context):
    for name, want in reference.items():
        diff = np.abs(np.asarray(got[name]) - want)
        assert diff.max() <= ATOL, f"{context}: {name} differs from the naive loop by {diff.max():.1e}"


@pytest.mark.parametrize("activation", SMALL_ACTIVATIONS)
@pytest.mark.parametrize("h", [1e-4, 1e-2, 0.3])
def test_small_deep_net_every_activation_and_step(backend, activation, h):
    net, x, t = small_problem(activation, h)
    reference = full_naive(net, x, t, h)
    other = MultiLayerNet(
        15, [8, 7, 6], 4, activation=activation, weight_init_std=0.5, weight_decay_lambda=0.02, seed=3, backend=backend
    )
    got = other.numerical_gradient(backend.asarray(x), t, method="series", h=h)
    assert_all_close({k: backend.to_numpy(v) for k, v in got.items()}, reference, f"{backend.name}/{activation}/h={h}")


class DirectCounter:
    """Wraps the real direct evaluation, counting the (sample, unit, input) triples it evaluates."""

    def __init__(self):
        self.triples = 0
        self.real = xp_kernels._direct_differences

    def __call__(self, *args, **kwargs):
        self.triples += int(args[8].size)
        return self.real(*args, **kwargs)


@pytest.mark.parametrize("activation", SMALL_ACTIVATIONS)
def test_forced_fallback_is_still_the_naive_central_difference(backend, activation, monkeypatch):
    """SERIES_MAX_ORDER = 1: every pair whose loss is not exactly linear to the bound is evaluated directly."""
    net, x, t = small_problem(activation, 1e-2)
    reference = full_naive(net, x, t, 1e-2)
    counter = DirectCounter()
    monkeypatch.setattr(xp_kernels, "SERIES_MAX_ORDER", 1)
    monkeypatch.setattr(xp_kernels, "_direct_differences", counter)
    other = MultiLayerNet(
        15, [8, 7, 6], 4, activation=activation, weight_init_std=0.5, weight_decay_lambda=0.02, seed=3, backend=backend
    )
    got = other.numerical_gradient(backend.asarray(x), t, method="series", h=1e-2)
    # smooth and leaky units all move the loss: every (input, unit) of layer 1 at least; relu: the live units
    least = (np.count_nonzero(x) + len(x)) * 8 if activation != "relu" else 1
    assert counter.triples >= least, f"only {counter.triples} direct evaluations: the fallback was not taken"
    assert_all_close({k: backend.to_numpy(v) for k, v in got.items()}, reference, f"{backend.name}/{activation}")


def test_tiny_tail_budget_forces_the_fallback_on_the_seed_net(backend, monkeypatch, mnist_batch):
    """A bound budget no order can meet (SERIES_TAIL = 0) sends every pair of W1/b1 to direct evaluation."""
    x, t = mnist_batch[0][:10], mnist_batch[1][:10]
    reference_net = make_net("seed")
    picks = sample_entries(reference_net, x)
    reference = naive_at(reference_net, x, t, picks, 1e-4)
    counter = DirectCounter()
    monkeypatch.setattr(xp_kernels, "SERIES_TAIL", 0.0)
    monkeypatch.setattr(xp_kernels, "_direct_differences", counter)
    net = make_net("seed", backend=backend)
    got = net.numerical_gradient(backend.asarray(x), t, method="series")
    assert counter.triples == int(np.count_nonzero(x)) * 50 + 10 * 50  # every moved input and the bias, every unit
    assert_close_at({k: backend.to_numpy(v) for k, v in got.items()}, reference, picks, backend.name)


def test_relu_near_a_kink_is_evaluated_directly(backend):
    """A pre-activation planted 3e-5 from the kink: steps h*x = 1e-4*x cross it, the series alone would not."""
    net, x, t = small_problem("relu", 1e-4)
    x = x.copy()
    x[2, 0] = 0.9  # a large input for sample 2
    z = x[2] @ net.params["W1"][:, 1] + net.params["b1"][1]
    net.params["b1"][1] -= z - 3e-5  # z1[2, 1] = 3e-5 > 0, within h * x[2, 0] = 9e-5
    reference = full_naive(net, x, t, 1e-4)
    other = MultiLayerNet(
        15, [8, 7, 6], 4, activation="relu", weight_init_std=0.5, weight_decay_lambda=0.02, seed=3, backend=backend
    )
    for name, p in net.params.items():
        other.params[name][...] = backend.asarray(p)
    got = other.numerical_gradient(backend.asarray(x), t, method="series")
    assert_all_close({k: backend.to_numpy(v) for k, v in got.items()}, reference, backend.name)
    # the planted kink changes this entry's central difference away from the derivative
    backprop = net.gradient(x, t)
    assert abs(reference["W1"][0, 1] - backprop["W1"][0, 1]) > 1e-6


# ---------------------------------------------------------------- kink diagnostics


def planted_relu_problem():
    """A relu net and batch with two planted near-kinks: z1[2, 1] = 3e-5 and z2[5, 3] = -2e-6."""
    net, x, t = small_problem("relu", 1e-4)
    x = x.copy()
    x[2, 0] = 0.9
    z = x[2] @ net.params["W1"][:, 1] + net.params["b1"][1]
    net.params["b1"][1] -= z - 3e-5
    a1 = np.maximum(x[5] @ net.params["W1"] + net.params["b1"], 0)
    z2 = a1 @ net.params["W2"][:, 3] + net.params["b2"][3]
    net.params["b2"][3] -= z2 + 2e-6
    return net, x, t


@pytest.mark.parametrize("method", ["incremental", "series"])
def test_kinks_name_the_planted_sample_and_unit(backend, method):
    net, x, t = planted_relu_problem()
    kinks = {}
    getattr(backend.kernels, f"numerical_gradient_{method}")(*kernel_args(net, x, t, 0.02, 1e-4, backend), kinks=kinks)
    kinks = {name: backend.to_numpy(rows) for name, rows in kinks.items()}
    assert set(kinks) == set(net.params)
    for name, rows in kinks.items():
        assert rows.dtype == np.int64 and rows.ndim == 2 and rows.shape[1] == 4, name
        assert len(np.unique(rows[:, 0])) == rows.shape[0], f"{name}: one row per entry"
    # W1[0, 1] moves z1[2, 1] = 3e-5 by 9e-5: sample 2, layer 1, unit 1
    w1 = {int(r[0]): tuple(int(v) for v in r[1:]) for r in kinks["W1"]}
    assert w1.get(0 * 8 + 1) == (2, 1, 1), w1.get(1)
    # b2[3] moves z2[5, 3] = -2e-6 by 1e-4 (an input of ones): sample 5, layer 2, unit 3
    b2 = {int(r[0]): tuple(int(v) for v in r[1:]) for r in kinks["b2"]}
    assert b2.get(3) == (5, 2, 3), b2
    assert kinks["W4"].shape == (0, 4) and kinks["b4"].shape == (0, 4)  # the output layer has no kink after it


def test_series_and_incremental_report_the_same_entries(backend):
    net, x, t = planted_relu_problem()
    args = kernel_args(net, x, t, 0.02, 1e-4, backend)
    found = {}
    for method in ("incremental", "series"):
        kinks = {}
        getattr(backend.kernels, f"numerical_gradient_{method}")(*args, kinks=kinks)
        found[method] = {name: set(backend.to_numpy(rows)[:, 0].tolist()) for name, rows in kinks.items()}
    assert found["incremental"] == found["series"]
    assert sum(len(v) for v in found["series"].values()) > 0


@pytest.mark.parametrize("method", ["incremental", "series"])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_smooth_nets_have_no_kinks(backend, method, activation):
    net, x, t = small_problem(activation, 1e-4)
    kinks = {}
    getattr(backend.kernels, f"numerical_gradient_{method}")(*kernel_args(net, x, t, 0.0, 1e-4, backend), kinks=kinks)
    assert set(kinks) == set(net.params)
    for name, rows in kinks.items():
        rows = backend.to_numpy(rows)
        assert rows.shape == (0, 4) and rows.dtype == np.int64, name


# ---------------------------------------------------------------- contract


def test_the_kernel_contract_names_series_with_kinks(backend):
    assert "numerical_gradient_series" in kernels.KERNEL_NAMES
    for method in ("incremental", "series"):
        parameters = inspect.signature(getattr(backend.kernels, f"numerical_gradient_{method}")).parameters
        assert "kinks" in parameters and parameters["kinks"].default is None


def test_repeated_calls_are_bit_identical(backend, mnist_batch):
    x, t = mnist_batch
    net = make_net("seed", backend=backend)
    first = net.numerical_gradient(backend.asarray(x), t, method="series")
    second = net.numerical_gradient(backend.asarray(x), t, method="series")
    for name in first:
        assert np.array_equal(backend.to_numpy(first[name]), backend.to_numpy(second[name])), name


def test_a_user_defined_activation_is_evaluated_directly(backend):
    """No bound is provable for an Activation: series must still give the loop's central differences."""
    from kernels.activations import Activation

    softplus = Activation(
        "softplus", forward=lambda v: np.logaddexp(0.0, v), derivative=lambda v: 0.5 * (1 + np.tanh(v / 2))
    )
    rng = np.random.default_rng(5)
    x, t = rng.random((6, 7)) * (rng.random((6, 7)) < 0.7), rng.integers(0, 3, 6)
    weights = [rng.standard_normal((7, 5)) * 0.7, rng.standard_normal((5, 4)) * 0.7, rng.standard_normal((4, 3)) * 0.7]
    biases = [rng.standard_normal(5) * 0.1, rng.standard_normal(4) * 0.1, rng.standard_normal(3) * 0.1]

    def loss_of(params):
        z = x
        for m, (W, b) in enumerate(params):
            z = z @ W + b
            if m < len(params) - 1:
                z = np.logaddexp(0.0, z)
        z = z - z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(t)), t]))

    params = list(zip(weights, biases, strict=True))
    to = backend.asarray
    problem = GradientProblem([to(W) for W in weights], [to(b) for b in biases], softplus, 0.01, 0.0, 1e-3)
    dWs, dbs = backend.kernels.numerical_gradient_series(problem, to(x), to(t))
    for m in range(3):
        for array, got in ((weights[m], dWs[m]), (biases[m], dbs[m])):
            want = numerical_gradient(lambda _a, params=params: loss_of(params), array, 1e-3)
            np.testing.assert_allclose(backend.to_numpy(got), want, rtol=0, atol=ATOL)


def test_kink_rows_match_the_naive_loop_through_the_public_api(backend):
    """net.numerical_gradient(..., kinks=) of series and incremental give the naive loop's rows exactly."""
    net, x, t = planted_relu_problem()
    reference = {}
    net.numerical_gradient(x, t, method="naive", kinks=reference)
    other = MultiLayerNet(
        15, [8, 7, 6], 4, activation="relu", weight_init_std=0.5, weight_decay_lambda=0.02, seed=3, backend=backend
    )
    for name, p in net.params.items():
        other.params[name][...] = backend.asarray(p)
    for method in ("incremental", "series"):
        kinks = {}
        other.numerical_gradient(backend.asarray(x), t, method=method, kinks=kinks)
        for name, want in reference.items():
            got = backend.to_numpy(kinks[name])
            assert np.array_equal(got, want), f"{method}/{name}: {got[:4].tolist()} vs naive {want[:4].tolist()}"


# ---------------------------------------------------------------- relu kink radii: the bound and the pruned carry


def _deep_relu_pass(depth, n_images, mnist_batch):
    net = MultiLayerNet(784, [100] * depth, 10, activation="relu", seed=0)
    x, t = mnist_batch[0][:n_images].astype(np.float64), mnist_batch[1][:n_images]
    weights = [np.asarray(net.params[f"W{m}"]) for m in range(1, depth + 2)]
    biases = [np.asarray(net.params[f"b{m}"]) for m in range(1, depth + 2)]
    ops = xp_kernels.generic_ops(np)
    cache, derivatives = xp_kernels._series_forward(np, ops, weights, biases, x, t, "relu", 0.0)
    return ops, cache, derivatives, weights


def test_later_kink_bounds_bound_the_exact_carry(mnist_batch):
    """S_l >= max over later layers m >= l + 2 of max_q |T_m| / |z_m|, T carried exactly for every pair."""
    ops, cache, derivatives, weights = _deep_relu_pass(5, 20, mnist_batch)
    next_radius = xp_kernels._next_layer_radii(ops, cache, derivatives, weights)
    bounds = xp_kernels._later_kink_bounds(np, cache, derivatives, weights, next_radius)
    n_layers = len(weights)
    for layer in range(n_layers - 3):
        T = derivatives[layer][:, :, None] * weights[layer + 1][None]  # T_(l+1)
        exact = np.zeros_like(derivatives[layer])
        for m in range(layer + 1, n_layers - 2):
            T = xp_kernels._propagate(np, T * derivatives[m][:, None, :], weights[m + 1])
            exact = np.maximum(exact, xp_kernels._inverse_kink_radius(np, T, cache.pre[m + 1]))
        assert (bounds[layer] >= exact * (1 - 1e-12)).all(), f"layer {layer}: the bound is below the exact term"
        assert (bounds[layer] > 0).any()


@pytest.mark.parametrize("h", [1e-4, 1e-2])
def test_pruned_carry_gives_the_same_bits_as_carrying_every_pair(backend, h, mnist_batch, monkeypatch):
    """With the later bounds at +inf every pair is carried exactly to the last layer; the default path
    (tighter bound, pairs dropped once cleared) must evaluate the same triples directly: same bits, same kinks."""
    x, t = mnist_batch[0][:6], mnist_batch[1][:6]
    net = MultiLayerNet(784, [100] * 5, 10, activation="relu", seed=0, backend=backend)
    default_kinks, everything_kinks = {}, {}
    default = net.numerical_gradient(backend.asarray(x), t, method="series", h=h, kinks=default_kinks)
    monkeypatch.setattr(
        xp_kernels, "_later_kink_bounds", lambda xp, cache, d, w, r: [xp.full_like(a, xp.inf) for a in d]
    )
    everything = net.numerical_gradient(backend.asarray(x), t, method="series", h=h, kinks=everything_kinks)
    for name in default:
        assert np.array_equal(backend.to_numpy(default[name]), backend.to_numpy(everything[name])), name
        assert np.array_equal(backend.to_numpy(default_kinks[name]), backend.to_numpy(everything_kinks[name])), name


def test_numba_radius_and_direction_series_match_the_numpy_forms():
    """The compiled next-layer radius (zeros included: inf where a moved unit sits at z = 0) and the relu
    loss series along a direction equal kernels.xp_kernels' NumPy forms."""
    nk = pytest.importorskip("kernels.numba_kernels")
    rng = np.random.default_rng(5)
    slope = rng.standard_normal((7, 9)) * (rng.random((7, 9)) > 0.3)
    W = rng.standard_normal((9, 11)) * (rng.random((9, 11)) > 0.2)
    z = rng.standard_normal((7, 11)) * (rng.random((7, 11)) > 0.1)
    want = xp_kernels._next_layer_inverse_radius(np, slope, W, z)
    assert np.isinf(want).any() and np.array_equal(nk._next_layer_inverse_radius(slope, W, z), want)
    V = rng.standard_normal((7, 9, 4)) * 3.0
    V[0, 0] = 0.0  # a direction that does not move the loss
    probs = rng.dirichlet(np.ones(4), 7)
    labels = rng.integers(0, 4, 7)
    rho = np.full(7, 0.05)
    inverse_radius = np.abs(rng.standard_normal((7, 9))) * 30
    inverse_radius[1, 2] = np.inf
    coefficients, needed = nk._direction_series(V, probs, labels, rho, inverse_radius, 1e-2)
    spread = np.abs(V - np.take_along_axis(V, labels[:, None, None].repeat(9, 1), axis=2))
    widest = spread.max(axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        radius = np.where(widest > 0, xp_kernels._LOSS_RADIUS / np.where(widest > 0, widest, 1.0), 0.0)
        zeta = np.where(
            widest > 0, 0.5 * (spread * probs[:, None, :]).sum(axis=2) / np.where(widest > 0, widest, 1.0), 0.0
        )
        reach = np.minimum(rho[:, None], np.where(inverse_radius > 0, 1.0 / inverse_radius, np.inf))
        ratio = np.where(widest > 0, reach / np.where(widest > 0, radius, 1.0), 0.0)
    assert np.array_equal(needed, xp_kernels._order_needed(np, ratio, -np.log1p(-zeta), 1e-2))
    assert needed.max() > 1 and needed[0, 0] == 1
    want = xp_kernels._loss_series(np, probs, labels, [V], len(coefficients))
    for n, (got_n, want_n) in enumerate(zip(coefficients, want, strict=True), start=1):
        # the two forms sum the cumulant recurrence in different orders, which loses digits as the order
        # grows (order 6 here: a few 1e-12 relative): the check is on the value, not the last bits
        np.testing.assert_allclose(got_n, want_n, rtol=1e-10, atol=0, err_msg=f"order {n}")


# ---------------------------------------------------------------- the Numba forms equal the NumPy forms


def test_numba_loss_bound_order_is_the_order_of_the_exact_bound():
    """_loss_bound_order skips expm1/log1p where two rational brackets of M = -log(1 - expm1(x)) agree: its
    orders must be those of M itself, also where the brackets disagree (the grid below reaches such cases)."""
    nk = pytest.importorskip("kernels.numba_kernels")
    exponents = np.concatenate([[0.0], np.logspace(-12, np.log10(0.7), 120)])
    ratios = np.concatenate([[0.0, 1.0], np.logspace(-9, -1e-3, 120)])
    disagreeing = 0
    for h, tail in ((1e-4, xp_kernels.SERIES_TAIL), (1e-2, xp_kernels.SERIES_TAIL), (1e-4, 0.0)):
        for x in exponents:
            with np.errstate(invalid="ignore"):  # x > ln 2: no bound (NaN), as in the kernels: no order
                exact_bound = -np.log1p(-np.expm1(x))
            s_high, s_low = 2 * x / (2 - x), x + x * x / 2
            for ratio in ratios:
                want = nk._order_needed_scalar(ratio, exact_bound, h, tail, xp_kernels.SERIES_MAX_ORDER)
                got = nk._loss_bound_order(x, ratio, h, tail, xp_kernels.SERIES_MAX_ORDER)
                assert got == want, f"x={x!r} ratio={ratio!r} h={h} tail={tail}: {got} vs {want}"
                if x < 0.6:
                    high = nk._order_needed_scalar(
                        ratio, s_high + s_high**2 / (2 * (1 - s_high)), h, tail, xp_kernels.SERIES_MAX_ORDER
                    )
                    low = nk._order_needed_scalar(ratio, s_low + s_low**2 / 2, h, tail, xp_kernels.SERIES_MAX_ORDER)
                    disagreeing += high != low
    assert disagreeing > 0, "the grid never reaches the exact evaluation"


def assert_same_series(got, want, rho, h, context, served=True):
    """Same orders, and coefficients that move a per-sample difference quotient by at most 1e-13: the sum over n
    of |got_n - want_n| rho^n / h per served pair (the others are evaluated directly). High orders carry the
    cumulant recurrences' cancellation (~1e-9 relative at order 20 whichever way the moments are summed): this
    weighs them as the gradient does."""
    assert len(got) == len(want), f"{context}: {len(got)} orders vs {len(want)}"
    pairs = enumerate(zip(got, want, strict=True), start=1)
    effect = sum(np.abs(got_n - want_n) * rho[:, None] ** n for n, (got_n, want_n) in pairs)
    effect = np.where(served, effect, 0.0)
    assert float(effect.max()) / h <= 1e-13, f"{context}: coefficients move a difference by {effect.max() / h:.1e}"


@pytest.mark.parametrize("activation", SMALL_ACTIVATIONS)
def test_numba_series_layer_forms_equal_the_numpy_forms(activation, mnist_batch):
    """The compiled output-feeding orders and coefficients, last-layer coefficients and stacked steps give the
    NumPy forms' orders exactly and their values to rounding, over weight scales and steps."""
    nk = pytest.importorskip("kernels.numba_kernels")
    x, t = mnist_batch
    labels = np.asarray(t, dtype=np.int64)
    rng = np.random.default_rng(4)
    for scale in (0.01, 1.0, 3.0):
        net = TwoLayerNet(784, 50, 10, activation=activation, weight_init_std=scale, seed=1)
        weights, biases = [net.params["W1"], net.params["W2"]], [net.params["b1"], net.params["b2"]]
        cache, derivatives = xp_kernels._series_forward(
            np, nk._SERIES_OPS, weights, biases, x, labels, activation, net.alpha
        )
        for h in (1e-4, 1e-2, 0.3):
            rho = h * np.maximum(np.abs(x).max(axis=1), 1.0) * rng.uniform(0.5, 2.0, len(x))
            args = (cache, derivatives, weights, labels, activation, 0, slice(3, 41), rho, h)
            want, want_needed, want_radius = xp_kernels._output_feeding_pair_series(np, *args)
            got, got_needed, got_radius = nk._output_feeding_series(*args)
            context = f"{activation}, scale {scale}, h={h}"
            assert np.array_equal(got_needed, want_needed), context
            assert_same_series(got, want, rho, h, context, served=want_needed <= len(want))
            assert (got_radius is None) == (want_radius is None), context
            if want_radius is not None:
                np.testing.assert_allclose(got_radius, want_radius, rtol=1e-15, err_msg=context)
            want_last = xp_kernels._last_layer_coefficients(np, cache, labels, h)
            got_last = nk._last_layer_coefficients(cache, labels, h)
            assert (got_last is None) == (want_last is None), context
            if want_last is not None:
                last_rho = h * np.maximum(np.abs(cache.inputs[1]).max(axis=1), 1.0)
                assert_same_series(got_last, want_last, last_rho, h, f"{context}: last layer")
            for count in (1, 3):
                want_steps = xp_kernels._stacked_steps(np, cache.inputs[1], h, count)
                assert np.array_equal(nk._stacked_steps(cache.inputs[1], h, count), want_steps), context
                grown = nk._stacked_steps(cache.inputs[1], h, count + 2, nk._stacked_steps(cache.inputs[1], h, count))
                assert np.array_equal(grown, xp_kernels._stacked_steps(np, cache.inputs[1], h, count + 2)), context
