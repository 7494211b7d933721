"""Elementwise activations and softmax, each with its hand-written backward pass.

Backward functions take the output cotangent ``dy`` first, then what the derivative is cheapest to
compute from: the output ``y`` where the derivative is a function of it (sigmoid, tanh, softmax,
log-softmax, as the tutorials do with ``O(1 - O)``), otherwise the input ``x``. Shapes are preserved.

Kinks, decided like ``jax.grad``: ``relu'(0) = 0``; ``leaky_relu'(0) = 1`` (``jax.nn.leaky_relu``
selects ``x`` for ``x >= 0``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcnn.ops._checks import check_cotangent


def _like(fn: str, dy, ref) -> None:
    check_cotangent(fn, dy, jnp.shape(ref))


def sigmoid(x: jax.Array) -> jax.Array:
    """``y = 1 / (1 + exp(-x))``, computed without overflow for large ``|x|``."""
    return jax.nn.sigmoid(x)


def sigmoid_backward(dy: jax.Array, y: jax.Array) -> jax.Array:
    """``dx = dy * y * (1 - y)``, from the forward output ``y``."""
    _like("sigmoid_backward", dy, y)
    return dy * y * (1 - y)


def tanh(x: jax.Array) -> jax.Array:
    """``y = tanh(x)``."""
    return jnp.tanh(x)


def tanh_backward(dy: jax.Array, y: jax.Array) -> jax.Array:
    """``dx = dy * (1 - y**2)``, from the forward output ``y``."""
    _like("tanh_backward", dy, y)
    return dy * (1 - y * y)


def relu(x: jax.Array) -> jax.Array:
    """``y = max(x, 0)``; its autodiff derivative at ``0`` is ``0`` like :func:`relu_backward`'s.

    ``jnp.maximum(x, 0)`` would differentiate to ``0.5`` at ``0`` (``lax.max`` splits ties evenly);
    ``jax.nn.relu`` defines the derivative at the kink as ``0``.
    """
    return jax.nn.relu(x)


def relu_backward(dy: jax.Array, x: jax.Array) -> jax.Array:
    """``dx = dy * [x > 0]`` (zero at ``x = 0``)."""
    _like("relu_backward", dy, x)
    return jnp.where(x > 0, dy, jnp.zeros((), dy.dtype))


def leaky_relu(x: jax.Array, negative_slope: float = 0.01) -> jax.Array:
    """``y = x`` for ``x >= 0``, ``negative_slope * x`` otherwise."""
    return jnp.where(x >= 0, x, negative_slope * x)


def leaky_relu_backward(dy: jax.Array, x: jax.Array, negative_slope: float = 0.01) -> jax.Array:
    """``dx = dy`` for ``x >= 0``, ``negative_slope * dy`` otherwise."""
    _like("leaky_relu_backward", dy, x)
    return jnp.where(x >= 0, dy, negative_slope * dy)


def softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """``y = exp(x - max) / sum(exp(x - max))`` along ``axis``."""
    return jax.nn.softmax(x, axis=axis)


def softmax_backward(dy: jax.Array, y: jax.Array, axis: int = -1) -> jax.Array:
    """``dx = y * (dy - sum(dy * y))`` along ``axis``: the Jacobian ``diag(y) - y yᵀ`` applied to ``dy``."""
    _like("softmax_backward", dy, y)
    return y * (dy - jnp.sum(dy * y, axis=axis, keepdims=True))


def log_softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """``y = x - logsumexp(x)`` along ``axis`` (stable for large logits)."""
    return jax.nn.log_softmax(x, axis=axis)


def log_softmax_backward(dy: jax.Array, y: jax.Array, axis: int = -1) -> jax.Array:
    """``dx = dy - exp(y) * sum(dy)`` along ``axis``, from the output ``y = log_softmax(x)``."""
    _like("log_softmax_backward", dy, y)
    return dy - jnp.exp(y) * jnp.sum(dy, axis=axis, keepdims=True)
