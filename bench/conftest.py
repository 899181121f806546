"""Fixtures of the benchmark suite: warmed-up backends, the data, the NumPy reference, machine info.

The options (--gap-profile, --require-backend) and the plain backend fixture are bench/plugin.py's,
shared with tests/. Without pytest-benchmark (a dev-only install) the benchmark modules are not
collected: they need its ``benchmark`` fixture.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess

import pytest

from backends import get_backend
from bench.common import LARGEST_BATCH, PROFILES, Batch, Profile, blas_threads, load_data, warm_up

if importlib.util.find_spec("pytest_benchmark") is None:
    collect_ignore_glob = ["bench_*.py"]

_WARMED: set[str] = set()  # backends whose code paths have run once this session (see warm_up)
_LOADED: dict[str, Batch] = {}  # the session's data, for machine_info
# Thread settings as the session started (imported libraries, dask for one, set some of them later).
_THREAD_VARS = ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "GRADGAP_BACKEND")
STARTING_ENV = {name: os.environ[name] for name in _THREAD_VARS if name in os.environ}


@pytest.fixture(scope="session")
def profile(request) -> Profile:
    return PROFILES[request.config.getoption("--gap-profile")]


@pytest.fixture
def backend(backend):
    """The plugin's backend (every backend, honest skips), warmed up once per session (see warm_up)."""
    if backend.name not in _WARMED:
        warm_up(backend)
        _WARMED.add(backend.name)
    return backend


@pytest.fixture(scope="session")
def data() -> Batch:
    """Up to LARGEST_BATCH samples: MNIST (found or downloaded), else synthetic with the reason (load_data)."""
    batch = load_data(LARGEST_BATCH)
    _LOADED["data"] = batch
    return batch


@pytest.fixture(scope="session")
def reference():
    """The NumPy backend: the reference every benchmark is checked against."""
    return get_backend("numpy")


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["gradgap"] = machine_details(config.getoption("--gap-profile"))
    if "data" in _LOADED:
        machine_info["gradgap"]["data"] = _LOADED["data"].info()


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
