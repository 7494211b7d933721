"""The model zoo: classic MNIST-sized networks built from :mod:`jaxcnn.layers`, as named presets.

A :class:`ModelSpec` is a preset and nothing more: a network builder, its loss, the input shape it
expects and how digit labels become loss targets. ``jaxcnn train --model NAME`` trains one through
:func:`jaxcnn.fit`, which trains any :class:`~jaxcnn.layers.Layer` with any loss, zoo or not.

Every builder takes ``conv_method``, the formulation of every ``Conv2D`` (forward and backward), by
default :data:`jaxcnn.ops.conv.DEFAULT_METHOD` (``"auto"``, the fastest verified per shape;
``docs/benchmarks.md``). ``seed_net`` answers the tutorials' binary question (digit > 4) with one sigmoid
output trained on MSE; the others output 10 logits for softmax cross-entropy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.nn import initializers

from jaxcnn import gradients
from jaxcnn.layers import (
    AvgPool2D,
    BatchNorm,
    Conv2D,
    Dense,
    Flatten,
    GlobalAvgPool,
    Layer,
    MaxPool2D,
    Relu,
    Residual,
    Sigmoid,
    serial,
)
from jaxcnn.ops.conv import DEFAULT_METHOD

INPUT_SHAPE = (1, 28, 28, 1)  # one MNIST image, NHWC: the input every zoo preset is built for


def _digit_labels(labels):
    return jnp.asarray(labels).astype(jnp.int32)


def _greater_than_four(labels):
    """Digit labels ``(N,)`` -> ``(N, 1)`` floats in {0, 1}: the tutorials' "digit > 4" target."""
    return (jnp.asarray(labels) > 4).astype(jnp.float32)[:, None]


class ModelSpec(NamedTuple):
    """A zoo preset: the network builder, its loss, its input shape and how labels become loss targets."""

    name: str
    build: Callable[..., Layer]  # build(conv_method=DEFAULT_METHOD) -> Layer
    loss: gradients.Loss
    description: str
    targets: Callable = _digit_labels  # digit labels (N,) -> what ``loss`` compares predictions with
    input_shape: tuple = INPUT_SHAPE  # (1, H, W, C)


def seed_net(*, conv_method: str = DEFAULT_METHOD) -> Layer:
    """The tutorial CNN (seed 003): conv 3 filters 5x5 VALID, sigmoid, flatten, dense 1, sigmoid."""
    glorot = initializers.glorot_normal()
    return serial(
        Conv2D(3, 5, padding="VALID", method=conv_method, kernel_init=glorot),
        Sigmoid(),
        Flatten(),
        Dense(1, kernel_init=glorot),
        Sigmoid(),
        name="seed_net",
    )


def lenet5(*, conv_method: str = DEFAULT_METHOD) -> Layer:
    """LeNet-5 with ReLU and max pooling: conv 6 5x5 SAME, pool, conv 16 5x5, pool, dense 120, 84, 10."""
    return serial(
        Conv2D(6, 5, padding="SAME", method=conv_method),
        Relu(),
        MaxPool2D(2),
        Conv2D(16, 5, method=conv_method),
        Relu(),
        MaxPool2D(2),
        Flatten(),
        Dense(120),
        Relu(),
        Dense(84),
        Relu(),
        Dense(10, kernel_init=initializers.glorot_normal()),
        name="lenet5",
    )


def small_cnn(*, conv_method: str = DEFAULT_METHOD) -> Layer:
    """conv 32 3x3 SAME, relu, avgpool 2, conv 64 3x3 SAME, relu, avgpool 2, dense 256, relu, dense 10."""
    return serial(
        Conv2D(32, 3, padding="SAME", method=conv_method),
        Relu(),
        AvgPool2D(2),
        Conv2D(64, 3, padding="SAME", method=conv_method),
        Relu(),
        AvgPool2D(2),
        Flatten(),
        Dense(256),
        Relu(),
        Dense(10, kernel_init=initializers.glorot_normal()),
        name="small_cnn",
    )


