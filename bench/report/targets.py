"""Targets: the ratios the project promises, each named by what it measures, judged within one run.

A target reads its measurements from one Run and gives a Reading (value, whether it rests on an
estimate, detail). Its bound decides PASS or FAIL; a target without a bound is only reported. A
target whose measurements are missing is "not measured", never PASS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench.report.formatting import fmt_ratio, fmt_time, marked
from bench.report.results import BACKEND_ORDER, Measurement, Run, ratio, scaling_series, series_slope

DEEP_NET = "MultiLayerNet(784, [100]*4, 10) relu"
NOT_MEASURED = "not measured"


@dataclass(frozen=True)
class Reading:
    """What a target measured in one run: value None when its data is missing (detail says which)."""

    value: float | None
    estimate: bool = False
    detail: str = ""


@dataclass(frozen=True)
class Target:
    """One promise: what it measures, its wording, how to read it from a run, and its bound."""

    measures: str
    text: str
    read: Callable[[Run], Reading]
    passes: Callable[[float], bool] | None  # None: reported, no bound
    shown: Callable[[float], str] = fmt_ratio


@dataclass(frozen=True)
class Verdict:
    """A target judged on one run. status: PASS, FAIL, reported or not measured."""

    target: Target
    reading: Reading
    status: str

    @property
    def measured(self) -> str:
        if self.reading.value is None:
            return NOT_MEASURED
        return marked(self.target.shown(self.reading.value), self.reading.estimate)


def _why_missing(run: Run, wanted: list[tuple[str, str, str]]) -> str:
    """'missing: numba series [deep] (numba did not run: not installed: ...)' for the measurements not found."""
    statuses = {s.name: s for s in run.backend_statuses()}
    names = [
        f"{backend} {method}{'' if suite in ('gap', 'peers') else f' [{suite}]'}" for suite, backend, method in wanted
    ]
    reasons = [
        f"{backend} did not run: {statuses[backend].why}"
        for backend in dict.fromkeys(backend for _, backend, _ in wanted)
        if backend in statuses and not statuses[backend].ran
    ]
    return "missing: " + ", ".join(names) + (f" ({'; '.join(reasons)})" if reasons else "")


def _estimates(*ms: Measurement | None) -> str:
    return "; ".join(f"{m.backend} {m.method} est.: {m.estimate_how}" for m in ms if m is not None and m.estimate)


def time_ratio(top: tuple[str, str, str], bottom: tuple[str, str, str]) -> Callable[[Run], Reading]:
    """Reading of top.seconds / bottom.seconds, each (suite, backend, method)."""

    def read(run: Run) -> Reading:
        found = [run.find(*top), run.find(*bottom)]
        missing = [key for key, m in zip((top, bottom), found, strict=True) if m is None]
        if missing:
            return Reading(None, detail=_why_missing(run, missing))
        return Reading(ratio(*found), any(m.estimate for m in found), _estimates(*found))

    return read


def naive_against_textbook(run: Run) -> Reading:
    """The NumPy naive loop's time / the textbook loop's time, on the same parameters in the same run.

    Same parameters: both over every parameter, or both over samples with equal extra_info
    sample_digest. Otherwise each timing is scaled to every parameter and the ratio is an estimate.
    """
    ours, book = run.find("gap", "numpy", "naive"), run.find("peers", "textbook", "naive")
    if ours is None or book is None:
        missing = [k for k, m in ((("gap", "numpy", "naive"), ours), (("peers", "textbook", "naive"), book)) if not m]
        return Reading(None, detail=_why_missing(run, missing))
    if not ours.estimate and not book.estimate:
        return Reading(ratio(ours, book), False, "both loops over every parameter")
    digests = (ours.info.get("sample_digest"), book.info.get("sample_digest"))
    if ours.estimate and book.estimate and digests[0] is not None and digests[0] == digests[1]:
        same = f"both loops on the same {ours.scaled_from:,} parameters"
        return Reading(ours.measured_s / book.measured_s, False, same)
    return Reading(ratio(ours, book), True, "not on the same parameters; each scaled to all: " + _estimates(ours, book))


def depth_slope(backend: str, method: str) -> Callable[[Run], Reading]:
    """The fitted log-log slope of method's time against depth (the depth sweep) on backend."""

    def read(run: Run) -> Reading:
        points = scaling_series(run).get(("depth", backend, method, "float64"), [])
        value = series_slope(points)
        if value is None:
            found = ", ".join(str(m.x) for m in points) or "none"
            return Reading(None, detail=_why_missing(run, [("scaling", backend, method)]) + f" (depths: {found})")
        sizes = ", ".join(str(m.x) for m in points)
        return Reading(value, any(m.estimate for m in points), f"depths {sizes}")

    return read


