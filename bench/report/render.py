"""Render: the runs as REPORT.md (markdown tables, chart links) and the headline table for the terminal.

Every figure that was estimated is marked "(est.)" where it appears, with how it was made in the
row's note (or the table's caption); a measurement that is absent reads "not measured".
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from bench.common import SEED_BACKPROP_S, SEED_N_PARAMS, SEED_NUMERICAL_S
from bench.report.charts import CHARTS, GAP_METHODS, matplotlib_missing
from bench.report.formatting import EST, estimate_ways, fmt_rate, fmt_ratio, fmt_time, marked, note, timed
from bench.report.results import REPO_README, Measurement, Run, ratio, scaling_series, series_slope
from bench.report.targets import evaluate
from nets.markdown import markdown_table

DEEP_METHODS = GAP_METHODS
DATA_ORIGINS = {  # extra_info["data_origin"] -> words
    "GRADGAP_DATA_DIR": "read from $GRADGAP_DATA_DIR",
    "cache": "read from load_mnist's cache",
    "shared": "read from the checkout's ../shared/data/mnist",
    "downloaded": "downloaded by load_mnist for this run",
}
DEEP_TITLE = "MultiLayerNet(784, [100]*4, 10), relu, batch 100"


def _machine_column(runs: Sequence[Run], run: Run) -> list[str]:
    return [run.label] if len(runs) > 1 else []


def _ratio_cell(top: Measurement | None, bottom: Measurement | None) -> str:
    value = ratio(top, bottom)
    estimated = any(m is not None and m.estimate for m in (top, bottom))
    return marked(fmt_ratio(value), estimated and value is not None)


# --------------------------------------------------------------------------------- tables


def headline_rows(run: Run) -> list[list[str]]:
    """Seed setting per backend and method: time, × backprop, speed-up over textbook naive, params/s, note."""
    baseline = run.find("peers", "textbook", "naive")
    rows = []
    for backend in run.backends("gap"):
        backprop = run.find("gap", backend, "backprop")
        for method in GAP_METHODS:
            m = run.find("gap", backend, method)
            if m is None:
                rows.append([backend, method, "not measured", "", "", "", ""])
                continue
            rate = marked(fmt_rate(m.n_params / m.seconds), m.estimate)
            rows.append([backend, method, timed(m), _ratio_cell(m, backprop), _ratio_cell(baseline, m), rate, note(m)])
    return rows


def headline_table(runs: Sequence[Run]) -> str:
    """The seed setting's gap on every backend of every run, as a markdown table."""
    header = ["backend", "method", "time per gradient", "× backprop", "speed-up vs textbook naive", "params/s", "note"]
    rows = [_machine_column(runs, run) + row for run in runs for row in headline_rows(run)]
    return markdown_table((["machine"] if len(runs) > 1 else []) + header, rows)


def targets_table(runs: Sequence[Run]) -> str:
    """Every target on every run: what it measures, the measured value, PASS/FAIL/reported/not measured."""
    rows = [
        _machine_column(runs, run) + [v.target.measures, v.target.text, v.measured, v.status, v.reading.detail]
        for run in runs
        for v in evaluate(run)
    ]
    header = ["measures", "target", "measured", "result", "detail"]
    return markdown_table((["machine"] if len(runs) > 1 else []) + header, rows)


def deep_rows(run: Run) -> list[list[str]]:
    rows = []
    for backend in run.backends("deep"):
        backprop = run.find("deep", backend, "backprop")
        for method in DEEP_METHODS:
            m = run.find("deep", backend, method)
            rows.append([backend, method, timed(m), _ratio_cell(m, backprop) if m else "", note(m)])
    return rows


def peers_rows(run: Run) -> list[list[str]]:
    numpy_backprop = run.find("gap", "numpy", "backprop")
    return [
        [m.backend, m.method, timed(m), _ratio_cell(m, numpy_backprop), note(m)]
        for m in sorted(run.of_suite("peers"), key=lambda m: (m.backend, m.method))
    ]


def kernel_rows(run: Run) -> list[list[str]]:
    by_kernel: dict[tuple[str, str], dict[str, Measurement]] = {}  # in the suite's order
    for m in run.of_suite("kernels"):
        by_kernel.setdefault((m.method, m.dtype), {})[m.backend] = m
    backends = run.backends("kernels")
    return [[kernel, dtype, *(timed(found.get(b)) for b in backends)] for (kernel, dtype), found in by_kernel.items()]


