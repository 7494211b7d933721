"""Gradients of a model's loss by three routes that must agree.

* ``"manual"``: the forward pass, the loss's hand-written gradient, then the chain of layer backward
  functions (:func:`value_and_grad` with ``method="manual"``).
* ``"autodiff"``: ``jax.value_and_grad`` of the same forward pass and loss.
* :func:`with_manual_vjp`: the model as a ``jax.custom_vjp`` function, so that ``jax.grad`` of any JAX
  code calling it runs the hand-written backward.

All three take and return the same pytrees; the first two share one signature, so a training loop
switches between them with one flag.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxcnn import ops
from jaxcnn.gradcheck import GradCheckResult, gradcheck
from jaxcnn.layers import Layer

METHODS = ("manual", "autodiff")


class Loss(NamedTuple):
    """A scalar loss ``value(pred, target)`` and ``backward(dloss, pred, target) -> dpred``."""

    value: Callable
    backward: Callable
    name: str


mse = Loss(ops.mse, ops.mse_backward, "mse")
binary_cross_entropy_with_logits = Loss(
    ops.binary_cross_entropy_with_logits, ops.binary_cross_entropy_with_logits_backward, "binary_cross_entropy_with_logits"
)
softmax_cross_entropy = Loss(ops.softmax_cross_entropy, ops.softmax_cross_entropy_backward, "softmax_cross_entropy")


def value_and_grad(model: Layer, loss: Loss, method: str = "manual") -> Callable:
    """Returns ``f(params, state, x, target, *, train=True, key=None) -> ((loss, (pred, new_state)), grads)``.

    ``method="manual"`` differentiates with the hand-written backward passes, ``"autodiff"`` with
    ``jax.value_and_grad``; both return identical structures and agree to rounding.
    """
    if method not in METHODS:
        raise ValueError(f"value_and_grad: method must be one of {METHODS}, got {method!r}")

    if method == "manual":

        def manual(params, state, x, target, *, train=True, key=None):
            pred, new_state, residuals = model.forward(params, state, x, train=train, key=key)
            value = loss.value(pred, target)
            dpred = loss.backward(jnp.ones((), value.dtype), pred, target)
            grads, _ = model.backward(params, residuals, dpred)
            return (value, (pred, new_state)), grads

        return manual

    def autodiff(params, state, x, target, *, train=True, key=None):
        def objective(p):
            pred, new_state, _ = model.forward(p, state, x, train=train, key=key)
            return loss.value(pred, target), (pred, new_state)

        return jax.value_and_grad(objective, has_aux=True)(params)

    return autodiff


def with_manual_vjp(model: Layer, *, train: bool = False) -> Callable:
    """``apply(params, state, x, key=None) -> (y, new_state)`` whose VJP is the model's hand-written backward.

    ``jax.grad`` (and ``jax.vjp``, under ``jax.jit`` too) of any function of ``y`` then runs
    ``model.backward`` for ``params`` and ``x``; ``state`` and ``key`` get zero cotangents and the
    cotangent of ``new_state`` is ignored (running statistics are not differentiated).
    """

    @jax.custom_vjp
    def apply(params, state, x, key):
        y, new_state, _ = model.forward(params, state, x, train=train, key=key)
        return y, new_state

    def fwd(params, state, x, key):
        y, new_state, residuals = model.forward(params, state, x, train=train, key=key)
        return (y, new_state), (params, state, residuals, key)

    def bwd(saved, cotangents):
        params, state, residuals, key = saved
        dy, _ = cotangents
        dparams, dx = model.backward(params, residuals, dy)
        zero_state = jax.tree_util.tree_map(jnp.zeros_like, state)
        return dparams, zero_state, dx, None if key is None else jnp.zeros_like(key, dtype=jax.dtypes.float0)

    apply.defvjp(fwd, bwd)

    def call(params, state, x, key=None):
        return apply(params, state, x, key)

    return call


def gradcheck_layer(
    layer: Layer,
    params,
    state,
    x,
    *,
    train: bool = False,
    key=None,
    loss: Loss | None = None,
    target=None,
    name: str | None = None,
    **kwargs,
) -> GradCheckResult:
    """:func:`jaxcnn.gradcheck.gradcheck` for a layer or a whole model, with respect to ``params`` and ``x``.

    Without ``loss`` the checked function is ``x, params -> y``; with ``loss`` and ``target`` it is the
    scalar loss, so the check covers the loss gradient too. The forward pass runs with a fixed
    ``train``/``key``, so dropout masks and batch statistics are the same in every evaluation.
    """

    def f(params, x):
        y, _, _ = layer.forward(params, state, x, train=train, key=key)
        return y if loss is None else loss.value(y, target)

    def backward(d_out, params, x):
        y, _, residuals = layer.forward(params, state, x, train=train, key=key)
        dy = d_out if loss is None else loss.backward(d_out, y, target)
        return layer.backward(params, residuals, dy)

    return gradcheck(f, backward, (params, x), names=("params", "x"), name=name or layer.name, **kwargs)
