"""Adversarial inputs on every backend, at both public levels (layers + Backend API, and the nets).

Each bad input is rejected with the right exception type and a message that names the problem, with
no warning on the way and the parameters left bit for bit as they were. Odd but valid inputs
(read-only, Fortran-ordered, strided, reversed, other integer widths) work and give exactly the
numbers of the contiguous ones. Backward never mutates its inputs; softmax and sigmoid of +-1000 are
finite and silent.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from backends import BACKEND_NAMES, UnknownBackendError, get_backend, to_numpy
from kernels import ACTIVATIONS, GradientProblem
from nets import MultiLayerNet, TwoLayerNet
from nets.gradient import gradient_check, numerical_gradient
from nets.layers import ACTIVATION_LAYERS, Affine, LeakyRelu, Relu, Sigmoid, SoftmaxWithLoss, Tanh
from nets.optimizers import SGD, AdaGrad, Adam, Momentum, RMSprop, get_optimizer

IN, HIDDEN, OUT, BATCH = 5, 4, 3, 6
VALID_BACKENDS = r"valid names: numpy, numba, cupy"


@contextlib.contextmanager
def rejects(exc: type[BaseException], match: str):
    """pytest.raises(exc, match) with every warning an error: a rejection says one thing, once."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(exc, match=match) as info:
            yield info


def host_data(dtype: str = "float64") -> tuple[np.ndarray, np.ndarray]:
    """x (BATCH, IN) in dtype and labels (BATCH,) int64 covering every class."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((BATCH, IN)).astype(dtype)
    t = np.array([0, 1, 2, 1, 0, 2])
    return x, t


def _two_layer_net(backend: str, dtype: Any = "float64", **settings: Any) -> TwoLayerNet:
    return TwoLayerNet(IN, HIDDEN, OUT, backend=backend, dtype=dtype, **{"weight_init_std": 0.5, **settings})


def _multi_layer_net(backend: str, dtype: Any = "float64", **settings: Any) -> MultiLayerNet:
    settings = {"weight_decay_lambda": 0.1, **settings}
    return MultiLayerNet(IN, [HIDDEN, HIDDEN], OUT, backend=backend, dtype=dtype, **settings)


NETS: dict[str, Callable[..., Any]] = {"TwoLayerNet": _two_layer_net, "MultiLayerNet": _multi_layer_net}


@pytest.fixture(params=list(NETS), ids=[f"net={n}" for n in NETS])
def make_net(request, backend):
    """make_net(dtype="float64", **kwargs) -> a small net of one class on the test's backend."""
    return lambda dtype="float64", **kw: NETS[request.param](backend.name, dtype, **kw)


ENTRIES: dict[str, Callable[[Any, Any, Any], Any]] = {
    "predict": lambda net, x, t: net.predict(x),
    "loss": lambda net, x, t: net.loss(x, t),
    "accuracy": lambda net, x, t: net.accuracy(x, t),
    "gradient": lambda net, x, t: net.gradient(x, t),
    "numerical_gradient-naive": lambda net, x, t: net.numerical_gradient(x, t, method="naive"),
    "numerical_gradient-batched": lambda net, x, t: net.numerical_gradient(x, t, method="batched"),
    "numerical_gradient-incremental": lambda net, x, t: net.numerical_gradient(x, t, method="incremental"),
    "gradient_check": lambda net, x, t: gradient_check(net, x, t),
}
LABELLED = [name for name in ENTRIES if name != "predict"]
NUMERICAL = [name for name in ENTRIES if name.startswith("numerical_gradient")]


def assert_every_entry_rejects(
    calls: dict[str, Callable[[], Any]], exc: type[BaseException], match: str, net: Any = None
) -> None:
    """Each call raises ``exc`` matching ``match``, warns nothing and leaves ``net``'s parameters as
    they were; a failure lists every entry that did otherwise."""
    problems = []
    for name, call in calls.items():
        before = None if net is None else snapshot(net)
        try:
            with rejects(exc, match):
                call()
        except (Exception, pytest.fail.Exception) as err:  # not raised, another type, or a warning
            problems.append(f"{name}: {type(err).__name__}: {err}".splitlines()[0])
        if net is not None and snapshot(net) != before:
            problems.append(f"{name}: parameters changed")
    assert not problems, f"expected {exc.__name__} matching {match!r}:\n  " + "\n  ".join(problems)


def snapshot(net) -> dict[str, tuple[np.dtype, tuple[int, ...], bytes]]:
    return {name: (p.dtype, tuple(p.shape), to_numpy(p).tobytes()) for name, p in net.params.items()}


def assert_params_unchanged(net, before) -> None:
    """Bit for bit (so -0.0 vs 0.0 or a moved NaN payload would count)."""
    assert snapshot(net) == before, "parameters changed"


def host(result: Any) -> Any:
    if isinstance(result, dict):
        return {k: host(v) for k, v in result.items()}
    return result if isinstance(result, float) else to_numpy(result)


def assert_identical(got: Any, want: Any, context: str = "") -> None:
    """Same values exactly (NaN equal to NaN), dict by dict."""
    if isinstance(want, dict):
        assert set(got) == set(want), context
        for key in want:
            assert_identical(got[key], want[key], f"{context}[{key}]")
    elif isinstance(want, float):
        assert got == want or (math.isnan(got) and math.isnan(want)), f"{context}: {got!r} != {want!r}"
    else:
        np.testing.assert_array_equal(got, want, err_msg=context)


# ----------------------------------------------------------------------------- bad x


def _x_nan(x, t):
    x = x.copy()
    x[2, 3] = np.nan
    return x, t


