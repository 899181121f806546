"""Property-based tests (hypothesis): random shapes, batch sizes (1..257), dtypes and values.

* Every backend agrees with NumPy, kernel by kernel and net by net, values up to +-1e3 included.
* Backprop agrees with the numerical gradient (float64, every activation, every method).
* Nothing is mutated: inputs keep their bits, and the parameters are bit-identical after every
  method, also when the loss given to nets.gradient.numerical_gradient raises midway.

Tolerances. Two correct implementations that add in different orders or use different exp/tanh
code differ by rounding, and rounding scales with the magnitude of the terms a result is made of,
not with the result (softmax-minus-one-hot, 1 - tanh^2 and a loss near 0 are differences of terms
near 1). So each result r is compared as |r_backend - r_numpy| <= rtol * scale(r), where scale(r) is
computed in float64 from the inputs by running the same computation on magnitudes (|x| @ |W| + |b|
for an affine output, p + onehot for a softmax gradient, ...): the standard running error bound
(Higham, "Accuracy and Stability of Numerical Algorithms", ch. 3). Where a result is made of terms
of one sign, scale(r) = |r| and the check is plain relative error.
  float64: rtol = 1e-10, the DESIGN's contract (the rounding bound itself is below 1e-13).
  float32: rtol = 2 * depth * (n + 8) * 2**-24, with n the longest sum behind the result (batch,
  width or classes, at most 257 + 8 here) and depth the number of layers it went through: sums
  of n terms in two orders differ by at most 2 n u of their magnitude (Higham's gamma_n, u =
  2**-24 the float32 unit roundoff), plus 8 ulp for exp/tanh/log implementations, per layer.
  e.g. a 257-sample column sum: 4.4e-5 relative to the sum of |terms|; an elementwise op: 1e-6.
  Numerical gradients are (L+ - L-) / 2h of float64 losses: the rounding of the two losses, bounded
  as above with the float64 unit roundoff, divided by h.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# hypothesis is a dev-only library (".[dev]"): under the main install ".[numba,bench]" this module skips.
pytest.importorskip("hypothesis", reason="property-based tests need hypothesis: pip install -e '.[dev]'")
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from backends import get_backend, to_numpy
from kernels import ACTIVATIONS
from nets import MultiLayerNet, TwoLayerNet
from nets.gradient import numerical_gradient

REFERENCE = get_backend("numpy")
METHODS = ("naive", "batched", "incremental")
SETTINGS = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,  # CI sees the same examples on every run
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float64": 2.0**-53}


def rtol_for(dtype: str, n_terms: int, depth: int = 1) -> float:
    """The agreement tolerance relative to scale(r) (see the module docstring)."""
    if dtype == "float64":
        return 1e-10
    return 2 * depth * (n_terms + 8) * UNIT_ROUNDOFF["float32"]


def assert_agree(got: Any, want: Any, scale: np.ndarray, rtol: float, what: str) -> None:
    """|got - want| <= rtol * scale elementwise (plus the dtype's smallest normal, below which
    results are underflow noise); same shape and dtype; NaN nowhere."""
    got, want = to_numpy(got), to_numpy(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs numpy {want.shape}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} vs numpy {want.dtype}"
    assert np.isfinite(got).all() and np.isfinite(want).all(), f"{what}: not finite"
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    allowed = rtol * np.broadcast_to(scale, diff.shape) + np.finfo(want.dtype).tiny
    if not (diff <= allowed).all():
        i = np.unravel_index(np.argmax(diff - allowed), diff.shape)
        pytest.fail(
            f"{what}{list(i)}: {got[i]!r} vs numpy {want[i]!r}: |diff| {diff[i]:.3e} > {allowed[i]:.3e}"
            f" (rtol {rtol:.2e} x scale {np.broadcast_to(scale, diff.shape)[i]:.3e})"
        )


# ----------------------------------------------------------------------------- strategies


@st.composite
def values(draw, shape: tuple[int, ...], dtype: str, scale: float | None = None) -> np.ndarray:
    """Normal values at a drawn scale (1e-3 .. 1e3) with some entries set to +-1e3 or 0."""
    seed = draw(st.integers(0, 2**32 - 1))
    scale = scale if scale is not None else draw(st.sampled_from([1e-3, 0.1, 1.0, 10.0, 1e3]))
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape) * scale
    special = draw(st.sampled_from([0.0, 0.05, 0.5]))
    pick = rng.random(shape) < special
    a[pick] = rng.choice([1e3, -1e3, 0.0], size=int(pick.sum()))
    return a.astype(dtype)


dtypes = st.sampled_from(["float32", "float64"])
batches = st.integers(1, 257)
widths = st.integers(1, 12)


# ----------------------------------------------------------------------------- kernels


def _activation_derivative(kind: str, x: np.ndarray) -> np.ndarray:
    """|f'(x)| in float64, computed without cancellation."""
    x = x.astype(np.float64)
    if kind == "sigmoid":
        e = np.exp(-np.abs(x))
        return e / (1 + e) ** 2
    if kind == "tanh":
        e = np.exp(-2 * np.abs(x))
        return 4 * e / (1 + e) ** 2
    if kind == "relu":
        return (x > 0).astype(np.float64)
    return np.where(x > 0, 1.0, 0.01)


