"""CuPy kernels: the kernel contract (see kernels/__init__.py) on an NVIDIA GPU.

Imported only by backends/cupy_backend.py, after cupy imported and a CUDA device was found.
Affine maps are cuBLAS GEMMs (cupy matmul); activations are ElementwiseKernels; softmax +
cross-entropy is one fused launch that leaves the loss on the device as a 0-d array; the two
numerical-gradient methods run on the device without a host round trip per step.

Every kernel here is compiled with ``--fmad=false``: a product followed by a sum is rounded twice, as
NumPy rounds it, so float64 results match the NumPy reference to the last few bits, and nothing
accumulates with atomics: repeated calls give bit-identical results.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import cupy
import numpy as np

from kernels import LEAKY_SLOPE, GradientProblem, xp_kernels
from kernels import _cupy_backprop as _backprop
from kernels.activations import ACTIVATION_CODES, Activation

Array = Any  # cupy.ndarray

_OPTIONS = ("--fmad=false",)
_THREADS = 128  # threads per block of the one-thread-per-row / per-parameter kernels
_XENT_BLOCK = 512  # threads of the single block of the fused softmax + cross-entropy kernel
_MAX_CHUNK_BYTES = 2 * 2**30  # cap on one chunk's working set in the numerical-gradient methods
_ACTIVATION_CODES = ACTIVATION_CODES  # the one table (kernels.activations), shared with the Numba kernels
_ACTIVATION_CALLS = {
    "relu": "gg_relu(x)",
    "sigmoid": "gg_sigmoid(x)",
    "tanh": "tanh(x)",
    "leaky_relu": "gg_leaky_relu(x, alpha)",
}

# Activations shared by the elementwise kernels and the raw ones, so both round alike. gg_activation's
# switch is generated from the code table, so the raw kernels and the Python side cannot disagree.
_ACTIVATION_SOURCE = r"""
template <typename F> __device__ __forceinline__ F gg_relu(F x) { return x < F(0) ? F(0) : x; }
template <typename F> __device__ __forceinline__ F gg_sigmoid(F x) {
    const F e = exp(-fabs(x));  // in [0, 1]: no overflow for any x, +-1000 included
    return x >= F(0) ? F(1) / (F(1) + e) : e / (F(1) + e);
}
template <typename F> __device__ __forceinline__ F gg_leaky_relu(F x, F alpha) { return x > F(0) ? x : x * alpha; }
__device__ __forceinline__ double gg_activation(int code, double x, double alpha) {
    switch (code) {  // codes: kernels.activations.ACTIVATION_CODES
GG_ACTIVATION_CASES
        default: return __longlong_as_double(0x7ff8000000000000LL);  // not a code: NaN, never a wrong activation
    }
}
""".replace(
    "GG_ACTIVATION_CASES",
    "\n".join(f"        case {ACTIVATION_CODES[name]}: return {call};" for name, call in _ACTIVATION_CALLS.items()),
)

_RAW_SOURCE = r"""
// Softmax of one row s (n_classes) into p; returns sum(exp(s - max)) and sets *row_max.
template <typename F>
__device__ F gg_softmax_row(const F* s, F* p, int n_classes, F* row_max) {
    F m = s[0];
    for (int c = 1; c < n_classes; ++c) m = s[c] > m ? s[c] : m;
    F total = F(0);
    for (int c = 0; c < n_classes; ++c) {
        const F e = exp(s[c] - m);
        p[c] = e;
        total += e;
    }
    for (int c = 0; c < n_classes; ++c) p[c] = p[c] / total;
    *row_max = m;
    return total;
}

// probs = softmax(scores) row by row, one thread per row.
template <typename F>
__global__ void gg_softmax(const F* scores, F* probs, long long n_rows, int n_classes) {
    const long long r = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (r >= n_rows) return;
    F row_max;
    gg_softmax_row(scores + r * n_classes, probs + r * n_classes, n_classes, &row_max);
}

