"""Loop-by-loop NumPy reference for convolution, pooling and dense layers, forward and backward.

This module is the independent witness that the JAX ops are tested against. Every function is
written the way the classic tutorials write it: explicit Python loops over output positions and
window taps, in float64, with the formula each loop implements stated in its docstring. It is slow
on purpose and meant for small shapes only (a few thousand output elements at most).

It imports nothing from ``jax`` and nothing else from ``jaxcnn``: output sizes, padding and index
arithmetic are all worked out here, so a mistake in the library's shared helpers cannot hide in
both sides of a comparison.

Conventions (the library's public contract)
-------------------------------------------
* Activations are NHWC: ``x[n, row, column, channel]``.
* Convolution kernels are HWIO: ``w[a, b, c, o]`` with shape ``(kh, kw, C_in / groups, C_out)``.
* Dense weights are ``(in, out)``; dense inputs are ``(N, in)``.
* ``padding = ((top, bottom), (left, right))`` of non-negative ints (already resolved: no
  ``"SAME"``/``"VALID"`` strings here), ``stride = (sh, sw)``, ``dilation = (dh, dw)``, pooling
  ``window = (kh, kw)``. A single int is accepted for stride, dilation and window and means the
  same value in both dimensions.
* Output size per spatial dimension (see :func:`output_size`)::

      out = floor((H + top + bottom - ((k - 1) * d + 1)) / s) + 1

  Trailing rows and columns of the padded input that do not fill a whole window are dropped and
  so receive zero gradient.
* Convolution is cross-correlation (no kernel flip), as in ``lax`` and PyTorch::

      y[n, i, j, o] = b[o] + sum_{a, b, c} xpad[n, i*sh + a*dh, j*sw + b*dw, g*Cg + c] * w[a, b, c, o]

  with ``Cg = C_in / groups`` input channels and ``Og = C_out / groups`` output channels per
  group, and ``g = o // Og`` the group of output channel ``o``. ``xpad`` is ``x`` with zeros added
  around its spatial dimensions as given by ``padding``.

All inputs are converted to float64 and all results are float64 NumPy arrays.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = [
    "avg_pool2d",
    "avg_pool2d_backward",
    "conv2d",
    "conv2d_backward",
    "dense",
    "dense_backward",
    "im2col",
    "max_pool2d",
    "max_pool2d_backward",
    "output_size",
]

_IntOrPair = int | tuple[int, int]  # stride, dilation or window: one int for both dimensions, or (height, width)
_Padding = tuple[tuple[int, int], tuple[int, int]]  # ((top, bottom), (left, right)), already resolved


# ----------------------------------------------------------------------------------------------
# Argument handling and index arithmetic
# ----------------------------------------------------------------------------------------------


def output_size(size: int, window: int, stride: int, pad_lo: int, pad_hi: int, dilation: int = 1) -> int:
    """Number of window positions along one spatial dimension.

    The dilated window covers ``effective = (window - 1) * dilation + 1`` positions of the padded
    input of length ``size + pad_lo + pad_hi``, and consecutive windows start ``stride`` apart::

        out = floor((size + pad_lo + pad_hi - effective) / stride) + 1

    Positions after the last full window are not covered by any window. The result may be zero or
    negative when the window does not fit; callers check that.
    """
    effective = (window - 1) * dilation + 1
    return (size + pad_lo + pad_hi - effective) // stride + 1


def _positive_pair(value, name: str) -> tuple[int, int]:
    """``int`` or pair of ints -> ``(int, int)``, each at least 1."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"reference: {name} must be an int or a pair of ints, got {value!r}")
        first, second = value
    else:
        first = second = value
    result = (int(first), int(second))
    if result != (first, second) or min(result) < 1:
        raise ValueError(f"reference: {name} must be positive ints, got {value!r}")
    return result


def _padding_pairs(padding) -> tuple[tuple[int, int], tuple[int, int]]:
    """Checks ``((top, bottom), (left, right))`` of non-negative ints."""
    try:
        (top, bottom), (left, right) = padding
    except (TypeError, ValueError):
        raise ValueError(f"reference: padding must be ((top, bottom), (left, right)), got {padding!r}") from None
    result = ((int(top), int(bottom)), (int(left), int(right)))
    if result != ((top, bottom), (left, right)) or min(top, bottom, left, right) < 0:
        raise ValueError(f"reference: padding must be non-negative ints, got {padding!r}")
    return result


