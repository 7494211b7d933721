"""Max and average pooling over NHWC inputs, with hand-written backward passes.

Pooling windows are ``window = (kh, kw)`` taps, ``stride`` apart (default: the window, so windows tile
the input), over an input padded by ``padding`` (same forms as :func:`jaxcnn.ops.conv2d`). Output size
follows :mod:`jaxcnn.shapes`; every pad must be smaller than the window so that each window holds at least
one real element.

Gradient routing (seed 001, with its slip mended: the local gradient of max is 1, not the winning value):

* max: ``dx`` receives ``dy`` at the position of each window's maximum and 0 elsewhere. **Tie policy**:
  when several elements share the maximum, the first in row-major window order (rows, then columns) gets
  the whole gradient, as in PyTorch; padding (``-inf``) never wins. Overlapping windows add up.
* average: each element of a window receives ``dy / count``, where ``count`` is ``kh * kw``
  (``count_include_pad=True``) or the number of real elements in the window. Overlapping windows add up.
"""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax

from jaxcnn.ops._checks import check_array, check_cotangent
from jaxcnn.ops._windows import pad_input, place_tap, read_tap, taps, transpose_padding
from jaxcnn.shapes import Geometry, IntOrPair, PaddingLike, window_geometry


def pool_geometry(
    fn: str,
    x: jax.Array | jax.ShapeDtypeStruct,
    *,
    window: IntOrPair,
    stride: IntOrPair | None,
    padding: PaddingLike,
) -> Geometry:
    """Validates pooling arguments against ``x`` (NHWC); ``stride=None`` means ``stride = window``."""
    check_array(fn, "x", x, rank=4, layout="NHWC")
    geom = window_geometry(
        fn=fn,
        in_hw=x.shape[1:3],
        window=window,
        stride=window if stride is None else stride,
        padding=padding,
        window_name="window",
    )
    for dim, k, (lo, hi) in zip(("height", "width"), geom.window, geom.padding, strict=True):
        if max(lo, hi) >= k:
            raise ValueError(
                f"{fn}: padding ({lo}, {hi}) along the {dim} must be smaller than the window {dim} {k}, "
                "or some windows would hold only padding"
            )
    return geom


def _window_op(x, geom: Geometry, init, op):
    (top, bottom), (left, right) = geom.padding
    # A Python-scalar init lets lax recognise the max/add monoid and use its differentiable primitives.
    return lax.reduce_window(
        x,
        init,
        op,
        (1, *geom.window, 1),
        (1, *geom.stride, 1),
        ((0, 0), (top, bottom), (left, right), (0, 0)),
    )


def max_pool2d(
    x: jax.Array, *, window: IntOrPair = 2, stride: IntOrPair | None = None, padding: PaddingLike = 0
) -> jax.Array:
    """Maximum over each window: ``(N, H, W, C) -> (N, oh, ow, C)``. Padding is ``-inf`` and never wins.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxcnn import ops
      >>> x = jnp.arange(16.0, dtype=jnp.float32).reshape(1, 4, 4, 1)
      >>> ops.max_pool2d(x, window=2)[0, :, :, 0].tolist()
      [[5.0, 7.0], [13.0, 15.0]]
      >>> ops.max_pool2d(x, window=3, stride=1, padding=1).shape  # overlapping windows
      (1, 4, 4, 1)
    """
    geom = pool_geometry("max_pool2d", x, window=window, stride=stride, padding=padding)
    return _window_op(x, geom, -jnp.inf, lax.max)


def max_pool2d_backward(
    dy: jax.Array,
    x: jax.Array,
    *,
    window: IntOrPair = 2,
    stride: IntOrPair | None = None,
    padding: PaddingLike = 0,
    y: jax.Array | None = None,
) -> jax.Array:
    """Routes ``dy`` to the first maximal element of each window: ``(N, oh, ow, C) -> (N, H, W, C)``.

    ``dx[n, r, s, c] = sum over windows (i, j) whose winner is (r, s) of dy[n, i, j, c]``. The winner of a
    window is the first tap ``(a, b)``, in row-major order, whose value equals the window's maximum; a
    running ``taken`` mask makes later equal taps lose. Pass the forward output as ``y`` to reuse it. Two
    formulations, with the same winners: windows that tile the input (stride = window, no padding: the
    default) write each element once from a tiled view of ``x``; any other geometry sums one strided write per
    tap.

    Examples:
      Two elements share the maximum 3; the first in row-major order takes the whole gradient.

      >>> import jax.numpy as jnp
      >>> from jaxcnn import ops
      >>> x = jnp.array([[1.0, 3.0], [3.0, 2.0]], jnp.float32).reshape(1, 2, 2, 1)
      >>> dy = jnp.ones((1, 1, 1, 1), jnp.float32)
      >>> ops.max_pool2d_backward(dy, x, window=2)[0, :, :, 0].tolist()
      [[0.0, 1.0], [0.0, 0.0]]
    """
    fn = "max_pool2d_backward"
    geom = pool_geometry(fn, x, window=window, stride=stride, padding=padding)
    check_cotangent(fn, dy, (x.shape[0], *geom.out_hw, x.shape[3]))
    if y is None:
        y = _window_op(x, geom, -jnp.inf, lax.max)
    if _tiles(geom):
        return _max_pool2d_backward_tiles(dy, x, y, geom)
    return _max_pool2d_backward_taps(dy, x, y, geom)


