"""Numerical gradients: the textbook function, and gradient_check, a report on backprop vs the numerical gradient.

The net's own numerical gradient (net.numerical_gradient: naive, batched, incremental, series)
lives with the net in nets/networks.py; this module knows the net only through its public methods.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from nets import _validate as validate

if TYPE_CHECKING:
    from nets.networks import _FeedForwardNet

Array = Any
_PROGRESS_EVERY = 256


def numerical_gradient(
    f: Callable[[Array], Any],
    x: Array,
    h: float = 1e-4,
    *,
    progress: Callable[[int], None] | None = None,
    entries: Iterable[tuple[int, ...]] | None = None,
) -> Array:
    """Central differences of the scalar function f at x, textbook semantics.

    Each element of x (numpy or cupy array, any shape) is moved to x + h and x - h in place,
    f(x) is called with the perturbed array, and the element is put back, also when f raises
    or is interrupted. Returns float64 (f(x + h) - f(x - h)) / 2h, shaped like x.
    ``entries``: only these elements (index tuples, one int per axis of x) are differenced, in
    that order; the rest of the result is 0. None: every element.
    ``progress``, if given, is called with the number of elements finished, every 256 elements.
    """
    step = validate.check_step(h)
    if not hasattr(x, "dtype") or x.dtype.name not in validate.FLOAT_DTYPES:
        raise TypeError(
            f"x must be a floating-point array; got {type(x).__name__} with dtype {getattr(x, 'dtype', None)}"
        )
    grad = x.astype("float64", copy=True)  # an array of x's own library (host or device), named nowhere here
    grad[...] = 0
    indices = np.ndindex(*x.shape) if entries is None else _checked_entries(entries, x.shape)
    total = x.size if entries is None else len(indices)
    for count, idx in enumerate(indices, start=1):
        original = x[idx].copy()
        try:
            x[idx] = original + step
            loss_plus = float(f(x))
            x[idx] = original - step
            loss_minus = float(f(x))
        finally:
            x[idx] = original
        grad[idx] = (loss_plus - loss_minus) / (2 * step)
        if progress is not None and (count % _PROGRESS_EVERY == 0 or count == total):
            progress(count % _PROGRESS_EVERY or _PROGRESS_EVERY)
    return grad


def _checked_entries(entries: Iterable[tuple[int, ...]], shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The entries as int tuples; ValueError for one that is not an index of an array of this shape."""
    checked = []
    for entry in entries:
        idx = tuple(int(i) for i in (entry if isinstance(entry, tuple | list) else (entry,)))
        if len(idx) != len(shape) or not all(0 <= i < n for i, n in zip(idx, shape, strict=True)):
            raise ValueError(f"entry {entry!r} is not an index of an array of shape {shape}")
        checked.append(idx)
    return checked


# ----------------------------------------------------------------------------- the gradient check

VERDICTS = ("agrees", "kink", "mismatch")
# An entry is a mismatch when |backprop - numerical| > SAFETY * bound. The bound estimates the
# finite difference's own error (below); SAFETY covers what that estimate leaves out (the O(h^4)
# terms of the truncation, rounding beyond ROUNDING_ULPS units, backprop's own float64 rounding).
# Measured on MNIST nets (784-50-10 relu/sigmoid/tanh, batches 3-30): |backprop - numerical| stays
# below 1.0 * bound, so a correct backprop sits 10x inside the threshold; a wrong one is caught
# wherever its error exceeds 10x the finite difference's own error.
SAFETY = 10.0
# Each loss evaluation is taken to be rounded within ROUNDING_ULPS * eps * (|loss| + mean max |score|).
ROUNDING_ULPS = 4.0
_EPS = float(np.finfo(np.float64).eps)
_KINK_METHODS = ("naive", "incremental", "series")  # the methods that report kinks themselves


