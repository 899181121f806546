"""python -m bench.report: run the benchmark suite (or read saved runs) and write a report with charts.

    python -m bench.report                        # full profile on the installed backends
    python -m bench.report --profile quick        # the quick profile (a few minutes)
    python -m bench.report --from a.json b.json   # merge saved runs (say a GPU and a CPU run); runs nothing
    python -m bench.report --out DIR              # where REPORT.md and the PNG charts go (default report/)

A run saves pytest-benchmark's JSON under bench/results/<machine>-<date>.json. Ratios are always
taken within one run (one machine, one session). Times are the best round (min) of each benchmark;
a naive timing made on a sample of parameters is scaled to all of them and marked "est.".
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import SEED_BACKPROP_S, SEED_N_PARAMS, SEED_NUMERICAL_S

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
BACKEND_ORDER = ("numpy", "numba", "cupy")
GAP_METHODS = ("backprop", "naive", "batched", "incremental")
SUITES = ("gap", "deep", "kernels", "scaling", "peers")  # what this report reads; others are listed as they are

# ---------------------------------------------------------------------------------------------
# WORDING FOR THE LEAD: the exact shortcuts the incremental method takes (REPORT.md lists them).
INCREMENTAL_SHORTCUTS = (
    "One base forward pass is cached; the layers before a perturbed weight are never recomputed.",
    "Moving W_l[i, j] by ±h moves only column j of layer l's pre-activation, by ±h·input[:, i]: the next "
    "layer's input changes by a rank-1 term, and only the layers after it are recomputed.",
    "Only the samples whose input i is non-zero are recomputed; inputs that are zero across the batch give "
    "exactly 0 and are skipped (b_l is treated as an input of ones).",
    "Where the perturbed layer feeds the output, the base softmax is reused: exp(l+d) = exp(l)·exp(d), so "
    "the new log-sum-exp is lse + log1p(Σ p·expm1(d)).",
    "Numba only: sigmoid and tanh changes use the exact identities σ(a+d)−σ(a) = s(1−s)(eᵈ−1)/(1+s(eᵈ−1)) and "
    "tanh(a+d)−tanh(a) = (1−t²)·tanh d/(1+t·tanh d); Σ p·expm1(δw) and log1p are summed as power series in δ "
    "(moments m_k = Σ p·w^k/k!) only where the remainder is provably below 2⁻⁶⁰ per sample, else evaluated directly.",
    "Batched (brute force) has one exact shortcut too: input columns that are zero across the batch are left out "
    "of x @ W1 (they add exactly 0), and their W1 rows, whose differences are exactly 0, are not perturbed.",
    "The result is the same central difference (f(p+h) − f(p−h)) / 2h as the naive loop, for every parameter.",
)
# ---------------------------------------------------------------------------------------------


class ReportError(Exception):
    """A results file is missing, empty or malformed, or the suite produced no results."""


@dataclass(frozen=True)
class Measurement:
    """One benchmark of one run. seconds: best round, scaled to every parameter when estimate."""

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
    scaled_from: int | None
    sweep: str | None
    x: int | None
    name: str


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

    def find(self, suite: str, backend: str, method: str, **where: Any) -> Measurement | None:
        for m in self.measurements:
            if (m.suite, m.backend, m.method) == (suite, backend, method) and all(
                getattr(m, k) == v for k, v in where.items()
            ):
                return m
        return None

    def backends(self, suite: str = "gap") -> list[str]:
        found = {m.backend for m in self.measurements if m.suite == suite}
        return [b for b in BACKEND_ORDER if b in found] + sorted(found - set(BACKEND_ORDER))

    @property
    def data_sources(self) -> set[str]:
        return {m.data for m in self.measurements}


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
    details = machine.get("gradgap", {})
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
        scale = float(info.get("scale", 1.0)) if info.get("estimate") else 1.0
        return Measurement(
            suite=str(info["suite"]),
            backend=str(info["backend"]),
            method=str(info["method"]),
            net=str(info.get("net", "")),
            n_params=int(info["n_params"]),
            batch=int(info["batch"]),
            dtype=str(info.get("dtype", "float64")),
            data=str(info.get("data", "unknown")),
            seconds=measured * scale,
            measured_s=measured,
            rounds=int(stats.get("rounds", 1)),
            estimate=bool(info.get("estimate", False)),
            scaled_from=int(info["scaled_from"]) if info.get("estimate") else None,
            sweep=info.get("sweep"),
            x=int(info["x"]) if info.get("x") is not None else None,
            name=name,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ReportError(f"{path}: benchmark {name!r} lacks a usable field ({type(err).__name__}: {err})") from err


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Read every file and give each run a label (its machine; with the date where two share one)."""
    if not paths:
        raise ReportError("no results files given")
    runs = [load_run(p) for p in paths]
    for run in runs:
        details = run.machine.get("gradgap", {})
        gpu = details.get("gpu", {}).get("name") if isinstance(details.get("gpu"), dict) else None
        run.label = str(details.get("node") or run.machine.get("node") or run.path.stem) + (f" ({gpu})" if gpu else "")
    for tiebreak in (lambda run, i: f"{run.label} {run.when[:16]}", lambda run, i: f"{run.label} #{i + 1}"):
        labels = [run.label for run in runs]
        for i, run in enumerate(runs):
            if labels.count(run.label) > 1:
                run.label = tiebreak(run, i)
    return runs


