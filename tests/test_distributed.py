"""nets.distributed on a real LocalCluster: the same bits as one process, worker loss, failed chunks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

MISSING_EXTRA = "nets.distributed needs dask.distributed and threadpoolctl: pip install 'gradgap[distributed]'"
distributed = pytest.importorskip("distributed", reason=MISSING_EXTRA)
threadpool_limits = pytest.importorskip("threadpoolctl", reason=MISSING_EXTRA).threadpool_limits

from backends import UnknownBackendError, to_numpy  # noqa: E402
from nets import MultiLayerNet, TwoLayerNet  # noqa: E402
from nets import distributed as nd  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def two_worker_cluster() -> distributed.LocalCluster:
    return distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")


@pytest.fixture(scope="module")
def client():
    """One real cluster for the module: 2 worker processes, one thread each."""
    with two_worker_cluster() as cluster, distributed.Client(cluster) as dask_client:
        yield dask_client


def sparse_batch(net, batch: int, seed: int, one_hot: bool = False):
    """x with about 70% zeros (and two features zero for the whole batch), labels or one-hot t."""
    rng = np.random.default_rng(seed)
    x = rng.random((batch, net.input_size)) * (rng.random((batch, net.input_size)) < 0.3)
    x[:, :2] = 0.0
    labels = rng.integers(0, net.output_size, batch)
    t = np.eye(net.output_size)[labels] if one_hot else labels
    return x.astype(net.dtype), t


def one_process(net, x, t, method="incremental"):
    """The single-process reference, with one BLAS thread like every chunk (see nd.BLAS_THREADS)."""
    with threadpool_limits(nd.BLAS_THREADS, user_api="blas"):
        return net.numerical_gradient(x, t, method=method)


def assert_same_bits(got: dict, want: dict, context: str) -> None:
    assert list(got) == list(want), context
    for name in want:
        expected, actual = to_numpy(want[name]), to_numpy(got[name])
        assert actual.dtype == np.float64 and actual.shape == expected.shape, f"{context} {name}"
        assert np.array_equal(actual, expected), f"{context} {name}: max |diff| {np.abs(actual - expected).max():.3e}"
        assert actual.tobytes() == expected.tobytes(), f"{context} {name}: same values, different bits (signed 0?)"


CASES = {
    "relu-decay": (lambda be: MultiLayerNet(20, [16, 12, 8], 5, weight_decay_lambda=0.1, seed=3, backend=be), False),
    "sigmoid-deep": (lambda be: MultiLayerNet(20, [14, 10, 9, 7], 5, activation="sigmoid", seed=4, backend=be), False),
    "tanh-float32-onehot": (
        lambda be: MultiLayerNet(20, [12, 10, 8], 5, activation="tanh", seed=5, backend=be, dtype="float32"),
        True,
    ),
    "leaky-one-hidden": (lambda be: MultiLayerNet(20, [9], 4, activation="leaky_relu", seed=6, backend=be), False),
    "two-layer-sigmoid": (lambda be: TwoLayerNet(20, 9, 4, backend=be), False),
}


@pytest.mark.parametrize("method", nd.SHARDED_METHODS)
@pytest.mark.parametrize("case", list(CASES))
def test_bit_identical_to_one_process(client, backend, case, method):
    make_net, one_hot = CASES[case]
    net = make_net(backend.name)
    x, t = sparse_batch(net, 13, seed=len(case), one_hot=one_hot)
    params_before = {name: to_numpy(p).copy() for name, p in net.params.items()}
    want = one_process(net, x, t, method)
    got = nd.numerical_gradient(net, x, t, method=method, client=client, n_chunks=7)
    assert_same_bits(got, want, f"{case} {method} on {backend.name}")
    assert all(np.array_equal(to_numpy(net.params[name]), p) for name, p in params_before.items())
    chunks = nd.plan_chunks(net, x, method, 7)
    if method == "incremental" and net.n_layers > 2:
        assert len(chunks) >= 4, f"{case}: expected the hidden layers split into columns, got {chunks}"


def test_bit_identical_where_blas_splits_the_work(client):
    """GEMMs large enough for a multi-threaded OpenBLAS to round differently (x @ W1: 16 x 784 x 128)."""
    net = MultiLayerNet(784, [128, 16, 8], 10, seed=7)
    x, t = sparse_batch(net, 16, seed=14)
    want = one_process(net, x, t)
    assert_same_bits(nd.numerical_gradient(net, x, t, client=client, n_chunks=6), want, "784-128-16-8-10")


@pytest.mark.parametrize("n_chunks", [1, 2, 5, 40, 10_000])
@pytest.mark.parametrize("hidden", [[7], [16, 12, 8], [30, 3, 11, 6]])
def test_plan_covers_every_parameter_once(hidden, n_chunks):
    net = MultiLayerNet(10, hidden, 4, seed=1)
    x, _ = sparse_batch(net, 6, seed=2)
    chunks = nd.plan_chunks(net, x, "incremental", n_chunks)
    counts = {name: np.zeros(p.shape, dtype=int) for name, p in net.params.items()}
    for chunk in chunks:
        pieces = {name: np.ones_like(c) for name, c in counts.items()}
        if chunk.span == "columns":
            n, span = chunk.layer + 1, slice(chunk.start, chunk.stop)
            pieces = {f"W{n}": pieces[f"W{n}"][:, span], f"b{n}": pieces[f"b{n}"][span]}
        else:
            pieces = {k: a for k, a in pieces.items() if chunk.start < int(k[1:]) <= chunk.stop}
        partial = {name: np.zeros_like(c) for name, c in counts.items()}
        chunk.place(partial, pieces)
        assert sum(int(a.sum()) for a in partial.values()) == chunk.n_params, chunk.label
        for name in counts:
            counts[name] += partial[name]
    assert all((c == 1).all() for c in counts.values()), {name: np.unique(c) for name, c in counts.items()}
    n_column_layers = max(0, net.n_layers - 2)
    assert len(chunks) >= n_column_layers + 1
    assert len(chunks) <= sum(net.sizes[1 : n_column_layers + 1]) + 1
    assert chunks[-1].span == "layers" and chunks[-1].stop == net.n_layers
    assert nd.plan_chunks(net, x, "batched", n_chunks) == [nd.Chunk(0, "layers", 0, net.n_layers, net.n_params, 1.0)]


def test_plan_balances_by_cost():
    """Column chunks of similar estimated cost; on the benchmark net W1's columns cost the most."""
    small = MultiLayerNet(30, [40, 40, 40], 5, seed=0)
    x, _ = sparse_batch(small, 8, seed=0)
    costs = [c.cost for c in nd.plan_chunks(small, x, "incremental", 24) if c.span == "columns"]
    assert max(costs) < 2 * min(costs)
    large = MultiLayerNet(784, [1000] * 3, 10, seed=0)
    x, _ = sparse_batch(large, 100, seed=0)
    chunks = nd.plan_chunks(large, x, "incremental", 64)
    per_layer = [sum(c.layer == m for c in chunks) for m in range(3)]
    assert per_layer[0] > per_layer[1] >= 1 and per_layer[2] == 1, per_layer
    assert sum(c.n_params for c in chunks) == large.n_params


