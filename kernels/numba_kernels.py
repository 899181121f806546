"""Numba-JIT kernels: the kernel contract (kernels/__init__.py) with fused, compiled loops.

GEMMs stay in BLAS (numpy's matmul); what numba adds is fusion (one pass instead of several
temporaries) and, for the numerical gradient, a parallel loop over parameters that evaluates
every perturbed loss without recomputing what the perturbation cannot change.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import numpy as np
from numba import njit, prange
from threadpoolctl import ThreadpoolController

# numba's OpenMP threads would otherwise spin after each parallel region and starve the BLAS threads
# of the GEMM that follows (measured: a 100x784x50 GEMM 50x slower). Only read when libgomp starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from kernels import LEAKY_SLOPE, xp_kernels  # noqa: E402
from kernels.activations import ACTIVATION_CODES, Activation

# No nnan/ninf: a NaN loss must stay visible. "reassoc" lets reductions vectorise.
JIT = dict(cache=True, error_model="numpy", fastmath={"nsz", "arcp", "contract", "afn", "reassoc"})
_KIND_CODE = ACTIVATION_CODES  # the one table (kernels.activations), shared with the CuPy kernels
# The compiled branches below read these (numba freezes them at compile time): never renumber the table.
_RELU, _SIGMOID, _TANH, _LEAKY_RELU = (ACTIVATION_CODES[k] for k in ("relu", "sigmoid", "tanh", "leaky_relu"))


@functools.cache
def _blas_controller() -> ThreadpoolController:
    return ThreadpoolController()


def _one_blas_thread():
    """Context manager: BLAS limited to one thread while numba's threads run."""
    return _blas_controller().limit(limits=1, user_api="blas")


# ----------------------------------------------------------------------------- elementwise


# exp by Cody-Waite range reduction and a degree-13 Taylor polynomial (error < 1e-15 relative on
# [-708, 709]) with the 2**k scale built from its bits, so that a loop of exps vectorises (LLVM
# only calls libm's scalar exp otherwise, about 4x slower here).
_LOG2E = 1.4426950408889634
_LN2_HI = 0.6931471803691238  # fdlibm's split of ln 2: k * _LN2_HI is exact for |k| < 2**20
_LN2_LO = 1.9082149292705877e-10
_EXP_MIN, _EXP_MAX = -708.0, 709.0


@njit(inline="always", **JIT)
def _exp_reduced(w):
    """(e**r, k) with w = k ln2 + r, |r| <= ln2 / 2; w must lie in [_EXP_MIN, _EXP_MAX]."""
    k = math.floor(w * _LOG2E + 0.5)
    r = (w - k * _LN2_HI) - k * _LN2_LO
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    return p * r + 1.0, k


@njit(**JIT)
def _exp_neg_abs(x, c):
    """exp(-c |x|) elementwise (float64, c > 0): never overflows; vectorised but for arguments < -708."""
    n = x.size
    out = np.empty(n)
    bits = np.empty(n, dtype=np.int64)
    for i in range(n):
        p, k = _exp_reduced(max(-c * abs(x[i]), _EXP_MIN))
        out[i] = p
        bits[i] = (np.int64(k) + 1023) << 52
    scale = bits.view(np.float64)
    for i in range(n):
        out[i] *= scale[i]
    for i in range(n):  # below e**-708 (rare): the exact scalar exp, subnormals and underflow to 0 included
        if -c * abs(x[i]) < _EXP_MIN:
            out[i] = math.exp(-c * abs(x[i]))
    return out


@njit(**JIT)
def _sigmoid_1d(x, out):
    """out = 1 / (1 + exp(-x)), as 1 / (1 + e) or e / (1 + e) with e = exp(-|x|) <= 1."""
    e = _exp_neg_abs(x, 1.0)
    for i in range(x.size):
        out[i] = (1.0 if x[i] >= 0 else e[i]) / (1.0 + e[i])


@njit(**JIT)
def _activation_1d(code, x, alpha, out):
    n = x.size
    if code == _RELU:
        for i in range(n):
            out[i] = 0.0 if x[i] <= 0 else x[i]  # NaN propagates, as in NumPy
    elif code == _SIGMOID:
        _sigmoid_1d(x, out)
    elif code == _TANH:
        for i in range(n):
            out[i] = math.tanh(x[i])
    elif code == _LEAKY_RELU:
        for i in range(n):
            out[i] = x[i] * alpha if x[i] <= 0 else x[i]


@njit(**JIT)
def _activation_backward_1d(code, dout, x, y, alpha, out):
    n = dout.size
    if code == _RELU:
        for i in range(n):
            out[i] = dout[i] if x[i] > 0 else 0.0
    elif code == _SIGMOID:  # sigma'(x) = e / (1 + e)^2 with e = exp(-|x|): no cancellation where sigma saturates
        e = _exp_neg_abs(x, 1.0)
        for i in range(n):
            out[i] = dout[i] * (e[i] / ((1.0 + e[i]) * (1.0 + e[i])))
    elif code == _TANH:  # tanh'(x) = 4 e / (1 + e)^2 with e = exp(-2|x|), rather than 1 - y^2
        e = _exp_neg_abs(x, 2.0)
        for i in range(n):
            out[i] = dout[i] * (4.0 * e[i] / ((1.0 + e[i]) * (1.0 + e[i])))
    elif code == _LEAKY_RELU:
        for i in range(n):
            out[i] = dout[i] if x[i] > 0 else dout[i] * alpha


