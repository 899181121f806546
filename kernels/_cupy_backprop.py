"""Fused CuPy backprop: a whole network_gradient call in a handful of launches.

Used by kernels.cupy_kernels.network_gradient (imported only after cupy was imported and a CUDA
device was found). For an L-layer net with a built-in activation one call is

    per hidden layer   a = z @ W (cuBLAS), then one kernel: z' = f(a + b), f'(a + b)
    output layer       s = z @ W (cuBLAS), then one single-block kernel: the bias, softmax,
                       per-row cross-entropy, dscores = (p - onehot) / B in place, the bias
                       gradient (column sums) and the mean loss, both by fixed-order trees
    backward, layer m  dW = z.T @ dout (cuBLAS); for m > 0 also g = dout @ W.T (cuBLAS), then one
                       kernel: g *= f'(a) in place and db of layer m - 1 = column sums of g

that is 2 L + (L - 1) cuBLAS GEMMs and L custom launches (8 launches for a two-layer net), no
host synchronisation, no atomics: repeated calls are bit-identical. The arithmetic follows
kernels.xp_kernels.network_gradient operation by operation (same formulas, products and sums
rounded apart: ``--fmad=false``), so float64 results agree with the NumPy reference to the
last few bits; sums are accumulated in float64 for float32 nets too.

GEMMs call cublasGemmEx directly (cupy_backends' wrapper, on cupy's handle and the current
stream, with the types, algorithm and host-pointer scalars cupy's own matmul passes), skipping
cupy.matmul's per-call overhead; _RAW_CUBLAS = False in kernels.cupy_kernels routes them
through cupy.matmul(..., out=...) instead.
"""

from __future__ import annotations

from typing import Any

import cupy
import numpy as np

from kernels.activations import ACTIVATION_CODES

try:  # cupy's thin Cython wrappers of cuBLAS (they set the handle's stream to the current one)
    from cupy.cuda import device as _device
    from cupy_backends.cuda.libs import cublas as _cublas
except ImportError:  # pragma: no cover - a cupy without them: cupy.matmul does the GEMMs
    _cublas = None

Array = Any  # cupy.ndarray

XENT_BLOCK = 512  # threads of the single block of the output kernel (a power of two, >= 32)
SUM_COLS, SUM_ROWS = 32, 16  # block of the column-sum kernel: 32 columns x 16 row lanes
ACT_THREADS = 256

