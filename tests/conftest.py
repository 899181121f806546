"""Shared fixtures: a backend fixture over every backend (honest skips), MNIST location."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from backends import BACKEND_NAMES, BackendNotInstalledError, NoCudaDeviceError, get_backend, to_numpy

REPO = Path(__file__).resolve().parent.parent
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"


def pytest_addoption(parser):
    parser.addoption(
        "--require-backend",
        action="append",
        default=[],
        help="backend that must be available: its absence fails instead of skipping (repeatable)",
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "backend=cupy" in item.nodeid:
            item.add_marker(pytest.mark.gpu)


def make_backend(request, name):
    try:
        return get_backend(name)
    except (BackendNotInstalledError, NoCudaDeviceError) as err:
        if name in request.config.getoption("--require-backend"):
            raise
        pytest.skip(f"{name} backend unavailable: {err}")


@pytest.fixture(params=BACKEND_NAMES, ids=[f"backend={n}" for n in BACKEND_NAMES])
def backend(request):
    """Every backend; numba/cupy skipped with the reason where not installed or no GPU."""
    return make_backend(request, request.param)


@pytest.fixture(params=[n for n in BACKEND_NAMES if n != "numpy"], ids=[f"backend={n}" for n in BACKEND_NAMES[1:]])
def other_backend(request):
    """Every backend except the numpy reference."""
    return make_backend(request, request.param)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """Directory with the four canonical MNIST .gz files: GRADGAP_DATA_DIR, else ../shared/data/mnist."""
    env = os.environ.get("GRADGAP_DATA_DIR")
    for candidate in ([Path(env)] if env else []) + [SHARED_MNIST]:
        if (candidate / "train-images-idx3-ubyte.gz").exists():
            return candidate
    pytest.skip(f"MNIST files not found (set GRADGAP_DATA_DIR or provide {SHARED_MNIST})")


def assert_gradients_close(numeric, reference, *, rtol=0.0, atol=1e-9, context="") -> None:
    """Every array of ``numeric`` matches ``reference`` (same keys and shapes); names the worst element."""
    problems = []
    assert set(numeric) == set(reference), f"{context}: keys {sorted(numeric)} vs {sorted(reference)}"
    for name, want in reference.items():
        got, want = to_numpy(numeric[name]).astype(np.float64), to_numpy(want).astype(np.float64)
        if got.shape != want.shape:
            problems.append(f"{name}: shape {got.shape}, expected {want.shape}")
        elif not np.allclose(got, want, rtol=rtol, atol=atol):
            i = np.unravel_index(np.argmax(np.abs(got - want)), want.shape)
            problems.append(
                f"{name}{list(i)}: {got[i]:.6e} vs reference {want[i]:.6e} (|diff| {abs(got[i] - want[i]):.2e})"
            )
    assert not problems, f"{context}: gradients differ (rtol={rtol}, atol={atol})\n  " + "\n  ".join(problems)


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
