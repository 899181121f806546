"""pytest plugin that `python -m bench.report` loads into the suite's run (-p bench.report.run_plugin).

- Backends: runs the benchmarks of the selected backends (--report-backends, default every one)
  that can be created here; the others are deselected, and why is recorded in the JSON's
  machine_info["gradgap_run"]["backends"] (not selected / not installed: which extra / no CUDA
  device), with each backend's passed/failed/skipped counts in ["outcomes"].
- Phases: orders the benchmarks so that each phase ("gap: numpy", "deep: numba", "peers", ...)
  runs in one stretch (within its module, so module fixtures are unaffected).
- Progress: appends one JSON line per event to --report-events FILE: {"event": "collected",
  "phases": [[phase, count], ...]}, then {"event": "done", "phase", "nodeid", "outcome"} per benchmark.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from backends import BACKEND_NAMES, BackendError, BackendNotInstalledError, NoCudaDeviceError, get_backend
from bench.report.results import RUN_RECORD_KEY

# Test functions that are a phase of their own; every other benchmark's phase is its module (bench_<phase>.py).
FUNCTION_PHASES = {"test_gap_deep": "deep"}
_BACKEND_ID = re.compile(r"backend=(\w+)")
_STATE = pytest.StashKey[dict]()
_OUTCOMES: dict[str, str] = {}  # nodeid -> failed / skipped / passed, from its setup, call and teardown reports
_BY_BACKEND: dict[str, dict[str, int]] = {}  # backend -> {"passed": n, "failed": n, "skipped": n}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradgap report", "used by python -m bench.report")
    group.addoption("--report-events", metavar="FILE", help="append one JSON line per progress event to FILE")
    group.addoption(
        "--report-backends",
        metavar="NAMES",
        default="",
        help="comma-separated backends to benchmark (default: every one that can be created here)",
    )


def phase_of(nodeid: str) -> str:
    """'bench/bench_gap.py::test_gap[backend=numba-naive]' -> 'gap: numba'; a benchmark without a backend: 'peers'."""
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py").removeprefix("bench_")
    function = nodeid.split("::")[-1].split("[", 1)[0]
    phase = FUNCTION_PHASES.get(function, module)
    backend = _BACKEND_ID.search(nodeid)
    return f"{phase}: {backend.group(1)}" if backend else phase


def backend_of(nodeid: str) -> str | None:
    found = _BACKEND_ID.search(nodeid)
    return found.group(1) if found else None


def why_not_available(name: str, selected: list[str]) -> str | None:
    """None when the backend runs here; else why not: not selected, not installed (which extra), no CUDA device."""
    if selected and name not in selected:
        return f"not selected (GRADGAP_BACKEND={','.join(selected)})"
    try:
        get_backend(name)
    except BackendNotInstalledError as err:
        return f"not installed: {err}"
    except NoCudaDeviceError as err:
        return f"no CUDA device: {err}"
    except (BackendError, ImportError) as err:
        return f"unavailable: {err}"
    return None


def _write(config: pytest.Config, event: dict[str, Any]) -> None:
    path = config.getoption("--report-events")
    if path:
        with Path(path).open("a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    selected = [name for name in config.getoption("--report-backends").split(",") if name]
    unknown = [name for name in selected if name not in BACKEND_NAMES]
    if unknown:
        raise pytest.UsageError(f"unknown backend(s) {unknown}; valid names: {', '.join(BACKEND_NAMES)}")
    absent = {name: why for name in BACKEND_NAMES if (why := why_not_available(name, selected)) is not None}
    config.stash[_STATE] = {"backends": absent, "selected": selected}
    kept = [item for item in items if backend_of(item.nodeid) not in absent]
    deselected = [item for item in items if backend_of(item.nodeid) in absent]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    keyword = config.getoption("keyword", default="")
    for name in BACKEND_NAMES:
        if name not in absent and not any(backend_of(item.nodeid) == name for item in kept):
            absent[name] = f"none of its benchmarks selected (-k {keyword!r})" if keyword else "no benchmark collected"
    order = {phase: i for i, phase in enumerate(dict.fromkeys(phase_of(item.nodeid) for item in kept))}
    kept.sort(key=lambda item: order[phase_of(item.nodeid)])  # stable: the suite's order within a phase
    items[:] = kept
    counts = {phase: 0 for phase in order}
    for item in kept:
        counts[phase_of(item.nodeid)] += 1
    _write(config, {"event": "collected", "phases": list(counts.items()), "absent": absent})


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        _OUTCOMES[report.nodeid] = "failed"
    elif report.skipped and _OUTCOMES.get(report.nodeid) != "failed":
        _OUTCOMES[report.nodeid] = "skipped"
    else:
        _OUTCOMES.setdefault(report.nodeid, "passed")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    result = yield
    outcome = _OUTCOMES.pop(item.nodeid, "passed")
    backend = backend_of(item.nodeid)
    if backend is not None:
        counts = _BY_BACKEND.setdefault(backend, {"passed": 0, "failed": 0, "skipped": 0})
        counts[outcome] += 1
    _write(item.config, {"event": "done", "phase": phase_of(item.nodeid), "nodeid": item.nodeid, "outcome": outcome})
    return result


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _write(session.config, {"event": "finished", "exitstatus": int(exitstatus)})


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    state = config.stash.get(_STATE, {"backends": {}, "selected": []})
    machine_info[RUN_RECORD_KEY] = {
        "backends": state["backends"],
        "selected": state["selected"],
        "outcomes": {name: dict(counts) for name, counts in _BY_BACKEND.items()},
    }