@SETTINGS
@given(data=st.data(), dtype=dtypes, batch=batches, n_in=widths, n_out=widths)
def test_kernels_agree_with_numpy(other_backend, data, dtype, batch, n_in, n_out):
    ref, k, on = REFERENCE.kernels, other_backend.kernels, other_backend.asarray
    x = data.draw(values((batch, n_in), dtype), label="x")
    W = data.draw(values((n_in, n_out), dtype, scale=data.draw(st.sampled_from([0.01, 1.0, 30.0]))), label="W")
    b = data.draw(values((n_out,), dtype), label="b")
    dout = data.draw(values((batch, n_out), dtype), label="dout")
    dhidden = data.draw(values((batch, n_in), dtype), label="dhidden")
    labels = np.random.default_rng(batch).integers(0, n_out, batch)
    onehot = np.eye(n_out, dtype=dtype)[labels]
    inputs = {"x": x, "W": W, "b": b, "dout": dout, "dhidden": dhidden, "labels": labels}
    kept = {name: a.copy() for name, a in inputs.items()}
    ax, aW, adout = (np.abs(a.astype(np.float64)) for a in (x, W, dout))

    assert_agree(
        k.affine_forward(on(x), on(W), on(b)),
        ref.affine_forward(x, W, b),
        ax @ aW + np.abs(b.astype(np.float64)),
        rtol_for(dtype, n_in),
        "affine_forward",
    )
    got, want = k.affine_backward(on(dout), on(x), on(W)), ref.affine_backward(dout, x, W)
    scales = (adout @ aW.T, ax.T @ adout, adout.sum(axis=0))
    for name, g, w, s, n in zip(("dx", "dW", "db"), got, want, scales, (n_out, batch, batch), strict=True):
        assert_agree(g, w, s, rtol_for(dtype, n), f"affine_backward {name}")
    assert k.affine_backward(on(dout), on(x), on(W), need_dx=False)[0] is None

    for kind in ACTIVATIONS:
        y = ref.activation_forward(kind, x)
        assert_agree(k.activation_forward(kind, on(x)), y, np.abs(y.astype(np.float64)), rtol_for(dtype, 1), kind)
        assert_agree(
            k.activation_backward(kind, on(dhidden), on(x), on(y)),
            ref.activation_backward(kind, dhidden, x, y),
            np.abs(dhidden.astype(np.float64)) * _activation_derivative(kind, x),
            rtol_for(dtype, 1),
            f"{kind} backward",
        )

    scores = data.draw(values((batch, n_out), dtype), label="scores")
    probs = ref.softmax(scores)
    assert_agree(k.softmax(on(scores)), probs, probs.astype(np.float64), rtol_for(dtype, n_out), "softmax")
    top = np.abs(scores.astype(np.float64)).max(axis=1)
    for target in (labels, onehot):
        loss, probs_ce = ref.softmax_cross_entropy(scores, target)
        got_loss, got_probs = k.softmax_cross_entropy(on(scores), on(target))
        loss_scale = abs(float(loss)) + np.mean(2 * top + math.log(n_out))
        assert_agree(
            got_loss, loss, np.float64(loss_scale), rtol_for(dtype, batch + n_out), f"loss ({target.ndim}-D t)"
        )
        assert_agree(got_probs, probs_ce, probs_ce.astype(np.float64), rtol_for(dtype, n_out), "softmax of CE")
        for dscale in (1.0, 0.5):
            assert_agree(
                k.softmax_cross_entropy_backward(on(probs), on(target), dscale),
                ref.softmax_cross_entropy_backward(probs, target, dscale),
                (probs.astype(np.float64) + onehot) * dscale / batch,
                rtol_for(dtype, 1),
                f"softmax_cross_entropy_backward ({target.ndim}-D t)",
            )
    for name, a in inputs.items():
        assert a.tobytes() == kept[name].tobytes(), f"{name} was modified"


