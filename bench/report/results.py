"""Results: pytest-benchmark JSON files read into Runs of Measurements, and the numbers derived from them.

A Measurement is one benchmark of one run (its best round, scaled to every parameter when the
suite marked it an estimate). A Run is one results file: its machine, its measurements, which
backends ran (and why the others did not) and where its data came from. Ratios are only ever
taken within one run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends import BACKEND_NAMES

REPO = Path(__file__).resolve().parents[2]
REPO_README = REPO / "README.md"  # where what each method computes is written (the report links to it)
BACKEND_ORDER = BACKEND_NAMES  # numpy, numba, cupy: the order of every table and chart
# Suites the report reads (extra_info["suite"]); any other suite is listed as pytest-benchmark recorded it.
SUITES = ("gap", "deep", "kernels", "scaling", "peers", "dgemm", "distributed")
# What a missing backend needs, for files written before the suite recorded why a backend did not run.
INSTALL_HINTS = {
    "numba": "pip install 'gradgap[numba]'",
    "cupy": "pip install 'gradgap[cuda12]' (CUDA 12) or 'gradgap[cuda13]' (CUDA 13)",
}
BACKEND_SUITES = ("gap", "deep", "kernels", "scaling")  # suites run once per backend: they say which backends ran
RUN_RECORD_KEY = "gradgap_run"  # machine_info key written by bench.report.run_plugin: backends, selection


class ReportError(Exception):
    """A results file is missing, empty or malformed, or the suite produced no results."""


@dataclass(frozen=True)
class Measurement:
    """One benchmark of one run.

    seconds: the best round (min), scaled to the whole gradient when estimate; measured_s: the best
    round as timed. estimate_how: how an estimate was made (None when measured). flops: floating-point
    operations of one call as the suite counted them (None when not recorded).
    """

    suite: str
    backend: str
    method: str
    net: str
    n_params: int
    batch: int
    dtype: str
    data: str
    seconds: float
    measured_s: float
    rounds: int
    estimate: bool
    estimate_how: str | None
    scaled_from: int | None
    sweep: str | None
    x: int | None
    name: str
    activation: str | None = None
    flops: float | None = None
    info: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend ran in a run; why not (not installed, no CUDA device, not selected...), or, when it
    ran, what went wrong ("3 of its benchmarks failed"; "" when nothing did)."""

    name: str
    ran: bool
    why: str = ""


