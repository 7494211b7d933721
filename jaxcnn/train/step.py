"""The train step and the eval step: pure, module-level functions of a static :class:`Step`.

``train_step(step, state, x, target, key) -> (state, metrics)`` is one optimisation step on one batch:
forward, loss, gradients by ``step.grad`` (hand-written or ``jax.grad``), optionally the gradient check,
and the optax update. ``jax.jit(functools.partial(train_step, step))`` is how a user calls it from their
own loop; :func:`jaxcnn.train.loop.run_steps` scans it over a chunk of device-resident batches, which
is how :func:`jaxcnn.fit` and the benchmark run it. ``eval_step`` sums the model's own per-example loss
and correct predictions over a (masked) batch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxcnn.gradients import Loss, value_and_clipped_grad_sum, value_and_grad
from jaxcnn.layers import (
    Layer,
    autodiff_forward,
    per_example_backward,
    per_example_sq_norms,
    per_example_sq_norms_and_sum,
)

PRECISIONS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # --precision -> the compute dtype


class TrainState(NamedTuple):
    """What a step updates: the parameters, the model's own state (BatchNorm statistics), the optimiser's."""

    params: Any
    model_state: Any
    opt_state: Any


class Step(NamedTuple):
    """Everything static about a train step (closed over by ``jax.jit``; never traced).

    ``network`` is the model as the step runs it (in bfloat16 wrapped by :func:`compute_network`), ``grad``
    the gradient route (see :mod:`jaxcnn.gradients`), ``check_every`` how often (0: never) the step also
    compares its gradient with ``jax.grad`` of the same float32 forward (``check_network``) and reports the
    largest relative difference per parameter array. With ``dp_clip`` the step is DP-SGD's: each example's
    gradient clipped to L2 norm ``dp_clip``, Gaussian noise of std ``dp_noise * dp_clip`` added to their sum,
    divided by the batch size (:mod:`jaxcnn.train.privacy`). ``tta`` is the test-time augmentation of
    :func:`eval_outputs` (``"none"`` or ``"flip"``).
    """

    network: Layer
    loss: Loss
    tx: optax.GradientTransformation
    grad: str = "manual"
    dtype: Any = jnp.float32
    check_every: int = 0
    check_network: Layer | None = None
    dp_clip: float | None = None
    dp_noise: float = 0.0
    tta: str = "none"


def make_step(
    model: Layer,
    loss: Loss,
    tx: optax.GradientTransformation,
    *,
    grad: str = "manual",
    precision: str = "float32",
    check_every: int = 0,
    dp_clip: float | None = None,
    dp_noise_multiplier: float = 0.0,
    tta: str = "none",
) -> Step:
    """The :class:`Step` that trains ``model`` on ``loss`` with ``tx`` (DP-SGD with ``dp_clip``; ``tta``: the
    test-time augmentation of its evaluation)."""
    return Step(
        compute_network(model, precision),
        loss,
        tx,
        grad,
        PRECISIONS[precision],
        check_every,
        model if check_every else None,
        dp_clip,
        float(dp_noise_multiplier),
        tta,
    )


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda a: a.astype(dtype), tree)


def max_relative_errors(got, want) -> jax.Array:
    """``max|got - want| / max|want|`` for each pair of leaves, stacked: ``(leaves,)``."""
    return jnp.stack(
        [
            jnp.max(jnp.abs(g - w)) / jnp.maximum(jnp.max(jnp.abs(w)), 1e-30)
            for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True)
        ]
    ).astype(jnp.float32)


def train_step(
    step: Step, state: TrainState, x: jax.Array, target: jax.Array, key: jax.Array | None, t: int | jax.Array = 0
) -> tuple[TrainState, dict]:
    """One optimisation step on the batch ``x (B, H, W, C)`` (float), ``target`` (what ``step.loss`` takes).

    ``key`` drives the layers that draw random numbers (dropout) and DP-SGD's noise; ``t`` is the global step
    number, used only to decide whether this step runs the gradient check. Returns the new state and the metrics
    ``{"loss", "correct", "grad_errors"}``: the batch loss (float32), the number of examples predicted
    right, and per parameter array the largest relative difference between this step's gradient and
    ``jax.grad`` of the same forward pass in float32 (``-1`` where the step was not checked; an empty
    array without ``check_every``).
    """
    x_c, params_c = x.astype(step.dtype), _cast(state.params, step.dtype)
    if step.dp_clip is None:
        grad_fn = value_and_grad(step.network, step.loss, step.grad)
        (loss, (pred, model_state)), grads = grad_fn(params_c, state.model_state, x_c, target, train=True, key=key)
    else:
        (loss, (pred, model_state)), grads = _private_grad(step, params_c, state.model_state, x_c, target, key)
    grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, state.params)
    errors = jnp.zeros((0,), jnp.float32)
    if step.check_every:
        errors = jax.lax.cond(
            t % step.check_every == 0,
            lambda: _check(step, state, x, target, key, grads),
            lambda: jnp.full((len(jax.tree_util.tree_leaves(state.params)),), -1.0, jnp.float32),
        )
    updates, opt_state = step.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    correct = jnp.sum(step.loss.correct(pred.astype(jnp.float32), target), dtype=jnp.int32)
    return TrainState(params, model_state, opt_state), {
        "loss": loss.astype(jnp.float32),
        "correct": correct,
        "grad_errors": errors,
    }


def _private_grad(step: Step, params, model_state, x, target, key):
    """DP-SGD's gradient ``(Σ_n clip(g_n) + σ C ξ) / B`` with ``ξ ~ N(0, I)`` drawn per parameter array from
    ``key`` (split from the dropout key), ``C = step.dp_clip``, ``σ = step.dp_noise``, in the value-and-grad
    layout. The noise and the sum are float32 whatever the compute dtype."""
    if key is None:
        raise ValueError("train_step: a DP-SGD step (dp_clip) needs a PRNG key for its noise; pass key=")
    assert step.dp_clip is not None  # train_step calls this for a DP-SGD step only
    dropout_key, noise_key = jax.random.split(key)
    out, (grad_sum, _) = value_and_clipped_grad_sum(
        step.network, step.loss, params, model_state, x, target, step.dp_clip, train=True, key=dropout_key
    )
    leaves, treedef = jax.tree_util.tree_flatten(grad_sum)
    keys = jax.random.split(noise_key, max(len(leaves), 1))
    scale, batch = step.dp_noise * step.dp_clip, x.shape[0]
    noisy = [
        (g.astype(jnp.float32) + scale * jax.random.normal(k, g.shape, jnp.float32)) / batch
        for g, k in zip(leaves, keys, strict=False)  # a network without parameters still splits one key
    ]
    return out, jax.tree_util.tree_unflatten(treedef, noisy)


def _check(step: Step, state: TrainState, x, target, key, grads):
    """The gradient check of ``--check-every``: this step's gradient against ``jax.grad`` of the same
    forward, both at the float32 parameters and inputs. In a bfloat16 step the step's own gradient
    cannot be the one checked (bfloat16 moves ReLU and max-pool switches, so its gradient differs from any
    float32 one by several percent, which would hide a wrong backward): there the step's route recomputes
    the gradient in float32 on the same batch, testing the same backward code."""
    assert step.check_network is not None  # make_step sets it whenever check_every is
    x32 = x.astype(jnp.float32)
    reference = value_and_grad(step.check_network, step.loss, "autodiff_same_forward")
    _, want = reference(state.params, state.model_state, x32, target, train=True, key=key)
    if step.dtype != jnp.float32:
        _, grads = value_and_grad(step.check_network, step.loss, step.grad)(
            state.params, state.model_state, x32, target, train=True, key=key
        )
    return max_relative_errors(grads, want)


def eval_outputs(step: Step, params, model_state, x):
    """The model's evaluation-mode output for the batch ``x (B, H, W, C)`` (already scaled), as float32:
    the forward of ``step.grad``'s route (the lax forward for ``"autodiff"``) in ``step.dtype``; with
    ``step.tta == "flip"`` the mean of the outputs for ``x`` and for its mirror image (left to right). What
    :func:`eval_step` scores and what :func:`jaxcnn.predict` reads classes from."""
    forward = autodiff_forward(step.network) if step.grad == "autodiff" else step.network.forward
    params, x = _cast(params, step.dtype), x.astype(step.dtype)
    pred = forward(params, model_state, x, train=False)[0].astype(jnp.float32)
    if step.tta == "flip":  # the mean of the outputs for the image and its mirror image
        pred = (pred + forward(params, model_state, x[:, :, ::-1], train=False)[0].astype(jnp.float32)) / 2
    return pred


def eval_step(step: Step, params: Any, model_state: Any, x: jax.Array, target: jax.Array, mask: jax.Array) -> dict:
    """Sums over the examples of one batch where ``mask`` is true: ``{"loss_sum", "correct"}``, the loss
    being ``step.loss.per_example`` of the model's evaluation-mode output (:func:`eval_outputs`; float32 sums)."""
    pred = eval_outputs(step, params, model_state, x)
    per_example = step.loss.per_example(pred, target)
    hits = step.loss.correct(pred, target)
    # Explicit dtypes: with jax_enable_x64 the sums would be int64/float64 and break a scan's carry.
    return {
        "loss_sum": jnp.sum(jnp.where(mask, per_example, 0.0), dtype=jnp.float32),
        "correct": jnp.sum(hits & mask, dtype=jnp.int32),
    }