def _x_minus_inf(x, t):
    x = x.copy()
    x[4, 1] = -np.inf
    return x, t


def _x_inf_and_nan(x, t):
    x = x.copy()
    x[0, 0], x[1, 1], x[5, 4] = np.inf, np.inf, np.nan
    return x, t


def _x_inf_and_minus_inf(x, t):
    x = x.copy()
    x[0, 0], x[0, 1] = np.inf, -np.inf
    return x, t


X_CASES = [
    pytest.param(lambda x, t: (x[0], t), ValueError, r"x must be 2-D \(batch, 5\); got 1-D", id="1-D"),
    pytest.param(lambda x, t: (x[None], t), ValueError, r"x must be 2-D \(batch, 5\); got 3-D", id="3-D"),
    pytest.param(lambda x, t: (np.array(1.0), t), ValueError, r"x must be 2-D \(batch, 5\); got 0-D", id="0-D"),
    pytest.param(
        lambda x, t: (x[:, :4], t), ValueError, r"x has shape \(6, 4\); expected \(batch, 5\)", id="4-features"
    ),
    pytest.param(
        lambda x, t: (np.hstack([x, x[:, :1]]), t),
        ValueError,
        r"x has shape \(6, 6\); expected \(batch, 5\)",
        id="6-features",
    ),
    pytest.param(lambda x, t: (x.T, t), ValueError, r"x has shape \(5, 6\); expected \(batch, 5\)", id="transposed"),
    pytest.param(lambda x, t: (x[:0], t[:0]), ValueError, r"x is an empty batch \(shape \(0, 5\)\)", id="empty-batch"),
    pytest.param(
        lambda x, t: (x.astype(np.int64), t), TypeError, r"x must be float32 or float64; got dtype int64", id="int64"
    ),
    pytest.param(
        lambda x, t: (x.astype(np.uint8), t), TypeError, r"x must be float32 or float64; got dtype uint8", id="uint8"
    ),
    pytest.param(
        lambda x, t: (x.astype(np.float16), t),
        TypeError,
        r"x must be float32 or float64; got dtype float16",
        id="float16",
    ),
    pytest.param(
        lambda x, t: (x.astype(complex), t),
        TypeError,
        r"x must be float32 or float64; got dtype complex128",
        id="complex",
    ),
    pytest.param(
        lambda x, t: (x.astype(object), t), TypeError, r"x must be float32 or float64; got dtype object", id="object"
    ),
    pytest.param(lambda x, t: (x > 0, t), TypeError, r"x must be float32 or float64; got dtype bool", id="bool"),
    pytest.param(lambda x, t: (None, t), TypeError, r"x must be float32 or float64; got dtype object", id="None"),
    pytest.param(
        lambda x, t: (x.astype(np.float32), t),
        TypeError,
        r"x is float32 but the net is float64",
        id="float32-into-float64",
    ),
    pytest.param(_x_nan, ValueError, r"x contains 1 NaN or Inf value\(s\)", id="NaN"),
    pytest.param(_x_minus_inf, ValueError, r"x contains 1 NaN or Inf value\(s\)", id="-Inf"),
    pytest.param(_x_inf_and_nan, ValueError, r"x contains 3 NaN or Inf value\(s\)", id="Inf-and-NaN"),
    pytest.param(
        _x_inf_and_minus_inf,
        ValueError,
        r"x contains 2 NaN or Inf value\(s\)",
        id="Inf-plus-minus-Inf",
    ),
]


def entry_calls(net, x, t, names=tuple(ENTRIES)) -> dict[str, Callable[[], Any]]:
    return {name: (lambda call=ENTRIES[name]: call(net, x, t)) for name in names}


@pytest.mark.parametrize(("make_bad", "exc", "match"), X_CASES)
def test_bad_x_is_rejected_by_every_entry(make_net, make_bad, exc, match):
    net = make_net()
    assert_every_entry_rejects(entry_calls(net, *make_bad(*host_data())), exc, match, net)


def test_float64_x_into_float32_net_is_rejected_by_every_entry(make_net):
    net = make_net("float32")
    match = r"x is float64 but the net is float32; convert with x.astype\('float32'\)"
    assert_every_entry_rejects(entry_calls(net, *host_data("float64")), TypeError, match, net)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_finite_x_near_the_dtype_max_is_accepted_silently(backend, dtype):
    net = TwoLayerNet(IN, HIDDEN, OUT, weight_init_std=1e-3, backend=backend.name, dtype=dtype)
    x = np.full((BATCH, IN), np.finfo(dtype).max / 4, dtype=dtype)  # finite; its sum is not
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = to_numpy(net.predict(x))
    assert np.isfinite(scores).all()


# ----------------------------------------------------------------------------- bad t


def _t_set(index: int, value: int):
    def make(x, t):
        t = t.copy()
        t[index] = value
        return x, t

    return make


def _uint64_with_max(t: np.ndarray) -> np.ndarray:
    big = t.astype(np.uint64)
    big[t == 2] = np.iinfo(np.uint64).max
    return big


def _onehot(t: np.ndarray, width: int = OUT, dtype: Any = np.float64) -> np.ndarray:
    return np.eye(width, dtype=dtype)[t]


def _onehot_edit(row: int, values: list[float]):
    def make(x, t):
        hot = _onehot(t)
        hot[row] = values
        return x, hot

    return make


