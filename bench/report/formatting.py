"""How numbers read in the report's tables, charts and terminal output; estimates carry EST."""

from __future__ import annotations

from bench.report.results import Measurement

EST = "est."  # the marker of every figure that was estimated rather than measured


def fmt_time(seconds: float | None) -> str:
    """1.5 -> '1.50 s', 0.0012 -> '1.2 ms', 3e-6 -> '3 µs'; None -> 'n/a'."""
    if seconds is None:
        return "n/a"
    if seconds >= 1:
        return f"{seconds:,.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def fmt_ratio(value: float | None) -> str:
    """8.114 -> '8.11×', 7150.2 -> '7,150×'; None -> 'n/a'."""
    if value is None:
        return "n/a"
    if value >= 100:
        return f"{value:,.0f}×"
    return f"{value:.3g}×"


def fmt_rate(value: float | None) -> str:
    """A count per second with an SI prefix: 1.11e8 -> '111 M'."""
    if value is None:
        return "n/a"
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.3g}"


def marked(text: str, estimate: bool) -> str:
    """text, followed by '(est.)' when the figure it shows was estimated."""
    return f"{text} ({EST})" if estimate else text


def timed(m: Measurement | None) -> str:
    """A measurement's time per call, marked when estimated; 'not measured' when absent."""
    if m is None:
        return "not measured"
    return marked(fmt_time(m.seconds), m.estimate)


def note(m: Measurement | None) -> str:
    """'est.: <how>' for an estimate, '' for a measured figure."""
    if m is None or not m.estimate:
        return ""
    return f"{EST}: {m.estimate_how}"


def estimate_ways(measurements: list[Measurement], most: int = 2) -> list[str]:
    """How a set of estimates was made, in at most `most` lines (a sweep repeats one way per size).

    Estimates that differ only in their sample and parameter counts read as one line giving the
    range of sample sizes.
    """
    estimated = [m for m in measurements if m.estimate]
    ways = list(dict.fromkeys(m.estimate_how or "" for m in estimated))
    if len(ways) <= most:
        return ways
    samples = sorted({m.scaled_from for m in estimated if m.scaled_from is not None})
    if samples and all(m.scaled_from is not None for m in estimated):
        counts = f"{samples[0]:,}" if len(samples) == 1 else f"{samples[0]:,} to {samples[-1]:,}"
        return [f"timed on {counts} sampled parameters at each size and scaled to all of that size's parameters"]
    return ways[: most - 1] + [f"and {len(ways) - most + 1} more ways (see the notes)"]