@dataclass
class Run:
    """One results file: where it came from, the machine, and its measurements."""

    path: Path
    machine: dict
    when: str
    measurements: list[Measurement]
    profile: str = "unknown"
    label: str = ""
    others: list[tuple[str, str, float, bool]] = field(default_factory=list)  # (suite, name, best round, estimate)

    @property
    def details(self) -> dict:
        """machine_info["gradgap"]: what the suite recorded about the machine (CPU, BLAS, versions, data)."""
        details = self.machine.get("gradgap")
        return details if isinstance(details, dict) else {}

    def find(self, suite: str, backend: str, method: str, **where: Any) -> Measurement | None:
        """The first measurement of suite/backend/method whose other fields equal where's; None if absent."""
        for m in self.measurements:
            if (m.suite, m.backend, m.method) == (suite, backend, method) and all(
                getattr(m, k) == v for k, v in where.items()
            ):
                return m
        return None

    def of_suite(self, suite: str) -> list[Measurement]:
        return [m for m in self.measurements if m.suite == suite]

    def backends(self, suite: str = "gap") -> list[str]:
        """Backends with measurements in suite, in BACKEND_ORDER (others after, sorted)."""
        found = {m.backend for m in self.of_suite(suite)}
        return [b for b in BACKEND_ORDER if b in found] + sorted(found - set(BACKEND_ORDER))

    @property
    def data_sources(self) -> set[str]:
        """The data of the gradient benchmarks ("mnist", "synthetic"); dgemm's random matrices and the
        distributed suite's own batch are not the suite's data."""
        return {m.data for m in self.measurements if m.suite in (*BACKEND_SUITES, "peers")}

    def backend_statuses(self) -> list[BackendStatus]:
        """Every backend of the project: ran (has measurements), else why not, as recorded or inferred."""
        ran = {m.backend for m in self.measurements if m.suite in BACKEND_SUITES}
        record = self.machine.get(RUN_RECORD_KEY)
        record = record if isinstance(record, dict) else {}
        recorded, outcomes = record.get("backends") or {}, record.get("outcomes") or {}
        statuses = []
        for name in BACKEND_ORDER:
            counts = outcomes.get(name) or {}
            failed = int(counts.get("failed", 0))
            if name in ran:
                statuses.append(BackendStatus(name, True, f"{failed} of its benchmarks failed" if failed else ""))
            elif isinstance(recorded.get(name), str) and recorded[name]:
                statuses.append(BackendStatus(name, False, recorded[name]))
            elif failed:
                why = f"available, but all {failed} of its benchmarks failed (see the run's pytest log)"
                statuses.append(BackendStatus(name, False, why))
            elif counts.get("skipped"):
                statuses.append(BackendStatus(name, False, "available, but its benchmarks skipped (see the log)"))
            else:
                statuses.append(BackendStatus(name, False, self._inferred_absence(name)))
        return statuses

    def _inferred_absence(self, name: str) -> str:
        """Why a backend has no measurements, from the machine info of a file without the run record."""
        versions = self.details.get("versions", {})
        selected = (self.details.get("env") or {}).get("GRADGAP_BACKEND")
        if selected and selected != name:
            return f"not selected (GRADGAP_BACKEND={selected})"
        library = "cupy" if name == "cupy" else name
        if name in INSTALL_HINTS and isinstance(versions, dict) and library in versions and not versions[library]:
            return f"not installed: {INSTALL_HINTS[name]}"
        gpu = self.details.get("gpu")
        if name == "cupy" and isinstance(gpu, dict) and gpu.get("error"):
            return f"no CUDA device: {gpu['error']}"
        return "no results for it in this file (not recorded why)"


# --------------------------------------------------------------------------------- reading