def _flat(a):
    return np.ascontiguousarray(a).reshape(-1)


# A user-defined Activation's jitted scalar form, looped in compiled code. Not cached: a function
# taking another jitted function is compiled once per process for each form it is given.
@njit(error_model="numpy")
def _map_1d(form, x, out):
    for i in range(x.size):
        out[i] = form(x[i])


@njit(error_model="numpy")
def _scale_by_1d(form, dout, x, out):
    for i in range(x.size):
        out[i] = dout[i] * form(x[i])


def _custom_map(scalar_form, numpy_form, x):
    """scalar_form (a jitted scalar function) mapped over x, else numpy_form(x); x's shape and dtype."""
    if scalar_form is None:
        return np.asarray(numpy_form(x), dtype=x.dtype)
    out = np.empty(x.shape, dtype=x.dtype)
    _map_1d(scalar_form, _flat(x), out.reshape(-1))
    return out


def _custom_forward(activation: Activation, x):
    """f(x) by the Activation's jitted scalar form, else its NumPy form."""
    return _custom_map(activation.numba_forward, activation.forward, x)


def _custom_derivative(activation: Activation, x):
    """f'(x) by the Activation's jitted scalar form, else its NumPy form."""
    return _custom_map(activation.numba_derivative, activation.derivative, x)


def activation_forward(activation, x, alpha=LEAKY_SLOPE):
    if not isinstance(activation, str):
        return _custom_forward(activation, x)
    out = np.empty(x.shape, dtype=x.dtype)
    _activation_1d(_KIND_CODE[activation], _flat(x), x.dtype.type(alpha), out.reshape(-1))
    return out


def activation_backward(activation, dout, x, y, alpha=LEAKY_SLOPE):
    out = np.empty(dout.shape, dtype=dout.dtype)
    if not isinstance(activation, str):
        if activation.numba_derivative is None:
            return dout * np.asarray(activation.derivative(x), dtype=dout.dtype)
        _scale_by_1d(activation.numba_derivative, _flat(dout), _flat(x), out.reshape(-1))
        return out
    code = _KIND_CODE[activation]
    _activation_backward_1d(code, _flat(dout), _flat(x), _flat(y), dout.dtype.type(alpha), out.reshape(-1))
    return out


@njit(**JIT)
def _activation_with_derivative_1d(code, a, alpha, out, derivative):
    """out = f(a) and derivative = f'(a) in one sweep (sigmoid/tanh derivatives from exp(-|a|))."""
    n = a.size
    if code == _RELU:
        for i in range(n):
            out[i] = 0.0 if a[i] <= 0 else a[i]
            derivative[i] = 1.0 if a[i] > 0 else 0.0
    elif code == _SIGMOID:
        e = _exp_neg_abs(a, 1.0)
        for i in range(n):
            r = 1.0 / (1.0 + e[i])
            q = e[i] * r
            out[i] = r if a[i] >= 0 else q
            derivative[i] = q * r
    elif code == _TANH:
        e = _exp_neg_abs(a, 2.0)
        for i in range(n):
            r = 1.0 / (1.0 + e[i])
            out[i] = math.tanh(a[i])
            derivative[i] = 4.0 * e[i] * r * r
    elif code == _LEAKY_RELU:
        for i in range(n):
            out[i] = a[i] * alpha if a[i] <= 0 else a[i]
            derivative[i] = 1.0 if a[i] > 0 else alpha


def _activation_with_derivative(activation, a, alpha):
    if not isinstance(activation, str):
        return _custom_forward(activation, a), _custom_derivative(activation, a)
    out, derivative = np.empty_like(a), np.empty_like(a)
    _activation_with_derivative_1d(
        _KIND_CODE[activation], _flat(a), a.dtype.type(alpha), out.reshape(-1), derivative.reshape(-1)
    )
    return out, derivative


# ----------------------------------------------------------------------------- affine


@njit(**JIT)
def _add_row(out, b):
    rows, cols = out.shape
    for r in range(rows):
        for c in range(cols):
            out[r, c] += b[c]


@njit(**JIT)
def _column_sums(a, out):
    out[:] = 0.0
    rows, cols = a.shape
    for r in range(rows):
        for c in range(cols):
            out[c] += a[r, c]


def affine_forward(x, W, b):
    out = x @ W
    _add_row(out, b)
    return out


def affine_backward(dout, x, W, need_dx=True):
    dout = np.ascontiguousarray(dout)
    db = np.empty(dout.shape[1], dtype=dout.dtype)
    _column_sums(dout, db)
    return (dout @ W.T if need_dx else None), x.T @ dout, db


