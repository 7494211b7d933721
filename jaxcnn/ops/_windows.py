"""Window taps: the strided views that im2col and pooling read, and their adjoint that writes them back.

For a window op with geometry ``g`` (see :mod:`jaxcnn.shapes`), tap ``(a, b)`` is the array of the
padded input at rows ``a * dh + i * sh`` and columns ``b * dw + j * sw`` for every output position
``(i, j)``: an ``(N, oh, ow, C)`` view. :func:`place_tap` is its transpose: it puts an ``(N, oh, ow, C)``
array back at those positions of an ``(N, H, W, C)`` zero array, dropping what lands in the padding.
Writing it as ``lax.pad`` with interior padding (not a scatter) keeps the backward a dense, fusible op.
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
from jax import lax

from jaxcnn.shapes import Geometry


def pad_input(x, geom: Geometry, value=0.0):
    """Pads the spatial dims of an NHWC array with ``value``: ``(N, H, W, C) -> (N, Hp, Wp, C)``."""
    (top, bottom), (left, right) = geom.padding
    if top == bottom == left == right == 0:
        return x
    return lax.pad(x, jnp.array(value, x.dtype), ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))


def taps(geom: Geometry):
    """The window offsets ``(a, b)`` in row-major order (the order of the tie policy and of im2col)."""
    return itertools.product(range(geom.window[0]), range(geom.window[1]))


def read_tap(xpad, geom: Geometry, a: int, b: int):
    """Tap ``(a, b)`` of a padded input: ``(N, Hp, Wp, C) -> (N, oh, ow, C)``."""
    (sh, sw), (dh, dw), (oh, ow) = geom.stride, geom.dilation, geom.out_hw
    start = (0, a * dh, b * dw, 0)
    limit = (xpad.shape[0], a * dh + (oh - 1) * sh + 1, b * dw + (ow - 1) * sw + 1, xpad.shape[3])
    return lax.slice(xpad, start, limit, (1, sh, sw, 1))


def place_tap(values, geom: Geometry, a: int, b: int):
    """Adjoint of :func:`read_tap` composed with unpadding: ``(N, oh, ow, C) -> (N, H, W, C)``.

    Entry ``(i, j)`` goes to input row ``a * dh + i * sh - top`` and column ``b * dw + j * sw - left``;
    negative edge padding crops what falls into the padding.
    """
    (sh, sw), (dh, dw), (oh, ow) = geom.stride, geom.dilation, geom.out_hw
    (h, w), ((top, _), (left, _)) = geom.in_hw, geom.padding
    row0, col0 = a * dh - top, b * dw - left
    config = (
        (0, 0, 0),
        (row0, h - (row0 + (oh - 1) * sh + 1), sh - 1),
        (col0, w - (col0 + (ow - 1) * sw + 1), sw - 1),
        (0, 0, 0),
    )
    return lax.pad(values, jnp.zeros((), values.dtype), config)


def transpose_padding(geom: Geometry):
    """Padding that turns a strided window op into its transpose (the 'full' correlation).

    With ``dy`` dilated by the stride (``(o - 1) * s + 1`` rows), a stride-1 window op of span
    ``k_eff`` over ``dy`` padded by ``(k_eff - 1 - lo, n + lo - (o - 1) * s - 1)`` has exactly ``n``
    outputs: one per input row. Either side can be negative (a crop), e.g. when the forward padding
    exceeds ``k_eff - 1`` or when trailing input rows were never read (they get zero gradient).
    """
    pads = []
    for n, k_eff, s, (lo, _), o in zip(
        geom.in_hw, geom.effective_window, geom.stride, geom.padding, geom.out_hw, strict=True
    ):
        before = k_eff - 1 - lo
        pads.append((before, n + lo - (o - 1) * s - 1))
    return tuple(pads)
