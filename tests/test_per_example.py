"""Per-example gradients, their norms and the clipped gradient sum (float64), three ways.

* Layer by layer (Conv2D over stride, padding, dilation, groups, bias and formulation; Dense; BatchNorm in
  evaluation mode; the fallback for a layer without a rule): ``per_example_backward`` against
  ``jax.vmap`` over examples of ``jax.vjp`` of the layer's autodiff forward on one example, against the
  NumPy loops of :mod:`jaxcnn.reference` run on each example alone, and summed over the batch against the
  layer's ``backward``; ``per_example_sq_norms`` (ghost, direct, auto) against the squared norms of those
  gradients.
* Every zoo model (resnet_small in evaluation mode): :func:`gradients.per_example_grads` against
  ``jax.vmap(jax.grad)`` of the autodiff route's per-example loss, their mean against
  ``value_and_grad(model, loss, "manual")``, :func:`gradients.per_example_grad_norms` and
  :func:`gradients.clipped_grad_sum` against the norms and the clipped sum of those gradients.

Errors are relative per array, ``max|got - ref| / max|ref|``; every tolerance is float64's ``1e-10``
(measured: at most about ``4e-15``, see the test docstrings).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _opcases import as_pair, explicit_pads

import jax
import jax.numpy as jnp

from jaxcnn import gradients, layers, per_example, reference
from jaxcnn.layers import (
    BatchNorm,
    Conv2D,
    Dense,
    Flatten,
    Layer,
    Relu,
    Residual,
    Tanh,
    autodiff_forward,
    serial,
)
from jaxcnn.models import get_model

TOL = 1e-10  # float64, relative per array


def rel(got, ref) -> float:
    """``max|got - ref| / max|ref|`` (the absolute error when ``ref`` is all zero)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    scale = float(np.max(np.abs(ref), initial=0.0))
    err = float(np.max(np.abs(got - ref), initial=0.0))
    return err / scale if scale > 0 else err


def tree_rel(got, ref) -> float:
    """The largest :func:`rel` over the arrays of two pytrees of the same structure."""
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(ref)
    pairs = zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref), strict=True)
    return max((rel(a, b) for a, b in pairs), default=0.0)


def numpy_init(model: Layer, in_shape, seed: int = 0):
    """float64 params and state drawn with NumPy on the shapes of ``model.init`` (no initializer compiles):
    He-scaled kernels, biases and BatchNorm shifts away from 0, scales near 1, positive running variances."""
    params, state = jax.eval_shape(lambda k: model.init(k, in_shape)[:2], jax.random.PRNGKey(0))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = jax.tree_util.keystr(path), leaf.shape
        if name.endswith("['var']"):
            return jnp.asarray(0.5 + rng.random(shape))
        if name.endswith("['scale']"):
            return jnp.asarray(1.0 + 0.2 * rng.standard_normal(shape))
        if len(shape) == 1:
            return jnp.asarray(0.1 * rng.standard_normal(shape))
        return jnp.asarray(rng.standard_normal(shape) * math.sqrt(2.0 / math.prod(shape[:-1])))

    return jax.tree_util.tree_map_with_path(draw, params), jax.tree_util.tree_map_with_path(draw, state)


def per_example_sq(grads, n: int):
    """``(N,)`` squared norms of per-example gradients, in NumPy."""
    return sum(np.sum(np.asarray(g).reshape(n, -1) ** 2, axis=1) for g in jax.tree_util.tree_leaves(grads))


# ---------------------------------------------------------------------------------------------------
# Layer by layer


def _layer_outputs(layer: Layer, params, state, x, dy, extra):
    """Everything a layer check compares, in one compiled program; ``extra(params, x, dy)`` adds more."""

    @jax.jit
    def run(params, x, dy):
        _, _, res = layer.forward(params, state, x)
        pe_grads, pe_dx = layers.per_example_backward(layer)(params, res, dy)
        sq, sq_dx = layers.per_example_sq_norms(layer)(params, res, dy)
        grads, dx = layer.backward(params, res, dy)

        def one(xn, dyn):  # the baseline: jax.vjp of the autodiff forward on one example
            _, vjp = jax.vjp(lambda p: autodiff_forward(layer)(p, state, xn[None])[0], params)
            return vjp(dyn[None])[0]

        return pe_grads, pe_dx, sq, sq_dx, grads, dx, jax.vmap(one)(x, dy), extra(params, x, dy)

    return run(params, x, dy)