_SOURCE = r"""
// Bias, activation and its derivative, as kernels.xp_kernels.activation_with_derivative computes them.
template <typename F>
__device__ __forceinline__ void gg_value_and_slope(int code, F a, F alpha, F* value, F* slope) {
    if (code == GG_SIGMOID) {  // e = exp(-|a|), r = 1/(1+e): f = r or e r, f' = e r r
        const F e = exp(-fabs(a));
        const F r = F(1) / (e + F(1));
        const F q = e * r;
        *value = a < F(0) ? q : r;
        *slope = q * r;
    } else if (code == GG_TANH) {  // f' = 4 e r r with e = exp(-2|a|), r = 1/(1+e)
        const F e = exp(F(-2) * fabs(a));
        const F r = F(1) / (e + F(1));
        *value = tanh(a);
        *slope = ((e * r) * r) * F(4);
    } else if (code == GG_RELU) {
        *value = a < F(0) ? F(0) : a;
        *slope = a > F(0) ? F(1) : F(0);
    } else if (code == GG_LEAKY_RELU) {
        *value = a > F(0) ? a : a * alpha;
        *slope = a > F(0) ? F(1) : alpha;
    } else {  // not a code: NaN, never a wrong activation
        *value = F(__longlong_as_double(0x7ff8000000000000LL));
        *slope = *value;
    }
}

// a (n = rows * cols, C order) += bias[col]; then a = f(a), slope = f'(a): one thread per element.
template <typename F>
__global__ void gg_bias_activation(F* a, const F* bias, F* slope, long long n, int cols, int code, F alpha) {
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    const F pre = a[i] + bias[i % cols];
    F value, derivative;
    gg_value_and_slope(code, pre, alpha, &value, &derivative);
    a[i] = value;
    slope[i] = derivative;
}

// One block of GG_XENT_BLOCK threads. scores (n_rows, n_classes) without the bias comes in and
// leaves as dL/dscores = (softmax(scores + bias) - onehot(labels)) * inv_batch. Thread t takes rows
// t, t + GG_XENT_BLOCK, ...; then warp w sums columns w, w + n_warps, ... (lane l: rows l, l + 32,
// ... in order, then a fixed shuffle tree) into db, and a fixed tree adds the per-row losses into
// loss[0] = mean cross-entropy. No atomics.
template <typename F>
__global__ void gg_xent_backward(F* scores, const F* bias, const long long* labels, F* loss, F* db,
                                 long long n_rows, int n_classes, F inv_batch) {
    __shared__ double partial[GG_XENT_BLOCK];
    double local = 0.0;
    for (long long r = threadIdx.x; r < n_rows; r += GG_XENT_BLOCK) {
        F* s = scores + r * n_classes;
        const int label = (int)labels[r];
        F m = s[0] + bias[0];
        for (int c = 0; c < n_classes; ++c) {
            const F v = s[c] + bias[c];
            s[c] = v;
            m = v > m ? v : m;
        }
        const F picked = s[label] - m;
        F total = F(0);
        for (int c = 0; c < n_classes; ++c) {
            const F e = exp(s[c] - m);
            s[c] = e;
            total += e;
        }
        local += (double)(log(total) - picked);
        for (int c = 0; c < n_classes; ++c) {
            const F p = s[c] / total;
            s[c] = (c == label ? p - F(1) : p) * inv_batch;
        }
    }
    partial[threadIdx.x] = local;
    __syncthreads();  // also makes every row's dscores visible to the whole block
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int c = warp; c < n_classes; c += GG_XENT_BLOCK / 32) {
        double acc = 0.0;
        for (long long r = lane; r < n_rows; r += 32) acc += (double)scores[r * n_classes + c];
        for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, offset);
        if (lane == 0) db[c] = (F)acc;
    }
    for (int half = GG_XENT_BLOCK / 2; half > 0; half >>= 1) {
        if ((int)threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) loss[0] = (F)(partial[0] / (double)n_rows);
}

// g (n_rows, n_cols) *= slope in place, and db[col] = sum over rows of the product. Blocks of
// GG_SUM_COLS x GG_SUM_ROWS threads, one block per GG_SUM_COLS columns: thread (x, y) takes rows
// y, y + GG_SUM_ROWS, ... of column x in order, then a fixed tree over y. No atomics.
template <typename F>
__global__ void gg_scale_column_sums(F* g, const F* slope, F* db, long long n_rows, int n_cols) {
    __shared__ double partial[GG_SUM_ROWS][GG_SUM_COLS + 1];
    const int col = blockIdx.x * GG_SUM_COLS + threadIdx.x;
    double acc = 0.0;
    if (col < n_cols) {
        for (long long r = threadIdx.y; r < n_rows; r += GG_SUM_ROWS) {
            const long long i = r * n_cols + col;
            const F v = g[i] * slope[i];
            g[i] = v;
            acc += (double)v;
        }
    }
    partial[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    for (int half = GG_SUM_ROWS / 2; half > 0; half >>= 1) {
        if ((int)threadIdx.y < half) partial[threadIdx.y][threadIdx.x] += partial[threadIdx.y + half][threadIdx.x];
        __syncthreads();
    }
    if (threadIdx.y == 0 && col < n_cols) db[col] = (F)partial[0][threadIdx.x];
}
"""

KERNEL_NAMES = tuple(
    f"{kernel}<{ctype}>"
    for kernel in ("gg_bias_activation", "gg_xent_backward", "gg_scale_column_sums")
    for ctype in ("float", "double")
)


def source() -> str:
    """The CUDA source of the fused kernels, with its constants defined (also what tests compile)."""
    defines = [f"#define GG_{name.upper()} {code}" for name, code in ACTIVATION_CODES.items()]
    defines += [
        f"#define GG_XENT_BLOCK {XENT_BLOCK}",
        f"#define GG_SUM_COLS {SUM_COLS}",
        f"#define GG_SUM_ROWS {SUM_ROWS}",
    ]
    return "\n".join(defines) + "\n" + _SOURCE


