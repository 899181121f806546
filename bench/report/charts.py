"""Charts: the five PNGs of the report, drawn on one scaffold.

Each chart function takes the runs and returns a matplotlib Figure (None when the runs hold nothing
to draw); draw_charts saves them. Estimated bars are hatched and labelled "est.", estimated points
are hollow and labelled "est.", and every chart that shows one has a legend entry saying how the
estimates were made. matplotlib is imported only here, and only when a chart is drawn.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import SEED_BACKPROP_S, SEED_N_PARAMS, SEED_NUMERICAL_S
from bench.report.formatting import EST, estimate_ways, fmt_rate, fmt_ratio, marked
from bench.report.results import Measurement, Run, ratio, scaling_series, series_slope

GAP_METHODS = ("backprop", "naive", "batched", "incremental", "series")
METHOD_COLORS = {
    "backprop": "#2b8cbe",
    "naive": "#d7301f",
    "batched": "#fdae61",
    "incremental": "#1a9850",
    "series": "#762a83",
    "forward": "#6a51a3",
    "autograd": "#54278f",
    "gradcheck": "#fc8d59",
}
ESTIMATE_HATCH = "//"
DPI = 120

Figure = Any  # matplotlib.figure.Figure (imported lazily)


@dataclass(frozen=True)
class Bar:
    """One bar: its label, value, colour, whether it rests on an estimate, and the text beside it."""

    label: str
    value: float
    color: str
    estimated: bool = False
    text: str = ""


# --------------------------------------------------------------------------------- scaffold


def new_figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list]:
    """A figure (no pyplot state) and its list of ncols axes."""
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def estimate_legend(estimates: Sequence[str], marker: bool = False) -> list:
    """Legend handles that say how the estimates were made: one per distinct way."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = []
    for how in dict.fromkeys(estimates):
        label = f"{EST}: {how}"
        if marker:
            handles.append(Line2D([], [], marker="o", markerfacecolor="none", color="black", linestyle="", label=label))
        else:
            handles.append(Patch(facecolor="white", edgecolor="black", hatch=ESTIMATE_HATCH, label=label))
    return handles


def _wrap(text: str, width: int = 70) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def horizontal_bars(ax: Any, bars: Sequence[Bar], xlabel: str, title: str) -> None:
    """Bars top to bottom on a log axis; estimated ones hatched, their label and value text marked "(est.)"."""
    positions = list(range(len(bars)))
    ax.barh(
        positions,
        [b.value for b in bars],
        color=[b.color for b in bars],
        hatch=[ESTIMATE_HATCH if b.estimated else None for b in bars],
        edgecolor="black",
        linewidth=0.5,
    )
    for i, bar in zip(positions, bars, strict=True):
        text = marked(bar.text, bar.estimated)
        ax.annotate(text, (bar.value, i), va="center", fontsize=7, xytext=(3, 0), textcoords="offset points")
    ax.set_yticks(positions, [marked(b.label, b.estimated) for b in bars], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)


def horizontal_bar_chart(
    bars: Sequence[Bar], xlabel: str, title: str, estimates: Sequence[Measurement]
) -> Figure | None:
    """A chart of horizontal bars, with a legend below saying how each estimate among `estimates` was made."""
    if not bars:
        return None
    fig, (ax,) = new_figure(9, 0.35 * len(bars) + 2.0 + 0.45 * len(estimates))
    horizontal_bars(ax, bars, xlabel, title)
    add_estimate_legend(fig, estimates)
    return fig


def add_estimate_legend(fig: Figure, estimates: Sequence[Measurement], handles: Sequence = ()) -> None:
    """A legend under the plot: the given handles, then one entry per estimated measurement saying how."""
    ways = [_wrap(f"{m.backend} {m.method}: {m.estimate_how}", 110) for m in dict.fromkeys(estimates)]
    entries = list(handles) + estimate_legend(ways)
    if entries:
        fig.legend(handles=entries, loc="outside lower center", fontsize=7, ncols=1 if ways else len(entries))


def series_label(run: Run, backend: str, multi: bool) -> str:
    return f"{backend} @ {run.label}" if multi else backend


# --------------------------------------------------------------------------------- the charts


