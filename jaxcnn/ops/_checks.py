"""Trace-time argument checks shared by the ops. Each names the function, the argument and the shapes."""

from __future__ import annotations

import jax.numpy as jnp


def check_array(fn: str, name: str, x, *, rank: int, layout: str) -> None:
    """Raises ``ValueError`` unless ``x`` has ``rank`` dimensions, ``TypeError`` unless it is floating point."""
    shape = jnp.shape(x)
    if len(shape) != rank:
        raise ValueError(f"{fn}: {name} must have rank {rank} ({layout}), got shape {tuple(shape)}")
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{fn}: {name} must be floating point, got dtype {dtype} (convert it, e.g. x.astype(jnp.float32))"
        )


def check_cotangent(fn: str, dy, expected_shape) -> None:
    """Raises ``ValueError`` unless the cotangent ``dy`` has the shape of the forward output."""
    if tuple(jnp.shape(dy)) != tuple(expected_shape):
        raise ValueError(
            f"{fn}: dy has shape {tuple(jnp.shape(dy))} but the forward output has shape {tuple(expected_shape)}"
        )
    dtype = jnp.result_type(dy)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{fn}: dy must be floating point, got dtype {dtype}")