T_CASES = [
    pytest.param(lambda x, t: (x, t[:-1]), ValueError, r"t has 5 labels but x has 6 samples", id="short"),
    pytest.param(lambda x, t: (x, np.append(t, 0)), ValueError, r"t has 7 labels but x has 6 samples", id="long"),
    pytest.param(_t_set(3, -1), ValueError, r"labels must be integers in \[0, 3\); got min -1, max 2", id="negative"),
    pytest.param(_t_set(3, 3), ValueError, r"labels must be integers in \[0, 3\); got min 0, max 3", id="too-large"),
    pytest.param(
        lambda x, t: (x, _uint64_with_max(t)),
        ValueError,
        r"labels must be integers in \[0, 3\); got min 0, max 18446744073709551615, dtype uint64",
        id="uint64-max",
    ),
    pytest.param(
        lambda x, t: (x, t.astype(float)),
        TypeError,
        r"labels must be integers in \[0, 3\); got dtype float64",
        id="float",
    ),
    pytest.param(
        lambda x, t: (x, t == 1), TypeError, r"labels must be integers in \[0, 3\); got dtype bool", id="bool"
    ),
    pytest.param(
        lambda x, t: (x, t.astype(object)),
        TypeError,
        r"labels must be integers in \[0, 3\); got dtype object",
        id="object",
    ),
    pytest.param(
        lambda x, t: (x, t.astype(str)), TypeError, r"labels must be integers in \[0, 3\); got dtype <U", id="str"
    ),
    pytest.param(
        lambda x, t: (x, _onehot(t, OUT + 1)),
        ValueError,
        r"one-hot t has shape \(6, 4\); expected \(6, 3\)",
        id="onehot-width",
    ),
    pytest.param(
        lambda x, t: (x, _onehot(t)[:-1]),
        ValueError,
        r"one-hot t has shape \(5, 3\); expected \(6, 3\)",
        id="onehot-batch",
    ),
    pytest.param(_onehot_edit(2, [1, 1, 0]), ValueError, r"t is 2-D but not one-hot: rows \[2\]", id="onehot-two-ones"),
    pytest.param(_onehot_edit(4, [0, 0, 0]), ValueError, r"t is 2-D but not one-hot: rows \[4\]", id="onehot-no-one"),
    pytest.param(_onehot_edit(1, [0, 2, 0]), ValueError, r"t is 2-D but not one-hot: rows \[1\]", id="onehot-two"),
    pytest.param(_onehot_edit(0, [0.5, 0.5, 0]), ValueError, r"t is 2-D but not one-hot: rows \[0\]", id="soft-labels"),
    pytest.param(_onehot_edit(5, [np.nan, 1, 0]), ValueError, r"t is 2-D but not one-hot: rows \[5\]", id="onehot-NaN"),
    pytest.param(
        lambda x, t: (x, _onehot(t, dtype=bool)),
        TypeError,
        r"one-hot t must be numeric 0/1; got dtype bool",
        id="onehot-bool",
    ),
    pytest.param(
        lambda x, t: (x, _onehot(t)[None]),
        ValueError,
        r"t must be labels \(batch,\) or one-hot \(batch, 3\); got shape \(1, 6, 3\)",
        id="3-D",
    ),
    pytest.param(
        lambda x, t: (x, np.array(1)),
        ValueError,
        r"t must be labels \(batch,\) or one-hot \(batch, 3\); got shape \(\)",
        id="0-D",
    ),
    pytest.param(
        lambda x, t: (x, None),
        ValueError,
        r"t must be labels \(batch,\) or one-hot",
        id="None",
    ),
]


@pytest.mark.parametrize(("make_bad", "exc", "match"), T_CASES)
def test_bad_t_is_rejected_by_every_entry(make_net, make_bad, exc, match):
    net = make_net()
    assert_every_entry_rejects(entry_calls(net, *make_bad(*host_data()), names=LABELLED), exc, match, net)


# ----------------------------------------------------------------------------- net settings


@pytest.mark.parametrize("net_class", list(NETS))
@pytest.mark.parametrize(
    ("dtype", "shown"),
    [
        ("float16", "float16"),
        (np.float16, "float16"),
        ("int64", "int64"),
        (int, "int64"),
        (np.uint8, "uint8"),
        (bool, "bool"),
        (complex, "complex128"),
        (object, "object"),
        ("bogus", "'bogus'"),
    ],
)
def test_unsupported_net_dtype_is_rejected(backend, net_class, dtype, shown):
    with rejects(TypeError, rf"dtype must be one of \('float32', 'float64'\); got {shown}"):
        NETS[net_class](backend.name, dtype)


@pytest.mark.parametrize("net_class", list(NETS))
def test_non_native_byte_order_dtype_means_that_float(backend, net_class):
    x, t = host_data()
    want = to_numpy(NETS[net_class](backend.name, "float64").predict(x))
    net = NETS[net_class](backend.name, ">f8")
    np.testing.assert_array_equal(to_numpy(net.predict(x)), want)


@pytest.mark.parametrize("net_class", list(NETS))
@pytest.mark.parametrize("activation", ["bogus", "ReLU", "Sigmoid", "", None, "softmax"])
def test_unknown_activation_is_rejected(backend, net_class, activation):
    with rejects(ValueError, rf"unknown activation {activation!r}; valid: relu, sigmoid, tanh, leaky_relu"):
        NETS[net_class](backend.name, activation=activation)