@dataclass(frozen=True)
class Entry:
    """One checked entry: index into the parameter, both gradients, |difference|, bound and verdict.

    kink: (sample, layer m (1-based), unit) of a relu/leaky_relu pre-activation that the entry's
    +h or -h move (kink_step "h") or its 2h move (kink_step "2h") carried across ``z > 0``.
    """

    param: str
    index: tuple[int, ...]
    backprop: float
    numerical: float
    error: float
    bound: float
    verdict: str
    kink: tuple[int, int, int] | None = None
    kink_step: str | None = None

    @property
    def label(self) -> str:
        return f"{self.param}[{', '.join(map(str, self.index))}]"

    def to_dict(self) -> dict[str, Any]:
        out = {
            "param": self.param,
            "index": list(self.index),
            "backprop": self.backprop,
            "numerical": self.numerical,
            "error": self.error,
            "bound": self.bound,
            "verdict": self.verdict,
        }
        if self.kink is not None:
            out["kink"] = dict(zip(("sample", "layer", "unit"), self.kink, strict=True)) | {"step": self.kink_step}
        return out


@dataclass(frozen=True)
class ParamCheck:
    """The check of one parameter array. Every array is float64 on the host, shaped like the parameter.

    numerical: the central difference at h; numerical_2h: at 2h (for the truncation estimate);
    bound: the finite difference's own error bound per entry; verdict: "agrees" / "kink" /
    "mismatch" per entry (a str array); kinks, kinks_2h: int64 (n, 4) rows (flat index, sample,
    layer, unit) of the entries whose h (2h) moves cross a kink, or None where not reported.
    """

    name: str
    backprop: np.ndarray
    numerical: np.ndarray
    numerical_2h: np.ndarray
    bound: np.ndarray
    verdict: np.ndarray
    kinks: np.ndarray | None
    kinks_2h: np.ndarray | None
    worst: tuple[Entry, ...]

    @property
    def error(self) -> np.ndarray:
        """|backprop - numerical| per entry."""
        return np.abs(self.backprop - self.numerical)

    @property
    def relative_error(self) -> np.ndarray:
        """|backprop - numerical| / max(|backprop|, |numerical|) per entry (0 where both are 0)."""
        scale = np.maximum(np.abs(self.backprop), np.abs(self.numerical))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(scale > 0, self.error / np.where(scale > 0, scale, 1.0), 0.0)

    @property
    def max_abs(self) -> float:
        return float(self.error.max(initial=0.0))

    @property
    def mean_abs(self) -> float:
        """Seed 001's figure: mean |backprop - numerical|."""
        return float(self.error.mean()) if self.error.size else 0.0

    @property
    def max_rel(self) -> float:
        return float(self.relative_error.max(initial=0.0))

    @property
    def mean_rel(self) -> float:
        return float(self.relative_error.mean()) if self.error.size else 0.0

    @property
    def counts(self) -> dict[str, int]:
        return {verdict: int((self.verdict == verdict).sum()) for verdict in VERDICTS}

    def indices(self, verdict: str) -> list[tuple[int, ...]]:
        """Index tuples of the entries with this verdict, in C order."""
        return [tuple(int(i) for i in idx) for idx in np.argwhere(self.verdict == verdict)]

    def summary(self) -> dict[str, Any]:
        return {
            "shape": list(self.backprop.shape),
            "max_abs": self.max_abs,
            "mean_abs": self.mean_abs,
            "max_rel": self.max_rel,
            "mean_rel": self.mean_rel,
            "counts": self.counts,
        }


@dataclass(frozen=True)
class Cost:
    """What the check cost, measured in the same call (seconds; the device synchronised before each clock stop).

    forward_passes: full forward passes of the whole check for naive and batched (2 per parameter
    per numerical gradient, plus a base pass per gradient where the naive loop tracks kinks); None for
    incremental and series, which do no full passes. forward_pass_equivalents: the numerical
    gradients' time over one forward pass's. ratio_to_backprop: total_s over one backprop.
    """

    method: str
    backend: str
    n_params: int
    forward_passes: int | None
    forward_pass_equivalents: float
    numerical_s: float
    richardson_s: float
    kinks_s: float
    backprop_s: float
    forward_s: float
    total_s: float
    ratio_to_backprop: float
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__} | {"notes": list(self.notes)}


