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
    numerical_gradient_incremental(...same...) -> (dWs, dbs)

The two numerical-gradient kernels take the net's parameters as lists (float64), x float64 (B, I)
and integer labels (B,); the loss is the mean softmax cross-entropy plus
0.5 * weight_decay * sum(W ** 2) over every layer. They return float64 central differences
(f(p + h) - f(p - h)) / 2h for every parameter and never modify their inputs. ``progress`` is
None or a callable taking the number of parameters just finished.
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
)

ACTIVATIONS = ("relu", "sigmoid", "tanh", "leaky_relu")
LEAKY_SLOPE = 0.01
