"""Hessian-vector products through the hand-written backward passes (float64).

:func:`gradients.hvp` is ``jax.jvp`` of the ``"manual"`` gradient. It is checked against ``jax.jvp`` of
``jax.grad`` of the autodiff route and against central differences of the manual gradient on the zoo models
without BatchNorm; against the full ``jax.hessian`` of the autodiff route on two tiny networks that between
them hold each conv formulation, ReLU, leaky ReLU, tanh and sigmoid, max, average and global average pooling,
BatchNorm in training mode and a residual block; and through :func:`gradients.with_manual_vjp`, whose forward
mode over reverse mode differentiates the hand-written backward, while its forward mode alone is refused.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_per_example import numpy_init, rel, tree_rel

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from jaxcnn import gradients
from jaxcnn.layers import (
    AvgPool2D,
    BatchNorm,
    Conv2D,
    Dense,
    Flatten,
    GlobalAvgPool,
    LeakyRelu,
    MaxPool2D,
    Relu,
    Residual,
    Sigmoid,
    Tanh,
    autodiff_forward,
    serial,
)
from jaxcnn.models import get_model

TOL = 1e-9  # float64, relative per array, against autodiff (measured: <= 2e-15)
FD_STEP = 1e-6
FD_TOL = 1e-8  # central differences of the manual gradient, step 1e-6 (measured: <= 4e-10)


def _direction(params, seed: int):
    """A random direction, each array scaled like the parameter array it moves."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape) * max(float(jnp.std(p)), 0.1)), params
    )


def _scaled_backward(layer, factor: float):
    """``layer`` whose backward is deliberately multiplied by ``factor``."""

    def backward(params, residuals, dy):
        dparams, dx = layer.backward(params, residuals, dy)
        return jax.tree_util.tree_map(lambda g: factor * g, dparams), factor * dx

    return layer._replace(backward=backward)


def _autodiff_loss(model, loss, state, x, target, *, train):
    return lambda p: loss.value(autodiff_forward(model)(p, state, x, train=train)[0], target)


# ---------------------------------------------------------------------------------------------------
# Zoo models


@pytest.mark.parametrize("name", ["seed_net", "lenet5", "small_cnn"])
def test_zoo_hvp_against_autodiff_and_finite_differences(name):
    """Two 28x28 examples: ``hvp`` against ``jax.jvp(jax.grad)`` of the autodiff route and against
    ``(g(p + h v) - g(p - h v)) / 2h`` of the manual gradient ``g``."""
    spec = get_model(name)
    model, loss = spec.build(), spec.loss
    params, state = numpy_init(model, (2, 28, 28, 1))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 28, 28, 1)))
    target = spec.targets(np.array([7, 2]))
    if jnp.issubdtype(target.dtype, jnp.floating):
        target = target.astype(jnp.float64)
    v = _direction(params, 2)

    @jax.jit
    def products(params, v):
        manual = gradients.hvp(model, loss, params, state, x, target, v)
        autodiff = jax.jvp(jax.grad(_autodiff_loss(model, loss, state, x, target, train=True)), (params,), (v,))[1]
        grad = gradients.value_and_grad(model, loss, "manual")
        shifted = [
            grad(jax.tree_util.tree_map(lambda p, t, s=s: p + s * FD_STEP * t, params, v), state, x, target)[1]
            for s in (1, -1)
        ]
        return manual, autodiff, shifted

    manual, autodiff, shifted = products(params, v)
    central = jax.tree_util.tree_map(lambda a, b: (a - b) / (2 * FD_STEP), *shifted)
    assert tree_rel(manual, autodiff) <= TOL
    assert tree_rel(manual, central) <= FD_TOL
    assert all(float(jnp.max(jnp.abs(h))) > 0 for h in jax.tree_util.tree_leaves(manual))  # not vacuous


# ---------------------------------------------------------------------------------------------------
# The whole Hessian of tiny networks