def _assert_layer(layer: Layer, in_shape, *, seed: int = 0, extra=lambda params, x, dy: None):
    """The layer-level checks; returns ``(params, x, dy, per-example grads, extra's outputs, vmap(vjp)'s
    per-example grads)``."""
    params, state = numpy_init(layer, in_shape, seed)
    rng = np.random.default_rng(seed + 1)
    x = jnp.asarray(rng.standard_normal(in_shape))
    out_shape = jax.eval_shape(lambda p, x: layer.forward(p, state, x)[0], params, x).shape
    dy = jnp.asarray(rng.standard_normal(out_shape))
    pe_grads, pe_dx, sq, sq_dx, grads, dx, baseline, more = _layer_outputs(layer, params, state, x, dy, extra)
    n = in_shape[0]
    for g, p in zip(jax.tree_util.tree_leaves(pe_grads), jax.tree_util.tree_leaves(params), strict=True):
        assert g.shape == (n, *p.shape)
    errors = {
        "per-example vs vmap(vjp)": tree_rel(pe_grads, baseline),
        "sum over examples vs backward": tree_rel(jax.tree_util.tree_map(lambda g: g.sum(0), pe_grads), grads),
        "sq norms vs per-example grads": rel(sq, per_example_sq(pe_grads, n)),
    }
    assert max(errors.values()) <= TOL, errors
    # The input gradient passed to the layer below is backward's.
    np.testing.assert_allclose(pe_dx, dx, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(sq_dx, dx, rtol=1e-13, atol=1e-14)
    # Not vacuous: the examples' gradients differ.
    assert n == 1 or all(rel(g[0], g[1]) > 1e-3 for g in jax.tree_util.tree_leaves(pe_grads))
    return params, x, dy, pe_grads, more, baseline


# (id, Conv2D keyword arguments, input shape). Each case picks one formulation for the input gradient;
# every case checks both formulations of the per-example kernel gradient ("im2col" and "taps").
CONV_CASES = [
    ("k3-s2-same-auto", dict(features=4, kernel=3, stride=2, padding="SAME"), (2, 6, 6, 3)),
    (
        "k2x3-s2x1-d2-asym-pad-im2col",
        dict(features=3, kernel=(2, 3), stride=(2, 1), dilation=2, padding=((1, 0), (2, 1)), method="im2col"),
        (3, 6, 7, 2),
    ),
    (
        "groups2-nobias-taps",
        dict(features=6, kernel=3, groups=2, padding=1, use_bias=False, method="taps"),
        (2, 5, 5, 4),
    ),
    (
        "depthwise-x2-s2-same-conv",
        dict(features=8, kernel=3, groups=4, stride=2, padding="SAME", method="conv"),
        (2, 6, 6, 4),
    ),
    ("batch1-k1x3-s3-not-dividing-im2col", dict(features=3, kernel=(1, 3), stride=3, method="im2col"), (1, 7, 8, 2)),
    ("k3-s2-16ch-ghost-auto", dict(features=16, kernel=3, stride=2, padding="SAME"), (2, 4, 4, 16)),
]


@pytest.mark.parametrize("kwargs, in_shape", [pytest.param(k, s, id=i) for i, k, s in CONV_CASES])
def test_conv2d_per_example_grads_and_norms(kwargs, in_shape):
    """Conv2D: against vmap(vjp) and the NumPy loops per example, the batch sum, and both norm methods
    (measured: <= 1e-15)."""
    kwargs = dict(kwargs)
    features, use_bias = kwargs.pop("features"), kwargs.get("use_bias", True)
    layer = Conv2D(features, dtype=jnp.float64, **kwargs)
    hyper = {k: kwargs.get(k, d) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1))}

    def every_formulation(params, x, dy):
        sq = {
            method: per_example.conv2d_per_example_sq_norms(
                dy, x, params["w"], use_bias=use_bias, method=method, **hyper
            )
            for method in ("ghost", "direct")
        }
        dw = {
            method: per_example.conv2d_per_example_grads(dy, x, params["w"], method=method, **hyper)[0]
            for method in ("im2col", "taps")
        }
        return sq, dw

    params, x, dy, pe_grads, (sq, dw), baseline = _assert_layer(layer, in_shape, extra=every_formulation)
    assert set(pe_grads) == ({"w", "b"} if use_bias else {"w"})
    # Both norm formulations, whichever "auto" (the layer's, checked above) picks.
    sq_ref = per_example_sq(pe_grads, in_shape[0])
    assert rel(sq["ghost"], sq_ref) <= TOL and rel(sq["direct"], sq_ref) <= TOL
    # Both per-example kernel gradient formulations against vmap(vjp) and the batch kernel gradient.
    batch_dw = layer.backward(params, x, dy)[0]["w"]
    for method, dw_m in dw.items():
        assert rel(dw_m, baseline["w"]) <= TOL and rel(dw_m.sum(0), batch_dw) <= TOL, method

    # NumPy loops, one example at a time.
    stride, dilation = as_pair(hyper["stride"]), as_pair(hyper["dilation"])
    window = params["w"].shape[:2]
    eff = tuple((k - 1) * d + 1 for k, d in zip(window, dilation, strict=True))
    pads = tuple(tuple(p) for p in explicit_pads(hyper["padding"], in_shape[1:3], eff, stride))
    for n in range(in_shape[0]):
        _, dw_n, db_n = reference.conv2d_backward(
            np.asarray(dy[n : n + 1]),
            np.asarray(x[n : n + 1]),
            np.asarray(params["w"]),
            stride=stride,
            padding=pads,
            dilation=dilation,
            groups=hyper["groups"],
        )
        assert rel(pe_grads["w"][n], dw_n) <= TOL and all(rel(dw_m[n], dw_n) <= TOL for dw_m in dw.values())
        if use_bias:
            assert rel(pe_grads["b"][n], db_n) <= TOL


