"""max_pool2d / avg_pool2d and their backward passes against literal routing examples, the NumPy loop
reference (same tie policy), ``lax.reduce_window``, ``jax.vjp`` (on tie-free inputs only) and finite
differences."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from _opcases import (
    FWD_TOL,
    GRAD_TOL,
    J,
    as_pair,
    assert_close,
    normal,
    pool_configs,
    record_gradcheck,
    resolved,
    tie_free,
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
from jaxcnn.ops import pool


def _lax_pads(padding):
    if isinstance(padding, str):
        return padding
    if isinstance(padding, int):
        return [(0, 0), (padding, padding), (padding, padding), (0, 0)]
    if isinstance(padding[0], int):
        return [(0, 0), (padding[0], padding[0]), (padding[1], padding[1]), (0, 0)]
    return [(0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)]


def lax_pool(x, kind, *, window, stride, padding, count_include_pad=True):
    """``lax.reduce_window`` with lax's own padding handling (SAME included), computed in float64."""
    k = as_pair(window)
    s = k if stride is None else as_pair(stride)
    x = jnp.asarray(x, jnp.float64)
    dims, strides, pads = (1, *k, 1), (1, *s, 1), _lax_pads(padding)
    if kind == "max":
        return lax.reduce_window(x, -jnp.inf, lax.max, dims, strides, pads)
    total = lax.reduce_window(x, 0.0, lax.add, dims, strides, pads)
    if count_include_pad:
        return total / (k[0] * k[1])
    count = lax.reduce_window(jnp.ones_like(x), 0.0, lax.add, dims, strides, pads)
    return total / count


# ----------------------------------------------------------------------------------------------
# Literal examples: routing on a 4x4 input, ties, padding that never wins, overlapping windows
# ----------------------------------------------------------------------------------------------

X4 = np.array([[1.0, 3.0, 2.0, 4.0], [5.0, 6.0, 1.0, 8.0], [3.0, 2.0, 1.0, 0.0], [1.0, 2.0, 4.0, 3.0]])
DY2 = np.array([[0.1, 0.2], [0.3, 0.4]])


def _nhwc(a, dtype=np.float64):
    return np.asarray(a, dtype)[None, :, :, None]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_max_pool_routing_4x4(dtype):
    x, dy = _nhwc(X4, dtype), _nhwc(DY2, dtype)
    np.testing.assert_array_equal(np.asarray(J(ops.max_pool2d)(x))[0, :, :, 0], [[6.0, 8.0], [3.0, 4.0]])
    dx = np.asarray(J(ops.max_pool2d_backward)(dy, x))[0, :, :, 0]
    want = np.zeros((4, 4), dtype)
    want[1, 1], want[1, 3], want[2, 0], want[3, 2] = DY2.ravel().astype(dtype)
    np.testing.assert_array_equal(dx, want)
    np.testing.assert_array_equal(ref.max_pool2d_backward(_nhwc(DY2), _nhwc(X4))[0, :, :, 0].astype(dtype), want)


def test_avg_pool_4x4():
    x, dy = _nhwc(X4), _nhwc(DY2)
    np.testing.assert_array_equal(np.asarray(J(ops.avg_pool2d)(x))[0, :, :, 0], [[3.75, 3.75], [2.0, 2.0]])
    dx = np.asarray(J(ops.avg_pool2d_backward)(dy, x))[0, :, :, 0]
    np.testing.assert_allclose(dx, np.kron(DY2 / 4, np.ones((2, 2))), rtol=0, atol=1e-16)