# --------------------------------------------------------------------------------- numbers


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds >= 1:
        return f"{seconds:,.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 100:
        return f"{value:,.0f}×"
    return f"{value:.3g}×"


def fmt_rate(value: float | None) -> str:
    if value is None:
        return "n/a"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.3g}"


def ratio(numerator: Measurement | None, denominator: Measurement | None) -> float | None:
    if numerator is None or denominator is None or denominator.seconds <= 0:
        return None
    return numerator.seconds / denominator.seconds


def note(m: Measurement | None) -> str:
    if m is None or not m.estimate:
        return ""
    return f"est. from {m.scaled_from:,} of {m.n_params:,} params"


def slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(time) against log(size); None with fewer than two sizes."""
    if len({x for x, _ in points}) < 2:
        return None
    xs = [math.log(x) for x, _ in points]
    ys = [math.log(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def scaling_series(run: Run) -> dict[tuple[str, str, str, str], list[tuple[int, float]]]:
    """{(sweep, backend, method, dtype): [(size, seconds), ...]} sorted by size."""
    series: dict[tuple[str, str, str, str], list[tuple[int, float]]] = {}
    for m in run.measurements:
        if m.suite == "scaling" and m.sweep and m.x:
            series.setdefault((m.sweep, m.backend, m.method, m.dtype), []).append((m.x, m.seconds))
    return {key: sorted(points) for key, points in sorted(series.items())}


# --------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """One benchmark requirement of another issue: a measured ratio and whether it meets its bound."""

    issue: str
    text: str
    measure: Callable[[Run], tuple[float | None, str]]  # (value, what was missing)
    passes: Callable[[float], bool] | None  # None: reported, no bound


def _gap_ratio(num: tuple[str, str], den: tuple[str, str], suite: str = "gap", den_suite: str | None = None):
    def measure(run: Run) -> tuple[float | None, str]:
        top, bottom = run.find(suite, *num), run.find(den_suite or suite, *den)
        missing = [f"{b} {m}" for (b, m), found in ((num, top), (den, bottom)) if found is None]
        value = ratio(top, bottom)
        return value, ("missing: " + ", ".join(missing)) if missing else _estimates(top, bottom)

    return measure


def _estimates(*ms: Measurement | None) -> str:
    return "; ".join(f"{m.backend} {m.method} {note(m)}" for m in ms if m is not None and m.estimate)


def _cupy_issue5(run: Run) -> tuple[float | None, str]:
    f32 = [run.find("kernels", "cupy", method, dtype="float32") for method in ("forward", "backprop")]
    largest = max(
        (m.x for m in run.measurements if (m.suite, m.backend, m.sweep) == ("scaling", "cupy", "batch") and m.x),
        default=None,
    )
    if None in f32 or largest is None:
        return None, "missing: cupy float32 forward/backprop or the cupy batch sweep"
    return float(largest), f"float32 forward {fmt_time(f32[0].seconds)}, backprop {fmt_time(f32[1].seconds)}"


TARGETS = (
    Target(
        "3",
        "NumPy backprop ≤ 0.75 × textbook layered backprop",
        _gap_ratio(("numpy", "backprop"), ("textbook", "backprop"), den_suite="peers"),
        lambda v: v <= 0.75,
    ),
    Target(
        "3",
        "Numba backprop ≤ NumPy backprop",
        _gap_ratio(("numba", "backprop"), ("numpy", "backprop")),
        lambda v: v <= 1.0,
    ),
    Target(
        "4",
        "Numba incremental ≥ 1000× faster than NumPy naive",
        _gap_ratio(("numpy", "naive"), ("numba", "incremental")),
        lambda v: v >= 1000,
    ),
    Target(
        "4",
        "Numba incremental ≤ 25× Numba backprop",
        _gap_ratio(("numba", "incremental"), ("numba", "backprop")),
        lambda v: v <= 25,
    ),
    Target(
        "4",
        "NumPy incremental ≥ 20× faster than NumPy naive",
        _gap_ratio(("numpy", "naive"), ("numpy", "incremental")),
        lambda v: v >= 20,
    ),
    Target(
        "4",
        "NumPy batched ≥ 1.5× faster than NumPy naive",
        _gap_ratio(("numpy", "naive"), ("numpy", "batched")),
        lambda v: v >= 1.5,
    ),
    Target(
        "4",
        "Numba batched ≥ 1.5× faster than Numba naive",
        _gap_ratio(("numba", "naive"), ("numba", "batched")),
        lambda v: v >= 1.5,
    ),
    *(
        Target(
            "4",
            f"MultiLayerNet(784, [100]*4, 10) on {b}: incremental faster than naive by",
            _gap_ratio((b, "naive"), (b, "incremental"), suite="deep"),
            None,
        )
        for b in BACKEND_ORDER
    ),
    Target(
        "5",
        "CuPy: float32 forward/backprop and a batch sweep (largest batch shown)",
        _cupy_issue5,
        lambda v: v >= 10_000,
    ),
)


def evaluate(run: Run) -> list[tuple[Target, float | None, str, str]]:
    """(target, value, status PASS/FAIL/reported/n/a, detail) for every target."""
    rows = []
    for target in TARGETS:
        value, detail = target.measure(run)
        if value is None:
            status = "n/a"
        elif target.passes is None:
            status = "reported"
        else:
            status = "PASS" if target.passes(value) else "FAIL"
        rows.append((target, value, status, detail))
    return rows


# --------------------------------------------------------------------------------- tables


def headline_rows(run: Run) -> list[list[str]]:
    """Seed setting per backend and method: time, × backprop, speed-up over textbook naive, params/s."""
    baseline = run.find("peers", "textbook", "naive")
    rows = []
    for backend in run.backends("gap"):
        backprop = run.find("gap", backend, "backprop")
        for method in GAP_METHODS:
            m = run.find("gap", backend, method)
            if m is None:
                rows.append([backend, method, "not measured", "", "", "", ""])
                continue
            rows.append(
                [
                    backend,
                    method,
                    fmt_time(m.seconds),
                    fmt_ratio(ratio(m, backprop)),
                    fmt_ratio(ratio(baseline, m)),
                    fmt_rate(m.n_params / m.seconds),
                    note(m),
                ]
            )
    return rows


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def headline_table(runs: Sequence[Run]) -> str:
    multi = len(runs) > 1
    header = (["machine"] if multi else []) + [
        "backend",
        "method",
        "time per gradient",
        "× backprop",
        "speed-up vs textbook naive",
        "params/s",
        "note",
    ]
    rows = [([run.label] if multi else []) + row for run in runs for row in headline_rows(run)]
    return md_table(header, rows)


def targets_table(runs: Sequence[Run]) -> str:
    multi = len(runs) > 1
    rows = []
    for run in runs:
        for target, value, status, detail in evaluate(run):
            if status == "n/a" and target.passes is None:
                continue  # a backend this run did not have
            shown = fmt_ratio(value) if target.issue != "5" else (f"{value:,.0f}" if value else "n/a")
            rows.append(([run.label] if multi else []) + [target.issue, target.text, shown, status, detail])
    return md_table((["machine"] if multi else []) + ["issue", "target", "measured", "result", "detail"], rows)


def deep_table(run: Run) -> list[list[str]]:
    rows = []
    for backend in run.backends("deep"):
        backprop = run.find("deep", backend, "backprop")
        for method in ("backprop", "naive", "incremental"):
            m = run.find("deep", backend, method)
            if m is not None:
                rows.append([backend, method, fmt_time(m.seconds), fmt_ratio(ratio(m, backprop)), note(m)])
    return rows


def peers_table(run: Run) -> list[list[str]]:
    rows = []
    numpy_backprop = run.find("gap", "numpy", "backprop")
    for m in sorted((m for m in run.measurements if m.suite == "peers"), key=lambda m: (m.backend, m.method)):
        rows.append([m.backend, m.method, fmt_time(m.seconds), fmt_ratio(ratio(m, numpy_backprop)), note(m)])
    return rows


def kernel_rows(run: Run) -> list[list[str]]:
    by_kernel: dict[tuple[str, str], dict[str, float]] = {}  # in the suite's order
    for m in run.measurements:
        if m.suite == "kernels":
            by_kernel.setdefault((m.method, m.dtype), {})[m.backend] = m.seconds
    backends = run.backends("kernels")
    return [
        [kernel, dtype, *(fmt_time(times.get(b)) for b in backends)] for (kernel, dtype), times in by_kernel.items()
    ]


def slope_rows(run: Run) -> list[list[str]]:
    rows = []
    for (sweep, backend, method, dtype), points in scaling_series(run).items():
        s = slope(points)
        sizes = ", ".join(str(x) for x, _ in points)
        rows.append(
            [
                sweep,
                backend,
                method,
                dtype,
                sizes,
                "n/a" if s is None else f"{s:.2f}",
                fmt_time(points[0][1]),
                fmt_time(points[-1][1]),
            ]
        )
    return rows


# --------------------------------------------------------------------------------- charts


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series_label(run: Run, backend: str, multi: bool) -> str:
    return f"{backend} @ {run.label}" if multi else backend


METHOD_COLORS = {
    "backprop": "#2b8cbe",
    "naive": "#d7301f",
    "batched": "#fdae61",
    "incremental": "#1a9850",
    "forward": "#6a51a3",
    "autograd": "#54278f",
    "gradcheck": "#fc8d59",
}


def chart_gap(runs: Sequence[Run], path: Path) -> bool:
    columns = [(run, b) for run in runs for b in run.backends("gap")]
    if not columns:
        return False
    plt = _pyplot()
    multi = len(runs) > 1
    fig, ax = plt.subplots(figsize=(max(6.5, 2.4 * len(columns)), 5.5))
    width = 0.2
    times = [SEED_NUMERICAL_S, SEED_BACKPROP_S]
    for i, (run, backend) in enumerate(columns):
        backprop = run.find("gap", backend, "backprop")
        for j, method in enumerate(GAP_METHODS):
            m = run.find("gap", backend, method)
            if m is None:
                continue
            times.append(m.seconds)
            xpos = i + (j - 1.5) * width
            ax.bar(
                xpos,
                m.seconds,
                width,
                color=METHOD_COLORS[method],
                hatch="//" if m.estimate else None,
                label=method + (" (estimated)" if m.estimate else ""),
                edgecolor="black",
                linewidth=0.5,
            )
            r = ratio(m, backprop)
            if method != "backprop" and r is not None:
                ax.annotate(
                    fmt_ratio(r),
                    (xpos, m.seconds),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
    for seconds, what, color in ((SEED_NUMERICAL_S, "numerical", "#d7301f"), (SEED_BACKPROP_S, "backprop", "#2b8cbe")):
        ax.axhline(seconds, color=color, linestyle="--", linewidth=1)
        ax.text(
            1.01,
            seconds,
            f"seed:\n{what}\n{seconds:g} s",
            transform=ax.get_yaxis_transform(),
            va="center",
            fontsize=8,
            color=color,
        )
    ax.set_yscale("log")
    ax.set_ylim(min(times) / 3, max(times) * 8)
    ax.set_xticks(range(len(columns)), [_series_label(run, b, multi) for run, b in columns])
    ax.set_xlim(-0.5, len(columns) - 0.5)
    ax.set_ylabel("seconds per gradient (log)")
    ax.set_title(
        f"One gradient: 784-50-10 sigmoid, batch 100, {SEED_N_PARAMS:,} parameters\n"
        "label = time / backprop on the same backend; hatched = estimated from a sample",
        fontsize=9,
    )
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=len(unique), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def chart_speedup(runs: Sequence[Run], path: Path) -> bool:
    multi = len(runs) > 1
    labels, values, colors = [], [], []
    for run in runs:
        baseline = run.find("peers", "textbook", "naive")
        if baseline is None:
            continue
        entries = [("gap", b, m) for b in run.backends("gap") for m in GAP_METHODS]
        entries += [("peers", p.backend, p.method) for p in run.measurements if p.suite == "peers"]
        for suite, backend, method in entries:
            m = run.find(suite, backend, method)
            if m is not None:
                labels.append(f"{_series_label(run, backend, multi)} {method}")
                values.append(baseline.seconds / m.seconds)
                colors.append(METHOD_COLORS.get(method, "grey"))
    if not labels:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(labels) + 1.5))
    ax.barh(range(len(labels)), values, color=colors, edgecolor="black", linewidth=0.5)
    for i, v in enumerate(values):
        ax.annotate(fmt_ratio(v), (v, i), va="center", fontsize=7, xytext=(3, 0), textcoords="offset points")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speed-up over the textbook naive numerical gradient (log)")
    ax.set_title("Speed-up of each method over the textbook naive loop (same machine, same run)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def chart_kernels(runs: Sequence[Run], path: Path) -> bool:
    multi = len(runs) > 1
    kernels = list(dict.fromkeys((m.method, m.dtype) for run in runs for m in run.measurements if m.suite == "kernels"))
    series = [(run, b) for run in runs for b in run.backends("kernels")]
    if not kernels:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(kernels) * max(1, len(series)) + 1.5))
    height = 0.8 / max(1, len(series))
    for s, (run, backend) in enumerate(series):
        times = [run.find("kernels", backend, k, dtype=d) for k, d in kernels]
        ax.barh(
            [i + s * height for i in range(len(kernels))],
            [m.seconds * 1e6 if m else 0 for m in times],
            height,
            label=_series_label(run, backend, multi),
        )
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(kernels))], [f"{k} ({d})" for k, d in kernels], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("µs per call (log)")
    ax.set_title("Kernels of the seed setting (batch 100)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def chart_scaling(runs: Sequence[Run], path: Path) -> bool:
    if not any(scaling_series(run) for run in runs):
        return False
    plt = _pyplot()
    multi = len(runs) > 1
    sweeps = (("batch", "batch size"), ("hidden", "hidden units (784-H-10)"), ("depth", "hidden layers of 100"))
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    styles = ("-", "--", ":", "-.")
    for ax, (sweep, xlabel) in zip(axes, sweeps, strict=True):
        for run in runs:
            backends = run.backends("scaling")
            for (sw, backend, method, dtype), points in scaling_series(run).items():
                if sw != sweep or method == "forward":
                    continue
                s = slope(points)
                ax.plot(
                    [x for x, _ in points],
                    [t for _, t in points],
                    marker="o" if dtype == "float64" else "x",
                    linestyle=styles[backends.index(backend) % len(styles)],
                    color=METHOD_COLORS.get(method, "grey"),
                    label=f"{_series_label(run, backend, multi)} {method} {dtype}"
                    + ("" if s is None else f" (slope {s:.2f})"),
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        sizes = sorted(
            {x for run in runs for (sw, *_), points in scaling_series(run).items() if sw == sweep for x, _ in points}
        )
        if sizes:
            ax.set_xticks(sizes, [str(x) for x in sizes])
            ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds per gradient (log)")
        ax.set_title(f"scaling: {sweep}", fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def chart_throughput(runs: Sequence[Run], path: Path) -> bool:
    multi = len(runs) > 1
    labels, rates, colors = [], [], []
    for run in runs:
        for m in run.measurements:
            if (m.suite == "gap" and m.method != "backprop") or (
                m.suite == "peers" and m.method in ("naive", "gradcheck")
            ):
                labels.append(f"{_series_label(run, m.backend, multi)} {m.method}" + (" (est.)" if m.estimate else ""))
                rates.append(m.n_params / m.seconds)
                colors.append(METHOD_COLORS.get(m.method, "grey"))
    if not labels:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(labels) + 1.5))
    ax.barh(range(len(labels)), rates, color=colors, edgecolor="black", linewidth=0.5)
    for i, v in enumerate(rates):
        ax.annotate(fmt_rate(v), (v, i), va="center", fontsize=7, xytext=(3, 0), textcoords="offset points")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("parameters per second (log)")
    ax.set_title("Numerical-gradient throughput, seed setting", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


CHARTS = (
    ("gap.png", chart_gap),
    ("speedup.png", chart_speedup),
    ("kernels.png", chart_kernels),
    ("scaling.png", chart_scaling),
    ("throughput.png", chart_throughput),
)


# --------------------------------------------------------------------------------- the report


def describe_machine(run: Run) -> str:
    d = run.machine.get("gradgap", {})
    versions = d.get("versions", {})
    blas = (
        ", ".join(
            f"{lib.get('internal_api')} {lib.get('version')} ({lib.get('num_threads')} threads)"
            for lib in d.get("blas", [])
            if lib.get("user_api") == "blas"
        )
        or "unknown"
    )
    parts = [
        f"CPU: {d.get('cpu_model') or run.machine.get('cpu', {}).get('brand_raw', 'unknown')}, "
        f"{d.get('usable_cpus', '?')} usable of {d.get('cpu_count', '?')} logical CPUs",
        f"BLAS: {blas}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
    ]
    if versions.get("numba"):
        parts.append(f"numba threads: {d.get('numba_threads')}")
    gpu = d.get("gpu")
    if isinstance(gpu, dict):
        parts.append(
            "GPU: "
            + (
                gpu["error"]
                if "error" in gpu
                else f"{gpu.get('name')} ({gpu.get('memory_gib')} GiB, driver {gpu.get('driver')}, "
                f"CUDA runtime {gpu.get('cuda_runtime')})"
            )
        )
    else:
        parts.append("GPU: none (cupy not installed)")
    if d.get("env"):
        parts.append("environment: " + ", ".join(f"{k}={v}" for k, v in d["env"].items()))
    return "; ".join(parts)


def describe_data(run: Run) -> str:
    sources = run.data_sources
    if sources == {"mnist"}:
        return "the real MNIST batch (the first training images, pixels / 255, float64)"
    if sources == {"synthetic"}:
        return (
            "synthetic data of MNIST's shape (MNIST files not found: seeded, ~19% non-zero pixels in [0, 1] "
            "inside a central 20x20 box, random labels)"
        )
    return "mixed: " + ", ".join(sorted(sources))


def render(runs: Sequence[Run], charts: Sequence[str], command: str) -> str:
    out = ["# gradgap benchmark report", ""]
    out.append(
        f"Generated {datetime.now():%Y-%m-%d %H:%M} by `{command}` from "
        + ", ".join(f"`{run.path}`" for run in runs)
        + "."
    )
    out += ["", "## Machines and data", ""]
    for run in runs:
        out.append(
            f"- **{run.label}** (run {run.when[:19]}, profile `{run.profile}`): {describe_machine(run)}. "
            f"Data: {describe_data(run)}."
        )
    out += [
        "",
        "## The gap, seed setting",
        "",
        f"One gradient of TwoLayerNet(784, 50, 10) (sigmoid), batch 100, float64, {SEED_N_PARAMS:,} parameters. "
        f"The seed measured {SEED_NUMERICAL_S:g} s numerical and {SEED_BACKPROP_S:g} s backprop "
        f"({SEED_NUMERICAL_S / SEED_BACKPROP_S:,.0f}×). Times: best round; × backprop: time / backprop time on "
        "the same backend; speed-up: the textbook naive loop's time / this time (same run).",
        "",
        headline_table(runs),
        "",
    ]
    if "gap.png" in charts:
        out += ["![gap per backend](gap.png)", ""]
    out += [
        "## Targets from other issues",
        "",
        targets_table(runs),
        "",
        "## What the incremental method skips",
        "",
        "Same central differences as the naive loop, computed without what a perturbation cannot change:",
        "",
    ]
    out += [f"- {item}" for item in INCREMENTAL_SHORTCUTS]
    for run in runs:
        suffix = f" — {run.label}" if len(runs) > 1 else ""
        rows = deep_table(run)
        if rows:
            out += [
                "",
                f"## Deeper net: MultiLayerNet(784, [100]*4, 10), relu, batch 100{suffix}",
                "",
                md_table(["backend", "method", "time per gradient", "× backprop", "note"], rows),
            ]
        rows = peers_table(run)
        if rows:
            out += [
                "",
                f"## Peers{suffix}",
                "",
                "The textbook's layered implementation (bench/textbook.py) and torch, same net and batch.",
                "",
                md_table(["implementation", "method", "time per gradient", "× NumPy backprop", "note"], rows),
            ]
        rows = kernel_rows(run)
        if rows:
            out += ["", f"## Kernels{suffix}", "", md_table(["kernel", "dtype", *run.backends("kernels")], rows)]
        rows = slope_rows(run)
        if rows:
            out += [
                "",
                f"## Scaling{suffix}",
                "",
                "Slope: least-squares exponent of time against size (log-log): 1 = linear.",
                "",
                md_table(["sweep", "backend", "method", "dtype", "sizes", "slope", "smallest", "largest"], rows),
            ]
    for name, title in (
        ("speedup.png", "Speed-up over the textbook naive loop"),
        ("kernels.png", "Kernels"),
        ("scaling.png", "Scaling"),
        ("throughput.png", "Numerical-gradient throughput"),
    ):
        if name in charts:
            out += ["", f"### {title}", "", f"![{title}]({name})"]
    out += [
        "",
        "## Notes",
        "",
        "- Each time is the best (minimum) round of a benchmark; the JSON keeps every statistic.",
        "- GPU timings synchronise the device inside the timed function.",
        "- est.: the naive loop timed on a random sample of parameters (spread over every weight and bias "
        "array) and scaled to all of them; its cost per parameter does not depend on which one is moved.",
        "- Every benchmark checked its result against the NumPy reference before it was timed; in the quick "
        "profile the slowest calls (batched; the deep net's incremental) are timed once and checked right after, "
        "and a result that fails its check is not saved.",
    ]
    others = [(run, *other) for run in runs for other in run.others]
    if others:
        out += [
            "",
            "## Other benchmarks in these results",
            "",
            "Suites this report does not interpret, as pytest-benchmark recorded them (see their extra_info).",
            "",
            md_table(
                (["machine"] if len(runs) > 1 else []) + ["suite", "benchmark", "best round", "note"],
                [
                    ([run.label] if len(runs) > 1 else [])
                    + [suite, name, fmt_time(best), "estimate: see extra_info" if estimate else ""]
                    for run, suite, name, best, estimate in others
                ],
            ),
        ]
    out.append("")
    return "\n".join(out)


def write_report(paths: Sequence[str | Path], out_dir: str | Path, command: str = "python -m bench.report") -> Path:
    """Read the results files, write out_dir/REPORT.md and the charts; returns REPORT.md's path.

    Raises ReportError (naming the file) for a missing, empty or malformed results file.
    """
    return build_report(load_runs(paths), out_dir, command)


def build_report(runs: Sequence[Run], out_dir: str | Path, command: str) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    charts = []
    for name, draw in CHARTS:
        (out_dir / name).unlink(missing_ok=True)  # a chart of an earlier report must not stay behind
        if draw(runs, out_dir / name):
            charts.append(name)
    report = out_dir / "REPORT.md"
    report.write_text(render(runs, charts, command), encoding="utf-8")
    return report


def results_path(results_dir: Path = RESULTS_DIR) -> Path:
    machine = re.sub(r"[^A-Za-z0-9_.-]+", "_", platform.node() or "machine")
    return results_dir / f"{machine}-{datetime.now():%Y%m%d-%H%M%S}.json"


def run_suite(profile: str, json_path: Path) -> int:
    """Run the benchmark suite under pytest (progress on the terminal); returns pytest's exit code."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(BENCH_DIR),
        f"--gap-profile={profile}",
        "--benchmark-only",
        f"--benchmark-json={json_path}",
        "--benchmark-columns=min,median,rounds,iterations",
        "-v",
        "--durations=10",
        "-p",
        "no:cacheprovider",
    ]
    print("running:", " ".join(command), flush=True)
    return subprocess.call(command, cwd=REPO)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--from",
        dest="sources",
        nargs="+",
        metavar="FILE",
        help="merge these saved results files into one report; run nothing",
    )
    parser.add_argument(
        "--profile",
        choices=("quick", "full"),
        default="full",
        help="profile to run (default full; quick takes a few minutes)",
    )
    parser.add_argument("--out", default="report", help="directory for REPORT.md and the charts (default report/)")
    args = parser.parse_args(argv)
    command = "python -m bench.report " + " ".join(argv if argv is not None else sys.argv[1:])
    status = 0
    try:
        if args.sources:
            sources = args.sources
        else:
            json_path = results_path()
            status = run_suite(args.profile, json_path)
            if not json_path.exists():
                raise ReportError(f"pytest exited with code {status} and wrote no results to {json_path}")
            if status != 0:
                print(
                    f"warning: pytest exited with code {status}; the report covers the benchmarks that passed",
                    file=sys.stderr,
                )
                status = 1
            print(f"results saved to {json_path}")
            sources = [json_path]
        runs = load_runs(sources)
        report = build_report(runs, args.out, command.strip())
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print()
    print(headline_table(runs))
    print()
    print(targets_table(runs))
    print(f"\nreport written to {report}")
    return status


if __name__ == "__main__":
    sys.exit(main())