SIZE_MESSAGE = r"layer sizes must be positive integers; got \[.*\]"


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda be: TwoLayerNet(IN, 0, OUT, backend=be), id="two-hidden-0"),
        pytest.param(lambda be: TwoLayerNet(IN, -4, OUT, backend=be), id="two-hidden-negative"),
        pytest.param(lambda be: TwoLayerNet(IN, 2.5, OUT, backend=be), id="two-hidden-2.5"),
        pytest.param(lambda be: TwoLayerNet(IN, "4", OUT, backend=be), id="two-hidden-str"),
        pytest.param(lambda be: TwoLayerNet(0, HIDDEN, OUT, backend=be), id="two-input-0"),
        pytest.param(lambda be: TwoLayerNet(IN, HIDDEN, 0, backend=be), id="two-output-0"),
        pytest.param(lambda be: TwoLayerNet(IN, float("inf"), OUT, backend=be), id="two-hidden-inf"),
        pytest.param(lambda be: TwoLayerNet(IN, float("nan"), OUT, backend=be), id="two-hidden-nan"),
        pytest.param(lambda be: TwoLayerNet(IN, None, OUT, backend=be), id="two-hidden-None"),
        pytest.param(lambda be: MultiLayerNet(IN, [HIDDEN, 2.5], OUT, backend=be), id="multi-hidden-2.5"),
        pytest.param(
            lambda be: MultiLayerNet(IN, [HIDDEN, 0], OUT, weight_init_std=0.1, backend=be), id="multi-0-fixed-std"
        ),
        pytest.param(lambda be: MultiLayerNet(IN, [HIDDEN, 0], OUT, backend=be), id="multi-0-he"),
        pytest.param(lambda be: MultiLayerNet(IN, [HIDDEN, -3], OUT, backend=be), id="multi-negative-he"),
        pytest.param(lambda be: MultiLayerNet(IN, [HIDDEN, "3"], OUT, backend=be), id="multi-str-he"),
        pytest.param(lambda be: MultiLayerNet(0, [HIDDEN], OUT, backend=be), id="multi-input-0-he"),
    ],
)
def test_bad_layer_sizes_are_rejected(backend, make):
    with rejects(ValueError, SIZE_MESSAGE):
        make(backend.name)


def test_hidden_size_list_must_be_a_list(backend):
    with rejects(TypeError, r"hidden_size_list"):
        MultiLayerNet(IN, HIDDEN, OUT, backend=backend.name)


INIT_STD_MESSAGE = r"weight_init_std must be a positive number, 'he' or 'xavier'; got "


@pytest.mark.parametrize("net_class", list(NETS))
@pytest.mark.parametrize(
    ("value", "exc", "match"),
    [
        (0, ValueError, INIT_STD_MESSAGE + "0"),
        (-0.1, ValueError, INIT_STD_MESSAGE + r"-0\.1"),
        (float("nan"), ValueError, INIT_STD_MESSAGE + "nan"),
        (float("inf"), ValueError, INIT_STD_MESSAGE + "inf"),
        pytest.param(None, TypeError, r"weight_init_std"),
    ],
)
def test_bad_weight_init_std_is_rejected(backend, net_class, value, exc, match):
    with rejects(exc, match):
        NETS[net_class](backend.name, weight_init_std=value)


@pytest.mark.parametrize("value", ["bogus", "", "he-normal"])
def test_unknown_weight_init_rule_is_rejected(backend, value):
    with rejects(ValueError, rf"unknown weight_init_std {value!r}; valid: he, relu, xavier, sigmoid"):
        MultiLayerNet(IN, [HIDDEN], OUT, weight_init_std=value, backend=backend.name)


@pytest.mark.parametrize("value", ["he", "bogus"])
def test_two_layer_net_weight_init_std_string_is_rejected_by_name(backend, value):
    with rejects(ValueError, r"weight_init_std"):
        TwoLayerNet(IN, HIDDEN, OUT, weight_init_std=value, backend=backend.name)


@pytest.mark.parametrize(
    ("value", "exc", "match"),
    [
        (-1e-3, ValueError, r"weight_decay_lambda must be >= 0; got -0\.001"),
        (float("nan"), ValueError, r"weight_decay_lambda must be >= 0; got nan"),
        (float("inf"), ValueError, r"weight_decay_lambda must be >= 0; got inf"),
        pytest.param(
            None,
            TypeError,
            r"weight_decay_lambda",
        ),
        pytest.param(
            "0.1",
            TypeError,
            r"weight_decay_lambda",
        ),
    ],
)
def test_bad_weight_decay_is_rejected(backend, value, exc, match):
    with rejects(exc, match):
        MultiLayerNet(IN, [HIDDEN], OUT, weight_decay_lambda=value, backend=backend.name)


# ----------------------------------------------------------------------------- h and method

STEP_ENTRIES: dict[str, Callable[[Any, Any, Any, Any], Any]] = {
    "numerical_gradient-naive": lambda net, x, t, h: net.numerical_gradient(x, t, method="naive", h=h),
    "numerical_gradient-batched": lambda net, x, t, h: net.numerical_gradient(x, t, method="batched", h=h),
    "numerical_gradient-incremental": lambda net, x, t, h: net.numerical_gradient(x, t, method="incremental", h=h),
    "gradient_check": lambda net, x, t, h: gradient_check(net, x, t, h=h),
    "nets.gradient.numerical_gradient": lambda net, x, t, h: numerical_gradient(
        lambda w: net.loss(x, t), net.params["b2"], h=h
    ),
}


