"""Forward ops and their hand-written backward passes.

Layouts: activations NHWC, conv kernels HWIO, dense weights ``(in, out)``. Every ``*_backward`` takes
the output cotangent first and returns the cotangents of the inputs; none calls ``jax.grad``,
``jax.vjp`` or ``jax.linear_transpose``. The derivations are in ``docs/math.md``.
"""

from jaxcnn.ops.activations import (
    leaky_relu,
    leaky_relu_backward,
    log_softmax,
    log_softmax_backward,
    relu,
    relu_backward,
    sigmoid,
    sigmoid_backward,
    softmax,
    softmax_backward,
    tanh,
    tanh_backward,
)
from jaxcnn.ops.conv import col2im, conv2d, conv2d_backward, conv2d_input_grad, conv2d_kernel_grad, im2col
from jaxcnn.ops.dense import dense, dense_backward
from jaxcnn.ops.losses import (
    binary_cross_entropy_with_logits,
    binary_cross_entropy_with_logits_backward,
    binary_cross_entropy_with_logits_per_example,
    mse,
    mse_backward,
    mse_per_example,
    softmax_cross_entropy,
    softmax_cross_entropy_backward,
    softmax_cross_entropy_per_example,
)
from jaxcnn.ops.pool import avg_pool2d, avg_pool2d_backward, max_pool2d, max_pool2d_backward

__all__ = [
    "avg_pool2d",
    "avg_pool2d_backward",
    "binary_cross_entropy_with_logits",
    "binary_cross_entropy_with_logits_backward",
    "binary_cross_entropy_with_logits_per_example",
    "col2im",
    "conv2d",
    "conv2d_backward",
    "conv2d_input_grad",
    "conv2d_kernel_grad",
    "dense",
    "dense_backward",
    "im2col",
    "leaky_relu",
    "leaky_relu_backward",
    "log_softmax",
    "log_softmax_backward",
    "max_pool2d",
    "max_pool2d_backward",
    "mse",
    "mse_backward",
    "mse_per_example",
    "relu",
    "relu_backward",
    "sigmoid",
    "sigmoid_backward",
    "softmax",
    "softmax_backward",
    "softmax_cross_entropy",
    "softmax_cross_entropy_backward",
    "softmax_cross_entropy_per_example",
    "tanh",
    "tanh_backward",
]
