"""Numerical gradients of large nets sharded over a Dask cluster, bit-identical to one process.

The parameters are split into chunks (``plan_chunks``); the net's parameters and the batch go
once to every worker (``client.scatter(..., broadcast=True)``); each worker computes its chunks
on the net's backend, found by name (``backends.get_backend(name)``); the client puts the pieces
together. Dask re-runs the chunks of a worker that dies; a chunk that raises is reported as a
``ChunkError`` naming its parameters.

A chunk is exact because it is the backend's own numerical-gradient kernel asked for part of the
parameters (``select=(layer, start, stop)``, kernels/__init__.py), which gives that slice of the
full call bit for bit, on every backend:

- span "columns" (incremental, hidden layers at least two before the output): W[:, start:stop]
  and b[start:stop] of one layer, one kernel call.
- span "layers" (the last two layers for incremental; the whole net for batched): every W and b
  of layers start..stop-1, one kernel call per layer selecting all of its columns. The last two
  layers are cheap (they reuse the base softmax); the batched method is brute force over every
  parameter, so it is not worth splitting finer.

What is left to agree is the BLAS (BLAS_THREADS) and, on cupy, the chunk budget of its kernels
(a quarter of the free device memory): see docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

try:
    import distributed
    from threadpoolctl import threadpool_limits
except ImportError as err:
    raise ImportError(
        f"nets.distributed needs dask.distributed and threadpoolctl ({err}): pip install 'gradgap[distributed]'"
    ) from err

from backends import Backend, get_backend, to_numpy
from kernels import GradientProblem
from nets import _validate as validate

if TYPE_CHECKING:
    from nets.networks import _FeedForwardNet

__all__ = [
    "BLAS_THREADS",
    "CHUNKS_PER_WORKER",
    "SCHEDULER_ENV",
    "SHARDED_METHODS",
    "Chunk",
    "ChunkError",
    "gradient_chunks",
    "numerical_gradient",
    "plan_chunks",
]

Array = Any
SHARDED_METHODS = ("incremental", "batched")
SCHEDULER_ENV = "GRADGAP_DASK_SCHEDULER"
CHUNKS_PER_WORKER = 8
# A multi-threaded BLAS may split a GEMM differently from a single-threaded one and round differently
# (OpenBLAS does, by ~1e-14), so the single-process numbers depend on the BLAS thread count. Every
# chunk runs with one BLAS thread: the result equals net.numerical_gradient run with one BLAS thread
# (threadpoolctl.threadpool_limits(1, "blas")) on the same kind of CPU, wherever the workers are.
BLAS_THREADS = 1


@dataclass(frozen=True)
class Chunk:
    """One task's parameters. ``layer`` is 0-based (W1 is layer 0).

    span "columns": W[:, start:stop] and b[start:stop] of ``layer``.
    span "layers": every W and b of layers start..stop-1 (``layer`` == start).
    ``n_params`` counts the parameters; ``cost`` is a relative estimate used for balancing.
    """

    layer: int
    span: str
    start: int
    stop: int
    n_params: int
    cost: float

    @property
    def label(self) -> str:
        """The parameters in numpy notation, e.g. "W1[:, 0:98] and b1[0:98]" or "W3, b3, W4, b4"."""
        if self.span == "columns":
            n, columns = self.layer + 1, f"{self.start}:{self.stop}"
            return f"W{n}[:, {columns}] and b{n}[{columns}]"
        return ", ".join(f"W{m}, b{m}" for m in range(self.start + 1, self.stop + 1))

    def selections(self, widths: Sequence[int]) -> list[tuple[int, int, int]]:
        """The kernel's ``select`` values that compute this chunk; widths: each layer's number of units."""
        if self.span == "columns":
            return [(self.layer, self.start, self.stop)]
        return [(m, 0, widths[m]) for m in range(self.start, self.stop)]

    def place(self, grads: dict[str, np.ndarray], pieces: dict[str, np.ndarray]) -> None:
        """Write this chunk's pieces (as gradient_chunks returns them) into full-size gradients."""
        if self.span == "columns":
            n, columns = self.layer + 1, slice(self.start, self.stop)
            grads[f"W{n}"][:, columns] = pieces[f"W{n}"]
            grads[f"b{n}"][columns] = pieces[f"b{n}"]
        else:
            for name, piece in pieces.items():
                grads[name][...] = piece


class ChunkError(RuntimeError):
    """A chunk failed on its worker (or its worker kept dying); ``chunk`` names the parameters."""

    def __init__(self, chunk: Chunk, error: BaseException) -> None:
        super().__init__(f"{chunk.label} failed: {type(error).__name__}: {error}")
        self.chunk = chunk


@dataclass(frozen=True)
class _Problem:
    """What every worker receives once: the net (float64 host arrays and the loss settings) and the batch."""

    net: GradientProblem
    x: np.ndarray  # (B, I) float64
    labels: np.ndarray  # (B,) int64