# ----------------------------------------------------------------------------- nets


@st.composite
def net_configs(draw, max_batch: int = 257) -> dict[str, Any]:
    """A small TwoLayerNet or MultiLayerNet and its data (labels or one-hot)."""
    two_layer = draw(st.booleans())
    n_in, n_out = draw(st.integers(1, 8)), draw(st.integers(1, 6))
    hidden = [draw(st.integers(1, 6))] if two_layer else draw(st.lists(st.integers(1, 6), min_size=0, max_size=3))
    config = {
        "two_layer": two_layer,
        "sizes": (n_in, hidden, n_out),
        "activation": draw(st.sampled_from(ACTIVATIONS)),
        "weight_init_std": draw(st.sampled_from([0.1, 0.5, 1.0])),
        "weight_decay_lambda": 0.0 if two_layer else draw(st.sampled_from([0.0, 0.1])),
        "seed": draw(st.integers(0, 2**16)),
    }
    batch = draw(st.integers(1, max_batch))
    config["labels"] = np.random.default_rng(config["seed"]).integers(0, n_out, batch)
    config["onehot"] = draw(st.booleans())
    return config


def build(config: dict[str, Any], backend: str, dtype: str):
    n_in, hidden, n_out = config["sizes"]
    common = {"activation": config["activation"], "seed": config["seed"], "backend": backend, "dtype": dtype}
    if config["two_layer"]:
        return TwoLayerNet(n_in, hidden[0], n_out, weight_init_std=config["weight_init_std"], **common)
    return MultiLayerNet(
        n_in,
        hidden,
        n_out,
        weight_init_std=config["weight_init_std"],
        weight_decay_lambda=config["weight_decay_lambda"],
        **common,
    )


def targets(config: dict[str, Any]) -> np.ndarray:
    labels = config["labels"]
    return np.eye(config["sizes"][2])[labels] if config["onehot"] else labels


def snapshot(net) -> dict[str, bytes]:
    return {name: to_numpy(p).tobytes() for name, p in net.params.items()}


def host_params(net) -> list[tuple[np.ndarray, np.ndarray]]:
    return [
        (to_numpy(net.params[f"W{m}"]).astype(np.float64), to_numpy(net.params[f"b{m}"]).astype(np.float64))
        for m in range(1, net.n_layers + 1)
    ]