# ----------------------------------------------------------------------------- softmax + CE


@njit(**JIT)
def _softmax_rows(scores, probs, log_totals):
    """probs = softmax(scores) per row; log_totals[r] = log(sum(exp(scores[r] - max)))."""
    rows, cols = scores.shape
    for r in range(rows):
        top = scores[r, 0]
        for c in range(1, cols):
            top = max(top, scores[r, c])
        total = 0.0
        for c in range(cols):
            e = math.exp(scores[r, c] - top)
            probs[r, c] = e
            total += e
        inv = 1.0 / total
        for c in range(cols):
            probs[r, c] *= inv
        log_totals[r] = math.log(total) + top


@njit(**JIT)
def _cross_entropy_labels(scores, labels, log_totals):
    total = 0.0
    for r in range(scores.shape[0]):
        total += log_totals[r] - scores[r, labels[r]]
    return total / scores.shape[0]


@njit(**JIT)
def _cross_entropy_onehot(scores, target, log_totals):
    total = 0.0
    for r in range(scores.shape[0]):
        for c in range(scores.shape[1]):
            total += target[r, c] * (log_totals[r] - scores[r, c])
    return total / scores.shape[0]


def softmax(scores):
    scores = np.ascontiguousarray(scores)
    probs = np.empty_like(scores)
    _softmax_rows(scores, probs, np.empty(scores.shape[0], dtype=scores.dtype))
    return probs


def softmax_cross_entropy(scores, target):
    scores = np.ascontiguousarray(scores)
    probs = np.empty_like(scores)
    log_totals = np.empty(scores.shape[0], dtype=scores.dtype)
    _softmax_rows(scores, probs, log_totals)
    if target.ndim == 1:
        loss = _cross_entropy_labels(scores, target, log_totals)
    else:
        loss = _cross_entropy_onehot(scores, np.ascontiguousarray(target, dtype=scores.dtype), log_totals)
    return np.asarray(loss, dtype=scores.dtype), probs


@njit(**JIT)
def _ce_backward_labels(probs, labels, scale, out):
    for r in range(probs.shape[0]):
        for c in range(probs.shape[1]):
            out[r, c] = probs[r, c] * scale
        out[r, labels[r]] -= scale


@njit(**JIT)
def _ce_backward_onehot(probs, target, scale, out):
    for r in range(probs.shape[0]):
        for c in range(probs.shape[1]):
            out[r, c] = (probs[r, c] - target[r, c]) * scale


@njit(**JIT)
def _softmax_cross_entropy_gradient(scores, labels):
    """Mean cross-entropy; scores become (softmax - onehot) / B in place."""
    rows, cols = scores.shape
    scale = 1.0 / rows
    total_loss = 0.0
    for r in range(rows):
        top = scores[r, 0]
        for c in range(1, cols):
            top = max(top, scores[r, c])
        picked = scores[r, labels[r]] - top
        total = 0.0
        for c in range(cols):
            e = math.exp(scores[r, c] - top)
            scores[r, c] = e
            total += e
        total_loss += math.log(total) - picked
        inv = scale / total
        for c in range(cols):
            scores[r, c] *= inv
        scores[r, labels[r]] -= scale
    return total_loss / rows


def _softmax_cross_entropy_gradient_py(scores, labels):
    scores = np.ascontiguousarray(scores)
    loss = _softmax_cross_entropy_gradient(scores, labels)
    return np.asarray(loss, dtype=scores.dtype), scores


def softmax_cross_entropy_backward(probs, target, dout=1.0):
    out = np.empty(probs.shape, dtype=probs.dtype)
    scale = probs.dtype.type(dout / probs.shape[0])
    if target.ndim == 1:
        _ce_backward_labels(probs, target, scale, out)
    else:
        _ce_backward_onehot(probs, np.ascontiguousarray(target, dtype=probs.dtype), scale, out)
    return out


# ----------------------------------------------------------------------------- numerical gradient


@njit(parallel=True, cache=True, error_model="numpy")
def _set_losses(scores, labels, out):
    """Mean cross-entropy per parameter set. scores: (B, S, C).

    No fastmath: the batched method differences two of these losses, so the batch sum is
    compensated (Kahan, which reassociation would undo) and exp/log are libm's; a plain running
    sum put the result 2.2e-11 from the NumPy naive loop on the seed net.
    """
    batch, sets, classes = scores.shape
    for s in prange(sets):
        total = 0.0
        compensation = 0.0
        for b in range(batch):
            top = scores[b, s, 0]
            for c in range(1, classes):
                top = max(top, scores[b, s, c])
            acc = 0.0
            for c in range(classes):
                acc += math.exp(scores[b, s, c] - top)
            term = (math.log(acc) + top - scores[b, s, labels[b]]) - compensation
            moved = total + term
            compensation = (moved - total) - term
            total = moved
        out[s] = total / batch


def _set_losses_py(scores, labels):
    out = np.empty(scores.shape[1])
    _set_losses(np.ascontiguousarray(scores), labels, out)
    return out


