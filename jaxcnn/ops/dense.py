"""Fully connected layer ``y = x @ w + b`` and its backward pass (seed 000 in matrix form).

Layouts: ``x`` is ``(N, in)``, ``w`` is ``(in, out)``, ``b`` is ``(out,)``, ``y`` is ``(N, out)``.
The tutorials write ``Z = Wᵀ · H + b`` with examples as columns; with examples as rows the same
products read ``dx = dy @ wᵀ``, ``dw = xᵀ @ dy`` and ``db = sum_n dy[n]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcnn.ops._checks import check_array, check_cotangent


def _check(fn: str, x, w) -> None:
    check_array(fn, "x", x, rank=2, layout="(N, in)")
    check_array(fn, "w", w, rank=2, layout="(in, out)")
    if x.shape[1] != w.shape[0]:
        raise ValueError(
            f"{fn}: x {tuple(x.shape)} has {x.shape[1]} features but w {tuple(w.shape)} expects {w.shape[0]}"
        )


def dense(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """``y = x @ w (+ b)``: ``(N, in) x (in, out) -> (N, out)``."""
    _check("dense", x, w)
    if b is not None and tuple(jnp.shape(b)) != (w.shape[1],):
        raise ValueError(
            f"dense: b must have shape ({w.shape[1]},) to match w {tuple(w.shape)}, got {tuple(jnp.shape(b))}"
        )
    y = x @ w
    return y if b is None else y + b


def dense_backward(dy: jax.Array, x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(dx, dw, db) = (dy @ wᵀ, xᵀ @ dy, sum_n dy)``, shaped like ``x``, ``w`` and ``(out,)``."""
    fn = "dense_backward"
    _check(fn, x, w)
    check_cotangent(fn, dy, (x.shape[0], w.shape[1]))
    return dy @ w.T, x.T @ dy, jnp.sum(dy, axis=0)