def numerical_gradient(
    net: _FeedForwardNet,
    x: Any,
    t: Any,
    method: str = "incremental",
    h: float = 1e-4,
    client: distributed.Client | str | None = None,
    n_chunks: int | None = None,
) -> dict[str, Array]:
    """net.numerical_gradient(x, t, method=method, h=h), sharded over a Dask cluster: the same bits.

    client: a distributed.Client; a scheduler address; or None for $GRADGAP_DASK_SCHEDULER, else a
    LocalCluster (one single-threaded worker process per core) started and closed for this call.
    n_chunks: about how many tasks (default CHUNKS_PER_WORKER per worker; see plan_chunks for what
    splits). Returns {"W1", "b1", ...} float64 arrays on the net's backend, like the net's method.
    Raises ChunkError naming the parameters of a chunk that failed.
    """
    validate.check_choice(method, SHARDED_METHODS, "method")
    step = validate.check_step(h)
    x64, labels = _checked_batch(net, x, t)
    grads = {name: np.empty(p.shape, dtype=np.float64) for name, p in net.params.items()}
    with _connected(client) as dask_client:
        if n_chunks is None:
            n_chunks = CHUNKS_PER_WORKER * max(1, len(dask_client.scheduler_info()["workers"]))
        chunks = plan_chunks(net, x, method, n_chunks)
        for chunk, pieces in _gather(dask_client, net.backend.name, method, _problem(net, x64, labels, step), chunks):
            chunk.place(grads, pieces)
    return {name: net.backend.asarray(grad) for name, grad in grads.items()}


def gradient_chunks(
    net: _FeedForwardNet,
    x: Any,
    t: Any,
    chunks: Sequence[Chunk],
    method: str = "incremental",
    h: float = 1e-4,
    client: distributed.Client | str | None = None,
) -> list[dict[str, np.ndarray]]:
    """Compute only ``chunks`` (from plan_chunks for this net and method) on the cluster.

    Returns, in the order of ``chunks``, {parameter name: float64 host array}: W[:, start:stop]
    and b[start:stop] for span "columns", whole arrays for "layers"; each equals that slice of
    net.numerical_gradient (Chunk.place writes them into full arrays).
    """
    validate.check_choice(method, SHARDED_METHODS, "method")
    step = validate.check_step(h)
    x64, labels = _checked_batch(net, x, t)
    chunks = list(chunks)
    results: dict[int, dict[str, np.ndarray]] = {}
    with _connected(client) as dask_client:
        for chunk, pieces in _gather(dask_client, net.backend.name, method, _problem(net, x64, labels, step), chunks):
            results[id(chunk)] = pieces
    return [results[id(chunk)] for chunk in chunks]