_OPS = xp_kernels.Ops(
    xp=np,
    activation=activation_forward,
    set_losses=_set_losses_py,
    activation_with_derivative=_activation_with_derivative,
    softmax_cross_entropy_gradient=_softmax_cross_entropy_gradient_py,
)


def network_gradient(weights, biases, x, labels, activation, alpha=LEAKY_SLOPE):
    return xp_kernels.network_gradient(_OPS, weights, biases, x, labels, activation, alpha)


def numerical_gradient_batched(problem, x, labels, progress=None, kinks=None, select=None):
    return xp_kernels.numerical_gradient_batched(_OPS, problem, x, labels, progress, kinks, select)


@njit(**JIT)
def _activation_change(code, a, y, d, e, alpha):
    """f(a + d) - f(a) with y = f(a); e = expm1(d) for sigmoid, tanh(d) for tanh (exact identities)."""
    if code == _SIGMOID:  # sigma(a + d) - sigma(a) = s (1 - s) (e^d - 1) / (1 + s (e^d - 1))
        return y * (1.0 - y) * e / (1.0 + y * e)
    if code == _TANH:  # tanh(a + d) - tanh(a) = (1 - t^2) tanh(d) / (1 + t tanh(d))
        return (1.0 - y * y) * e / (1.0 + y * e)
    moved = a + d
    if code == _RELU:
        return (0.0 if moved <= 0 else moved) - y
    return (moved * alpha if moved <= 0 else moved) - y


@njit(parallel=True, **JIT)
def _hidden_to_output_direct(
    code, alpha, h, rows_z, row_ptr, row_samples, e_plus, e_minus, pre, post, probs, w_next, labels, out
):
    """Loss differences for weights feeding the last hidden layer, by direct evaluation.

    Moving W[i, j] by +-h moves hidden unit j of sample b by dz = f(a + d) - f(a), d = h z[b, i], and
    every score by dz * w_next[j, c]: with the base softmax p reused, the loss changes by
    log1p(sum_c p_c expm1(dz w_next[j, c])) - dz w_next[j, label]. Samples with z[b, i] == 0 move
    nothing and are not visited. out[i, j] = sum over b of (change at +h) - (change at -h).
    """
    n_rows = row_ptr.size - 1
    hidden = pre.shape[1]
    classes = probs.shape[1]
    for i in prange(n_rows):
        acc = np.zeros(hidden)
        for n in range(row_ptr[i], row_ptr[i + 1]):
            b = row_samples[n]
            d = h * rows_z[n]
            for j in range(hidden):
                dzp = _activation_change(code, pre[b, j], post[b, j], d, e_plus[n], alpha)
                dzm = _activation_change(code, pre[b, j], post[b, j], -d, e_minus[n], alpha)
                sp = 0.0
                sm = 0.0
                for c in range(classes):
                    sp += probs[b, c] * math.expm1(dzp * w_next[j, c])
                    sm += probs[b, c] * math.expm1(dzm * w_next[j, c])
                wy = w_next[j, labels[b]]
                acc[j] += (math.log1p(sp) - dzp * wy) - (math.log1p(sm) - dzm * wy)
        out[i, :] = acc


def _hidden_to_output(cache, weights, biases, labels, activation, alpha, h, layer, columns=None):
    """Numba fast path of the generic hidden-layer differences when layer + 1 is the output layer.

    columns: None (every unit) or a range of units; a unit's numbers do not depend on the others."""
    if not isinstance(activation, str):  # a user-defined Activation: the generic loop calls its forms
        return xp_kernels._hidden_layer_differences(
            _OPS, cache, weights, biases, labels, activation, alpha, h, layer, columns
        )
    z_in = cache.inputs[layer]
    batch, n_in = z_in.shape
    with_bias = np.concatenate([z_in.T, np.ones((1, batch))])  # (I + 1, B): the bias is an input of ones
    nonzero = with_bias != 0
    counts = nonzero.sum(axis=1)
    row_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    row_samples = np.nonzero(nonzero)[1].astype(np.int64)  # row-major: samples of row i, ascending
    rows_z = with_bias[nonzero]
    steps = h * rows_z
    if activation == "sigmoid":
        e_plus, e_minus = np.expm1(steps), np.expm1(-steps)
    elif activation == "tanh":
        e_plus = np.tanh(steps)
        e_minus = -e_plus
    else:
        e_plus = e_minus = np.zeros_like(steps)
    pre, post, w_next = cache.pre[layer], cache.inputs[layer + 1], weights[layer + 1]
    if columns is not None:
        units = slice(columns.start, columns.stop)
        pre, post, w_next = (np.ascontiguousarray(a) for a in (pre[:, units], post[:, units], w_next[units]))
    code = _KIND_CODE[activation]
    out = np.empty((n_in + 1, w_next.shape[0]))
    with _one_blas_thread():
        _hidden_to_output_direct(
            code, alpha, h, rows_z, row_ptr, row_samples, e_plus, e_minus, pre, post, cache.probs, w_next, labels, out
        )
    out /= 2 * h * batch
    return out[:n_in], out[n_in]


