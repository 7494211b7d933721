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

Owning the backward pass gives more than the batch gradient (``docs/per_example.md``):

* :func:`per_example_grads`: every example's gradient from one forward and one backward pass, the layers'
  batch sums left open (``Layer.per_example_backward``);
* :func:`per_example_grad_norms`: their L2 norms, for dense and most conv layers without forming them
  (``Layer.per_example_sq_norms``: ``‖x_n‖²‖dy_n‖²``, the conv ghost norm);
* :func:`clipped_grad_sum`: ``Σ_n clip_n(g_n)``, each example's gradient scaled to norm at most ``clip``
  (DP-SGD), from the norm pass: each layer's parameter gradient of the cotangent it handed that layer, each
  example's row scaled (``Layer.per_example_sq_norms_and_sum``), with no second pass through the network;
* :func:`hvp`: Hessian-vector products, forward-mode differentiation (``jax.jvp``) of the hand-written
  gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcnn import ops
from jaxcnn.gradcheck import GradCheckResult, gradcheck
from jaxcnn.layers import (
    Layer,
    autodiff_forward,
    per_example_backward,
    per_example_sq_norms,
    per_example_sq_norms_and_sum,
)
from jaxcnn.ops.losses import _check_labels, _check_pair

ROUTES = ("manual", "autodiff", "autodiff_same_forward")  # the gradient routes of value_and_grad (module docstring)


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


# Half the mean squared error, for outputs read as probabilities (thresholded at 0.5 for accuracy).
mse = Loss(ops.mse, ops.mse_backward, "mse", ops.mse_per_example, _correct_threshold(0.5))
# Binary cross-entropy of logits against {0, 1} targets (a logit above 0 reads as class 1).
binary_cross_entropy_with_logits = Loss(
    ops.binary_cross_entropy_with_logits,
    ops.binary_cross_entropy_with_logits_backward,
    "binary_cross_entropy_with_logits",
    ops.binary_cross_entropy_with_logits_per_example,
    _correct_threshold(0.0),
)
# Softmax cross-entropy of (N, classes) logits against integer labels (N,).
softmax_cross_entropy = Loss(
    ops.softmax_cross_entropy,
    ops.softmax_cross_entropy_backward,
    "softmax_cross_entropy",
    ops.softmax_cross_entropy_per_example,
    _correct_softmax,
)


def label_smoothed_cross_entropy(label_smoothing: float) -> Loss:
    """Softmax cross-entropy against the smoothed targets ``(1 - α) onehot(label) + α / classes``
    (``α = label_smoothing`` in ``[0, 1)``; 0 gives :data:`softmax_cross_entropy` itself).

    Accuracy still compares the argmax with the integer label.

    >>> loss = label_smoothed_cross_entropy(0.1)
    >>> loss.name
    'softmax_cross_entropy(label_smoothing=0.1)'
    >>> round(float(loss.value(jnp.zeros((2, 10)), jnp.array([3, 7]))), 4)  # uniform logits: log 10 whatever α
    2.3026
    """
    alpha = float(label_smoothing)
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if alpha == 0.0:
        return softmax_cross_entropy
    return Loss(
        functools.partial(ops.softmax_cross_entropy, label_smoothing=alpha),
        functools.partial(ops.softmax_cross_entropy_backward, label_smoothing=alpha),
        f"softmax_cross_entropy(label_smoothing={alpha:g})",
        functools.partial(ops.softmax_cross_entropy_per_example, label_smoothing=alpha),
        _correct_softmax,
    )