def _tiny_plain():
    """Every conv formulation, leaky ReLU, ReLU, tanh, average and max pooling, dense; 101 params."""
    return serial(
        Conv2D(3, 3, padding=1, method="im2col", dtype=jnp.float64),
        LeakyRelu(0.1),
        AvgPool2D(2),
        Conv2D(4, 2, method="taps", dtype=jnp.float64),
        Relu(),
        MaxPool2D(2, stride=1),
        Conv2D(2, 1, method="conv", dtype=jnp.float64),
        Tanh(),
        Flatten(),
        Dense(3, dtype=jnp.float64),
        name="tiny_plain",
    )


def _tiny_batchnorm():
    """BatchNorm in training mode (its batch statistics differentiated twice), a residual block, sigmoid,
    global average pooling; 131 params."""
    conv = dict(padding=1, method="conv", dtype=jnp.float64)
    return serial(
        Conv2D(3, 3, use_bias=False, **conv),
        BatchNorm(dtype=jnp.float64),
        Relu(),
        Residual(serial(Conv2D(3, 3, **conv), BatchNorm(dtype=jnp.float64))),
        Sigmoid(),
        GlobalAvgPool(),
        Dense(2, dtype=jnp.float64),
        name="tiny_batchnorm",
    )


TINY = {
    "plain-softmax-ce": (_tiny_plain, (2, 6, 6, 1), gradients.softmax_cross_entropy, np.array([0, 2])),
    "batchnorm-train-mse": (
        _tiny_batchnorm,
        (3, 4, 4, 1),
        gradients.mse,
        np.array([[0.2, -0.4], [1.0, 0.3], [-0.5, 0.8]]),
    ),
}


# 3x3x1x3 + 3, 2x2x3x4 + 4, 1x1x4x2 + 2, 2x3 + 3; 3x3x1x3, BN 2x3, 3x3x3x3 + 3, BN 2x3, 3x2 + 2
PARAMS = {"plain-softmax-ce": 30 + 52 + 10 + 9, "batchnorm-train-mse": 27 + 6 + 84 + 6 + 8}


@pytest.mark.parametrize("case", list(TINY))
def test_tiny_network_hessian_against_jax_hessian(case):
    """Forward mode over the hand-written gradient on every basis vector (``jax.jacfwd``) is ``jax.hessian`` of
    the autodiff route; it is symmetric; and ``hvp`` is that matrix applied to ``v``."""
    build, in_shape, loss, target = TINY[case]
    model = build()
    params, state = numpy_init(model, in_shape)
    x = jnp.asarray(np.random.default_rng(1).standard_normal(in_shape))
    target = jnp.asarray(target)
    flat, unravel = ravel_pytree(params)
    assert flat.size == PARAMS[case]
    v = _direction(params, 2)

    @jax.jit
    def hessians(flat, v):
        def manual_grad(f):
            return ravel_pytree(gradients.value_and_grad(model, loss, "manual")(unravel(f), state, x, target)[1])[0]

        h_manual = jax.jacfwd(manual_grad)(flat)
        h_auto = jax.hessian(lambda f: _autodiff_loss(model, loss, state, x, target, train=True)(unravel(f)))(flat)
        return h_manual, h_auto, ravel_pytree(gradients.hvp(model, loss, unravel(flat), state, x, target, v))[0]

    h_manual, h_auto, hv = hessians(flat, v)
    assert rel(h_manual, h_auto) <= TOL
    assert rel(h_manual, h_manual.T) <= TOL
    assert rel(hv, h_auto @ ravel_pytree(v)[0]) <= TOL
    assert np.linalg.matrix_rank(np.asarray(h_auto)) > 10  # a real second derivative, not a few entries


# ---------------------------------------------------------------------------------------------------
# with_manual_vjp under forward mode


@pytest.fixture(scope="module")
def tiny_problem():
    # Dense layers only: what is checked is how with_manual_vjp meets forward mode, not the layers (above).
    model = serial(Dense(4, dtype=jnp.float64), Tanh(), Dense(3, dtype=jnp.float64), name="mlp")
    params, state = numpy_init(model, (2, 5))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5)))
    return model, params, state, x, jnp.array([0, 2]), _direction(params, 2)