def load_run(path: str | Path) -> Run:
    """Read one pytest-benchmark JSON file written by the suite; ReportError naming the file if unusable."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(f"{path}: no such results file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"{path}: cannot be read: {err}") from err
    if not text.strip():
        raise ReportError(f"{path}: the file is empty (an interrupted run?); expected pytest-benchmark JSON")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks"), list):
        raise ReportError(f"{path}: not a pytest-benchmark results file (no 'benchmarks' list)")
    benches = [b for b in doc["benchmarks"] if isinstance(b, dict) and isinstance(b.get("extra_info"), dict)]
    measurements = [_measurement(path, b) for b in benches if b["extra_info"].get("suite") in SUITES]
    if not measurements:
        raise ReportError(f"{path}: holds no gradgap benchmarks (none has extra_info['suite'] in {SUITES})")
    others = [
        (
            str(b["extra_info"]["suite"]),
            str(b.get("fullname") or b.get("name")),
            float(b["stats"]["min"]),
            bool(b["extra_info"].get("estimate")),
        )
        for b in benches
        if b["extra_info"].get("suite") not in SUITES + (None,) and isinstance(b.get("stats"), dict)
    ]
    machine = doc.get("machine_info") if isinstance(doc.get("machine_info"), dict) else {}
    details = machine.get("gradgap") if isinstance(machine.get("gradgap"), dict) else {}
    return Run(
        path=path,
        machine=machine,
        when=str(doc.get("datetime", "")),
        measurements=measurements,
        profile=str(details.get("profile") or "unknown"),
        others=others,
    )


def _measurement(path: Path, bench: dict) -> Measurement:
    info, stats = bench["extra_info"], bench.get("stats")
    name = str(bench.get("fullname") or bench.get("name"))
    try:
        measured = float(stats["min"])
        estimate = bool(info.get("estimate", False))
        if info.get("total_s") is not None:  # the suite's own figure for the whole gradient (distributed)
            seconds = float(info["total_s"])
        else:
            seconds = measured * (float(info.get("scale", 1.0)) if estimate else 1.0)
        scaled_from = int(info["scaled_from"]) if estimate and info.get("scaled_from") is not None else None
        return Measurement(
            suite=str(info["suite"]),
            backend=str(info["backend"]),
            method=str(info["method"]),
            net=str(info.get("net", "")),
            n_params=int(info.get("n_params", 0)),
            batch=int(info.get("batch", 0)),
            dtype=str(info.get("dtype", "float64")),
            data=str(info.get("data", "unknown")),
            seconds=seconds,
            measured_s=measured,
            rounds=int(stats.get("rounds", 1)),
            estimate=estimate,
            estimate_how=_estimate_how(info, scaled_from) if estimate else None,
            scaled_from=scaled_from,
            sweep=info.get("sweep"),
            x=int(info["x"]) if info.get("x") is not None else None,
            name=name,
            activation=info.get("activation"),
            flops=float(info["flops"]) if info.get("flops") is not None else None,
            info=dict(info),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ReportError(f"{path}: benchmark {name!r} lacks a usable field ({type(err).__name__}: {err})") from err


def _estimate_how(info: dict, scaled_from: int | None) -> str:
    """How the suite made an estimate: its own words (estimate_how), else what older files recorded."""
    if info.get("estimate_how"):
        return str(info["estimate_how"])
    if scaled_from is not None and info.get("n_params"):
        return f"timed on {scaled_from:,} of {int(info['n_params']):,} parameters and scaled to all of them"
    if info.get("timed_share_of_columns") is not None:
        return (
            f"timed on {float(info['timed_share_of_columns']):.1%} of the sharded columns and scaled to all of "
            "them, plus the last layers' task timed once and divided by the worker count"
        )
    return "estimated by the suite (it did not record how)"


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Read every file and give each run a label (its machine; with the date where two share one)."""
    if not paths:
        raise ReportError("no results files given")
    runs = [load_run(p) for p in paths]
    for run in runs:
        gpu = run.details.get("gpu", {}).get("name") if isinstance(run.details.get("gpu"), dict) else None
        run.label = str(run.details.get("node") or run.machine.get("node") or run.path.stem)
        run.label += f" ({gpu})" if gpu else ""
    for tiebreak in (lambda run, i: f"{run.label} {run.when[:16]}", lambda run, i: f"{run.label} #{i + 1}"):
        labels = [run.label for run in runs]
        for i, run in enumerate(runs):
            if labels.count(run.label) > 1:
                run.label = tiebreak(run, i)
    return runs


# --------------------------------------------------------------------------------- derived numbers


def ratio(numerator: Measurement | None, denominator: Measurement | None) -> float | None:
    """numerator.seconds / denominator.seconds; None when either is missing."""
    if numerator is None or denominator is None or denominator.seconds <= 0:
        return None
    return numerator.seconds / denominator.seconds


def slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(time) against log(size); None with fewer than two sizes."""
    if len({x for x, _ in points}) < 2:
        return None
    xs = [math.log(x) for x, _ in points]
    ys = [math.log(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


SeriesKey = tuple[str, str, str, str]  # (sweep, backend, method, dtype)


def scaling_series(run: Run) -> dict[SeriesKey, list[Measurement]]:
    """{(sweep, backend, method, dtype): the sweep's measurements sorted by size}."""
    series: dict[SeriesKey, list[Measurement]] = {}
    for m in run.of_suite("scaling"):
        if m.sweep and m.x:
            series.setdefault((m.sweep, m.backend, m.method, m.dtype), []).append(m)
    return {key: sorted(points, key=lambda m: m.x or 0) for key, points in sorted(series.items())}


def series_slope(points: Sequence[Measurement]) -> float | None:
    """The fitted log-log slope of a sweep's seconds against its sizes."""
    return slope([(float(m.x or 0), m.seconds) for m in points])