def fan_in_uniform(key, shape, dtype=jnp.float32) -> jax.Array:
    """A kernel drawn uniformly from ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]`` (variance ``1 / (3 fan_in)``), ``fan_in``
    being the product of every dimension but the last: PyTorch's and equinox's default kernel initialisation,
    as a JAX initializer (``variance_scaling(1/3, "fan_in", "uniform")``)."""
    return _FAN_IN_UNIFORM(key, shape, dtype)


_FAN_IN_UNIFORM = initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def fast_cnn(*, conv_method: str = DEFAULT_METHOD, kernel_init: Callable = fan_in_uniform) -> Layer:
    """Three blocks of conv, ReLU, max-pool 2, BatchNorm (24 channels 5x5, 48 3x3, 96 3x3; SAME), dense 10.

    ``kernel_init`` draws every kernel (convolutions and the dense layer); biases start at zero. The default,
    :func:`fan_in_uniform`, was chosen over He normal: with BatchNorm after every block the loss does
    not change when a convolution's kernel and bias are scaled by one positive factor (ReLU and max pooling
    commute with it, BatchNorm removes it up to its epsilon), so a gradient step moves small kernels further,
    relative to their size, than large ones: the smaller initial kernels train as if at a larger learning rate.
    Chosen on held-out training images (``python experiments/recipe_cv.py``, ``experiments/results/recipe_cv/``).
    """

    def block(features: int, size: int) -> list[Layer]:
        # Normalising after the pooling touches a quarter of the activations a BatchNorm before it would.
        conv = Conv2D(features, size, padding="SAME", method=conv_method, kernel_init=kernel_init)
        return [conv, Relu(), MaxPool2D(2), BatchNorm()]

    return serial(
        *block(24, 5),
        *block(48, 3),
        *block(96, 3),
        Flatten(),
        Dense(10, kernel_init=kernel_init),
        name="fast_cnn",
    )


def _conv_bn(features: int, *, stride: int = 1, conv_method: str) -> list[Layer]:
    return [Conv2D(features, 3, stride=stride, padding="SAME", use_bias=False, method=conv_method), BatchNorm()]


def _block(features: int, *, stride: int, project: bool, conv_method: str) -> list[Layer]:
    body = serial(
        *_conv_bn(features, stride=stride, conv_method=conv_method),
        Relu(),
        *_conv_bn(features, conv_method=conv_method),
    )
    shortcut = None
    if project:
        shortcut = serial(Conv2D(features, 1, stride=stride, use_bias=False, method=conv_method), BatchNorm())
    return [Residual(body, shortcut), Relu()]


def resnet_small(*, conv_method: str = DEFAULT_METHOD) -> Layer:
    """A small ResNet: stem conv 32, two residual blocks at 32 channels (28x28), two at 64 (14x14, the
    first with a strided 1x1 projection shortcut), global average pooling, dense 10. BatchNorm after
    every convolution."""
    return serial(
        *_conv_bn(32, conv_method=conv_method),
        Relu(),
        *_block(32, stride=1, project=False, conv_method=conv_method),
        *_block(32, stride=1, project=False, conv_method=conv_method),
        *_block(64, stride=2, project=True, conv_method=conv_method),
        *_block(64, stride=1, project=False, conv_method=conv_method),
        GlobalAvgPool(),
        Dense(10, kernel_init=initializers.glorot_normal()),
        name="resnet_small",
    )


def _summary(build: Callable[..., Layer]) -> str:
    """The first line of a model builder's docstring: the zoo's one-line description of it."""
    return (build.__doc__ or "").splitlines()[0]


# The zoo: preset name -> its ModelSpec (what `jaxcnn train --model` chooses from).
MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("seed_net", seed_net, gradients.mse, _summary(seed_net), targets=_greater_than_four),
        ModelSpec("lenet5", lenet5, gradients.softmax_cross_entropy, _summary(lenet5)),
        ModelSpec("small_cnn", small_cnn, gradients.softmax_cross_entropy, _summary(small_cnn)),
        ModelSpec("resnet_small", resnet_small, gradients.softmax_cross_entropy, _summary(resnet_small)),
        ModelSpec("fast_cnn", fast_cnn, gradients.softmax_cross_entropy, _summary(fast_cnn)),
    )
}


def get_model(name: str) -> ModelSpec:
    """The zoo entry called ``name``; ``ValueError`` listing the names otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None