# Every 2x2 block has a tie among its maxima: all equal; (0,1)=(1,0); (1,0)=(1,1); three equal.
X_TIES = np.array([[2.0, 2.0, 1.0, 5.0], [2.0, 2.0, 5.0, 0.0], [0.0, 1.0, 3.0, 9.0], [7.0, 7.0, 9.0, 9.0]])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_max_pool_ties_route_to_first_in_row_major_order(dtype):
    dy = np.array([[1.0, 2.0], [3.0, 4.0]])
    dx = np.asarray(J(ops.max_pool2d_backward)(_nhwc(dy, dtype), _nhwc(X_TIES, dtype)))[0, :, :, 0]
    want = np.zeros((4, 4))
    want[0, 0], want[0, 3], want[3, 0], want[2, 3] = 1.0, 2.0, 3.0, 4.0
    np.testing.assert_array_equal(dx, want)
    np.testing.assert_array_equal(ref.max_pool2d_backward(_nhwc(dy), _nhwc(X_TIES))[0, :, :, 0], want)
    np.testing.assert_array_equal(
        np.asarray(J(ops.max_pool2d)(_nhwc(X_TIES, dtype)))[0, :, :, 0], [[2.0, 5.0], [7.0, 9.0]]
    )


@pytest.mark.parametrize("window", [2, (2, 3), (3, 1)])
def test_max_pool_backward_formulations_agree_on_tiling_windows(window, monkeypatch):
    # Windows that tile the input take the tiled formulation; the per-tap one must route every dy to the
    # same winner, ties (values from a set of 3) and unread trailing rows and columns included.
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.integers(-1, 2, (2, 7, 8, 3)).astype(np.float64))
    y = ops.max_pool2d(x, window=window)
    dy = jnp.asarray(normal(rng, y.shape))
    geom = pool.pool_geometry("test", x, window=window, stride=None, padding=0)
    assert pool._tiles(geom)
    tiled = np.asarray(pool._max_pool2d_backward_tiles(dy, x, y, geom))
    np.testing.assert_array_equal(tiled, np.asarray(pool._max_pool2d_backward_taps(dy, x, y, geom)))
    want = ref.max_pool2d_backward(np.asarray(dy), np.asarray(x), window=window, stride=window)
    np.testing.assert_array_equal(tiled, want)
    calls = []
    monkeypatch.setattr(pool, "_max_pool2d_backward_tiles", lambda *a: calls.append(a) or tiled)
    ops.max_pool2d_backward(dy, x, window=window)
    assert len(calls) == 1  # the default geometry selects the tiled formulation


def test_max_pool_overlapping_windows_accumulate():
    # 3x3 input, 2x2 windows, stride 1: four overlapping windows.
    dy = np.array([[1.0, 2.0], [4.0, 8.0]])
    peak = np.array([[0.0, 1.0, 0.0], [2.0, 9.0, 3.0], [0.0, 4.0, 0.0]])  # the centre wins all four windows
    dx = np.asarray(J(ops.max_pool2d_backward, window=2, stride=1)(_nhwc(dy), _nhwc(peak)))[0, :, :, 0]
    np.testing.assert_array_equal(dx, [[0.0, 0.0, 0.0], [0.0, 15.0, 0.0], [0.0, 0.0, 0.0]])
    # All equal: each window routes to its own first (top-left) element.
    flat = np.ones((3, 3))
    dx = np.asarray(J(ops.max_pool2d_backward, window=2, stride=1)(_nhwc(dy), _nhwc(flat)))[0, :, :, 0]
    np.testing.assert_array_equal(dx, [[1.0, 2.0, 0.0], [4.0, 8.0, 0.0], [0.0, 0.0, 0.0]])
    # Overlapping avg: the centre is in all four windows.
    dx = np.asarray(J(ops.avg_pool2d_backward, window=2, stride=1)(_nhwc(dy), _nhwc(flat)))[0, :, :, 0]
    np.testing.assert_array_equal(dx, [[0.25, 0.75, 0.5], [1.25, 3.75, 2.5], [1.0, 3.0, 2.0]])


