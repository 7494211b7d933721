"""The model zoo: classic MNIST-sized networks built from :mod:`jaxcnn.layers`, selectable by name.

Every model takes ``(N, 28, 28, 1)`` images. ``method`` selects the convolution backward formulation
of every ``Conv2D`` (``"im2col"`` by default, ``"conv"``, ``"taps"`` or ``"auto"``; see
:func:`jaxcnn.layers.Conv2D`). The default is what ``jaxcnn train`` and every measured accuracy used;
``jaxcnn bench`` finds ``"auto"`` faster (``docs/benchmarks.md``). ``seed_net`` answers the tutorials' binary question
(digit > 4) with one sigmoid output trained on MSE; the others output 10 logits for softmax
cross-entropy.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

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

INPUT_SHAPE = (1, 28, 28, 1)


class ModelSpec(NamedTuple):
    """A zoo entry: how to build the network, its loss, and how labels become loss targets."""

    name: str
    build: Callable[..., Layer]
    loss: gradients.Loss
    binary: bool  # True: one sigmoid output for "digit > 4"; False: 10 logits
    description: str

    def targets(self, labels):
        """Digit labels ``(N,)`` -> loss targets: ``(N, 1)`` floats in {0, 1} (binary) or the labels as int32."""
        labels = jnp.asarray(labels)
        if self.binary:
            return (labels > 4).astype(jnp.float32)[:, None]
        return labels.astype(jnp.int32)

    def predictions(self, outputs):
        """Network outputs -> predicted class (0/1 for the binary task, 0-9 otherwise)."""
        if self.binary:
            return (outputs[:, 0] > 0.5).astype(jnp.int32)
        return jnp.argmax(outputs, axis=-1).astype(jnp.int32)


def seed_net(*, method: str = "im2col") -> Layer:
    """The tutorial CNN (seed 003): conv 3 filters 5x5 VALID, sigmoid, flatten, dense 1, sigmoid."""
    glorot = initializers.glorot_normal()
    return serial(
        Conv2D(3, 5, padding="VALID", backward_method=method, kernel_init=glorot), Sigmoid(),
        Flatten(), Dense(1, kernel_init=glorot), Sigmoid(),
        name="seed_net",
    )


def lenet5(*, method: str = "im2col") -> Layer:
    """LeNet-5 with ReLU and max pooling: conv 6 5x5 SAME, pool, conv 16 5x5, pool, dense 120, 84, 10."""
    return serial(
        Conv2D(6, 5, padding="SAME", backward_method=method), Relu(), MaxPool2D(2),
        Conv2D(16, 5, backward_method=method), Relu(), MaxPool2D(2),
        Flatten(), Dense(120), Relu(), Dense(84), Relu(), Dense(10, kernel_init=initializers.glorot_normal()),
        name="lenet5",
    )


def small_cnn(*, method: str = "im2col") -> Layer:
    """conv 32 3x3 SAME, relu, avgpool 2, conv 64 3x3 SAME, relu, avgpool 2, dense 256, relu, dense 10."""
    return serial(
        Conv2D(32, 3, padding="SAME", backward_method=method), Relu(), AvgPool2D(2),
        Conv2D(64, 3, padding="SAME", backward_method=method), Relu(), AvgPool2D(2),
        Flatten(), Dense(256), Relu(), Dense(10, kernel_init=initializers.glorot_normal()),
        name="small_cnn",
    )


def _conv_bn(features: int, *, stride: int = 1, backward_method: str) -> list[Layer]:
    return [Conv2D(features, 3, stride=stride, padding="SAME", use_bias=False, backward_method=backward_method), BatchNorm()]


def _block(features: int, *, stride: int, project: bool, backward_method: str) -> list[Layer]:
    body = serial(*_conv_bn(features, stride=stride, backward_method=backward_method), Relu(),
                  *_conv_bn(features, backward_method=backward_method))
    shortcut = None
    if project:
        shortcut = serial(Conv2D(features, 1, stride=stride, use_bias=False, backward_method=backward_method), BatchNorm())
    return [Residual(body, shortcut), Relu()]


def resnet_small(*, method: str = "im2col") -> Layer:
    """A small ResNet: stem conv 32, two residual blocks at 32 channels (28x28), two at 64 (14x14, the
    first with a strided 1x1 projection shortcut), global average pooling, dense 10. BatchNorm after
    every convolution."""
    return serial(
        *_conv_bn(32, backward_method=method), Relu(),
        *_block(32, stride=1, project=False, backward_method=method),
        *_block(32, stride=1, project=False, backward_method=method),
        *_block(64, stride=2, project=True, backward_method=method),
        *_block(64, stride=1, project=False, backward_method=method),
        GlobalAvgPool(), Dense(10, kernel_init=initializers.glorot_normal()),
        name="resnet_small",
    )


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("seed_net", seed_net, gradients.mse, True, seed_net.__doc__.splitlines()[0]),
        ModelSpec("lenet5", lenet5, gradients.softmax_cross_entropy, False, lenet5.__doc__.splitlines()[0]),
        ModelSpec("small_cnn", small_cnn, gradients.softmax_cross_entropy, False, small_cnn.__doc__.splitlines()[0]),
        ModelSpec("resnet_small", resnet_small, gradients.softmax_cross_entropy, False, resnet_small.__doc__.splitlines()[0]),
    )
}


def get_model(name: str) -> ModelSpec:
    """The zoo entry called ``name``; ``ValueError`` listing the names otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None