def Cast(dtype) -> Layer:
    """Casts activations to ``dtype``; the backward casts the cotangent back to the input's dtype."""

    def init(key, in_shape):
        return {}, {}, tuple(in_shape)

    def forward(params, state, x, *, train=False, key=None):
        return x.astype(dtype), state, jnp.zeros((0,), x.dtype)  # the residual records only the dtype

    def backward(params, marker, dy):
        return {}, dy.astype(marker.dtype)

    return Layer(init, forward, backward, f"Cast({jnp.dtype(dtype).name})")


def compute_network(model: Layer, precision: str) -> Layer:
    """The network that a step runs: in bfloat16, activations and weights are bfloat16 and the outputs
    are cast back to float32 before the loss, so the loss and the parameter updates stay float32."""
    if precision == "float32":
        return model
    cast = Cast(jnp.float32)

    # Not ``serial(model, cast)``: that would nest the params one level deeper (and split the init key),
    # so the compute network keeps the structure of ``model``'s params, state and checkpoints.
    def with_cast(forward_of):
        def forward(params, state, x, *, train=False, key=None):
            y, new_state, residuals = forward_of(params, state, x, train=train, key=key)
            y, _, marker = cast.forward({}, {}, y)
            return y, new_state, (residuals, marker)

        return forward

    def through_cast(backward_of):  # a backward of ``model`` preceded by the cast's backward of ``dy``
        def backward(params, residuals, dy):
            residuals, marker = residuals
            _, dy = cast.backward({}, marker, dy)
            return backward_of(params, residuals, dy)

        return backward

    return Layer(
        model.init,
        with_cast(model.forward),
        through_cast(model.backward),
        model.name,
        model.children,
        None if model.autodiff_forward is None else with_cast(model.autodiff_forward),
        through_cast(per_example_backward(model)),
        through_cast(per_example_sq_norms(model)),
        through_cast(per_example_sq_norms_and_sum(model)),
    )