def slope_rows(run: Run) -> list[list[str]]:
    """One row per sweep/backend/method/dtype: sizes, fitted slope, smallest and largest time, note."""
    rows = []
    for (sweep, backend, method, dtype), points in scaling_series(run).items():
        s = series_slope(points)
        any_estimate = any(m.estimate for m in points)
        estimated = [m for m in points if m.estimate]
        how = ""
        if estimated:
            which = "every size" if len(estimated) == len(points) else ", ".join(str(m.x) for m in estimated)
            how = f"{EST} at {which}: " + "; ".join(estimate_ways(points))
        rows.append(
            [
                sweep,
                backend,
                method,
                dtype,
                ", ".join(str(m.x) for m in points),
                marked("n/a" if s is None else f"{s:.2f}", any_estimate and s is not None),
                timed(points[0]),
                timed(points[-1]),
                how,
            ]
        )
    return rows


def device_of(backend: str) -> str:
    """Where a backend computes: "GPU" for cupy, else "CPU" (numpy, numba, the textbook, torch on the CPU)."""
    return "GPU" if backend == "cupy" else "CPU"


def dgemm_measurements(run: Run) -> list[Measurement]:
    """The run's dgemm benchmarks (extra_info["dgemm"], or suite or method "dgemm") that carry their flops."""
    return [m for m in run.measurements if m.flops and ("dgemm" in m.info or "dgemm" in (m.suite, m.method))]


def roofline_rows(run: Run) -> list[list[str]]:
    """Each gradient with a FLOP count: FLOPs, time, achieved GFLOP/s, share of the same device's dgemm rate,
    and how the FLOPs were counted; then the dgemm rows."""
    dgemms = dgemm_measurements(run)
    peaks = {device_of(m.backend): m.flops / m.seconds for m in dgemms}
    rows = []
    for suite, title in (("gap", "seed net"), ("deep", "deep net")):
        for m in run.of_suite(suite):
            if m.flops is None:
                continue
            rate, peak = m.flops / m.seconds, peaks.get(device_of(m.backend))
            share = marked(f"{rate / peak:.1%}", m.estimate) if peak else f"no {device_of(m.backend)} dgemm in this run"
            gflops = marked(f"{rate / 1e9:.3g}", m.estimate)
            how = str(m.info.get("flops_how") or "")
            rows.append([title, m.backend, m.method, fmt_rate(m.flops), timed(m), gflops, share, how])
    for m in dgemms:
        rate = f"{m.flops / m.seconds / 1e9:.3g}"
        how = str(m.info.get("flops_how") or "2 n³")
        rows.append(["dgemm", m.backend, _dgemm_shape(m), fmt_rate(m.flops), timed(m), rate, "100%", how])
    return rows


def _dgemm_shape(m: Measurement) -> str:
    """'(1000, 1000) @ (1000, 1000) float64, 2 BLAS threads' from extra_info["dgemm"]."""
    spec = m.info.get("dgemm") if isinstance(m.info.get("dgemm"), dict) else {}
    if not spec.get("n"):
        return "matmul"
    n = spec["n"]
    threads = f", {spec['blas_threads']} BLAS threads" if spec.get("blas_threads") else ""
    return f"({n}, {n}) @ ({n}, {n}) {spec.get('dtype', 'float64')}{threads}"


def distributed_rows(run: Run) -> list[list[str]]:
    rows = []
    for m in run.of_suite("distributed"):
        workers = m.info.get("n_workers", "?")
        rows.append(
            [
                m.net,
                m.method,
                str(workers),
                fmt_time(m.measured_s),
                timed(m),
                marked(fmt_rate(m.n_params / m.seconds), m.estimate),
                note(m) or "measured: the whole gradient",
            ]
        )
    return rows


# --------------------------------------------------------------------------------- prose