def _forward(net, x: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Inputs z_0..z_{L-1} and pre-activations a_1..a_L of the net, in float64 on the host."""
    kernels, zs, pres = REFERENCE.kernels, [x.astype(np.float64)], []
    params = host_params(net)
    for m, (W, b) in enumerate(params):
        pres.append(zs[-1] @ W + b)
        if m < len(params) - 1:
            zs.append(kernels.activation_forward(net.activation, pres[-1]))
    return zs, pres


def magnitudes(net, x: np.ndarray, labels: np.ndarray, rtol: float) -> dict[str, Any]:
    """Running error scales of the net's results (module docstring): the forward and backward passes
    run on magnitudes. An activation passes on its input's error times its local slope |f'(a)| (sigmoid
    and tanh flatten out where they saturate; |f''| <= 2 |f'| for both). A relu/leaky_relu input
    within rtol * its scale of 0 may fall on either side of the kink in two backends: there the slope
    counts as 1 and the derivative as unknown (a full |dL/dz| over rtol)."""
    kind, params, batch = net.activation, host_params(net), x.shape[0]
    zs, pres = _forward(net, x)
    input_errors, pre_errors, slopes, curvatures = [np.zeros_like(zs[0])], [], [], []
    for m, (W, b) in enumerate(params):
        pre_errors.append((np.abs(zs[m]) + input_errors[m]) @ np.abs(W) + np.abs(b))
        if m < len(params) - 1:
            if kind in ("relu", "leaky_relu"):
                unsure = np.abs(pres[m]) <= rtol * pre_errors[m]
                slope, curvature = np.where(unsure, 1.0, _activation_derivative(kind, pres[m])), unsure / rtol
            else:
                slope = _activation_derivative(kind, pres[m])
                curvature = 2 * slope * pre_errors[m]
            input_errors.append(slope * pre_errors[m])
            slopes.append(slope)
            curvatures.append(curvature)
    scores, score_scale = pres[-1], pre_errors[-1]
    shifted = scores - scores.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    onehot = np.eye(scores.shape[1])[labels]
    spread = score_scale.max(axis=1, keepdims=True)  # softmax moves by at most 2 p max|d score|
    decay = net.weight_decay_lambda
    loss_scale = np.mean(2 * np.abs(scores).max(axis=1) + 2 * spread[:, 0] + math.log(scores.shape[1]) + 1)
    loss_scale += 0.5 * decay * sum(float((W**2).sum()) for W, _ in params)
    grad_scale, delta = (probs + onehot + 2 * probs * spread) / batch, (probs - onehot) / batch
    grads = {}
    for m in range(len(params) - 1, -1, -1):
        W = params[m][0]
        grads[f"W{m + 1}"] = np.abs(zs[m]).T @ grad_scale + input_errors[m].T @ np.abs(delta) + decay * np.abs(W)
        grads[f"b{m + 1}"] = grad_scale.sum(axis=0)
        if m:
            back = delta @ W.T
            grad_scale = (grad_scale @ np.abs(W).T) * slopes[m - 1] + np.abs(back) * curvatures[m - 1]
            delta = REFERENCE.kernels.activation_backward(kind, back, pres[m - 1], zs[m])
    return {"scores": score_scale, "loss": loss_scale, "grads": grads}


def depth_and_width(net, batch: int) -> tuple[int, int]:
    return net.n_layers + 1, max(*net.sizes, batch)


@SETTINGS
@given(config=net_configs(), dtype=dtypes, data=st.data())
def test_nets_agree_with_numpy(other_backend, config, dtype, data):
    ref, net = build(config, "numpy", dtype), build(config, other_backend.name, dtype)
    x, t = data.draw(values((len(config["labels"]), config["sizes"][0]), dtype), label="x"), targets(config)
    kept_x, kept_t, params = x.tobytes(), t.tobytes(), snapshot(net)
    depth, width = depth_and_width(net, x.shape[0])
    rtol = rtol_for(dtype, width, depth)
    scale = magnitudes(ref, x, config["labels"], rtol)

    assert_agree(net.predict(x), ref.predict(x), scale["scores"], rtol, "predict")
    want_loss = ref.loss(x, t)
    assert abs(net.loss(x, t) - want_loss) <= rtol * scale["loss"], f"loss {net.loss(x, t)!r} vs {want_loss!r}"
    got_grads, want_grads = net.gradient(x, t), ref.gradient(x, t)
    for name, want in want_grads.items():
        assert_agree(got_grads[name], want, scale["grads"][name], rtol, f"gradient {name}")

    scores = to_numpy(ref.predict(x)).astype(np.float64)
    top_two = np.sort(scores, axis=1)[:, -2:] if scores.shape[1] > 1 else np.hstack([scores - 1, scores])
    ambiguous = int((top_two[:, 1] - top_two[:, 0] <= 2 * rtol * scale["scores"].max(axis=1)).sum())
    assert abs(net.accuracy(x, t) - ref.accuracy(x, t)) <= ambiguous / x.shape[0]

    # numerical gradients: float64 losses, rounding bound 2 depth (n + 8) u64 of the loss scale, over h
    reference = ref.numerical_gradient(x, t, method="naive")
    numeric_atol = 2 * depth * (width + 8) * UNIT_ROUNDOFF["float64"] * scale["loss"] / 1e-4
    for method in METHODS:
        got = net.numerical_gradient(x, t, method=method)
        for name, want in reference.items():
            assert_agree(got[name], want, np.float64(1.0), numeric_atol, f"{method} numerical gradient {name}")
        assert snapshot(net) == params, f"{method} changed the parameters"
    assert x.tobytes() == kept_x and t.tobytes() == kept_t, "an input was modified"
    assert snapshot(net) == params


def _kink_free(net, x: np.ndarray, labels: np.ndarray, h: float) -> tuple[np.ndarray, np.ndarray]:
    """The samples no perturbation of up to 2h in any one parameter moves across a relu kink.

    Moving one parameter of layer l by d moves that layer's pre-activations by at most
    d * max(1, |z_{l-1}|), and each later layer's by at most that times its largest column sum of |W|.
    Samples whose hidden pre-activations lie within 10x that bound of 0 are dropped.
    """
    zs, pres = _forward(net, x)
    keep = np.ones(x.shape[0], dtype=bool)
    reach = 0.0
    for m, (W, _) in enumerate(host_params(net)[:-1]):
        reach = 2 * h * max(1.0, float(np.abs(zs[m]).max())) + reach * float(np.abs(W).sum(axis=0).max())
        keep &= (np.abs(pres[m]) > 10 * reach).all(axis=1)
    return x[keep], labels[keep]


@SETTINGS
@given(config=net_configs(), data=st.data())
def test_backprop_agrees_with_the_numerical_gradient(backend, config, data):
    """float64; x in [-3, 3]: central differences carry truncation error ~ h^2 f''' (large for x of
    1e3, so extremes are left to the agreement tests). The truncation error is estimated from the
    numerical gradients at h and 2h (Richardson: g(2h) - g(h) ~ 3 c h^2 for g(h) = g + c h^2), and
    relu/leaky_relu nets are checked on the samples no perturbation moves across a kink."""
    h = 1e-5
    net = build(config, backend.name, "float64")
    x = data.draw(values((len(config["labels"]), config["sizes"][0]), "float64", scale=1.0), label="x")
    x, labels = np.clip(x, -3, 3), config["labels"]
    if config["activation"] in ("relu", "leaky_relu"):
        x, labels = _kink_free(net, x, labels, h)
        assume(x.shape[0] > 0)
    t = np.eye(config["sizes"][2])[labels] if config["onehot"] else labels
    params = snapshot(net)
    backprop = {name: to_numpy(g) for name, g in net.gradient(x, t).items()}
    at_h = {name: to_numpy(g) for name, g in net.numerical_gradient(x, t, method="naive", h=h).items()}
    at_2h = {name: to_numpy(g) for name, g in net.numerical_gradient(x, t, method="naive", h=2 * h).items()}
    loss_scale = magnitudes(net, x, labels, rtol_for("float64", 1))["loss"]
    rounding = 8 * UNIT_ROUNDOFF["float64"] * loss_scale / h  # two losses, each a few u of their scale
    for method in METHODS:
        numeric = at_h if method == "naive" else net.numerical_gradient(x, t, method=method, h=h)
        for name, want in backprop.items():
            truncation = 2 * np.abs(at_2h[name] - at_h[name]) / 3  # twice the Richardson estimate
            got = to_numpy(numeric[name])
            allowed = 1e-9 + truncation + 2 * rounding
            worst = np.argmax(np.abs(got - want) - allowed)
            assert (np.abs(got - want) <= allowed).all(), (
                f"{backend.name}/{method}/{config['activation']} {name}.flat[{worst}]: numerical "
                f"{got.flat[worst]:.9e} vs backprop {want.flat[worst]:.9e} (allowed {allowed.flat[worst]:.2e})"
            )
        assert snapshot(net) == params, f"{method} changed the parameters"


# ----------------------------------------------------------------------------- restoring parameters


class Boom(Exception):
    """Raised by a loss on purpose."""


def raising_on_call(k: int, exc: type[BaseException], loss: Callable[[Any], float]) -> Callable[[Any], float]:
    calls = 0

    def f(a: Any) -> float:
        nonlocal calls
        calls += 1
        if calls == k:
            raise exc("raised on purpose")
        return loss(a)

    return f


def bits(a: Any) -> bytes:
    return to_numpy(a).tobytes()


@SETTINGS
@given(
    dtype=dtypes,
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple),
    strided=st.booleans(),
    exc=st.sampled_from([Boom, ValueError, KeyboardInterrupt]),
    data=st.data(),
)
def test_textbook_numerical_gradient_restores_x_bit_for_bit_when_f_raises(backend, dtype, shape, strided, exc, data):
    width = 32 if dtype == "float32" else 64
    entries = st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True, width=width)
    host = np.array(data.draw(st.lists(entries, min_size=2 * math.prod(shape), max_size=2 * math.prod(shape))))
    base = backend.asarray(host.astype(dtype).reshape((2, *shape)))
    x = base[1, ..., ::2] if strided else base[1]
    before, before_base = bits(x), bits(base)
    size = int(x.size)
    k = data.draw(st.integers(1, 2 * size), label="raising call")
    f = raising_on_call(k, exc, lambda a: float(a.size))  # its value does not matter here
    with pytest.raises(exc, match="raised on purpose"):
        numerical_gradient(f, x, h=data.draw(st.sampled_from([1e-4, 1e-2, 1.0])))
    assert bits(x) == before and bits(base) == before_base, "x is not bit-identical after f raised"


@SETTINGS
@given(config=net_configs(max_batch=16), data=st.data(), exc=st.sampled_from([Boom, KeyboardInterrupt]))
def test_net_params_are_restored_when_the_loss_raises(backend, config, data, exc):
    """nets.gradient.numerical_gradient perturbs a float64 net's own arrays: the net's loss raising
    on the k-th evaluation leaves every parameter, and the loss, exactly as they were."""
    net = build(config, backend.name, "float64")
    x = data.draw(values((len(config["labels"]), config["sizes"][0]), "float64"), label="x")
    t = targets(config)
    name = data.draw(st.sampled_from(sorted(net.params)), label="param")
    params, loss = snapshot(net), net.loss(x, t)
    k = data.draw(st.integers(1, 2 * int(net.params[name].size)), label="raising call")
    with pytest.raises(exc, match="raised on purpose"):
        numerical_gradient(raising_on_call(k, exc, lambda _: net.loss(x, t)), net.params[name])
    assert snapshot(net) == params
    assert net.loss(x, t) == loss or (math.isnan(loss) and math.isnan(net.loss(x, t)))


# ----------------------------------------------------------------------------- interrupts anywhere

TRACED_FILES = {str(Path(__file__).resolve().parent.parent / f) for f in ("nets/gradient.py", "kernels/xp_kernels.py")}


def _interrupt_at_line(k: int, call: Callable[[], Any]) -> int:
    """Run call(), raising KeyboardInterrupt at the k-th line executed in nets/gradient.py or
    kernels/xp_kernels.py, as a Ctrl-C landing there would (sys.settrace: no code is replaced).
    Returns the number of such lines executed (all of them when k is beyond the last)."""
    count = 0

    def local(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
            if count == k:
                raise KeyboardInterrupt(f"line {k}")
        return local

    def global_trace(frame, event, arg):
        return local if frame.f_code.co_filename in TRACED_FILES else None

    previous = sys.gettrace()
    sys.settrace(global_trace)
    try:
        call()
    finally:
        sys.settrace(previous)
    return count


INTERRUPT_CASES = [
    ("naive", "float64"),
    ("naive", "float32"),
    ("batched", "float64"),
    ("incremental", "float64"),
]


@pytest.mark.parametrize(("method", "dtype"), INTERRUPT_CASES)
def test_params_survive_an_interrupt_at_any_line(backend, method, dtype):
    """DESIGN: the parameters are left exactly as they were, also when interrupted."""
    net = TwoLayerNet(2, 2, 2, weight_init_std=0.5, backend=backend.name, dtype=dtype)
    x, t = np.array([[0.5, -1.0], [2.0, 0.25], [0.0, 1.5]], dtype=dtype), np.array([0, 1, 1])
    params = snapshot(net)
    lines = _interrupt_at_line(0, lambda: net.numerical_gradient(x, t, method=method))
    moved = []
    for k in range(1, lines + 1):
        with pytest.raises(KeyboardInterrupt):
            _interrupt_at_line(k, lambda: net.numerical_gradient(x, t, method=method))
        if snapshot(net) != params:
            moved.append(k)
            for name, p in net.params.items():  # put it back for the next k
                p[...] = backend.asarray(np.frombuffer(params[name], dtype=dtype).reshape(p.shape))
    assert not moved, f"parameters changed by an interrupt at {len(moved)} of {lines} lines, e.g. {moved[:5]}"