def plan_chunks(net: _FeedForwardNet, x: Any, method: str = "incremental", n_chunks: int = 8) -> list[Chunk]:
    """Split every parameter of ``net`` into about ``n_chunks`` chunks of similar estimated cost.

    incremental: each hidden layer at least two before the output gets chunks of whole columns (at
    least one, at most one per column, in proportion to its cost on the batch x); the last two
    layers form one chunk. batched: one chunk (see the module docstring). Together the chunks cover
    every parameter exactly once.
    """
    validate.check_choice(method, SHARDED_METHODS, "method")
    if isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or n_chunks < 1:
        raise ValueError(f"n_chunks must be a positive integer; got {n_chunks!r}")
    sizes, n_layers = net.sizes, net.n_layers
    n_params = [sizes[m] * sizes[m + 1] + sizes[m + 1] for m in range(n_layers)]
    if method == "batched":
        return [Chunk(0, "layers", 0, n_layers, sum(n_params), 1.0)]
    tail = max(0, n_layers - 2)
    pairs = _active_pairs(net, x)
    column_costs = [pairs[m] * _pair_cost(sizes, m) for m in range(tail)]
    tail_cost = 2.0 * pairs[tail] * sizes[tail + 1] * _ELEMENTWISE * sizes[-1]
    total = sum(cost * sizes[m + 1] for m, cost in enumerate(column_costs)) + tail_cost
    chunks = []
    for layer, cost in enumerate(column_costs):
        n_columns = sizes[layer + 1]
        n_parts = min(n_columns, max(1, round(n_chunks * cost * n_columns / total)))
        bounds = [n_columns * part // n_parts for part in range(n_parts + 1)]
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            width = stop - start
            chunks.append(Chunk(layer, "columns", start, stop, width * (sizes[layer] + 1), cost * width))
    chunks.append(Chunk(tail, "layers", tail, n_layers, sum(n_params[tail:]), tail_cost))
    return chunks


# Cost model for balancing, in flop-like units calibrated on numpy (784-1000-1000-1000-10, B=100):
# an elementwise pass over one element of the recomputed rows costs about 400 GEMM flops.
_ELEMENTWISE = 400


def _pair_cost(sizes: list[int], layer: int) -> float:
    """+h and -h cost of one (input, sample) pair of a column: the GEMMs after the next layer, and its width."""
    gemm = sum(2 * sizes[m] * sizes[m + 1] for m in range(layer + 2, len(sizes) - 1))
    return 2.0 * (gemm + _ELEMENTWISE * sizes[layer + 2])


def _active_pairs(net: _FeedForwardNet, x: Any) -> list[int]:
    """Per layer, the (input, sample) pairs the incremental method recomputes: non-zero inputs + the bias."""
    xp, kernels = net.backend.xp, net.backend.kernels
    z = validate.check_features(net.backend, x, net.input_size, net.dtype).astype(xp.float64)
    pairs = []
    for m in range(1, net.n_layers + 1):
        pairs.append(int(xp.count_nonzero(z)) + z.shape[0])
        W, b = (net.params[f"{part}{m}"].astype(xp.float64) for part in "Wb")
        z = kernels.activation_forward(net.activation, kernels.affine_forward(z, W, b), net.alpha)
    return pairs


def _checked_batch(net: _FeedForwardNet, x: Any, t: Any) -> tuple[np.ndarray, np.ndarray]:
    """x as float64 (B, I) and labels as int64 (B,) on the host, validated as by the net."""
    x_checked = validate.check_features(net.backend, x, net.input_size, net.dtype)
    labels = validate.check_targets(net.backend, t, x_checked.shape[0], net.output_size)
    return to_numpy(x_checked).astype(np.float64, copy=False), to_numpy(labels)


@contextlib.contextmanager
def _connected(client: distributed.Client | str | None) -> Iterator[distributed.Client]:
    """The given client; else one to the given or $GRADGAP_DASK_SCHEDULER address; else a LocalCluster."""
    if isinstance(client, distributed.Client):
        yield client
        return
    if client is not None and not isinstance(client, str):
        raise TypeError(f"client must be a distributed.Client, a scheduler address or None; got {type(client)}")
    address = client or os.environ.get(SCHEDULER_ENV) or None
    if address:
        with distributed.Client(address) as own:
            yield own
        return
    with (
        distributed.LocalCluster(processes=True, threads_per_worker=1, dashboard_address=":0") as cluster,
        distributed.Client(cluster) as own,
    ):
        yield own


def _problem(net: _FeedForwardNet, x: np.ndarray, labels: np.ndarray, h: float) -> _Problem:
    layers = range(1, net.n_layers + 1)
    weights = [to_numpy(net.params[f"W{m}"]).astype(np.float64) for m in layers]
    biases = [to_numpy(net.params[f"b{m}"]).astype(np.float64) for m in layers]
    return _Problem(GradientProblem(weights, biases, net.activation, net.alpha, net.weight_decay_lambda, h), x, labels)


def _gather(
    client: distributed.Client, backend_name: str, method: str, problem: _Problem, chunks: list[Chunk]
) -> Iterator[tuple[Chunk, dict[str, np.ndarray]]]:
    """Ship the problem once per worker, submit one task per chunk, yield (chunk, pieces) as they finish.

    On the first failed chunk the others are cancelled and ChunkError is raised.
    """
    shared = client.scatter(problem, broadcast=True, hash=False)
    run = uuid.uuid4().hex[:8]
    pending = {}
    for i, chunk in enumerate(chunks):
        key = f"gradgap-{run}-{i} {chunk.label}"
        pending[client.submit(_compute_chunk, backend_name, method, shared, chunk, key=key)] = chunk
    try:
        for future in distributed.as_completed(list(pending)):
            chunk = pending.pop(future)
            try:
                if future.status != "finished":
                    error = future.exception() if future.status == "error" else RuntimeError(f"task {future.status}")
                    raise ChunkError(chunk, error) from error
                pieces = future.result()
            finally:
                future.release()  # a failed one too: the ChunkError's traceback must not pin it on the cluster
            yield chunk, pieces
    finally:
        client.cancel(list(pending))
        shared.release()


def _compute_chunk(backend_name: str, method: str, problem: _Problem, chunk: Chunk) -> dict[str, np.ndarray]:
    """On a worker: the chunk's pieces {name: float64 host array}, with one BLAS thread (see BLAS_THREADS)."""
    be = get_backend(backend_name)  # first: the limit below applies to the BLAS libraries loaded by then
    with threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
        return _chunk_pieces(be, method, problem, chunk)


def _chunk_pieces(be: Backend, method: str, problem: _Problem, chunk: Chunk) -> dict[str, np.ndarray]:
    """The chunk's pieces, each a call of the backend's kernel with ``select``."""
    host = problem.net
    on_device = dataclasses.replace(
        host, weights=[be.asarray(W) for W in host.weights], biases=[be.asarray(b) for b in host.biases]
    )
    x, labels = be.asarray(problem.x), be.asarray(problem.labels)
    kernel = getattr(be.kernels, f"numerical_gradient_{method}")
    pieces = {}
    for layer, start, stop in chunk.selections([W.shape[1] for W in host.weights]):
        dW, db = kernel(on_device, x, labels, select=(layer, start, stop))
        pieces[f"W{layer + 1}"], pieces[f"b{layer + 1}"] = be.to_numpy(dW), be.to_numpy(db)
    return pieces