def test_conv2d_grads_method_rule():
    """``"taps"`` only for one input channel and fewer than 8 outputs (seed_net's and LeNet-5's first
    convolutions); the channel-major patch matrix everywhere else, depthwise included."""
    assert per_example.conv2d_grads_method(1, 3) == "taps"
    assert per_example.conv2d_grads_method(1, 6) == "taps"
    assert per_example.conv2d_grads_method(1, 8) == "im2col"
    assert per_example.conv2d_grads_method(6, 16) == "im2col"
    assert per_example.conv2d_grads_method(32, 32) == "im2col"


def test_conv2d_norm_method_rule():
    """``T (K + O) < K O`` picks the ghost norm: small outputs, many channels."""
    assert per_example.conv2d_norm_method(4, 144, 16) == "ghost"  # the 16-channel stride-2 case above
    assert per_example.conv2d_norm_method(16, 144, 16) == "direct"  # 2560 > 2304
    assert per_example.conv2d_norm_method(49, 576, 64) == "ghost"  # 7x7 output, 3x3 conv, 64 channels
    assert per_example.conv2d_norm_method(784, 25, 6) == "direct"  # LeNet-5's first conv
    with pytest.raises(
        ValueError, match=r"conv2d_per_example_grads: method must be one of \('taps', 'im2col', 'auto'\), got 'conv'"
    ):
        per_example.conv2d_per_example_grads(
            jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 1, 1, 1)), method="conv"
        )
    with pytest.raises(
        ValueError,
        match=r"conv2d_per_example_sq_norms: method must be one of \('ghost', 'direct', "
        r"'auto'\), got 'fast'",
    ):
        per_example.conv2d_per_example_sq_norms(
            jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 1, 1, 1)), method="fast"
        )


@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "nobias"])
def test_dense_per_example_grads_and_norms(use_bias):
    """Dense: ``x_nᵀ dy_n`` and ``‖x_n‖² ‖dy_n‖²`` against vmap(vjp) and the NumPy loops (measured: <= 3e-16)."""
    params, x, dy, pe_grads, _, _ = _assert_layer(Dense(5, use_bias=use_bias, dtype=jnp.float64), (3, 6))
    for n in range(3):
        _, dw_n, db_n = reference.dense_backward(
            np.asarray(dy[n : n + 1]), np.asarray(x[n : n + 1]), np.asarray(params["w"])
        )
        assert rel(pe_grads["w"][n], dw_n) <= TOL
        if use_bias:
            assert rel(pe_grads["b"][n], db_n) <= TOL


@pytest.mark.parametrize("in_shape", [(3, 4, 5, 3), (3, 4)], ids=["nhwc", "features"])
def test_batchnorm_evaluation_mode_per_example_grads(in_shape):
    """BatchNorm with running statistics: ``dγ_n = Σ dy_n x̂_n``, ``dβ_n = Σ dy_n`` (measured: <= 6e-16)."""
    _assert_layer(BatchNorm(dtype=jnp.float64), in_shape)