def value_and_grad(model: Layer, loss: Loss, route: str = "manual") -> Callable:
    """Returns ``f(params, state, x, target, *, train=True, key=None) -> ((loss, (pred, new_state)), grads)``.

    ``route`` is ``"manual"`` (hand-written backward passes), ``"autodiff"`` (``jax.value_and_grad`` of
    the model's :func:`~jaxcnn.layers.autodiff_forward`) or ``"autodiff_same_forward"``
    (``jax.value_and_grad`` of ``model.forward`` itself); all return identical structures and agree to
    rounding.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> from jaxcnn import gradients
      >>> from jaxcnn.layers import Dense, Flatten, serial
      >>> net = serial(Flatten(), Dense(3))
      >>> params, state, _ = net.init(jax.random.PRNGKey(0), (1, 2, 2, 1))
      >>> x = jnp.arange(16.0, dtype=jnp.float32).reshape(4, 2, 2, 1) / 16
      >>> labels = jnp.array([0, 1, 2, 0])
      >>> f = gradients.value_and_grad(net, gradients.softmax_cross_entropy)
      >>> (loss, (pred, new_state)), grads = f(params, state, x, labels)
      >>> loss.shape, pred.shape, grads[1]["w"].shape
      ((), (4, 3), (4, 3))
      >>> autodiff = gradients.value_and_grad(net, gradients.softmax_cross_entropy, "autodiff")
      >>> _, grads_autodiff = autodiff(params, state, x, labels)
      >>> bool(jnp.allclose(grads[1]["w"], grads_autodiff[1]["w"], atol=1e-6))
      True
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

    Forward mode over reverse mode works: ``jax.jvp(jax.grad(f))`` and ``jax.hessian(f)`` differentiate the
    hand-written backward itself (as :func:`hvp` does). Forward mode of ``apply`` itself (``jax.jvp``,
    ``jax.jacfwd``) does not: a ``jax.custom_vjp`` function has no forward-mode rule, and giving it one
    (``jax.custom_jvp``) would make reverse mode transpose that rule instead of running ``model.backward``.
    It raises ``TypeError`` (eagerly with a message pointing to :func:`hvp`; under ``jax.jit`` JAX's own,
    when lowering).
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
        try:
            return apply(params, state, x, key)  # forward mode (jax.jvp) is undefined here: see the docstring
        except TypeError as error:  # eager jax.jvp raises here; under jax.jit, JAX raises the same when lowering
            if "forward-mode autodiff" not in str(error):
                raise
            raise TypeError(
                "with_manual_vjp: the wrapped model has a reverse-mode rule only (its hand-written backward), so "
                "forward-mode differentiation of it (jax.jvp, jax.jacfwd) is undefined; for Hessian-vector "
                "products use jaxcnn.gradients.hvp, or jax.jvp of jax.grad (forward over reverse), which "
                "differentiates the hand-written backward"
            ) from error

    return call


def gradcheck_layer(
    layer: Layer,
    params: Any,
    state: Any,
    x: jax.Array,
    *,
    train: bool = False,
    key: jax.Array | None = None,
    loss: Loss | None = None,
    target: jax.Array | None = None,
    name: str | None = None,
    **kwargs: Any,
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


# ---------------------------------------------------------------------------------------------------
# What the hand-written backward makes possible beyond the batch gradient


def _sum_cotangent(loss: Loss, pred, target):
    """``∂(Σ_n loss_n)/∂pred = N · loss.backward(1, pred, target)``, shaped like ``pred``.

    ``loss.value`` is the mean of ``loss.per_example`` and example ``n``'s loss reads only ``pred[n]``, so
    row ``n`` of this cotangent is ``∂loss_n/∂pred[n]``, the cotangent of example ``n``'s loss alone.
    """
    return loss.backward(jnp.asarray(pred.shape[0], pred.dtype), pred, target)


def _forward_for_examples(model: Layer, loss: Loss, params, state, x, target, train, key):
    """The forward pass and the per-example loss cotangent: ``(pred, new_state, residuals, dpred (N, ...))``."""
    pred, new_state, residuals = model.forward(params, state, x, train=train, key=key)
    return pred, new_state, residuals, _sum_cotangent(loss, pred, target)


def per_example_grads(
    model: Layer,
    loss: Loss,
    params: Any,
    state: Any,
    x: jax.Array,
    target: jax.Array,
    *,
    train: bool = True,
    key: jax.Array | None = None,
) -> Any:
    """Each example's gradient ``∂loss_n/∂params``: ``params``' pytree, every leaf ``(N, *leaf.shape)``.

    ``loss_n = loss.per_example(pred, target)[n]``, the loss of example ``n`` in the batch's forward pass.

    One forward pass, then the model's ``per_example_backward`` (:func:`jaxcnn.layers.per_example_backward`)
    on ``dpred = ∂(Σ_n loss_n)/∂pred``: each layer's parameter gradient is a sum over the batch whose
    ``n``-th term is example ``n``'s, and the layers leave that sum open (dense ``x_nᵀ dy_n``, conv
    ``Σ_p patch_npᵀ dy_np``, BatchNorm in evaluation mode). Their mean over ``n`` is the batch gradient of
    :func:`value_and_grad` (``loss.value`` being the mean of the per-example losses).

    Args:
      model, loss: the network and its loss.
      params, state: the model's parameters and state.
      x: inputs ``(N, ...)``; target: what ``loss`` compares the predictions with, ``(N, ...)``.
      train, key: as for the forward pass. In training mode a ``BatchNorm`` layer couples the examples
        through its batch statistics and its rule raises ``ValueError``; dropout uses one mask for the batch.

    To compile it, close over ``model`` and ``loss`` (or make them static) and mark ``train`` static.

    Examples:
      Four examples' gradients, whose mean is the batch gradient:

      >>> import jax
      >>> import jax.numpy as jnp
      >>> from jaxcnn import gradients
      >>> from jaxcnn.layers import Dense, Flatten, serial
      >>> net, loss = serial(Flatten(), Dense(3)), gradients.softmax_cross_entropy
      >>> params, state, _ = net.init(jax.random.PRNGKey(0), (1, 2, 2, 1))
      >>> x = jnp.arange(16.0, dtype=jnp.float32).reshape(4, 2, 2, 1) / 16
      >>> labels = jnp.array([0, 1, 2, 0])
      >>> per_example = gradients.per_example_grads(net, loss, params, state, x, labels)
      >>> per_example[1]["w"].shape, per_example[1]["b"].shape
      ((4, 4, 3), (4, 3))
      >>> _, batch = gradients.value_and_grad(net, loss)(params, state, x, labels)
      >>> bool(jnp.allclose(per_example[1]["w"].mean(axis=0), batch[1]["w"], atol=1e-6))
      True
    """
    _, _, residuals, dpred = _forward_for_examples(model, loss, params, state, x, target, train, key)
    grads, _ = per_example_backward(model)(params, residuals, dpred)
    return grads


def per_example_grad_norms(
    model: Layer,
    loss: Loss,
    params: Any,
    state: Any,
    x: jax.Array,
    target: jax.Array,
    *,
    train: bool = True,
    key: jax.Array | None = None,
) -> jax.Array:
    """``‖∂loss_n/∂params‖₂`` over all parameters, for each example: ``(N,)``.

    One forward pass, then the model's ``per_example_sq_norms`` (:func:`jaxcnn.layers.per_example_sq_norms`):
    a dense layer contributes ``‖x_n‖² ‖dy_n‖² (+ ‖dy_n‖²)``, a conv layer the ghost norm
    ``Σ_{p,q} (patch_np · patch_nq)(dy_np · dy_nq)`` or the norm of its per-example kernel gradient, whichever
    costs less (:func:`jaxcnn.per_example.conv2d_norm_method`); other layers with params the norms of
    :func:`per_example_grads`' terms. Arguments as for :func:`per_example_grads`.
    """
    _, _, residuals, dpred = _forward_for_examples(model, loss, params, state, x, target, train, key)
    sq, _ = per_example_sq_norms(model)(params, residuals, dpred)
    return jnp.sqrt(jnp.maximum(sq, 0))  # the ghost norm is a sum of products: rounding can leave -0.0 at 0


def clipped_grad_sum(
    model: Layer,
    loss: Loss,
    params: Any,
    state: Any,
    x: jax.Array,
    target: jax.Array,
    clip: float | jax.Array,
    *,
    train: bool = True,
    key: jax.Array | None = None,
) -> tuple[Any, jax.Array]:
    """``(Σ_n c_n g_n, norms)`` with ``g_n = ∂loss_n/∂params``, ``norms[n] = ‖g_n‖`` and ``c_n = min(1, clip / ‖g_n‖)``.

    Each example's gradient is scaled to norm at most ``clip`` and the results are summed, the gradient
    of DP-SGD, without forming ``g_n``: the backward pass is linear in the cotangent, and ``g_n`` is the
    backward of row ``n`` of ``dpred = ∂(Σ_n loss_n)/∂pred``, so

        Σ_n c_n g_n = backward(dpred with row n scaled by c_n)

    One forward pass and the norm pass of :func:`per_example_grad_norms` on its residuals. Since no layer mixes
    examples, rescaling row ``n`` of ``dpred`` rescales row ``n`` of every layer's cotangent by the same
    ``c_n``: each layer's parameter gradient is taken from the cotangent the norm pass handed it, scaled per
    row (:func:`jaxcnn.layers.per_example_sq_norms_and_sum`), with no second pass of input gradients through
    the network. A DP-SGD step adds noise to the sum and averages: ``(sum + σ · clip · normal(shape)) / N``,
    per parameter leaf.

    Args:
      clip: the largest norm an example's gradient keeps, ``> 0`` (a scalar).
      model, loss, params, state, x, target, train, key: as for :func:`per_example_grads`.

    Returns:
      ``(grad_sum, norms)``: ``params``' pytree and ``(N,)`` (the norms before clipping).
    """
    (_, _), (grad_sum, norms) = value_and_clipped_grad_sum(
        model, loss, params, state, x, target, clip, train=train, key=key
    )
    return grad_sum, norms


def value_and_clipped_grad_sum(
    model: Layer,
    loss: Loss,
    params: Any,
    state: Any,
    x: jax.Array,
    target: jax.Array,
    clip: float | jax.Array,
    *,
    train: bool = True,
    key: jax.Array | None = None,
) -> tuple[tuple[jax.Array, tuple[jax.Array, Any]], tuple[Any, jax.Array]]:
    """:func:`clipped_grad_sum` with what its forward pass computed, in the layout of :func:`value_and_grad`:
    ``((loss, (pred, new_state)), (grad_sum, norms))``, ``loss`` being the batch's mean (unclipped) loss.
    This is what a DP-SGD train step calls (:func:`jaxcnn.train.train_step` with ``dp_clip``)."""
    if isinstance(clip, (int, float)) and not clip > 0:
        raise ValueError(f"clipped_grad_sum: clip must be positive, got {clip}")
    pred, new_state, residuals, dpred = _forward_for_examples(model, loss, params, state, x, target, train, key)
    sq, _, weighted_sum = per_example_sq_norms_and_sum(model)(params, residuals, dpred)
    norms = jnp.sqrt(jnp.maximum(sq, 0))  # (N,)
    over = norms > clip
    factor = jnp.where(over, clip / jnp.where(over, norms, 1), 1).astype(dpred.dtype)  # c_n, exactly 1 when unclipped
    grad_sum = weighted_sum(factor)
    return (loss.value(pred, target), (pred, new_state)), (grad_sum, norms)


def hvp(
    model: Layer,
    loss: Loss,
    params: Any,
    state: Any,
    x: jax.Array,
    target: jax.Array,
    v: Any,
    *,
    train: bool = True,
    key: jax.Array | None = None,
) -> Any:
    """The Hessian of the batch loss with respect to ``params`` applied to ``v``: ``H v``, ``params``' pytree.

    ``jax.jvp`` (forward mode) of the ``"manual"`` route's gradient ``g(params)`` in the direction ``v``:
    ``H v = d/dt g(params + t v)`` at ``t = 0``. The tangent runs through the forward pass, the loss's
    hand-written gradient and every layer's hand-written backward, so the second derivative is that of the
    code that trains the model. Piecewise-linear selections (ReLU's mask, max-pool's winners, the tie
    policy) have zero derivative and keep the values of the point ``params``; BatchNorm's batch statistics
    (training mode) are differentiated like any other function of ``params``. Costs about two gradients.

    Args:
      v: the direction, a pytree with the structure, shapes and dtypes of ``params``.
      model, loss, params, state, x, target, train, key: as for :func:`value_and_grad`.

    Examples:
      Against ``jax.jvp`` of ``jax.grad`` (autodiff's Hessian-vector product):

      >>> import jax
      >>> import jax.numpy as jnp
      >>> from jaxcnn import gradients
      >>> from jaxcnn.layers import Dense, Flatten, serial
      >>> net, loss = serial(Flatten(), Dense(3)), gradients.softmax_cross_entropy
      >>> params, state, _ = net.init(jax.random.PRNGKey(0), (1, 2, 2, 1))
      >>> x = jnp.arange(16.0, dtype=jnp.float32).reshape(4, 2, 2, 1) / 16
      >>> labels = jnp.array([0, 1, 2, 0])
      >>> v = jax.tree_util.tree_map(jnp.ones_like, params)
      >>> hv = gradients.hvp(net, loss, params, state, x, labels, v)
      >>> hv[1]["w"].shape
      (4, 3)
      >>> def batch_loss(p):
      ...     return loss.value(net.forward(p, state, x)[0], labels)
      >>> _, hv_autodiff = jax.jvp(jax.grad(batch_loss), (params,), (v,))
      >>> bool(jnp.allclose(hv[1]["w"], hv_autodiff[1]["w"], atol=1e-5))
      True
    """
    structure, v_structure = jax.tree_util.tree_structure(params), jax.tree_util.tree_structure(v)
    if structure != v_structure:  # type: ignore[operator]  # (jaxlib's stub leaves PyTreeDef unresolved)
        raise ValueError(f"hvp: v must have the structure of params, {structure}; got {v_structure}")
    for (path, p), t in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(v), strict=True):
        if jnp.shape(p) != jnp.shape(t) or jnp.result_type(p) != jnp.result_type(t):
            raise ValueError(
                f"hvp: v{jax.tree_util.keystr(path)} has shape {tuple(jnp.shape(t))} and dtype "
                f"{jnp.result_type(t)} but params{jax.tree_util.keystr(path)} has "
                f"{tuple(jnp.shape(p))} and {jnp.result_type(p)}"
            )
    grad = value_and_grad(model, loss, "manual")

    def gradient(p):
        return grad(p, state, x, target, train=train, key=key)[1]

    return jax.jvp(gradient, (params,), (v,))[1]