def describe_machine(run: Run) -> str:
    d = run.details
    versions = d.get("versions", {}) if isinstance(d.get("versions"), dict) else {}
    blas = (
        ", ".join(
            f"{lib.get('internal_api')} {lib.get('version')} ({lib.get('num_threads')} threads)"
            for lib in d.get("blas", [])
            if isinstance(lib, dict) and lib.get("user_api") == "blas"
        )
        or "unknown"
    )
    parts = [
        f"CPU: {d.get('cpu_model') or run.machine.get('cpu', {}).get('brand_raw', 'unknown')}, "
        f"{d.get('usable_cpus', '?')} usable of {d.get('cpu_count', '?')} logical CPUs",
        f"BLAS: {blas}",
        "versions: " + (", ".join(f"{k} {v}" for k, v in versions.items() if v) or "unknown"),
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


def describe_backends(run: Run) -> str:
    """'ran: numpy, numba; did not run: cupy (not installed: pip install ...)'."""
    statuses = run.backend_statuses()
    ran = [f"{s.name} ({s.why})" if s.why else s.name for s in statuses if s.ran]
    absent = [f"{s.name} ({s.why})" for s in statuses if not s.ran]
    text = "ran: " + (", ".join(ran) if ran else "none")
    return text + ("; did not run: " + "; ".join(absent) if absent else "")


def describe_data(run: Run) -> str:
    """Where the benchmark batch came from: the real MNIST batch (and where from), or synthetic data and why."""
    record = run.details.get("data")
    record = record if isinstance(record, dict) else {}
    sources = run.data_sources or {str(record.get("data", "unknown"))}
    reason = record.get("data_fallback_reason") or _recorded(run, "data_fallback_reason")
    origin = record.get("data_origin") or _recorded(run, "data_origin")
    path = record.get("data_path") or _recorded(run, "data_path")
    if sources == {"mnist"}:
        where = f", {DATA_ORIGINS.get(origin, origin)}" if origin else ""
        return (
            "the real MNIST batch (the first training images, pixels / 255, float64)"
            + where
            + (f" ({path})" if path else "")
        )
    if sources == {"synthetic"}:
        why = f"because {reason}" if reason else "the file does not record why (written before the suite did)"
        return f"synthetic data of MNIST's shape and sparsity, not real MNIST: the MNIST files could not be used, {why}"
    return "mixed: " + ", ".join(sorted(sources)) + (f" (synthetic because {reason})" if reason else "")


def _recorded(run: Run, key: str) -> str | None:
    return next((str(m.info[key]) for m in run.measurements if m.info.get(key)), None)


def _methods_link(out_dir: Path) -> str:
    """The README's path as REPORT.md in out_dir links to it: relative inside the checkout, else absolute."""
    out_dir = out_dir.resolve()
    if out_dir.is_relative_to(REPO_README.parent):
        return Path(os.path.relpath(REPO_README, out_dir)).as_posix()
    return REPO_README.as_posix()


# --------------------------------------------------------------------------------- the report


def render(runs: Sequence[Run], charts: Sequence[str], command: str, out_dir: Path) -> str:
    """REPORT.md's text for the runs; charts: the chart files written next to it (names)."""
    out = ["# gradgap benchmark report", ""]
    sources = ", ".join(f"`{run.path}`" for run in runs)
    out += [f"Generated {datetime.now():%Y-%m-%d %H:%M} by `{command}` from {sources}.", ""]
    out += ["## Machines, backends and data", ""]
    for run in runs:
        out += [
            f"- **{run.label}** (run {run.when[:19]}, profile `{run.profile}`): {describe_machine(run)}.",
            f"  - Backends: {describe_backends(run)}.",
            f"  - Data: {describe_data(run)}.",
        ]
    out += [
        "",
        "## The gap, seed setting",
        "",
        f"One gradient of TwoLayerNet(784, 50, 10) (sigmoid), batch 100, float64, {SEED_N_PARAMS:,} parameters. "
        f"The seed measured {SEED_NUMERICAL_S:g} s numerical and {SEED_BACKPROP_S:g} s backprop "
        f"({SEED_NUMERICAL_S / SEED_BACKPROP_S:,.0f}×). Times: best round; × backprop: time / backprop time on "
        f"the same backend; speed-up: the textbook naive loop's time / this time (same run); ({EST}): estimated, "
        "the note says how.",
        "",
        headline_table(runs) if any(run.of_suite("gap") for run in runs) else "Not measured in these results.",
        "",
    ]
    if "gap.png" in charts:
        out += ["![gap per backend](gap.png)", ""]
    out += [
        "## Targets",
        "",
        f"Judged within one run. `not measured`: the run lacks the data (the detail says which); ({EST}): the "
        "value rests on an estimate.",
        "",
        targets_table(runs),
        "",
        "## What each method computes",
        "",
        f"Every method returns the same central differences as the naive loop; what each one skips, and why "
        f"that changes no number, is written once, in [the README]({_methods_link(out_dir)}#the-gap).",
    ]
    for run in runs:
        out += _run_sections(runs, run)
    for name, title, _ in CHARTS[1:]:
        if name in charts:
            out += ["", f"### {title}", "", f"![{title}]({name})"]
    if matplotlib_missing():
        out += ["", f"({matplotlib_missing()}.)"]
    out += [
        "",
        "## Notes",
        "",
        "- Each time is the best (minimum) round of a benchmark; the JSON keeps every statistic.",
        "- GPU timings synchronise the device inside the timed function.",
        f"- ({EST}) marks every figure that was not timed in full: the suite timed part of the work (a sample of "
        "parameters, a share of the tasks) and scaled it; each row's note says how. Ratios and rates computed "
        "from an estimate are marked too.",
        "- Every benchmark checked its result against the NumPy reference; a result that fails its check is not saved.",
    ]
    others = [(run, *other) for run in runs for other in run.others]
    if others:
        out += [
            "",
            "## Other benchmarks in these results",
            "",
            "Suites this report does not interpret, as pytest-benchmark recorded them (see their extra_info).",
            "",
            markdown_table(
                (["machine"] if len(runs) > 1 else []) + ["suite", "benchmark", "best round", "note"],
                [
                    _machine_column(runs, run)
                    + [suite, name, marked(fmt_time(best), estimate), f"{EST}: see extra_info" if estimate else ""]
                    for run, suite, name, best, estimate in others
                ],
            ),
        ]
    out.append("")
    return "\n".join(out)


def _run_sections(runs: Sequence[Run], run: Run) -> list[str]:
    """The per-run sections: deep net, roofline, peers, kernels, scaling, distributed."""
    suffix = f" — {run.label}" if len(runs) > 1 else ""
    out: list[str] = []
    rows = deep_rows(run)
    if rows:
        out += ["", f"## Deeper net: {DEEP_TITLE}{suffix}", ""]
        out.append(markdown_table(["backend", "method", "time per gradient", "× backprop", "note"], rows))
    rows = roofline_rows(run)
    if rows:
        out += [
            "",
            f"## Roofline{suffix}",
            "",
            "FLOPs per gradient: counted analytically from the layer sizes, the batch and the data's non-zeros "
            "(what each method computes, not what a profiler saw): bench.common.flops_per_call, whose docstring "
            "gives each method's formula; the last column names the call. Achieved GFLOP/s = FLOPs / time; "
            "share of dgemm: that rate against the dgemm rate of the same device (CPU or GPU), measured in the "
            "same run.",
            "",
            markdown_table(
                ["net", "backend", "method", "FLOPs per gradient", "time", "GFLOP/s", "share of dgemm", "counted"],
                rows,
            ),
        ]
    rows = peers_rows(run)
    if rows:
        out += [
            "",
            f"## Peers{suffix}",
            "",
            "The textbook's layered implementation (bench/textbook.py) and torch, same net and batch.",
            "",
            markdown_table(["implementation", "method", "time per gradient", "× NumPy backprop", "note"], rows),
        ]
    rows = kernel_rows(run)
    if rows:
        out += ["", f"## Kernels{suffix}", "", markdown_table(["kernel", "dtype", *run.backends("kernels")], rows)]
    rows = slope_rows(run)
    if rows:
        out += [
            "",
            f"## Scaling{suffix}",
            "",
            "Slope: least-squares exponent of time against size (log-log): 1 = linear.",
            "",
            markdown_table(
                ["sweep", "backend", "method", "dtype", "sizes", "slope", "smallest", "largest", "note"], rows
            ),
        ]
    rows = distributed_rows(run)
    if rows:
        out += [
            "",
            f"## Distributed{suffix}",
            "",
            "The numerical gradient sharded over local Dask workers (nets.distributed); timed: the best round of "
            "what the benchmark ran; per gradient: the whole gradient, measured or estimated as the note says.",
            "",
            markdown_table(
                ["net", "method", "workers", "timed", "per gradient", "params/s", "note"],
                rows,
            ),
        ]
    return out


def build_report(runs: Sequence[Run], out_dir: str | Path, command: str) -> Path:
    """Write out_dir/REPORT.md and its charts for the runs; returns REPORT.md's path."""
    from bench.report.charts import draw_charts

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    charts = draw_charts(runs, out_dir)
    report = out_dir / "REPORT.md"
    report.write_text(render(runs, charts, command, out_dir), encoding="utf-8")
    return report