def _spatial_output_shape(height, width, window, stride, padding, dilation, what: str) -> tuple[int, int]:
    """``(out_height, out_width)`` from :func:`output_size`; raises if the window does not fit."""
    (top, bottom), (left, right) = padding
    out_height = output_size(height, window[0], stride[0], top, bottom, dilation[0])
    out_width = output_size(width, window[1], stride[1], left, right, dilation[1])
    if out_height < 1 or out_width < 1:
        raise ValueError(
            f"reference: {what} {window} with dilation {dilation} does not fit the padded input "
            f"({height} + {top} + {bottom}, {width} + {left} + {right}); output would be ({out_height}, {out_width})"
        )
    return out_height, out_width


def _as_float64(array, name: str, rank: int) -> np.ndarray:
    result = np.asarray(array, dtype=np.float64)
    if result.ndim != rank:
        raise ValueError(f"reference: {name} must have rank {rank}, got shape {result.shape}")
    return result


def _check_cotangent(dy, expected_shape) -> np.ndarray:
    dy = np.asarray(dy, dtype=np.float64)
    if dy.shape != tuple(expected_shape):
        raise ValueError(f"reference: dy has shape {dy.shape} but the forward output has shape {tuple(expected_shape)}")
    return dy


def _zero_pad(x: np.ndarray, padding) -> np.ndarray:
    """``xpad``: ``x`` (NHWC) with ``padding`` zeros added above/below and left/right of each image."""
    (top, bottom), (left, right) = padding
    batch, height, width, channels = x.shape
    padded = np.zeros((batch, top + height + bottom, left + width + right, channels), dtype=np.float64)
    padded[:, top : top + height, left : left + width, :] = x
    return padded


# ----------------------------------------------------------------------------------------------
# Convolution
# ----------------------------------------------------------------------------------------------


def _conv_geometry(
    x: np.ndarray, w: np.ndarray, stride, padding, dilation, groups
) -> tuple[tuple[int, int], _Padding, tuple[int, int], int, tuple[int, int, int, int]]:
    """Checks conv arguments and returns everything the loops need."""
    stride = _positive_pair(stride, "stride")
    dilation = _positive_pair(dilation, "dilation")
    padding = _padding_pairs(padding)
    if int(groups) != groups or groups < 1:
        raise ValueError(f"reference: groups must be a positive int, got {groups!r}")
    groups = int(groups)
    batch, height, width, in_channels = x.shape
    kernel_height, kernel_width, channels_per_group, out_channels = w.shape
    if in_channels != channels_per_group * groups:
        raise ValueError(
            f"reference: x has {in_channels} channels but w expects {channels_per_group} per group x {groups} groups"
        )
    if out_channels % groups != 0:
        raise ValueError(f"reference: C_out {out_channels} is not divisible by groups {groups}")
    out_height, out_width = _spatial_output_shape(
        height, width, (kernel_height, kernel_width), stride, padding, dilation, "kernel"
    )
    return stride, padding, dilation, groups, (batch, out_height, out_width, out_channels)


