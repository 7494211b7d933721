"""dense, the activations and the losses: forward against NumPy formulas, ``jax.nn`` and the loop
reference; backward against ``jax.vjp`` and finite differences; stability for large logits; the
per-example losses (whose mean is the loss) and the accuracy rule (``correct``) of each ``gradients.Loss``."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from _opcases import FWD_TOL, GRAD_TOL, assert_close, away_from_zero, normal, record_gradcheck
from hypothesis import given, settings
from hypothesis import strategies as st

import jax
import jax.numpy as jnp

from jaxcnn import gradients, ops
from jaxcnn import reference as ref
from jaxcnn.gradcheck import gradcheck

DTYPES = [np.float64, np.float32]


# ----------------------------------------------------------------------------------------------
# dense
# ----------------------------------------------------------------------------------------------


@jax.jit
def _dense_suite(x, w, b, dy):
    y, vjp = jax.vjp(ops.dense, x, w, b)
    return y, ops.dense_backward(dy, x, w), vjp(dy)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 3),
    fin=st.integers(1, 6),
    fout=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from(DTYPES),
)
def test_dense_sweep(n, fin, fout, seed, dtype):
    dt = np.dtype(dtype).name
    rng = np.random.default_rng(seed)
    x, w, b, dy = (normal(rng, s, dtype) for s in ((n, fin), (fin, fout), (fout,), (n, fout)))
    y, manual, auto = _dense_suite(x, w, b, dy)
    assert y.dtype == dtype
    assert_close(y, ref.dense(x, w, b), FWD_TOL[dt], op="dense", dtype=dt, kind="fwd vs numpy")
    assert_close(
        y, x.astype(np.float64) @ w.astype(np.float64) + b, FWD_TOL[dt], op="dense", dtype=dt, kind="fwd vs matmul"
    )
    for name, got, want, a in zip(("dx", "dw", "db"), manual, ref.dense_backward(dy, x, w), auto, strict=True):
        assert got.dtype == dtype and got.shape == want.shape
        assert_close(got, want, GRAD_TOL[dt], op="dense", dtype=dt, kind="grad vs numpy", what=name)
        assert_close(got, a, GRAD_TOL[dt], op="dense", dtype=dt, kind="grad vs autodiff", what=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_gradcheck(dtype):
    rng = np.random.default_rng(0)
    x, w, b = normal(rng, (3, 5), dtype), normal(rng, (5, 4), dtype), normal(rng, (4,), dtype)
    result = gradcheck(
        ops.dense, lambda dy, x, w, b: ops.dense_backward(dy, x, w), (x, w, b), names=("x", "w", "b"), name="dense"
    )
    record_gradcheck("dense", result)
    assert [r.name for r in result.rows] == ["x", "w", "b"]


def test_dense_bias_optional_and_literal():
    x = np.array([[1.0, 2.0], [3.0, 4.0]])
    w = np.array([[1.0, 0.0, -1.0], [2.0, 1.0, 0.5]])
    np.testing.assert_array_equal(ops.dense(x, w), [[5.0, 2.0, 0.0], [11.0, 4.0, -1.0]])
    np.testing.assert_array_equal(ops.dense(x, w, np.array([1.0, 2.0, 3.0])), [[6.0, 4.0, 3.0], [12.0, 6.0, 2.0]])
    dx, dw, db = ops.dense_backward(np.ones((2, 3)), x, w)
    np.testing.assert_array_equal(dx, [[0.0, 3.5], [0.0, 3.5]])
    np.testing.assert_array_equal(dw, [[4.0, 4.0, 4.0], [6.0, 6.0, 6.0]])
    np.testing.assert_array_equal(db, [2.0, 2.0, 2.0])


def test_dense_bfloat16_forward():
    rng = np.random.default_rng(1)
    x, w, b = (jnp.asarray(normal(rng, s), jnp.bfloat16) for s in ((3, 6), (6, 5), (5,)))
    y = ops.dense(x, w, b)
    assert y.dtype == jnp.bfloat16
    want = np.asarray(x, np.float32) @ np.asarray(w, np.float32) + np.asarray(b, np.float32)
    assert_close(y, want, FWD_TOL["bfloat16"], op="dense", dtype="bfloat16", kind="fwd vs f32 (bf16 in)")


def test_dense_jit_no_recompile():
    traces = []

    def f(x, w, b, dy):
        traces.append(1)
        return ops.dense(x, w, b), ops.dense_backward(dy, x, w)

    jf = jax.jit(f)
    rng = np.random.default_rng(2)
    x, w, b, dy = normal(rng, (3, 5)), normal(rng, (5, 4)), normal(rng, (4,)), normal(rng, (3, 4))
    y, grads = jf(x, w, b, dy)
    jf(2 * x, w, b, dy)
    assert len(traces) == 1
    np.testing.assert_allclose(y, ops.dense(x, w, b), rtol=0, atol=1e-14)
    for a, e in zip(grads, ops.dense_backward(dy, x, w), strict=True):
        np.testing.assert_allclose(a, e, rtol=0, atol=1e-14)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        ((np.zeros((2, 3)), np.zeros((4, 5))), ValueError, r"{fn}: x \(2, 3\) has 3 features but w \(4, 5\) expects 4"),
        (
            (np.zeros((2, 3, 1)), np.zeros((3, 5))),
            ValueError,
            r"{fn}: x must have rank 2 \(\(N, in\)\), got shape \(2, 3, 1\)",
        ),
        ((np.zeros((2, 3)), np.zeros(3)), ValueError, r"{fn}: w must have rank 2 \(\(in, out\)\), got shape \(3,\)"),
        ((np.zeros((2, 3), np.int32), np.zeros((3, 5))), TypeError, r"{fn}: x must be floating point, got dtype int32"),
        ((np.zeros((2, 3)), np.zeros((3, 5), np.int64)), TypeError, r"{fn}: w must be floating point, got dtype int64"),
    ],
)
def test_dense_bad_input(args, exc, match):
    with pytest.raises(exc, match=match.format(fn="dense")):
        ops.dense(*args)
    with pytest.raises(exc, match=match.format(fn="dense_backward")):
        ops.dense_backward(np.zeros((2, 5)), *args)


def test_dense_bad_bias_and_cotangent():
    x, w = np.zeros((2, 3)), np.zeros((3, 5))
    with pytest.raises(ValueError, match=r"dense: b must have shape \(5,\) to match w \(3, 5\), got \(3,\)"):
        ops.dense(x, w, np.zeros(3))
    with pytest.raises(
        ValueError, match=r"dense_backward: dy has shape \(5, 2\) but the forward output has shape \(2, 5\)"
    ):
        ops.dense_backward(np.zeros((5, 2)), x, w)
    with pytest.raises(TypeError, match=r"dense_backward: dy must be floating point, got dtype int64"):
        ops.dense_backward(np.zeros((2, 5), np.int64), x, w)


# ----------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------


def _np_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


SMOOTHING = 0.1


def _np_smoothed(z, labels):
    """The label-smoothed targets, element by element: ``1 - α + α/K`` at the label, ``α/K`` elsewhere."""
    q = np.empty(z.shape)
    for n in range(z.shape[0]):
        for k in range(z.shape[1]):
            q[n, k] = (1 - SMOOTHING if k == labels[n] else 0.0) + SMOOTHING / z.shape[1]
    return q


def _np_softmax_vjp(dy, x, axis, log):
    """``dyᵀ J`` with the Jacobian written out as a matrix per row: softmax ``J = diag(s) - s sᵀ``,
    log-softmax ``J = I - 1 sᵀ`` (row i: output i, column j: input j)."""
    x, dy = np.moveaxis(x, axis, -1), np.moveaxis(dy, axis, -1)
    s = _np_softmax(x, -1)
    k = x.shape[-1]
    eye = np.eye(k)
    jac = eye - s[..., None, :] if log else eye * s[..., None, :] - s[..., :, None] * s[..., None, :]
    return np.moveaxis(np.einsum("...i,...ij->...j", dy, jac), -1, axis)


def _np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


# NumPy derivatives in float64, written from the input x: dx = dy * f'(x) (or dyᵀ J for softmax).
NP_BACKWARD = {
    "sigmoid": lambda dy, x: dy * _np_sigmoid(x) * (1 - _np_sigmoid(x)),
    "tanh": lambda dy, x: dy / np.cosh(x) ** 2,
    "relu": lambda dy, x: dy * (x > 0),
    "leaky_relu": lambda dy, x: dy * np.where(x > 0, 1.0, 0.01),
    "leaky_relu(0.2)": lambda dy, x: dy * np.where(x > 0, 1.0, 0.2),
    "softmax": lambda dy, x: _np_softmax_vjp(dy, x, -1, log=False),
    "softmax(axis=0)": lambda dy, x: _np_softmax_vjp(dy, x, 0, log=False),
    "log_softmax": lambda dy, x: _np_softmax_vjp(dy, x, -1, log=True),
    "log_softmax(axis=0)": lambda dy, x: _np_softmax_vjp(dy, x, 0, log=True),
}

# name -> (forward, backward(dy, x) built from what the backward takes, NumPy formula, jax.nn reference)
ACTIVATIONS = {
    "sigmoid": (
        ops.sigmoid,
        lambda dy, x: ops.sigmoid_backward(dy, ops.sigmoid(x)),
        lambda x: 1 / (1 + np.exp(-x)),
        jax.nn.sigmoid,
    ),
    "tanh": (ops.tanh, lambda dy, x: ops.tanh_backward(dy, ops.tanh(x)), np.tanh, jnp.tanh),
    "relu": (ops.relu, ops.relu_backward, lambda x: np.maximum(x, 0), jax.nn.relu),
    "leaky_relu": (
        ops.leaky_relu,
        ops.leaky_relu_backward,
        lambda x: np.where(x >= 0, x, 0.01 * x),
        lambda x: jax.nn.leaky_relu(x, 0.01),
    ),
    "leaky_relu(0.2)": (
        functools.partial(ops.leaky_relu, negative_slope=0.2),
        functools.partial(ops.leaky_relu_backward, negative_slope=0.2),
        lambda x: np.where(x >= 0, x, 0.2 * x),
        lambda x: jax.nn.leaky_relu(x, 0.2),
    ),
    "softmax": (
        ops.softmax,
        lambda dy, x: ops.softmax_backward(dy, ops.softmax(x)),
        lambda x: _np_softmax(x, -1),
        jax.nn.softmax,
    ),
    "softmax(axis=0)": (
        functools.partial(ops.softmax, axis=0),
        lambda dy, x: ops.softmax_backward(dy, ops.softmax(x, axis=0), axis=0),
        lambda x: _np_softmax(x, 0),
        functools.partial(jax.nn.softmax, axis=0),
    ),
    "log_softmax": (
        ops.log_softmax,
        lambda dy, x: ops.log_softmax_backward(dy, ops.log_softmax(x)),
        lambda x: np.log(_np_softmax(x, -1)),
        jax.nn.log_softmax,
    ),
    "log_softmax(axis=0)": (
        functools.partial(ops.log_softmax, axis=0),
        lambda dy, x: ops.log_softmax_backward(dy, ops.log_softmax(x, axis=0), axis=0),
        lambda x: np.log(_np_softmax(x, 0)),
        functools.partial(jax.nn.log_softmax, axis=0),
    ),
}


ACT_SHAPE = (2, 3, 4)  # one shape throughout: rank 3, so that softmax(axis=0) and axis=-1 differ


@functools.cache
def _activation_suite(name):
    fwd, bwd, _, _ = ACTIVATIONS[name]

    def run(x, dy):
        y, vjp = jax.vjp(fwd, x)
        return y, bwd(dy, x), vjp(dy)[0]

    return jax.jit(run)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_forward_and_backward(name, dtype):
    dt = np.dtype(dtype).name
    _, _, np_fwd, jnn = ACTIVATIONS[name]
    rng = np.random.default_rng(0)
    x = 3 * away_from_zero(rng, ACT_SHAPE, dtype)
    dy = normal(rng, ACT_SHAPE, dtype)
    y, manual, auto = _activation_suite(name)(x, dy)
    assert y.dtype == dtype and manual.dtype == dtype and manual.shape == ACT_SHAPE
    assert_close(y, np_fwd(x.astype(np.float64)), FWD_TOL[dt], op=name, dtype=dt, kind="fwd vs numpy")
    assert_close(y, jax.jit(jnn)(x), FWD_TOL[dt], op=name, dtype=dt, kind="fwd vs jax.nn")
    assert_close(manual, auto, GRAD_TOL[dt], op=name, dtype=dt, kind="grad vs autodiff")
    want = NP_BACKWARD[name](dy.astype(np.float64), x.astype(np.float64))
    assert_close(manual, want, GRAD_TOL[dt], op=name, dtype=dt, kind="grad vs numpy")


# float64 for every activation; float32 for one of each kind (the axis and slope variants differ only in a constant).
GRADCHECK_ACTIVATIONS = [(name, np.float64) for name in ACTIVATIONS] + [
    (name, np.float32) for name in ("sigmoid", "tanh", "relu", "leaky_relu", "softmax", "log_softmax")
]


@pytest.mark.parametrize("name, dtype", GRADCHECK_ACTIVATIONS)
def test_activation_gradcheck(name, dtype):
    fwd, bwd, _, _ = ACTIVATIONS[name]
    x = away_from_zero(np.random.default_rng(1), ACT_SHAPE, dtype)  # no kink within the FD step
    result = gradcheck(fwd, lambda dy, x: (bwd(dy, x),), (x,), names=("x",), name=name)
    record_gradcheck(name, result)


def test_relu_and_leaky_relu_at_the_kink():
    x = np.array([-1.0, 0.0, 2.0])
    dy = np.array([5.0, 7.0, 11.0])
    np.testing.assert_array_equal(ops.relu_backward(dy, x), [0.0, 0.0, 11.0])  # relu'(0) = 0
    # Autodiff of the forward agrees at the kink (jnp.maximum would give 0.5 there).
    np.testing.assert_array_equal(jax.vjp(ops.relu, x)[1](dy)[0], [0.0, 0.0, 11.0])
    np.testing.assert_array_equal(jax.grad(lambda v: ops.relu(v))(0.0), 0.0)
    np.testing.assert_array_equal(ops.leaky_relu_backward(dy, x), [0.05, 7.0, 11.0])  # leaky'(0) = 1
    np.testing.assert_array_equal(jax.vjp(ops.leaky_relu, x)[1](dy)[0], [0.05, 7.0, 11.0])
    np.testing.assert_array_equal(ops.leaky_relu(x, 0.1), [-0.1, 0.0, 2.0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_activations_stable_for_large_inputs(dtype):
    x = np.array([[-1e4, -50.0, 0.0, 50.0, 1e4]], dtype)
    dy = np.ones_like(x)
    s = ops.sigmoid(x)
    np.testing.assert_array_equal(np.asarray(s)[0, [0, 2, 4]], [0.0, 0.5, 1.0])
    for y, g in [
        (s, ops.sigmoid_backward(dy, s)),
        (ops.tanh(x), ops.tanh_backward(dy, ops.tanh(x))),
        (ops.softmax(x), ops.softmax_backward(dy, ops.softmax(x))),
        (ops.log_softmax(x), ops.log_softmax_backward(dy, ops.log_softmax(x))),
    ]:
        assert np.all(np.isfinite(y)) and np.all(np.isfinite(g))
    ls = np.asarray(ops.log_softmax(x), np.float64)
    np.testing.assert_allclose(ls[0, [0, 2, 4]], [-2e4, -1e4, 0.0], rtol=1e-7)
    np.testing.assert_allclose(np.exp(ls).sum(), 1.0, rtol=1e-6)


def test_softmax_backward_rows_orthogonal_to_ones():
    rng = np.random.default_rng(3)
    x, dy = normal(rng, (4, 6)), normal(rng, (4, 6))
    dx = np.asarray(ops.softmax_backward(dy, ops.softmax(x)))
    np.testing.assert_allclose(dx.sum(axis=-1), 0.0, atol=6 * np.finfo(np.float64).eps)


@pytest.mark.parametrize(
    "bwd, name, second",
    [
        (ops.sigmoid_backward, "sigmoid_backward", "y"),
        (ops.tanh_backward, "tanh_backward", "y"),
        (ops.relu_backward, "relu_backward", "x"),
        (ops.leaky_relu_backward, "leaky_relu_backward", "x"),
        (ops.softmax_backward, "softmax_backward", "y"),
        (ops.log_softmax_backward, "log_softmax_backward", "y"),
    ],
)
def test_activation_backward_bad_cotangent(bwd, name, second):
    with pytest.raises(ValueError, match=rf"{name}: dy has shape \(2, 3\) but the forward output has shape \(3, 2\)"):
        bwd(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(TypeError, match=rf"{name}: dy must be floating point, got dtype int32"):
        bwd(np.zeros((3, 2), np.int32), np.zeros((3, 2)))


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def _np_log_sigmoid(z):
    return -np.logaddexp(0.0, -z)


LOSSES = {
    # name -> (loss(pred, target), backward(dloss, pred, target), NumPy formula, target maker)
    "mse": (
        ops.mse,
        ops.mse_backward,
        lambda p, t: 0.5 * np.mean((p - t) ** 2),
        lambda rng, shape, dtype: normal(rng, shape, dtype),
    ),
    "bce_with_logits": (
        ops.binary_cross_entropy_with_logits,
        ops.binary_cross_entropy_with_logits_backward,
        lambda z, y: np.mean(-y * _np_log_sigmoid(z) - (1 - y) * _np_log_sigmoid(-z)),
        lambda rng, shape, dtype: rng.uniform(0, 1, shape).astype(dtype),
    ),
    "softmax_cross_entropy": (
        ops.softmax_cross_entropy,
        ops.softmax_cross_entropy_backward,
        lambda z, y: -np.mean(np.log(_np_softmax(z, -1))[np.arange(len(y)), y]),
        lambda rng, shape, dtype: rng.integers(0, shape[1], shape[0]),
    ),
    # Label smoothing 0.1: the NumPy formula builds the smoothed targets as a loop over examples and classes.
    "softmax_cross_entropy_smoothed": (
        functools.partial(ops.softmax_cross_entropy, label_smoothing=SMOOTHING),
        functools.partial(ops.softmax_cross_entropy_backward, label_smoothing=SMOOTHING),
        lambda z, y: np.mean(-np.sum(_np_smoothed(z, y) * np.log(_np_softmax(z, -1)), axis=1)),
        lambda rng, shape, dtype: rng.integers(0, shape[1], shape[0]),
    ),
}

# NumPy gradients of the losses with respect to the prediction, in float64.
NP_LOSS_GRAD = {
    "softmax_cross_entropy_smoothed": lambda z, y: (_np_softmax(z, -1) - _np_smoothed(z, y)) / z.shape[0],
    "mse": lambda p, t: (p - t) / p.size,
    "bce_with_logits": lambda z, y: (_np_sigmoid(z) - y) / z.size,
    "softmax_cross_entropy": lambda z, y: (_np_softmax(z, -1) - np.eye(z.shape[1])[y]) / z.shape[0],
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_value_and_gradient(name, dtype):
    dt = np.dtype(dtype).name
    loss, bwd, np_loss, target = LOSSES[name]
    rng = np.random.default_rng(4)
    pred = 2 * normal(rng, (4, 5), dtype)
    t = target(rng, (4, 5), dtype)
    value, g, g_auto, g_scaled = jax.jit(
        lambda p, t: (loss(p, t), bwd(1.0, p, t), jax.grad(loss)(p, t), bwd(2.5, p, t))
    )(pred, t)
    assert value.shape == () and value.dtype == dtype
    assert_close(value, np_loss(pred.astype(np.float64), t), FWD_TOL[dt], op=name, dtype=dt, kind="fwd vs numpy")
    assert g.shape == pred.shape and g.dtype == dtype
    assert_close(g, g_auto, GRAD_TOL[dt], op=name, dtype=dt, kind="grad vs autodiff")
    assert_close(
        g, NP_LOSS_GRAD[name](pred.astype(np.float64), t), GRAD_TOL[dt], op=name, dtype=dt, kind="grad vs numpy"
    )
    np.testing.assert_allclose(g_scaled, 2.5 * np.asarray(g), rtol=1e-6 if dt == "float32" else 1e-15)
    result = gradcheck(loss, lambda dl, p, t: (bwd(dl, p, t),), (pred, t), argnums=(0,), names=("pred",), name=name)
    record_gradcheck(name, result)


@jax.jit
def _all_losses(z, y, labels):
    out = {}
    for name, target in (("mse", y), ("bce_with_logits", y), ("softmax_cross_entropy", labels)):
        loss, bwd = LOSSES[name][:2]
        out[name] = (loss(z, target), bwd(1.0, z, target), jax.grad(loss)(z, target))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_losses_finite_for_logits_1e4(dtype):
    z = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]], dtype)
    y = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype)
    labels = np.array([1, 0])
    out = _all_losses(z, y, labels)
    for name, (value, manual, auto) in out.items():
        assert value.dtype == dtype and manual.dtype == dtype
        assert np.isfinite(float(value)), name
        assert np.all(np.isfinite(np.asarray(manual))) and np.all(np.isfinite(np.asarray(auto))), name
    # binary cross-entropy: softplus(z) - y z per element, exactly 0, 1e4 or log 2 here.
    value, g, _ = out["bce_with_logits"]
    np.testing.assert_allclose(float(value), (0.0 + 1e4 + np.log(2.0) + 0.0 + 1e4 + 0.0) / 6, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g) * 6, [[0.0, -1.0, 0.5], [0.0, 1.0, 0.0]], atol=1e-7)
    # softmax cross-entropy: rows [1e4, -1e4, 0] label 1 -> 2e4; [-1e4, 1e4, 1e4] label 0 -> 2e4 + log 2.
    value, g, _ = out["softmax_cross_entropy"]
    np.testing.assert_allclose(float(value), (2e4 + 2e4 + np.log(2.0)) / 2, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g) * 2, [[1.0, -1.0, 0.0], [-1.0, 0.5, 0.5]], atol=1e-7)
    np.testing.assert_allclose(np.asarray(g).sum(axis=-1), 0.0, atol=1e-7)


@jax.jit
def _softmax_ce(z, labels):
    return ops.softmax_cross_entropy(z, labels), ops.softmax_cross_entropy_backward(1.0, z, labels)


@settings(max_examples=25, deadline=None)
@given(scale=st.sampled_from([1.0, 30.0, 1e4]), seed=st.integers(0, 2**32 - 1))
def test_softmax_cross_entropy_gradient_rows_sum_to_zero(scale, seed):
    n, k = 3, 6  # one shape: values and labels vary, nothing recompiles
    rng = np.random.default_rng(seed)
    z = scale * rng.standard_normal((n, k))
    labels = rng.integers(0, k, n)
    value, g = _softmax_ce(z, labels)
    g = np.asarray(g)
    assert np.all(np.isfinite(g)) and np.isfinite(float(value))
    # (sum(softmax) - 1) / n: zero up to one rounding per class.
    np.testing.assert_allclose(g.sum(axis=-1), 0.0, atol=k * np.finfo(np.float64).eps)
    assert np.all(g[np.arange(n), labels] <= 0) and np.all(np.delete(g.ravel(), labels + k * np.arange(n)) >= 0)


def test_loss_bad_input():
    with pytest.raises(ValueError, match=r"mse: prediction \(2, 3\) and target \(3, 2\) differ in shape"):
        ops.mse(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"mse_backward: prediction \(2, 3\) and target \(2,\) differ in shape"):
        ops.mse_backward(1.0, np.zeros((2, 3)), np.zeros(2))
    with pytest.raises(
        ValueError, match=r"binary_cross_entropy_with_logits: prediction \(4,\) and target \(4, 1\) differ"
    ):
        ops.binary_cross_entropy_with_logits(np.zeros(4), np.zeros((4, 1)))
    with pytest.raises(
        ValueError, match=r"binary_cross_entropy_with_logits_backward: prediction \(4,\) and target \(5,\)"
    ):
        ops.binary_cross_entropy_with_logits_backward(1.0, np.zeros(4), np.zeros(5))
    for fn, call in [
        ("softmax_cross_entropy", lambda z, y: ops.softmax_cross_entropy(z, y)),
        ("softmax_cross_entropy_backward", lambda z, y: ops.softmax_cross_entropy_backward(1.0, z, y)),
    ]:
        with pytest.raises(TypeError, match=rf"{fn}: labels must be integer class indices, got dtype float64"):
            call(np.zeros((2, 3)), np.zeros(2))
        with pytest.raises(ValueError, match=rf"{fn}: labels must have shape \(2,\) for logits \(2, 3\), got \(3,\)"):
            call(np.zeros((2, 3)), np.zeros(3, np.int32))
        with pytest.raises(ValueError, match=rf"{fn}: logits must have rank 2 \(\(N, classes\)\), got shape \(3,\)"):
            call(np.zeros(3), np.zeros(3, np.int32))
        with pytest.raises(TypeError, match=rf"{fn}: logits must be floating point, got dtype int64"):
            call(np.zeros((2, 3), np.int64), np.zeros(2, np.int32))


# ----------------------------------------------------------------------------------------------
# Per-example losses and the accuracy rule of each gradients.Loss
# ----------------------------------------------------------------------------------------------


# name -> (per_example(pred, target), NumPy per-example formula (float64), loss in gradients)
PER_EXAMPLE = {
    "mse": (ops.mse_per_example, lambda p, t: 0.5 * ((p - t) ** 2).reshape(len(p), -1).mean(axis=1), "mse"),
    "bce_with_logits": (
        ops.binary_cross_entropy_with_logits_per_example,
        lambda z, y: (-y * _np_log_sigmoid(z) - (1 - y) * _np_log_sigmoid(-z)).reshape(len(z), -1).mean(axis=1),
        "binary_cross_entropy_with_logits",
    ),
    "softmax_cross_entropy": (
        ops.softmax_cross_entropy_per_example,
        lambda z, y: -np.log(_np_softmax(z, -1))[np.arange(len(y)), y],
        "softmax_cross_entropy",
    ),
    "softmax_cross_entropy_smoothed": (
        functools.partial(ops.softmax_cross_entropy_per_example, label_smoothing=SMOOTHING),
        lambda z, y: -np.sum(_np_smoothed(z, y) * np.log(_np_softmax(z, -1)), axis=1),
        "softmax_cross_entropy(label_smoothing=0.1)",
    ),
}
# Prediction shapes: (N, features) for all; a rank-4 map (N, H, W, C) and one output column for the elementwise losses.
PER_EXAMPLE_SHAPES = {
    "mse": [(4, 5), (3, 2, 2, 3), (6, 1)],
    "bce_with_logits": [(4, 5), (3, 2, 2, 3), (6, 1)],
    "softmax_cross_entropy": [(4, 5), (1, 3)],
    "softmax_cross_entropy_smoothed": [(4, 5), (1, 3)],
}


@functools.cache
def _per_example_suite(name):
    loss, per_example = LOSSES[name][0], PER_EXAMPLE[name][0]
    return jax.jit(lambda p, t: (per_example(p, t), loss(p, t)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, shape", [(n, s) for n, shapes in PER_EXAMPLE_SHAPES.items() for s in shapes])
def test_loss_per_example_mean_is_the_value(name, shape, dtype):
    dt = np.dtype(dtype).name
    target_maker = LOSSES[name][3]
    np_per_example = PER_EXAMPLE[name][1]
    rng = np.random.default_rng(5)
    pred = 2 * normal(rng, shape, dtype)
    t = target_maker(rng, shape, dtype)
    per, value = _per_example_suite(name)(pred, t)
    assert per.shape == (shape[0],) and per.dtype == dtype
    assert_close(
        per,
        np_per_example(pred.astype(np.float64), t),
        FWD_TOL[dt],
        op=f"{name}_per_example",
        dtype=dt,
        kind="fwd vs numpy",
    )
    # The mean over examples is the scalar loss (every example holds as many elements), to a few roundings.
    rtol = 1e-15 if dt == "float64" else 1e-6
    np.testing.assert_allclose(np.mean(np.asarray(per, np.float64)), float(value), rtol=rtol)
    np.testing.assert_allclose(float(jnp.mean(per)), float(value), rtol=rtol)


def test_loss_per_example_eager_and_literal():
    pred = np.array([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]])
    target = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    np.testing.assert_array_equal(ops.mse_per_example(pred, target), [0.5 * 4 / 2, 0.0, 0.5 * 13 / 2])
    # softplus(0) - 0 = log 2 for each element of the second example.
    np.testing.assert_allclose(
        ops.binary_cross_entropy_with_logits_per_example(pred, target)[1], np.log(2.0), rtol=1e-15
    )
    logits = np.array([[0.0, 0.0], [10.0, -10.0]])
    np.testing.assert_allclose(
        ops.softmax_cross_entropy_per_example(logits, np.array([1, 1])),
        [np.log(2.0), 20.0 + np.log1p(np.exp(-20.0))],
        rtol=1e-15,
    )


def test_loss_per_example_finite_for_logits_1e4():
    z = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]])
    y = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(
        ops.binary_cross_entropy_with_logits_per_example(z, y), [(1e4 + np.log(2.0)) / 3, 1e4 / 3], rtol=1e-14
    )
    np.testing.assert_allclose(
        ops.softmax_cross_entropy_per_example(z, np.array([1, 0])), [2e4, 2e4 + np.log(2.0)], rtol=1e-14
    )


def test_gradients_losses_bundle_the_ops():
    assert gradients.Loss._fields == ("value", "backward", "name", "per_example", "correct")
    expected = {
        "mse": (ops.mse, ops.mse_backward, ops.mse_per_example),
        "binary_cross_entropy_with_logits": (
            ops.binary_cross_entropy_with_logits,
            ops.binary_cross_entropy_with_logits_backward,
            ops.binary_cross_entropy_with_logits_per_example,
        ),
        "softmax_cross_entropy": (
            ops.softmax_cross_entropy,
            ops.softmax_cross_entropy_backward,
            ops.softmax_cross_entropy_per_example,
        ),
    }
    for name, (value, backward, per_example) in expected.items():
        loss = getattr(gradients, name)
        assert loss.name == name
        assert (loss.value, loss.backward, loss.per_example) == (value, backward, per_example)
        assert callable(loss.correct)


def _correct(loss_name, pred, target):
    out = getattr(gradients, loss_name).correct(jnp.asarray(pred), jnp.asarray(target))
    assert out.dtype == jnp.bool_ and out.shape == (np.shape(pred)[0],)
    return np.asarray(out)


def test_correct_softmax_cross_entropy_is_the_argmax():
    logits = np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0], [0.0, 0.0, -1.0], [-5.0, -4.0, -6.0]])
    np.testing.assert_array_equal(
        _correct("softmax_cross_entropy", logits, np.array([1, 2, 0, 1])), [True, False, True, True]
    )  # a tie goes to the first class
    np.testing.assert_array_equal(
        _correct("softmax_cross_entropy", logits, np.array([1, 2, 1, 1])), [True, False, False, True]
    )
    # Under jit too, and on float32 logits.
    out = jax.jit(gradients.softmax_cross_entropy.correct)(logits.astype(np.float32), np.array([1, 0, 0, 2]))
    np.testing.assert_array_equal(out, [True, True, True, False])


@pytest.mark.parametrize("loss_name, threshold", [("mse", 0.5), ("binary_cross_entropy_with_logits", 0.0)])
def test_correct_one_column_thresholds(loss_name, threshold):
    """One output column: a probability thresholded at 0.5 (mse on a sigmoid) or a logit at 0 (BCE), against
    targets in {0, 1}; exactly the threshold reads as class 0."""
    t = threshold
    pred = np.array([[t - 0.3], [t + 0.2], [t], [t + 1e-9], [t - 1e-9], [t + 5.0]])
    target = np.array([[0.0], [1.0], [1.0], [0.0], [0.0], [1.0]])
    np.testing.assert_array_equal(_correct(loss_name, pred, target), [True, True, False, False, True, True])
    # A map of one-column outputs (N, H, W, 1) is correct when every position is.
    maps = np.full((2, 2, 2, 1), t + 1.0)
    maps[1, 0, 1, 0] = t - 1.0
    np.testing.assert_array_equal(_correct(loss_name, maps, np.ones((2, 2, 2, 1))), [True, False])


@pytest.mark.parametrize("loss_name", ["mse", "binary_cross_entropy_with_logits"])
def test_correct_several_columns_compare_argmax_with_one_hot_targets(loss_name):
    pred = np.array([[0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [-2.0, -1.0, -3.0], [0.2, 0.2, 0.6]])
    target = np.eye(3)[[1, 2, 1, 2]]
    np.testing.assert_array_equal(_correct(loss_name, pred, target), [True, False, True, True])


def test_loss_per_example_bad_input():
    with pytest.raises(ValueError, match=r"mse_per_example: prediction \(2, 3\) and target \(3, 2\) differ in shape"):
        ops.mse_per_example(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"mse_per_example: prediction \(4, 1\) and target \(4,\) differ in shape"):
        ops.mse_per_example(np.zeros((4, 1)), np.zeros(4))
    with pytest.raises(
        ValueError,
        match=r"binary_cross_entropy_with_logits_per_example: prediction \(4,\) and target "
        r"\(4, 1\) differ in shape",
    ):
        ops.binary_cross_entropy_with_logits_per_example(np.zeros(4), np.zeros((4, 1)))
    fn = "softmax_cross_entropy_per_example"
    with pytest.raises(TypeError, match=rf"{fn}: labels must be integer class indices, got dtype float64"):
        ops.softmax_cross_entropy_per_example(np.zeros((2, 3)), np.zeros(2))
    with pytest.raises(ValueError, match=rf"{fn}: labels must have shape \(2,\) for logits \(2, 3\), got \(2, 1\)"):
        ops.softmax_cross_entropy_per_example(np.zeros((2, 3)), np.zeros((2, 1), np.int32))
    with pytest.raises(ValueError, match=rf"{fn}: logits must have rank 2 \(\(N, classes\)\), got shape \(3,\)"):
        ops.softmax_cross_entropy_per_example(np.zeros(3), np.zeros(3, np.int32))
    with pytest.raises(TypeError, match=rf"{fn}: logits must be floating point, got dtype int64"):
        ops.softmax_cross_entropy_per_example(np.zeros((2, 3), np.int64), np.zeros(2, np.int32))