def _tiles(geom: Geometry) -> bool:
    """Whether the windows tile the input: stride = window and no padding (the default pooling)."""
    return geom.stride == geom.window and geom.padding == ((0, 0), (0, 0))


def _routed(dy, y, window_values):
    """``dy`` routed to each tap in row-major order: for the values of every tap ``(a, b)`` of the windows
    (``(N, oh, ow, C)`` each, in that order), ``dy`` where that tap is the first to equal the window's maximum
    ``y`` and 0 elsewhere (a running ``taken`` mask makes later equal taps lose)."""
    taken = jnp.zeros(y.shape, bool)
    zero = jnp.zeros((), dy.dtype)
    routed = []
    for values in window_values:
        wins = (values == y) & ~taken
        taken = taken | wins
        routed.append(jnp.where(wins, dy, zero))
    return routed


def _max_pool2d_backward_taps(dy, x, y, geom: Geometry):
    """Any geometry: each tap's routed ``dy`` placed back by :func:`place_tap` (a padded, strided write) and
    summed, so that overlapping windows add up."""
    xpad = pad_input(x, geom, -jnp.inf)
    offsets = list(taps(geom))
    routed = _routed(dy, y, (read_tap(xpad, geom, a, b) for a, b in offsets))
    return sum(place_tap(r, geom, a, b) for r, (a, b) in zip(routed, offsets, strict=True))


def _max_pool2d_backward_tiles(dy, x, y, geom: Geometry):
    """Windows that tile the input: viewing ``x`` as ``(N, oh, kh, ow, kw, C)`` puts every window's taps on
    their own axes, so each input element is written once, by a stack of the taps' routed ``dy``, instead of
    being accumulated through one strided write per tap (fewer passes over memory). Same winners, same
    tie policy; trailing rows and columns that no window reads get 0."""
    (kh, kw), (oh, ow) = geom.window, geom.out_hw
    n, h, w, c = x.shape
    windows = x[:, : oh * kh, : ow * kw].reshape(n, oh, kh, ow, kw, c)
    routed = _routed(dy, y, (windows[:, :, a, :, b, :] for a in range(kh) for b in range(kw)))
    rows = [jnp.stack(routed[a * kw : (a + 1) * kw], axis=3) for a in range(kh)]  # (N, oh, ow, kw, C) each
    dx = jnp.stack(rows, axis=2).reshape(n, oh * kh, ow * kw, c)  # (N, oh, kh, ow, kw, C) -> rows, columns
    return jnp.pad(dx, ((0, 0), (0, h - oh * kh), (0, w - ow * kw), (0, 0)))


def _avg_divisor(geom: Geometry, count_include_pad: bool, dtype):
    if count_include_pad:
        return jnp.array(geom.window[0] * geom.window[1], dtype)
    # Real elements per window: a static (oh, ow) table, computed once at trace time.
    counts = []
    for n, k, s, (lo, _), o in zip(geom.in_hw, geom.window, geom.stride, geom.padding, geom.out_hw, strict=True):
        start = np.arange(o) * s - lo
        counts.append(np.minimum(start + k, n) - np.maximum(start, 0))
    return jnp.asarray(np.outer(*counts)[None, :, :, None], dtype)


def avg_pool2d(
    x: jax.Array,
    *,
    window: IntOrPair = 2,
    stride: IntOrPair | None = None,
    padding: PaddingLike = 0,
    count_include_pad: bool = True,
) -> jax.Array:
    """Mean over each window: ``(N, H, W, C) -> (N, oh, ow, C)``.

    Padding counts as zeros in the mean when ``count_include_pad`` is true; otherwise the mean is over
    the real elements of the window only.
    """
    geom = pool_geometry("avg_pool2d", x, window=window, stride=stride, padding=padding)
    return _window_op(x, geom, 0.0, lax.add) / _avg_divisor(geom, count_include_pad, x.dtype)


def avg_pool2d_backward(
    dy: jax.Array,
    x: jax.Array,
    *,
    window: IntOrPair = 2,
    stride: IntOrPair | None = None,
    padding: PaddingLike = 0,
    count_include_pad: bool = True,
) -> jax.Array:
    """``dx[r] = sum over windows (i, j) containing r of dy[i, j] / count[i, j]``: ``(N, oh, ow, C) -> (N, H, W, C)``.

    The full correlation of the stride-dilated ``dy / count`` with a window of ones (the conv input
    gradient with an all-ones kernel), computed as one ``reduce_window`` sum.
    """
    fn = "avg_pool2d_backward"
    geom = pool_geometry(fn, x, window=window, stride=stride, padding=padding)
    check_cotangent(fn, dy, (x.shape[0], *geom.out_hw, x.shape[3]))
    g = dy / _avg_divisor(geom, count_include_pad, dy.dtype)  # (N, oh, ow, C)
    (ph, pw), (sh, sw) = transpose_padding(geom), geom.stride
    # Dilate by the stride and pad (negative pads crop rows no window reads) in one lax.pad.
    g = lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), (*ph, sh - 1), (*pw, sw - 1), (0, 0, 0)))
    # The Python-scalar init, as in _window_op: with an array init (a tracer under jit) lax falls back to its
    # generic reduce_window, whose forward-mode derivative batches the primal along with the tangent, so that
    # jax.jacfwd / jax.vmap of a Hessian-vector product through this backward fails under jit.
    return lax.reduce_window(g, 0.0, lax.add, (1, *geom.window, 1), (1, 1, 1, 1), "VALID")
