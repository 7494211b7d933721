"""Losses (scalar, averaged) and their gradients with respect to the prediction.

Each ``*_backward(dloss, ...)`` returns ``dloss * d(loss)/d(prediction)``, shaped like the prediction;
``dloss`` is the scalar cotangent of the loss (1.0 at the top of a backward pass). Each
``*_per_example(pred, target)`` returns the loss of every example, ``(N,)``, whose mean is the scalar
loss (evaluation sums them over a test set).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcnn.ops._checks import check_array


def _check_pair(fn: str, pred, target) -> None:
    if jnp.shape(pred) != jnp.shape(target):
        raise ValueError(
            f"{fn}: prediction {tuple(jnp.shape(pred))} and target {tuple(jnp.shape(target))} differ in shape"
        )


def mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """``0.5 * mean((pred - target)**2)`` over all elements (the tutorials' ``E = ½ (O - Y)²``, averaged)."""
    _check_pair("mse", pred, target)
    return 0.5 * jnp.mean(jnp.square(pred - target))


def mse_per_example(pred: jax.Array, target: jax.Array) -> jax.Array:
    """``0.5 * mean((pred[n] - target[n])**2)`` over each example's elements: ``(N, ...) -> (N,)``."""
    _check_pair("mse_per_example", pred, target)
    return 0.5 * jnp.mean(jnp.square(pred - target).reshape(pred.shape[0], -1), axis=1)


def mse_backward(dloss: float | jax.Array, pred: jax.Array, target: jax.Array) -> jax.Array:
    """``d/dpred = (pred - target) / size``."""
    _check_pair("mse_backward", pred, target)
    return dloss * (pred - target) / pred.size


def binary_cross_entropy_with_logits(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``mean(softplus(z) - y z)``: the mean of ``-y log σ(z) - (1 - y) log(1 - σ(z))``, stable for any ``z``.

    ``softplus(z) = max(z, 0) + log1p(exp(-|z|))`` never overflows.
    """
    _check_pair("binary_cross_entropy_with_logits", logits, labels)
    return jnp.mean(_bce_elements(logits, labels))


def _bce_elements(z, labels):
    return jnp.maximum(z, 0) + jnp.log1p(jnp.exp(-jnp.abs(z))) - labels * z


def binary_cross_entropy_with_logits_per_example(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The mean of :func:`binary_cross_entropy_with_logits`'s terms over each example: ``(N, ...) -> (N,)``."""
    _check_pair("binary_cross_entropy_with_logits_per_example", logits, labels)
    return jnp.mean(_bce_elements(logits, labels).reshape(logits.shape[0], -1), axis=1)


def binary_cross_entropy_with_logits_backward(
    dloss: float | jax.Array, logits: jax.Array, labels: jax.Array
) -> jax.Array:
    """``d/dz = (σ(z) - y) / size``."""
    _check_pair("binary_cross_entropy_with_logits_backward", logits, labels)
    return dloss * (jax.nn.sigmoid(logits) - labels) / logits.size


def _check_labels(fn: str, logits, labels) -> None:
    check_array(fn, "logits", logits, rank=2, layout="(N, classes)")
    if jnp.shape(labels) != jnp.shape(logits)[:1]:
        raise ValueError(
            f"{fn}: labels must have shape ({logits.shape[0]},) for logits {tuple(logits.shape)}, "
            f"got {tuple(jnp.shape(labels))}"
        )
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise TypeError(f"{fn}: labels must be integer class indices, got dtype {jnp.result_type(labels)}")


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``mean_n(logsumexp(z_n) - z_n[label_n])`` for ``logits (N, classes)`` and integer ``labels (N,)``."""
    _check_labels("softmax_cross_entropy", logits, labels)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=-1))


def softmax_cross_entropy_per_example(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``logsumexp(z_n) - z_n[label_n]`` for each example: ``(N, classes), (N,) -> (N,)``."""
    _check_labels("softmax_cross_entropy_per_example", logits, labels)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None], axis=-1)[:, 0]


def softmax_cross_entropy_backward(dloss: float | jax.Array, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``d/dz = (softmax(z) - onehot(label)) / N``."""
    _check_labels("softmax_cross_entropy_backward", logits, labels)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return dloss * (jax.nn.softmax(logits, axis=-1) - onehot) / logits.shape[0]