_MODULE = None  # compiled (NVRTC, cached on disk by cupy) at the first fused call
_FUNCTIONS: dict[str, Any] = {}
_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
# alpha = 1 and beta = 0 for cuBLAS in host pointer mode (the mode cupy keeps its handle in)
_SCALARS = {dtype: (np.ones((), dtype), np.zeros((), dtype)) for dtype in _CTYPES}
_SCALAR_PTRS = {dtype: (one.ctypes.data, zero.ctypes.data) for dtype, (one, zero) in _SCALARS.items()}
_OP_N = getattr(_cublas, "CUBLAS_OP_N", 0)
_OP_T = getattr(_cublas, "CUBLAS_OP_T", 1)
# cublasGemmEx's data and compute types, as cupy's own matmul (tensordot_core_v11) passes them: plain
# FP32 or FP64 compute (no TF32), algorithm CUBLAS_GEMM_DEFAULT_TENSOR_OP (cupy's choice from sm_80 on)
_GEMM_TYPES = {
    np.dtype(np.float32): (0, getattr(_cublas, "CUBLAS_COMPUTE_32F", 68)),  # CUDA_R_32F
    np.dtype(np.float64): (1, getattr(_cublas, "CUBLAS_COMPUTE_64F", 70)),  # CUDA_R_64F
}
_GEMM_ALGO = getattr(_cublas, "CUBLAS_GEMM_DEFAULT_TENSOR_OP", 99)


def _kernel(name: str, dtype: np.dtype) -> Any:
    global _MODULE
    key = f"{name}<{_CTYPES[dtype]}>"
    function = _FUNCTIONS.get(key)
    if function is None:
        if _MODULE is None:
            _MODULE = cupy.RawModule(code=source(), options=("--fmad=false",), name_expressions=KERNEL_NAMES)
        function = _FUNCTIONS[key] = _MODULE.get_function(key)
    return function


def fusable(weights: list, biases: list, x: Array, labels: Array, activation: Any) -> bool:
    """Whether the fused path takes this call: a built-in activation, float32/float64 C-contiguous
    arrays of one dtype, int64 labels (B,). Anything else goes to the generic implementation."""
    if not isinstance(activation, str) or activation not in ACTIVATION_CODES:
        return False
    dtype = x.dtype
    if dtype not in _CTYPES or x.ndim != 2 or not x.flags.c_contiguous:
        return False
    if labels.ndim != 1 or labels.dtype != np.int64 or not labels.flags.c_contiguous:
        return False
    return all(a.dtype == dtype and a.flags.c_contiguous for a in (*weights, *biases))


def _cublas_gemm(trans_a: int, trans_b: int, m: int, n: int, k: int, A: Array, lda: int, B: Array, ldb: int, C: Array):
    """C (column-major m x n, ld m) = op(A) @ op(B) by cublasGemmEx, alpha 1 and beta 0 (host pointers)."""
    one, zero = _SCALAR_PTRS[C.dtype]
    data_type, compute_type = _GEMM_TYPES[C.dtype]
    handle = _device.get_cublas_handle()
    a, b, c = A.data.ptr, B.data.ptr, C.data.ptr
    _cublas.gemmEx(
        handle, trans_a, trans_b, m, n, k, one, a, data_type, lda, b, data_type, ldb, zero, c, data_type, m,
        compute_type, _GEMM_ALGO,
    )  # fmt: skip


# Row-major (C order) products into a preallocated C-contiguous ``out``. A row-major (r, c) array is
# the column-major (c, r) matrix with leading dimension c, so out = a @ b is out^T = b^T a^T.
def matmul_nn(a: Array, b: Array, out: Array, raw: bool = True) -> Array:
    """out (M, N) = a (M, K) @ b (K, N)."""
    if not raw or _cublas is None:
        return cupy.matmul(a, b, out=out)
    (M, K), N = a.shape, b.shape[1]
    _cublas_gemm(_OP_N, _OP_N, N, M, K, b, N, a, K, out)
    return out


def matmul_tn(a: Array, b: Array, out: Array, raw: bool = True) -> Array:
    """out (M, N) = a.T @ b for a (R, M), b (R, N)."""
    if not raw or _cublas is None:
        return cupy.matmul(a.T, b, out=out)
    (R, M), N = a.shape, b.shape[1]
    _cublas_gemm(_OP_N, _OP_T, N, M, R, b, N, a, M, out)
    return out