def test_with_manual_vjp_forward_over_reverse_differentiates_the_hand_written_backward(tiny_problem):
    """``jax.jvp(jax.grad(f))`` through ``with_manual_vjp`` equals :func:`gradients.hvp`; with the backward
    deliberately scaled by 3, so is the Hessian-vector product (the hand-written backward is what is
    differentiated, not the forward pass); ``jax.hessian`` through it is the autodiff Hessian."""
    model, params, state, x, labels, v = tiny_problem
    loss = gradients.softmax_cross_entropy

    def via_custom_vjp(layer):
        apply = gradients.with_manual_vjp(layer)
        objective = jax.grad(lambda p: loss.value(apply(p, state, x)[0], labels))
        return jax.jit(lambda p, v: jax.jvp(objective, (p,), (v,))[1])(params, v)

    expected = jax.jit(lambda p, v: gradients.hvp(model, loss, p, state, x, labels, v))(params, v)
    assert tree_rel(via_custom_vjp(model), expected) <= 1e-12
    scaled = _scaled_backward(model, 3.0)
    assert tree_rel(via_custom_vjp(scaled), jax.tree_util.tree_map(lambda h: 3.0 * h, expected)) <= 1e-12
    # jax.hessian (forward over reverse, vmapped) too.
    flat, unravel = ravel_pytree(params)
    apply = gradients.with_manual_vjp(model)
    h_vjp = jax.jit(jax.hessian(lambda f: loss.value(apply(unravel(f), state, x)[0], labels)))(flat)
    h_auto = jax.hessian(lambda f: loss.value(model.forward(unravel(f), state, x)[0], labels))(flat)
    assert rel(h_vjp, h_auto) <= 1e-12


def test_with_manual_vjp_refuses_forward_mode_alone(tiny_problem):
    model, params, state, x, _, v = tiny_problem
    apply = gradients.with_manual_vjp(model)
    message = (
        r"^with_manual_vjp: the wrapped model has a reverse-mode rule only \(its hand-written backward\), so "
        r"forward-mode differentiation of it \(jax\.jvp, jax\.jacfwd\) is undefined; for Hessian-vector "
        r"products use jaxcnn\.gradients\.hvp"
    )
    with pytest.raises(TypeError, match=message):
        jax.jvp(lambda p: apply(p, state, x)[0], (params,), (v,))
    with pytest.raises(TypeError, match=message):
        jax.jacfwd(lambda b: apply(dict_replace(params, b), state, x)[0])(params[-1]["b"])
    # Under jax.jit JAX reports it while lowering, with its own message.
    with pytest.raises(TypeError, match=r"can't apply forward-mode autodiff \(jvp\) to a custom_vjp function"):
        jax.jit(lambda p, v: jax.jvp(lambda p: apply(p, state, x)[0], (p,), (v,)))(params, v)


def dict_replace(params, b):
    """``params`` with the last layer's bias replaced by ``b``."""
    return (*params[:-1], dict(params[-1], b=b))


def test_hvp_checks_the_direction():
    model = serial(Dense(2, dtype=jnp.float64), name="one")
    params, state = numpy_init(model, (1, 3))
    x, target = jnp.ones((1, 3)), jnp.zeros((1, 2))
    with pytest.raises(ValueError, match=r"hvp: v must have the structure of params"):
        gradients.hvp(model, gradients.mse, params, state, x, target, params[0])
    bad = ({"b": params[0]["b"], "w": jnp.zeros((2, 3))},)
    with pytest.raises(
        ValueError,
        match=r"hvp: v\[0\]\['w'\] has shape \(2, 3\) and dtype float64 but "
        r"params\[0\]\['w'\] has \(3, 2\) and float64",
    ):
        gradients.hvp(model, gradients.mse, params, state, x, target, bad)