@pytest.mark.parametrize(
    ("h", "exc"),
    [
        (0, ValueError),
        (0.0, ValueError),
        (-1e-4, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (float("-inf"), ValueError),
        (None, TypeError),
        ([1e-4], TypeError),
        (1e-4j, TypeError),
        ("abc", TypeError),
        pytest.param("1e-4", TypeError),
        pytest.param(True, TypeError),
    ],
)
def test_bad_step_is_rejected_by_every_entry(make_net, h, exc):
    net = make_net()
    x, t = host_data()
    calls = {name: (lambda call=call: call(net, x, t, h)) for name, call in STEP_ENTRIES.items()}
    assert_every_entry_rejects(calls, exc, rf"h must be a positive finite number; got {re.escape(repr(h))}", net)


@pytest.mark.parametrize("method", ["Naive", "fast", "numerical", "", None, "backprop"])
def test_unknown_method_is_rejected(make_net, method):
    net = make_net()
    x, t = host_data()
    calls = {
        "net.numerical_gradient": lambda: net.numerical_gradient(x, t, method=method),
        "gradient_check": lambda: gradient_check(net, x, t, method=method),
    }
    match = rf"unknown method {re.escape(repr(method))}; valid: naive, batched, incremental"
    assert_every_entry_rejects(calls, ValueError, match, net)


@pytest.mark.parametrize(
    "make_x",
    [
        pytest.param(lambda xp: xp.arange(3), id="int64"),
        pytest.param(lambda xp: xp.ones(3, dtype=bool), id="bool"),
        pytest.param(lambda xp: xp.ones(3, dtype=complex), id="complex"),
        pytest.param(lambda xp: [1.0, 2.0], id="list"),
        pytest.param(lambda xp: 1.5, id="float"),
        pytest.param(lambda xp: np.ones(3, dtype=object), id="object"),
        pytest.param(
            lambda xp: xp.ones(3, dtype=xp.float16),
            id="float16",
        ),
    ],
)
def test_textbook_numerical_gradient_rejects_non_float_x(backend, make_x):
    x = make_x(backend.xp)
    with rejects(TypeError, r"x must be a .*float"):
        numerical_gradient(lambda a: float(backend.xp.sum(a * a)), x)


# ----------------------------------------------------------------------------- non-finite parameters


def _poison(net, where: str, value: float) -> None:
    """Put value into one parameter: 'W1-zero-feature' is W1's row of input feature 0 (zero in every sample)."""
    if where == "W1-zero-feature":
        net.params["W1"][0, 1] = value
    else:
        net.params[where][0] = value


def _zero_feature_data() -> tuple[np.ndarray, np.ndarray]:
    x, t = host_data()
    x[:, 0] = 0.0
    return x, t


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["W1-zero-feature", "b1", "b2"])
def test_numerical_gradients_reject_nonfinite_params(make_net, where, value):
    net = make_net()
    _poison(net, where, value)
    name = "W1" if where.startswith("W1") else where
    calls = entry_calls(net, *_zero_feature_data(), names=[*NUMERICAL, "gradient_check"])
    assert_every_entry_rejects(calls, ValueError, rf"params\['{name}'\] contains .*NaN or Inf", net)


@pytest.mark.parametrize("where", ["W1-zero-feature", "b1", "b2"])
def test_gradient_shows_nan_params(make_net, where):
    """gradient() is the hot path and does not scan the parameters: a NaN one must show in the result."""
    net = make_net()
    _poison(net, where, np.nan)
    grads = net.gradient(*_zero_feature_data())
    assert any(not np.isfinite(to_numpy(g)).all() for g in grads.values())


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("where", ["b1", "b2"])
def test_nan_parameter_makes_the_loss_nan(backend, activation, where):
    """A NaN every sample passes through must show in the loss: no backend may turn it into a number."""
    net = TwoLayerNet(IN, HIDDEN, OUT, activation=activation, weight_init_std=0.5, backend=backend.name)
    net.params[where][0] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's own NaN arithmetic warnings are fine here
        assert math.isnan(net.loss(*host_data()))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_activations_propagate_nonfinite_like_numpy(backend, kind, dtype):
    values = np.array([[np.nan, np.inf, -np.inf, 0.0, -0.0]], dtype=dtype)
    want = get_backend("numpy").kernels.activation_forward(kind, values)
    got = to_numpy(backend.kernels.activation_forward(kind, backend.asarray(values)))
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- layers and the Backend API


def _layer(kind: str, backend):
    if kind == "Affine":
        return Affine(backend.asarray(np.ones((2, 2))), backend.asarray(np.zeros(2)), backend)
    if kind == "SoftmaxWithLoss":
        return SoftmaxWithLoss(backend)
    return ACTIVATION_LAYERS[kind](backend)


LAYER_KINDS = ["Affine", *ACTIVATIONS, "SoftmaxWithLoss"]
LAYER_NAMES = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "leaky_relu": "LeakyRelu"}


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_backward_before_forward_is_rejected(backend, kind):
    layer = _layer(kind, backend)
    name = LAYER_NAMES.get(kind, kind)
    with rejects(RuntimeError, rf"{name}\.backward\(\) called before forward\(\)"):
        layer.backward() if kind == "SoftmaxWithLoss" else layer.backward(backend.asarray(np.ones((2, 2))))


def _wrong_case(name: str) -> list[str]:
    return sorted({name.upper(), name.capitalize(), f" {name}", f"{name} ", f"{name}\n"} - {name})


@pytest.mark.parametrize("where", ["GRADGAP_BACKEND", "argument", "net argument"])
def test_unknown_backend_names_are_rejected_with_the_valid_names(backend, monkeypatch, where):
    for bad in [*_wrong_case(backend.name), "NumPy", "cuda", "torch", "numpy,numba"]:
        if where == "GRADGAP_BACKEND":
            monkeypatch.setenv("GRADGAP_BACKEND", bad)
            calls = [get_backend, lambda: TwoLayerNet(IN, HIDDEN, OUT)]
        else:
            monkeypatch.delenv("GRADGAP_BACKEND", raising=False)
            net_call = lambda bad=bad: TwoLayerNet(IN, HIDDEN, OUT, backend=bad)  # noqa: E731
            calls = [lambda bad=bad: get_backend(bad)] if where == "argument" else [net_call]
        for call in calls:
            with rejects(UnknownBackendError, rf"unknown backend {re.escape(repr(bad))} .*; {VALID_BACKENDS}") as info:
                call()
            assert isinstance(info.value, ValueError)
            assert f"from the {where.removeprefix('net ')}" in str(info.value)