// Softmax and mean cross-entropy in one launch of one block of GG_XENT_BLOCK threads: thread t takes
// rows t, t + GG_XENT_BLOCK, ... in order, then a fixed tree adds the per-thread sums (no atomics).
template <typename F>
__global__ void gg_softmax_xent(const F* scores, const long long* labels, F* probs, F* loss,
                                long long n_rows, int n_classes) {
    __shared__ double partial[GG_XENT_BLOCK];
    double local = 0.0;
    for (long long r = threadIdx.x; r < n_rows; r += GG_XENT_BLOCK) {
        const F* s = scores + r * n_classes;
        F row_max;
        const F total = gg_softmax_row(s, probs + r * n_classes, n_classes, &row_max);
        local += (double)(log(total) - (s[labels[r]] - row_max));
    }
    partial[threadIdx.x] = local;
    __syncthreads();
    for (int half = GG_XENT_BLOCK / 2; half > 0; half /= 2) {
        if ((int)threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) loss[0] = (F)(partial[0] / (double)n_rows);
}

// Cross-entropy of each row r of scores (n_rows, n_classes) against labels[(r / repeat) % n_labels]:
// rows (n_labels, repeat) or (repeat', n_labels) of per-sample scores with repeat = 1.
__global__ void gg_row_xent(const double* scores, const long long* labels, double* out,
                            long long n_rows, int n_classes, long long n_labels, long long repeat) {
    const long long r = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (r >= n_rows) return;
    const double* s = scores + r * n_classes;
    double m = s[0];
    for (int c = 1; c < n_classes; ++c) m = s[c] > m ? s[c] : m;
    double total = 0.0;
    for (int c = 0; c < n_classes; ++c) total += exp(s[c] - m);
    out[r] = log(total) - (s[labels[(r / repeat) % n_labels]] - m);
}

// Last layer W (n_in, n_classes) and b: grad[i, j] = (sum_b loss(+h) - loss(-h)) / denom, one thread
// per parameter, i == n_in standing for the bias (an input of ones). W[i, j] += d with d = h z[b, i]
// moves score j of sample b by d: its log-sum-exp becomes lse + log1p(p[b, j] expm1(d)) (the base
// softmax reused) and the picked score moves by d when j is the label. The batch is summed in order.
__global__ void gg_last_layer_diff(const double* z, const double* probs, const long long* labels, double* grad,
                                   int batch, int n_in, int n_classes, double h, double denom) {
    const long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (k >= (long long)(n_in + 1) * n_classes) return;
    const int i = (int)(k / n_classes), j = (int)(k % n_classes);
    double acc = 0.0;
    for (int b = 0; b < batch; ++b) {
        const double input = i == n_in ? 1.0 : z[(long long)b * n_in + i];
        if (input == 0.0) continue;  // d = 0: both terms are exactly 0
        const double d = h * input, p = probs[(long long)b * n_classes + j];
        acc += log1p(p * expm1(d)) - log1p(p * expm1(-d));
        if (labels[b] == j) acc -= 2.0 * d;
    }
    grad[k] = acc / denom;
}

// Loss change of one sample when unit j's activation moves by dz: its scores move by dz * w (w = row j
// of the output layer's W, n_classes), so the log-sum-exp moves by log1p(sum_c p[c] expm1(dz w[c])),
// p being the base softmax, and the picked score by dz w[label].
__device__ __forceinline__ double gg_output_change(double dz, const double* w, const double* p, long long label,
                                                   int n_classes) {
    double moved = 0.0;
    for (int c = 0; c < n_classes; ++c) moved += p[c] * expm1(dz * w[c]);
    return log1p(moved) - dz * w[label];
}

// Hidden layer feeding the output layer: W (n_in, n_out) and b, one thread per parameter (i, j),
// i == n_in for the bias. W[i, j] += step (step = h z_in[b, i]) changes only unit j's activation, by
// act(pre[b, j] + step) - act_out[b, j]. Samples whose input is 0 change nothing and are skipped; the
// batch is summed in order. pre, act_out: (batch, n_out) pre-activation and activation of the base pass.
__global__ void gg_hidden_to_output_diff(const double* z_in, const double* pre, const double* act_out,
                                         const double* w_next, const double* probs, const long long* labels,
                                         double* grad, int batch, int n_in, int n_out, int n_classes, int code,
                                         double alpha, double h, double denom) {
    const long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (k >= (long long)(n_in + 1) * n_out) return;
    const int i = (int)(k / n_out), j = (int)(k % n_out);
    const double* w = w_next + (long long)j * n_classes;
    double acc = 0.0;
    for (int b = 0; b < batch; ++b) {
        const double input = i == n_in ? 1.0 : z_in[(long long)b * n_in + i];
        if (input == 0.0) continue;
        const double step = h * input;
        const double a = pre[(long long)b * n_out + j], y = act_out[(long long)b * n_out + j];
        const double* p = probs + (long long)b * n_classes;
        const double dz_plus = gg_activation(code, a + step, alpha) - y;
        const double dz_minus = gg_activation(code, a + (-step), alpha) - y;
        acc += gg_output_change(dz_plus, w, p, labels[b], n_classes)
               - gg_output_change(dz_minus, w, p, labels[b], n_classes);
    }
    grad[k] = acc / denom;
}

// grad[i, col0 + u] = sum of diff[u, offsets[i] : offsets[i + 1]] in order, one thread per (i, u):
// diff (n_units, n_pairs), offsets (n_segments + 1,), grad (n_segments, n_cols).
__global__ void gg_segment_sums(const double* diff, const long long* offsets, double* grad, int n_segments,
                                int n_units, long long n_pairs, int n_cols, int col0) {
    const long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (k >= (long long)n_segments * n_units) return;
    const int i = (int)(k / n_units), u = (int)(k % n_units);
    const double* d = diff + (long long)u * n_pairs;
    double acc = 0.0;
    for (long long q = offsets[i]; q < offsets[i + 1]; ++q) acc += d[q];
    grad[(long long)i * n_cols + col0 + u] = acc;
}
"""

_RAW_KERNELS = (
    "gg_softmax<float>",
    "gg_softmax<double>",
    "gg_softmax_xent<float>",
    "gg_softmax_xent<double>",
    "gg_row_xent",
    "gg_last_layer_diff",
    "gg_hidden_to_output_diff",
    "gg_segment_sums",
)
# NVRTC compiles this on the first get_function (cupy >= 8), i.e. at the first launch on a device.
_MODULE = cupy.RawModule(
    code=f"#define GG_XENT_BLOCK {_XENT_BLOCK}\n{_ACTIVATION_SOURCE}{_RAW_SOURCE}",
    options=_OPTIONS,
    name_expressions=_RAW_KERNELS,
)
_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


@functools.cache
def _raw(name: str) -> cupy.RawKernel:
    return _MODULE.get_function(name)


def _launch(name: str, n_threads: int, args: tuple) -> None:
    """One thread per item: ceil(n_threads / _THREADS) blocks of _THREADS (nothing to do for 0)."""
    if n_threads:
        _raw(name)(((n_threads + _THREADS - 1) // _THREADS,), (_THREADS,), args)


def _elementwise(in_params: str, out_params: str, operation: str, name: str) -> cupy.ElementwiseKernel:
    return cupy.ElementwiseKernel(in_params, out_params, operation, name, preamble=_ACTIVATION_SOURCE, options=_OPTIONS)


_FORWARD = {
    activation: _elementwise("T x, float64 alpha", "T y", operation, f"gradgap_{activation}_forward")
    for activation, operation in {
        "relu": "y = gg_relu(x)",
        "sigmoid": "y = gg_sigmoid(x)",
        "tanh": "y = tanh(x)",
        "leaky_relu": "y = gg_leaky_relu(x, (T)alpha)",
    }.items()
}
# From x, as the reference computes them: sigmoid' = e / (1 + e)^2 with e = exp(-|x|) and
# tanh' = 4 e / (1 + e)^2 with e = exp(-2|x|), so that no 1 - y cancels where the unit saturates.
_BACKWARD = {
    activation: _elementwise("T dout, T x, T y, float64 alpha", "T dx", operation, f"gradgap_{activation}_backward")
    for activation, operation in {
        "relu": "dx = x > T(0) ? dout : T(0)",
        "sigmoid": "const T e = exp(-fabs(x)); dx = dout * (e / ((T(1) + e) * (T(1) + e)))",
        "tanh": "const T e = exp(T(-2) * fabs(x)); dx = dout * (T(4) * e / ((T(1) + e) * (T(1) + e)))",
        "leaky_relu": "dx = x > T(0) ? dout : dout * (T)alpha",
    }.items()
}
# dscores = (probs - onehot(labels)) * scale, probs (B, C) read in C order (i = b * C + c).
_XENT_BACKWARD = _elementwise(
    "T p, raw int64 labels, int64 n_classes, float64 scale",
    "T grad",
    "grad = (i % n_classes == labels[i / n_classes] ? p - T(1) : p) * (T)scale",
    "gradgap_softmax_xent_backward",
)
# out = base + dz * w with broadcasting: the rank-1 change of the next layer's pre-activation.
_RANK1_UPDATE = _elementwise("T base, T dz, T w", "T out", "out = base + dz * w", "gradgap_rank1_update")


def _labels(target: Array) -> Array:
    return cupy.ascontiguousarray(target, dtype=cupy.int64)


def affine_forward(x: Array, W: Array, b: Array) -> Array:
    """x (B, I) @ W (I, O) + b (O,) -> (B, O): a cuBLAS GEMM, then the bias."""
    out = x @ W
    out += b
    return out


def affine_backward(dout: Array, x: Array, W: Array, need_dx: bool = True) -> tuple[Array | None, Array, Array]:
    """(dx (B, I) or None, dW (I, O), db (O,)) from dout (B, O)."""
    dx = dout @ W.T if need_dx else None
    return dx, x.T @ dout, dout.sum(axis=0)


def _custom_forward(activation: Activation, x: Array) -> Array:
    """f(x) by the Activation's CuPy form, else its NumPy form called with the CuPy array; x's dtype."""
    form = activation.cupy_forward or activation.forward
    return cupy.asarray(form(x), dtype=x.dtype)


def _custom_derivative(activation: Activation, x: Array) -> Array:
    form = activation.cupy_derivative or activation.derivative
    return cupy.asarray(form(x), dtype=x.dtype)


def activation_forward(activation: str | Activation, x: Array, alpha: float = LEAKY_SLOPE) -> Array:
    """Elementwise ``activation`` of x (any shape, float32/float64): one kernel launch for a built-in."""
    if not isinstance(activation, str):
        return _custom_forward(activation, x)
    return _FORWARD[activation](x, alpha)


def activation_backward(
    activation: str | Activation, dout: Array, x: Array, y: Array, alpha: float = LEAKY_SLOPE
) -> Array:
    """dL/dx from dL/dy = dout for y = activation(x): one kernel launch for a built-in."""
    if not isinstance(activation, str):
        return dout * _custom_derivative(activation, x)
    return _BACKWARD[activation](dout, x, y, alpha)


def _activation_with_derivative(activation: str | Activation, a: Array, alpha: float) -> tuple[Array, Array]:
    """(f(a), f'(a)) for backprop: the generic sweep for a built-in, the Activation's forms otherwise."""
    if not isinstance(activation, str):
        return _custom_forward(activation, a), _custom_derivative(activation, a)
    return xp_kernels.activation_with_derivative(cupy, activation, a, alpha)


def softmax(scores: Array) -> Array:
    """Softmax over the last axis, one thread per row; stable for scores of +-1e3."""
    scores = cupy.ascontiguousarray(scores)
    probs = cupy.empty_like(scores)
    n_classes = scores.shape[-1]
    n_rows = scores.size // n_classes
    _launch(f"gg_softmax<{_CTYPES[scores.dtype]}>", n_rows, (scores, probs, np.int64(n_rows), np.int32(n_classes)))
    return probs


def softmax_cross_entropy(scores: Array, target: Array) -> tuple[Array, Array]:
    """(mean cross-entropy as a 0-d device array, probs (B, C)). target: labels (B,) or one-hot (B, C).

    Labels take one fused launch (softmax, per-sample losses and their mean). One-hot or soft
    targets, which nets never pass (they hand labels down), use the generic array expression.
    """
    if target.ndim != 1:
        return xp_kernels.softmax_cross_entropy(_OPS, scores, target)
    scores = cupy.ascontiguousarray(scores)
    probs = cupy.empty_like(scores)
    loss = cupy.empty((), dtype=scores.dtype)
    n_rows, n_classes = scores.shape
    kernel = _raw(f"gg_softmax_xent<{_CTYPES[scores.dtype]}>")
    kernel((1,), (_XENT_BLOCK,), (scores, _labels(target), probs, loss, np.int64(n_rows), np.int32(n_classes)))
    return loss, probs


def softmax_cross_entropy_backward(probs: Array, target: Array, dout: float = 1.0) -> Array:
    """dscores = dout * (probs - onehot(target)) / B, (B, C) in probs' dtype: one launch for labels."""
    if target.ndim != 1:
        return xp_kernels.softmax_cross_entropy_backward(_OPS, probs, target, dout)
    n_classes = probs.shape[1]
    return _XENT_BACKWARD(probs, _labels(target), n_classes, float(dout) / probs.shape[0])


def _row_losses(scores: Array, labels: Array, repeat: int = 1) -> Array:
    """Cross-entropy of each row r of scores (R, C) float64 against labels[(r // repeat) % len(labels)] -> (R,)."""
    scores = cupy.ascontiguousarray(scores)
    n_rows = scores.shape[0]
    out = cupy.empty(n_rows, dtype=cupy.float64)
    args = (scores, labels, out, np.int64(n_rows), np.int32(scores.shape[1]), np.int64(labels.size), np.int64(repeat))
    _launch("gg_row_xent", n_rows, args)
    return out


def _set_losses(scores: Array, labels: Array) -> Array:
    """Mean cross-entropy per parameter set. scores: (B, S, C) float64; labels: (B,) int64 -> (S,)."""
    batch, sets, n_classes = scores.shape
    return _row_losses(scores.reshape(batch * sets, n_classes), labels, repeat=sets).reshape(batch, sets).mean(axis=0)


_OPS = xp_kernels.Ops(
    xp=cupy,
    activation=activation_forward,
    set_losses=_set_losses,
    activation_with_derivative=_activation_with_derivative,
    softmax_cross_entropy_gradient=functools.partial(xp_kernels.softmax_cross_entropy_gradient, cupy),
)


# Backprop in 8 launches for a two-layer net (kernels._cupy_backprop): cuBLAS GEMMs plus three fused
# kernels. False: the generic array expressions below (about 35 launches), the reference it matches.
# Off until tests/test_cupy.py has passed on a real device (issue 16): the fused kernels have only
# run on a CPU emulation so far. The GPU tests switch it on themselves.
_FUSED_BACKPROP = False
_RAW_CUBLAS = True  # the fused path's GEMMs: cuBLAS called directly (True) or cupy.matmul(out=...) (False)


def network_gradient(
    weights: list, biases: list, x: Array, labels: Array, activation: str | Activation, alpha: float = LEAKY_SLOPE
) -> tuple[Array, list, list]:
    """Backprop on the device: (loss as a 0-d device array, dWs, dbs) in x's dtype; no host round trip.

    A built-in activation on float32/float64 C-contiguous arrays and int64 labels takes the fused
    path (kernels._cupy_backprop); anything else, an Activation included, the generic implementation.
    """
    if _FUSED_BACKPROP and _backprop.fusable(weights, biases, x, labels, activation):
        return _backprop.network_gradient(weights, biases, x, labels, activation, alpha, raw=_RAW_CUBLAS)
    return xp_kernels.network_gradient(_OPS, weights, biases, x, labels, activation, alpha)


def _chunk_bytes() -> int:
    """Working-set budget of one chunk of the numerical-gradient methods, in bytes.

    A quarter of the free device memory (blocks that cupy's pool holds unused count as free), at
    most _MAX_CHUNK_BYTES, rounded down to a power of two: repeated calls get the same chunks, so
    the same GEMM shapes and bit-identical results.
    """
    free, _total = cupy.cuda.runtime.memGetInfo()
    available = free + cupy.get_default_memory_pool().free_bytes()
    budget = max(1, min(_MAX_CHUNK_BYTES, available // 4))
    return 1 << (budget.bit_length() - 1)


def numerical_gradient_batched(
    problem: GradientProblem,
    x: Array,
    labels: Array,
    progress: Callable[[int], None] | None = None,
    kinks: None = None,
    select: tuple[int, int, int] | None = None,
) -> tuple[list[Array], list[Array]] | tuple[Array, Array]:
    """Brute force on the device: a chunk of perturbed parameter sets per GEMM (one batched GEMM for a
    deeper layer), the chunk sized from free device memory. float64 (dWs, dbs).

    select: the chunks that hold a selected entry (kernels.xp_kernels.numerical_gradient_batched)."""
    args = (problem, x, _labels(labels), progress, kinks, select)
    return xp_kernels.numerical_gradient_batched(_OPS, *args, chunk_bytes=_chunk_bytes())


def numerical_gradient_incremental(
    problem: GradientProblem,
    x: Array,
    labels: Array,
    progress: Callable[[int], None] | None = None,
    kinks: dict | None = None,
    select: tuple[int, int, int] | None = None,
) -> tuple[list[Array], list[Array]] | tuple[Array, Array]:
    """Exact central differences, recomputing only what each perturbation changes. float64 (dWs, dbs).

    The last layer and the hidden layer that feeds it take one launch each, a thread per parameter
    that sums over the batch in order; a deeper layer recomputes the rest of the pass for its
    changed (input, sample) pairs, a chunk of units at a time, and sums each input's pairs in order.
    No atomics: repeated calls are bit-identical. ``kinks``: see kernels/__init__ (device arrays).

    select: a deeper layer computes only its chunks of units that hold a selected column (the same
    chunks as the full call, sized by the same budget, so the same GEMM shapes and bits); the last
    two layers (one cheap launch each) are computed whole and sliced.
    """
    labels = _labels(labels)
    weights, biases, activation = problem.weights, problem.biases, problem.activation
    alpha, h = problem.alpha, problem.h
    if not isinstance(activation, str):  # a user-defined Activation: the generic loop calls its forms
        return xp_kernels.numerical_gradient_incremental(_OPS, problem, x, labels, progress, kinks, select)
    layers, columns = xp_kernels.selection(select, weights)
    chosen = slice(None) if columns is None else columns
    cache = xp_kernels.forward_cache(cupy, _OPS, weights, biases, x, labels, activation, alpha)
    n_layers = len(weights)
    denom = np.float64(2 * h * x.shape[0])
    chunk_bytes = _chunk_bytes()
    detect = kinks is not None and activation in xp_kernels._KINKED
    dWs, dbs = [], []
    for layer in layers:
        crossings = [] if detect else None
        if layer == n_layers - 1:
            grad = _last_layer_differences(cache, labels, h, denom)[:, chosen]
        elif layer == n_layers - 2:
            grad = _hidden_to_output_differences(cache, weights[-1], labels, activation, alpha, h, denom, layer)
            grad = grad[:, chosen]
            if detect:
                crossings.append(xp_kernels._unit_crossing_rows(cupy, cache, h, layer))
        else:
            grad = _deep_layer_differences(
                cache, weights, biases, labels, activation, alpha, h, layer, chunk_bytes, crossings, columns
            )[:, chosen]
            grad /= denom
        dW, db = grad[:-1], grad[-1]
        dW += xp_kernels._decay_difference(cupy, weights[layer][:, chosen], problem.weight_decay, h)
        dWs.append(dW)
        dbs.append(db)
        if kinks is not None:
            rows = xp_kernels._kink_rows(cupy)
            if crossings:
                rows = xp_kernels._first_row_per_entry(cupy, cupy.concatenate(crossings))
            xp_kernels._record_kinks(cupy, kinks, layer, rows, weights[layer], columns)
        if progress is not None:
            progress(xp_kernels._n_selected(weights[layer], columns))
    return xp_kernels._selected_result(cupy, dWs, dbs, columns)


def numerical_gradient_series(
    problem: GradientProblem,
    x: Array,
    labels: Array,
    progress: Callable[[int], None] | None = None,
    kinks: dict | None = None,
    select: tuple[int, int, int] | None = None,
) -> tuple[list[Array], list[Array]] | tuple[Array, Array]:
    """The series method (kernels.xp_kernels.numerical_gradient_series, docs/series.md) on the device:
    cuBLAS GEMMs over all (sample, unit) pairs, cupy elementwise Taylor arithmetic. float64 (dWs, dbs).
    select: the selected layer is computed whole and sliced, as in xp_kernels."""
    return xp_kernels.numerical_gradient_series(_OPS, problem, x, _labels(labels), progress, kinks, select)


def _last_layer_differences(cache: xp_kernels.ForwardCache, labels: Array, h: float, denom: np.float64) -> Array:
    """(n_in + 1, C) float64: the last layer's W differences, then its b's as the last row."""
    z = cupy.ascontiguousarray(cache.inputs[-1])
    probs = cupy.ascontiguousarray(cache.probs)
    (batch, n_in), n_classes = z.shape, probs.shape[1]
    grad = cupy.empty((n_in + 1, n_classes), dtype=cupy.float64)
    sizes = np.int32(batch), np.int32(n_in), np.int32(n_classes)
    _launch("gg_last_layer_diff", grad.size, (z, probs, labels, grad, *sizes, np.float64(h), denom))
    return grad


def _hidden_to_output_differences(
    cache: xp_kernels.ForwardCache,
    W_next: Array,
    labels: Array,
    activation: str,
    alpha: float,
    h: float,
    denom: np.float64,
    layer: int,
) -> Array:
    """(n_in + 1, n_out) float64 for the hidden layer ``layer`` that feeds the output layer."""
    z_in, pre, act_out, w_next, probs = (
        cupy.ascontiguousarray(a)
        for a in (cache.inputs[layer], cache.pre[layer], cache.inputs[layer + 1], W_next, cache.probs)
    )
    (batch, n_in), n_out, n_classes = z_in.shape, pre.shape[1], w_next.shape[1]
    grad = cupy.empty((n_in + 1, n_out), dtype=cupy.float64)
    sizes = np.int32(batch), np.int32(n_in), np.int32(n_out), np.int32(n_classes)
    code = np.int32(_ACTIVATION_CODES[activation])
    args = (z_in, pre, act_out, w_next, probs, labels, grad, *sizes, code, np.float64(alpha), np.float64(h), denom)
    _launch("gg_hidden_to_output_diff", grad.size, args)
    return grad


def _deep_layer_differences(
    cache: xp_kernels.ForwardCache,
    weights: list[Array],
    biases: list[Array],
    labels: Array,
    activation: str,
    alpha: float,
    h: float,
    layer: int,
    chunk_bytes: int,
    crossings: list | None = None,
    columns: slice | None = None,
) -> Array:
    """Summed loss differences (n_in + 1, n_out) float64 of a hidden layer two or more layers before the output.

    W[i, j] += step moves column j of the next layer's input by a rank-1 term for the samples b with
    input[b, i] != 0: the (i, b) pairs, ordered by i, the bias being an input of ones. The rest of
    the pass is recomputed for every pair of a chunk of units j at once, then each input's pairs are
    summed in order. Finding the pairs waits for the device once (their count) per layer.
    crossings: None, or a list that gets kink rows (see kernels.xp_kernels._hidden_layer_differences).
    columns: None, or the units wanted: the chunks of units that hold none are skipped, and their
    columns of the result are left unset.
    """
    z_in = cache.inputs[layer]
    batch, n_in = z_in.shape
    n_out = weights[layer].shape[1]
    with_bias = cupy.concatenate([z_in.T, cupy.ones((1, batch), dtype=cupy.float64)])
    rows, samples = cupy.nonzero(with_bias)
    n_pairs = int(rows.size)
    offsets = cupy.zeros(n_in + 2, dtype=cupy.int64)  # pairs of input i: offsets[i] .. offsets[i + 1]
    offsets[1:] = cupy.cumsum(cupy.count_nonzero(with_bias, axis=1))
    steps = h * with_bias[rows, samples]
    pre_units = cupy.ascontiguousarray(cache.pre[layer][samples].T)  # (n_out, n_pairs)
    base_units = cupy.ascontiguousarray(cache.inputs[layer + 1][samples].T)
    pre_next = cache.pre[layer + 1][samples]  # (n_pairs, n_next)
    base_loss = cache.per_sample_loss[samples]
    pair_labels = labels[samples]
    W_next = weights[layer + 1]
    per_unit = 8 * n_pairs * (4 + 3 * sum(W.shape[1] for W in weights[layer + 1 :]))
    units = max(1, min(n_out, chunk_bytes // per_unit))
    grad = cupy.empty((n_in + 1, n_out), dtype=cupy.float64)
    for first in range(0, n_out, units):
        chunk = slice(first, min(first + units, n_out))
        if columns is not None and (chunk.stop <= columns.start or first >= columns.stop):
            continue
        n_units = chunk.stop - first
        changes = []
        hits = None
        if crossings is not None:
            hits = [cupy.full((n_units, n_pairs), -1, dtype=cupy.int64) for _ in range(2)]
        for signed_steps in (steps, -steps):
            moved = pre_units[chunk] + signed_steps
            dz = activation_forward(activation, moved, alpha) - base_units[chunk]
            if hits is not None:
                unit_ids = cupy.arange(first, chunk.stop)[:, None]
                xp_kernels._mark_crossings(cupy, hits, (moved > 0) != (pre_units[chunk] > 0), layer + 1, unit_ids)
            a = _RANK1_UPDATE(pre_next, dz[:, :, None], W_next[chunk][:, None, :])  # (units, n_pairs, n_next)
            a = a.reshape(n_units * n_pairs, a.shape[2])
            for m in range(layer + 2, len(weights)):
                if hits is not None:
                    flips = (a.reshape(n_units, n_pairs, -1) > 0) != (cache.pre[m - 1][samples] > 0)[None]
                    xp_kernels._mark_crossings(cupy, hits, flips.any(axis=2), m, flips.argmax(axis=2))
                a = affine_forward(activation_forward(activation, a, alpha), weights[m], biases[m])
            changes.append(_row_losses(a, pair_labels).reshape(n_units, n_pairs) - base_loss)
        diff = changes[0] - changes[1]
        if hits is not None:
            unit_index, pair_index = cupy.nonzero(hits[0] >= 0)
            flat = rows[pair_index] * n_out + unit_index + first
            found = (flat, samples[pair_index], hits[0][unit_index, pair_index], hits[1][unit_index, pair_index])
            crossings.append(xp_kernels._kink_rows(cupy, cupy.stack(found, axis=1)))
        sizes = np.int32(n_in + 1), np.int32(n_units), np.int64(n_pairs), np.int32(n_out), np.int32(first)
        _launch("gg_segment_sums", (n_in + 1) * n_units, (diff, offsets, grad, *sizes))
    return grad