def cupy_float32_and_largest_batch(run: Run) -> Reading:
    """The largest batch of the CuPy batch sweep, provided float32 forward and backprop were measured."""
    f32 = [run.find("kernels", "cupy", method, dtype="float32") for method in ("forward", "backprop")]
    sweep = [m.x for m in run.of_suite("scaling") if (m.backend, m.sweep) == ("cupy", "batch") and m.x]
    if None in f32 or not sweep:
        missing = [("kernels", "cupy", "float32 forward/backprop"), ("scaling", "cupy", "batch sweep")]
        return Reading(None, detail=_why_missing(run, missing))
    return Reading(
        float(max(sweep)), False, f"float32 forward {fmt_time(f32[0].seconds)}, backprop {fmt_time(f32[1].seconds)}"
    )


def _seed(backend: str, method: str) -> tuple[str, str, str]:
    return ("gap", backend, method)


def _deep(backend: str, method: str) -> tuple[str, str, str]:
    return ("deep", backend, method)


TARGETS: tuple[Target, ...] = (
    Target(
        "backprop speed",
        "NumPy backprop ≤ 0.75 × textbook layered backprop",
        time_ratio(_seed("numpy", "backprop"), ("peers", "textbook", "backprop")),
        lambda v: v <= 0.75,
    ),
    Target(
        "backprop speed",
        "Numba backprop ≤ NumPy backprop",
        time_ratio(_seed("numba", "backprop"), _seed("numpy", "backprop")),
        lambda v: v <= 1.0,
    ),
    Target(
        "naive baseline",
        "NumPy naive loop no slower than the textbook's own loop (same parameters, same run)",
        naive_against_textbook,
        lambda v: v <= 1.0,
    ),
    Target(
        "incremental speed-up",
        "Numba incremental ≥ 1000× faster than NumPy naive",
        time_ratio(_seed("numpy", "naive"), _seed("numba", "incremental")),
        lambda v: v >= 1000,
    ),
    Target(
        "incremental cost",
        "Numba incremental ≤ 25× Numba backprop",
        time_ratio(_seed("numba", "incremental"), _seed("numba", "backprop")),
        lambda v: v <= 25,
    ),
    Target(
        "incremental speed-up",
        "NumPy incremental ≥ 20× faster than NumPy naive",
        time_ratio(_seed("numpy", "naive"), _seed("numpy", "incremental")),
        lambda v: v >= 20,
    ),
    Target(
        "batched speed-up",
        "NumPy batched ≥ 1.5× faster than NumPy naive",
        time_ratio(_seed("numpy", "naive"), _seed("numpy", "batched")),
        lambda v: v >= 1.5,
    ),
    Target(
        "batched speed-up",
        "Numba batched ≥ 1.5× faster than Numba naive",
        time_ratio(_seed("numba", "naive"), _seed("numba", "batched")),
        lambda v: v >= 1.5,
    ),
    Target(
        "series cost, seed net",
        "Numba series ≤ 3× Numba backprop",
        time_ratio(_seed("numba", "series"), _seed("numba", "backprop")),
        lambda v: v <= 3,
    ),
    Target(
        "series cost, seed net",
        "NumPy series ≤ 6× NumPy backprop",
        time_ratio(_seed("numpy", "series"), _seed("numpy", "backprop")),
        lambda v: v <= 6,
    ),
    Target(
        "series cost, deep net",
        f"{DEEP_NET}: Numba series ≤ 100× Numba backprop",
        time_ratio(_deep("numba", "series"), _deep("numba", "backprop")),
        lambda v: v <= 100,
    ),
    Target(
        "series cost, deep net",
        f"{DEEP_NET}: NumPy series ≤ 150× NumPy backprop",
        time_ratio(_deep("numpy", "series"), _deep("numpy", "backprop")),
        lambda v: v <= 150,
    ),
    *(
        Target(
            "series depth scaling",
            f"{name}: series time against depth 1..5 (MultiLayerNet(784, [100]*d, 10)), fitted log-log slope ≤ 1.5",
            depth_slope(backend, "series"),
            lambda v: v <= 1.5,
            shown=lambda v: f"{v:.2f}",
        )
        for backend, name in (("numpy", "NumPy"), ("numba", "Numba"))
    ),
    *(
        Target(
            "deep net speed-up",
            f"{DEEP_NET} on {backend}: {method} faster than naive by",
            time_ratio(_deep(backend, "naive"), _deep(backend, method)),
            None,
        )
        for backend in BACKEND_ORDER
        for method in ("incremental", "series")
    ),
    Target(
        "GPU coverage",
        "CuPy: float32 forward/backprop and a batch sweep (largest batch shown)",
        cupy_float32_and_largest_batch,
        lambda v: v >= 10_000,
        shown=lambda v: f"{v:,.0f}",
    ),
)


def evaluate(run: Run, targets: tuple[Target, ...] = TARGETS) -> list[Verdict]:
    """Every target judged on run: PASS/FAIL against its bound, reported without one, else not measured."""
    verdicts = []
    for target in targets:
        reading = target.read(run)
        if reading.value is None:
            status = NOT_MEASURED
        elif target.passes is None:
            status = "reported"
        else:
            status = "PASS" if target.passes(reading.value) else "FAIL"
        verdicts.append(Verdict(target, reading, status))
    return verdicts