def conv2d(
    x: npt.ArrayLike,
    w: npt.ArrayLike,
    b: npt.ArrayLike | None = None,
    *,
    stride: _IntOrPair = (1, 1),
    padding: _Padding = ((0, 0), (0, 0)),
    dilation: _IntOrPair = (1, 1),
    groups: int = 1,
) -> np.ndarray:
    """2-D cross-correlation, NHWC input, HWIO kernel, optional bias of shape ``(C_out,)``.

    For every output position ``(n, i, j)``, group ``g`` and tap ``(a, b)`` the loop adds the
    contribution of one input pixel to all of the group's output channels::

        y[n, i, j, o] += sum_c xpad[n, i*sh + a*dh, j*sw + b*dw, g*Cg + c] * w[a, b, c, o]
                         for o in g*Og ... (g+1)*Og - 1

    (the sum over the ``Cg`` channels ``c`` is the vector-matrix product), so that in total::

        y[n, i, j, o] = b[o] + sum_{a, b, c} xpad[n, i*sh + a*dh, j*sw + b*dw, g*Cg + c] * w[a, b, c, o]

    with ``g = o // Og``, ``Cg = C_in / groups``, ``Og = C_out / groups``.
    """
    x = _as_float64(x, "x", 4)
    w = _as_float64(w, "w", 4)
    stride, padding, dilation, groups, out_shape = _conv_geometry(x, w, stride, padding, dilation, groups)
    batch, out_height, out_width, out_channels = out_shape
    kernel_height, kernel_width, channels_per_group, _ = w.shape
    outputs_per_group = out_channels // groups
    padded = _zero_pad(x, padding)

    y = np.zeros(out_shape, dtype=np.float64)
    for n in range(batch):
        for i in range(out_height):
            for j in range(out_width):
                for g in range(groups):
                    in_slice = slice(g * channels_per_group, (g + 1) * channels_per_group)
                    out_slice = slice(g * outputs_per_group, (g + 1) * outputs_per_group)
                    for a in range(kernel_height):
                        row = i * stride[0] + a * dilation[0]
                        for b_tap in range(kernel_width):
                            column = j * stride[1] + b_tap * dilation[1]
                            y[n, i, j, out_slice] += padded[n, row, column, in_slice] @ w[a, b_tap, :, out_slice]
    if b is not None:
        bias = _as_float64(b, "b", 1)
        if bias.shape != (out_channels,):
            raise ValueError(f"reference: b must have shape ({out_channels},), got {bias.shape}")
        y += bias
    return y