def test_empty_or_unset_backend_variable_means_numpy(monkeypatch):
    monkeypatch.setenv("GRADGAP_BACKEND", "")
    assert get_backend().name == "numpy"
    assert TwoLayerNet(IN, HIDDEN, OUT).backend.name == "numpy"
    monkeypatch.delenv("GRADGAP_BACKEND")
    assert get_backend().name == "numpy"
    assert get_backend("").name == "numpy"


def test_backend_variable_selects_and_an_argument_wins(backend, monkeypatch):
    monkeypatch.setenv("GRADGAP_BACKEND", backend.name)
    assert get_backend() is backend
    assert TwoLayerNet(IN, HIDDEN, OUT).backend is backend
    monkeypatch.setenv("GRADGAP_BACKEND", "NumPy")  # never read when an argument names the backend
    assert get_backend(backend.name) is backend
    assert MultiLayerNet(IN, [HIDDEN], OUT, backend=backend.name).backend is backend


@pytest.mark.parametrize("bad", [0, False])
def test_falsy_non_string_backend_name_is_rejected(monkeypatch, bad):
    monkeypatch.delenv("GRADGAP_BACKEND", raising=False)
    with rejects(UnknownBackendError, rf"unknown backend {bad!r}"):
        get_backend(bad)


def test_unknown_backend_names_list_every_known_backend():
    with rejects(UnknownBackendError, VALID_BACKENDS):
        get_backend("NumPy")
    assert BACKEND_NAMES == ("numpy", "numba", "cupy")


# ----------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: SGD(lr=0), ValueError, r"lr must be in \(0, inf\); got 0"),
        (lambda: SGD(lr=-0.1), ValueError, r"lr must be in \(0, inf\); got -0\.1"),
        (lambda: AdaGrad(lr=float("nan")), ValueError, r"lr must be in \(0, inf\); got nan"),
        (lambda: Adam(lr=float("inf")), ValueError, r"lr must be in \(0, inf\); got inf"),
        (lambda: SGD(lr="0.1"), TypeError, r"lr must be a number in \(0, inf\); got '0\.1'"),
        (lambda: SGD(lr=None), TypeError, r"lr must be a number in \(0, inf\); got None"),
        (lambda: SGD(lr=True), TypeError, r"lr must be a number in \(0, inf\); got True"),
        (lambda: Momentum(momentum=1.0), ValueError, r"momentum must be in \[0, 1\); got 1\.0"),
        (lambda: Momentum(momentum=-0.1), ValueError, r"momentum must be in \[0, 1\); got -0\.1"),
        (lambda: Momentum(momentum=float("nan")), ValueError, r"momentum must be in \[0, 1\); got nan"),
        (lambda: Adam(beta1=1.0), ValueError, r"beta1 must be in \[0, 1\); got 1\.0"),
        (lambda: Adam(beta1=-1e-9), ValueError, r"beta1 must be in \[0, 1\); got -1e-09"),
        (lambda: Adam(beta2=1.5), ValueError, r"beta2 must be in \[0, 1\); got 1\.5"),
        (lambda: RMSprop(decay_rate=1.0), ValueError, r"decay_rate must be in \(0, 1\); got 1\.0"),
        (lambda: get_optimizer("bogus"), ValueError, r"unknown optimizer 'bogus'; valid names: sgd, momentum, adagrad"),
        (lambda: get_optimizer(None), ValueError, r"unknown optimizer None; valid names"),
    ],
)
def test_bad_optimizer_settings_are_rejected(make, exc, match):
    with rejects(exc, match):
        make()


@pytest.mark.parametrize("name", ["sgd", "momentum", "adagrad", "rmsprop", "adam"])
def test_optimizer_rejects_grads_that_do_not_match_params(backend, name):
    net = TwoLayerNet(IN, HIDDEN, OUT, backend=backend.name)
    before = snapshot(net)
    grads = net.gradient(*host_data())
    optimizer = get_optimizer(name)
    with rejects(ValueError, r"grads must have the same keys as params; missing \['b2'\], unexpected \[\]"):
        optimizer.update(net.params, {k: v for k, v in grads.items() if k != "b2"})
    with rejects(ValueError, r"grads\['W2'\] has shape \(3, 4\); params\['W2'\] has \(4, 3\)"):
        optimizer.update(net.params, {**grads, "W2": grads["W2"].T})
    assert_params_unchanged(net, before)


# ----------------------------------------------------------------------------- odd but valid layouts


def with_layout(backend, a: np.ndarray, layout: str):
    """``a`` on the backend with the same values, in the given memory layout."""
    xp = backend.xp
    dev = backend.asarray(a)
    every = tuple(slice(None, None, 2) for _ in a.shape)
    backwards = tuple(slice(None, None, -1) for _ in a.shape)
    if layout == "contiguous":
        return xp.ascontiguousarray(dev)
    if layout == "fortran":
        return xp.asfortranarray(dev)
    if layout == "strided":
        big = xp.zeros(tuple(2 * n for n in a.shape), dtype=dev.dtype)
        big[every] = dev
        return big[every]
    if layout == "reversed":
        return xp.ascontiguousarray(dev[backwards])[backwards]
    if layout == "read-only":
        if not isinstance(dev, np.ndarray):
            pytest.skip(f"{backend.name} arrays have no read-only flag")
        dev = dev.copy()
        dev.flags.writeable = False
        return dev
    raise AssertionError(layout)


