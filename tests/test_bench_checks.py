"""The benchmark suite's own checks can fail, and its pieces do what the report relies on.

Each check is given a wrong result and must raise: the sampled naive loop's check on NumPy
for a non-smooth net (it used to compare the loop with itself), and the distributed
benchmark's check of the sharded gradient's values (it used to count the pieces only).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bench.common as bench_common
from backends import get_backend
from bench.common import (
    PROFILES,
    SEED_N_PARAMS,
    SEED_SIZES,
    GradientCase,
    Shareable,
    flops_per_call,
    gradient_key,
    naive_at,
    naive_in_threads,
    once,
    sample_digest,
    sample_parameters,
    session_gradient,
    session_naive_at,
    synthetic_batch,
)
from nets import MultiLayerNet, TwoLayerNet
from nets.gradient import numerical_gradient

REPO = Path(__file__).resolve().parent.parent


def small_relu_net(backend_name: str) -> MultiLayerNet:
    return MultiLayerNet(784, [16, 12], 10, activation="relu", seed=0, backend=backend_name)


@pytest.fixture(scope="module")
def relu_case() -> GradientCase:
    numpy = get_backend("numpy")
    return GradientCase(numpy, numpy, synthetic_batch(20), small_relu_net)


def test_sampled_naive_check_on_numpy_catches_a_wrong_value_for_a_relu_net(relu_case):
    assert not relu_case.smooth and relu_case.backend.name == "numpy"
    compute, check, sample = relu_case.gradient("naive", 40)
    assert sample is not None and len(sample) < relu_case.n_params
    got = compute()
    check(got)  # the library's loop agrees with the independent one
    wrong = got.copy()
    wrong[len(wrong) // 2] += 1e-6
    with pytest.raises(AssertionError, match="independent plain NumPy loop"):
        check(wrong)


def test_sampled_naive_times_the_librarys_own_loop(relu_case):
    """naive_at is net.numerical_gradient's naive loop over the sample: the very numbers of the full loop."""
    net, x, t = relu_case.net, relu_case.x, relu_case.t
    sample = sample_parameters(relu_case.shapes, 30, seed=4)
    full = net.numerical_gradient(x, t, method="naive")
    np.testing.assert_array_equal(naive_at(net, x, t, sample), [full[name][idx] for name, idx in sample])


def test_entries_difference_only_the_chosen_elements():
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((3, 4))
    target = rng.standard_normal((3, 4))

    def loss(w):
        return float(np.sum((w - target) ** 3))

    full = numerical_gradient(loss, weights.copy())
    chosen = [(2, 1), (0, 3)]
    part = numerical_gradient(loss, weights, entries=chosen)
    for idx in np.ndindex(3, 4):
        assert part[idx] == (full[idx] if idx in chosen else 0.0)
    with pytest.raises(ValueError, match=r"entry \(3, 0\) is not an index of an array of shape \(3, 4\)"):
        numerical_gradient(loss, weights, entries=[(3, 0)])
    net = TwoLayerNet(4, 3, 2, seed=0)
    with pytest.raises(ValueError, match="naive loop only"):
        net.numerical_gradient(rng.random((2, 4)), np.array([0, 1]), method="incremental", entries={"W1": [(0, 0)]})


def test_distributed_check_compares_values_and_coverage():
    distributed_bench = pytest.importorskip("bench.bench_distributed", reason="needs the distributed extra")
    from nets import distributed as nd

    net = MultiLayerNet(40, [24, 16, 12], 10, seed=1)
    x, t = distributed_bench.sparse_batch(net, 16)
    want = {name: np.asarray(g) for name, g in net.numerical_gradient(x, t, method="incremental").items()}
    chunks = nd.plan_chunks(net, x, "incremental", 6)
    assert any(c.span == "columns" for c in chunks) and any(c.span == "layers" for c in chunks)

    def piece_of(chunk):
        if chunk.span == "columns":
            n, span = chunk.layer + 1, slice(chunk.start, chunk.stop)
            return {f"W{n}": want[f"W{n}"][:, span].copy(), f"b{n}": want[f"b{n}"][span].copy()}
        return {
            f"{kind}{m}": want[f"{kind}{m}"].copy() for m in range(chunk.start + 1, chunk.stop + 1) for kind in "Wb"
        }

    pieces = [piece_of(chunk) for chunk in chunks]
    distributed_bench.check_pieces(chunks, pieces, want)
    name = next(iter(pieces[0]))
    pieces[0][name].flat[3] += 1e-9
    with pytest.raises(AssertionError, match="single-process gradient"):
        distributed_bench.check_pieces(chunks, pieces, want)
    pieces = [piece_of(chunk) for chunk in chunks]
    with pytest.raises(AssertionError, match="pieces for"):
        distributed_bench.check_pieces(chunks, pieces[1:], want)
    with pytest.raises(AssertionError, match="not covered by exactly one chunk"):
        distributed_bench.check_pieces(chunks[1:] + chunks[-1:], pieces[1:] + pieces[-1:], want)