def chart_gap(runs: Sequence[Run]) -> Figure | None:
    """Seed setting: one bar per method and backend (log seconds), the seed's two times as lines."""
    columns = [(run, b) for run in runs for b in run.backends("gap")]
    if not columns:
        return None
    fig, (ax,) = new_figure(max(8.0, 2.6 * len(columns)), 7.0)
    multi = len(runs) > 1
    width = 0.8 / len(GAP_METHODS)
    times, estimated = [SEED_NUMERICAL_S, SEED_BACKPROP_S], []
    for i, (run, backend) in enumerate(columns):
        backprop = run.find("gap", backend, "backprop")
        for j, method in enumerate(GAP_METHODS):
            m = run.find("gap", backend, method)
            if m is None:
                continue
            times.append(m.seconds)
            xpos = i + (j - (len(GAP_METHODS) - 1) / 2) * width
            ax.bar(
                xpos,
                m.seconds,
                width,
                color=METHOD_COLORS[method],
                hatch=ESTIMATE_HATCH if m.estimate else None,
                label=method,
                edgecolor="black",
                linewidth=0.5,
            )
            r = ratio(m, backprop)
            text = fmt_ratio(r) if method != "backprop" and r is not None else ""
            if m.estimate:
                estimated.append(m)
                text = f"{text}\n{EST}" if text else EST
            if text:
                ax.annotate(
                    text,
                    (xpos, m.seconds),
                    ha="center",
                    va="bottom",
                    fontsize=6,
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
    ax.set_xticks(range(len(columns)), [series_label(run, b, multi) for run, b in columns])
    ax.set_xlim(-0.5, len(columns) - 0.5)
    ax.set_ylabel("seconds per gradient (log)")
    ax.set_title(
        f"One gradient: 784-50-10 sigmoid, batch 100, {SEED_N_PARAMS:,} parameters\n"
        "label = time / backprop on the same backend",
        fontsize=9,
    )
    handles, labels = ax.get_legend_handles_labels()
    add_estimate_legend(fig, estimated, list(dict(zip(labels, handles, strict=True)).values()))
    return fig


def chart_speedup(runs: Sequence[Run]) -> Figure | None:
    """Every method's speed-up over the textbook naive loop of the same run."""
    multi, bars, estimates = len(runs) > 1, [], []
    for run in runs:
        baseline = run.find("peers", "textbook", "naive")
        if baseline is None:
            continue
        entries = [run.find("gap", b, method) for b in run.backends("gap") for method in GAP_METHODS]
        entries += run.of_suite("peers")
        for m in entries:
            if m is None:
                continue
            estimated = m is not baseline and (m.estimate or baseline.estimate)
            estimates += [p for p in (m, baseline) if estimated and p.estimate]
            speedup = baseline.seconds / m.seconds
            label = f"{series_label(run, m.backend, multi)} {m.method}"
            bars.append(Bar(label, speedup, METHOD_COLORS.get(m.method, "grey"), estimated, fmt_ratio(speedup)))
    return horizontal_bar_chart(
        bars,
        "speed-up over the textbook naive numerical gradient (log)",
        "Speed-up of each method over the textbook naive loop (same machine, same run)",
        estimates,
    )


def chart_kernels(runs: Sequence[Run]) -> Figure | None:
    """Kernels of the seed setting: µs per call, one bar per backend."""
    multi = len(runs) > 1
    kernels = list(dict.fromkeys((m.method, m.dtype) for run in runs for m in run.of_suite("kernels")))
    columns = [(run, b) for run in runs for b in run.backends("kernels")]
    if not kernels:
        return None
    fig, (ax,) = new_figure(9, 0.3 * len(kernels) * max(1, len(columns)) + 1.5)
    height = 0.8 / max(1, len(columns))
    estimated = []
    for s, (run, backend) in enumerate(columns):
        found = [run.find("kernels", backend, k, dtype=d) for k, d in kernels]
        ax.barh(
            [i + s * height for i in range(len(kernels))],
            [m.seconds * 1e6 if m else 0 for m in found],
            height,
            hatch=[ESTIMATE_HATCH if m is not None and m.estimate else None for m in found],
            label=series_label(run, backend, multi),
        )
        estimated += [m for m in found if m is not None and m.estimate]
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(kernels))], [f"{k} ({d})" for k, d in kernels], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("µs per call (log)")
    ax.set_title("Kernels of the seed setting (batch 100)", fontsize=9)
    handles, _ = ax.get_legend_handles_labels()
    add_estimate_legend(fig, estimated, handles)
    return fig


SWEEPS = (("batch", "batch size"), ("hidden", "hidden units (784-H-10)"), ("depth", "hidden layers of 100"))


