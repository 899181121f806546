"""Fixtures and options of the benchmark suite: --gap-profile, backends, data, machine info."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess

import pytest

from backends import BACKEND_NAMES, BackendError, get_backend
from bench.common import LARGEST_BATCH, PROFILES, Batch, Profile, blas_threads, load_data, warm_up

_WARMED: set[str] = set()  # backends whose code paths have run once this session (see warm_up)
# Thread settings as the session started (imported libraries, dask for one, set some of them later).
_THREAD_VARS = ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "GRADGAP_BACKEND")
STARTING_ENV = {name: os.environ[name] for name in _THREAD_VARS if name in os.environ}


def pytest_addoption(parser):
    parser.addoption(
        "--gap-profile",
        choices=sorted(PROFILES),
        default="quick",
        help="benchmark profile: quick (default; the naive method timed on a sample of parameters and scaled) "
        "or full (the naive method over every parameter, few rounds)",
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "backend=cupy" in item.nodeid:
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="session")
def profile(request) -> Profile:
    return PROFILES[request.config.getoption("--gap-profile")]


@pytest.fixture(params=BACKEND_NAMES, ids=[f"backend={n}" for n in BACKEND_NAMES])
def backend(request):
    """Every backend, warmed up once per session; one that cannot be created here is skipped with the reason.

    ``--require-backend NAME`` (defined by tests/conftest.py) turns that skip into a failure.
    """
    try:
        backend = get_backend(request.param)
    except (BackendError, ImportError) as err:
        required = request.config.getoption("--require-backend", default=None) or []
        if request.param in required:
            raise
        pytest.skip(f"{request.param} backend unavailable: {err}")
    if backend.name not in _WARMED:
        warm_up(backend)
        _WARMED.add(backend.name)
    return backend


@pytest.fixture(scope="session")
def data() -> Batch:
    """Up to LARGEST_BATCH samples: real MNIST when its files are found, else synthetic (see load_data)."""
    return load_data(LARGEST_BATCH)


@pytest.fixture(scope="session")
def reference():
    """The NumPy backend: the reference every benchmark is checked against."""
    return get_backend("numpy")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["gradgap"] = machine_details(config.getoption("--gap-profile"))


def machine_details(profile_name: str) -> dict:
    """CPU model, BLAS and its threads, library versions, GPU: what the report names the machine by."""
    details = {
        "profile": profile_name,
        "node": platform.node(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "blas": _blas_libraries(),
        "blas_threads": blas_threads(),
        "versions": {name: _version(name) for name in ("numpy", "scipy", "numba", "threadpoolctl", "torch")},
        "env": STARTING_ENV,
    }
    details["versions"]["cupy"] = next(
        (v for v in (_version(n) for n in ("cupy", "cupy-cuda12x", "cupy-cuda13x")) if v), None
    )
    if details["versions"]["numba"]:
        details["numba_threads"] = _numba_threads()
    if details["versions"]["cupy"]:
        details["gpu"] = _gpu_details()
    return details


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _blas_libraries() -> list[dict]:
    if importlib.util.find_spec("threadpoolctl") is None:
        return []
    from threadpoolctl import threadpool_info

    keep = ("user_api", "internal_api", "version", "num_threads", "architecture", "threading_layer", "prefix")
    return [{k: lib.get(k) for k in keep if k in lib} for lib in threadpool_info()]


def _numba_threads() -> int | None:
    try:
        import numba
    except Exception:  # installed but broken: the numba benchmarks say why
        return None
    return int(numba.config.NUMBA_NUM_THREADS)


def _gpu_details() -> dict:
    """Name, memory, driver and CUDA runtime of device 0, or the error that prevented reading them."""
    try:
        import cupy

        runtime = cupy.cuda.runtime
        props = runtime.getDeviceProperties(0)
        name = props["name"]
        return {
            "name": name.decode() if isinstance(name, bytes) else str(name),
            "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
            "compute_capability": f"{props['major']}.{props['minor']}",
            "devices": runtime.getDeviceCount(),
            "cuda_driver_api": _cuda_version(runtime.driverGetVersion()),
            "cuda_runtime": _cuda_version(runtime.runtimeGetVersion()),
            "driver": _nvidia_driver(),
        }
    except Exception as err:  # no device, no driver, broken install: record why
        return {"error": f"{type(err).__name__}: {err}"}


def _nvidia_driver() -> str | None:
    """The NVIDIA driver version from nvidia-smi, None where it cannot be asked."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else None


def _cuda_version(encoded: int) -> str:
    """CUDA's 12040 -> "12.4"."""
    return f"{encoded // 1000}.{encoded % 1000 // 10}"