def conv2d_backward(
    dy: npt.ArrayLike,
    x: npt.ArrayLike,
    w: npt.ArrayLike,
    *,
    stride: _IntOrPair = (1, 1),
    padding: _Padding = ((0, 0), (0, 0)),
    dilation: _IntOrPair = (1, 1),
    groups: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients ``(dx, dw, db)`` of :func:`conv2d` given the output cotangent ``dy``.

    Each term of the forward sum, ``xpad[n, r, s, g*Cg + c] * w[a, b, c, o]`` with
    ``r = i*sh + a*dh`` and ``s = j*sw + b*dw``, is revisited once, for every output position
    ``(n, i, j)``, group ``g`` and tap ``(a, b)``, and its two partial derivatives are accumulated:

    * kernel gradient (the correlation of the input with ``dy``)::

          dw[a, b, c, o] = sum_{n, i, j} xpad[n, i*sh + a*dh, j*sw + b*dw, g*Cg + c] * dy[n, i, j, o]

    * input gradient, by scattering each output's cotangent back through the tap that read the
      input (for stride 1 and no dilation this is the full correlation of ``dy`` with the kernel
      rotated by 180 degrees)::

          dxpad[n, i*sh + a*dh, j*sw + b*dw, g*Cg + c] += sum_{o in group g} w[a, b, c, o] * dy[n, i, j, o]

      then ``dx`` is ``dxpad`` with the padding cropped off (gradient that lands on padding is
      discarded; input positions no window reads get zero);

    * bias gradient::

          db[o] = sum_{n, i, j} dy[n, i, j, o]
    """
    x = _as_float64(x, "x", 4)
    w = _as_float64(w, "w", 4)
    stride, padding, dilation, groups, out_shape = _conv_geometry(x, w, stride, padding, dilation, groups)
    dy = _check_cotangent(dy, out_shape)
    batch, out_height, out_width, out_channels = out_shape
    kernel_height, kernel_width, channels_per_group, _ = w.shape
    outputs_per_group = out_channels // groups
    padded = _zero_pad(x, padding)

    padded_gradient = np.zeros_like(padded)
    dw = np.zeros_like(w)
    for n in range(batch):
        for i in range(out_height):
            for j in range(out_width):
                for g in range(groups):
                    in_slice = slice(g * channels_per_group, (g + 1) * channels_per_group)
                    out_slice = slice(g * outputs_per_group, (g + 1) * outputs_per_group)
                    upstream = dy[n, i, j, out_slice]  # (Og,)
                    for a in range(kernel_height):
                        row = i * stride[0] + a * dilation[0]
                        for b_tap in range(kernel_width):
                            column = j * stride[1] + b_tap * dilation[1]
                            # dw[a, b, c, o] += xpad[n, row, column, g*Cg + c] * dy[n, i, j, o]
                            dw[a, b_tap, :, out_slice] += np.outer(padded[n, row, column, in_slice], upstream)
                            # dxpad[n, row, column, g*Cg + c] += sum_o w[a, b, c, o] * dy[n, i, j, o]
                            padded_gradient[n, row, column, in_slice] += w[a, b_tap, :, out_slice] @ upstream

    (top, _), (left, _) = padding
    height, width = x.shape[1:3]
    dx = padded_gradient[:, top : top + height, left : left + width, :].copy()

    db = np.zeros(out_channels, dtype=np.float64)
    for n in range(batch):
        for i in range(out_height):
            for j in range(out_width):
                db += dy[n, i, j, :]
    return dx, dw, db


def im2col(
    x: npt.ArrayLike,
    kh: int,
    kw: int,
    stride: _IntOrPair = (1, 1),
    padding: _Padding = ((0, 0), (0, 0)),
    dilation: _IntOrPair = (1, 1),
) -> np.ndarray:
    """Patch matrix of shape ``(N * oh * ow, kh * kw * C)``, one row per output position.

    Row ``(n * oh + i) * ow + j`` holds the window read by output position ``(n, i, j)``, and its
    column ``(a * kw + b) * C + c`` holds tap ``(a, b)`` of channel ``c``::

        patches[(n*oh + i)*ow + j, (a*kw + b)*C + c] = xpad[n, i*sh + a*dh, j*sw + b*dw, c]

    The column order matches an HWIO kernel flattened in C order, so for ``groups = 1``::

        conv2d(x, w) == (im2col(x, kh, kw, ...) @ w.reshape(kh * kw * C, C_out)).reshape(N, oh, ow, C_out)
    """
    x = _as_float64(x, "x", 4)
    stride = _positive_pair(stride, "stride")
    dilation = _positive_pair(dilation, "dilation")
    padding = _padding_pairs(padding)
    kernel_height, kernel_width = _positive_pair((kh, kw), "kernel size")
    batch, height, width, channels = x.shape
    out_height, out_width = _spatial_output_shape(
        height, width, (kernel_height, kernel_width), stride, padding, dilation, "kernel"
    )
    padded = _zero_pad(x, padding)

    patches = np.zeros((batch * out_height * out_width, kernel_height * kernel_width * channels), dtype=np.float64)
    for n in range(batch):
        for i in range(out_height):
            for j in range(out_width):
                patch_row = (n * out_height + i) * out_width + j
                for a in range(kernel_height):
                    row = i * stride[0] + a * dilation[0]
                    for b_tap in range(kernel_width):
                        column = j * stride[1] + b_tap * dilation[1]
                        first = (a * kernel_width + b_tap) * channels
                        patches[patch_row, first : first + channels] = padded[n, row, column, :]
    return patches


# ----------------------------------------------------------------------------------------------
# Pooling
# ----------------------------------------------------------------------------------------------


def _pool_geometry(x, window, stride, padding):
    window = _positive_pair(window, "window")
    stride = _positive_pair(stride, "stride")
    padding = _padding_pairs(padding)
    batch, height, width, channels = x.shape
    out_height, out_width = _spatial_output_shape(height, width, window, stride, padding, (1, 1), "window")
    return window, stride, padding, (batch, out_height, out_width, channels)


def _real_taps(i, j, window, stride, padding, height, width):
    """The taps of window ``(i, j)`` that fall on real (non-padding) input, in row-major order.

    Tap ``(a, b)`` reads padded position ``(i*sh + a, j*sw + b)``, which is input position
    ``(i*sh + a - top, j*sw + b - left)`` when that lies inside the ``height x width`` image.
    Yields those input positions ``(row, column)``, ``a`` outer, ``b`` inner.
    """
    (top, _), (left, _) = padding
    for a in range(window[0]):
        row = i * stride[0] + a - top
        if not 0 <= row < height:
            continue
        for b in range(window[1]):
            column = j * stride[1] + b - left
            if 0 <= column < width:
                yield row, column


def _max_pool_winners(x, window, stride, padding, out_shape):
    """``winner[n, i, j, c] = (row, column)`` of the first maximal real element of each window.

    Padding counts as ``-inf`` and never wins: only real taps are scanned, in row-major ``(a, b)``
    order, and a later tap replaces the current best only if it is strictly greater, so among equal
    maxima the first one wins.
    """
    batch, out_height, out_width, channels = out_shape
    height, width = x.shape[1:3]
    winners = {}
    for n in range(batch):
        for i in range(out_height):
            for j in range(out_width):
                taps = list(_real_taps(i, j, window, stride, padding, height, width))
                if not taps:
                    raise ValueError(
                        f"reference: max-pool window ({i}, {j}) lies entirely in the padding "
                        f"(window {window}, stride {stride}, padding {padding})"
                    )
                for c in range(channels):
                    best_row, best_column = taps[0]
                    for row, column in taps[1:]:
                        if x[n, row, column, c] > x[n, best_row, best_column, c]:
                            best_row, best_column = row, column
                    winners[n, i, j, c] = (best_row, best_column)
    return winners


def max_pool2d(
    x: npt.ArrayLike, *, window: _IntOrPair = (2, 2), stride: _IntOrPair = (2, 2), padding: _Padding = ((0, 0), (0, 0))
) -> np.ndarray:
    """Max pooling, NHWC, each channel separately; padding is ``-inf`` and never wins::

        y[n, i, j, c] = max_{a, b} xpad[n, i*sh + a, j*sw + b, c]

    Every window must contain at least one real element (``ValueError`` otherwise). Inputs are
    expected to be free of NaN (the scan compares with ``>``, which gives NaN no special treatment).
    """
    x = _as_float64(x, "x", 4)
    window, stride, padding, out_shape = _pool_geometry(x, window, stride, padding)
    winners = _max_pool_winners(x, window, stride, padding, out_shape)
    y = np.zeros(out_shape, dtype=np.float64)
    for (n, i, j, c), (row, column) in winners.items():
        y[n, i, j, c] = x[n, row, column, c]
    return y


def max_pool2d_backward(
    dy: npt.ArrayLike,
    x: npt.ArrayLike,
    *,
    window: _IntOrPair = (2, 2),
    stride: _IntOrPair = (2, 2),
    padding: _Padding = ((0, 0), (0, 0)),
) -> np.ndarray:
    """Gradient of :func:`max_pool2d`: each window routes its cotangent to its winning element.

    The local derivative of ``max(v_1, ..., v_k)`` with respect to the winning ``v_m`` is 1 (not
    the value ``v_m``) and 0 for every other element, so::

        dx[n, row, column, c] = sum over windows (i, j) whose winner is (row, column) of dy[n, i, j, c]

    The winner is the first maximal real element in row-major ``(a, b)`` window order; elements
    shared by overlapping windows accumulate the cotangents of every window they win.
    """
    x = _as_float64(x, "x", 4)
    window, stride, padding, out_shape = _pool_geometry(x, window, stride, padding)
    dy = _check_cotangent(dy, out_shape)
    winners = _max_pool_winners(x, window, stride, padding, out_shape)
    dx = np.zeros_like(x)
    for (n, i, j, c), (row, column) in winners.items():
        dx[n, row, column, c] += dy[n, i, j, c]
    return dx


def _avg_pool_divisor(taps, window, count_include_pad):
    """``kh * kw`` when padding counts, else the number of real elements in the window."""
    return window[0] * window[1] if count_include_pad else len(taps)


def avg_pool2d(
    x: npt.ArrayLike,
    *,
    window: _IntOrPair = (2, 2),
    stride: _IntOrPair = (2, 2),
    padding: _Padding = ((0, 0), (0, 0)),
    count_include_pad: bool = True,
) -> np.ndarray:
    """Average pooling, NHWC; padding contributes zeros to the sum::

        y[n, i, j, c] = (1 / D) * sum over real taps (row, column) of window (i, j) of x[n, row, column, c]

    with ``D = kh * kw`` if ``count_include_pad`` else ``D`` = the number of real (non-padding)
    elements in the window. With ``count_include_pad=False`` every window must contain at least
    one real element (``ValueError`` otherwise).
    """
    x = _as_float64(x, "x", 4)
    window, stride, padding, out_shape = _pool_geometry(x, window, stride, padding)
    batch, out_height, out_width, _channels = out_shape
    height, width = x.shape[1:3]
    y = np.zeros(out_shape, dtype=np.float64)
    for n in range(batch):
        for i in range(out_height):
            for j in range(out_width):
                taps = list(_real_taps(i, j, window, stride, padding, height, width))
                divisor = _avg_pool_divisor(taps, window, count_include_pad)
                if divisor == 0:
                    raise ValueError(f"reference: avg-pool window ({i}, {j}) lies entirely in the padding")
                for row, column in taps:
                    y[n, i, j, :] += x[n, row, column, :]
                y[n, i, j, :] /= divisor
    return y


def avg_pool2d_backward(
    dy: npt.ArrayLike,
    x: npt.ArrayLike,
    *,
    window: _IntOrPair = (2, 2),
    stride: _IntOrPair = (2, 2),
    padding: _Padding = ((0, 0), (0, 0)),
    count_include_pad: bool = True,
) -> np.ndarray:
    """Gradient of :func:`avg_pool2d`: each window spreads its cotangent evenly over its real taps::

        dx[n, row, column, c] += dy[n, i, j, c] / D    for every real tap (row, column) of window (i, j)

    with the same divisor ``D`` as the forward pass; the share of the padding taps is discarded.
    """
    x = _as_float64(x, "x", 4)
    window, stride, padding, out_shape = _pool_geometry(x, window, stride, padding)
    dy = _check_cotangent(dy, out_shape)
    batch, out_height, out_width, _channels = out_shape
    height, width = x.shape[1:3]
    dx = np.zeros_like(x)
    for n in range(batch):
        for i in range(out_height):
            for j in range(out_width):
                taps = list(_real_taps(i, j, window, stride, padding, height, width))
                divisor = _avg_pool_divisor(taps, window, count_include_pad)
                if divisor == 0:
                    raise ValueError(f"reference: avg-pool window ({i}, {j}) lies entirely in the padding")
                for row, column in taps:
                    dx[n, row, column, :] += dy[n, i, j, :] / divisor
    return dx


# ----------------------------------------------------------------------------------------------
# Dense
# ----------------------------------------------------------------------------------------------


def _dense_shapes(x: npt.ArrayLike, w: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    x = _as_float64(x, "x", 2)
    w = _as_float64(w, "w", 2)
    if x.shape[1] != w.shape[0]:
        raise ValueError(f"reference: x has {x.shape[1]} features but w expects {w.shape[0]}")
    return x, w


def dense(x: npt.ArrayLike, w: npt.ArrayLike, b: npt.ArrayLike | None = None) -> np.ndarray:
    """Fully connected layer, ``x`` of shape ``(N, in)``, ``w`` of shape ``(in, out)``::

        y[n, o] = b[o] + sum_k x[n, k] * w[k, o]

    (the tutorials' ``Z = W^T . X + b`` with one column of ``X`` per example).
    """
    x, w = _dense_shapes(x, w)
    batch, in_features = x.shape
    out_features = w.shape[1]
    y = np.zeros((batch, out_features), dtype=np.float64)
    for n in range(batch):
        for o in range(out_features):
            total = 0.0
            for k in range(in_features):
                total += x[n, k] * w[k, o]
            y[n, o] = total
    if b is not None:
        bias = _as_float64(b, "b", 1)
        if bias.shape != (out_features,):
            raise ValueError(f"reference: b must have shape ({out_features},), got {bias.shape}")
        y += bias
    return y


def dense_backward(dy: npt.ArrayLike, x: npt.ArrayLike, w: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients ``(dx, dw, db)`` of :func:`dense` given the output cotangent ``dy`` of shape ``(N, out)``::

    dx[n, k] = sum_o dy[n, o] * w[k, o]
    dw[k, o] = sum_n x[n, k] * dy[n, o]
    db[o]    = sum_n dy[n, o]
    """
    x, w = _dense_shapes(x, w)
    batch, in_features = x.shape
    out_features = w.shape[1]
    dy = _check_cotangent(dy, (batch, out_features))
    dx = np.zeros_like(x)
    dw = np.zeros_like(w)
    db = np.zeros(out_features, dtype=np.float64)
    for n in range(batch):
        for o in range(out_features):
            for k in range(in_features):
                dx[n, k] += dy[n, o] * w[k, o]
                dw[k, o] += x[n, k] * dy[n, o]
            db[o] += dy[n, o]
    return dx, dw, db
