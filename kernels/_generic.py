"""Array-module-generic building blocks shared by the kernel modules.

Every function takes the array module ``xp`` (numpy or cupy) as its first argument, so one
implementation serves both; backend modules pass their own fused ``ops`` where they have them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Array = Any

# Working-set budget for one chunk of perturbed parameter sets in the batched method.
BATCHED_CHUNK_BYTES = 96 * 2**20


def activation_forward(xp, kind: str, x: Array, alpha: float) -> Array:
    """Elementwise activation; sigmoid is evaluated without overflow for any finite x."""
    if kind == "relu":
        return xp.maximum(x, 0)
    if kind == "sigmoid":
        e = xp.exp(-xp.abs(x))
        return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))
    if kind == "tanh":
        return xp.tanh(x)
    if kind == "leaky_relu":
        return xp.where(x > 0, x, x * x.dtype.type(alpha))
    raise ValueError(f"unknown activation {kind!r}")


def activation_backward(xp, kind: str, dout: Array, x: Array, y: Array, alpha: float) -> Array:
    """dL/dx from dL/dy for the activation y = f(x)."""
    if kind == "relu":
        return xp.where(x > 0, dout, 0).astype(dout.dtype, copy=False)
    if kind == "sigmoid":  # e / (1 + e)^2 with e = exp(-|x|): exact where (1 - y) * y would cancel
        e = xp.exp(-xp.abs(x))
        return dout * (e / ((1 + e) * (1 + e)))
    if kind == "tanh":  # 4 e / (1 + e)^2 with e = exp(-2|x|), rather than 1 - y^2
        e = xp.exp(-2 * xp.abs(x))
        return dout * (4 * e / ((1 + e) * (1 + e)))
    if kind == "leaky_relu":
        return xp.where(x > 0, dout, dout * dout.dtype.type(alpha))
    raise ValueError(f"unknown activation {kind!r}")


def activation_with_derivative(xp, kind: str, a: Array, alpha: float) -> tuple[Array, Array]:
    """(f(a), f'(a)) in one sweep, for backprop; the derivative is cancellation-free."""
    if kind == "sigmoid":  # e = exp(-|a|): f = 1/(1+e) or e/(1+e); f' = e/(1+e)^2
        e = xp.abs(a)
        xp.negative(e, out=e)
        xp.exp(e, out=e)
        r = e + 1
        xp.reciprocal(r, out=r)  # 1/(1+e)
        e *= r  # e/(1+e)
        derivative = e * r
        xp.copyto(r, e, where=a < 0)  # r becomes f(a)
        return r, derivative
    if kind == "tanh":  # f' = 4e/(1+e)^2 with e = exp(-2|a|)
        e = xp.abs(a)
        e *= -2
        xp.exp(e, out=e)
        r = e + 1
        xp.reciprocal(r, out=r)
        e *= r
        e *= r
        e *= 4
        return xp.tanh(a), e
    if kind == "relu":
        positive = a > 0
        return xp.maximum(a, 0), positive.astype(a.dtype)
    if kind == "leaky_relu":
        positive = a > 0
        slope = a.dtype.type(alpha)
        return xp.where(positive, a, a * slope), xp.where(positive, a.dtype.type(1), slope)
    raise ValueError(f"unknown activation {kind!r}")


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


def network_gradient(xp, ops: Ops, weights, biases, x, labels, activation, alpha):
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


def log_softmax_parts(xp, scores: Array) -> tuple[Array, Array, Array]:
    """(shifted, exp(shifted), row sums) with shifted = scores - rowmax, over the last axis."""
    shifted = scores - scores.max(axis=-1, keepdims=True)
    e = xp.exp(shifted)
    return shifted, e, e.sum(axis=-1, keepdims=True)


def softmax_cross_entropy(xp, scores: Array, target: Array) -> tuple[Array, Array]:
    """Mean cross-entropy of softmax(scores) by log-sum-exp, and the probabilities."""
    shifted, e, total = log_softmax_parts(xp, scores)
    probs = e / total
    log_total = xp.log(total[:, 0])
    if target.ndim == 1:
        picked = xp.take_along_axis(shifted, target[:, None], axis=1)[:, 0]
        per_sample = log_total - picked
    else:
        per_sample = (target * (log_total[:, None] - shifted)).sum(axis=1)
    return per_sample.mean(), probs


def softmax_cross_entropy_backward(xp, probs: Array, target: Array, dout: float) -> Array:
    """(probs - onehot(target)) * dout / B."""
    batch = probs.shape[0]
    if target.ndim == 1:
        grad = probs.copy()
        grad[xp.arange(batch), target] -= 1
    else:
        grad = probs - target
    grad *= probs.dtype.type(dout / batch)
    return grad


def set_losses(xp, scores: Array, labels: Array) -> Array:
    """Mean cross-entropy per parameter set. scores: (B, S, C); labels: (B,) -> (S,)."""
    shifted, _, total = log_softmax_parts(xp, scores)
    index = xp.broadcast_to(labels[:, None, None], shifted.shape[:2] + (1,))
    picked = xp.take_along_axis(shifted, index, axis=2)
    return (xp.log(total[..., 0]) - picked[..., 0]).mean(axis=0)


@dataclass(frozen=True)
class Ops:
    """The elementwise pieces a backend plugs into the generic numerical-gradient drivers."""

    xp: Any
    activation: Callable[[str, Array, float], Array]  # (kind, x 2-D, alpha) -> f(x)
    set_losses: Callable[[Array, Array], Array]  # (scores (B, S, C), labels (B,)) -> (S,)
    # backprop pieces: (kind, a, alpha) -> (f(a), f'(a)); (scores, labels) -> (loss, dscores)
    activation_with_derivative: Callable[..., tuple[Array, Array]] | None = None
    softmax_cross_entropy_gradient: Callable[..., tuple[Array, Array]] | None = None
    # optional fast path for the layer that feeds the output layer: same arguments and result as
    # _hidden_layer_differences
    hidden_to_output: Callable[..., tuple[Array, Array]] | None = None


def _param_views(weights, biases):
    """(layer, kind, array) for every parameter array, in the order W1, b1, W2, b2, ..."""
    for layer, (W, b) in enumerate(zip(weights, biases, strict=True)):
        yield layer, "W", W
        yield layer, "b", b


def _decay_difference(xp, values: Array, weight_decay: float, h: float) -> Array:
    """Central difference of 0.5 * weight_decay * w**2 at the given weights, as the naive loop sees it."""
    if not weight_decay:
        return xp.zeros_like(values)
    return 0.5 * weight_decay * ((values + h) ** 2 - (values - h) ** 2) / (2 * h)


def numerical_gradient_batched(
    ops: Ops,
    weights,
    biases,
    x,
    labels,
    activation,
    alpha,
    weight_decay,
    h,
    progress=None,
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
    """
    xp = ops.xp
    n_layers = len(weights)
    active = xp.flatnonzero((x != 0).any(axis=0))
    x_used = xp.ascontiguousarray(x[:, active])
    weights_used = [xp.ascontiguousarray(weights[0][active])] + list(weights[1:])
    grads = {}
    for layer, kind, P in _param_views(weights, biases):
        flat_grad = xp.zeros(P.size, dtype=xp.float64)
        used = weights_used[layer] if kind == "W" else P
        targets = xp.arange(used.size)  # flat indices into ``used``
        for start, losses in _batched_chunks(
            ops, weights_used, biases, x_used, labels, activation, alpha, layer, kind, used, h, chunk_bytes
        ):
            k = losses.size // 2
            flat_grad[_full_index(xp, layer, kind, P, active, targets[start : start + k])] = (
                losses[:k] - losses[k:]
            ) / (2 * h)
            if progress is not None:
                progress(k)
        if progress is not None and P.size > used.size:
            progress(P.size - used.size)
        grad = flat_grad.reshape(P.shape)
        if kind == "W":
            grad += _decay_difference(xp, P, weight_decay, h)
        grads[layer, kind] = grad
    return [grads[m, "W"] for m in range(n_layers)], [grads[m, "b"] for m in range(n_layers)]


def _full_index(xp, layer, kind, P, active, local):
    """Flat indices into P of the flat indices ``local`` into its used (active-rows) version."""
    if kind == "W" and layer == 0:
        return active[local // P.shape[1]] * P.shape[1] + local % P.shape[1]
    return local


def _batched_chunks(ops: Ops, weights, biases, x, labels, activation, alpha, layer, kind, P, h, chunk_bytes):
    """Yield (start, losses (2k,)) for consecutive chunks of P's flat indices: +h sets, then -h sets."""
    xp = ops.xp
    batch = x.shape[0]
    widths = [W.shape[1] for W in weights]
    per_set = 8 * (batch * (x.shape[1] + 3 * sum(widths)) + (P.size if kind == "W" else 0))
    k_max = int(max(1, min(P.size, chunk_bytes // (2 * per_set))))
    # the perturbed copies of P side by side, reused across chunks: only the moved entries change
    if kind == "W" and layer == 0:
        stacked = xp.ascontiguousarray(xp.broadcast_to(P[:, None, :], (P.shape[0], 2 * k_max, P.shape[1])))
    else:
        stacked = xp.ascontiguousarray(xp.broadcast_to(P[None], (2 * k_max,) + P.shape))
    for start in range(0, P.size, k_max):
        k = min(k_max, P.size - start)
        idx = xp.arange(start, start + k)
        flat_idx = xp.concatenate([idx, idx])
        signs = xp.concatenate([xp.full(k, h), xp.full(k, -h)])
        set_ids = xp.arange(2 * k)
        if kind == "W":
            rows, cols = flat_idx // P.shape[1], flat_idx % P.shape[1]
            moved = (rows, set_ids, cols) if layer == 0 else (set_ids, rows, cols)
            original = P[rows, cols]
        else:
            moved = (set_ids, flat_idx)
            original = P[flat_idx]
        stacked[moved] = original + signs
        losses = _batched_losses(ops, weights, biases, x, labels, activation, alpha, layer, kind, stacked, 2 * k)
        stacked[moved] = original
        yield start, losses


def _batched_losses(ops: Ops, weights, biases, x, labels, activation, alpha, layer, kind, stacked, sets):
    """Loss of each of the first ``sets`` perturbed parameter sets: a full forward pass each. -> (S,)"""
    xp = ops.xp
    batch = x.shape[0]
    n_layers = len(weights)
    state = None  # (B, S, width) once the sets have diverged
    for m in range(n_layers):
        W, b = weights[m], biases[m]
        n_in, n_out = W.shape
        if m == layer and kind == "W" and m == 0:  # one GEMM against the side-by-side perturbed matrices
            a = (x @ stacked[:, :sets].reshape(n_in, sets * n_out)).reshape(batch, sets, n_out)
        elif m == layer and kind == "W":  # one batched matmul, a perturbed matrix per set
            a = xp.matmul(state.transpose(1, 0, 2), stacked[:sets]).transpose(1, 0, 2)
        else:
            if state is None:  # brute force: every set runs its own full pass, unperturbed layers included
                state = xp.broadcast_to(x[:, None, :], (batch, sets, n_in))
            a = (xp.ascontiguousarray(state).reshape(batch * sets, n_in) @ W).reshape(batch, sets, n_out)
        a += stacked[:sets][None] if (m == layer and kind == "b") else b
        if m < n_layers - 1:
            state = ops.activation(activation, a.reshape(batch * sets, n_out), alpha).reshape(a.shape)
    return ops.set_losses(a, labels)


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
    """Sums of consecutive segments of ``values`` starting at ``starts`` (fixed order: deterministic)."""
    return xp.add.reduceat(values, starts)


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
    ops: Ops, weights, biases, x, labels, activation, alpha, weight_decay, h, progress=None
):
    """Exact central differences, recomputing only what each perturbation changes.

    Moving W_l[i, j] by +-h moves column j of layer l's pre-activation by +-h * input[:, i]
    (and nothing else): the layers before l come from the cached base pass, the next layer's
    input changes by a rank-1 term, and only the rest of the pass is recomputed, for just the
    samples whose input[b, i] is non-zero. An input that is zero for the whole batch gives a
    loss difference of exactly 0, so it is skipped (b_l behaves like an input of ones).
    """
    xp = ops.xp
    n_layers = len(weights)
    cache = forward_cache(xp, ops, weights, biases, x, labels, activation, alpha)
    dWs, dbs = [], []
    for layer in range(n_layers):
        W = weights[layer]
        if layer == n_layers - 1:
            dW, db = _last_layer_differences(xp, cache, labels, h)
        elif layer == n_layers - 2 and ops.hidden_to_output is not None:
            dW, db = ops.hidden_to_output(cache, weights, biases, labels, activation, alpha, h, layer)
        else:
            dW, db = _hidden_layer_differences(ops, cache, weights, biases, labels, activation, alpha, h, layer)
        dW += _decay_difference(xp, W, weight_decay, h)
        dWs.append(dW)
        dbs.append(db)
        if progress is not None:
            progress(W.size + biases[layer].size)
    return dWs, dbs


def _hidden_layer_differences(
    ops: Ops, cache: ForwardCache, weights, biases, labels, activation, alpha, h, layer, columns=None
):
    """(dW, db) of hidden layer ``layer``, for its output units ``columns`` (default: all), in that order."""
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

    def loss_change(j, step):
        a = cache.pre[layer][samples, j]
        dz = ops.activation(activation, (a + step)[:, None], alpha)[:, 0] - cache.inputs[layer + 1][samples, j]
        if layer + 1 == n_layers - 1:  # next layer is the output: reuse the base softmax
            shift = dz[:, None] * W_next[j][None, :]
            picked = xp.take_along_axis(shift, sample_labels[:, None], axis=1)[:, 0]
            return xp.log1p((probs * xp.expm1(shift)).sum(axis=1)) - picked
        a_next = pre_next + dz[:, None] * W_next[j][None, :]
        for m in range(layer + 2, n_layers):
            a_next = ops.activation(activation, a_next, alpha) @ weights[m] + biases[m]
        shifted, _, total = log_softmax_parts(xp, a_next)
        picked = xp.take_along_axis(shifted, sample_labels[:, None], axis=1)[:, 0]
        return (xp.log(total[:, 0]) - picked) - base_loss

    for k, j in enumerate(columns):
        diff = loss_change(j, steps) - loss_change(j, -steps)
        grad[active_rows, k] = _segment_sums(xp, diff, starts)
    grad /= 2 * h * batch
    return grad[:n_in], grad[n_in]
