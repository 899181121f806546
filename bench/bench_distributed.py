"""The incremental numerical gradient sharded over 1 and 2 local Dask workers (nets.distributed).

quick (default): MultiLayerNet(64, [32, 32, 16], 10) on 32 samples, every chunk, a few rounds.
full (--gap-profile=full): MultiLayerNet(784, [1000] * 3, 10), 2.8M parameters, on 100 samples.
One core needs about an hour for that gradient, so the full profile times a sample: the same
number of columns from each column-sharded layer, one column per task, scaled to every column,
plus the chunk of the last two layers timed once; extra_info["estimate"] is then True.

Workers are single-threaded processes (threads_per_worker=1, one BLAS thread each), so n workers
use n cores; on a 2-core machine 2 workers can show at most 2x. The batch is synthetic, sparse
like MNIST (19% non-zero features): the incremental method's cost follows the non-zero inputs.
Self-contained: skipped when dask.distributed or pytest-benchmark is missing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pytest

MISSING_EXTRA = "the distributed benchmark needs dask.distributed and threadpoolctl: pip install 'gradgap[distributed]'"
distributed = pytest.importorskip("distributed", reason=MISSING_EXTRA)
threadpool_limits = pytest.importorskip("threadpoolctl", reason=MISSING_EXTRA).threadpool_limits
pytest.importorskip("pytest_benchmark", reason="benchmarks need pytest-benchmark: pip install 'gradgap[bench]'")

from backends import to_numpy  # noqa: E402
from nets import MultiLayerNet  # noqa: E402
from nets import distributed as nd  # noqa: E402

MNIST_DENSITY = 0.19  # share of non-zero pixels in MNIST images


@dataclass(frozen=True)
class Setup:
    """The net, the batch and how much of the gradient is timed (columns_per_layer None: all of it)."""

    sizes: tuple[int, ...]
    batch: int
    columns_per_layer: int | None
    rounds: int


SETUPS = {
    "quick": Setup((64, 32, 32, 16, 10), batch=32, columns_per_layer=None, rounds=3),
    "full": Setup((784, 1000, 1000, 1000, 10), batch=100, columns_per_layer=4, rounds=1),
}


@pytest.fixture(scope="module")
def setup(request) -> Setup:
    return SETUPS.get(request.config.getoption("--gap-profile", default="quick"), SETUPS["quick"])


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of single-threaded worker processes, scaled by each benchmark."""
    with (
        distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as local,
        distributed.Client(local) as client,
    ):
        yield local, client


def scaled_to(local: distributed.LocalCluster, client: distributed.Client, n_workers: int) -> None:
    local.scale(n_workers)
    deadline = time.monotonic() + 120
    while len(client.scheduler_info()["workers"]) != n_workers:
        assert time.monotonic() < deadline, f"the cluster did not reach {n_workers} workers"
        time.sleep(0.05)


def sparse_batch(net: MultiLayerNet, batch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.random((batch, net.input_size)) * (rng.random((batch, net.input_size)) < MNIST_DENSITY)
    return x, rng.integers(0, net.output_size, batch)


def check_against_one_process(client: distributed.Client) -> None:
    """Before timing: the sharded gradient of a small net has the single-process bits (one BLAS thread)."""
    net = MultiLayerNet(40, [24, 16, 12], 10, seed=1)
    x, t = sparse_batch(net, 16)
    with threadpool_limits(nd.BLAS_THREADS, user_api="blas"):
        want = net.numerical_gradient(x, t, method="incremental")
    got = nd.numerical_gradient(net, x, t, client=client, n_chunks=8)
    for name in want:
        assert np.array_equal(to_numpy(got[name]), to_numpy(want[name])), f"sharded {name} differs from one process"


def timed_chunks(net: MultiLayerNet, x: np.ndarray, setup: Setup, n_workers: int) -> tuple[list, float]:
    """(the chunks to time, the share of the column work they are). quick: the whole plan."""
    if setup.columns_per_layer is None:
        return nd.plan_chunks(net, x, "incremental", nd.CHUNKS_PER_WORKER * n_workers), 1.0
    one_column_each = nd.plan_chunks(net, x, "incremental", net.n_params)
    sample = []
    for layer in range(net.n_layers - 2):
        columns = [c for c in one_column_each if c.layer == layer]
        picks = np.linspace(0, len(columns) - 1, setup.columns_per_layer).round().astype(int)
        sample += [columns[i] for i in picks]
    widths = {net.sizes[layer + 1] for layer in range(net.n_layers - 2)}
    assert len(widths) == 1, "equal widths keep the sample the same share of every column layer"
    return sample, setup.columns_per_layer / widths.pop()


@pytest.mark.parametrize("n_workers", [1, 2], ids=lambda n: f"workers={n}")
def test_distributed_incremental(benchmark, cluster, setup, n_workers):
    local, client = cluster
    scaled_to(local, client, n_workers)
    check_against_one_process(client)
    net = MultiLayerNet(setup.sizes[0], list(setup.sizes[1:-1]), setup.sizes[-1], seed=0)
    x, t = sparse_batch(net, setup.batch)
    chunks, share = timed_chunks(net, x, setup, n_workers)
    pieces = benchmark.pedantic(
        nd.gradient_chunks, args=(net, x, t, chunks), kwargs={"client": client}, rounds=setup.rounds, iterations=1
    )
    assert len(pieces) == len(chunks)
    wall = benchmark.stats.stats.mean
    tail_s = 0.0
    if share < 1.0:  # the last two layers are one task: timed alone, its work shared by the workers
        tail = [c for c in nd.plan_chunks(net, x, "incremental", 1) if c.kind == "layers"]
        start = time.perf_counter()
        nd.gradient_chunks(net, x, t, tail, client=client)
        tail_s = time.perf_counter() - start
    total_s = wall / share + tail_s / n_workers
    benchmark.group = f"distributed incremental {'-'.join(map(str, net.sizes))} B={setup.batch}"
    benchmark.extra_info.update(
        suite="distributed",
        backend=net.backend.name,
        method="incremental",
        net="-".join(map(str, net.sizes)),
        n_params=net.n_params,
        batch=setup.batch,
        dtype="float64",
        data="synthetic (MNIST-like sparsity)",
        n_workers=n_workers,
        n_chunks=len(chunks),
        shipped_bytes_per_worker=8 * (net.n_params + setup.batch * (net.input_size + 1)),
        estimate=share < 1.0,
        timed_share_of_columns=share,
        last_layers_s=tail_s,
        total_s=total_s,
        params_per_s=net.n_params / total_s,
    )