def test_gradient_chunks_are_slices_of_the_gradient(client):
    net = MultiLayerNet(20, [16, 12, 8], 5, seed=3)
    x, t = sparse_batch(net, 9, seed=8)
    want = one_process(net, x, t)
    chunks = nd.plan_chunks(net, x, "incremental", 12)
    sample = [chunks[-1], chunks[0], chunks[len(chunks) // 2]]
    pieces = nd.gradient_chunks(net, x, t, sample, client=client)
    for chunk, got in zip(sample, pieces, strict=True):
        if chunk.span == "columns":
            n, span = chunk.layer + 1, slice(chunk.start, chunk.stop)
            expected = {f"W{n}": want[f"W{n}"][:, span], f"b{n}": want[f"b{n}"][span]}
        else:
            expected = {
                f"{kind}{m}": want[f"{kind}{m}"] for m in range(chunk.start + 1, chunk.stop + 1) for kind in "Wb"
            }
        assert sorted(got) == sorted(expected), chunk.label
        assert all(np.array_equal(got[name], expected[name]) for name in expected), chunk.label


def test_worker_killed_mid_run_is_retried_and_exact():
    """SIGKILL one of two workers while it computes a chunk: Dask re-runs its chunks elsewhere."""

    def slow_chunks(seconds):  # runs in each worker process: every chunk sleeps first
        from nets import distributed as worker_module

        compute = worker_module._compute_chunk

        def slow(*args):
            time.sleep(seconds)
            return compute(*args)

        worker_module._compute_chunk = slow

    net = MultiLayerNet(20, [16, 12, 8], 5, seed=3)
    x, t = sparse_batch(net, 11, seed=9)
    want = one_process(net, x, t)
    with two_worker_cluster() as cluster, distributed.Client(cluster) as dask_client:
        dask_client.run(slow_chunks, 0.4)
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(nd.numerical_gradient, net, x, t, client=dask_client, n_chunks=8)
            deadline = time.monotonic() + 30
            while not (busy := {w: keys for w, keys in dask_client.processing().items() if keys}):
                assert time.monotonic() < deadline, "no chunk started within 30 s"
                time.sleep(0.02)
            victim = next(iter(busy))
            pid = dask_client.run(os.getpid, workers=[victim])[victim]
            assert not running.done()
            os.kill(pid, signal.SIGKILL)
            got = running.result(timeout=120)
        assert victim not in dask_client.scheduler_info()["workers"]
    assert_same_bits(got, want, "after a worker was killed")


def test_failed_chunk_names_its_parameters(client):
    """A worker that cannot create the backend: the error says which parameters, the cause is chained."""
    net = MultiLayerNet(20, [16, 12, 8], 5, seed=3)
    x, t = sparse_batch(net, 7, seed=10)
    x64, labels = nd._checked_batch(net, x, t)
    chunks = nd.plan_chunks(net, x, "incremental", 6)
    problem = nd._problem(net, x64, labels, 1e-4)
    with pytest.raises(nd.ChunkError) as caught:
        list(nd._gather(client, "no-such-backend", "incremental", problem, chunks))
    error = caught.value
    assert error.chunk in chunks
    assert str(error).startswith(f"{error.chunk.label} failed: UnknownBackendError: unknown backend 'no-such-backend'")
    assert isinstance(error.__cause__, UnknownBackendError)
    deadline = time.monotonic() + 10
    while leftover := client.run_on_scheduler(
        lambda dask_scheduler: [str(k) for k in dask_scheduler.tasks if str(k).startswith("gradgap-")]
    ):
        assert time.monotonic() < deadline, f"tasks left on the cluster after the failure: {leftover}"
        time.sleep(0.05)


def test_error_labels_name_the_parameters():
    assert nd.Chunk(0, "columns", 0, 98, 0, 0.0).label == "W1[:, 0:98] and b1[0:98]"
    assert nd.Chunk(2, "layers", 2, 4, 0, 0.0).label == "W3, b3, W4, b4"
    error = nd.ChunkError(nd.Chunk(1, "columns", 5, 9, 0, 0.0), MemoryError("out of memory"))
    assert str(error) == "W2[:, 5:9] and b2[5:9] failed: MemoryError: out of memory"


def test_scheduler_address_by_argument_and_environment(client, monkeypatch):
    net = MultiLayerNet(20, [16, 12, 8], 5, seed=3)
    x, t = sparse_batch(net, 7, seed=11)
    want = one_process(net, x, t)
    address = client.scheduler_info()["address"]
    assert_same_bits(nd.numerical_gradient(net, x, t, client=address), want, "client=address")
    monkeypatch.setenv(nd.SCHEDULER_ENV, address)
    assert_same_bits(nd.numerical_gradient(net, x, t), want, f"{nd.SCHEDULER_ENV}={address}")
    assert client.scheduler_info()["workers"], "the shared cluster must survive clients that connect and close"


def test_default_is_a_local_cluster(monkeypatch):
    monkeypatch.delenv(nd.SCHEDULER_ENV, raising=False)
    net = MultiLayerNet(20, [16, 12, 8], 5, seed=3)
    x, t = sparse_batch(net, 7, seed=12)
    assert_same_bits(nd.numerical_gradient(net, x, t), one_process(net, x, t), "default")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "naive"}, ValueError, "unknown method 'naive'; valid: incremental, batched"),
        ({"h": 0.0}, ValueError, "h must be a positive finite number"),
        ({"n_chunks": 0}, ValueError, "n_chunks must be a positive integer"),
        ({"client": 42}, TypeError, "client must be a distributed.Client, a scheduler address or None"),
        ({"x": np.zeros((3, 19))}, ValueError, r"expected \(batch, 20\)"),
        ({"t": np.array([0, 1, 9])}, ValueError, r"labels must be integers in \[0, 5\)"),
    ],
)
def test_bad_arguments(client, kwargs, error, match):
    net = MultiLayerNet(20, [16, 12, 8], 5, seed=3)
    x, t = sparse_batch(net, 3, seed=13)
    arguments = {"x": x, "t": t, "client": client} | kwargs
    with pytest.raises(error, match=match):
        nd.numerical_gradient(net, **arguments)


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_importing_nets_does_not_load_dask():
    done = run_python("import sys, nets, nets.gradient; print(sorted({'dask', 'distributed'} & set(sys.modules)))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_missing_dask_names_the_extra():
    done = run_python("import sys; sys.modules['distributed'] = None; import nets.distributed")
    assert done.returncode != 0
    assert "ImportError: nets.distributed needs dask.distributed" in done.stderr
    assert "pip install 'gradgap[distributed]'" in done.stderr