@dataclass(frozen=True, eq=False)  # compared as a Mapping, by its {name: mean} items
class GradientCheck(Mapping):
    """The report of gradient_check. As a mapping it is seed 001's {param name: mean |backprop - numerical|}.

    params: {name: ParamCheck}; verdict: "mismatch" if any entry is one, else "kink" if any entry
    crossed a kink, else "agrees". worst: the entries most over their bound, mismatches first.
    """

    method: str
    h: float
    safety: float
    dtype: str  # the net's dtype; the check itself runs in float64
    params: dict[str, ParamCheck]
    cost: Cost
    kinks_reported: bool
    notes: tuple[str, ...] = field(default=())

    def __getitem__(self, name: str) -> float:
        return self.params[name].mean_abs

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    @property
    def verdict(self) -> str:
        counts = self.counts
        return "mismatch" if counts["mismatch"] else "kink" if counts["kink"] else "agrees"

    @property
    def counts(self) -> dict[str, int]:
        return {verdict: sum(p.counts[verdict] for p in self.params.values()) for verdict in VERDICTS}

    @property
    def worst(self) -> list[Entry]:
        entries = [e for p in self.params.values() for e in p.worst]
        return sorted(entries, key=_badness)

    def mismatches(self) -> dict[str, list[tuple[int, ...]]]:
        """{name: index tuples} of the mismatching entries (parameters without any left out)."""
        found = {name: p.indices("mismatch") for name, p in self.params.items()}
        return {name: indices for name, indices in found.items() if indices}

    def to_dict(self) -> dict[str, Any]:
        """Everything but the full arrays, JSON-ready: summaries, worst entries, every mismatch and kink."""
        out: dict[str, Any] = {
            "verdict": self.verdict,
            "method": self.method,
            "h": self.h,
            "safety": self.safety,
            "rounding_ulps": ROUNDING_ULPS,
            "dtype": self.dtype,
            "checked_in": "float64",
            "kinks_reported": self.kinks_reported,
            "counts": self.counts,
            "mean_abs": dict(self.items()),
            "params": {name: p.summary() for name, p in self.params.items()},
            "worst": [e.to_dict() for e in self.worst],
            "mismatches": [_entry(p, idx).to_dict() for p in self.params.values() for idx in p.indices("mismatch")],
            "kinks": [_entry(p, idx).to_dict() for p in self.params.values() for idx in p.indices("kink")],
            "cost": self.cost.to_dict(),
            "notes": list(self.notes),
        }
        return out

    def format(self, worst: int = 5) -> str:
        """Seed 001's lines ("W1: 2.2e-13"), a per-parameter table, the worst entries and the cost."""
        lines = [f"{name}: {p.mean_abs:.6e}" for name, p in self.params.items()]
        lines.append("")
        header = ("param", "max abs", "mean abs", "max rel", "mean rel", "agrees", "kink", "mismatch")
        rows = [
            (name, f"{p.max_abs:.2e}", f"{p.mean_abs:.2e}", f"{p.max_rel:.2e}", f"{p.mean_rel:.2e}")
            + tuple(str(p.counts[verdict]) for verdict in VERDICTS)
            for name, p in self.params.items()
        ]
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            lines.append("  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)))
        shown = self.worst[:worst]
        if shown:
            lines.append("")
            lines.append(
                f"worst entries (mismatch: |diff| > {self.safety:g} x the finite difference's own error bound):"
            )
            for e in shown:
                kink = f" (sample {e.kink[0]}, layer {e.kink[1]}, unit {e.kink[2]}, at {e.kink_step})" if e.kink else ""
                lines.append(
                    f"  {e.label:<14} backprop {e.backprop: .6e}  numerical {e.numerical: .6e}  "
                    f"|diff| {e.error:.2e}  bound {e.bound:.2e}  {e.verdict}{kink}"
                )
        c = self.cost
        passes = f"{c.forward_passes:,} forward passes, " if c.forward_passes is not None else ""
        kinks = f", kinks {c.kinks_s:.2f} s" if c.kinks_s else ""
        lines.append("")
        lines.append(
            f"cost: {c.method} on {c.backend}, {c.n_params:,} parameters, {passes}"
            f"~{c.forward_pass_equivalents:,.0f} forward-pass equivalents, {c.total_s:.2f} s in all "
            f"(h {c.numerical_s:.2f} s, 2h {c.richardson_s:.2f} s{kinks}) = "
            f"{c.ratio_to_backprop:,.0f}x one backprop ({c.backprop_s * 1e3:.2f} ms)"
        )
        for note in (*self.notes, *c.notes):
            lines.append(f"note: {note}")
        counts = self.counts
        lines.append(
            f"verdict {self.verdict}: {counts['agrees']} agree, {counts['kink']} at a kink, "
            f"{counts['mismatch']} mismatch (h {self.h:g}, checked in float64)"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _badness(e: Entry) -> tuple[int, float]:
    """Sort key: mismatches first, then kinks, each by how far over its bound."""
    ratio = e.error / e.bound if e.bound > 0 else math.inf
    if math.isnan(ratio):
        ratio = math.inf
    return (VERDICTS[::-1].index(e.verdict), -ratio)


def _entry(p: ParamCheck, idx: tuple[int, ...]) -> Entry:
    flat = int(np.ravel_multi_index(idx, p.backprop.shape)) if p.backprop.ndim else 0
    kink, kink_step = None, None
    for rows, step in ((p.kinks, "h"), (p.kinks_2h, "2h")):
        if rows is not None and rows.size:
            hit = np.flatnonzero(rows[:, 0] == flat)
            if hit.size:
                kink, kink_step = tuple(int(v) for v in rows[hit[0], 1:]), step
                break
    return Entry(
        param=p.name,
        index=tuple(int(i) for i in idx),
        backprop=float(p.backprop[idx]),
        numerical=float(p.numerical[idx]),
        error=float(abs(p.backprop[idx] - p.numerical[idx])),
        bound=float(p.bound[idx]),
        verdict=str(p.verdict[idx]),
        kink=kink,
        kink_step=kink_step,
    )


def gradient_check(
    net: _FeedForwardNet,
    x: Any,
    t: Any,
    method: str = "naive",
    h: float = 1e-4,
    *,
    worst: int = 5,
    safety: float = SAFETY,
) -> GradientCheck:
    """Check net.gradient (backprop) against the numerical gradient, entry by entry, in float64.

    x: (batch, input_size) in the net's dtype; t: labels (batch,) or one-hot. A float32 net is
    checked through its float64 twin (net.astype("float64"), same class and weights): the
    numerical gradient is float64 anyway, and float32 backprop's rounding is not a bug.

    Per entry: the bound on the central difference's own error is
        |D(2h) - D(h)| / 3                                    (truncation, by Richardson: D = f' + c h^2)
      + 1.5 * ROUNDING_ULPS * eps * (|loss| + mean max |score|) / h   (rounding of the losses at +-h and +-2h)
    and the verdict is "kink" when the entry's h or 2h moves carry a relu/leaky_relu pre-activation
    across z > 0 for some sample (the difference then averages two slopes and the bound does not
    hold), else "mismatch" when |backprop - D(h)| > safety * bound (NaN included), else "agrees".

    Cost: two numerical gradients (h and 2h) with ``method``; naive, incremental and series report
    kinks from those same passes; batched takes them from two extra incremental gradients. Returns
    a GradientCheck (a mapping {name: mean |backprop - numerical|}, plus everything above).
    """
    started = time.perf_counter()
    step = validate.check_step(h)
    if isinstance(worst, bool) or not isinstance(worst, int) or worst < 0:
        raise ValueError(f"worst must be an int >= 0 (entries listed per parameter); got {worst!r}")
    if isinstance(safety, bool) or not isinstance(safety, int | float) or not (math.isfinite(safety) and safety > 0):
        raise ValueError(f"safety must be a finite number > 0; got {safety!r}")
    backend = net.backend
    x, t = net.checked_inputs(x, t)  # bad input or non-finite parameters raise here, before any work
    notes: list[str] = []

    def timed(call: Callable[[], Any], repeats: int = 1) -> tuple[Any, float]:
        best, result = math.inf, None
        for _ in range(repeats):
            begin = time.perf_counter()
            result = call()
            backend.synchronize()
            best = min(best, time.perf_counter() - begin)
        return result, best

    _, backprop_s = timed(lambda: net.gradient(x, t), repeats=3)  # the first call also warms up (JIT, caches)
    _, forward_s = timed(lambda: net.loss(x, t), repeats=3)
    checked = net
    x64 = x
    if net.dtype != np.float64:
        checked = net.astype("float64")
        x64 = backend.asarray(x).astype(backend.xp.float64)
        notes.append(f"{net.dtype.name} net checked through its float64 twin")
    backprop = {name: backend.to_numpy(g).astype(np.float64) for name, g in checked.gradient(x64, t).items()}
    loss = float(checked.loss(x64, t))
    scores = backend.to_numpy(checked.predict(x64))
    loss_scale = abs(loss) + float(np.abs(scores).max(axis=1).mean())

    def numerical(at: float, kinks: dict | None) -> tuple[dict[str, np.ndarray], float]:
        grads, seconds = timed(lambda: checked.numerical_gradient(x64, t, method=method, h=at, kinks=kinks))
        return {name: backend.to_numpy(g) for name, g in grads.items()}, seconds

    kink_method = method if method in _KINK_METHODS else "incremental"
    kinks_h: dict = {}
    kinks_2h: dict = {}
    kinks_s = 0.0
    if method in _KINK_METHODS:
        numeric_h, numerical_s = numerical(step, kinks_h)
        numeric_2h, richardson_s = numerical(2 * step, kinks_2h)
    else:
        numeric_h, numerical_s = numerical(step, None)
        numeric_2h, richardson_s = numerical(2 * step, None)
        for at, found in ((step, kinks_h), (2 * step, kinks_2h)):
            _, seconds = timed(
                lambda at=at, found=found: checked.numerical_gradient(x64, t, method=kink_method, h=at, kinks=found)
            )
            kinks_s += seconds
        notes.append(f"kinks of {method} from two extra {kink_method} gradients ({kinks_s:.2f} s)")

    rounding = 1.5 * ROUNDING_ULPS * _EPS * loss_scale / step
    params = {}
    for name, bp in backprop.items():
        num, num2 = numeric_h[name].astype(np.float64), numeric_2h[name].astype(np.float64)
        bound = np.abs(num2 - num) / 3 + rounding
        verdict = np.where(np.abs(bp - num) <= safety * bound, "agrees", "mismatch").astype("<U8")
        rows_h, rows_2h = (
            backend.to_numpy(found.get(name, np.zeros((0, 4)))).astype(np.int64) for found in (kinks_h, kinks_2h)
        )  # kernels may leave the rows on the device
        for rows in (rows_h, rows_2h):
            if rows.size:
                verdict.reshape(-1)[rows[:, 0]] = "kink"
        check = ParamCheck(name, bp, num, num2, bound, verdict, rows_h, rows_2h, ())
        params[name] = _with_worst(check, worst)

    n_params = sum(int(p.size) for p in backprop.values())
    full_passes = {"naive": 2, "batched": 2}.get(method)
    forward_passes = None
    if full_passes is not None:
        forward_passes = 2 * full_passes * n_params + (2 if method == "naive" else 0)
    total_s = time.perf_counter() - started
    cost = Cost(
        method=method,
        backend=backend.name,
        n_params=n_params,
        forward_passes=forward_passes,
        forward_pass_equivalents=(numerical_s + richardson_s + kinks_s) / forward_s if forward_s > 0 else math.inf,
        numerical_s=numerical_s,
        richardson_s=richardson_s,
        kinks_s=kinks_s,
        backprop_s=backprop_s,
        forward_s=forward_s,
        total_s=total_s,
        ratio_to_backprop=total_s / backprop_s if backprop_s > 0 else math.inf,
    )
    return GradientCheck(method, step, float(safety), net.dtype.name, params, cost, True, tuple(notes))


def _with_worst(check: ParamCheck, worst: int) -> ParamCheck:
    """check with its ``worst`` entries: mismatches first, then kinks, then the rest, each by error / bound."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.nan_to_num(check.error / check.bound, nan=np.inf).reshape(-1)
    rank = {"mismatch": 0, "kink": 1, "agrees": 2}
    order = np.lexsort((-ratio, np.vectorize(rank.get, otypes=[int])(check.verdict.reshape(-1))))
    shape = check.backprop.shape
    entries = tuple(_entry(check, tuple(int(i) for i in np.unravel_index(k, shape))) for k in order[:worst])
    return dataclasses.replace(check, worst=entries)