def matmul_nt(a: Array, b: Array, out: Array, raw: bool = True) -> Array:
    """out (M, K) = a @ b.T for a (M, N), b (K, N)."""
    if not raw or _cublas is None:
        return cupy.matmul(a, b.T, out=out)
    (M, N), K = a.shape, b.shape[0]
    _cublas_gemm(_OP_T, _OP_N, K, M, N, b, N, a, N, out)
    return out


def forward(weights: list, biases: list, x: Array, activation: str, alpha: float, raw: bool = True):
    """(inputs, slopes, scores): inputs[m] the input of layer m (inputs[0] is x), slopes[m] = f'(a_m)
    of hidden layer m, scores (B, C) = inputs[-1] @ W_L *without* the last bias (the output kernel adds it)."""
    dtype = x.dtype
    batch = x.shape[0]
    code, slope_alpha = np.int32(ACTIVATION_CODES[activation]), dtype.type(alpha)
    inputs, slopes = [x], []
    for W, b in zip(weights[:-1], biases[:-1], strict=True):
        a = cupy.empty((batch, W.shape[1]), dtype=dtype)
        matmul_nn(inputs[-1], W, a, raw)
        slope = cupy.empty_like(a)
        n = a.size
        _kernel("gg_bias_activation", dtype)(
            ((n + ACT_THREADS - 1) // ACT_THREADS,),
            (ACT_THREADS,),
            (a, b, slope, np.int64(n), np.int32(W.shape[1]), code, slope_alpha),
        )
        inputs.append(a)
        slopes.append(slope)
    scores = cupy.empty((batch, weights[-1].shape[1]), dtype=dtype)
    matmul_nn(inputs[-1], weights[-1], scores, raw)
    return inputs, slopes, scores


def loss_and_dscores(scores: Array, bias: Array, labels: Array) -> tuple[Array, Array]:
    """(mean cross-entropy, 0-d; db of the output layer (C,)); scores (B, C) becomes dL/dscores in place."""
    dtype = scores.dtype
    batch, n_classes = scores.shape
    loss = cupy.empty((), dtype=dtype)
    db = cupy.empty(n_classes, dtype=dtype)
    args = (scores, bias, labels, loss, db, np.int64(batch), np.int32(n_classes), dtype.type(1 / batch))
    _kernel("gg_xent_backward", dtype)((1,), (XENT_BLOCK,), args)
    return loss, db


def backward(weights: list, inputs: list, slopes: list, dscores: Array, db_last: Array, raw: bool = True):
    """(dWs, dbs) from dL/dscores (B, C); reads inputs and slopes, writes only new arrays."""
    dtype = dscores.dtype
    batch = dscores.shape[0]
    n_layers = len(weights)
    dWs, dbs = [None] * n_layers, [None] * n_layers
    dbs[-1] = db_last
    dout = dscores
    for m in range(n_layers - 1, -1, -1):
        W = weights[m]
        dWs[m] = matmul_tn(inputs[m], dout, cupy.empty(W.shape, dtype=dtype), raw)
        if m:
            n_in = W.shape[0]
            g = matmul_nt(dout, W, cupy.empty((batch, n_in), dtype=dtype), raw)
            db = cupy.empty(n_in, dtype=dtype)
            _kernel("gg_scale_column_sums", dtype)(
                ((n_in + SUM_COLS - 1) // SUM_COLS,),
                (SUM_COLS, SUM_ROWS),
                (g, slopes[m - 1], db, np.int64(batch), np.int32(n_in)),
            )
            dbs[m - 1] = db
            dout = g
    return dWs, dbs


def network_gradient(
    weights: list, biases: list, x: Array, labels: Array, activation: str, alpha: float, raw: bool = True
) -> tuple[Array, list, list]:
    """(loss 0-d, dWs, dbs) in x's dtype; the caller checked ``fusable``. raw: cuBLAS directly, else cupy.matmul."""
    inputs, slopes, scores = forward(weights, biases, x, activation, alpha, raw)
    loss, db_last = loss_and_dscores(scores, biases[-1], labels)
    dWs, dbs = backward(weights, inputs, slopes, scores, db_last, raw)
    return loss, dWs, dbs