_INCREMENTAL_OPS = dataclasses.replace(_OPS, hidden_to_output=_hidden_to_output)


def numerical_gradient_incremental(problem, x, labels, progress=None, kinks=None, select=None):
    return xp_kernels.numerical_gradient_incremental(_INCREMENTAL_OPS, problem, x, labels, progress, kinks, select)


def numerical_gradient_series(problem, x, labels, progress=None, kinks=None, select=None):
    return xp_kernels.numerical_gradient_series(_SERIES_OPS, problem, x, labels, progress, kinks, select)


# ----------------------------------------------------------------------- series: the output-feeding and last layers
# The NumPy versions are kernels.xp_kernels._output_feeding_pair_series and _last_layer_coefficients (docs/series.md,
# sections 1-5). These fuse their (B, J, C) and (B, C) passes into serial compiled loops, the coefficients vectorised
# over the units: on two cores a parallel region costs more than this work saves, and its threads fight the BLAS
# threads of the GEMMs around it. The bounds use plain float64 math (_BOUND_JIT: no fastmath).
_BOUND_JIT = dict(cache=True, error_model="numpy")


@njit(inline="always", **_BOUND_JIT)
def _order_needed_scalar(ratio, bound, h, tail, max_order):
    """Smallest odd K with bound * ratio**(K + 2) <= tail * h (1 - ratio**2); max_order + 2 if none, as
    kernels.xp_kernels._order_needed. The powers by one multiplication per order (K is small, no pow)."""
    never = max_order + 2
    if not (ratio < 1.0) or not (bound < math.inf):
        return never
    if ratio == 0.0 or bound == 0.0:
        return 1
    budget = tail * (h * (1.0 - ratio * ratio))
    ratio_squared = ratio * ratio
    term = bound * ratio_squared * ratio
    K = 1
    while term > budget:
        K += 2
        if K > max_order:
            return never
        term *= ratio_squared
    return K


@njit(inline="always", **_BOUND_JIT)
def _loss_bound_order(exponent, ratio, h, tail, max_order):
    """_order_needed_scalar(ratio, M, ...) for the loss bound M = -log(1 - expm1(x)), x = exponent >= 0, as
    xp_kernels computes it, without its two transcendentals unless they decide: for 0 <= x < 0.6 M lies between
    the rational brackets below, and an order that the upper one passes while the lower one fails every
    smaller order is M's order (the test is monotone in M)."""
    if not (exponent < 0.6) or not (ratio < 1.0) or ratio == 0.0:
        return _order_needed_scalar(ratio, -math.log1p(-math.expm1(exponent)), h, tail, max_order)
    s_high = 2.0 * exponent / (2.0 - exponent)  # >= expm1(x): e^x <= (2 + x) / (2 - x) for 0 <= x < 2
    high = s_high + s_high * s_high / (2.0 * (1.0 - s_high))  # >= -log(1 - s) = sum_k s^k / k for 0 <= s < 1
    s_low = exponent + 0.5 * exponent * exponent  # <= expm1(x)
    low = s_low + 0.5 * s_low * s_low  # <= -log(1 - s)
    budget = tail * (h * (1.0 - ratio * ratio))
    ratio_squared = ratio * ratio
    term_high = high * ratio_squared * ratio
    term_low = low * ratio_squared * ratio
    K = 1
    while term_high > budget:
        if term_low <= budget:  # the brackets disagree at this order: M decides
            return _order_needed_scalar(ratio, -math.log1p(-math.expm1(exponent)), h, tail, max_order)
        K += 2
        if K > max_order:
            return max_order + 2
        term_high *= ratio_squared
        term_low *= ratio_squared
    return K


@njit(**_BOUND_JIT)
def _output_feeding_needed(code, theta, f2, loss_radius, h, tail, max_order, z, slope, w_next, labels, rho, needed):
    """needed[b, j]: the order the bound of the output-feeding layer asks for (as in xp_kernels). Returns the largest
    of them up to max_order (at least 1): the order to carry."""
    batch, units = z.shape
    classes = w_next.shape[1]
    widest = np.empty((classes, units))  # [t, j]: max_c |w_next[j, c] - w_next[j, t]|, by label
    for j in range(units):
        for t in range(classes):
            wt = w_next[j, t]
            spread = 0.0
            for c in range(classes):
                spread = max(spread, abs(w_next[j, c] - wt))
            widest[t, j] = spread
    kinked = code == _RELU or code == _LEAKY_RELU
    curvature = 0.0 if kinked else 0.5 * f2
    limit = math.inf if kinked else theta
    exponent = np.empty(units)
    ratio = np.empty(units)
    order = 1
    for b in range(batch):
        t = labels[b]
        for j in range(units):  # vectorised: the radius, the exponent of the bound, the step over the radius
            a = abs(slope[b, j]) * widest[t, j]
            c = curvature * widest[t, j]
            reach = min(rho[b], abs(z[b, j])) if kinked else rho[b]
            denominator = a + math.sqrt(a * a + 4.0 * c * loss_radius)
            radius = min(2.0 * loss_radius / denominator, limit)
            exponent[j] = a * radius + c * radius * radius
            ratio[j] = reach / radius if denominator != 0.0 else -1.0  # else d = 0 or f' = 0, no curvature: K = 1
        for j in range(units):
            K = 1 if ratio[j] < 0.0 else _loss_bound_order(exponent[j], ratio[j], h, tail, max_order)
            needed[b, j] = K
            if K <= max_order:
                order = max(order, K)
    return order


