"""Fixtures of the tests. The options (--require-backend, --gap-profile) and the backend,
other_backend and mnist_dir fixtures come from bench/plugin.py, shared with the benchmarks;
the helpers below are re-exported from bench/common.py for the test modules that import them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.common import SHARED_MNIST, assert_gradients_close, session_gradient
from bench.plugin import make_backend
from nets.data import MNIST_FILES

REPO = Path(__file__).resolve().parent.parent

__all__ = ["REPO", "SHARED_MNIST", "assert_by_rows", "assert_gradients_close", "make_backend", "session_gradient"]
ROWS_PER_BLOCK = 2000  # 12.5 MB of float64 MNIST rows: temporaries that the allocator reuses


def assert_by_rows(check, actual, expected_rows, expected_shape) -> None:
    """check(actual, expected) (an elementwise numpy.testing assertion) block of rows by block of rows, after
    comparing shapes: expected_rows(rows) gives the expected values of actual[rows]. The same check as on the
    whole arrays, without MNIST-sized temporaries (~0.4 s of page faults each)."""
    assert actual.shape == tuple(expected_shape), f"shape {actual.shape}, expected {tuple(expected_shape)}"
    for start in range(0, actual.shape[0], ROWS_PER_BLOCK):
        rows = slice(start, start + ROWS_PER_BLOCK)
        check(actual[rows], expected_rows(rows))


@pytest.fixture(scope="session")
def mnist_train(mnist_dir):
    """(x_train float64 normalised (60000, 784), t_train int64 labels) from the real files."""
    from nets.data import load_mnist

    (x_train, t_train), _ = load_mnist(dtype="float64", data_dir=mnist_dir)
    return x_train, t_train


@pytest.fixture(scope="session")
def mnist_batch(mnist_train):
    """The seed setting's batch: the first 100 training images and their labels."""
    x_train, t_train = mnist_train
    return np.array(x_train[:100]), np.array(t_train[:100])


@pytest.fixture(scope="module")
def server(mnist_dir):
    """A loopback HTTP server serving the real MNIST files (tests/mnist_server.py), one per test module."""
    from tests.mnist_server import MnistServer

    srv = MnistServer({spec.name: (Path(mnist_dir) / spec.name).read_bytes() for spec in MNIST_FILES.values()})
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()