def test_flop_counts_follow_the_stated_formulas():
    batch = 100
    forward = 2 * batch * 784 * 50 + batch * 50 + batch * 50 + 2 * batch * 50 * 10 + batch * 10 + 3 * batch * 10
    assert flops_per_call("forward", SEED_SIZES, batch) == forward
    assert flops_per_call("naive", SEED_SIZES, batch) == 2 * SEED_N_PARAMS * forward
    assert flops_per_call("batched", SEED_SIZES, batch, active_inputs=784) == 2 * SEED_N_PARAMS * forward
    assert flops_per_call("batched", SEED_SIZES, batch, active_inputs=500) < 2 * SEED_N_PARAMS * forward
    backprop = flops_per_call("backprop", SEED_SIZES, batch)
    assert 2 * forward < backprop < 3 * forward  # no dx for the first layer
    sparse = [int(0.19 * batch * 784), batch * 50]
    assert flops_per_call("incremental", SEED_SIZES, batch, nonzeros=sparse) < flops_per_call(
        "incremental", SEED_SIZES, batch
    )
    assert flops_per_call("series", SEED_SIZES, batch, orders=1) < flops_per_call("series", SEED_SIZES, batch)
    # the seed net's series: the base pass with f', K = 3 terms per (sample, unit) and per (sample, class),
    # and two odd-order GEMMs per layer (orders 1 and 3)
    K, C, J = 3, 10, 50
    seed_series = (
        forward
        + batch * J
        + K * K * batch * C
        + 2 * 2 * batch * J * C
        + batch * J * (2 * K * C + K * K + K**3 / 3)
        + 2 * 2 * batch * 784 * J
    )
    assert flops_per_call("series", SEED_SIZES, batch) == pytest.approx(seed_series, rel=1e-12)
    # relu nets carry no coefficient vectors through the later layers (one backward Jacobian per layer):
    # the count stays within a few backprops, where the forward carry of smooth nets costs ~100 of them
    deep = [784, 100, 100, 100, 100, 10]
    deep_backprop = flops_per_call("backprop", deep, batch)
    assert flops_per_call("series", deep, batch, piecewise=True) < 4 * deep_backprop
    assert flops_per_call("series", deep, batch) > 100 * deep_backprop
    with pytest.raises(ValueError, match="no FLOP count"):
        flops_per_call("magic", SEED_SIZES, batch)


def test_textbook_and_gradgap_naive_are_timed_on_the_same_sample():
    shapes = {"W1": (784, 50), "b1": (50,), "W2": (50, 10), "b2": (10,)}
    net = TwoLayerNet(*SEED_SIZES, seed=0)
    net_shapes = {name: tuple(p.shape) for name, p in net.params.items()}
    for profile in PROFILES.values():
        n = profile.naive_sample or profile.deep_naive_sample
        assert sample_digest(sample_parameters(shapes, n, seed=0)) == sample_digest(
            sample_parameters(net_shapes, n, seed=0)
        )


def test_profiles():
    quick, standard, full = PROFILES["quick"], PROFILES["standard"], PROFILES["full"]
    assert quick.naive_sample is not None and standard.naive_sample is None and full.naive_sample is None
    assert {1, 10} <= set(quick.backprop_batch_sizes)  # tests/test_report.py's subset
    assert not standard.batch_sizes and not standard.hidden_sizes and not standard.incremental_depths
    assert standard.series_depths == (1, 2, 3, 4, 5) and full.incremental_depths == (1, 2, 3, 4, 5)
    assert "batched" in full.deep_methods and "series" in standard.deep_methods