LAYOUTS = ["fortran", "strided", "reversed", "read-only"]
HOST = get_backend("numpy")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_any_x_layout_gives_the_same_results(make_net, layout):
    net = make_net()
    x, t = host_data()
    odd = with_layout(HOST, x, layout)
    assert not odd.flags.c_contiguous or layout == "read-only"
    for entry, call in ENTRIES.items():
        assert_identical(host(call(net, odd, t)), host(call(net, x, t)), f"{layout} x, {entry}")


T_LAYOUTS = {
    "labels-read-only": lambda t: with_layout(HOST, t, "read-only"),
    "labels-strided": lambda t: with_layout(HOST, t, "strided"),
    "labels-reversed": lambda t: with_layout(HOST, t, "reversed"),
    "labels-int32": lambda t: t.astype(np.int32),
    "labels-uint8": lambda t: t.astype(np.uint8),
    "labels-list": lambda t: t.tolist(),
    "onehot-float64": lambda t: _onehot(t),
    "onehot-float32": lambda t: _onehot(t, dtype=np.float32),
    "onehot-int8": lambda t: _onehot(t, dtype=np.int8),
    "onehot-fortran": lambda t: with_layout(HOST, _onehot(t), "fortran"),
    "onehot-strided": lambda t: with_layout(HOST, _onehot(t), "strided"),
    "onehot-read-only": lambda t: with_layout(HOST, _onehot(t), "read-only"),
}


@pytest.mark.parametrize("variant", list(T_LAYOUTS))
def test_any_t_form_gives_the_same_results(make_net, variant):
    net = make_net()
    x, t = host_data()
    odd = T_LAYOUTS[variant](t)
    for entry in LABELLED:
        assert_identical(host(ENTRIES[entry](net, x, odd)), host(ENTRIES[entry](net, x, t)), f"{variant}, {entry}")


def _layer_passes(backend, layout: str) -> dict[str, Any]:
    """Forward and backward of every layer class with every input array in ``layout``; host results."""
    rng = np.random.default_rng(3)
    x, W, b = rng.standard_normal((BATCH, IN)), rng.standard_normal((IN, OUT)), rng.standard_normal(OUT)
    dout, t = rng.standard_normal((BATCH, OUT)), host_data()[1]

    def on(a: np.ndarray):
        return with_layout(backend, a, layout)

    results = {}
    affine = Affine(on(W), on(b), backend)
    results["affine"] = (affine.forward(on(x)), affine.backward(on(dout)), affine.dW, affine.db)
    for cls in (Relu, Sigmoid, Tanh, LeakyRelu):
        layer = cls(backend)
        results[cls.__name__] = (layer.forward(on(x)), layer.backward(on(x[:, ::-1].copy())))
    for target in (t, _onehot(t)):
        loss_layer = SoftmaxWithLoss(backend)
        results[f"softmax-{target.ndim}d"] = (
            loss_layer.forward(on(x[:, :OUT] * 3), on(target)),
            loss_layer.backward(0.5),
        )
    return {k: tuple(to_numpy(v) for v in vs) for k, vs in results.items()}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layers_give_the_same_results_for_any_layout(backend, layout):
    want = _layer_passes(backend, "contiguous")
    got = _layer_passes(backend, layout)
    for name in want:
        for i, (g, w) in enumerate(zip(got[name], want[name], strict=True)):
            np.testing.assert_array_equal(g, w, err_msg=f"{layout}: {name} output {i}")


# ----------------------------------------------------------------------------- nothing mutated


def _copies(arrays: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: to_numpy(v).copy() for k, v in arrays.items()}


def assert_unchanged(arrays: dict[str, Any], before: dict[str, np.ndarray], context: str) -> None:
    for name, value in arrays.items():
        assert to_numpy(value).tobytes() == before[name].tobytes(), f"{context} changed {name}"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kernel_backwards_do_not_mutate_their_inputs(backend, dtype):
    rng = np.random.default_rng(4)
    k = backend.kernels

    def on(a: np.ndarray):
        return backend.asarray(a.astype(dtype) if a.dtype.kind == "f" else a)

    x, W = on(rng.standard_normal((BATCH, IN))), on(rng.standard_normal((IN, OUT)))
    dout, t = on(rng.standard_normal((BATCH, OUT))), on(host_data()[1])
    arrays = {"x": x, "W": W, "dout": dout, "t": t}
    before = _copies(arrays)
    for need_dx in (True, False):
        k.affine_backward(dout, x, W, need_dx)
        assert_unchanged(arrays, before, f"affine_backward(need_dx={need_dx})")
    for kind in ACTIVATIONS:
        y = k.activation_forward(kind, x)
        inputs = {**arrays, "y": y, "dx": on(rng.standard_normal((BATCH, IN)))}
        kept = _copies(inputs)
        k.activation_backward(kind, inputs["dx"], x, y)
        assert_unchanged(inputs, kept, f"activation_backward({kind!r})")
    for target in (t, on(_onehot(host_data()[1]))):
        loss, probs = k.softmax_cross_entropy(dout, target)
        inputs = {**arrays, "probs": probs, "target": target}
        kept = _copies(inputs)
        first = to_numpy(k.softmax_cross_entropy_backward(probs, target, 0.5))
        second = to_numpy(k.softmax_cross_entropy_backward(probs, target, 0.5))
        assert_unchanged(inputs, kept, f"softmax_cross_entropy_backward({target.ndim}-D target)")
        np.testing.assert_array_equal(first, second)


