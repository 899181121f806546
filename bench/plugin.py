"""The pytest plugin that tests/ and bench/ share (pyproject's addopts load it: ``-p bench.plugin``).

Options, registered once for every pytest run in the repository (``pytest``, ``pytest tests``,
``pytest bench``): ``--require-backend NAME`` (repeatable: that backend's absence fails instead
of skipping) and ``--gap-profile`` (the benchmark profile, bench.common.PROFILES). Fixtures:
``backend`` (every backend, honest skips), ``other_backend`` (every backend but numpy) and
``mnist_dir`` (skips where no MNIST files are found). Items whose id names backend=cupy are
marked ``gpu``. Needs only pytest (not pytest-benchmark).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from backends import BACKEND_NAMES, Backend, BackendError, get_backend
from bench.common import DEFAULT_PROFILE, PROFILES, SHARED_MNIST
from bench.common import mnist_dir as find_mnist_dir


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradgap")
    group.addoption(
        "--require-backend",
        action="append",
        default=[],
        choices=BACKEND_NAMES,
        help="backend that must be available: its absence fails instead of skipping (repeatable)",
    )
    group.addoption(
        "--gap-profile",
        choices=sorted(PROFILES),
        default=DEFAULT_PROFILE,
        help="benchmark profile: quick (default; the naive loops on samples of parameters, scaled), standard "
        "(python -m bench.report's default: the naive loop over every parameter once per backend) or full "
        "(every parameter, the long sweeps, several rounds)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "backend=cupy" in item.nodeid:
            item.add_marker(pytest.mark.gpu)


def make_backend(request: pytest.FixtureRequest, name: str) -> Backend:
    """get_backend(name); where it cannot be created here: a skip with the reason, or the error under
    --require-backend name."""
    try:
        return get_backend(name)
    except (BackendError, ImportError) as err:
        if name in request.config.getoption("--require-backend"):
            raise
        pytest.skip(f"{name} backend unavailable: {err}")


@pytest.fixture(params=BACKEND_NAMES, ids=[f"backend={n}" for n in BACKEND_NAMES])
def backend(request: pytest.FixtureRequest) -> Backend:
    """Every backend; numba/cupy skipped with the reason where not installed or no GPU."""
    return make_backend(request, request.param)


OTHER_BACKENDS = [n for n in BACKEND_NAMES if n != "numpy"]


@pytest.fixture(params=OTHER_BACKENDS, ids=[f"backend={n}" for n in OTHER_BACKENDS])
def other_backend(request: pytest.FixtureRequest) -> Backend:
    """Every backend except the numpy reference."""
    return make_backend(request, request.param)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """A directory with the four canonical MNIST .gz files (bench.common.mnist_dir); skips if there is none."""
    found = find_mnist_dir()
    if found is None:
        pytest.skip(f"MNIST files not found (set GRADGAP_DATA_DIR, or provide {SHARED_MNIST})")
    return found
