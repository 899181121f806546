"""The incremental numerical gradient sharded over 1 and 2 local Dask workers (nets.distributed).

Every profile times WHOLE gradients (every chunk of the plan, no estimate) and checks the values
of the timed result, put together, against the single-process gradient of the same net
(net.numerical_gradient(method="incremental") with one BLAS thread: nets.distributed promises the
same bits).

quick and standard: MultiLayerNet(64, [32, 32, 16], 10) on 32 synthetic samples (MNIST-like
sparsity: 19% non-zero features), a few rounds. full (--gap-profile=full):
MultiLayerNet(784, [128] * 3, 10), 134,794 parameters, on the suite's batch of 100 images (MNIST
where found): about 20 s a gradient on one core, one round each. (The 2.8M-parameter
784-1000-1000-1000-10 net would take about an hour a gradient on one core: not measured.)

Workers are single-threaded processes (threads_per_worker=1, one BLAS thread each), so n workers
use n cores; on a 2-core machine 2 workers can show at most 2x. Self-contained: skipped when
dask.distributed or pytest-benchmark is missing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest

MISSING_EXTRA = "the distributed benchmark needs dask.distributed and threadpoolctl: pip install 'gradgap[distributed]'"
distributed = pytest.importorskip("distributed", reason=MISSING_EXTRA)
threadpool_limits = pytest.importorskip("threadpoolctl", reason=MISSING_EXTRA).threadpool_limits
pytest.importorskip("pytest_benchmark", reason="benchmarks need pytest-benchmark: pip install 'gradgap[bench]'")

from bench.common import Batch, assert_close  # noqa: E402
from nets import MultiLayerNet  # noqa: E402
from nets import distributed as nd  # noqa: E402

MNIST_DENSITY = 0.19  # share of non-zero pixels in MNIST images


@dataclass(frozen=True)
class Setup:
    """The net and the batch (mnist_batch: the suite's data, else a synthetic sparse batch)."""

    sizes: tuple[int, ...]
    batch: int
    rounds: int
    mnist_batch: bool


SETUPS = {
    "quick": Setup((64, 32, 32, 16, 10), batch=32, rounds=3, mnist_batch=False),
    "full": Setup((784, 128, 128, 128, 10), batch=100, rounds=1, mnist_batch=True),
}


@pytest.fixture(scope="module")
def setup(profile) -> Setup:
    return SETUPS[profile.distributed]


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of single-threaded worker processes, scaled by each benchmark."""
    with (
        distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as local,
        distributed.Client(local) as client,
    ):
        yield local, client


@pytest.fixture(scope="module")
def problem(setup, data):
    """(net, x, t, data label, the single-process gradient with one BLAS thread): what every run must equal."""
    net = MultiLayerNet(setup.sizes[0], list(setup.sizes[1:-1]), setup.sizes[-1], seed=0)
    if setup.mnist_batch:
        batch: Batch = data.first(setup.batch)
        x, t, label = batch.x, batch.t, batch.source
    else:
        x, t = sparse_batch(net, setup.batch)
        label = "synthetic (MNIST-like sparsity)"
    with threadpool_limits(nd.BLAS_THREADS, user_api="blas"):
        want = {name: np.asarray(g) for name, g in net.numerical_gradient(x, t, method="incremental").items()}
    return net, x, t, label, want


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


def check_pieces(chunks: Sequence[nd.Chunk], pieces: Sequence[dict], want: dict[str, np.ndarray]) -> None:
    """The pieces of a sharded gradient, put together, cover every parameter once and equal ``want``.

    chunks: the plan; pieces: gradient_chunks' result for it (same order); want: the
    single-process gradient {name: float64 array}. nets.distributed promises the same bits.
    """
    assert len(pieces) == len(chunks), f"{len(pieces)} pieces for {len(chunks)} chunks"
    got = {name: np.full(w.shape, np.nan) for name, w in want.items()}
    covered = {name: np.zeros(w.shape, dtype=int) for name, w in want.items()}
    for chunk, piece in zip(chunks, pieces, strict=True):
        chunk.place(got, piece)
        chunk.place(covered, {name: np.ones_like(value, dtype=int) for name, value in piece.items()})
    for name, count in covered.items():
        assert (count == 1).all(), f"{name}: {int((count != 1).sum())} entries not covered by exactly one chunk"
    assert_close(got, want, rtol=0.0, atol=0.0, context="sharded gradient vs the single-process gradient")


@pytest.mark.parametrize("n_workers", [1, 2], ids=lambda n: f"workers={n}")
def test_distributed_incremental(benchmark, cluster, setup, problem, n_workers, profile):
    local, client = cluster
    scaled_to(local, client, n_workers)
    net, x, t, label, want = problem
    chunks = nd.plan_chunks(net, x, "incremental", nd.CHUNKS_PER_WORKER * n_workers)
    pieces = benchmark.pedantic(
        nd.gradient_chunks, args=(net, x, t, chunks), kwargs={"client": client}, rounds=setup.rounds, iterations=1
    )
    check_pieces(chunks, pieces, want)
    benchmark.group = f"distributed incremental {'-'.join(map(str, net.sizes))} B={setup.batch}"
    benchmark.extra_info.update(
        suite="distributed",
        backend=net.backend.name,
        method="incremental",
        net="-".join(map(str, net.sizes)),
        n_params=net.n_params,
        batch=setup.batch,
        dtype="float64",
        data=label,
        profile=profile.name,
        n_workers=n_workers,
        n_chunks=len(chunks),
        shipped_bytes_per_worker=8 * (net.n_params + setup.batch * (net.input_size + 1)),
        estimate=False,
        checked="after timing: every value equals the single-process gradient",
    )