@njit(**JIT)
def _output_feeding_coefficients(code, order, probs, w_next, labels, y0, slope, out):
    """out[n - 1, b, j]: Taylor coefficient n of g(u) = phi(y(u)) (phi: cumulants of w - w_t under p)."""
    batch, units = y0.shape
    classes = w_next.shape[1]
    inverse = np.empty(order + 2)
    for n in range(1, order + 2):
        inverse[n] = 1.0 / n
    # [t, c, n - 1, j]: d^n / n! with d = w_next[j, c] - w_next[j, t]: the moments E of a sample with label t are
    # one vector-matrix product of its p with table[t] (C, K J)
    table = np.empty((classes, classes, order, units))
    for t in range(classes):
        for c in range(classes):
            for j in range(units):
                table[t, c, 0, j] = w_next[j, c] - w_next[j, t]
            for n in range(1, order):
                scale = inverse[n + 1]
                for j in range(units):
                    table[t, c, n, j] = table[t, c, n - 1, j] * (table[t, c, 0, j] * scale)
    E = np.empty((order, units))  # row n - 1: E_n = sum_c p_c d_c^n / n!
    phi = np.empty((order + 1, units))  # phi_n: the cumulants / n!
    y = np.empty((order + 1, units))  # y_n: the unit's change f(z + u) - f(z)
    G = np.empty((order + 1, units))  # f' = G(f) as a series
    power = np.empty((order + 1, units))  # coefficients of y^m
    nxt = np.empty((order + 1, units))
    term = np.empty(units)
    cross = np.empty(units)
    kinked = code == _RELU or code == _LEAKY_RELU
    moments = E.reshape(-1)
    for b in range(batch):
        rows = table[labels[b]].reshape(classes, -1)
        moments[:] = 0.0
        for c in range(classes):
            p = probs[b, c]
            for k in range(moments.size):
                moments[k] += p * rows[c, k]
        for n in range(1, order + 1):  # log: phi_n = E_n - sum_(k<n) (k/n) phi_k E_(n-k)
            for j in range(units):
                phi[n, j] = E[n - 1, j]
            for k in range(1, n):
                weight = k * inverse[n]
                for j in range(units):
                    phi[n, j] -= weight * phi[k, j] * E[n - k - 1, j]
        if kinked:  # y(u) = f'(z) u exactly below the kink
            for j in range(units):
                term[j] = slope[b, j]
            for n in range(1, order + 1):
                for j in range(units):
                    out[n - 1, b, j] = phi[n, j] * term[j]
                    term[j] *= slope[b, j]
            continue
        # y(u) = f(z + u) - f(z): n y_n = G_(n-1), G = f'(f) as a series
        for j in range(units):
            G[0, j] = slope[b, j]
        for n in range(1, order + 1):
            for j in range(units):
                y[n, j] = G[n - 1, j] / n
            if n < order:
                cross[:] = 0.0
                for i in range(1, n):
                    for j in range(units):
                        cross[j] += y[i, j] * y[n - i, j]
                for j in range(units):
                    f0 = y0[b, j]
                    if code == _TANH:
                        G[n, j] = -(2.0 * f0 * y[n, j] + cross[j])
                    else:
                        G[n, j] = y[n, j] * (1.0 - 2.0 * f0) - cross[j]
        for n in range(1, order + 1):  # g = sum_m phi_m y^m
            for j in range(units):
                out[n - 1, b, j] = phi[1, j] * y[n, j]
                power[n, j] = y[n, j]
        for m in range(2, order + 1):
            for n in range(m, order + 1):
                for j in range(units):
                    nxt[n, j] = 0.0
                for k in range(m - 1, n):
                    for j in range(units):
                        nxt[n, j] += power[k, j] * y[n - k, j]
            for n in range(m, order + 1):
                for j in range(units):
                    power[n, j] = nxt[n, j]
                    out[n - 1, b, j] += phi[m, j] * power[n, j]


