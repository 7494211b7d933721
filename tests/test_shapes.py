"""jaxcnn.shapes: argument normalisation, every padding form, output sizes, and the arithmetic shown in
error messages. Output shapes are compared with lax's own shape rules (``jax.eval_shape``: no compile)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jax
from jax import lax

from jaxcnn import shapes
from jaxcnn.shapes import (
    effective_window,
    output_size,
    pair,
    positive_pair,
    resolve_padding,
    same_padding,
    window_geometry,
)

# ----------------------------------------------------------------------------------------------
# pair / positive_pair
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, want",
    [
        (3, (3, 3)),
        ((2, 5), (2, 5)),
        ([4, 1], (4, 1)),
        (np.int64(2), (2, 2)),
        ((np.int32(1), 7), (1, 7)),
        (0, (0, 0)),
        (-1, (-1, -1)),
    ],
)
def test_pair(value, want):
    got = pair(value, fn="f", name="stride")
    assert got == want and all(type(v) is int for v in got)


@pytest.mark.parametrize(
    "value, exc, match",
    [
        (True, TypeError, r"f: stride must be an int, got bool True"),
        ((1, False), TypeError, r"f: stride must be an int, got bool False"),
        (1.5, TypeError, r"f: stride must be an int or a pair of ints, got 1.5"),
        ((1, 2.0), TypeError, r"f: stride must be an int or a pair of ints, got 2.0"),
        ("2", TypeError, r"f: stride must be an int or a pair of ints, got '2'"),
        ((1, 2, 3), ValueError, r"f: stride must be an int or a pair of ints, got \(1, 2, 3\)"),
        ((), ValueError, r"f: stride must be an int or a pair of ints, got \(\)"),
    ],
)
def test_pair_errors(value, exc, match):
    with pytest.raises(exc, match=match):
        pair(value, fn="f", name="stride")


def test_positive_pair():
    assert positive_pair(1, fn="f", name="dilation") == (1, 1)
    assert positive_pair((2, 3), fn="f", name="dilation") == (2, 3)
    with pytest.raises(ValueError, match=r"f: dilation must be positive, got 0"):
        positive_pair(0, fn="f", name="dilation")
    with pytest.raises(ValueError, match=r"f: window must be positive, got \(2, -1\)"):
        positive_pair((2, -1), fn="f", name="window")


# ----------------------------------------------------------------------------------------------
# output_size: the tutorials' (H - F + 2P)/S + 1, floored when S does not divide
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "h, f, p, s, want",
    [
        (32, 5, 2, 1, 32),  # "same" 5x5
        (227, 11, 0, 4, 55),  # AlexNet conv1: (227 - 11)/4 + 1
        (7, 3, 0, 2, 3),
        (5, 3, 1, 2, 3),
        (7, 3, 1, 1, 7),
        (7, 3, 0, 3, 2),  # (7 - 3)/3 = 1.33: floor -> 2 outputs, the last row is left out
        (8, 2, 0, 3, 3),  # (8 - 2)/3 = 2 -> 3
        (6, 2, 0, 4, 2),  # stride larger than the kernel
        (4, 4, 0, 1, 1),
    ],
)
def test_output_size_tutorial_examples(h, f, p, s, want):
    assert output_size(h, f, s, (p, p)) == want


@settings(max_examples=200, deadline=None)
@given(
    h=st.integers(1, 40),
    f=st.integers(1, 7),
    s=st.integers(1, 6),
    lo=st.integers(0, 4),
    hi=st.integers(0, 4),
    d=st.integers(1, 4),
)
def test_output_size_formula(h, f, s, lo, hi, d):
    eff = (f - 1) * d + 1
    assert effective_window(f, d) == eff
    got = output_size(h, f, s, (lo, hi), d)
    if h + lo + hi < eff:
        assert got <= 0
        return
    # Count the window starts directly: 0, s, 2s, ... while the window fits in the padded input.
    assert got == len(range(0, h + lo + hi - eff + 1, s))
    assert got == math.floor((h + lo + hi - eff) / s) + 1
    if lo == hi and d == 1 and (h - f + 2 * lo) % s == 0:
        assert got == (h - f + 2 * lo) // s + 1  # the tutorial formula, exact when S divides


# ----------------------------------------------------------------------------------------------
# Padding forms; SAME against lax
# ----------------------------------------------------------------------------------------------

GEOM = dict(in_hw=(7, 6), window_hw=(3, 2), stride=(2, 1), dilation=(1, 1))


@pytest.mark.parametrize(
    "padding, want",
    [
        (0, ((0, 0), (0, 0))),
        (2, ((2, 2), (2, 2))),
        ((1, 3), ((1, 1), (3, 3))),
        ([1, 3], ((1, 1), (3, 3))),
        (((0, 1), (2, 3)), ((0, 1), (2, 3))),
        ([[0, 1], [2, 3]], ((0, 1), (2, 3))),
        (((4, 4), 2), None),  # mixed: rejected below
        ("VALID", ((0, 0), (0, 0))),
        ("valid", ((0, 0), (0, 0))),
        # SAME, H = 7, k = 3, s = 2: out 4, total (4 - 1) * 2 + 3 - 7 = 2 -> (1, 1);
        #       W = 6, k = 2, s = 1: out 6, total 1 -> (0, 1), the odd extra at the right.
        ("SAME", ((1, 1), (0, 1))),
        ("same", ((1, 1), (0, 1))),
    ],
)
def test_resolve_padding_forms(padding, want):
    if want is None:
        with pytest.raises(ValueError, match=r"f: padding must be an int, a pair, a pair of pairs, 'VALID' or 'SAME'"):
            resolve_padding(padding, fn="f", **GEOM)
        return
    got = resolve_padding(padding, fn="f", **GEOM)
    assert got == want
    assert all(type(v) is int for side in got for v in side)


@pytest.mark.parametrize(
    "padding, exc, match",
    [
        (-1, ValueError, r"f: padding must be non-negative, got -1"),
        ((0, -2), ValueError, r"f: padding must be non-negative, got \(0, -2\)"),
        (((0, 0), (1, -1)), ValueError, r"f: padding must be non-negative, got \(\(0, 0\), \(1, -1\)\)"),
        ("FULL", ValueError, r"f: padding must be an int, a pair, a pair of pairs, 'VALID' or 'SAME'; got 'FULL'"),
        ((1, 2, 3), ValueError, r"f: padding must be an int or a pair of ints, got \(1, 2, 3\)"),
        (((1, 2, 3), (0, 0)), ValueError, r"f: padding must be an int or a pair of ints, got \(1, 2, 3\)"),
        ((1, (2, 3)), ValueError, r"f: padding must be an int, a pair, a pair of pairs, 'VALID' or 'SAME'"),
        (1.0, TypeError, r"f: padding must be an int or a pair of ints, got 1.0"),
        (True, TypeError, r"f: padding must be an int, got bool True"),
    ],
)
def test_resolve_padding_errors(padding, exc, match):
    with pytest.raises(exc, match=match):
        resolve_padding(padding, fn="f", **GEOM)


def test_same_padding_puts_the_odd_extra_at_the_end():
    assert same_padding(5, 2) == (0, 1)
    assert same_padding(6, 4) == (1, 2)
    assert same_padding(7, 3, 2) == (1, 1)
    assert same_padding(6, 3, 2) == (0, 1)
    assert same_padding(5, 1, 3) == (0, 0)
    assert same_padding(4, 2, 3) == (0, 1)
    assert same_padding(5, 3, 1, 2) == (2, 2)  # dilated span 5


def _lax_out_hw(in_hw, window, stride, dilation, padding):
    x = jax.ShapeDtypeStruct((1, *in_hw, 1), np.float32)
    w = jax.ShapeDtypeStruct((*window, 1, 1), np.float32)
    y = jax.eval_shape(
        lambda x, w: lax.conv_general_dilated(
            x, w, stride, padding, rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC")
        ),
        x,
        w,
    )
    return y.shape[1:3]


dims = st.tuples(st.integers(1, 12), st.integers(1, 12))
small = st.tuples(st.integers(1, 5), st.integers(1, 5))


@settings(max_examples=60, deadline=None)
@given(in_hw=dims, window=small, stride=small, dilation=st.tuples(st.integers(1, 3), st.integers(1, 3)))
def test_same_padding_matches_lax(in_hw, window, stride, dilation):
    eff = tuple(effective_window(k, d) for k, d in zip(window, dilation, strict=True))
    got = resolve_padding("SAME", fn="f", in_hw=in_hw, window_hw=window, stride=stride, dilation=dilation)
    assert list(got) == [tuple(p) for p in lax.padtype_to_pads(in_hw, eff, stride, "SAME")]
    geom = window_geometry(fn="f", in_hw=in_hw, window=window, stride=stride, padding="SAME", dilation=dilation)
    assert geom.out_hw == tuple(-(-n // s) for n, s in zip(in_hw, stride, strict=True))  # ceil(H / S)
    assert geom.out_hw == _lax_out_hw(in_hw, window, stride, dilation, "SAME")


@settings(max_examples=60, deadline=None)
@given(
    in_hw=dims,
    window=small,
    stride=small,
    dilation=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    pads=st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)),
)
def test_window_geometry_matches_lax_output_shape(in_hw, window, stride, dilation, pads):
    padding = ((pads[0], pads[1]), (pads[2], pads[3]))
    eff = [effective_window(k, d) for k, d in zip(window, dilation, strict=True)]
    fits = all(n + lo + hi >= e for n, (lo, hi), e in zip(in_hw, padding, eff, strict=True))
    if not fits:
        with pytest.raises(ValueError, match=r"f: kernel (height|width) \d+.* exceeds the padded input"):
            window_geometry(fn="f", in_hw=in_hw, window=window, stride=stride, padding=padding, dilation=dilation)
        return
    geom = window_geometry(fn="f", in_hw=in_hw, window=window, stride=stride, padding=padding, dilation=dilation)
    assert geom.out_hw == _lax_out_hw(in_hw, window, stride, dilation, list(padding))
    assert geom.padding == padding and geom.window == window and geom.stride == stride and geom.dilation == dilation
    assert geom.padded_hw == (in_hw[0] + pads[0] + pads[1], in_hw[1] + pads[2] + pads[3])
    assert geom.effective_window == tuple(eff)


# ----------------------------------------------------------------------------------------------
# window_geometry errors show the arithmetic
# ----------------------------------------------------------------------------------------------


def test_window_geometry_error_shows_the_arithmetic():
    with pytest.raises(
        ValueError, match=r"kernel height 5 \(dilation 2 -> 9\) exceeds the padded input height 7 \(5 \+ 1 \+ 1\)"
    ):
        window_geometry(fn="conv2d", in_hw=(5, 9), window=5, stride=1, padding=1, dilation=2)
    with pytest.raises(
        ValueError,
        match=r"^conv2d: kernel height 5 \(dilation 2 -> 9\) exceeds the padded input height 7 "
        r"\(5 \+ 1 \+ 1\); output height would be \(7 - 9\)/1 \+ 1 = -1$",
    ):
        window_geometry(fn="conv2d", in_hw=(5, 9), window=5, stride=1, padding=1, dilation=2)
    with pytest.raises(
        ValueError,
        match=r"^max_pool2d: window width 4 exceeds the padded input width 3 \(2 \+ 0 \+ 1\); "
        r"output width would be \(3 - 4\)/2 \+ 1 = 0$",
    ):
        window_geometry(
            fn="max_pool2d", in_hw=(6, 2), window=(2, 4), stride=2, padding=((0, 0), (0, 1)), window_name="window"
        )


def test_window_geometry_validates_every_argument():
    base = dict(fn="g", in_hw=(5, 5), window=3, stride=1, padding=0, dilation=1)
    for key, value, match in [
        ("stride", 0, r"g: stride must be positive, got 0"),
        ("dilation", (1, 0), r"g: dilation must be positive, got \(1, 0\)"),
        ("window", -3, r"g: kernel must be positive, got -3"),
        ("padding", -1, r"g: padding must be non-negative, got -1"),
    ]:
        with pytest.raises(ValueError, match=match):
            window_geometry(**{**base, key: value})


def test_module_exports():
    assert shapes.Geometry._fields == ("in_hw", "window", "stride", "padding", "dilation", "out_hw")
