"""Pure compute kernels, one module per backend, all with the same contract.

Kernels receive arrays already on the right device and in the right dtype and check nothing:
validation happens once, in nets/. This package imports nothing of the rest of the project.

Contract (every backend module defines each name in KERNEL_NAMES):

    affine_forward(x, W, b) -> out                          x (B, I), W (I, O), b (O,) -> (B, O)
    affine_backward(dout, x, W, need_dx=True) -> (dx, dW, db)      dx is None when not needed
    activation_forward(kind, x, alpha=LEAKY_SLOPE) -> y     kind in ACTIVATIONS, same shape/dtype
    activation_backward(kind, dout, x, y, alpha=LEAKY_SLOPE) -> dx
    softmax(scores) -> probs                                (B, C), rows sum to 1, stable for +-1e3
    softmax_cross_entropy(scores, target) -> (loss, probs)  target: labels (B,) int or one-hot (B, C);
                                                            loss: mean over the batch (0-d array)
    softmax_cross_entropy_backward(probs, target, dout=1.0) -> dscores = dout * (probs - onehot) / B
    network_gradient(weights, biases, x, labels, activation, alpha) -> (loss, dWs, dbs)
                                                            fused backprop of the whole stack (labels (B,))
    numerical_gradient_batched(weights, biases, x, labels, activation, alpha, weight_decay, h,
                               progress=None) -> (dWs, dbs)
    numerical_gradient_incremental(...same..., kinks=None) -> (dWs, dbs)
    numerical_gradient_series(...same..., kinks=None) -> (dWs, dbs)      docs/series.md

The numerical-gradient kernels take the net's parameters as lists (float64), x float64 (B, I)
and integer labels (B,); the loss is the mean softmax cross-entropy plus
0.5 * weight_decay * sum(W ** 2) over every layer. They return float64 central differences
(f(p + h) - f(p - h)) / 2h for every parameter and never modify their inputs. ``progress`` is
None or a callable taking the number of parameters just finished. ``activation`` is a built-in
name or a kernels.activations.Activation (series then evaluates directly, like incremental).

Kink diagnostics (incremental and series): ``kinks`` is None or a dict that the kernel fills with
kinks["W1"], kinks["b1"], ..., kinks["WL"], kinks["bL"], one int64 array (n, 4) per parameter
(on the backend's device), one row per parameter entry whose +h or -h perturbation moves some
relu/leaky_relu pre-activation across the branch point (the branch is ``z > 0``) for some sample:

    column 0: flat index of the entry in that parameter (row-major, like W.reshape(-1))
    column 1: a sample b whose pass crosses (the lowest such b)
    column 2: the hidden layer m of the crossing unit, 1-based: z_m = a_(m-1) @ W_m + b_m
    column 3: the unit index within z_m (the first crossing met along the pass)

Rows are sorted by entry. Smooth activations (sigmoid, tanh, user-defined) give empty (0, 4)
arrays, and so does the output layer. Finding them costs no extra pass: incremental compares the
pre-activations it recomputes with the base pass; series proves every other (sample, input, unit)
triple stays inside its kink radius and compares those it evaluates directly.
"""

KERNEL_NAMES = (
    "affine_forward",
    "affine_backward",
    "activation_forward",
    "activation_backward",
    "softmax",
    "softmax_cross_entropy",
    "softmax_cross_entropy_backward",
    "network_gradient",
    "numerical_gradient_batched",
    "numerical_gradient_incremental",
    "numerical_gradient_series",
)

ACTIVATIONS = ("relu", "sigmoid", "tanh", "leaky_relu")
LEAKY_SLOPE = 0.01