def _output_feeding_series(cache, derivatives, weights, labels, activation, layer, cols, rho, h):
    """Numba form of kernels.xp_kernels._output_feeding_pair_series (same arguments, same results)."""
    if activation not in (*xp_kernels.SERIES_STRIPS, *xp_kernels._KINKED):
        return xp_kernels._output_feeding_pair_series(
            np, cache, derivatives, weights, labels, activation, layer, cols, rho, h
        )
    code = _KIND_CODE[activation]
    theta, f2 = xp_kernels.SERIES_STRIPS.get(activation, (math.inf, 0.0))
    w_next = np.ascontiguousarray(weights[layer + 1][cols])
    z = np.ascontiguousarray(cache.pre[layer][:, cols])
    slope = np.ascontiguousarray(derivatives[layer][:, cols])
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    needed = np.empty(z.shape)
    order = _output_feeding_needed(
        code,
        theta,
        f2,
        xp_kernels._LOSS_RADIUS,
        h,
        xp_kernels.SERIES_TAIL,
        xp_kernels.SERIES_MAX_ORDER,
        z,
        slope,
        w_next,
        labels,
        rho,
        needed,
    )
    out = np.empty((order,) + z.shape)
    y0 = np.ascontiguousarray(cache.inputs[layer + 1][:, cols])
    _output_feeding_coefficients(code, order, cache.probs, w_next, labels, y0, slope, out)
    inverse_radius = None
    if activation in xp_kernels._KINKED:
        with np.errstate(divide="ignore"):
            inverse_radius = 1.0 / np.abs(z)
    return list(out), needed, inverse_radius


@njit(**_BOUND_JIT)
def _last_layer_order(h, tail, max_order, z, probs):
    """The order the last layer's bound asks for (kernels.xp_kernels._last_layer_coefficients): the largest
    over the (sample, class) pairs, or max_order + 2 when some pair needs more than max_order."""
    batch, classes = probs.shape
    bound = math.log(2.0)
    order = 1
    for b in range(batch):
        largest = 1.0
        for j in range(z.shape[1]):
            largest = max(largest, abs(z[b, j]))
        rho = h * largest  # max |u| over the inputs and the bias
        for c in range(classes):
            radius = math.log1p(0.5 / probs[b, c])
            ratio = rho / radius if math.isfinite(radius) else 0.0
            K = _order_needed_scalar(ratio, bound, h, tail, max_order)
            if K > max_order:
                return max_order + 2
            order = max(order, K)
    return order


@njit(**JIT)
def _last_layer_coefficient_series(probs, labels, out):
    """out[n - 1]: L_n = E_n - sum_(k<n) (k/n) L_k E_(n-k) with E_n = p / n!, then L_1[b, t] -= 1. (B, C) each."""
    order, batch, classes = out.shape
    factorial = np.empty(order + 1)
    factorial[0] = 1.0
    for n in range(1, order + 1):
        factorial[n] = factorial[n - 1] * n
    for b in range(batch):
        for c in range(classes):
            p = probs[b, c]
            for n in range(1, order + 1):
                value = p / factorial[n]
                for k in range(1, n):
                    value -= (k / n) * out[k - 1, b, c] * (p / factorial[n - k])
                out[n - 1, b, c] = value
        out[0, b, labels[b]] -= 1.0


def _last_layer_coefficients(cache, labels, h):
    """Numba form of kernels.xp_kernels._last_layer_coefficients (same arguments, same results)."""
    z, probs = np.ascontiguousarray(cache.inputs[-1]), np.ascontiguousarray(cache.probs)
    order = _last_layer_order(h, xp_kernels.SERIES_TAIL, xp_kernels.SERIES_MAX_ORDER, z, probs)
    if order > xp_kernels.SERIES_MAX_ORDER:
        return None
    out = np.empty((order,) + probs.shape)
    _last_layer_coefficient_series(probs, np.ascontiguousarray(labels, dtype=np.int64), out)
    return list(out)


@njit(**JIT)
def _stacked_step_powers(a, h, have, out):
    """Blocks have.. of kernels.xp_kernels._stacked_steps's buffer out (count B, I + 1), the earlier ones in place
    (none when have = 0): block k is (h a)^(2k+1) with h^(2k+1) in the last column, in xp_kernels' rounding."""
    batch, n_in = a.shape
    count = out.shape[0] // batch
    for b in range(batch):
        if have == 0:
            for i in range(n_in):
                out[b, i] = h * a[b, i]
            out[b, n_in] = h
        for k in range(max(have, 1), count):
            for i in range(n_in + 1):
                step = out[b, i]
                out[k * batch + b, i] = out[(k - 1) * batch + b, i] * (step * step)


def _stacked_steps(a, h, count, stacked=None):
    """Numba form of kernels.xp_kernels._stacked_steps (same arguments, less xp; same results)."""
    batch = a.shape[0]
    have = 0 if stacked is None else stacked.shape[0] // batch
    if have >= count:
        return stacked
    grown = np.empty((count * batch, a.shape[1] + 1))
    if have:
        grown[: have * batch] = stacked
    _stacked_step_powers(np.ascontiguousarray(a, dtype=np.float64), h, have, grown)
    return grown


