"""The kernels written once against an array module ``xp`` (numpy or cupy): the shared implementation.

Every name of the kernel contract (kernels.KERNEL_NAMES, kernels/__init__.py) is defined here with an
``Ops`` as its first argument: the array module ``xp`` plus the pieces a backend fuses itself (its
activation, its per-set losses, optional fast paths). ``bound(ops)`` gives the whole contract with
ops bound, which is all of kernels/numpy_kernels.py; the Numba and CuPy modules call these functions
with their own Ops, or replace them. The helpers below take ``xp`` itself.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from kernels import KERNEL_NAMES, LEAKY_SLOPE, GradientProblem
from kernels.activations import Activation

Array = Any

# Working-set budget for one chunk of perturbed parameter sets in the batched method.
BATCHED_CHUNK_BYTES = 96 * 2**20


def _in_dtype_of(xp, result: Array, x: Array) -> Array:
    """A user-defined form's result in x's dtype (a form may compute in float64)."""
    return xp.asarray(result, dtype=x.dtype)


def _activation(xp, activation: str | Activation, x: Array, alpha: float) -> Array:
    """Elementwise activation (a built-in name, or an Activation: its NumPy form).

    Sigmoid is 1 / (1 + exp(-x)), which is exact at the extremes too: where exp(-x) overflows to
    inf the result is 0, and that overflow is not reported.
    """
    if not isinstance(activation, str):
        return _in_dtype_of(xp, activation.forward(x), x)
    if activation == "relu":
        return xp.maximum(x, 0)
    if activation == "sigmoid":
        errstate = getattr(xp, "errstate", None)  # numpy's; cupy reports no overflow
        with errstate(over="ignore") if errstate else contextlib.nullcontext():
            e = xp.exp(-x)
        return 1 / (1 + e)
    if activation == "tanh":
        return xp.tanh(x)
    if activation == "leaky_relu":
        return xp.where(x > 0, x, x * x.dtype.type(alpha))
    raise ValueError(f"unknown activation {activation!r}")


def activation_with_derivative(xp, activation: str | Activation, a: Array, alpha: float) -> tuple[Array, Array]:
    """(f(a), f'(a)) in one sweep, for backprop; the derivative is cancellation-free.

    An Activation gives its NumPy forward and derivative.
    """
    if not isinstance(activation, str):
        return _in_dtype_of(xp, activation.forward(a), a), _in_dtype_of(xp, activation.derivative(a), a)
    if activation == "sigmoid":  # e = exp(-|a|): f = 1/(1+e) or e/(1+e); f' = e/(1+e)^2
        e = xp.abs(a)
        xp.negative(e, out=e)
        xp.exp(e, out=e)
        r = e + 1
        xp.reciprocal(r, out=r)  # 1/(1+e)
        e *= r  # e/(1+e)
        derivative = e * r
        xp.copyto(r, e, where=a < 0)  # r becomes f(a)
        return r, derivative
    if activation == "tanh":  # f' = 4e/(1+e)^2 with e = exp(-2|a|)
        e = xp.abs(a)
        e *= -2
        xp.exp(e, out=e)
        r = e + 1
        xp.reciprocal(r, out=r)
        e *= r
        e *= r
        e *= 4
        return xp.tanh(a), e
    if activation == "relu":
        positive = a > 0
        return xp.maximum(a, 0), positive.astype(a.dtype)
    if activation == "leaky_relu":
        positive = a > 0
        slope = a.dtype.type(alpha)
        return xp.where(positive, a, a * slope), xp.where(positive, a.dtype.type(1), slope)
    raise ValueError(f"unknown activation {activation!r}")


def softmax_cross_entropy_gradient(xp, scores: Array, labels: Array) -> tuple[Array, Array]:
    """(mean loss, (softmax - onehot) / B) for integer labels; ``scores`` is overwritten."""
    batch = scores.shape[0]
    rows = xp.arange(batch)
    scores -= scores.max(axis=1, keepdims=True)
    picked = scores[rows, labels]
    xp.exp(scores, out=scores)
    total = scores.sum(axis=1, keepdims=True)
    scores /= total
    loss = (xp.log(total[:, 0]) - picked).mean()
    scores[rows, labels] -= 1
    scores *= scores.dtype.type(1 / batch)
    return loss, scores


def log_softmax_parts(xp, scores: Array) -> tuple[Array, Array, Array]:
    """(shifted, exp(shifted), row sums) with shifted = scores - rowmax, over the last axis."""
    shifted = scores - scores.max(axis=-1, keepdims=True)
    e = xp.exp(shifted)
    return shifted, e, e.sum(axis=-1, keepdims=True)


def set_losses(xp, scores: Array, labels: Array) -> Array:
    """Mean cross-entropy per parameter set. scores: (B, S, C); labels: (B,) -> (S,)."""
    shifted, _, total = log_softmax_parts(xp, scores)
    index = xp.broadcast_to(labels[:, None, None], shifted.shape[:2] + (1,))
    picked = xp.take_along_axis(shifted, index, axis=2)
    return (xp.log(total[..., 0]) - picked[..., 0]).mean(axis=0)


@dataclass(frozen=True)
class Ops:
    """The array module and the elementwise pieces a backend plugs into the kernels written here."""

    xp: Any
    activation: Callable[[str | Activation, Array, float], Array]  # (activation, x 2-D, alpha) -> f(x)
    set_losses: Callable[[Array, Array], Array]  # (scores (B, S, C), labels (B,)) -> (S,)
    # backprop pieces: (activation, a, alpha) -> (f(a), f'(a)); (scores, labels) -> (loss, dscores)
    activation_with_derivative: Callable[..., tuple[Array, Array]] | None = None
    softmax_cross_entropy_gradient: Callable[..., tuple[Array, Array]] | None = None
    # optional fast path for the layer that feeds the output layer: same arguments and result as
    # _hidden_layer_differences (columns included)
    hidden_to_output: Callable[..., tuple[Array, Array]] | None = None
    # optional fast path of the series method for the layer that feeds the output layer: same
    # arguments and result as _output_feeding_pair_series
    output_feeding_series: Callable[..., tuple] | None = None
    # optional fast path of the series method's next-layer kink radius: same arguments and result as
    # _next_layer_inverse_radius without its xp
    next_layer_inverse_radius: Callable[..., Array] | None = None
    # optional fast path of the relu/leaky loss series along each pair's direction: (V (B, J, C), probs,
    # labels, rho, inverse radius, h) -> (coefficients [L_1..L_K], order needed), as _piecewise_pair_series
    direction_series: Callable[..., tuple] | None = None
    # optional fast paths of the series method: the output layer's coefficients and the stacked steps' powers,
    # same arguments and results as _last_layer_coefficients and _stacked_steps (less xp)
    last_layer_coefficients: Callable[..., list | None] | None = None
    stacked_steps: Callable[..., Array] | None = None


def generic_ops(xp) -> Ops:
    """The Ops made of this module's array expressions alone: NumPy's kernels, and a fallback for any xp."""
    return Ops(
        xp=xp,
        activation=partial(_activation, xp),
        set_losses=partial(set_losses, xp),
        activation_with_derivative=partial(activation_with_derivative, xp),
        softmax_cross_entropy_gradient=partial(softmax_cross_entropy_gradient, xp),
    )


def bound(ops: Ops) -> dict[str, Callable[..., Any]]:
    """{name: the contract function of that name here, with ops bound as its first argument} for KERNEL_NAMES.

    Each is a functools.partial carrying the function's name and docstring; its signature is the
    contract's (inspect.signature drops the bound ops).
    """
    kernels = {}
    for name in KERNEL_NAMES:
        function = globals()[name]
        kernel = partial(function, ops)
        kernel.__name__ = kernel.__qualname__ = name
        kernel.__doc__ = function.__doc__
        kernels[name] = kernel
    return kernels


# ----------------------------------------------------------------------------- the contract's array kernels


def affine_forward(ops: Ops, x: Array, W: Array, b: Array) -> Array:
    """x (B, I) @ W (I, O) + b (O,) -> (B, O), in x's dtype."""
    out = x @ W
    out += b
    return out


def affine_backward(ops: Ops, dout: Array, x: Array, W: Array, need_dx: bool = True):
    """(dx (B, I) or None, dW (I, O), db (O,)) from dout (B, O)."""
    dx = dout @ W.T if need_dx else None
    return dx, x.T @ dout, dout.sum(axis=0)


def activation_forward(ops: Ops, activation: str | Activation, x: Array, alpha: float = LEAKY_SLOPE) -> Array:
    """Elementwise f(x) (a built-in name, or an Activation: its NumPy form), x's shape and dtype."""
    return _activation(ops.xp, activation, x, alpha)


def activation_backward(
    ops: Ops, activation: str | Activation, dout: Array, x: Array, y: Array, alpha: float = LEAKY_SLOPE
) -> Array:
    """dL/dx from dL/dy for the activation y = f(x) (an Activation: dout * its NumPy derivative)."""
    xp = ops.xp
    if not isinstance(activation, str):
        return dout * _in_dtype_of(xp, activation.derivative(x), dout)
    if activation == "relu":
        return xp.where(x > 0, dout, 0).astype(dout.dtype, copy=False)
    if activation == "sigmoid":  # e / (1 + e)^2 with e = exp(-|x|): exact where (1 - y) * y would cancel
        e = xp.exp(-xp.abs(x))
        return dout * (e / ((1 + e) * (1 + e)))
    if activation == "tanh":  # 4 e / (1 + e)^2 with e = exp(-2|x|), rather than 1 - y^2
        e = xp.exp(-2 * xp.abs(x))
        return dout * (4 * e / ((1 + e) * (1 + e)))
    if activation == "leaky_relu":
        return xp.where(x > 0, dout, dout * dout.dtype.type(alpha))
    raise ValueError(f"unknown activation {activation!r}")


def softmax(ops: Ops, scores: Array) -> Array:
    """Softmax over the last axis, stable for scores of +-1e3."""
    _, e, total = log_softmax_parts(ops.xp, scores)
    return e / total


def softmax_cross_entropy(ops: Ops, scores: Array, target: Array) -> tuple[Array, Array]:
    """Mean cross-entropy of softmax(scores) by log-sum-exp, and the probabilities."""
    xp = ops.xp
    shifted, probs, total = log_softmax_parts(xp, scores)
    probs /= total
    log_total = xp.log(total[:, 0])
    if target.ndim == 1:
        per_sample = log_total - shifted[xp.arange(scores.shape[0]), target]
    else:
        per_sample = (target * (log_total[:, None] - shifted)).sum(axis=1)
    return per_sample.sum() / scores.shape[0], probs  # the mean, without mean()'s per-call overhead


def softmax_cross_entropy_backward(ops: Ops, probs: Array, target: Array, dout: float = 1.0) -> Array:
    """(probs - onehot(target)) * dout / B."""
    batch = probs.shape[0]
    if target.ndim == 1:
        grad = probs.copy()
        grad[ops.xp.arange(batch), target] -= 1
    else:
        grad = probs - target
    grad *= probs.dtype.type(dout / batch)
    return grad


def network_gradient(ops: Ops, weights, biases, x, labels, activation, alpha=LEAKY_SLOPE):
    """Fused backprop of an affine/activation stack with softmax cross-entropy: (loss, dWs, dbs).

    The forward pass keeps f'(a) rather than a and f(a); the scores buffer becomes dL/dscores in
    place; dL/dx of the first layer is never formed.
    """
    n_layers = len(weights)
    inputs, derivatives = [x], []
    for m in range(n_layers - 1):
        a = inputs[-1] @ weights[m]
        a += biases[m]
        z, derivative = ops.activation_with_derivative(activation, a, alpha)
        inputs.append(z)
        derivatives.append(derivative)
    scores = inputs[-1] @ weights[-1]
    scores += biases[-1]
    loss, dout = ops.softmax_cross_entropy_gradient(scores, labels)
    dWs, dbs = [None] * n_layers, [None] * n_layers
    for m in reversed(range(n_layers)):
        dWs[m] = inputs[m].T @ dout
        dbs[m] = dout.sum(axis=0)
        if m > 0:
            dout = dout @ weights[m].T
            dout *= derivatives[m - 1]
    return loss, dWs, dbs


# ----------------------------------------------------------------------------- choosing the parameters


def selection(select, weights) -> tuple[range, slice | None]:
    """(the layers to compute, the selected columns or None) of a numerical-gradient kernel's ``select``.

    select: None (every layer) or (layer, start, stop), layer 0-based, 0 <= start < stop <= O_layer.
    """
    if select is None:
        return range(len(weights)), None
    try:
        layer, start, stop = (operator.index(value) for value in select)
    except (TypeError, ValueError) as err:
        raise TypeError(f"select must be None or (layer, start, stop) of integers; got {select!r}") from err
    if not 0 <= layer < len(weights):
        raise ValueError(f"select layer {layer} is not one of the net's layers 0..{len(weights) - 1}")
    n_out = weights[layer].shape[1]
    if not 0 <= start < stop <= n_out:
        raise ValueError(f"select columns {start}:{stop} are not a non-empty range of layer {layer}'s {n_out}")
    return range(layer, layer + 1), slice(start, stop)


def _selected_result(xp, dWs: list, dbs: list, columns: slice | None):
    """The kernels' return value: (dWs, dbs) for the full call, else the one selected pair, contiguous."""
    if columns is None:
        return dWs, dbs
    return xp.ascontiguousarray(dWs[0]), xp.ascontiguousarray(dbs[0])


def _record_kinks(xp, kinks: dict, layer: int, rows: Array, W: Array, columns: slice | None) -> None:
    """Store a layer's kink rows (flat indices into its (I + 1, O) block) as kinks["W<l>"], kinks["b<l>"],
    keeping only the rows of the selected columns when there are any."""
    if columns is not None:
        unit = rows[:, 0] % W.shape[1]
        rows = rows[(unit >= columns.start) & (unit < columns.stop)]
    _store_kinks(xp, kinks, layer, rows, W.size)


def _n_selected(W: Array, columns: slice | None) -> int:
    """How many parameters of W and its bias the selection covers (all of them for None)."""
    n_in, n_out = W.shape
    width = n_out if columns is None else columns.stop - columns.start
    return (n_in + 1) * width


def _decay_difference(xp, values: Array, weight_decay: float, h: float) -> Array:
    """Central difference of 0.5 * weight_decay * w**2 at the given weights, as the naive loop sees it."""
    if not weight_decay:
        return xp.zeros_like(values)
    return 0.5 * weight_decay * ((values + h) ** 2 - (values - h) ** 2) / (2 * h)


# ----------------------------------------------------------------------------- the batched method


def _param_views(weights, biases):
    """(layer, part, array) for every parameter array, in the order W1, b1, W2, b2, ...; part is "W" or "b"."""
    for layer, (W, b) in enumerate(zip(weights, biases, strict=True)):
        yield layer, "W", W
        yield layer, "b", b


def numerical_gradient_batched(
    ops: Ops,
    problem: GradientProblem,
    x,
    labels,
    progress=None,
    kinks=None,
    select=None,
    *,
    chunk_bytes=BATCHED_CHUNK_BYTES,
):
    """Brute force, batched: full forward passes for many perturbed parameter sets per GEMM.

    For a chunk of k parameters the 2k perturbed sets (+h then -h) travel together as a stack
    (B, S, width). A perturbed first layer is one GEMM of x against the side-by-side perturbed
    matrices (I, S * O); a perturbed deeper layer is one batched matmul; every other layer is a
    single (B * S, in) @ (in, out) GEMM. Nothing is shared between sets: each is a full pass.

    One exact shortcut: an input feature that is zero for the whole batch adds exactly 0 to
    every product, so it is left out of x @ W1, and its row of W1 (whose loss difference is
    exactly 0) is not perturbed.

    select: the chunks of the full call (same sets, same GEMM shapes) that hold a selected entry,
    and only those, so the result is the full call's slice bit for bit. A bias range is a few
    chunks; a column range of W is every chunk that reaches those columns (all of them when a chunk
    is wider than a row of W). kinks: must be None (the brute force tracks no branches).
    """
    if kinks is not None:
        raise ValueError("numerical_gradient_batched does not report kinks: pass kinks=None")
    xp = ops.xp
    weights, biases, h = problem.weights, problem.biases, problem.h
    layers, columns = selection(select, weights)
    active = xp.flatnonzero((x != 0).any(axis=0))
    x_used = xp.ascontiguousarray(x[:, active])
    weights_used = [xp.ascontiguousarray(weights[0][active])] + list(weights[1:])
    args = (ops, weights_used, biases, x_used, labels, problem.activation, problem.alpha)
    grads = {}
    for layer, part, P in _param_views(weights, biases):
        if layer not in layers:
            continue
        flat_grad = xp.zeros(P.size, dtype=xp.float64)
        used = weights_used[layer] if part == "W" else P
        targets = xp.arange(used.size)  # flat indices into ``used``
        row_width = P.shape[1] if part == "W" else P.size  # a flat index's column is its remainder by this
        wanted = None if columns is None else partial(_chunk_reaches, row_width, columns)
        chunks = _batched_chunks(*args, layer, part, used, h, chunk_bytes, wanted)
        for start, losses in chunks:
            k = losses.size // 2
            flat_grad[_full_index(xp, layer, part, P, active, targets[start : start + k])] = (
                losses[:k] - losses[k:]
            ) / (2 * h)
            if progress is not None and columns is None:
                progress(k)
        if progress is not None and columns is None and P.size > used.size:
            progress(P.size - used.size)
        grad = flat_grad.reshape(P.shape)
        if columns is not None:
            grad = grad[:, columns] if part == "W" else grad[columns]
            if progress is not None:
                progress(grad.size)
        if part == "W":
            grad += _decay_difference(xp, P if columns is None else P[:, columns], problem.weight_decay, h)
        grads[layer, part] = grad
    dWs, dbs = [grads[m, "W"] for m in layers], [grads[m, "b"] for m in layers]
    return _selected_result(xp, dWs, dbs, columns)


def _chunk_reaches(row_width: int, columns: slice, start: int, k: int) -> bool:
    """Whether the flat indices start .. start + k - 1 of rows row_width wide hold a column in ``columns``."""
    if k >= row_width:
        return True
    first, last = start % row_width, (start + k - 1) % row_width
    if first <= last:
        return first < columns.stop and last >= columns.start
    return columns.stop > first or columns.start <= last  # the chunk wraps onto the next row


def _full_index(xp, layer, part, P, active, local):
    """Flat indices into P of the flat indices ``local`` into its used (active-rows) version."""
    if part == "W" and layer == 0:
        return active[local // P.shape[1]] * P.shape[1] + local % P.shape[1]
    return local


def _batched_chunks(
    ops: Ops, weights, biases, x, labels, activation, alpha, layer, part, P, h, chunk_bytes, wanted=None
):
    """Yield (start, losses (2k,)) for consecutive chunks of P's flat indices: +h sets, then -h sets.

    wanted: None (every chunk), or wanted(start, k) -> bool, and the chunks it rejects are skipped
    (the others are the same sets either way)."""
    xp = ops.xp
    batch = x.shape[0]
    widths = [W.shape[1] for W in weights]
    per_set = 8 * (batch * (x.shape[1] + 3 * sum(widths)) + (P.size if part == "W" else 0))
    k_max = int(max(1, min(P.size, chunk_bytes // (2 * per_set))))
    # the perturbed copies of P side by side, reused across chunks: only the moved entries change
    if part == "W" and layer == 0:
        stacked = xp.ascontiguousarray(xp.broadcast_to(P[:, None, :], (P.shape[0], 2 * k_max, P.shape[1])))
    else:
        stacked = xp.ascontiguousarray(xp.broadcast_to(P[None], (2 * k_max,) + P.shape))
    for start in range(0, P.size, k_max):
        k = min(k_max, P.size - start)
        if wanted is not None and not wanted(start, k):
            continue
        idx = xp.arange(start, start + k)
        flat_idx = xp.concatenate([idx, idx])
        signs = xp.concatenate([xp.full(k, h), xp.full(k, -h)])
        set_ids = xp.arange(2 * k)
        if part == "W":
            rows, cols = flat_idx // P.shape[1], flat_idx % P.shape[1]
            moved = (rows, set_ids, cols) if layer == 0 else (set_ids, rows, cols)
            original = P[rows, cols]
        else:
            moved = (set_ids, flat_idx)
            original = P[flat_idx]
        stacked[moved] = original + signs
        losses = _batched_losses(ops, weights, biases, x, labels, activation, alpha, layer, part, stacked, 2 * k)
        stacked[moved] = original
        yield start, losses


def _batched_losses(ops: Ops, weights, biases, x, labels, activation, alpha, layer, part, stacked, sets):
    """Loss of each of the first ``sets`` perturbed parameter sets: a full forward pass each. -> (S,)"""
    xp = ops.xp
    batch = x.shape[0]
    n_layers = len(weights)
    state = None  # (B, S, width) once the sets have diverged
    for m in range(n_layers):
        W, b = weights[m], biases[m]
        n_in, n_out = W.shape
        if m == layer and part == "W" and m == 0:  # one GEMM against the side-by-side perturbed matrices
            a = (x @ stacked[:, :sets].reshape(n_in, sets * n_out)).reshape(batch, sets, n_out)
        elif m == layer and part == "W":  # one batched matmul, a perturbed matrix per set
            a = xp.matmul(state.transpose(1, 0, 2), stacked[:sets]).transpose(1, 0, 2)
        else:
            if state is None:  # brute force: every set runs its own full pass, unperturbed layers included
                state = xp.broadcast_to(x[:, None, :], (batch, sets, n_in))
            a = (xp.ascontiguousarray(state).reshape(batch * sets, n_in) @ W).reshape(batch, sets, n_out)
        a += stacked[:sets][None] if (m == layer and part == "b") else b
        if m < n_layers - 1:
            state = ops.activation(activation, a.reshape(batch * sets, n_out), alpha).reshape(a.shape)
    return ops.set_losses(a, labels)


# ----------------------------------------------------------------------------- the incremental method


@dataclass
class ForwardCache:
    """Everything the base (unperturbed) forward pass computed, float64."""

    inputs: list  # inputs[m]: the input of layer m (B, I_m); inputs[0] is x
    pre: list  # pre[m]: x_m @ W_m + b_m (B, O_m); pre[-1] are the scores
    probs: Array  # softmax of the scores (B, C)
    per_sample_loss: Array  # (B,)


def forward_cache(xp, ops: Ops, weights, biases, x, labels, activation, alpha) -> ForwardCache:
    inputs, pre = [x], []
    for m, (W, b) in enumerate(zip(weights, biases, strict=True)):
        a = inputs[-1] @ W + b
        pre.append(a)
        if m < len(weights) - 1:
            inputs.append(ops.activation(activation, a, alpha))
    shifted, e, total = log_softmax_parts(xp, pre[-1])
    picked = xp.take_along_axis(shifted, labels[:, None], axis=1)[:, 0]
    return ForwardCache(inputs, pre, e / total, xp.log(total[:, 0]) - picked)


def _segment_sums(xp, values: Array, starts: Array) -> Array:
    """Sums of consecutive segments of ``values`` starting at ``starts`` (NumPy: fixed order, deterministic;
    an array module without ufunc.reduceat, CuPy, sums by segment id)."""
    if hasattr(xp.add, "reduceat"):
        return xp.add.reduceat(values, starts)
    segment = xp.searchsorted(starts, xp.arange(values.size), side="right") - 1
    return xp.bincount(segment, weights=values, minlength=starts.size)


def _last_layer_differences(xp, cache: ForwardCache, labels, h):
    """Central differences of the mean loss for W_L and b_L: one score column moves by +-d.

    With d = h * z[b, i], the new log-sum-exp is lse + log1p(p[b, j] * expm1(+-d)) (the base
    softmax reused), and the picked score moves by +-d when j is the label.
    """
    z = cache.inputs[-1]
    batch = z.shape[0]
    p = cache.probs
    onehot = xp.zeros_like(p)
    onehot[xp.arange(batch), labels] = 1.0

    def summed(d):  # d: (B, I) -> sum over b of the +h minus the -h loss change, (I, C)
        plus = xp.log1p(p[:, None, :] * xp.expm1(d)[:, :, None])
        minus = xp.log1p(p[:, None, :] * xp.expm1(-d)[:, :, None])
        return (plus - minus).sum(axis=0) - 2 * (d.T @ onehot)

    dW = summed(h * z) / (2 * h * batch)
    db = summed(xp.full((batch, 1), h))[0] / (2 * h * batch)
    return dW, db


def numerical_gradient_incremental(
    ops: Ops, problem: GradientProblem, x, labels, progress=None, kinks=None, select=None
):
    """Exact central differences, recomputing only what each perturbation changes.

    Moving W_l[i, j] by +-h moves column j of layer l's pre-activation by +-h * input[:, i]
    (and nothing else): the layers before l come from the cached base pass, the next layer's
    input changes by a rank-1 term, and only the rest of the pass is recomputed, for just the
    samples whose input[b, i] is non-zero. An input that is zero for the whole batch gives a
    loss difference of exactly 0, so it is skipped (b_l behaves like an input of ones).
    ``kinks``: see kernels/__init__ (the recomputed pre-activations are compared with the base pass).

    select: a hidden layer computes only the selected columns (each column is its own loop
    iteration over the same (input, sample) pairs, so they are the full call's bit for bit), and so
    does ops.hidden_to_output where a backend has one; the output layer (closed form over the whole
    layer, cheap) is computed whole and sliced.
    """
    xp = ops.xp
    weights, biases, activation = problem.weights, problem.biases, problem.activation
    alpha, h = problem.alpha, problem.h
    n_layers = len(weights)
    layers, columns = selection(select, weights)
    cache = forward_cache(xp, ops, weights, biases, x, labels, activation, alpha)
    detect = kinks is not None and isinstance(activation, str) and activation in _KINKED
    chosen = slice(None) if columns is None else columns
    units = None if columns is None else range(columns.start, columns.stop)
    dWs, dbs = [], []
    for layer in layers:
        W = weights[layer]
        crossings = [] if detect else None
        if layer == n_layers - 1:
            dW, db = _last_layer_differences(xp, cache, labels, h)
            if columns is not None:
                dW, db = dW[:, columns], db[columns]
        elif layer == n_layers - 2 and ops.hidden_to_output is not None:
            dW, db = ops.hidden_to_output(cache, weights, biases, labels, activation, alpha, h, layer, units)
            if detect:
                crossings.append(_unit_crossing_rows(xp, cache, h, layer))
        else:
            dW, db = _hidden_layer_differences(
                ops, cache, weights, biases, labels, activation, alpha, h, layer, units, crossings
            )
        dW += _decay_difference(xp, W[:, chosen], problem.weight_decay, h)
        dWs.append(dW)
        dbs.append(db)
        if kinks is not None:
            rows = _first_row_per_entry(xp, xp.concatenate(crossings)) if crossings else _kink_rows(xp)
            _record_kinks(xp, kinks, layer, rows, W, columns)
        if progress is not None:
            progress(_n_selected(W, columns))
    return _selected_result(xp, dWs, dbs, columns)


def _unit_crossing_rows(xp, cache: ForwardCache, h, layer) -> Array:
    """Kink rows (flat index into the (I + 1, J) block, sample, layer + 1, unit) of the hidden layer that
    feeds the output: moving W[i, j] (or b[j]) can change the branch of z[b, j] alone. Chunks of samples."""
    a, z = cache.inputs[layer], cache.pre[layer]
    batch, n_in = a.shape
    n_out = z.shape[1]
    steps = h * xp.concatenate([a, xp.ones((batch, 1), dtype=a.dtype)], axis=1)
    per_sample = max(1, 8 * (n_in + 1) * n_out)
    chunk = int(max(1, SERIES_CHUNK_BYTES // per_sample))
    rows = []
    for start in range(0, batch, chunk):
        part = slice(start, min(start + chunk, batch))
        base = z[part][:, None, :]
        step = steps[part][:, :, None]
        positive = base > 0
        hit = (((base + step) > 0) != positive) | (((base - step) > 0) != positive)
        hit &= step != 0
        b, i, j = xp.nonzero(hit)
        rows.append(xp.stack([i * n_out + j, b + start, xp.full(b.size, layer + 1), j], axis=1))
    return _kink_rows(xp, xp.concatenate(rows))


def _hidden_layer_differences(
    ops: Ops, cache: ForwardCache, weights, biases, labels, activation, alpha, h, layer, columns=None, crossings=None
):
    """(dW, db) of hidden layer ``layer``, for its output units ``columns`` (default: all), in that order.

    crossings: None, or a list that gets int64 (n, 4) kink rows (flat index into the (I + 1, n_out)
    block, sample, 1-based layer, unit) of every perturbation that changes a relu/leaky branch.
    """
    xp = ops.xp
    z_in = cache.inputs[layer]
    batch, n_in = z_in.shape
    n_out = weights[layer].shape[1]
    n_layers = len(weights)
    # (i, b) pairs with a non-zero input, ordered by i; a trailing "input of ones" row for the bias
    with_bias = xp.concatenate([z_in.T, xp.ones((1, batch), dtype=z_in.dtype)])
    rows, samples = xp.nonzero(with_bias)
    steps = h * with_bias[rows, samples]
    active_rows, starts = xp.unique(rows, return_index=True)
    pre_next = cache.pre[layer + 1][samples]
    base_loss = cache.per_sample_loss[samples]
    sample_labels = labels[samples]
    probs = cache.probs[samples]
    W_next = weights[layer + 1]
    columns = range(n_out) if columns is None else columns
    grad = xp.zeros((n_in + 1, len(columns)), dtype=xp.float64)

    def loss_change(j, step, hits):
        a = cache.pre[layer][samples, j]
        moved = a + step
        dz = ops.activation(activation, moved[:, None], alpha)[:, 0] - cache.inputs[layer + 1][samples, j]
        if hits is not None:
            _mark_crossings(xp, hits, (moved > 0) != (a > 0), layer + 1, j)
        if layer + 1 == n_layers - 1:  # next layer is the output: reuse the base softmax
            shift = dz[:, None] * W_next[j][None, :]
            picked = xp.take_along_axis(shift, sample_labels[:, None], axis=1)[:, 0]
            return xp.log1p((probs * xp.expm1(shift)).sum(axis=1)) - picked
        a_next = pre_next + dz[:, None] * W_next[j][None, :]
        for m in range(layer + 2, n_layers):
            if hits is not None:
                flips = (a_next > 0) != (cache.pre[m - 1][samples] > 0)
                _mark_crossings(xp, hits, flips.any(axis=1), m, flips.argmax(axis=1))
            a_next = ops.activation(activation, a_next, alpha) @ weights[m] + biases[m]
        shifted, _, total = log_softmax_parts(xp, a_next)
        picked = xp.take_along_axis(shifted, sample_labels[:, None], axis=1)[:, 0]
        return (xp.log(total[:, 0]) - picked) - base_loss

    for k, j in enumerate(columns):
        hits = None if crossings is None else [xp.full(samples.size, -1, dtype=xp.int64) for _ in range(2)]
        diff = loss_change(j, steps, hits) - loss_change(j, -steps, hits)
        grad[active_rows, k] = _segment_sums(xp, diff, starts)
        if hits is not None:
            found = hits[0] >= 0
            flat = rows[found] * n_out + j
            crossings.append(_kink_rows(xp, xp.stack([flat, samples[found], hits[0][found], hits[1][found]], axis=1)))
    grad /= 2 * h * batch
    return grad[:n_in], grad[n_in]


def _mark_crossings(xp, hits, crossed, layer, unit) -> None:
    """Record (layer, unit) in hits = [layers, units] (per pair) where crossed and nothing recorded yet."""
    new = crossed & (hits[0] < 0)
    hits[0][...] = xp.where(new, layer, hits[0])
    hits[1][...] = xp.where(new, unit, hits[1])


# ----------------------------------------------------------------------------- the series method
#
# docs/series.md derives this and proves the bounds; the names below follow it. Moving W_l[i, j]
# by u = +-h a_l[b, i] (b_l[j]: a = 1) moves only z_l[b, j]. The loss of sample b is then an
# analytic function g_bj(u) whose odd Taylor coefficients L_n give the central difference
#     dW_l[i, j] = (1/B) sum_b sum_{odd n <= K} h^(n-1) a_l[b, i]^n L_n[b, j],
# K/2 GEMMs per layer. K is the smallest odd order whose Cauchy tail bound is below SERIES_TAIL in
# every entry; a (sample, unit) pair whose bound fails at SERIES_MAX_ORDER, and, on relu/leaky
# nets, a (sample, input, unit) triple whose step reaches a kink, is evaluated directly instead.

SERIES_TAIL = 2.0**-44  # proven bound on the truncation error of each gradient entry (absolute, ~5.7e-14)
SERIES_MAX_ORDER = 25  # highest Taylor order summed; beyond it a (sample, unit) pair is evaluated directly
SERIES_CHUNK_BYTES = 64 * 2**20  # working set of one chunk of units (and of one chunk of direct evaluations)
_LOSS_RADIUS = math.log(1.5)  # R * max_c |v_c - v_t|: the softmax sum stays within 1/2 of 1 on |u| <= R
# smooth activations: (theta, F2) with f analytic on the strip |Im w| <= theta and |f''| <= F2 there
SERIES_STRIPS = {"sigmoid": (math.pi / 2, 0.5), "tanh": (math.pi / 4, 4.0)}
SERIES_RADIUS_FACTORS = (32.0, 2048.0)  # R / rho of the propagated smooth bounds (a ladder of powers of 2 uses them)
_KINKED = ("relu", "leaky_relu")


def _errstate(xp):
    """numpy's errstate silencing inf/nan warnings of deliberate divisions; cupy warns not."""
    errstate = getattr(xp, "errstate", None)
    return errstate(divide="ignore", invalid="ignore", over="ignore") if errstate else contextlib.nullcontext()


def _kink_rows(xp, rows=None) -> Array:
    """int64 (n, 4) kink-diagnostic rows; empty (0, 4) when rows is None."""
    if rows is None:
        return xp.zeros((0, 4), dtype=xp.int64)
    return xp.asarray(rows, dtype=xp.int64).reshape(-1, 4)


def _first_row_per_entry(xp, rows: Array) -> Array:
    """One row per parameter entry (column 0), the first of each entry's rows in order of sample."""
    if rows.shape[0] == 0:
        return rows
    order = xp.lexsort(xp.stack([rows[:, 1], rows[:, 0]]))
    rows = rows[order]
    _, first = xp.unique(rows[:, 0], return_index=True)
    return rows[first]


def _store_kinks(xp, kinks: dict, layer: int, rows: Array, n_weights: int) -> None:
    """Split rows indexing the flattened (I + 1, J) block of a layer into kinks["W<l>"] and kinks["b<l>"]."""
    in_W = rows[:, 0] < n_weights
    kinks[f"W{layer + 1}"] = rows[in_W]
    bias_rows = rows[~in_W].copy()
    bias_rows[:, 0] -= n_weights
    kinks[f"b{layer + 1}"] = bias_rows


def numerical_gradient_series(ops: Ops, problem: GradientProblem, x, labels, progress=None, kinks=None, select=None):
    """Central differences from the Taylor series of each sample's loss in the one moved scalar.

    problem: float64 weights/biases (W_m (I_m, O_m), b_m (O_m,)); x float64 (B, I); labels int (B,).
    Returns float64 (dWs, dbs) like numerical_gradient_incremental, to within SERIES_TAIL of the
    exact central difference in every entry (plus rounding), see docs/series.md. Pairs and triples the
    bounds do not cover are evaluated directly; an activation other than the built-in names (no provable
    bound) is evaluated directly everywhere, by numerical_gradient_incremental. ``kinks``: see kernels/__init__.

    select: the selected layer alone is computed, whole, and then sliced. The order K is chosen per
    chunk of units, so a narrower range could sum other orders (the same to within SERIES_TAIL, not
    bit for bit); the whole layer gives the full call's slice bit for bit.
    """
    weights, biases, activation = problem.weights, problem.biases, problem.activation
    alpha, h = problem.alpha, problem.h
    if not (isinstance(activation, str) and activation in (*_KINKED, *SERIES_STRIPS)):
        return numerical_gradient_incremental(ops, problem, x, labels, progress, kinks, select)
    xp = ops.xp
    n_layers = len(weights)
    layers, columns = selection(select, weights)
    chosen = slice(None) if columns is None else columns
    cache, derivatives = _series_forward(xp, ops, weights, biases, x, labels, activation, alpha)
    detect = kinks is not None and activation in _KINKED
    plan = None
    if activation in _KINKED and n_layers > 2:
        next_radius = _next_layer_radii(ops, cache, derivatives, weights)
        plan = (
            _logit_jacobians(xp, derivatives, weights),
            next_radius,
            _later_kink_bounds(xp, cache, derivatives, weights, next_radius),
        )
    dWs, dbs = [], []
    for layer in layers:
        if layer == n_layers - 1:
            last = _last_layer_series(ops, cache, labels, h)
            dW, db = last or _last_layer_differences(xp, cache, labels, h)
            rows = _kink_rows(xp)
        else:
            dW, db, rows = _series_layer_differences(
                ops, cache, derivatives, weights, biases, labels, activation, alpha, h, layer, detect, plan
            )
        dW, db = dW[:, chosen], db[chosen]
        if problem.weight_decay:
            dW += _decay_difference(xp, weights[layer][:, chosen], problem.weight_decay, h)
        dWs.append(dW)
        dbs.append(db)
        if kinks is not None:
            _record_kinks(xp, kinks, layer, rows, weights[layer], columns)
        if progress is not None:
            progress(_n_selected(weights[layer], columns))
    return _selected_result(xp, dWs, dbs, columns)


def _series_forward(xp, ops: Ops, weights, biases, x, labels, activation, alpha):
    """(ForwardCache, [f'(z_m) (B, O_m) for each hidden layer]): the base pass with each hidden activation and
    its derivative from one fused sweep (ops.activation_with_derivative), as forward_cache would give them."""
    inputs, pre, derivatives = [x], [], []
    for m, (W, b) in enumerate(zip(weights, biases, strict=True)):
        a = inputs[-1] @ W
        a += b
        pre.append(a)
        if m < len(weights) - 1:
            y, slope = ops.activation_with_derivative(activation, a, alpha)
            inputs.append(y)
            derivatives.append(slope)
    shifted, e, total = log_softmax_parts(xp, pre[-1])
    picked = xp.take_along_axis(shifted, labels[:, None], axis=1)[:, 0]
    e /= total
    return ForwardCache(inputs, pre, e, xp.log(total[:, 0]) - picked), derivatives


def _last_layer_series(ops: Ops, cache: ForwardCache, labels, h):
    """(dW, db) of the output layer by the series, or None when some (sample, class) pair needs more
    than SERIES_MAX_ORDER terms (the caller then takes the closed form, _last_layer_differences)."""
    xp = ops.xp
    coefficients = (ops.last_layer_coefficients or partial(_last_layer_coefficients, xp))(cache, labels, h)
    if coefficients is None:
        return None
    odd = coefficients[::2]
    stacked = (ops.stacked_steps or partial(_stacked_steps, xp))(cache.inputs[-1], h, len(odd))
    grad = _odd_series_gradient(xp, stacked, odd, h)
    return grad[:-1], grad[-1]


def _last_layer_coefficients(xp, cache: ForwardCache, labels, h):
    """[L_1..L_K] (B, C) each: the output layer's loss coefficients, or None when some pair needs more than
    SERIES_MAX_ORDER terms.

    Moving W[i, c] by u/h moves score c alone: g(u) - g(0) = log(1 + p_c expm1(u)) - u [c = t]. The
    log's argument has the coefficients p_c / n!, so L = log E by the recurrence of _loss_series. On
    |u| <= R = log1p(1 / (2 p_c)), |p_c expm1(u)| <= 1/2, so |log(...)| <= ln 2 (docs/series.md, 5).
    """
    z = cache.inputs[-1]
    batch = z.shape[0]
    p = cache.probs
    rho = h * xp.maximum(xp.abs(z).max(axis=1), 1.0)  # max |u| over the inputs and the bias (u = +-h)
    with _errstate(xp):
        radius = xp.log1p(0.5 / p)
        ratio = xp.where(xp.isfinite(radius), rho[:, None] / radius, 0.0)
    needed = _order_needed(xp, ratio, xp.full(p.shape, math.log(2.0)), h)
    if bool((needed > SERIES_MAX_ORDER).any()):
        return None
    order = _largest_order(xp, needed)
    E, L = [None], []
    for n in range(1, order + 1):
        E.append(p / math.factorial(n))
        value = E[n]
        for k in range(1, n):
            value = value - (k / n) * L[k - 1] * E[n - k]
        L.append(value)
    L[0] = L[0].copy()
    L[0][xp.arange(batch), labels] -= 1.0
    return L


def _stacked_steps(xp, a, h, count, stacked=None):
    """(count B, I + 1) float64, the left operand of the odd-order GEMM: block k holds the steps' powers
    (h a)^(2k+1) (B, I) and, in the last column, h^(2k+1) (the bias: an input of ones). a: (B, I).

    stacked: an earlier result for the same a and h, returned as is when it has count blocks, else extended."""
    batch, n_in = a.shape
    have = 0 if stacked is None else stacked.shape[0] // batch
    if have >= count:
        return stacked
    grown = xp.empty((count * batch, n_in + 1), dtype=xp.float64)
    if have:
        grown[: have * batch] = stacked
    else:
        xp.multiply(a, h, out=grown[:batch, :n_in])
        grown[:batch, n_in] = h
        have = 1
    if count > have:
        step_squared = grown[:batch] * grown[:batch]
        for k in range(have, count):
            xp.multiply(grown[(k - 1) * batch : k * batch], step_squared, out=grown[k * batch : (k + 1) * batch])
    return grown


def _odd_series_gradient(xp, stacked, odd, h):
    """(I + 1, J) float64: sum over odd n of (h a)^n.T @ L_n / (h B), the weights' rows then the bias row,
    as one GEMM of the stacked steps (_stacked_steps, at least len(odd) blocks) with the stacked [L_1, L_3, ...]."""
    batch = odd[0].shape[0]
    scale = 1.0 / (h * batch)
    if len(odd) == 1:
        right = odd[0] * scale
    else:
        right = xp.concatenate(odd, axis=0)
        right *= scale
    return stacked[: len(odd) * batch].T @ right


def _series_layer_differences(
    ops: Ops, cache, derivatives, weights, biases, labels, activation, alpha, h, layer, detect, plan=None
):
    """(dW (I, J), db (J,), kink rows (n, 4)) of hidden layer ``layer`` by the series, chunks of units.

    plan: relu/leaky only, (logit Jacobians, next-layer inverse radii, later kink bounds) of the whole pass,
    shared by the layers.

    Kink rows index the flattened (I + 1, J) block: W entries first, then the biases (i = I).
    """
    xp = ops.xp
    a = cache.inputs[layer]
    batch, n_in = a.shape
    n_out = weights[layer].shape[1]
    # (B,): |u| <= rho for every input of the sample, bias (a = 1) included; equal to max |h a| since
    # rounding h * x is monotone in x (max |a| from two reductions, without an |a| temporary)
    rho = h * xp.maximum(xp.maximum(a.max(axis=1), -a.min(axis=1)), 1.0)
    moved_inputs = stacked = None
    stacked_steps = ops.stacked_steps or partial(_stacked_steps, xp)
    if layer == len(weights) - 2:  # (B, Jc, C) arrays only
        per_unit = 8 * batch * weights[-1].shape[1] * 8
    elif activation in _KINKED:  # (B, Jc, n) arrays of the next layer's radius only
        per_unit = 8 * batch * weights[layer + 1].shape[1] * 6
    else:
        widest = max(W.shape[1] for W in weights[layer:])
        per_unit = 8 * batch * widest * (2 * SERIES_MAX_ORDER + 3 * (len(weights) - layer) + 8)
    width = int(max(1, min(n_out, SERIES_CHUNK_BYTES // per_unit)))
    grad = None if width >= n_out else xp.empty((n_in + 1, n_out), dtype=xp.float64)
    kink_rows = []
    for first in range(0, n_out, width):
        cols = slice(first, min(first + width, n_out))
        if layer == len(weights) - 2:
            pair_series = ops.output_feeding_series or partial(_output_feeding_pair_series, xp)
            coefficients, needed, inverse_radius = pair_series(
                cache, derivatives, weights, labels, activation, layer, cols, rho, h
            )
        elif activation in _KINKED:
            coefficients, needed, inverse_radius = _piecewise_pair_series(
                xp, cache, derivatives, weights, labels, layer, cols, rho, h, plan, ops.direction_series
            )
        else:
            if moved_inputs is None:  # (B,): direct evaluations a fallback pair of the sample costs
                moved_inputs = (h * a != 0).sum(axis=1) + 1
            coefficients, needed = _smooth_pair_series(
                xp, cache, derivatives, weights, labels, activation, layer, cols, rho, h, moved_inputs
            )
            inverse_radius = None
        fallback = needed > len(coefficients)  # (B, Jc)
        any_fallback = bool(fallback.any())
        # sum over odd n of (h a)^n.T @ L_n / (h B), the bias row (a = 1) included, as one GEMM over the stacked
        # orders; the steps' powers are shared by the chunks (extended when a chunk needs more orders)
        odd = [
            xp.where(fallback, 0.0, coefficients[n - 1]) if any_fallback else coefficients[n - 1]
            for n in range(1, len(coefficients) + 1, 2)
        ]
        stacked = stacked_steps(a, h, len(odd), stacked)
        if grad is None:  # one chunk: the GEMM's result is the gradient
            grad = _odd_series_gradient(xp, stacked, odd, h)
        else:
            grad[:, cols] = _odd_series_gradient(xp, stacked, odd, h)
        # direct evaluation: every moved input of a fallback pair; on relu nets also the triples past a kink radius
        reach = None
        if inverse_radius is not None:
            reach = rho[:, None] * inverse_radius >= 1
            if any_fallback:
                reach &= ~fallback
            if not bool(reach.any()):
                reach = None
        if not any_fallback and reach is None:
            continue
        steps = stacked[:batch]  # (B, I + 1): u / sign, the bias last
        pair_b, pair_j = xp.nonzero(fallback)
        moved = steps[pair_b] != 0
        t_pair, t_i = xp.nonzero(moved)
        samples, units, inputs = pair_b[t_pair], pair_j[t_pair], t_i
        corrected = None
        if reach is not None:
            near_b, near_j = xp.nonzero(reach)
            past = xp.abs(steps[near_b]) * inverse_radius[near_b, near_j][:, None] >= 1  # (n_near, I + 1)
            past &= steps[near_b] != 0
            k_pair, k_i = xp.nonzero(past)
            corrected = (near_b[k_pair], near_j[k_pair], k_i)
            samples = xp.concatenate([samples, corrected[0]])
            units = xp.concatenate([units, corrected[1]])
            inputs = xp.concatenate([inputs, corrected[2]])
        if samples.size == 0:
            continue
        u = steps[samples, inputs]
        diff, cross_layer, cross_unit = _direct_differences(
            ops, cache, weights, biases, labels, activation, alpha, layer, samples, units + first, u, detect
        )
        values = diff / (2 * h * batch)
        if corrected is not None and corrected[0].size:  # remove the series' value of the triples past a kink
            nb, nj, ni = corrected
            su = steps[nb, ni]
            series_value = xp.zeros(nb.size, dtype=xp.float64)
            power = su
            for n, L_n in enumerate(coefficients, start=1):
                if n % 2:
                    series_value += power * L_n[nb, nj]
                if n < len(coefficients):
                    power = power * su
            values[values.size - nb.size :] -= series_value / (h * batch)
        flat = inputs * n_out + units + first
        grad += xp.bincount(flat, weights=values, minlength=grad.size).reshape(grad.shape)
        if detect:
            hit = cross_layer >= 0
            kink_rows.append(xp.stack([flat[hit], samples[hit], cross_layer[hit], cross_unit[hit]], axis=1))
    rows = _first_row_per_entry(xp, xp.concatenate(kink_rows) if kink_rows else _kink_rows(xp))
    return grad[:n_in], grad[n_in], rows


def _propagate(xp, T: Array, W: Array) -> Array:
    """(B, J, n) @ (n, n') as one GEMM over all (sample, unit) pairs -> (B, J, n')."""
    batch, units, n = T.shape
    return (xp.ascontiguousarray(T).reshape(batch * units, n) @ W).reshape(batch, units, W.shape[1])


def _inverse_kink_radius(xp, T: Array, z: Array) -> Array:
    """max over q of |T[b, j, q]| / |z[b, q]| (inf where z = 0 and T != 0): 1 / the step radius. (B, J)."""
    magnitude = xp.abs(z)
    safe = xp.where(magnitude > 0, magnitude, 1.0)
    inverse = xp.where(magnitude > 0, 1.0 / safe, 0.0)
    result = (xp.abs(T) * inverse[:, None, :]).max(axis=2)
    at_zero = magnitude == 0
    if bool(at_zero.any()):
        touched = (xp.abs(T) * at_zero[:, None, :]).max(axis=2) > 0
        result = xp.where(touched, xp.inf, result)
    return result


def _next_layer_inverse_radius(xp, slope: Array, W_next: Array, z: Array) -> Array:
    """_inverse_kink_radius of T[b, j, q] = slope[b, j] W_next[j, q] without forming T: (B, J).

    max_q |T| / |z_q| = |slope[b, j]| max_q |W_next[j, q]| / |z[b, q]| (inf where some z[b, q] = 0 meets
    T != 0): one (B, J, n) product instead of four, the zero test a GEMM of indicators."""
    magnitude = xp.abs(z)
    safe = xp.where(magnitude > 0, magnitude, 1.0)
    inverse = xp.where(magnitude > 0, 1.0 / safe, 0.0)
    W_abs = xp.abs(W_next)
    result = xp.abs(slope) * (W_abs[None, :, :] * inverse[:, None, :]).max(axis=2)
    at_zero = magnitude == 0
    if bool(at_zero.any()):
        touched = (at_zero.astype(xp.float64) @ (W_abs > 0).astype(xp.float64).T > 0) & (slope != 0)
        result = xp.where(touched, xp.inf, result)
    return result


def _probability_weighted(xp, A: Array, probs: Array) -> Array:
    """sum_c A[b, j, c] probs[b, c] as (B, J): a batched matrix-vector product (a reduction over the short
    last axis is several times slower in NumPy)."""
    return xp.matmul(A, probs[:, :, None])[..., 0]


def _max_over_classes(xp, A: Array) -> Array:
    """A.max(axis=2) for a short last axis (the classes), by elementwise maxima: same values, faster. (B, J)."""
    result = A[..., 0].copy()
    for c in range(1, A.shape[-1]):
        xp.maximum(result, A[..., c], out=result)
    return result


def _label_component(xp, V: Array, labels: Array) -> Array:
    """V[b, j, labels[b]] as (B, J, 1)."""
    index = xp.broadcast_to(labels[:, None, None], V.shape[:2] + (1,))
    return xp.take_along_axis(V, index, axis=2)


def _output_feeding_pair_series(xp, cache, derivatives, weights, labels, activation, layer, cols, rho, h):
    """The hidden layer that feeds the scores: (coefficients [L_1..L_K] (B, Jc), order needed, inverse radius or None).

    Here g(u) = phi(y(u)) with y(u) = f(z + u) - f(z) the unit's change (a scalar) and
    phi(y) = log sum_c p_c exp(y d_c), d_c = W_next[j, c] - W_next[j, t]: phi's coefficients are the
    cumulants of d under p (moments, then the log recurrence), composed with y's Taylor series, all
    (B, Jc) work after 2K (B, Jc, C) passes. Bound: on |u| <= R, |y(u)| <= |f'(z)| R + F2 R^2 / 2
    (relu below its kink: F2 = 0), so |phi| <= -log(1 - expm1((|f'| R + F2 R^2 / 2) max|d|)); R is
    the largest radius (at most theta) that keeps the expm1 at 1/2 (docs/series.md, section 4).
    """
    W_next = weights[layer + 1][cols]  # (Jc, C)
    # d[b, j, c] = W_next[j, c] - W_next[j, t] depends on the sample only through its label t: tables over (t, j, c)
    spread = W_next[None, :, :] - W_next.T[:, :, None]  # (C, Jc, C)
    widest = xp.abs(spread).max(axis=2)[labels]  # (B, Jc): max_c |d|
    slope = derivatives[layer][:, cols]
    a = xp.abs(slope) * widest
    inverse_radius = None
    if activation in _KINKED:
        z = cache.pre[layer][:, cols]
        with _errstate(xp):
            inverse_radius = xp.where(z != 0, 1.0 / xp.where(z != 0, xp.abs(z), 1.0), xp.inf)
        reach = xp.minimum(rho[:, None], xp.where(inverse_radius > 0, 1.0 / inverse_radius, xp.inf))
        c = xp.zeros_like(a)
        theta = xp.inf
    else:
        theta, f2 = SERIES_STRIPS[activation]
        reach = xp.broadcast_to(rho[:, None], a.shape)
        c = 0.5 * f2 * widest
    with _errstate(xp):
        largest = 2 * _LOSS_RADIUS / (a + xp.sqrt(a * a + 4 * c * _LOSS_RADIUS))  # a R + c R^2 = ln 1.5
        radius = xp.minimum(largest, theta)
        finite = xp.isfinite(radius)  # else d = 0 or f' = 0 with no curvature: g is constant, K = 1
        exponent = xp.where(finite, a * radius + c * radius * radius, 0.0)
        bound = -xp.log1p(-xp.expm1(exponent))
        ratio = xp.where(finite, reach / xp.where(finite, radius, 1.0), 0.0)
    needed = _order_needed(xp, ratio, bound, h)
    order = _largest_order(xp, needed)
    # phi's coefficients: E_n = sum_c p_c d^n / n!, one GEMM of p with the tables d^n / n! of every label,
    # of which each sample keeps its own label's; then L = log E
    moments = _label_moments(xp, cache.probs, W_next, labels, order, spread)
    E, phi = [None], []
    for n in range(1, order + 1):
        E.append(moments[:, n - 1])
        value = E[n]
        for k in range(1, n):
            value = value - (k / n) * phi[k - 1] * E[n - k]
        phi.append(value)
    if activation in _KINKED:  # y(u) = f'(z) u exactly below the kink
        power, coefficients = slope, []
        for n in range(1, order + 1):
            coefficients.append(phi[n - 1] * power)
            power = power * slope
        return coefficients, needed, inverse_radius
    y = _activation_series(activation, cache.inputs[layer + 1][:, cols], slope, [1.0], order)
    coefficients = [phi[0] * c for c in y]
    power = y  # coefficients 1..K of y(u)^m, zero below order m
    for m in range(2, order + 1):
        power = [0.0] * (m - 1) + [
            sum(power[k - 1] * y[n - k - 1] for k in range(m - 1, n)) for n in range(m, order + 1)
        ]
        for n in range(m, order + 1):
            coefficients[n - 1] = coefficients[n - 1] + phi[m - 1] * power[n - 1]
    return coefficients, needed, inverse_radius


def _label_moments(xp, probs, W_next, labels, order, spread=None):
    """(B, K, Jc) float64: E_n[b, j] = sum_c p[b, c] d^n / n! with d = W_next[j, c] - W_next[j, labels[b]], n = 1..K.

    d depends on the sample only through its label: one GEMM of p (B, C) with the tables d^n / n! of
    every label (K, C, Jc, C), of which each sample keeps its own label's."""
    batch, classes = probs.shape
    if spread is None:
        spread = W_next[None, :, :] - W_next.T[:, :, None]  # (C, Jc, C): [t, j, c]
    term, tables = spread, [spread]
    for n in range(2, order + 1):
        term = term * spread / n
        tables.append(term)
    moments = probs @ xp.stack(tables).reshape(-1, classes).T  # (B, K C Jc)
    return moments.reshape(batch, order, classes, -1)[xp.arange(batch), :, labels]


def _logit_jacobians(xp, derivatives, weights):
    """[J_0, .., J_(L-2)]: J_m[b] = d scores / d z_m[b], (B, C, n_m), backward: J_m = (J_(m+1) W_(m+1)^T) * f'(z_m).

    For relu/leaky below the kink radius, column j of J_l[b] is the direction v(b, j) the scores
    move along: one (B C, n) @ (n, n') GEMM per layer for all units of every layer."""
    n_layers = len(weights)
    batch = derivatives[0].shape[0]
    jacobians = [None] * (n_layers - 1)
    J = xp.broadcast_to(weights[-1].T[None], (batch,) + weights[-1].T.shape) * derivatives[-1][:, None, :]
    jacobians[-1] = J
    for m in range(n_layers - 3, -1, -1):
        classes, n_next = J.shape[1], J.shape[2]
        J = (xp.ascontiguousarray(J).reshape(batch * classes, n_next) @ weights[m + 1].T).reshape(batch, classes, -1)
        J = J * derivatives[m][:, None, :]
        jacobians[m] = J
    return jacobians


_HUGE = 1e300  # stands for 1 / |z| at z = 0 in the radius bounds (0 * _HUGE = 0: a unit nothing moves)


def _next_layer_radii(ops: Ops, cache, derivatives, weights):
    """[N_0, .., N_(L-3)], N_k (B, n_k) = max_q |T_(k+1)[b, j, q]| / |z_(k+1)[b, q]| for a unit j of layer k:
    the exact next-layer term of the kink radius (_next_layer_inverse_radius), for every hidden layer
    whose next layer is hidden too, in chunks of units that keep the (B, Jc, n) product within
    SERIES_CHUNK_BYTES (ops.next_layer_inverse_radius, where given, takes whole layers)."""
    xp = ops.xp
    radii = []
    for k in range(len(weights) - 2):
        slope, W_next, z_next = derivatives[k], weights[k + 1], cache.pre[k + 1]
        if ops.next_layer_inverse_radius is not None:
            radii.append(ops.next_layer_inverse_radius(slope, W_next, z_next))
            continue
        batch, units = slope.shape
        width = int(max(1, min(units, SERIES_CHUNK_BYTES // (8 * batch * W_next.shape[1] * 2))))
        if width >= units:
            radii.append(_next_layer_inverse_radius(xp, slope, W_next, z_next))
            continue
        parts = [
            _next_layer_inverse_radius(xp, slope[:, first : first + width], W_next[first : first + width], z_next)
            for first in range(0, units, width)
        ]
        radii.append(xp.concatenate(parts, axis=1))
    return radii


def _later_kink_bounds(xp, cache, derivatives, weights, next_radius):
    """[S_0, .., S_(L-2)], S_l (B, n_l) >= max over m >= l + 2, q of |T_m[b, j, q]| / |z_m[b, q]| (0 if none).

    T_m[b, j, :] = d z_m[b, :] / d z_l[b, j] = sum_r T_(m-1)[b, j, r] D_(m-1)[b, r] W_m[r, :], so
    max_q |T_m| / |z_m| <= sum_r |T_(m-1)[b, j, r]| c_m[b, r] with c_m = next_radius[m - 1] (the exact
    max_q |D_(m-1)[r] W_m[r, q]| / |z_m[q]|). Bounding |T_(m-1)| <= |D_l[j] W_(l+1)[j]| |D W| ... entrywise,
    w_(l->m) = |D_l| * (w_(l+1->m) @ |W_(l+1)|^T) from w_(m-1->m) = c_m bounds it for every j at once:
    (B, n) matrix products, so the radius bound costs nothing like the forward carry."""
    n_layers = len(weights)
    bounds = [xp.zeros_like(d) for d in derivatives]
    for m in range(2, n_layers - 1):
        w = xp.minimum(next_radius[m - 1], _HUGE)  # inf where a moved unit sits at z = 0: 0 * inf must stay 0
        for k in range(m - 2, -1, -1):
            w = xp.minimum(xp.abs(derivatives[k]) * (w @ xp.abs(weights[k + 1]).T), _HUGE)
            bounds[k] = xp.maximum(bounds[k], w)
    return bounds


def _piecewise_pair_series(xp, cache, derivatives, weights, labels, layer, cols, rho, h, plan, direction_series=None):
    """relu/leaky: (loss coefficients [L_1..L_K] (B, Jc) each, order needed (B, Jc), inverse kink radius (B, Jc)).

    direction_series: a backend's compiled form of the loss series and its order (Ops.direction_series).

    Below the kink radius the scores move along v(b, j) (plan: the logit Jacobians), and
    g(u) = log sum_c p_c exp(u (v_c - v_t)): its series is the loss series of that direction.
    The inverse radius is exact for the unit itself and the next layer (elementwise), bounded
    above for later layers (plan: _later_kink_bounds); only the pairs that bound cannot clear
    (rho * bound >= 1) get the exact radius, by the forward carry of their own direction.
    """
    jacobians, next_radius, later_bounds = plan
    n_layers = len(weights)
    z = cache.pre[layer][:, cols]
    with _errstate(xp):
        inverse_radius = xp.where(z != 0, 1.0 / xp.where(z != 0, xp.abs(z), 1.0), xp.inf)
    slope, W_next = derivatives[layer][:, cols], weights[layer + 1][cols]  # T[b, j] = slope[b, j] W_next[j]
    if layer + 1 < n_layers - 1:
        inverse_radius = xp.maximum(inverse_radius, next_radius[layer][:, cols])
    if layer + 2 < n_layers - 1:
        bounded = xp.maximum(inverse_radius, later_bounds[layer][:, cols])
        pair_b, pair_j = xp.nonzero(rho[:, None] * bounded >= 1)
        if pair_b.size:
            bounded[pair_b, pair_j] = _carried_inverse_radius(
                xp,
                cache,
                derivatives,
                weights,
                plan,
                layer,
                rho,
                pair_b,
                inverse_radius[pair_b, pair_j],
                slope[pair_b, pair_j][:, None] * W_next[pair_j],
            )
        inverse_radius = bounded
    V = jacobians[layer][:, :, cols].transpose(0, 2, 1)  # (B, Jc, C)
    if direction_series is not None:
        coefficients, needed = direction_series(V, cache.probs, labels, rho, inverse_radius, h)
        return coefficients, needed, inverse_radius
    spread = xp.abs(V - _label_component(xp, V, labels))
    widest = _max_over_classes(xp, spread)
    with _errstate(xp):
        radius = xp.where(widest > 0, _LOSS_RADIUS / xp.where(widest > 0, widest, 1.0), 0.0)
        # expm1(R |d|) <= R |d| / (2 ln 1.5) on R |d| <= ln 1.5 (its chord): zeta <= mean_p |d| / (2 max |d|)
        zeta = xp.where(
            widest > 0, 0.5 * _probability_weighted(xp, spread, cache.probs) / xp.where(widest > 0, widest, 1.0), 0.0
        )
        bound = -xp.log1p(-zeta)  # |g(u) - g(0)| on |u| <= radius
        reach = xp.minimum(rho[:, None], xp.where(inverse_radius > 0, 1.0 / inverse_radius, xp.inf))
        ratio = xp.where(widest > 0, reach / xp.where(widest > 0, radius, 1.0), 0.0)
    needed = _order_needed(xp, ratio, bound, h)
    order = _largest_order(xp, needed)
    return _loss_series(xp, cache.probs, labels, [V], order), needed, inverse_radius


def _carried_inverse_radius(xp, cache, derivatives, weights, plan, layer, rho, pair_b, exact, direction):
    """The inverse kink radius of the pairs (pair_b, j) whose bound did not clear rho: (P,).

    exact: (P,) the unit's own and next-layer terms; direction: (P, n) = T_(layer+1) of each pair. The
    direction is carried forward exactly, T_(m+1) = (D_m T_m) W_(m+1), taking the exact term of each
    later layer. After each layer, a pair whose exact terms so far and the bound on every term still
    ahead, sum_r |T_(m+1)[r]| max(N_(m+1), S_(m+1))[b, r] (the next-layer radii N and later bounds S of
    the plan, the same inequality as _later_kink_bounds), stay below 1 / rho leaves the carry with that
    bound: it has no triple past a kink either way, so only the pairs that do keep their exact radius.
    """
    _, next_radius, later_bounds = plan
    n_layers = len(weights)
    result = xp.empty_like(exact)
    alive = xp.arange(exact.shape[0])
    for m in range(layer + 1, n_layers - 2):
        direction = (direction * derivatives[m][pair_b]) @ weights[m + 1]  # (P, n_(m+1)): T_(m+1)
        z = cache.pre[m + 1]
        magnitude = xp.abs(z)
        with _errstate(xp):
            inverse = xp.where(magnitude > 0, 1.0 / xp.where(magnitude > 0, magnitude, 1.0), 0.0)
        size = xp.abs(direction)
        exact = xp.maximum(exact, (size * inverse[pair_b]).max(axis=1))
        at_zero = magnitude == 0
        if bool(at_zero.any()):
            touched = ((size > 0) & at_zero[pair_b]).any(axis=1)
            exact = xp.where(touched, xp.inf, exact)
        if m + 1 >= n_layers - 2:
            break
        ahead = xp.minimum(xp.maximum(next_radius[m + 1], later_bounds[m + 1]), _HUGE)
        reach = xp.maximum(exact, (size * ahead[pair_b]).sum(axis=1))
        done = rho[pair_b] * reach < 1
        if bool(done.any()):
            result[alive[done]] = reach[done]
            keep = ~done
            alive, pair_b, exact, direction = alive[keep], pair_b[keep], exact[keep], direction[keep]
            if alive.size == 0:
                return result
    result[alive] = exact
    return result


def _smooth_pair_series(xp, cache, derivatives, weights, labels, activation, layer, cols, rho, h, moved_inputs):
    """sigmoid/tanh: (loss coefficients [L_1..L_K] (B, Jc) each, order needed (B, Jc)).

    The bound (docs/series.md): on |u| <= R = kappa rho the change of every later pre-activation is
    T u + E with |E| <= eps, propagated layer by layer with f'' bounded on a strip; then |g - g(0)|
    is bounded at the loss and Cauchy's estimate bounds the tail. eps is a polynomial in R with
    non-negative coefficients and no term below R^2, so eps(R) <= (R / R_ref)^2 eps(R_ref) for
    R <= R_ref: two propagated references serve a ladder of kappas. Pairs needing more than the
    chosen K (K trades GEMMs against direct evaluations) are left to the caller's fallback.
    """
    n_layers = len(weights)
    theta, f2 = SERIES_STRIPS[activation]
    W_next = weights[layer + 1][cols]  # (Jc, n)
    first_order = [derivatives[layer][:, cols, None] * W_next[None]]
    for m in range(layer + 1, n_layers - 1):
        first_order.append(_propagate(xp, first_order[-1] * derivatives[m][:, None, :], weights[m + 1]))
    V = first_order[-1]
    spread = xp.abs(V - _label_component(xp, V, labels))
    references = {}
    for kappa_ref in SERIES_RADIUS_FACTORS:
        R = kappa_ref * rho  # (B,)
        eps = [(0.5 * f2 * R * R)[:, None, None] * xp.abs(W_next)[None]]
        for step, m in enumerate(range(layer + 1, n_layers - 1)):
            beta = xp.abs(first_order[step]) * R[:, None, None] + eps[-1]
            eps.append(
                _propagate(
                    xp, xp.abs(derivatives[m])[:, None, :] * eps[-1] + 0.5 * f2 * beta * beta, xp.abs(weights[m + 1])
                )
            )
        references[kappa_ref] = eps
    needed = xp.full(V.shape[:2], float(SERIES_MAX_ORDER + 2))
    kappa = 2.0
    while kappa <= SERIES_RADIUS_FACTORS[-1]:
        kappa_ref = min(k for k in SERIES_RADIUS_FACTORS if k >= kappa)
        shrink = (kappa / kappa_ref) ** 2
        eps = references[kappa_ref]
        R = kappa * rho
        valid = xp.broadcast_to((R <= theta)[:, None], V.shape[:2])
        for step in range(len(first_order) - 1):
            beta = xp.abs(first_order[step]) * R[:, None, None] + shrink * eps[step]
            valid = valid & (beta.max(axis=2) <= theta)
        gamma = R[:, None, None] * spread + shrink * (eps[-1] + _label_component(xp, eps[-1], labels))
        with _errstate(xp):
            zeta = _probability_weighted(xp, xp.expm1(gamma), cache.probs)
            valid = valid & (zeta < 1)
            bound = xp.where(valid, -xp.log1p(-xp.where(valid, zeta, 0.0)), xp.inf)
        needed = xp.minimum(needed, _order_needed(xp, xp.full(V.shape[:2], 1.0 / kappa), bound, h))
        kappa *= 2
    order = _cheapest_order(xp, needed, moved_inputs)
    # Taylor coefficients of every later pre-activation, orders 1..K (order 1 is the first-order carry)
    y0, g0 = cache.inputs[layer + 1][:, cols], derivatives[layer][:, cols]
    unit_series = _activation_series(activation, y0, g0, [1.0], order)
    Z = [first_order[0]] + [c[:, :, None] * W_next[None] for c in unit_series[1:]]
    for step, m in enumerate(range(layer + 1, n_layers - 1)):
        moved = _activation_series(activation, cache.inputs[m + 1][:, None, :], derivatives[m][:, None, :], Z, order)
        Z = [first_order[step + 1]] + [_propagate(xp, c, weights[m + 1]) for c in moved[1:]]
    return _loss_series(xp, cache.probs, labels, Z, order), needed


def _cheapest_order(xp, needed, moved_inputs) -> int:
    """The odd K minimising K * B * Jc (GEMM work of the carry, per order) plus the direct work of the
    pairs needing more: 2 * (their sample's moved inputs) each (both signs, same per-row cost)."""
    batch, units = needed.shape
    best, best_cost = 1, None
    for K in range(1, SERIES_MAX_ORDER + 1, 2):
        above = needed > K
        cost = K * batch * units + 2 * float((above * moved_inputs[:, None]).sum())
        if best_cost is None or cost < best_cost:
            best, best_cost = K, cost
        if not bool(above.any()):
            break
    return best


def _order_needed(xp, ratio, bound, h):
    """Smallest odd K >= 1 with bound * ratio**(K + 2) / (h * (1 - ratio**2)) <= SERIES_TAIL. Floats, any shape.

    ratio = rho / R (the step over the Cauchy radius) and bound >= |g(u) - g(0)| on the disc |u| <= R;
    where ratio >= 1 or bound is infinite no order will do: SERIES_MAX_ORDER + 2 (a fallback).
    """
    never = float(SERIES_MAX_ORDER + 2)
    with _errstate(xp):
        usable = (ratio < 1) & (bound < xp.inf)
        trivial = usable & ((ratio == 0) | (bound == 0))
        r = xp.where(usable & ~trivial, ratio, 0.5)
        M = xp.where(usable & ~trivial, bound, 1.0)
        scale = h * (1 - r * r)
        K = xp.ceil(xp.log(SERIES_TAIL * scale / M) / xp.log(r)) - 2
        K = xp.minimum(xp.maximum(K, 1.0), never)
        K = K + (K % 2 == 0)
        miss = M * r ** (K + 2) > SERIES_TAIL * scale  # the logarithms' rounding: one more order
        K = xp.where(miss, K + 2, K)
        K = xp.where(trivial, 1.0, K)
        return xp.minimum(xp.where(usable, K, never), never)


def _largest_order(xp, needed) -> int:
    """The order that serves every pair not left to direct evaluation (at least 1)."""
    usable = needed <= SERIES_MAX_ORDER
    return int(xp.where(usable, needed, 1.0).max()) if needed.size else 1


def _activation_series(activation, y0, g0, Z, order):
    """Taylor coefficients 1..order in u of f(z + w(u)) - f(z), w = sum_k Z[k-1] u^k (len(Z) <= order).

    y0 = f(z), g0 = f'(z) (broadcastable against Z's arrays). f' = G(f) with G(y) = 1 - y^2 (tanh),
    y - y^2 (sigmoid), so y' = G(y) w' gives n y_n = sum_k k Z_k G_(n-k), G's coefficients from y's.
    """
    y, G = [y0], [g0]
    for n in range(1, order + 1):
        acc = 0.0
        for k in range(1, min(n, len(Z)) + 1):
            acc = acc + (k * Z[k - 1]) * G[n - k]
        y.append(acc / n)
        if n < order:
            cross = 0.0
            for i in range(1, n):
                cross = cross + y[i] * y[n - i]
            if activation == "tanh":
                G.append(-(2 * y0 * y[n] + cross))
            else:
                G.append(y[n] * (1 - 2 * y0) - cross)
    return y[1:]


def _loss_series(xp, probs, labels, V, order):
    """Taylor coefficients [L_1..L_order] (B, J) of g(u) = log sum_c p_c exp(d_c(u)), d = dscores - dscores_t.

    V: the scores' change sum_k V[k-1] u^k, arrays (B, J, C). exp by n Y_n = sum_k k d_k Y_(n-k),
    then log by L_n = E_n - (1/n) sum_(k<n) k L_k E_(n-k) with E_n = sum_c p_c Y_n,c (E_0 = 1).
    """
    d = [Vk - _label_component(xp, Vk, labels) for Vk in V]
    Y, E, L = [None], [None], []
    for n in range(1, order + 1):
        acc = 0.0
        for k in range(1, min(n, len(d)) + 1):
            acc = acc + (k * d[k - 1]) * (Y[n - k] if n > k else 1.0)
        Y.append(acc / n)
        E.append(_probability_weighted(xp, Y[n], probs))
        L_n = E[n]
        for k in range(1, n):
            L_n = L_n - (k / n) * L[k - 1] * E[n - k]
        L.append(L_n)
    return L


def _direct_differences(ops, cache, weights, biases, labels, activation, alpha, layer, samples, units, steps, detect):
    """Direct evaluation: loss of sample samples[k] with z_layer[samples[k], units[k]] moved by +steps[k],
    minus the same at -steps[k]; every later layer of that one sample recomputed. Chunked.

    Returns (diff (N,) float64, cross_layer (N,) int64, cross_unit (N,) int64): the 1-based layer and the
    unit of a relu/leaky pre-activation whose branch (z > 0) differs from the base pass at +h or -h
    (the first one met), -1 where none (or when not ``detect``).
    """
    xp = ops.xp
    count = samples.size
    widths = sum(W.shape[1] for W in weights[layer + 1 :])
    chunk = int(max(1, SERIES_CHUNK_BYTES // (8 * 4 * widths)))
    diff = xp.empty(count, dtype=xp.float64)
    cross_layer = xp.full(count, -1, dtype=xp.int64)
    cross_unit = xp.full(count, -1, dtype=xp.int64)
    n_layers = len(weights)
    for start in range(0, count, chunk):
        part = slice(start, min(start + chunk, count))
        b, j, u = samples[part], units[part], steps[part]
        base = cache.pre[layer][b, j]
        base_out = cache.inputs[layer + 1][b, j]
        probs, picked_label = cache.probs[b], labels[b][:, None]
        hit_layer = xp.full(b.size, -1, dtype=xp.int64)
        hit_unit = xp.full(b.size, -1, dtype=xp.int64)
        changes = []
        for signed in (u, -u):
            moved = base + signed
            dz = ops.activation(activation, moved[:, None], alpha)[:, 0] - base_out
            if detect:
                new = ((moved > 0) != (base > 0)) & (hit_layer < 0)
                hit_layer = xp.where(new, layer + 1, hit_layer)
                hit_unit = xp.where(new, j, hit_unit)
            a_next = cache.pre[layer + 1][b] + dz[:, None] * weights[layer + 1][j]
            for m in range(layer + 1, n_layers - 1):
                if detect:
                    flips = (a_next > 0) != (cache.pre[m][b] > 0)
                    new = flips.any(axis=1) & (hit_layer < 0)
                    hit_layer = xp.where(new, m + 1, hit_layer)
                    hit_unit = xp.where(new, flips.argmax(axis=1), hit_unit)
                a_next = ops.activation(activation, a_next, alpha) @ weights[m + 1] + biases[m + 1]
            shift = a_next - cache.pre[-1][b]
            picked = xp.take_along_axis(shift, picked_label, axis=1)[:, 0]
            changes.append(xp.log1p((probs * xp.expm1(shift)).sum(axis=1)) - picked)
        diff[part] = changes[0] - changes[1]
        cross_layer[part], cross_unit[part] = hit_layer, hit_unit
    return diff, cross_layer, cross_unit