def test_layer_without_a_rule_falls_back_to_one_backward_per_example():
    """A layer with params but no per-example rule: its backward on each example's rows of ``dy``
    (measured: <= 4e-16), inside a network whose other layers have rules."""
    bare = Dense(4, dtype=jnp.float64)._replace(per_example_backward=None, per_example_sq_norms=None)
    _assert_layer(serial(Conv2D(2, 3, dtype=jnp.float64), Tanh(), Flatten(), bare), (3, 5, 5, 1))


def test_weighted_sum_reuses_the_norm_pass_cotangents():
    """``per_example_sq_norms_and_sum``'s weighted sum for arbitrary per-example weights ``c`` against an
    ordinary backward pass of ``dy`` with row ``n`` scaled by ``c[n]``, and its squared norms against
    those of ``per_example_backward``'s gradients, through serial, every Conv2D norm method, a residual block
    (projection shortcut, BatchNorm in evaluation mode) and a layer without a rule of its own (measured: <= 5e-16)."""
    bare = Dense(3, dtype=jnp.float64)._replace(per_example_backward=None, per_example_sq_norms=None)
    block = serial(Conv2D(4, 3, padding="SAME", dtype=jnp.float64), BatchNorm(dtype=jnp.float64), Tanh())
    shortcut = Conv2D(4, 1, use_bias=False, dtype=jnp.float64)
    # Both of Conv2D's norm methods: the first conv's is "direct" (a 4x4 output), the strided one's "ghost"
    # (a 3x3 output of 16 channels).
    first, ghost = Conv2D(12, 3, dtype=jnp.float64), Conv2D(16, 3, stride=2, padding="SAME", dtype=jnp.float64)
    assert per_example.conv2d_norm_method(9, 36, 16) == "ghost"
    assert per_example.conv2d_norm_method(16, 9, 12) == "direct"
    model = serial(first, Residual(block, shortcut), Relu(), ghost, Flatten(), bare)
    n = 4
    params, state = numpy_init(model, (n, 6, 6, 1))
    rng = np.random.default_rng(3)
    x, c = jnp.asarray(rng.standard_normal((n, 6, 6, 1))), jnp.asarray(rng.uniform(0.1, 2.0, n))
    y, _, residuals = model.forward(params, state, x)
    dy = jnp.asarray(rng.standard_normal(y.shape))

    @jax.jit
    def run(params, residuals, dy, c):
        sq, dx, weighted_sum = layers.per_example_sq_norms_and_sum(model)(params, residuals, dy)
        want_grads, _ = model.backward(params, residuals, dy * c[:, None])
        return (sq, dx, weighted_sum(c)), (layers.per_example_backward(model)(params, residuals, dy)[0], want_grads)

    (sq, dx, got), (pe_grads, want) = run(params, residuals, dy, c)
    assert tree_rel(got, want) <= TOL and rel(sq, per_example_sq(pe_grads, n)) <= TOL
    assert rel(dx, model.backward(params, residuals, dy)[1]) <= TOL
    # Not vacuous: the weights change every array of the sum.
    plain = jax.tree_util.tree_leaves(model.backward(params, residuals, dy)[0])
    assert all(rel(a, b) > 1e-3 for a, b in zip(jax.tree_util.tree_leaves(got), plain, strict=True))


def test_batchnorm_training_mode_refuses_per_example_gradients():
    model = serial(Dense(3), BatchNorm(), Relu(), Dense(2))
    params, state = numpy_init(model, (4, 5))
    x, labels, loss = jnp.ones((4, 5)), jnp.array([0, 1, 1, 0]), gradients.softmax_cross_entropy
    message = (
        r"^BatchNorm: per-example gradients are not available in training mode, where the batch statistics "
        r"couple the examples; use evaluation mode \(train=False\) or a model without batch normalisation"
    )
    # Refused when traced, so under jax.jit as well.
    for fn in (gradients.per_example_grads, gradients.per_example_grad_norms):
        with pytest.raises(ValueError, match=message):
            jax.jit(lambda p, fn=fn: fn(model, loss, p, state, x, labels, train=True))(params)
    with pytest.raises(ValueError, match=message):
        jax.jit(lambda p: gradients.clipped_grad_sum(model, loss, p, state, x, labels, 1.0, train=True))(params)
    # Evaluation mode is fine.
    grads = jax.jit(lambda p: gradients.per_example_grads(model, loss, p, state, x, labels, train=False))(params)
    assert grads[1]["scale"].shape == (4, 3)