@njit(parallel=True, cache=True, error_model="numpy")
def _next_layer_inverse_radius_loop(slope, w_abs, magnitude, out):
    """out[b, j] = |slope[b, j]| max_q w_abs[j, q] / magnitude[b, q]; inf where some magnitude[b, q] = 0 meets
    w_abs[j, q] > 0 with slope[b, j] != 0 (the terms and the zero test of kernels.xp_kernels's NumPy form)."""
    batch, units = slope.shape
    width = w_abs.shape[1]
    for b in prange(batch):
        inverse = np.empty(width)
        zero = np.zeros(width, dtype=np.bool_)
        for q in range(width):
            if magnitude[b, q] > 0:
                inverse[q] = 1.0 / magnitude[b, q]
            else:
                inverse[q] = 0.0
                zero[q] = True
        any_zero = False
        for q in range(width):
            any_zero = any_zero or zero[q]
        for j in range(units):
            s = abs(slope[b, j])
            best = 0.0
            for q in range(width):
                best = max(best, w_abs[j, q] * inverse[q])
            touched = False
            if any_zero:
                for q in range(width):
                    touched = touched or (zero[q] and w_abs[j, q] > 0)
            out[b, j] = math.inf if (touched and s != 0) else s * best


@njit(parallel=True, cache=True, error_model="numpy")
def _direction_needed(V, probs, labels, rho, inverse_radius, loss_radius, h, tail, max_order, needed):
    """needed[b, j]: the order the relu/leaky bound asks for along V[b, j] (xp_kernels._piecewise_pair_series)."""
    batch, units, classes = V.shape
    for b in prange(batch):
        t = labels[b]
        for j in range(units):
            vt = V[b, j, t]
            widest = 0.0
            for c in range(classes):
                widest = max(widest, abs(V[b, j, c] - vt))
            if widest == 0.0:
                needed[b, j] = 1
                continue
            radius = loss_radius / widest
            spread = 0.0  # expm1(R |d|) <= R |d| / (2 ln 1.5) on R |d| <= ln 1.5: zeta <= mean_p |d| / (2 max |d|)
            for c in range(classes):
                spread += probs[b, c] * abs(V[b, j, c] - vt)
            bound = -math.log1p(-(0.5 * spread / widest))
            inverse = inverse_radius[b, j]
            reach = min(rho[b], 1.0 / inverse if inverse > 0 else math.inf)
            needed[b, j] = _order_needed_scalar(reach / radius, bound, h, tail, max_order)


@njit(parallel=True, **JIT)
def _direction_coefficients(V, probs, labels, order, out):
    """out[n - 1, b, j]: Taylor coefficient n of log sum_c p_c exp(u (V[b, j, c] - V[b, j, t])) (the cumulants)."""
    batch, units, classes = V.shape
    inverse = np.empty(order + 2)
    for n in range(1, order + 2):
        inverse[n] = 1.0 / n
    for b in prange(batch):
        t = labels[b]
        spread = np.empty(classes)
        term = np.empty(classes)
        E = np.empty(order + 1)
        phi = np.empty(order + 1)
        for j in range(units):
            vt = V[b, j, t]
            for c in range(classes):
                spread[c] = V[b, j, c] - vt
                term[c] = probs[b, c] * spread[c]
            for n in range(1, order + 1):
                acc = 0.0
                for c in range(classes):
                    acc += term[c]
                E[n] = acc
                value = acc
                for k in range(1, n):
                    value -= (k * inverse[n]) * phi[k] * E[n - k]
                phi[n] = value
                out[n - 1, b, j] = value
                if n < order:
                    scale = inverse[n + 1]
                    for c in range(classes):
                        term[c] *= spread[c] * scale


def _direction_series(V, probs, labels, rho, inverse_radius, h):
    """Numba form of the relu/leaky loss series of kernels.xp_kernels._piecewise_pair_series: (coefficients, needed)."""
    V = np.ascontiguousarray(V)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    needed = np.empty(V.shape[:2], dtype=np.int64)
    _direction_needed(
        V,
        probs,
        labels,
        rho,
        np.ascontiguousarray(inverse_radius),
        xp_kernels._LOSS_RADIUS,
        h,
        xp_kernels.SERIES_TAIL,
        xp_kernels.SERIES_MAX_ORDER,
        needed,
    )
    order = int(needed[needed <= xp_kernels.SERIES_MAX_ORDER].max(initial=1))
    out = np.empty((order,) + V.shape[:2])
    _direction_coefficients(V, probs, labels, order, out)
    return list(out), needed.astype(np.float64)


def _next_layer_inverse_radius(slope, W_next, z):
    """Numba form of kernels.xp_kernels._next_layer_inverse_radius (same values)."""
    out = np.empty(slope.shape)
    _next_layer_inverse_radius_loop(
        np.ascontiguousarray(slope), np.ascontiguousarray(np.abs(W_next)), np.ascontiguousarray(np.abs(z)), out
    )
    return out


_SERIES_OPS = dataclasses.replace(
    _OPS,
    output_feeding_series=_output_feeding_series,
    next_layer_inverse_radius=_next_layer_inverse_radius,
    direction_series=_direction_series,
    last_layer_coefficients=_last_layer_coefficients,
    stacked_steps=_stacked_steps,
)
