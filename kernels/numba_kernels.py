"""Numba-JIT kernels: the kernel contract (kernels/__init__.py) with fused, compiled loops.

GEMMs stay in BLAS (numpy's matmul); what numba adds is fusion (one pass instead of several
temporaries) and, for the numerical gradient, a parallel loop over parameters that evaluates
every perturbed loss without recomputing what the perturbation cannot change.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import scipy.linalg  # noqa: F401  (loaded before threadpoolctl scans the BLAS libraries)
from numba import njit, prange
from threadpoolctl import ThreadpoolController

# numba's OpenMP threads would otherwise spin after each parallel region and starve the BLAS threads
# of the GEMM that follows (measured: a 100x784x50 GEMM 50x slower). Only read when libgomp starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from kernels import ACTIVATIONS, LEAKY_SLOPE  # noqa: E402
from kernels import _generic as g

# No nnan/ninf: a NaN loss must stay visible. "reassoc" lets reductions vectorise.
JIT = dict(cache=True, error_model="numpy", fastmath={"nsz", "arcp", "contract", "afn", "reassoc"})
_KIND_CODE = {kind: code for code, kind in enumerate(ACTIVATIONS)}  # relu 0, sigmoid 1, tanh 2, leaky 3

# The incremental kernel sums exp and log1p as power series of degree _SERIES_DEGREE where the
# remainder is provably below _SERIES_REMAINDER per sample (see _series_is_exact); else it
# evaluates expm1/log1p directly.
_SERIES_DEGREE = 4
_SERIES_REMAINDER = 2.0**-60


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
    if code == 0:
        for i in range(n):
            out[i] = 0.0 if x[i] <= 0 else x[i]  # NaN propagates, as in NumPy
    elif code == 1:
        _sigmoid_1d(x, out)
    elif code == 2:
        for i in range(n):
            out[i] = math.tanh(x[i])
    else:
        for i in range(n):
            out[i] = x[i] * alpha if x[i] <= 0 else x[i]


@njit(**JIT)
def _activation_backward_1d(code, dout, x, y, alpha, out):
    n = dout.size
    if code == 0:
        for i in range(n):
            out[i] = dout[i] if x[i] > 0 else 0.0
    elif code == 1:  # sigma'(x) = e / (1 + e)^2 with e = exp(-|x|): no cancellation where sigma saturates
        e = _exp_neg_abs(x, 1.0)
        for i in range(n):
            out[i] = dout[i] * (e[i] / ((1.0 + e[i]) * (1.0 + e[i])))
    elif code == 2:  # tanh'(x) = 4 e / (1 + e)^2 with e = exp(-2|x|), rather than 1 - y^2
        e = _exp_neg_abs(x, 2.0)
        for i in range(n):
            out[i] = dout[i] * (4.0 * e[i] / ((1.0 + e[i]) * (1.0 + e[i])))
    else:
        for i in range(n):
            out[i] = dout[i] if x[i] > 0 else dout[i] * alpha


def _flat(a):
    return np.ascontiguousarray(a).reshape(-1)


def activation_forward(kind, x, alpha=LEAKY_SLOPE):
    out = np.empty(x.shape, dtype=x.dtype)
    _activation_1d(_KIND_CODE[kind], _flat(x), x.dtype.type(alpha), out.reshape(-1))
    return out


def activation_backward(kind, dout, x, y, alpha=LEAKY_SLOPE):
    out = np.empty(dout.shape, dtype=dout.dtype)
    _activation_backward_1d(_KIND_CODE[kind], _flat(dout), _flat(x), _flat(y), dout.dtype.type(alpha), out.reshape(-1))
    return out


@njit(**JIT)
def _activation_with_derivative_1d(code, a, alpha, out, derivative):
    """out = f(a) and derivative = f'(a) in one sweep (sigmoid/tanh derivatives from exp(-|a|))."""
    n = a.size
    if code == 0:
        for i in range(n):
            out[i] = 0.0 if a[i] <= 0 else a[i]
            derivative[i] = 1.0 if a[i] > 0 else 0.0
    elif code == 1:
        e = _exp_neg_abs(a, 1.0)
        for i in range(n):
            r = 1.0 / (1.0 + e[i])
            q = e[i] * r
            out[i] = r if a[i] >= 0 else q
            derivative[i] = q * r
    elif code == 2:
        e = _exp_neg_abs(a, 2.0)
        for i in range(n):
            r = 1.0 / (1.0 + e[i])
            out[i] = math.tanh(a[i])
            derivative[i] = 4.0 * e[i] * r * r
    else:
        for i in range(n):
            out[i] = a[i] * alpha if a[i] <= 0 else a[i]
            derivative[i] = 1.0 if a[i] > 0 else alpha


