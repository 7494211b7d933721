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


def _smoothed_targets(logits, labels, label_smoothing):
    """``q = (1 - α) onehot(label) + α / classes``: the targets of label smoothing (``α = 0``: the one-hot labels)."""
    classes = logits.shape[-1]
    return (1.0 - label_smoothing) * jax.nn.one_hot(labels, classes, dtype=logits.dtype) + label_smoothing / classes


def _check_smoothing(fn: str, label_smoothing) -> None:
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 1), got {label_smoothing}")


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0) -> jax.Array:
    """``mean_n(logsumexp(z_n) - Σ_k q_nk z_nk)`` for ``logits (N, classes)`` and integer ``labels (N,)``, where
    ``q_n = (1 - α) onehot(label_n) + α / classes`` and ``α = label_smoothing`` (0: ``logsumexp(z_n) - z_n[label_n]``).
    """
    _check_labels("softmax_cross_entropy", logits, labels)
    _check_smoothing("softmax_cross_entropy", label_smoothing)
    return jnp.mean(softmax_cross_entropy_per_example(logits, labels, label_smoothing=label_smoothing))


def softmax_cross_entropy_per_example(
    logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0
) -> jax.Array:
    """``-Σ_k q_nk log softmax(z_n)_k`` for each example: ``(N, classes), (N,) -> (N,)`` (``q``: see
    :func:`softmax_cross_entropy`)."""
    _check_labels("softmax_cross_entropy_per_example", logits, labels)
    _check_smoothing("softmax_cross_entropy_per_example", label_smoothing)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    if not label_smoothing:
        return -jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]
    return -jnp.sum(_smoothed_targets(logits, labels, label_smoothing) * log_p, axis=-1)


def softmax_cross_entropy_backward(
    dloss: float | jax.Array, logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0
) -> jax.Array:
    """``d/dz = (softmax(z) - q) / N``, with ``q`` the (smoothed) targets of :func:`softmax_cross_entropy`
    (the ``Σ_k q_k = 1`` of any ``α`` is what leaves ``softmax(z)`` alone in the derivative of the log-sum-exp)."""
    _check_labels("softmax_cross_entropy_backward", logits, labels)
    _check_smoothing("softmax_cross_entropy_backward", label_smoothing)
    q = _smoothed_targets(logits, labels, label_smoothing)
    return dloss * (jax.nn.softmax(logits, axis=-1) - q) / logits.shape[0]