def test_bench_accepts_require_backend_and_the_profiles():
    """The options are registered once (bench/plugin.py) for `pytest bench` as well as for tests/."""
    command = [sys.executable, "-m", "pytest", "bench/bench_dgemm.py", "--require-backend", "numpy", "-q"]
    for extra in (["--gap-profile", "standard", "--benchmark-disable"], ["--collect-only"]):
        done = subprocess.run(command + extra, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


# ---------------------------------------------------------------- results shared within a session (bench.common.once)


def test_a_session_gradient_is_computed_once_per_contents_and_handed_out_as_copies():
    net = TwoLayerNet(12, 5, 3, weight_init_std=0.5, seed=321)
    x, t = np.random.default_rng(5).random((4, 12)), np.array([0, 2, 1, 2])
    calls = []
    library_call = net.numerical_gradient
    net.numerical_gradient = lambda *args, **kwargs: calls.append(kwargs["method"]) or library_call(*args, **kwargs)

    first = session_gradient(net, x, t, "incremental")
    first["W1"][...] = 7.0  # a caller's writes do not reach the shared result
    second = session_gradient(net, x, t, "incremental")
    assert calls == ["incremental"]
    for name, want in library_call(x, t, method="incremental").items():
        np.testing.assert_array_equal(second[name], want)

    key = gradient_key(net, x, t, "incremental")
    other_x = x.copy()
    other_x[0, 0] += 1e-9
    others = [
        gradient_key(net, other_x, t, "incremental"),
        gradient_key(net, x, np.array([0, 2, 1, 1]), "incremental"),
        gradient_key(net, x, t, "series"),
        gradient_key(net, x, t, "incremental", h=2e-4),
        gradient_key(TwoLayerNet(12, 5, 3, activation="tanh", weight_init_std=0.5, seed=321), x, t, "incremental"),
        gradient_key(net.astype("float32"), x, t, "incremental"),
    ]
    assert len({key, *others}) == 1 + len(others)
    net.params["b2"][1] += 1e-12  # the same net, moved: computed again
    assert gradient_key(net, x, t, "incremental") != key
    session_gradient(net, x, t, "incremental")
    assert calls == ["incremental", "incremental"]


def test_nets_with_a_user_defined_activation_are_never_shared():
    from kernels.activations import Activation

    net = TwoLayerNet(6, 4, 3, activation=Activation("cube", lambda z: z**3, lambda z: 3 * z**2), seed=2)
    x, t = np.random.default_rng(1).random((2, 6)), np.array([0, 1])
    assert gradient_key(net, x, t, "naive") is None
    calls = []
    assert once(None, lambda: calls.append(1) or 1) == 1 and once(None, lambda: calls.append(1) or 1) == 1
    assert len(calls) == 2


def test_a_sampled_reference_is_taken_from_the_sessions_whole_naive_loop():
    """session_naive_at reads the whole loop's result where there is one: the numbers of the loop over the sample."""
    net = MultiLayerNet(10, [6, 5], 4, activation="tanh", weight_init_std=0.8, seed=77)
    batch = synthetic_batch(7)
    x, t = batch.x[:, :10], batch.t % 4
    sample = sample_parameters({name: p.shape for name, p in net.params.items()}, 25, seed=3)
    before = naive_at(net, x, t, sample)
    full = session_gradient(net, x, t, "naive")
    assert gradient_key(net, x, t, "naive") in bench_common._SESSION_RESULTS
    np.testing.assert_array_equal(session_naive_at(net, x, t, sample), before)
    np.testing.assert_array_equal(session_naive_at(net, x, t, sample), [full[name][idx] for name, idx in sample])


def test_the_threaded_naive_loop_gives_the_plain_loops_numbers():
    net = TwoLayerNet(30, 8, 5, weight_init_std=0.3, seed=9)
    x, t = np.random.default_rng(4).random((16, 30)), np.arange(16) % 5
    plain = net.numerical_gradient(x, t, method="naive")
    for threads in (1, 2, 3):
        got = naive_in_threads(net, x, t, threads=threads)
        for name, want in plain.items():
            assert np.array_equal(got[name], want), f"{threads} threads: {name}"


def test_an_untimed_benchmark_checks_the_shared_result_and_a_timed_one_computes(relu_case):
    compute, _, sample = relu_case.gradient("incremental")
    assert sample is None and isinstance(compute, Shareable)
    want = relu_case.net.numerical_gradient(relu_case.x, relu_case.t, method="incremental")
    for result in (compute(), compute.shared()):
        for name in want:
            np.testing.assert_array_equal(result[name], want[name])