def _activation_with_derivative(kind, a, alpha):
    out, derivative = np.empty_like(a), np.empty_like(a)
    _activation_with_derivative_1d(
        _KIND_CODE[kind], _flat(a), a.dtype.type(alpha), out.reshape(-1), derivative.reshape(-1)
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


@njit(parallel=True, **JIT)
def _set_losses(scores, labels, out):
    """Mean cross-entropy per parameter set. scores: (B, S, C)."""
    batch, sets, classes = scores.shape
    for s in prange(sets):
        total = 0.0
        for b in range(batch):
            top = scores[b, s, 0]
            for c in range(1, classes):
                top = max(top, scores[b, s, c])
            acc = 0.0
            for c in range(classes):
                acc += math.exp(scores[b, s, c] - top)
            total += math.log(acc) + top - scores[b, s, labels[b]]
        out[s] = total / batch


def _set_losses_py(scores, labels):
    out = np.empty(scores.shape[1])
    _set_losses(np.ascontiguousarray(scores), labels, out)
    return out


_OPS = g.Ops(
    xp=np,
    activation=activation_forward,
    set_losses=_set_losses_py,
    activation_with_derivative=_activation_with_derivative,
    softmax_cross_entropy_gradient=_softmax_cross_entropy_gradient_py,
)


def network_gradient(weights, biases, x, labels, activation, alpha=LEAKY_SLOPE):
    return g.network_gradient(np, _OPS, weights, biases, x, labels, activation, alpha)


def numerical_gradient_batched(weights, biases, x, labels, activation, alpha, weight_decay, h, progress=None):
    return g.numerical_gradient_batched(_OPS, weights, biases, x, labels, activation, alpha, weight_decay, h, progress)


@njit(**JIT)
def _activation_change(code, a, y, d, e, alpha):
    """f(a + d) - f(a) with y = f(a); e = expm1(d) for sigmoid, tanh(d) for tanh (exact identities)."""
    if code == 1:  # sigma(a + d) - sigma(a) = s (1 - s) (e^d - 1) / (1 + s (e^d - 1))
        return y * (1.0 - y) * e / (1.0 + y * e)
    if code == 2:  # tanh(a + d) - tanh(a) = (1 - t^2) tanh(d) / (1 + t tanh(d))
        return (1.0 - y * y) * e / (1.0 + y * e)
    moved = a + d
    if code == 0:
        return (0.0 if moved <= 0 else moved) - y
    return (moved * alpha if moved <= 0 else moved) - y


@njit(parallel=True, **JIT)
def _hidden_to_output_series(
    code, alpha, h, rows_z, row_ptr, row_samples, e_plus, e_minus, pre, post, moments, picked_w, out
):
    """Loss differences for weights feeding the last hidden layer, exp/log1p by short power series.

    Moving W[i, j] by +-h moves the hidden unit j of sample b by dz = f(a + d) - f(a), d = h z[b, i],
    and every score by dz * W_next[j, c]. With the base softmax p reused, the new log-sum-exp is
    lse + log1p(S), S = sum_c p_c expm1(dz w_c) = dz m1 + dz^2 m2 + dz^3 m3 + dz^4 m4, where
    m_k = sum_c p_c w_c^k / k! (moments[b, k-1, j]); log1p(S) = S - S^2/2 + S^3/3 - S^4/4. The caller
    checked that both remainders are below 2**-60 per sample. Samples with z[b, i] == 0 move nothing
    and are not visited. out[i, j] = sum over b of (loss change at +h) - (loss change at -h).
    """
    n_rows = row_ptr.size - 1
    hidden = pre.shape[1]
    for i in prange(n_rows):
        acc = np.zeros(hidden)
        for n in range(row_ptr[i], row_ptr[i + 1]):
            b = row_samples[n]
            d = h * rows_z[n]
            ep, em = e_plus[n], e_minus[n]
            for j in range(hidden):
                dzp = _activation_change(code, pre[b, j], post[b, j], d, ep, alpha)
                dzm = _activation_change(code, pre[b, j], post[b, j], -d, em, alpha)
                m1, m2, m3, m4 = moments[b, 0, j], moments[b, 1, j], moments[b, 2, j], moments[b, 3, j]
                sp = dzp * (m1 + dzp * (m2 + dzp * (m3 + dzp * m4)))
                sm = dzm * (m1 + dzm * (m2 + dzm * (m3 + dzm * m4)))
                lp = sp * (1.0 - sp * (0.5 - sp * (1.0 / 3.0 - sp * 0.25)))
                lm = sm * (1.0 - sm * (0.5 - sm * (1.0 / 3.0 - sm * 0.25)))
                acc[j] += (lp - lm) - (dzp - dzm) * picked_w[b, j]
        out[i, :] = acc


@njit(parallel=True, **JIT)
def _hidden_to_output_direct(
    code, alpha, h, rows_z, row_ptr, row_samples, e_plus, e_minus, pre, post, probs, w_next, labels, out
):
    """As _hidden_to_output_series, with expm1 and log1p evaluated directly (any step size)."""
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


_LIPSCHITZ = {"relu": 1.0, "sigmoid": 0.25, "tanh": 1.0, "leaky_relu": 1.0}


def _series_is_exact(activation, h, z_max, w_next):
    """True when the degree-4 exp and log1p series are exact to 2**-60 for every moved sample.

    |dz| <= L h max|z| (L: the activation's Lipschitz constant), so |dz w_c| <= U. The exp series
    remainder is at most U^5 e^U / 5!, and |S| <= e^U - 1 bounds the log1p remainder |S|^5 / (5 (1 - |S|)).
    """
    bound = _LIPSCHITZ[activation] * h * z_max * float(np.abs(w_next).max(initial=0.0))
    if bound >= 1e-2:
        return False
    s_max = math.expm1(bound)
    exp_tail = bound**5 * math.exp(bound) / 120
    log_tail = s_max**5 / (5 * (1 - s_max))
    return max(exp_tail, log_tail) <= _SERIES_REMAINDER


def _hidden_to_output(cache, weights, biases, labels, activation, alpha, h, layer):
    """Numba fast path of the generic hidden-layer differences when layer + 1 is the output layer."""
    z_in = cache.inputs[layer]
    batch, n_in = z_in.shape
    w_next = weights[layer + 1]
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
    pre, post = cache.pre[layer], cache.inputs[layer + 1]
    code = _KIND_CODE[activation]
    out = np.empty((n_in + 1, w_next.shape[0]))
    with _one_blas_thread():
        if _series_is_exact(activation, h, float(np.abs(z_in).max(initial=1.0)), w_next):
            powers = np.stack([w_next**k / math.factorial(k) for k in range(1, _SERIES_DEGREE + 1)])  # (4, H, C)
            moments = np.ascontiguousarray(np.einsum("bc,khc->bkh", cache.probs, powers))
            picked_w = np.ascontiguousarray(w_next[:, labels].T)
            _hidden_to_output_series(
                code, alpha, h, rows_z, row_ptr, row_samples, e_plus, e_minus, pre, post, moments, picked_w, out
            )
        else:
            _hidden_to_output_direct(
                code,
                alpha,
                h,
                rows_z,
                row_ptr,
                row_samples,
                e_plus,
                e_minus,
                pre,
                post,
                cache.probs,
                w_next,
                labels,
                out,
            )
    out /= 2 * h * batch
    return out[:n_in], out[n_in]


_INCREMENTAL_OPS = g.Ops(
    xp=np, activation=activation_forward, set_losses=_set_losses_py, hidden_to_output=_hidden_to_output
)


def numerical_gradient_incremental(weights, biases, x, labels, activation, alpha, weight_decay, h, progress=None):
    return g.numerical_gradient_incremental(
        _INCREMENTAL_OPS, weights, biases, x, labels, activation, alpha, weight_decay, h, progress
    )
