"""Gradients of a model's loss by routes that must agree.

* ``"manual"``: the forward pass, the loss's hand-written gradient, then the chain of layer backward
  functions.
* ``"autodiff"``: ``jax.value_and_grad`` of the forward pass an autodiff user writes
  (:func:`jaxcnn.layers.autodiff_forward`: ``lax`` convolutions and pooling, as Flax builds them). It is
  the baseline that the hand-written route is measured against, and what ``jaxcnn train --grad autodiff``
  runs.
* ``"autodiff_same_forward"``: ``jax.value_and_grad`` of the very forward pass the manual route runs
  (same formulations, same rounding). It is the witness of the correctness checks: the float64 equality
  tests, :func:`gradcheck_layer` and ``--check-every``.

All formulations compute the same function, so all three routes agree to rounding. A fourth way,
:func:`with_manual_vjp`, wraps the model as a ``jax.custom_vjp`` function so that ``jax.grad`` of any JAX
code calling it runs the hand-written backward. All take and return the same pytrees; the routes share one
signature, so a training loop switches between them with one setting.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxcnn import ops
from jaxcnn.ops.losses import _check_labels, _check_pair
from jaxcnn.gradcheck import GradCheckResult, gradcheck
from jaxcnn.layers import Layer, autodiff_forward

ROUTES = ("manual", "autodiff", "autodiff_same_forward")


def _correct_softmax(logits, labels):
    _check_labels("softmax_cross_entropy correct", logits, labels)
    return jnp.argmax(logits, axis=-1) == labels


def _correct_threshold(threshold: float) -> Callable:
    """Per-example correctness of outputs read as classes: one output column is thresholded at
    ``threshold`` (a probability at 0.5, a logit at 0) against targets in {0, 1}; several columns are read
    as scores, the class being the argmax of the prediction and of the (one-hot) target."""

    def correct(pred, target):
        _check_pair("correct", pred, target)
        if pred.ndim < 2:
            raise ValueError(f"correct: predictions must be (N, outputs), got shape {tuple(pred.shape)}")
        if pred.shape[-1] == 1:
            return ((pred[..., 0] > threshold) == (target[..., 0] > 0.5)).reshape(pred.shape[0], -1).all(axis=1)
        return jnp.argmax(pred, axis=-1) == jnp.argmax(target, axis=-1)

    return correct


class Loss(NamedTuple):
    """A loss and what training and evaluation need from it.

    * ``value(pred, target) -> scalar``: the batch mean;
    * ``backward(dloss, pred, target) -> dpred``: its hand-written gradient;
    * ``per_example(pred, target) -> (N,)``: each example's loss (``value`` is their mean);
    * ``correct(pred, target) -> (N,) bool``: whether each prediction gets its example right (accuracy).
    """

    value: Callable
    backward: Callable
    name: str
    per_example: Callable
    correct: Callable


mse = Loss(ops.mse, ops.mse_backward, "mse", ops.mse_per_example, _correct_threshold(0.5))
binary_cross_entropy_with_logits = Loss(
    ops.binary_cross_entropy_with_logits, ops.binary_cross_entropy_with_logits_backward,
    "binary_cross_entropy_with_logits", ops.binary_cross_entropy_with_logits_per_example, _correct_threshold(0.0),
)
softmax_cross_entropy = Loss(ops.softmax_cross_entropy, ops.softmax_cross_entropy_backward, "softmax_cross_entropy",
                             ops.softmax_cross_entropy_per_example, _correct_softmax)


def value_and_grad(model: Layer, loss: Loss, route: str = "manual") -> Callable:
    """Returns ``f(params, state, x, target, *, train=True, key=None) -> ((loss, (pred, new_state)), grads)``.

    ``route`` is ``"manual"`` (hand-written backward passes), ``"autodiff"`` (``jax.value_and_grad`` of
    the model's :func:`~jaxcnn.layers.autodiff_forward`) or ``"autodiff_same_forward"``
    (``jax.value_and_grad`` of ``model.forward`` itself); all return identical structures and agree to
    rounding.
    """
    if route not in ROUTES:
        raise ValueError(f"value_and_grad: route must be one of {', '.join(ROUTES)}, got {route!r}")

    if route == "manual":

        def manual(params, state, x, target, *, train=True, key=None):
            pred, new_state, residuals = model.forward(params, state, x, train=train, key=key)
            value = loss.value(pred, target)
            dpred = loss.backward(jnp.ones((), value.dtype), pred, target)
            grads, _ = model.backward(params, residuals, dpred)
            return (value, (pred, new_state)), grads

        return manual

    forward = autodiff_forward(model) if route == "autodiff" else model.forward

    def autodiff(params, state, x, target, *, train=True, key=None):
        def objective(p):
            pred, new_state, _ = forward(p, state, x, train=train, key=key)
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