def test_per_example_arguments_are_checked():
    with pytest.raises(
        ValueError,
        match=r"dense_per_example_grads: dy \(2, 3\) and x \(4, 5\) hold different numbers "
        r"of examples",
    ):
        per_example.dense_per_example_grads(jnp.zeros((2, 3)), jnp.zeros((4, 5)))
    with pytest.raises(
        ValueError,
        match=r"conv2d_per_example_grads: dy has shape \(1, 3, 3, 2\) but the forward "
        r"output has shape \(1, 2, 2, 2\)",
    ):
        per_example.conv2d_per_example_grads(jnp.zeros((1, 3, 3, 2)), jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 2)))
    with pytest.raises(ValueError, match=r"clipped_grad_sum: clip must be positive, got 0.0"):
        gradients.clipped_grad_sum(Dense(2), gradients.mse, {}, {}, jnp.zeros((1, 2)), jnp.zeros((1, 2)), 0.0)


# ---------------------------------------------------------------------------------------------------
# Whole models


def _autodiff_per_example(model: Layer, loss, params, state, x, target):
    """The baseline: ``jax.vmap`` over examples of ``jax.grad`` of the autodiff forward's per-example loss."""

    def one(xn, tn):
        return jax.grad(
            lambda p: loss.per_example(autodiff_forward(model)(p, state, xn[None], train=False)[0], tn[None])[0]
        )(params)

    return jax.vmap(one)(x, target)


def _model_outputs(model: Layer, loss, state):
    """Everything a zoo check compares, as one compiled function of ``(params, x, target, clip)``."""

    @jax.jit
    def run(params, x, target, clip):
        kw = dict(train=False)
        return (
            gradients.per_example_grads(model, loss, params, state, x, target, **kw),
            _autodiff_per_example(model, loss, params, state, x, target),
            gradients.value_and_grad(model, loss, "manual")(params, state, x, target, **kw)[1],
            gradients.per_example_grad_norms(model, loss, params, state, x, target, **kw),
            gradients.clipped_grad_sum(model, loss, params, state, x, target, clip, **kw),
        )

    return run


@pytest.mark.parametrize("name", ["seed_net", "lenet5", "small_cnn", "resnet_small"])
def test_zoo_per_example_grads_norms_and_clipped_sum(name):
    """Every zoo model on three 28x28 examples (resnet_small with running statistics): per-example gradients
    against vmap(grad) of the autodiff route, their mean against the batch gradient, the norms and the clipped
    sum against those of the per-example gradients (measured: <= 4e-15)."""
    spec = get_model(name)
    model, n = spec.build(), 3
    params, state = numpy_init(model, (n, 28, 28, 1))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((n, 28, 28, 1)))
    target = spec.targets(np.array([7, 2, 4]))
    if jnp.issubdtype(target.dtype, jnp.floating):
        target = target.astype(jnp.float64)
    # The clip threshold sits between the norms, so that some examples are clipped and some are not: a
    # first call (no example clipped) gives the norms, a second (same compiled program) clips at their median.
    run = _model_outputs(model, spec.loss, state)
    norms0 = run(params, x, target, 1e300)[3]
    clip = float(np.median(np.asarray(norms0)))
    pe_grads, baseline, batch_grads, norms, (clipped_sum, clip_norms) = run(params, x, target, clip)

    ref_norms = np.sqrt(per_example_sq(pe_grads, n))
    factors = np.minimum(1.0, clip / ref_norms)
    assert np.sum(factors < 1) == 1 and np.sum(factors == 1) == 2  # one example is clipped, two are not
    errors = {
        "per-example vs vmap(grad)": tree_rel(pe_grads, baseline),
        "mean vs batch gradient": tree_rel(jax.tree_util.tree_map(lambda g: g.mean(0), pe_grads), batch_grads),
        "norms vs per-example grads": rel(norms, ref_norms),
        "clipped-sum norms": rel(clip_norms, ref_norms),
        "clipped sum vs clipping per-example grads": tree_rel(
            clipped_sum, jax.tree_util.tree_map(lambda g: np.tensordot(factors, np.asarray(g), 1), pe_grads)
        ),
    }
    assert max(errors.values()) <= TOL, errors
    # Not vacuous: every array has a gradient, and the examples' gradients differ.
    for g in jax.tree_util.tree_leaves(pe_grads):
        assert g.shape[0] == n and np.max(np.abs(g)) > 0 and rel(g[0], g[1]) > 1e-3
