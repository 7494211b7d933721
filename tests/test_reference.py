"""Tests of the loop-by-loop NumPy reference in ``jaxcnn.reference``.

Three kinds of evidence, none of which uses JAX:

* worked examples from the classic tutorial derivations, with the expected numbers written out by
  hand from the tutorials' formulas;
* identities that tie each feature (stride, dilation, padding, groups, pooling) back to the plain
  case, and the tutorials' statements ``dF = correlation(X, dO)`` and
  ``dX = full_convolution(dO, rot180(F))``;
* central finite differences in float64 and adjoint (dot-product) identities for every backward.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcnn import reference as ref

NO_PADDING = ((0, 0), (0, 0))


def nhwc(image) -> np.ndarray:
    """A single-channel 2-D image as a (1, H, W, 1) batch."""
    return np.asarray(image, dtype=np.float64)[None, :, :, None]


def hwio(kernel) -> np.ndarray:
    """A single 2-D filter as a (kh, kw, 1, 1) kernel."""
    return np.asarray(kernel, dtype=np.float64)[:, :, None, None]


def central_difference(loss, array: np.ndarray, step: float = 1e-5) -> np.ndarray:
    """d loss / d array, element by element: (loss(v + h) - loss(v - h)) / 2h, perturbing ``array`` in place."""
    gradient = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        original = array[index]
        array[index] = original + step
        above = loss()
        array[index] = original - step
        below = loss()
        array[index] = original
        gradient[index] = (above - below) / (2 * step)
    return gradient


def assert_close(actual, expected, rtol=1e-6, atol=1e-8):
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------
# output_size
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, window, stride, pad_lo, pad_hi, dilation, expected",
    [
        (3, 2, 1, 0, 0, 1, 2),  # (n - f + 1)
        (28, 5, 1, 0, 0, 1, 24),  # the MNIST example: 24 x 24 = 576 patches
        (5, 3, 1, 1, 1, 1, 5),  # S = 1, P = (F - 1) / 2 preserves the size
        (7, 3, 2, 1, 1, 1, 4),  # (H - F + 2P) / S + 1
        (6, 2, 2, 0, 0, 1, 3),
        (5, 2, 2, 0, 0, 1, 2),  # the last row does not fill a window and is dropped
        (7, 3, 1, 0, 0, 2, 3),  # dilated window spans 5
        (4, 3, 1, 2, 0, 1, 4),  # asymmetric padding
        (2, 3, 1, 0, 0, 1, 0),  # does not fit
    ],
)
def test_output_size(size, window, stride, pad_lo, pad_hi, dilation, expected):
    assert ref.output_size(size, window, stride, pad_lo, pad_hi, dilation) == expected


# ----------------------------------------------------------------------------------------------
# Convolution: worked examples
# ----------------------------------------------------------------------------------------------


def test_conv_worked_example_3x3_image_2x2_filter():
    # (1*1 + 7*1 + 11*0 + 1*1) = 9, (7*1 + 2*1 + 1*0 + 23*1) = 32,
    # (11*1 + 1*1 + 2*0 + 2*1) = 14, (1*1 + 23*1 + 2*0 + 2*1) = 26
    image = nhwc([[1, 7, 2], [11, 1, 23], [2, 2, 2]])
    kernel = hwio([[1, 1], [0, 1]])
    y = ref.conv2d(image, kernel)
    assert y.shape == (1, 2, 2, 1)
    assert y.dtype == np.float64
    np.testing.assert_array_equal(y[0, :, :, 0], [[9, 32], [14, 26]])


# The 3x3 X / 2x2 F example with symbols replaced by distinct integers:
#   X11..X33 = 2 3 5 / 7 11 13 / 17 19 23,  F11 F12 / F21 F22 = 2 -1 / 3 5,  dO = 1 -2 / 4 3.
EXAMPLE_X = [[2, 3, 5], [7, 11, 13], [17, 19, 23]]
EXAMPLE_F = [[2, -1], [3, 5]]
EXAMPLE_DO = [[1, -2], [4, 3]]


def test_conv_worked_example_forward_symbols_as_numbers():
    expected = [
        # O11 = F11 X11 + F12 X12 + F21 X21 + F22 X22 = 4 - 3 + 21 + 55
        # O12 = F11 X12 + F12 X13 + F21 X22 + F22 X23 = 6 - 5 + 33 + 65
        [77, 99],
        # O21 = F11 X21 + F12 X22 + F21 X31 + F22 X32 = 14 - 11 + 51 + 95
        # O22 = F11 X22 + F12 X23 + F21 X32 + F22 X33 = 22 - 13 + 57 + 115
        [149, 181],
    ]
    y = ref.conv2d(nhwc(EXAMPLE_X), hwio(EXAMPLE_F))
    np.testing.assert_array_equal(y[0, :, :, 0], expected)


def test_conv_worked_example_backward_symbols_as_numbers():
    dx, dw, db = ref.conv2d_backward(nhwc(EXAMPLE_DO), nhwc(EXAMPLE_X), hwio(EXAMPLE_F))
    expected_dw = [
        # dF11 = dO11 X11 + dO12 X12 + dO21 X21 + dO22 X22 = 2 - 6 + 28 + 33
        # dF12 = dO11 X12 + dO12 X13 + dO21 X22 + dO22 X23 = 3 - 10 + 44 + 39
        [57, 76],
        # dF21 = dO11 X21 + dO12 X22 + dO21 X31 + dO22 X32 = 7 - 22 + 68 + 57
        # dF22 = dO11 X22 + dO12 X23 + dO21 X32 + dO22 X33 = 11 - 26 + 76 + 69
        [110, 130],
    ]
    expected_dx = [
        # dX11 = F11 dO11,  dX12 = F12 dO11 + F11 dO12,  dX13 = F12 dO12
        [2, -1 - 4, 2],
        # dX21 = F21 dO11 + F11 dO21,  dX22 = F22 dO11 + F21 dO12 + F12 dO21 + F11 dO22,
        # dX23 = F22 dO12 + F12 dO22
        [3 + 8, 5 - 6 - 4 + 6, -10 - 3],
        # dX31 = F21 dO21,  dX32 = F22 dO21 + F21 dO22,  dX33 = F22 dO22
        [12, 20 + 9, 15],
    ]
    np.testing.assert_array_equal(dw[:, :, 0, 0], expected_dw)
    np.testing.assert_array_equal(dx[0, :, :, 0], expected_dx)
    np.testing.assert_array_equal(db, [1 - 2 + 4 + 3])


def test_conv_filter_gradient_through_max_pool_routing_worked_example():
    # A is the 6x6 input of the max-pool walk-through, A[r, c] = 5 + r % 3 + c % 3; a 3x3 filter
    # gives the 4x4 map C, and 2x2 max pooling with winners C01, C03, C20, C32 and upstream
    # dP = [[1, 2], [3, 4]] gives dE/dC = dP at the winners (local gradient 1) and 0 elsewhere.
    # Then dE/dF_ab = sum_kl dE/dC_kl A_(k+a)(l+b) = 1 A_a(1+b) + 2 A_a(3+b) + 3 A_(2+a)b + 4 A_(3+a)(2+b).
    a_matrix = [[5 + r % 3 + c % 3 for c in range(6)] for r in range(6)]
    d_c = [[0, 1, 0, 2], [0, 0, 0, 0], [3, 0, 0, 0], [0, 0, 4, 0]]
    _, dw, _ = ref.conv2d_backward(nhwc(d_c), nhwc(a_matrix), np.zeros((3, 3, 1, 1)))
    expected = [
        [6 + 10 + 21 + 28, 7 + 12 + 24 + 20, 5 + 14 + 27 + 24],
        [7 + 12 + 15 + 32, 8 + 14 + 18 + 24, 6 + 16 + 21 + 28],
        [8 + 14 + 18 + 36, 9 + 16 + 21 + 28, 7 + 18 + 24 + 32],
    ]
    np.testing.assert_array_equal(dw[:, :, 0, 0], expected)


def test_conv_bias_and_channels_worked_example():
    # Two input channels, one 1x1 tap: y = 2 * x_c0 - x_c1 + 10.
    x = np.array([[[[1.0, 4.0], [2.0, 3.0]]]])  # (1, 1, 2, 2)
    w = np.array([[[[2.0], [-1.0]]]])  # (1, 1, 2, 1)
    y = ref.conv2d(x, w, np.array([10.0]))
    np.testing.assert_array_equal(y[0, 0, :, 0], [2 - 4 + 10, 4 - 3 + 10])


# ----------------------------------------------------------------------------------------------
# Convolution: identities that tie each feature back to the plain case
# ----------------------------------------------------------------------------------------------


def test_filter_gradient_is_correlation_of_input_with_output_gradient():
    # dF = Correlation(X, dO): the output gradient plays the role of the filter.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 6, 5, 1))
    w = rng.normal(size=(3, 2, 1, 1))
    dy = rng.normal(size=(1, 4, 4, 1))
    _, dw, _ = ref.conv2d_backward(dy, x, w)
    as_correlation = ref.conv2d(x, dy[0, :, :, :, None])  # kernel (4, 4, 1, 1)
    assert_close(dw[:, :, 0, 0], as_correlation[0, :, :, 0])


def test_input_gradient_is_full_convolution_with_rotated_filter():
    # dX = Full_Convolution(dO, rot180 F): pad dO by k - 1 on every side and correlate with the
    # kernel rotated by 180 degrees, input and output channels swapped.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 5, 6, 3))
    w = rng.normal(size=(3, 2, 3, 4))
    dy = rng.normal(size=(2, 3, 5, 4))
    dx, _, _ = ref.conv2d_backward(dy, x, w)
    rotated = w[::-1, ::-1, :, :].transpose(0, 1, 3, 2)
    full = ref.conv2d(dy, rotated, padding=((2, 2), (1, 1)))
    assert_close(dx, full)


def test_stride_subsamples_the_stride_one_output():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 7, 6, 2))
    w = rng.normal(size=(3, 2, 2, 3))
    dense_output = ref.conv2d(x, w)
    assert_close(ref.conv2d(x, w, stride=(2, 3)), dense_output[:, ::2, ::3, :])


def test_dilation_equals_kernel_with_inserted_zeros():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1, 7, 8, 2))
    w = rng.normal(size=(2, 3, 2, 2))
    spread = np.zeros((3, 7, 2, 2))  # (2 - 1) * 2 + 1 = 3 rows, (3 - 1) * 3 + 1 = 7 columns
    spread[::2, ::3] = w
    assert_close(ref.conv2d(x, w, dilation=(2, 3)), ref.conv2d(x, spread))


def test_padding_equals_convolving_the_zero_padded_input():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 3, 4, 2))
    w = rng.normal(size=(2, 3, 2, 2))
    padding = ((1, 2), (0, 3))
    padded = np.pad(x, ((0, 0), (1, 2), (0, 3), (0, 0)))
    assert_close(ref.conv2d(x, w, padding=padding), ref.conv2d(padded, w))


def test_groups_equal_separate_convolutions_on_channel_slices():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 4, 4, 6))
    w = rng.normal(size=(2, 2, 2, 9))  # 3 groups, 2 input and 3 output channels each
    b = rng.normal(size=9)
    grouped = ref.conv2d(x, w, b, groups=3)
    separate = np.concatenate(
        [ref.conv2d(x[..., 2 * g : 2 * g + 2], w[..., 3 * g : 3 * g + 3], b[3 * g : 3 * g + 3]) for g in range(3)],
        axis=-1,
    )
    assert_close(grouped, separate)


def test_one_by_one_convolution_is_dense_at_every_pixel():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 3, 2, 4))
    w = rng.normal(size=(4, 5))
    b = rng.normal(size=5)
    as_conv = ref.conv2d(x, w[None, None], b)
    as_dense = ref.dense(x.reshape(-1, 4), w, b).reshape(2, 3, 2, 5)
    assert_close(as_conv, as_dense)


@pytest.mark.parametrize(
    "stride, padding, dilation",
    [((1, 1), NO_PADDING, (1, 1)), ((2, 1), ((1, 0), (2, 1)), (1, 2))],
)
def test_im2col_times_flattened_kernel_is_conv(stride, padding, dilation):
    rng = np.random.default_rng(8)
    x = rng.normal(size=(2, 5, 6, 3))
    w = rng.normal(size=(2, 3, 3, 4))
    y = ref.conv2d(x, w, stride=stride, padding=padding, dilation=dilation)
    patches = ref.im2col(x, 2, 3, stride, padding, dilation)
    assert patches.shape == (y.shape[0] * y.shape[1] * y.shape[2], 2 * 3 * 3)
    assert_close((patches @ w.reshape(-1, 4)).reshape(y.shape), y)


def test_im2col_row_and_column_order():
    x = np.arange(2 * 3 * 3 * 2, dtype=np.float64).reshape(2, 3, 3, 2)
    patches = ref.im2col(x, 2, 2)
    # row (n, i, j) = (1, 0, 1) is 1 * 4 + 0 * 2 + 1 = 5; column (a, b, c) = (1, 0, 1) is (1 * 2 + 0) * 2 + 1 = 5
    assert patches[5, 5] == x[1, 0 + 1, 1 + 0, 1]
    # the whole row: taps (0, 0), (0, 1), (1, 0), (1, 1) of the window at (1, 1), channels 0 and 1 each
    np.testing.assert_array_equal(patches[5], x[1, 0:2, 1:3, :].reshape(-1))


def test_conv_rows_outside_every_window_get_zero_gradient():
    # H = 5, k = 2, stride 2: windows cover rows 0-3; row 4 is dropped. Likewise column 4.
    rng = np.random.default_rng(9)
    x = rng.normal(size=(1, 5, 5, 2))
    w = rng.normal(size=(2, 2, 2, 2))
    dx, _, _ = ref.conv2d_backward(np.ones((1, 2, 2, 2)), x, w, stride=(2, 2))
    np.testing.assert_array_equal(dx[:, 4, :, :], 0.0)
    np.testing.assert_array_equal(dx[:, :, 4, :], 0.0)
    assert np.all(dx[:, :4, :4, :] != 0.0)


# ----------------------------------------------------------------------------------------------
# Convolution: finite differences and adjoint identities
# ----------------------------------------------------------------------------------------------

CONV_CASES = {
    # name: (x shape, w shape, stride, padding, dilation, groups)
    "plain": ((2, 4, 4, 2), (2, 2, 2, 3), (1, 1), NO_PADDING, (1, 1), 1),
    "stride2_drops_trailing": ((1, 5, 6, 2), (2, 3, 2, 2), (2, 2), NO_PADDING, (1, 1), 1),
    "dilation2": ((1, 5, 5, 2), (2, 2, 2, 2), (1, 1), NO_PADDING, (2, 2), 1),
    "asymmetric_padding": ((1, 3, 4, 2), (3, 2, 2, 2), (1, 1), ((1, 2), (0, 1)), (1, 1), 1),
    "groups2": ((2, 3, 3, 4), (2, 2, 2, 4), (1, 1), NO_PADDING, (1, 1), 2),
    "depthwise": ((1, 4, 4, 3), (2, 2, 1, 3), (1, 1), ((1, 0), (0, 1)), (1, 1), 3),
    "everything": ((1, 6, 5, 4), (2, 2, 2, 6), (2, 1), ((2, 0), (1, 1)), (1, 2), 2),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_backward_matches_central_differences(case):
    x_shape, w_shape, stride, padding, dilation, groups = CONV_CASES[case]
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    rng = np.random.default_rng(sum(map(ord, case)))
    x = rng.normal(size=x_shape)
    w = rng.normal(size=w_shape)
    b = rng.normal(size=w_shape[-1])
    dy = rng.normal(size=ref.conv2d(x, w, b, **options).shape)

    def loss():
        return float(np.sum(ref.conv2d(x, w, b, **options) * dy))

    dx, dw, db = ref.conv2d_backward(dy, x, w, **options)
    assert dx.shape == x.shape and dw.shape == w.shape and db.shape == b.shape
    assert_close(dx, central_difference(loss, x))
    assert_close(dw, central_difference(loss, w))
    assert_close(db, central_difference(loss, b))


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_backward_adjoint_identities(case):
    # conv is linear in x and in w:  <conv(v, w), dy> == <v, dx(dy)>  and  <conv(x, u), dy> == <u, dw(dy)>.
    x_shape, w_shape, stride, padding, dilation, groups = CONV_CASES[case]
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    rng = np.random.default_rng(1000 + sum(map(ord, case)))
    v = rng.normal(size=x_shape)
    u = rng.normal(size=w_shape)
    dy = rng.normal(size=ref.conv2d(v, u, **options).shape)
    dx, dw, _ = ref.conv2d_backward(dy, v, u, **options)
    forward_pairing = np.vdot(ref.conv2d(v, u, **options), dy)
    assert np.isclose(forward_pairing, np.vdot(v, dx), rtol=1e-12, atol=1e-12)
    assert np.isclose(forward_pairing, np.vdot(u, dw), rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 2),
    size=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.tuples(st.integers(0, 2), st.integers(0, 2)), st.tuples(st.integers(0, 2), st.integers(0, 2))),
    groups=st.integers(1, 2),
    per_group=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    seed=st.integers(0, 2**16),
)
def test_conv_adjoint_identity_on_random_geometry(
    batch, size, kernel, stride, dilation, padding, groups, per_group, seed
):
    out_rows = [
        ref.output_size(n, k, s, lo, hi, d)
        for n, k, s, (lo, hi), d in zip(size, kernel, stride, padding, dilation, strict=True)
    ]
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if min(out_rows) < 1:
        with pytest.raises(ValueError, match="does not fit"):
            ref.conv2d(np.zeros((batch, *size, groups)), np.zeros((*kernel, 1, groups)), **options)
        return
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(batch, *size, per_group[0] * groups))
    u = rng.normal(size=(*kernel, per_group[0], per_group[1] * groups))
    y = ref.conv2d(v, u, **options)
    assert y.shape == (batch, *out_rows, per_group[1] * groups)
    dy = rng.normal(size=y.shape)
    dx, dw, db = ref.conv2d_backward(dy, v, u, **options)
    assert np.isclose(np.vdot(y, dy), np.vdot(v, dx), rtol=1e-10, atol=1e-10)
    assert np.isclose(np.vdot(y, dy), np.vdot(u, dw), rtol=1e-10, atol=1e-10)
    assert_close(db, dy.sum(axis=(0, 1, 2)))


# ----------------------------------------------------------------------------------------------
# Max pooling
# ----------------------------------------------------------------------------------------------


def test_max_pool_routing_worked_example():
    # Winners at C01, C03, C20, C32 as in the walk-through. The local gradient of max at the
    # winner is 1, so each window passes dP unchanged to its winner (not C_kl * dP).
    c_map = [
        [1, 9, 2, 8],
        [5, 3, 4, 0],
        [7, 6, 1, 2],
        [4, 2, 10, 3],
    ]
    y = ref.max_pool2d(nhwc(c_map))
    np.testing.assert_array_equal(y[0, :, :, 0], [[9, 8], [7, 10]])
    dx = ref.max_pool2d_backward(nhwc([[1, 2], [3, 4]]), nhwc(c_map))
    np.testing.assert_array_equal(
        dx[0, :, :, 0],
        [
            [0, 1, 0, 2],
            [0, 0, 0, 0],
            [3, 0, 0, 0],
            [0, 0, 4, 0],
        ],
    )


def test_max_pool_tie_goes_to_first_maximum_in_row_major_window_order():
    x = np.zeros((1, 2, 4, 2))
    x[0, :, :, 0] = [[5, 5, 1, 7], [5, 5, 3, 7]]  # window 0: all equal -> (0, 0); window 1: (0, 3) before (1, 3)
    x[0, :, :, 1] = [[1, 2, 7, 2], [2, 2, 7, 7]]  # window 0: (0, 1) before (1, 0), (1, 1); window 1: (0, 2)
    dy = np.array([[[[10.0, 30.0], [20.0, 40.0]]]])  # (1, 1, 2, 2)
    dx = ref.max_pool2d_backward(dy, x)
    np.testing.assert_array_equal(dx[0, :, :, 0], [[10, 0, 0, 20], [0, 0, 0, 0]])
    np.testing.assert_array_equal(dx[0, :, :, 1], [[0, 30, 40, 0], [0, 0, 0, 0]])


def test_max_pool_overlapping_windows_accumulate():
    # window 3, stride 1 on 4x4: the first three windows all pick 20 at (1, 1); the last picks 30.
    x = nhwc(
        [
            [0, 1, 2, 3],
            [4, 20, 5, 6],
            [7, 8, 9, 10],
            [11, 12, 13, 30],
        ]
    )
    y = ref.max_pool2d(x, window=(3, 3), stride=(1, 1))
    np.testing.assert_array_equal(y[0, :, :, 0], [[20, 20], [20, 30]])
    dx = ref.max_pool2d_backward(nhwc([[1, 2], [3, 4]]), x, window=(3, 3), stride=(1, 1))
    expected = np.zeros((4, 4))
    expected[1, 1] = 1 + 2 + 3
    expected[3, 3] = 4
    np.testing.assert_array_equal(dx[0, :, :, 0], expected)


def test_max_pool_padding_never_wins_over_negative_values():
    x = nhwc([[-5, -1], [-3, -4]])
    padding = ((1, 1), (1, 1))
    y = ref.max_pool2d(x, window=(2, 2), stride=(2, 2), padding=padding)
    np.testing.assert_array_equal(y[0, :, :, 0], [[-5, -1], [-3, -4]])  # each window has one real element
    dx = ref.max_pool2d_backward(nhwc([[1, 2], [3, 4]]), x, window=(2, 2), stride=(2, 2), padding=padding)
    np.testing.assert_array_equal(dx[0, :, :, 0], [[1, 2], [3, 4]])


def test_max_pool_padding_equals_explicit_minus_infinity_padding():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(2, 4, 5, 3)) - 3.0
    padding = ((1, 0), (2, 1))
    explicit = np.pad(x, ((0, 0), (1, 0), (2, 1), (0, 0)), constant_values=-np.inf)
    options = dict(window=(3, 3), stride=(2, 1))
    assert_close(ref.max_pool2d(x, padding=padding, **options), ref.max_pool2d(explicit, **options))


def test_max_pool_rejects_a_window_made_only_of_padding():
    with pytest.raises(ValueError, match="padding"):
        ref.max_pool2d(np.ones((1, 2, 2, 1)), window=(2, 2), stride=(1, 1), padding=((2, 0), (0, 0)))


def test_max_pool_stride_subsamples_the_stride_one_output():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(1, 6, 7, 2))
    every = ref.max_pool2d(x, window=(2, 3), stride=(1, 1))
    assert_close(ref.max_pool2d(x, window=(2, 3), stride=(2, 2)), every[:, ::2, ::2, :])


# ----------------------------------------------------------------------------------------------
# Average pooling
# ----------------------------------------------------------------------------------------------

# 3x3 input, window 2, stride 2, padding ((1, 0), (1, 0)): the four windows hold the real elements
# {1}, {2, 3}, {4, 7}, {5, 6, 8, 9}; the rest of each window is padding.
AVG_X = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
AVG_OPTIONS = dict(window=(2, 2), stride=(2, 2), padding=((1, 0), (1, 0)))


def test_avg_pool_count_include_pad_true_worked_example():
    y = ref.avg_pool2d(nhwc(AVG_X), count_include_pad=True, **AVG_OPTIONS)
    assert_close(y[0, :, :, 0], [[1 / 4, (2 + 3) / 4], [(4 + 7) / 4, (5 + 6 + 8 + 9) / 4]])
    dx = ref.avg_pool2d_backward(nhwc([[4, 8], [12, 16]]), nhwc(AVG_X), count_include_pad=True, **AVG_OPTIONS)
    # every real element receives dy / 4
    assert_close(dx[0, :, :, 0], [[1, 2, 2], [3, 4, 4], [3, 4, 4]])


def test_avg_pool_count_include_pad_false_worked_example():
    y = ref.avg_pool2d(nhwc(AVG_X), count_include_pad=False, **AVG_OPTIONS)
    assert_close(y[0, :, :, 0], [[1, (2 + 3) / 2], [(4 + 7) / 2, (5 + 6 + 8 + 9) / 4]])
    dx = ref.avg_pool2d_backward(nhwc([[4, 8], [12, 16]]), nhwc(AVG_X), count_include_pad=False, **AVG_OPTIONS)
    # dy divided by the number of real elements: 4 / 1, 8 / 2, 12 / 2, 16 / 4
    assert_close(dx[0, :, :, 0], [[4, 4, 4], [6, 4, 4], [6, 4, 4]])


def test_avg_pool_overlapping_windows_accumulate():
    # window 3, stride 1 on 4x4: input (r, c) lies in (number of windows covering r) x (... c) windows.
    dx = ref.avg_pool2d_backward(np.full((1, 2, 2, 1), 9.0), np.zeros((1, 4, 4, 1)), window=(3, 3), stride=(1, 1))
    np.testing.assert_array_equal(dx[0, :, :, 0], [[1, 2, 2, 1], [2, 4, 4, 2], [2, 4, 4, 2], [1, 2, 2, 1]])


def test_avg_pool_including_padding_is_depthwise_conv_with_constant_kernel():
    rng = np.random.default_rng(12)
    x = rng.normal(size=(2, 5, 4, 3))
    options = dict(stride=(2, 1), padding=((1, 1), (0, 2)))
    kernel = np.full((3, 2, 1, 3), 1.0 / 6.0)
    assert_close(
        ref.avg_pool2d(x, window=(3, 2), count_include_pad=True, **options),
        ref.conv2d(x, kernel, groups=3, **options),
    )


# ----------------------------------------------------------------------------------------------
# Pooling: finite differences and adjoint identities
# ----------------------------------------------------------------------------------------------

POOL_CASES = {
    # name: (x shape, window, stride, padding)
    "2x2_stride2": ((2, 4, 4, 2), (2, 2), (2, 2), NO_PADDING),
    "3x3_stride1_overlapping": ((1, 4, 5, 2), (3, 3), (1, 1), NO_PADDING),
    "asymmetric_padding": ((1, 4, 3, 2), (3, 2), (2, 1), ((1, 1), (0, 1))),
    "stride2_drops_trailing": ((1, 5, 5, 1), (2, 2), (2, 2), NO_PADDING),
    "padded_overlapping": ((1, 3, 3, 2), (3, 3), (2, 2), ((1, 1), (1, 1))),
}


def distinct_values(rng, shape, spacing=0.25):
    """Values at least ``spacing`` apart, half of them negative, so small steps never change a max."""
    count = int(np.prod(shape))
    return (rng.permutation(count) - count / 2).reshape(shape) * spacing


@pytest.mark.parametrize("case", sorted(POOL_CASES))
def test_max_pool_backward_matches_central_differences(case):
    shape, window, stride, padding = POOL_CASES[case]
    options = dict(window=window, stride=stride, padding=padding)
    rng = np.random.default_rng(sum(map(ord, case)))
    x = distinct_values(rng, shape)
    dy = rng.normal(size=ref.max_pool2d(x, **options).shape)

    def loss():
        return float(np.sum(ref.max_pool2d(x, **options) * dy))

    assert_close(ref.max_pool2d_backward(dy, x, **options), central_difference(loss, x))


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("case", sorted(POOL_CASES))
def test_avg_pool_backward_matches_central_differences_and_is_adjoint(case, count_include_pad):
    shape, window, stride, padding = POOL_CASES[case]
    options = dict(window=window, stride=stride, padding=padding, count_include_pad=count_include_pad)
    rng = np.random.default_rng(sum(map(ord, case)) + count_include_pad)
    x = rng.normal(size=shape)
    dy = rng.normal(size=ref.avg_pool2d(x, **options).shape)

    def loss():
        return float(np.sum(ref.avg_pool2d(x, **options) * dy))

    dx = ref.avg_pool2d_backward(dy, x, **options)
    assert_close(dx, central_difference(loss, x))
    assert np.isclose(np.vdot(ref.avg_pool2d(x, **options), dy), np.vdot(x, dx), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Dense
# ----------------------------------------------------------------------------------------------


def test_dense_worked_example():
    # Z = W^T . X + b with 4 features and 2 neurons, one example per row of x.
    x = np.array([[1.0, 2.0, 3.0, 4.0]])
    w = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, -1.0], [-1.0, 3.0]])  # (in, out)
    b = np.array([0.5, -0.5])
    y = ref.dense(x, w, b)
    np.testing.assert_array_equal(y, [[1 + 0 + 6 - 4 + 0.5, 0 + 2 - 3 + 12 - 0.5]])
    dx, dw, db = ref.dense_backward(np.array([[1.0, 2.0]]), x, w)
    np.testing.assert_array_equal(dx, [[1, 2, 2 - 2, -1 + 6]])
    np.testing.assert_array_equal(dw, [[1, 2], [2, 4], [3, 6], [4, 8]])
    np.testing.assert_array_equal(db, [1, 2])


def test_dense_backward_matches_central_differences():
    rng = np.random.default_rng(13)
    x = rng.normal(size=(3, 4))
    w = rng.normal(size=(4, 2))
    b = rng.normal(size=2)
    dy = rng.normal(size=(3, 2))

    def loss():
        return float(np.sum(ref.dense(x, w, b) * dy))

    dx, dw, db = ref.dense_backward(dy, x, w)
    assert_close(dx, central_difference(loss, x))
    assert_close(dw, central_difference(loss, w))
    assert_close(db, central_difference(loss, b))


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------


def test_invalid_arguments_are_rejected():
    x = np.zeros((1, 4, 4, 4))
    with pytest.raises(ValueError, match="channels"):
        ref.conv2d(x, np.zeros((2, 2, 3, 2)))
    with pytest.raises(ValueError, match="divisible"):
        ref.conv2d(x, np.zeros((2, 2, 2, 3)), groups=2)
    with pytest.raises(ValueError, match="does not fit"):
        ref.conv2d(x, np.zeros((5, 1, 4, 1)))
    with pytest.raises(ValueError, match="does not fit"):
        ref.conv2d(x, np.zeros((3, 3, 4, 1)), dilation=(2, 2))
    with pytest.raises(ValueError, match="non-negative"):
        ref.conv2d(x, np.zeros((2, 2, 4, 1)), padding=((-1, 0), (0, 0)))
    with pytest.raises(ValueError, match="padding"):
        ref.conv2d(x, np.zeros((2, 2, 4, 1)), padding=(1, 1))
    with pytest.raises(ValueError, match="stride"):
        ref.conv2d(x, np.zeros((2, 2, 4, 1)), stride=(0, 1))
    with pytest.raises(ValueError, match="dy"):
        ref.conv2d_backward(np.zeros((1, 2, 2, 1)), x, np.zeros((2, 2, 4, 1)))
    with pytest.raises(ValueError, match="dy"):
        ref.max_pool2d_backward(np.zeros((1, 3, 3, 4)), x)
    with pytest.raises(ValueError, match="features"):
        ref.dense(np.zeros((2, 3)), np.zeros((4, 1)))
    with pytest.raises(ValueError, match="rank"):
        ref.avg_pool2d(np.zeros((4, 4)))


def test_reference_depends_on_numpy_only():
    # The witness must not share code with what it checks: no jax, no other jaxcnn module.
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(ref))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0] if node.level == 0 else "relative")
    assert imported <= {"__future__", "numpy"}, imported