def chart_scaling(runs: Sequence[Run]) -> Figure | None:
    """Time against batch, hidden width and depth, one line per backend/method/dtype; estimates hollow."""
    if not any(scaling_series(run) for run in runs):
        return None
    fig, axes = new_figure(17, 6, ncols=len(SWEEPS))
    multi = len(runs) > 1
    styles = ("-", "--", ":", "-.")
    for ax, (sweep, xlabel) in zip(axes, SWEEPS, strict=True):
        estimated, sizes = [], set()
        for run in runs:
            backends = run.backends("scaling")
            for (sw, backend, method, dtype), points in scaling_series(run).items():
                if sw != sweep or method == "forward":
                    continue
                s = series_slope(points)
                any_estimate = any(m.estimate for m in points)
                label = f"{series_label(run, backend, multi)} {method} {dtype}" + (
                    "" if s is None else f" (slope {s:.2f})"
                )
                color = METHOD_COLORS.get(method, "grey")
                ax.plot(
                    [m.x for m in points],
                    [m.seconds for m in points],
                    linestyle=styles[backends.index(backend) % len(styles)],
                    color=color,
                    label=marked(label, any_estimate),
                )
                for m in points:
                    sizes.add(m.x)
                    ax.plot(
                        [m.x],
                        [m.seconds],
                        marker="o" if dtype == "float64" else "x",
                        markerfacecolor="none" if m.estimate else color,
                        color=color,
                        linestyle="",
                    )
                    if m.estimate:
                        estimated.append(m)
                        ax.annotate(EST, (m.x, m.seconds), fontsize=5, xytext=(2, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        if sizes:
            ordered = sorted(sizes)
            ax.set_xticks(ordered, [str(x) for x in ordered])
            ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds per gradient (log)")
        ax.set_title(f"scaling: {sweep}", fontsize=9)
        handles, _ = ax.get_legend_handles_labels()
        handles = [h for h in handles if not h.get_label().startswith("_")]
        if handles:
            ways = [_wrap(how, 45) for how in estimate_ways(estimated)]
            ax.legend(handles=handles + estimate_legend(ways, marker=True), fontsize=6)
    return fig


def chart_throughput(runs: Sequence[Run]) -> Figure | None:
    """Parameters per second of every numerical gradient of the seed setting."""
    multi, bars = len(runs) > 1, []
    chosen = [
        m
        for run in runs
        for m in run.measurements
        if (m.suite == "gap" and m.method != "backprop") or (m.suite == "peers" and m.method in ("naive", "gradcheck"))
    ]
    for m in chosen:
        rate = m.n_params / m.seconds
        run = next(run for run in runs if m in run.measurements)
        label = f"{series_label(run, m.backend, multi)} {m.method}"
        bars.append(Bar(label, rate, METHOD_COLORS.get(m.method, "grey"), m.estimate, fmt_rate(rate)))
    return horizontal_bar_chart(
        bars,
        "parameters per second (log)",
        "Numerical-gradient throughput, seed setting",
        [m for m in chosen if m.estimate],
    )


CHARTS: tuple[tuple[str, str, Callable[[Sequence[Run]], Figure | None]], ...] = (
    ("gap.png", "The gap per backend", chart_gap),
    ("speedup.png", "Speed-up over the textbook naive loop", chart_speedup),
    ("kernels.png", "Kernels", chart_kernels),
    ("scaling.png", "Scaling", chart_scaling),
    ("throughput.png", "Numerical-gradient throughput", chart_throughput),
)


def chart_texts(fig: Figure) -> list[str]:
    """Every text drawn on a figure: titles, tick labels, annotations, legend entries."""
    from matplotlib.text import Text

    fig.canvas.draw()
    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


@functools.cache
def matplotlib_missing() -> str | None:
    """None when charts can be drawn, else the one line that says why not."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        return f"charts skipped: matplotlib cannot be imported ({err}): pip install 'gradgap[bench]'"
    return None


def draw_charts(runs: Sequence[Run], out_dir: Path) -> list[str]:
    """Draw every chart the runs have data for into out_dir; returns the file names written.

    A chart of an earlier report that this one does not draw is removed, so none stays behind;
    without matplotlib none is drawn (see matplotlib_missing).
    """
    written = []
    for name, _, draw in CHARTS:
        path = out_dir / name
        path.unlink(missing_ok=True)
        fig = None if matplotlib_missing() else draw(runs)
        if fig is not None:
            fig.savefig(path, dpi=DPI)
            written.append(name)
    return written