def test_padding_never_wins_and_count_include_pad():
    # All-negative 3x3 input, 2x2 windows, stride 2, padding 1: every window holds padding and real -1s.
    x = -np.ones((1, 3, 3, 1))
    dy = _nhwc([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(np.asarray(J(ops.max_pool2d, padding=1)(x))[0, :, :, 0], -np.ones((2, 2)))
    dx = np.asarray(J(ops.max_pool2d_backward, padding=1)(dy, x))[0, :, :, 0]
    np.testing.assert_array_equal(dx, [[1.0, 2.0, 0.0], [3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(ref.max_pool2d_backward(dy, x, padding=((1, 1), (1, 1)))[0, :, :, 0], dx)
    inc = np.asarray(J(ops.avg_pool2d, padding=1)(x))[0, :, :, 0]
    np.testing.assert_array_equal(inc, [[-0.25, -0.5], [-0.5, -1.0]])
    exc = np.asarray(J(ops.avg_pool2d, padding=1, count_include_pad=False)(x))[0, :, :, 0]
    np.testing.assert_array_equal(exc, -np.ones((2, 2)))
    dx = np.asarray(J(ops.avg_pool2d_backward, padding=1, count_include_pad=False)(dy, x))[0, :, :, 0]
    np.testing.assert_array_equal(dx, [[1.0, 1.0, 1.0], [1.5, 1.0, 1.0], [1.5, 1.0, 1.0]])
    dx = np.asarray(J(ops.avg_pool2d_backward, padding=1)(dy, x))[0, :, :, 0]
    np.testing.assert_array_equal(dx, [[0.25, 0.5, 0.5], [0.75, 1.0, 1.0], [0.75, 1.0, 1.0]])


def test_stride_defaults_to_window():
    x = tie_free(np.random.default_rng(0), (2, 7, 8, 3))
    for window in (3, (2, 3)):
        for op in (ops.max_pool2d, ops.avg_pool2d):
            np.testing.assert_array_equal(J(op, window=window)(x), J(op, window=window, stride=window)(x))
    assert J(ops.max_pool2d, window=(2, 3))(x).shape == (2, 3, 2, 3)


def test_trailing_rows_and_columns_get_exactly_zero_gradient():
    # H = 7, W = 8, window 3 (stride 3): row 6 and columns 6, 7 are in no window.
    rng = np.random.default_rng(1)
    x = tie_free(rng, (2, 7, 8, 2))
    dy = normal(rng, (2, 2, 2, 2))
    grads = jax.jit(
        lambda dy, x: (
            ops.max_pool2d_backward(dy, x, window=3),
            ops.avg_pool2d_backward(dy, x, window=3),
            ops.avg_pool2d_backward(dy, x, window=3, count_include_pad=False),
        )
    )
    for dx in grads(dy, x):
        dx = np.asarray(dx)
        assert np.all(dx[:, 6:, :, :] == 0.0) and np.all(dx[:, :, 6:, :] == 0.0)
        assert np.any(dx[:, :6, :6, :] != 0.0)


# ----------------------------------------------------------------------------------------------
# Property-based sweep: NumPy loops, lax.reduce_window, jax.vjp
# ----------------------------------------------------------------------------------------------


@functools.cache
def pool_suite(window, stride, padding):
    hyper = dict(window=window, stride=stride, padding=padding)

    def run(x, dy):
        out = dict(max=ops.max_pool2d(x, **hyper), max_bwd=ops.max_pool2d_backward(dy, x, **hyper))
        _, vjp = jax.vjp(functools.partial(ops.max_pool2d, **hyper), x)
        out["max_vjp"] = vjp(dy)[0]
        out["max_lax"] = lax_pool(x, "max", **hyper)
        for cip in (True, False):
            f = functools.partial(ops.avg_pool2d, count_include_pad=cip, **hyper)
            y, vjp = jax.vjp(f, x)
            out[f"avg{cip}"] = y
            out[f"avg{cip}_bwd"] = ops.avg_pool2d_backward(dy, x, count_include_pad=cip, **hyper)
            out[f"avg{cip}_vjp"] = vjp(dy)[0]
            out[f"avg{cip}_lax"] = lax_pool(x, "avg", count_include_pad=cip, **hyper)
        return out

    return jax.jit(run)


def _freeze(v):
    return tuple(_freeze(e) for e in v) if isinstance(v, (list, tuple)) else v


def check_pool_case(cfg, rng, dtype):
    dt = np.dtype(dtype).name
    window, stride, _, pads = resolved(cfg, window_key="window")
    rkw = dict(window=window, stride=stride, padding=pads)
    suite = pool_suite(*(_freeze(cfg[k]) for k in ("window", "stride", "padding")))
    x = tie_free(rng, cfg["x_shape"], dtype)
    y_ref = ref.max_pool2d(x, **rkw)
    dy = normal(rng, y_ref.shape, dtype)
    out = suite(x, dy)
    unread = unread_mask(cfg["x_shape"][1:3], window, stride, (1, 1), pads, y_ref.shape[1:3])

    assert_close(out["max"], y_ref, FWD_TOL[dt], op="max_pool2d", dtype=dt, kind="fwd vs numpy", what=str(cfg))
    assert_close(out["max"], out["max_lax"], FWD_TOL[dt], op="max_pool2d", dtype=dt, kind="fwd vs lax")
    dx_ref = ref.max_pool2d_backward(dy, x, **rkw)
    assert_close(out["max_bwd"], dx_ref, GRAD_TOL[dt], op="max_pool2d", dtype=dt, kind="grad vs numpy", what=str(cfg))
    assert_close(
        out["max_bwd"], out["max_vjp"], GRAD_TOL[dt], op="max_pool2d", dtype=dt, kind="grad vs autodiff", what=str(cfg)
    )
    assert np.all(np.asarray(out["max_bwd"])[:, unread, :] == 0.0)
    for cip in (True, False):
        op = f"avg_pool2d[cip={cip}]"
        y_ref = ref.avg_pool2d(x, count_include_pad=cip, **rkw)
        assert_close(out[f"avg{cip}"], y_ref, FWD_TOL[dt], op=op, dtype=dt, kind="fwd vs numpy", what=str(cfg))
        assert_close(out[f"avg{cip}"], out[f"avg{cip}_lax"], FWD_TOL[dt], op=op, dtype=dt, kind="fwd vs lax")
        dx = out[f"avg{cip}_bwd"]
        assert dx.dtype == dtype
        assert_close(
            dx,
            ref.avg_pool2d_backward(dy, x, count_include_pad=cip, **rkw),
            GRAD_TOL[dt],
            op=op,
            dtype=dt,
            kind="grad vs numpy",
            what=str(cfg),
        )
        assert_close(dx, out[f"avg{cip}_vjp"], GRAD_TOL[dt], op=op, dtype=dt, kind="grad vs autodiff", what=str(cfg))
        assert np.all(np.asarray(dx)[:, unread, :] == 0.0)

    # Same shapes, now with many ties (values from a set of 3): NumPy reference only, same tie policy.
    x_ties = rng.integers(-1, 2, cfg["x_shape"]).astype(dtype)
    out = suite(x_ties, dy)
    assert_close(out["max"], ref.max_pool2d(x_ties, **rkw), 0.0, op="max_pool2d", dtype=dt, kind="fwd vs numpy (ties)")
    assert_close(
        out["max_bwd"],
        ref.max_pool2d_backward(dy, x_ties, **rkw),
        GRAD_TOL[dt],
        op="max_pool2d",
        dtype=dt,
        kind="grad vs numpy (ties)",
        what=str(cfg),
    )


@settings(max_examples=20, deadline=None)
@given(cfg=pool_configs(), seed=st.integers(0, 2**32 - 1))
def test_pool_sweep_float64(cfg, seed):
    check_pool_case(cfg, np.random.default_rng(seed), np.float64)


@settings(max_examples=8, deadline=None)
@given(cfg=pool_configs(), seed=st.integers(0, 2**32 - 1))
def test_pool_sweep_float32(cfg, seed):
    check_pool_case(cfg, np.random.default_rng(seed), np.float32)


# One input shape for all, so that the compiled pieces of gradcheck that depend only on shapes are reused.
PINNED = {
    "overlapping 3/2, padding 1": dict(x_shape=(2, 7, 6, 3), window=3, stride=2, padding=1),
    "non-square SAME, stride > window": dict(x_shape=(2, 7, 6, 3), window=(2, 3), stride=(3, 1), padding="SAME"),
    "default stride, non-dividing": dict(x_shape=(2, 7, 6, 3), window=(2, 4), stride=None, padding=0),
    "pairs of pairs": dict(x_shape=(2, 7, 6, 3), window=(3, 4), stride=(1, 2), padding=((2, 0), (1, 3))),
}


@pytest.mark.parametrize("case", list(PINNED))
def test_pool_pinned_cases(case):
    check_pool_case(PINNED[case], np.random.default_rng(3), np.float64)


# ----------------------------------------------------------------------------------------------
# Finite differences
# ----------------------------------------------------------------------------------------------

GRADCHECK_CASES = [
    ("max", "overlapping 3/2, padding 1"),
    ("max", "default stride, non-dividing"),  # windows that tile the input: the tiled formulation
    ("max", "pairs of pairs"),
    ("avg", "pairs of pairs"),
    ("avg_exclude_pad", "overlapping 3/2, padding 1"),
]


def _pool_gradcheck(kind, case, dtype):
    cfg = PINNED[case]
    hyper = dict(window=cfg["window"], stride=cfg["stride"], padding=cfg["padding"])
    if kind == "max":
        f, bwd, op = ops.max_pool2d, ops.max_pool2d_backward, "max_pool2d"
    else:
        cip = kind == "avg"
        f = functools.partial(ops.avg_pool2d, count_include_pad=cip)
        bwd = functools.partial(ops.avg_pool2d_backward, count_include_pad=cip)
        op = f"avg_pool2d[cip={cip}]"
    x = tie_free(np.random.default_rng(4), cfg["x_shape"], dtype)  # smooth within the FD step
    result = gradcheck(
        functools.partial(f, **hyper), lambda dy, x: (bwd(dy, x, **hyper),), (x,), names=("x",), name=f"{op} {case}"
    )
    record_gradcheck(op, result)
    return result


@pytest.mark.parametrize("kind, case", GRADCHECK_CASES)
def test_pool_gradcheck_float64(kind, case):
    result = _pool_gradcheck(kind, case, np.float64)
    assert [r.name for r in result.rows] == ["x"]


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pool_gradcheck_float32(kind):
    assert _pool_gradcheck(kind, "overlapping 3/2, padding 1", np.float32).dtype == "float32"


# ----------------------------------------------------------------------------------------------
# bfloat16 forward, jit
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["overlapping 3/2, padding 1", "non-square SAME, stride > window"])
def test_pool_bfloat16_forward(case):
    cfg = PINNED[case]
    hyper = dict(window=cfg["window"], stride=cfg["stride"], padding=cfg["padding"])
    x = jnp.asarray(normal(np.random.default_rng(8), cfg["x_shape"]), jnp.bfloat16)
    x32 = x.astype(jnp.float32)
    y = ops.max_pool2d(x, **hyper)
    assert y.dtype == jnp.bfloat16
    # max selects an input value: exact.
    assert_close(y, lax_pool(x32, "max", **hyper), 0.0, op="max_pool2d", dtype="bfloat16", kind="fwd vs lax(bf16 in)")
    for cip in (True, False):
        y = ops.avg_pool2d(x, count_include_pad=cip, **hyper)
        assert y.dtype == jnp.bfloat16
        assert_close(
            y,
            lax_pool(x32, "avg", count_include_pad=cip, **hyper),
            FWD_TOL["bfloat16"],
            op=f"avg_pool2d[cip={cip}]",
            dtype="bfloat16",
            kind="fwd vs lax(bf16 in)",
        )


def test_pool_jit_matches_eager_and_does_not_recompile():
    hyper = dict(window=3, stride=2, padding=1)
    traces = []

    def fwd_bwd(x, dy):
        traces.append(1)
        return (
            ops.max_pool2d(x, **hyper),
            ops.max_pool2d_backward(dy, x, **hyper),
            ops.avg_pool2d(x, count_include_pad=False, **hyper),
            ops.avg_pool2d_backward(dy, x, count_include_pad=False, **hyper),
        )

    jitted = jax.jit(fwd_bwd)
    rng = np.random.default_rng(6)
    x = tie_free(rng, (2, 7, 6, 3))
    dy = normal(rng, (2, 4, 3, 3))
    for a, e in zip(jitted(x, dy), fwd_bwd(x, dy), strict=True):
        np.testing.assert_allclose(a, e, rtol=0, atol=1e-14)
    jitted(-x, dy)
    jitted(x, 2 * dy)
    assert len(traces) == 2  # one eager call + one trace
    jitted(x[:1], dy[:1])
    assert len(traces) == 3


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

_x = np.zeros((2, 4, 5, 3))


@pytest.mark.parametrize("name", ["max_pool2d", "avg_pool2d"])
@pytest.mark.parametrize(
    "x, kwargs, exc, match",
    [
        (
            _x,
            dict(window=5),
            ValueError,
            r"{fn}: window height 5 exceeds the padded input height 4 \(4 \+ 0 \+ 0\); "
            r"output height would be \(4 - 5\)/5 \+ 1 = 0",
        ),
        (
            _x,
            dict(window=(6, 2), padding=((1, 0), (0, 0)), stride=1),
            ValueError,
            r"{fn}: window height 6 exceeds the padded input height 5 \(4 \+ 1 \+ 0\); "
            r"output height would be \(5 - 6\)/1 \+ 1 = 0",
        ),
        (
            _x,
            dict(window=2, padding=2),
            ValueError,
            r"{fn}: padding \(2, 2\) along the height must be smaller than the window height 2",
        ),
        (
            _x,
            dict(window=3, padding=((0, 0), (0, 3))),
            ValueError,
            r"{fn}: padding \(0, 3\) along the width must be smaller than the window width 3",
        ),
        (_x, dict(window=2, padding=-1), ValueError, r"{fn}: padding must be non-negative, got -1"),
        (_x, dict(window=2, stride=0), ValueError, r"{fn}: stride must be positive, got 0"),
        (_x, dict(window=(0, 2)), ValueError, r"{fn}: window must be positive, got \(0, 2\)"),
        (_x, dict(window=2.0), TypeError, r"{fn}: window must be an int or a pair of ints, got 2.0"),
        (np.zeros((4, 5, 3)), {}, ValueError, r"{fn}: x must have rank 4 \(NHWC\), got shape \(4, 5, 3\)"),
        (np.zeros((2, 4, 5, 3), np.int32), {}, TypeError, r"{fn}: x must be floating point, got dtype int32"),
    ],
)
def test_pool_bad_input(name, x, kwargs, exc, match):
    fwd, bwd = getattr(ops, name), getattr(ops, name + "_backward")
    with pytest.raises(exc, match=match.format(fn=name)):
        fwd(x, **kwargs)
    with pytest.raises(exc, match=match.format(fn=name + "_backward")):
        bwd(np.zeros((2, 2, 2, 3)), x, **kwargs)


@pytest.mark.parametrize("name", ["max_pool2d", "avg_pool2d"])
def test_pool_backward_bad_cotangent(name):
    bwd = getattr(ops, name + "_backward")
    x = np.zeros((2, 5, 7, 3))
    with pytest.raises(
        ValueError,
        match=rf"{name}_backward: dy has shape \(2, 2, 2, 3\) but the forward output has shape \(2, 2, 3, 3\)",
    ):
        bwd(np.zeros((2, 2, 2, 3)), x)
    with pytest.raises(
        ValueError,
        match=rf"{name}_backward: dy has shape \(2, 2, 3, 3\) but the forward output has shape \(2, 4, 6, 3\)",
    ):
        bwd(np.zeros((2, 2, 3, 3)), x, window=2, stride=1)
    with pytest.raises(TypeError, match=rf"{name}_backward: dy must be floating point, got dtype int64"):
        bwd(np.zeros((2, 2, 3, 3), np.int64), x)
