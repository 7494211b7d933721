"""conv2d / conv2d_backward, every formulation ("conv", "im2col", "taps" and "auto"), against the tutorials'
literal values, the NumPy loop reference, ``lax.conv_general_dilated``, ``jax.vjp`` and finite differences."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from _opcases import (
    FWD_TOL,
    GRAD_TOL,
    J,
    assert_close,
    conv_configs,
    normal,
    record_gradcheck,
    resolved,
    unread_mask,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import jax
import jax.numpy as jnp
from jax import lax

from jaxcnn import ops
from jaxcnn import reference as ref
from jaxcnn.gradcheck import gradcheck
from jaxcnn.ops import conv as conv_module
from jaxcnn.shapes import window_geometry

# Every formulation conv2d offers, written out (not imported) so that test_every_formulation_is_covered
# fails when the module gains one these tests do not run.
METHODS = ("conv", "im2col", "taps", "auto")
DN = ("NHWC", "HWIO", "NHWC")


def lax_conv(x, w, b, *, stride, padding, dilation, groups):
    """``lax.conv_general_dilated`` with its own handling of every padding form (float64)."""
    s = (stride, stride) if isinstance(stride, int) else tuple(stride)
    d = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    if isinstance(padding, str):
        pads = padding
    elif isinstance(padding, int):
        pads = [(padding, padding)] * 2
    elif isinstance(padding[0], int):
        pads = [(padding[0], padding[0]), (padding[1], padding[1])]
    else:
        pads = [tuple(p) for p in padding]
    y = lax.conv_general_dilated(
        jnp.asarray(x, jnp.float64),
        jnp.asarray(w, jnp.float64),
        s,
        pads,
        rhs_dilation=d,
        dimension_numbers=DN,
        feature_group_count=groups,
        precision=lax.Precision.HIGHEST,
    )
    return np.asarray(y if b is None else y + jnp.asarray(b, jnp.float64))


def _hyper(cfg):
    return {k: cfg[k] for k in ("stride", "padding", "dilation", "groups")}


@functools.cache
def conv_suite(stride, padding, dilation, groups):
    """One compiled function per hyperparameter set: forward and manual backward of every method, and ``jax.vjp``."""
    hyper = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)

    def run(x, w, b, dy):
        # Autodiff witness: jax.vjp of the lax-based forward (the same function as every method computes).
        _, vjp = jax.vjp(functools.partial(ops.conv2d, method="conv", **hyper), x, w, b)
        auto = vjp(dy)
        return {
            m: dict(
                y=ops.conv2d(x, w, b, method=m, **hyper),
                manual=ops.conv2d_backward(dy, x, w, method=m, **hyper),
                vjp=auto,
            )
            for m in METHODS
        }

    return jax.jit(run)


def _freeze(v):
    return tuple(_freeze(e) for e in v) if isinstance(v, (list, tuple)) else v


def check_conv_case(cfg, rng, dtype):
    """Forward and backward of every method vs NumPy loops, lax and jax.vjp; unread inputs get zero dx."""
    dt = np.dtype(dtype).name
    x = normal(rng, cfg["x_shape"], dtype)
    w = normal(rng, cfg["w_shape"], dtype)
    b = normal(rng, cfg["w_shape"][3:], dtype)
    window, stride, dilation, pads = resolved(cfg)
    y_ref = ref.conv2d(x, w, b, stride=stride, padding=pads, dilation=dilation, groups=cfg["groups"])
    dy = normal(rng, y_ref.shape, dtype)
    dx_ref, dw_ref, db_ref = ref.conv2d_backward(
        dy, x, w, stride=stride, padding=pads, dilation=dilation, groups=cfg["groups"]
    )
    y_lax = lax_conv(x, w, b, **_hyper(cfg))
    assert_close(y_lax, y_ref, 1e-12, op="lax.conv (witness)", dtype="float64", kind="fwd vs numpy")

    suite = conv_suite(*(_freeze(cfg[k]) for k in ("stride", "padding", "dilation", "groups")))
    out = suite(x, w, b, dy)
    unread = unread_mask(cfg["x_shape"][1:3], window, stride, dilation, pads, y_ref.shape[1:3])
    for m in METHODS:
        op = f"conv2d[{m}]"
        r = out[m]
        assert r["y"].dtype == dtype and r["y"].shape == y_ref.shape
        assert_close(r["y"], y_ref, FWD_TOL[dt], op=op, dtype=dt, kind="fwd vs numpy", what=str(cfg))
        assert_close(r["y"], y_lax, FWD_TOL[dt], op=op, dtype=dt, kind="fwd vs lax", what=str(cfg))
        for name, got, want, auto in zip(
            ("dx", "dw", "db"), r["manual"], (dx_ref, dw_ref, db_ref), r["vjp"], strict=True
        ):
            assert got.dtype == dtype and got.shape == want.shape, (name, got.shape, want.shape)
            assert_close(got, want, GRAD_TOL[dt], op=op, dtype=dt, kind="grad vs numpy", what=f"{name} {cfg}")
            assert_close(got, auto, GRAD_TOL[dt], op=op, dtype=dt, kind="grad vs autodiff", what=f"{name} {cfg}")
        dx = np.asarray(r["manual"][0])
        assert np.all(dx[:, unread, :] == 0.0), f"{op}: input positions no window reads got a gradient {cfg}"
        assert np.all(dx_ref[:, unread, :] == 0.0)


# ----------------------------------------------------------------------------------------------
# Pinned tutorial values
# ----------------------------------------------------------------------------------------------

IMAGE = [[1.0, 7.0, 2.0], [11.0, 1.0, 23.0], [2.0, 2.0, 2.0]]
FILTER = [[1.0, 1.0], [0.0, 1.0]]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_tutorial_image_filter(method, dtype):
    x = np.asarray(IMAGE, dtype)[None, :, :, None]
    w = np.asarray(FILTER, dtype)[:, :, None, None]
    y = J(ops.conv2d, method=method)(x, w)
    assert y.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y)[0, :, :, 0], [[9.0, 32.0], [14.0, 26.0]])
    y_eager = ops.conv2d(x, w, method=method)
    np.testing.assert_array_equal(np.asarray(y_eager)[0, :, :, 0], [[9.0, 32.0], [14.0, 26.0]])


# The 3x3 input / 2x2 filter backward example: dF = conv(X, dO), dX = full_conv(dO, rot180 F).
X = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
F = np.array([[1.0, 2.0], [3.0, 4.0]])
DO = np.array([[1.0, -1.0], [2.0, 0.5]])


def _tutorial_elementwise():
    (X11, X12, X13), (X21, X22, X23), (X31, X32, X33) = X
    (F11, F12), (F21, F22) = F
    (dO11, dO12), (dO21, dO22) = DO
    dF = np.array(
        [
            [X11 * dO11 + X12 * dO12 + X21 * dO21 + X22 * dO22, X12 * dO11 + X13 * dO12 + X22 * dO21 + X23 * dO22],
            [X21 * dO11 + X22 * dO12 + X31 * dO21 + X32 * dO22, X22 * dO11 + X23 * dO12 + X32 * dO21 + X33 * dO22],
        ]
    )
    dX = np.array(
        [
            [F11 * dO11, F12 * dO11 + F11 * dO12, F12 * dO12],
            [F21 * dO11 + F11 * dO21, F22 * dO11 + F21 * dO12 + F12 * dO21 + F11 * dO22, F22 * dO12 + F12 * dO22],
            [F21 * dO21, F22 * dO21 + F21 * dO22, F22 * dO22],
        ]
    )
    return dF, dX


def test_tutorial_elementwise_formulas_literal():
    dF, dX = _tutorial_elementwise()
    np.testing.assert_array_equal(dF, [[9.5, 12.0], [17.0, 19.5]])
    np.testing.assert_array_equal(dX, [[1.0, 1.0, -2.0], [5.0, 5.5, -3.0], [6.0, 9.5, 2.0]])


@pytest.mark.parametrize("method", METHODS)
def test_tutorial_backward_element_by_element(method):
    dF, dX = _tutorial_elementwise()
    x, w, dy = X[None, :, :, None], F[:, :, None, None], DO[None, :, :, None]
    dx, dw, db = J(ops.conv2d_backward, method=method)(dy, x, w)
    np.testing.assert_array_equal(np.asarray(dw)[:, :, 0, 0], dF)
    np.testing.assert_array_equal(np.asarray(dx)[0, :, :, 0], dX)
    assert float(db[0]) == DO.sum()
    # dF = conv(X, dO): the input correlated with the output gradient used as a filter.
    np.testing.assert_array_equal(np.asarray(J(ops.conv2d, method=method)(x, dy.transpose(1, 2, 0, 3)))[0, :, :, 0], dF)
    # dX = full_conv(dO, rot180 F): dO zero-padded by one, correlated with the filter rotated by 180 degrees.
    full = J(ops.conv2d, padding=1, method=method)(dy, np.rot90(F, 2)[:, :, None, None].copy())
    np.testing.assert_array_equal(np.asarray(full)[0, :, :, 0], dX)
    rdx, rdw, _ = ref.conv2d_backward(dy, x, w)
    np.testing.assert_array_equal(rdx[0, :, :, 0], dX)
    np.testing.assert_array_equal(rdw[:, :, 0, 0], dF)


# ----------------------------------------------------------------------------------------------
# Property-based sweeps: NumPy loops, lax, jax.vjp, every method
# ----------------------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(cfg=conv_configs(), seed=st.integers(0, 2**32 - 1))
def test_conv_sweep_float64(cfg, seed):
    check_conv_case(cfg, np.random.default_rng(seed), np.float64)


@settings(max_examples=8, deadline=None)
@given(cfg=conv_configs(), seed=st.integers(0, 2**32 - 1))
def test_conv_sweep_float32(cfg, seed):
    check_conv_case(cfg, np.random.default_rng(seed), np.float32)


# Pinned corners of the sweep, so that each is exercised on every run.
PINNED = {
    "plain 3x3": dict(x_shape=(2, 5, 5, 3), w_shape=(3, 3, 3, 2), stride=1, padding=0, dilation=1, groups=1),
    "stride not dividing, pairs, dilation, groups": dict(
        x_shape=(2, 7, 6, 4), w_shape=(3, 2, 2, 4), stride=(2, 3), padding=((1, 0), (2, 1)), dilation=(1, 2), groups=2
    ),
    "depthwise SAME stride 2": dict(
        x_shape=(2, 7, 6, 4), w_shape=(3, 3, 1, 4), stride=2, padding="SAME", dilation=1, groups=4
    ),
    "depthwise x2, pair padding": dict(
        x_shape=(1, 7, 5, 3), w_shape=(2, 3, 1, 6), stride=(1, 2), padding=(2, 1), dilation=1, groups=3
    ),
    "1x1 kernel, stride > kernel": dict(
        x_shape=(2, 8, 7, 2), w_shape=(1, 1, 2, 3), stride=3, padding=(1, 0), dilation=1, groups=1
    ),
    "padding > kernel span": dict(
        x_shape=(2, 7, 6, 4), w_shape=(3, 2, 2, 4), stride=1, padding=3, dilation=1, groups=2
    ),
    # H = 7, kernel 3, stride 3: row 6 is never read; W = 6, kernel 2, stride 4: columns 2, 3 are never read.
    "trailing rows/cols unread": dict(
        x_shape=(2, 7, 6, 4), w_shape=(3, 2, 2, 4), stride=(3, 4), padding="VALID", dilation=1, groups=2
    ),
    "dilated SAME, odd extra": dict(
        x_shape=(2, 6, 9, 2), w_shape=(2, 3, 2, 4), stride=(1, 2), padding="SAME", dilation=(3, 2), groups=1
    ),
    # The sweep draws at most 3 channels per group, where "taps" always takes its broadcast multiply-adds and
    # "auto" always takes "taps" for the forward pass and the input gradient. These two have more input and
    # output channels per group than TAPS_ELEMENTWISE_MAX (5 in, 6 out; 10 in, 6 out), so "taps" contracts
    # with a matrix product; "auto" takes "conv" for the forward pass of both and for the input gradient of
    # the second, "taps" for the input gradient of the grouped one (5 <= INPUT_GRAD_FEW_CHANNELS_MAX input
    # channels per group, grouped); see test_auto_takes_every_formulation_on_the_pinned_cases.
    "many channels, grouped": dict(
        x_shape=(1, 6, 5, 10), w_shape=(2, 3, 5, 12), stride=(2, 1), padding=(1, 0), dilation=1, groups=2
    ),
    "many channels": dict(
        x_shape=(1, 5, 6, 10), w_shape=(3, 2, 10, 6), stride=1, padding="SAME", dilation=(1, 2), groups=1
    ),
}


@pytest.mark.parametrize("case", list(PINNED))
def test_conv_pinned_cases(case):
    check_conv_case(PINNED[case], np.random.default_rng(7), np.float64)


def test_trailing_rows_and_columns_get_exactly_zero_gradient():
    # H = 8, kernel 3, stride 3: windows start at rows 0 and 3, rows 6 and 7 are never read.
    # W = 9, kernel 2, stride 4: windows read columns 0-1 and 4-5 only.
    rng = np.random.default_rng(3)
    x, w = normal(rng, (1, 8, 9, 2)), normal(rng, (3, 2, 2, 2))
    assert ops.conv2d(x, w, stride=(3, 4)).shape == (1, 2, 2, 2)
    dy = normal(rng, (1, 2, 2, 2))
    every = jax.jit(lambda dy, x, w: [ops.conv2d_backward(dy, x, w, stride=(3, 4), method=m)[0] for m in METHODS])
    for dx in every(dy, x, w):
        dx = np.asarray(dx)
        assert np.all(dx[:, 6:, :, :] == 0.0)
        assert np.all(dx[:, :, [2, 3, 6, 7, 8], :] == 0.0)
        assert np.all(dx[:, :6, [0, 1, 4, 5], :] != 0.0)


# ----------------------------------------------------------------------------------------------
# Finite differences (gradcheck: manual vs jax.vjp vs central differences vs the adjoint identity)
# ----------------------------------------------------------------------------------------------

# Finite differences on two geometries that exercise every hyperparameter (the sweep and the pinned cases
# above compare every geometry with the NumPy loops and jax.vjp).
GRADCHECK_CASES = [
    (case, m) for case in ("stride not dividing, pairs, dilation, groups", "depthwise SAME stride 2") for m in METHODS
]


def _conv_gradcheck(case, method, dtype, seed=0):
    cfg = PINNED[case]
    hyper = _hyper(cfg)
    rng = np.random.default_rng(seed)
    x, w, b = (
        normal(rng, cfg["x_shape"], dtype),
        normal(rng, cfg["w_shape"], dtype),
        normal(rng, cfg["w_shape"][3:], dtype),
    )
    # Jitted (one compile per method, case and dtype): op by op, the tap-at-a-time formulations compile every
    # slice and product of every tap separately, which takes twice as long. Eager and jitted results are
    # compared in test_conv_jit_matches_eager_and_does_not_recompile.
    backward = J(ops.conv2d_backward, method=method, **hyper)
    result = gradcheck(
        J(ops.conv2d, method=method, **hyper),
        lambda dy, x, w, b: backward(dy, x, w),
        (x, w, b),
        names=("x", "w", "b"),
        name=f"conv2d[{method}] {case}",
    )
    record_gradcheck(f"conv2d[{method}]", result)
    return result


@pytest.mark.parametrize("case, method", GRADCHECK_CASES)
def test_conv_gradcheck_float64(case, method):
    result = _conv_gradcheck(case, method, np.float64)
    assert [r.name for r in result.rows] == ["x", "w", "b"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", ["stride not dividing, pairs, dilation, groups"])
def test_conv_gradcheck_float32(case, method):
    result = _conv_gradcheck(case, method, np.float32)
    assert result.dtype == "float32"


def test_every_formulation_is_covered():
    # The tests parametrized by METHODS (and the sweeps) run each of them: a formulation added to the module
    # must be added to METHODS to be verified.
    assert METHODS == conv_module.METHODS
    assert conv_module.DEFAULT_METHOD in METHODS


def test_auto_takes_every_formulation_on_the_pinned_cases():
    # "auto" is verified through the pinned cases and the sweep; between them its dispatch takes both the
    # "taps" and the "conv" code path for the forward pass and all three ("taps", "im2col", "conv") for the
    # input gradient (the kernel gradient is always "conv"), so every branch of conv2d/conv2d_backward
    # under "auto" is exercised.
    picked = {
        case: {
            grad: conv_module.resolve_method(grad, cfg["w_shape"], cfg["groups"])
            for grad in ("forward", "input_grad", "kernel_grad")
        }
        for case, cfg in PINNED.items()
    }
    assert picked["plain 3x3"] == dict(forward="taps", input_grad="im2col", kernel_grad="conv")
    assert picked["many channels, grouped"] == dict(forward="conv", input_grad="taps", kernel_grad="conv")
    assert picked["many channels"] == dict(forward="conv", input_grad="conv", kernel_grad="conv")
    # And "taps" itself contracts both ways: broadcast multiply-adds (few channels) and a matrix product.
    small = conv_module.TAPS_ELEMENTWISE_MAX
    cg = {cfg["w_shape"][2] for cfg in PINNED.values()}
    og = {cfg["w_shape"][3] // cfg["groups"] for cfg in PINNED.values()}
    assert min(cg) <= small < max(cg) and min(og) <= small < max(og)


# ----------------------------------------------------------------------------------------------
# im2col / col2im
# ----------------------------------------------------------------------------------------------

IM2COL_GEOMS = [
    dict(in_hw=(5, 6), window=(3, 2), stride=1, padding=0, dilation=1),
    dict(in_hw=(7, 6), window=(3, 3), stride=(2, 3), padding=((1, 0), (2, 1)), dilation=(1, 2)),
    dict(in_hw=(6, 5), window=(2, 2), stride=1, padding=3, dilation=1),
    dict(in_hw=(8, 9), window=(3, 2), stride=(3, 4), padding="VALID", dilation=1),
    dict(in_hw=(5, 7), window=(2, 3), stride=2, padding="SAME", dilation=2),
]


@pytest.mark.parametrize("g", IM2COL_GEOMS, ids=lambda g: f"{g['in_hw']}-{g['window']}-{g['stride']}-{g['padding']}")
def test_im2col_matches_reference_and_col2im_is_its_adjoint(g):
    rng = np.random.default_rng(5)
    geom = window_geometry(fn="test", **g)
    c = 3
    x = normal(rng, (2, *g["in_hw"], c))
    patches = jax.jit(ops.im2col, static_argnums=1)(x, geom)
    oh, ow = geom.out_hw
    kh, kw = geom.window
    assert patches.shape == (2, oh, ow, kh * kw, c)
    want = ref.im2col(x, kh, kw, stride=geom.stride, padding=geom.padding, dilation=geom.dilation)
    np.testing.assert_array_equal(np.asarray(patches).reshape(2 * oh * ow, kh * kw * c), want)
    # <im2col(x), P> == <x, col2im(P)> for random x, P.
    p = normal(rng, patches.shape)
    back = jax.jit(ops.col2im, static_argnums=1)(p, geom)
    assert back.shape == x.shape
    lhs, rhs = float(jnp.vdot(patches, p)), float(jnp.vdot(x, back))
    err = abs(lhs - rhs) / max(abs(lhs), abs(rhs))
    assert err <= 1e-13, (lhs, rhs)


# ----------------------------------------------------------------------------------------------
# bfloat16 forward, jit, recompilation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "case", ["plain 3x3", "stride not dividing, pairs, dilation, groups", "depthwise x2, pair padding"]
)
def test_conv_bfloat16_forward(case, method):
    cfg = PINNED[case]
    rng = np.random.default_rng(11)
    x = jnp.asarray(normal(rng, cfg["x_shape"]), jnp.bfloat16)
    w = jnp.asarray(normal(rng, cfg["w_shape"]), jnp.bfloat16)
    b = jnp.asarray(normal(rng, cfg["w_shape"][3:]), jnp.bfloat16)
    y = J(ops.conv2d, method=method, **_hyper(cfg))(x, w, b)
    assert y.dtype == jnp.bfloat16
    # float32 reference on the same (bf16-rounded) inputs: only the op's own rounding is measured.
    want = lax_conv(x.astype(jnp.float32), w.astype(jnp.float32), b.astype(jnp.float32), **_hyper(cfg))
    assert_close(y, want, FWD_TOL["bfloat16"], op=f"conv2d[{method}]", dtype="bfloat16", kind="fwd vs lax(bf16 in)")


@pytest.mark.parametrize("method", METHODS)
def test_conv_jit_matches_eager_and_does_not_recompile(method):
    cfg = PINNED["stride not dividing, pairs, dilation, groups"]
    hyper = _hyper(cfg)
    traces = []

    def fwd_bwd(x, w, b, dy):
        traces.append(1)
        return ops.conv2d(x, w, b, method=method, **hyper), ops.conv2d_backward(dy, x, w, method=method, **hyper)

    jitted = jax.jit(fwd_bwd)
    rng = np.random.default_rng(2)
    x, w, b = normal(rng, cfg["x_shape"]), normal(rng, cfg["w_shape"]), normal(rng, (4,))
    dy = normal(rng, ops.conv2d(x, w, **hyper).shape)
    y_e, g_e = ops.conv2d(x, w, b, method=method, **hyper), ops.conv2d_backward(dy, x, w, method=method, **hyper)
    y_j, g_j = jitted(x, w, b, dy)
    assert len(traces) == 1
    np.testing.assert_allclose(y_j, y_e, rtol=0, atol=1e-12)
    for a, e in zip(g_j, g_e, strict=True):
        np.testing.assert_allclose(a, e, rtol=0, atol=1e-12)
    jitted(x + 1.0, w, b, dy)  # same shapes, new values: no retrace
    jitted(x, w * 2.0, b, dy)
    assert len(traces) == 1
    jitted(x[:1], w, b, dy[:1])  # a new batch size traces once more
    assert len(traces) == 2


def test_conv_without_bias_and_with_bias():
    rng = np.random.default_rng(0)
    x, w, b = normal(rng, (1, 4, 4, 2)), normal(rng, (2, 2, 2, 3)), normal(rng, (3,))
    for m in METHODS:
        y0, y1 = J(ops.conv2d, method=m)(x, w), J(ops.conv2d, method=m)(x, w, b)
        np.testing.assert_allclose(np.asarray(y1) - np.asarray(y0), np.broadcast_to(b, y0.shape), rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# Bad input: ValueError / TypeError naming the function, the argument and the shapes
# ----------------------------------------------------------------------------------------------

_x = np.zeros((2, 5, 5, 4))
_w = np.zeros((3, 3, 4, 6))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "x, w, kwargs, exc, match",
    [
        (
            _x,
            np.zeros((3, 3, 3, 6)),
            {},
            ValueError,
            r"conv2d: channel mismatch: x \(2, 5, 5, 4\) has 4 channels but w \(3, 3, 3, 6\) \(HWIO\) "
            r"expects 3 x groups=1 = 3",
        ),
        (
            _x,
            np.zeros((3, 3, 4, 6)),
            dict(groups=2),
            ValueError,
            r"conv2d: channel mismatch: x \(2, 5, 5, 4\) has 4 channels but w \(3, 3, 4, 6\) \(HWIO\) "
            r"expects 4 x groups=2 = 8",
        ),
        (
            _x,
            np.zeros((3, 3, 1, 6)),
            dict(groups=3),
            ValueError,
            r"conv2d: groups=3 does not divide the 4 input channels of x \(2, 5, 5, 4\)",
        ),
        (
            _x,
            np.zeros((3, 3, 2, 5)),
            dict(groups=2),
            ValueError,
            r"conv2d: groups=2 does not divide the 5 output channels of w \(3, 3, 2, 5\)",
        ),
        (_x, _w, dict(groups=0), ValueError, r"conv2d: groups must be positive, got 0"),
        (_x, _w, dict(groups=1.0), TypeError, r"conv2d: groups must be an int"),
        (
            _x,
            np.zeros((6, 3, 4, 6)),
            dict(padding=0),
            ValueError,
            r"conv2d: kernel height 6 exceeds the padded input height 5 \(5 \+ 0 \+ 0\); "
            r"output height would be \(5 - 6\)/1 \+ 1 = 0",
        ),
        (
            _x,
            _w,
            dict(dilation=3),
            ValueError,
            r"conv2d: kernel height 3 \(dilation 3 -> 7\) exceeds the padded input height 5 \(5 \+ 0 \+ 0\); "
            r"output height would be \(5 - 7\)/1 \+ 1 = -1",
        ),
        (
            _x,
            _w,
            dict(dilation=(1, 4), padding=1),
            ValueError,
            r"conv2d: kernel width 3 \(dilation 4 -> 9\) exceeds the padded input width 7 \(5 \+ 1 \+ 1\); "
            r"output width would be \(7 - 9\)/1 \+ 1 = -1",
        ),
        (
            _x,
            np.zeros((3, 6, 4, 6)),
            dict(padding=((0, 0), (0, 0))),
            ValueError,
            r"conv2d: kernel width 6 exceeds the padded input width 5 \(5 \+ 0 \+ 0\)",
        ),
        (_x, _w, dict(padding=-1), ValueError, r"conv2d: padding must be non-negative, got -1"),
        (_x, _w, dict(padding=((0, -1), (0, 0))), ValueError, r"conv2d: padding must be non-negative"),
        (_x, _w, dict(padding="FULL"), ValueError, r"conv2d: padding must be .*'VALID' or 'SAME'; got 'FULL'"),
        (_x, _w, dict(stride=0), ValueError, r"conv2d: stride must be positive, got 0"),
        (_x, _w, dict(stride=(1, -2)), ValueError, r"conv2d: stride must be positive, got \(1, -2\)"),
        (_x, _w, dict(dilation=0), ValueError, r"conv2d: dilation must be positive, got 0"),
        (_x, _w, dict(stride=(1, 2, 3)), ValueError, r"conv2d: stride must be an int or a pair of ints"),
        (np.zeros((5, 5, 4)), _w, {}, ValueError, r"conv2d: x must have rank 4 \(NHWC\), got shape \(5, 5, 4\)"),
        (_x, np.zeros((3, 3, 4)), {}, ValueError, r"conv2d: w must have rank 4 \(HWIO\), got shape \(3, 3, 4\)"),
        (np.zeros((2, 5, 5, 4), np.int32), _w, {}, TypeError, r"conv2d: x must be floating point, got dtype int32"),
        (_x, np.zeros((3, 3, 4, 6), np.int64), {}, TypeError, r"conv2d: w must be floating point, got dtype int64"),
        (_x.astype(np.float32), _w, {}, TypeError, r"conv2d: x has dtype float32 but w has dtype float64"),
    ],
)
def test_conv2d_bad_input(x, w, kwargs, exc, match, method):
    with pytest.raises(exc, match=match):
        ops.conv2d(x, w, method=method, **kwargs)
    # The same checks guard the backward pass, with its own name.
    dy = np.zeros((2, 3, 3, 6))
    with pytest.raises(exc, match=match.replace("conv2d:", "conv2d_backward:")):
        ops.conv2d_backward(dy, x, w, method=method, **kwargs)


def test_conv2d_errors_are_raised_at_trace_time_under_jit():
    with pytest.raises(
        ValueError,
        match=r"conv2d: kernel height 3 \(dilation 2 -> 5\) exceeds the padded input height 4 \(4 \+ 0 \+ 0\)",
    ):
        jax.jit(functools.partial(ops.conv2d, dilation=2))(np.zeros((1, 4, 9, 1)), np.zeros((3, 3, 1, 1)))


@pytest.mark.parametrize("method", METHODS)
def test_conv2d_backward_bad_cotangent(method):
    x, w = np.zeros((2, 6, 5, 4)), np.zeros((3, 3, 4, 6))
    with pytest.raises(
        ValueError,
        match=r"conv2d_backward: dy has shape \(2, 4, 3, 5\) but the forward output has shape \(2, 4, 3, 6\)",
    ):
        ops.conv2d_backward(np.zeros((2, 4, 3, 5)), x, w, method=method)
    with pytest.raises(
        ValueError,
        match=r"conv2d_backward: dy has shape \(2, 4, 3, 6\) but the forward output has shape \(2, 2, 2, 6\)",
    ):
        ops.conv2d_backward(np.zeros((2, 4, 3, 6)), x, w, stride=2, method=method)
    with pytest.raises(TypeError, match=r"conv2d_backward: dy must be floating point, got dtype int32"):
        ops.conv2d_backward(np.zeros((2, 4, 3, 6), np.int32), x, w, method=method)


def test_conv2d_bad_bias_and_method():
    x, w = np.zeros((1, 4, 4, 2)), np.zeros((2, 2, 2, 3))
    with pytest.raises(ValueError, match=r"conv2d: b must have shape \(3,\) to match w \(2, 2, 2, 3\), got \(2,\)"):
        ops.conv2d(x, w, np.zeros(2))
    with pytest.raises(ValueError, match=r"conv2d: method must be one of \('conv', 'im2col'.*\), got 'fft'"):
        ops.conv2d(x, w, method="fft")
    with pytest.raises(ValueError, match=r"conv2d_backward: method must be one of"):
        ops.conv2d_backward(np.zeros((1, 3, 3, 3)), x, w, method="fft")