def test_kernel_numerical_gradients_do_not_mutate_their_inputs(backend):
    rng = np.random.default_rng(5)
    on = backend.asarray
    weights = [on(rng.standard_normal((IN, HIDDEN))), on(rng.standard_normal((HIDDEN, OUT)))]
    biases = [on(rng.standard_normal(HIDDEN)), on(rng.standard_normal(OUT))]
    x, t = host_data()
    x[:, 0] = 0.0  # an all-zero feature takes the shortcut paths too
    arrays = {"W1": weights[0], "W2": weights[1], "b1": biases[0], "b2": biases[1], "x": on(x), "t": on(t)}
    before = _copies(arrays)
    for method in ("batched", "incremental"):
        kernel = getattr(backend.kernels, f"numerical_gradient_{method}")
        kernel(GradientProblem(weights, biases, "tanh", 0.01, 0.1, 1e-4), arrays["x"], arrays["t"])
        assert_unchanged(arrays, before, f"numerical_gradient_{method}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_layers_do_not_mutate_inputs_or_their_cache(backend, dtype):
    rng = np.random.default_rng(6)

    def on(a: np.ndarray):
        return backend.asarray(a.astype(dtype) if a.dtype.kind == "f" else a)

    x, dout = on(rng.standard_normal((BATCH, IN))), on(rng.standard_normal((BATCH, IN)))
    W, b = on(rng.standard_normal((IN, IN))), on(rng.standard_normal(IN))
    t = on(np.array([0, 4, 2, 1, 3, 2]))
    arrays = {"x": x, "dout": dout, "W": W, "b": b, "t": t}
    before = _copies(arrays)
    layers = [Affine(W, b, backend), *(cls(backend) for cls in (Relu, Sigmoid, Tanh, LeakyRelu))]
    for layer in layers:
        layer.forward(x)
        first = to_numpy(layer.backward(dout))
        np.testing.assert_array_equal(to_numpy(layer.backward(dout)), first, err_msg=type(layer).__name__)
        assert_unchanged(arrays, before, type(layer).__name__)
    for target in (t, on(np.eye(IN)[to_numpy(t)])):
        loss_layer = SoftmaxWithLoss(backend)
        loss_layer.forward(x, target)
        cache = {"probs": loss_layer.probs}
        kept = _copies(cache)
        first = to_numpy(loss_layer.backward(1.0))
        np.testing.assert_array_equal(to_numpy(loss_layer.backward(1.0)), first)
        assert_unchanged({**arrays, **cache}, {**before, **kept}, f"SoftmaxWithLoss ({target.ndim}-D target)")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_net_methods_mutate_neither_inputs_nor_params(make_net, dtype):
    net = make_net(dtype)
    x, t = host_data(dtype)
    for target in (t, _onehot(t)):
        inputs = {"x": x, "t": target}
        kept, params = _copies(inputs), snapshot(net)
        for entry, call in ENTRIES.items():
            call(net, x, target)
            assert_unchanged(inputs, kept, entry)
            assert_params_unchanged(net, params)


# ----------------------------------------------------------------------------- +-1000


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_and_sigmoid_of_plus_minus_1000_are_finite_and_silent(backend, dtype):
    k = backend.kernels
    scores = backend.asarray(
        np.array([[1000.0, -1000.0, 0.0], [-1000.0, -1000.0, -1000.0], [1000, 1000, -1000]], dtype)
    )
    t = np.array([1, 0, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probs = to_numpy(k.softmax(scores))
        loss, probs_ce = k.softmax_cross_entropy(scores, backend.asarray(t))
        loss_onehot, _ = k.softmax_cross_entropy(scores, backend.asarray(_onehot(t, dtype=dtype)))
        layer = SoftmaxWithLoss(backend)
        layer_loss = layer.forward(scores, backend.asarray(t))
        dscores = to_numpy(layer.backward(1.0))
        activations = {}
        for cls in (Sigmoid, Tanh):
            act = cls(backend)
            activations[cls.__name__] = (to_numpy(act.forward(scores)), to_numpy(act.backward(scores)))
    want_probs = np.array([[1, 0, 0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0]])
    np.testing.assert_allclose(probs, want_probs, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(to_numpy(probs_ce), probs)
    want_loss = (2000 + math.log(3) + (2000 + math.log(2))) / 3  # -log p of the labels, by hand
    for value in (loss, loss_onehot, layer_loss):
        assert float(value) == pytest.approx(want_loss, rel=1e-6)
    np.testing.assert_allclose(dscores, (want_probs - _onehot(t)) / 3, rtol=1e-6, atol=1e-7)
    sig, dsig = activations["Sigmoid"]
    np.testing.assert_array_equal(sig[0], [1, 0, 0.5])
    np.testing.assert_array_equal(sig[2], [1, 1, 0])
    np.testing.assert_array_equal(dsig[0], [0, 0, 0])  # 1000 * (1 - 1) * 1, -1000 * (1 - 0) * 0, 0 * ... = 0
    tanh, _ = activations["Tanh"]
    np.testing.assert_array_equal(tanh[0], [1, -1, 0])
    for name, (fwd, bwd) in activations.items():
        assert np.isfinite(fwd).all() and np.isfinite(bwd).all(), name


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_net_on_extreme_inputs_is_finite_and_silent(backend, activation):
    """x of +-1000 through a net: huge scores, a finite loss and finite gradients, no warnings."""
    net = TwoLayerNet(IN, HIDDEN, OUT, activation=activation, weight_init_std=1.0, backend=backend.name)
    x = np.where(host_data()[0] > 0, 1000.0, -1000.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = net.loss(x, host_data()[1])
        grads = host(net.gradient(x, host_data()[1]))
    assert math.isfinite(loss)
    assert all(np.isfinite(g).all() for g in grads.values())
