"""2-D convolution (cross-correlation, as in ``lax`` and PyTorch) and its hand-written backward pass.

Layouts: ``x`` is NHWC ``(N, H, W, C)``, ``w`` is HWIO ``(kh, kw, C / groups, O)``, ``y`` is
``(N, oh, ow, O)``. With ``xp`` the zero-padded input, ``Cg = C / groups`` and ``g(o)`` the group
of output channel ``o``::

    y[n, i, j, o] = b[o] + sum_{a, b, c} xp[n, i*sh + a*dh, j*sw + b*dw, g(o)*Cg + c] * w[a, b, c, o]

Backward (derived in ``docs/math.md``; seeds 002 and 004 do the stride-1, unpadded case):

* ``db[o] = sum_{n, i, j} dy[n, i, j, o]``
* ``dw = correlation(x, dy)``: the input correlated with ``dy`` used as a kernel, contracting the batch,
  with ``dy``'s taps spaced by the stride and the output positions by the dilation.
* ``dx = full_correlation(dilate(dy, stride), rot180(w) with in/out channels swapped)``: ``dy`` with
  ``stride - 1`` zeros between entries, padded so that every input position gets one output, correlated
  with the kernel flipped in both spatial dims; the kernel's taps stay ``dilation`` apart.

Four formulations are provided, selected by ``method`` (default :data:`DEFAULT_METHOD`, ``"auto"``):

* ``"conv"``: each of the three as one ``lax.conv_general_dilated``, the same primitives that
  XLA's own transpose rules produce, with the operands transposed to the ordinary NHWC x HWIO layout.
* ``"im2col"``: the matrix form of seeds 000/004. ``patches = im2col(x)`` has one row per output
  position and one column per ``(a, b, c)``; ``y = patches @ W``, ``dw = patchesᵀ @ dy`` and
  ``dx = col2im(dy @ Wᵀ)``, where ``col2im`` (the adjoint of ``im2col``) adds overlapping contributions.
* ``"taps"``: the same sums taken one kernel tap ``(a, b)`` at a time, without the patch matrix:
  ``y = Σ_ab tap_ab(x) @ w[a, b]``, ``dw[a, b] = tap_ab(x)ᵀ @ dy`` and ``dx = Σ_ab place_ab(dy @ w[a, b]ᵀ)``.
  When the contracted channel count is tiny (at most :data:`TAPS_ELEMENTWISE_MAX`, e.g. a 1-channel
  image), each product is written as broadcast multiply-adds instead of a matrix product, which XLA
  fuses into one pass over the data.
* ``"auto"``: per gradient, the formulation that measured fastest for the shape (see :func:`resolve_method`
  and ``docs/benchmarks.md``).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxcnn.ops._checks import check_array, check_cotangent
from jaxcnn.ops._windows import pad_input, place_tap, read_tap, taps, transpose_padding
from jaxcnn.shapes import Geometry, IntOrPair, PaddingLike, window_geometry

_NHWC_HWIO = ("NHWC", "HWIO", "NHWC")
METHODS = ("conv", "im2col", "taps", "auto")
# The formulation every convolution uses unless told otherwise: ``ops.conv2d``/``conv2d_backward``,
# ``layers.Conv2D``, the zoo and ``jaxcnn train --conv-method``. The one place this default is set.
DEFAULT_METHOD = "auto"
# "taps" writes a product over at most this many channels as broadcast multiply-adds (no dot).
TAPS_ELEMENTWISE_MAX = 4
# "auto" computes an input gradient with at most this many channels per group without XLA's convolution:
# "im2col" for an ungrouped layer with more than one, "taps" otherwise (see resolve_method).
INPUT_GRAD_FEW_CHANNELS_MAX = 8


def conv2d_geometry(
    fn: str,
    x_shape: Sequence[int],
    w_shape: Sequence[int],
    *,
    stride: IntOrPair,
    padding: PaddingLike,
    dilation: IntOrPair,
    groups: int,
) -> Geometry:
    """Validates conv arguments against the shapes of ``x`` (NHWC) and ``w`` (HWIO); returns the geometry."""
    try:
        groups = operator.index(groups)
    except TypeError:
        raise TypeError(f"{fn}: groups must be an int, got {groups!r}") from None
    if groups < 1:
        raise ValueError(f"{fn}: groups must be positive, got {groups}")
    kh, kw, cg, cout = w_shape
    cin = x_shape[3]
    if cin % groups:
        raise ValueError(f"{fn}: groups={groups} does not divide the {cin} input channels of x {tuple(x_shape)}")
    if cout % groups:
        raise ValueError(f"{fn}: groups={groups} does not divide the {cout} output channels of w {tuple(w_shape)}")
    if cg * groups != cin:
        raise ValueError(
            f"{fn}: channel mismatch: x {tuple(x_shape)} has {cin} channels but w {tuple(w_shape)} (HWIO) "
            f"expects {cg} x groups={groups} = {cg * groups}"
        )
    return window_geometry(
        fn=fn, in_hw=x_shape[1:3], window=(kh, kw), stride=stride, padding=padding, dilation=dilation
    )


def _check_inputs(fn: str, x, w) -> None:
    check_array(fn, "x", x, rank=4, layout="NHWC")
    check_array(fn, "w", w, rank=4, layout="HWIO")
    if jnp.result_type(x) != jnp.result_type(w):
        raise TypeError(
            f"{fn}: x has dtype {jnp.result_type(x)} but w has dtype {jnp.result_type(w)}; cast one of them"
        )


def _check_method(fn: str, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"{fn}: method must be one of {METHODS}, got {method!r}")


def conv2d(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None = None,
    *,
    stride: IntOrPair = 1,
    padding: PaddingLike = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    method: str = DEFAULT_METHOD,
) -> jax.Array:
    """2-D cross-correlation with optional bias.

    Args:
      x: input, ``(N, H, W, C)``.
      w: kernel, ``(kh, kw, C / groups, O)``.
      b: optional bias, ``(O,)``.
      stride: int or ``(sh, sw)``.
      padding: int, ``(ph, pw)``, ``((top, bottom), (left, right))``, ``"VALID"`` or ``"SAME"``.
      dilation: kernel dilation, int or ``(dh, dw)``.
      groups: split channels into this many independent groups (``groups == C``: depthwise).
      method: ``"conv"`` (``lax.conv_general_dilated``), ``"im2col"`` (patches @ kernel), ``"taps"`` (one
        product per kernel tap) or ``"auto"`` (:func:`resolve_method`, the default); all give the same numbers.

    Returns:
      ``y``: ``(N, oh, ow, O)`` with ``oh = floor((H + top + bottom - (kh - 1) * dh - 1) / sh) + 1``
      (see :mod:`jaxcnn.shapes`), likewise ``ow``.

    Examples:
      A 3x3 kernel of ones over a 5x5 image of ones, padded by 1, stride 2: each output counts the real
      (non-padding) pixels its window covers.

      >>> import jax.numpy as jnp
      >>> from jaxcnn import ops
      >>> x = jnp.ones((1, 5, 5, 1), jnp.float32)  # NHWC
      >>> w = jnp.ones((3, 3, 1, 2), jnp.float32)  # HWIO: 1 input channel, 2 output channels
      >>> y = ops.conv2d(x, w, stride=2, padding=1)
      >>> y.shape
      (1, 3, 3, 2)
      >>> y[0, :, :, 0].tolist()
      [[4.0, 6.0, 4.0], [6.0, 9.0, 6.0], [4.0, 6.0, 4.0]]
    """
    fn = "conv2d"
    _check_inputs(fn, x, w)
    _check_method(fn, method)
    geom = conv2d_geometry(fn, x.shape, w.shape, stride=stride, padding=padding, dilation=dilation, groups=groups)
    if b is not None and tuple(jnp.shape(b)) != (w.shape[3],):
        raise ValueError(
            f"conv2d: b must have shape ({w.shape[3]},) to match w {tuple(w.shape)}, got {tuple(jnp.shape(b))}"
        )
    if method == "auto":
        method = resolve_method("forward", w.shape, groups)
    if method == "conv":
        y = lax.conv_general_dilated(
            x,
            w,
            geom.stride,
            geom.padding,
            rhs_dilation=geom.dilation,
            dimension_numbers=_NHWC_HWIO,
            feature_group_count=groups,
        )
    elif method == "taps":
        y = _taps_forward(x, w, geom, groups)
    else:
        y = _im2col_forward(x, w, geom, groups)
    return y if b is None else y + b


def conv2d_backward(
    dy: jax.Array,
    x: jax.Array,
    w: jax.Array,
    *,
    stride: IntOrPair = 1,
    padding: PaddingLike = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    method: str = DEFAULT_METHOD,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Hand-written vector-Jacobian product of :func:`conv2d`.

    Args:
      dy: cotangent of the output, ``(N, oh, ow, O)``.
      x, w, stride, padding, dilation, groups, method: as passed to :func:`conv2d`.

    Returns:
      ``(dx, dw, db)`` with the shapes of ``x`` ``(N, H, W, C)``, ``w`` ``(kh, kw, C / groups, O)`` and
      the bias ``(O,)``. Input rows and columns that no window reads get zero gradient.

    Examples:
      The convolution of :func:`conv2d`'s example with a cotangent of ones: ``db`` counts the output
      positions, ``dw[a, b]`` the windows whose tap ``(a, b)`` reads a real pixel and ``dx`` the taps
      (of all windows and both output channels) that read each pixel.

      >>> import jax.numpy as jnp
      >>> from jaxcnn import ops
      >>> x, w = jnp.ones((1, 5, 5, 1), jnp.float32), jnp.ones((3, 3, 1, 2), jnp.float32)
      >>> dy = jnp.ones((1, 3, 3, 2), jnp.float32)
      >>> dx, dw, db = ops.conv2d_backward(dy, x, w, stride=2, padding=1)
      >>> dx.shape, dw.shape, db.shape
      ((1, 5, 5, 1), (3, 3, 1, 2), (2,))
      >>> db.tolist()
      [9.0, 9.0]
      >>> dw[:, :, 0, 0].tolist()
      [[4.0, 6.0, 4.0], [6.0, 9.0, 6.0], [4.0, 6.0, 4.0]]
      >>> dx[0, :3, :3, 0].tolist()
      [[2.0, 4.0, 2.0], [4.0, 8.0, 4.0], [2.0, 4.0, 2.0]]
    """
    fn = "conv2d_backward"
    _check_inputs(fn, x, w)
    _check_method(fn, method)
    geom = conv2d_geometry(fn, x.shape, w.shape, stride=stride, padding=padding, dilation=dilation, groups=groups)
    check_cotangent(fn, dy, (x.shape[0], *geom.out_hw, w.shape[3]))
    db = jnp.sum(dy, axis=(0, 1, 2))  # (O,)
    dx_method = (
        resolve_method("input_grad", w.shape, groups, strided=geom.stride != (1, 1)) if method == "auto" else method
    )
    dw_method = resolve_method("kernel_grad", w.shape, groups) if method == "auto" else method
    # Under jit, a dx that nobody uses (the first layer's) is dead code and is never computed.
    if dx_method == "conv":
        dx = conv2d_input_grad(dy, w, geom, groups)
    elif dx_method == "taps":
        dx = _taps_input_grad(dy, w, geom, groups)
    else:
        dx = _im2col_input_grad(dy, w, geom, groups)
    if dw_method == "conv":
        dw = conv2d_kernel_grad(dy, x, geom, groups, w.shape)
    elif dw_method == "taps":
        dw = _taps_kernel_grad(dy, x, w, geom, groups)
    else:
        dw = _im2col_kernel_grad(dy, x, w, geom, groups)
    return dx, dw, db


def resolve_method(grad: str, w_shape: Sequence[int], groups: int = 1, *, strided: bool = False) -> str:
    """The formulation ``method="auto"`` uses for ``grad`` (``"forward"``, ``"input_grad"`` or
    ``"kernel_grad"``) of a kernel of shape ``w_shape`` (HWIO) with ``groups`` groups, ``strided`` when
    its stride is more than 1 in either dimension.

    The rule follows the measurements of ``jaxcnn bench`` and ``experiments/conv_formulations.py`` on
    XLA:CPU (``docs/benchmarks.md``):

    * the forward pass: ``"taps"`` when each tap's product contracts a handful of channels (at most
      :data:`TAPS_ELEMENTWISE_MAX`, a layer reading a 1-channel image): ``kh * kw`` broadcast multiply-adds
      summed in one pass, several times faster there than XLA's convolution, whose matrix kernels are
      built for many channels; otherwise ``"conv"``;
    * the input gradient of an ungrouped layer with more than one input channel: ``"im2col"``, one
      ``(N·oh·ow, O) x (O, kh·kw·C)`` product and a separable ``col2im``, when it has few input channels (at
      most :data:`INPUT_GRAD_FEW_CHANNELS_MAX`, e.g. LeNet-5's second convolution, 6) or a stride (whose
      ``"conv"`` convolves the zero-dilated cotangent); ``"conv"`` otherwise;
    * the input gradient of a layer with one input channel, or grouped: ``"taps"`` when it has few input
      channels per group (at most :data:`INPUT_GRAD_FEW_CHANNELS_MAX`) or a few outputs per group (at most
      :data:`TAPS_ELEMENTWISE_MAX`); ``"conv"`` otherwise (a grouped ``"im2col"`` is a slower per-group
      product);
    * the kernel gradient: ``"conv"``, the convolution in the NHWC x HWIO layout, which unlike
      ``jax.vjp``'s layout keeps its speed inside ``lax.scan`` (and matches ``jax.vjp`` outside it).
      Building the patch matrix for the forward pass or the kernel gradient costs more than the product.
    """
    cg, og = w_shape[2], w_shape[3] // groups
    if grad == "forward":
        return "taps" if cg <= TAPS_ELEMENTWISE_MAX else "conv"
    if grad == "kernel_grad":
        return "conv"
    if grad == "input_grad":
        few = cg <= INPUT_GRAD_FEW_CHANNELS_MAX
        if groups == 1 and cg > 1:
            return "im2col" if few or strided else "conv"
        return "taps" if few or og <= TAPS_ELEMENTWISE_MAX else "conv"
    raise ValueError(f"resolve_method: grad must be forward, input_grad or kernel_grad, got {grad!r}")


def conv2d_input_grad(dy: jax.Array, w: jax.Array, geom: Geometry, groups: int = 1) -> jax.Array:
    """``dx = full_correlation(dilate(dy, stride), rot180(w)ᵀ)``: ``(N, oh, ow, O) -> (N, H, W, C)``.

    The kernel is flipped in both spatial dims and, within each group, its in/out channels are swapped:
    ``(kh, kw, Cg, G*Og) -> (kh, kw, Og, G*Cg)``. ``lhs_dilation`` inserts the ``stride - 1`` zeros
    between the entries of ``dy``; :func:`transpose_padding` makes the output exactly ``H x W``.
    """
    kh, kw, cg, cout = w.shape
    og = cout // groups
    w_t = jnp.flip(w, (0, 1)).reshape(kh, kw, cg, groups, og)  # (kh, kw, Cg, G, Og)
    w_t = w_t.transpose(0, 1, 4, 3, 2).reshape(kh, kw, og, groups * cg)  # (kh, kw, Og, G*Cg)
    return lax.conv_general_dilated(
        dy,
        w_t,
        (1, 1),
        transpose_padding(geom),
        lhs_dilation=geom.stride,
        rhs_dilation=geom.dilation,
        dimension_numbers=_NHWC_HWIO,
        feature_group_count=groups,
    )


def conv2d_kernel_grad(
    dy: jax.Array, x: jax.Array, geom: Geometry, groups: int, kernel_shape: Sequence[int]
) -> jax.Array:
    """``dw[a, b, c, o] = sum_{n, i, j} xp[n, i*sh + a*dh, j*sw + b*dw, c] dy[n, i, j, o]``.

    One correlation with the roles renamed: the input's channels act as the batch, its batch as the
    feature dim that is contracted, and ``dy`` is the kernel (its taps ``stride`` apart, hence
    ``rhs_dilation=stride``); output positions are the kernel taps, ``dilation`` apart (``window_strides``).
    The bottom/right padding is trimmed so that there are exactly ``kh x kw`` outputs.
    ``batch_group_count`` pairs input-channel group ``g`` with output-channel group ``g``.

    The operands are transposed explicitly so that this is an ordinary NHWC x HWIO convolution
    (``x -> (C, H, W, N)``, ``dy -> (oh, ow, N, O)``, output ``(Cg, kh, kw, O)``). The same convolution
    written with dimension numbers ``("CHWN", "IHWO", "HWNC")`` instead (what ``jax.vjp`` emits) gives the
    same numbers, but XLA:CPU runs it tens of times slower inside ``lax.scan``, the training loop.
    """
    kh, kw = kernel_shape[:2]
    pads = []
    for n, k, d, s, (lo, _), o in zip(
        geom.in_hw, (kh, kw), geom.dilation, geom.stride, geom.padding, geom.out_hw, strict=True
    ):
        pads.append((lo, (k - 1) * d + (o - 1) * s + 1 - n - lo))
    dw = lax.conv_general_dilated(
        x.transpose(3, 1, 2, 0),
        dy.transpose(1, 2, 0, 3),
        geom.dilation,
        pads,
        rhs_dilation=geom.stride,
        dimension_numbers=_NHWC_HWIO,
        batch_group_count=groups,
    )  # (Cg, kh, kw, O)
    return dw.transpose(1, 2, 0, 3)


def im2col(x: jax.Array, geom: Geometry) -> jax.Array:
    """Patch matrix of seed 004: ``(N, H, W, C) -> (N, oh, ow, kh * kw, C)``.

    Entry ``[n, i, j, a * kw + b, c] = xp[n, i*sh + a*dh, j*sw + b*dw, c]``: one row of taps per output
    position (flatten the last two axes for the ``(N*oh*ow, kh*kw*C)`` matrix of the tutorials).
    """
    xpad = pad_input(x, geom)
    return jnp.stack([read_tap(xpad, geom, a, b) for a, b in taps(geom)], axis=3)


def col2im(patches: jax.Array, geom: Geometry) -> jax.Array:
    """Adjoint of :func:`im2col`: ``(N, oh, ow, kh * kw, C) -> (N, H, W, C)``.

    Every patch entry is added back to the input position it was read from; overlapping windows
    (stride < kernel span) add up and entries read from the padding are dropped. Entry ``[n, i, j, (a, b), c]``
    goes to row ``i·sh + a·dh - top`` and column ``j·sw + b·dw - left``, which separates: the ``kw`` taps of
    each kernel row are first placed along the width (``(N, oh, W, kh, C)``), then the ``kh`` rows along the
    height, ``kh + kw`` placements of a slice each instead of ``kh·kw`` of the whole output.
    """
    (sh, sw), (dh, dw), (oh, ow), (kh, kw) = geom.stride, geom.dilation, geom.out_hw, geom.window
    (h, w), ((top, _), (left, _)) = geom.in_hw, geom.padding
    p = patches.reshape(*patches.shape[:3], kh, kw, patches.shape[-1])  # (N, oh, ow, kh, kw, C)
    zero, keep = jnp.zeros((), patches.dtype), (0, 0, 0)

    def placement(start, size, count, step):
        # lax.pad config putting ``count`` entries at ``start + k·step`` of a ``size``-long axis (cropping outside)
        return (start, size - (start + (count - 1) * step + 1), step - 1)

    along_w = functools.reduce(
        operator.add,
        [
            lax.pad(p[:, :, :, :, b], zero, (keep, keep, placement(b * dw - left, w, ow, sw), keep, keep))
            for b in range(kw)
        ],
    )  # (N, oh, W, kh, C)
    return functools.reduce(
        operator.add,
        [lax.pad(along_w[:, :, :, a], zero, (keep, placement(a * dh - top, h, oh, sh), keep, keep)) for a in range(kh)],
    )  # (N, H, W, C)


def _grouped(patches, groups):
    n, oh, ow, k, c = patches.shape
    return patches.reshape(n, oh, ow, k, groups, c // groups)  # (N, oh, ow, kh*kw, G, Cg)


def _grouped_kernel(w, groups):
    kh, kw, cg, cout = w.shape
    return w.reshape(kh * kw, cg, groups, cout // groups)  # (kh*kw, Cg, G, Og)


def _im2col_forward(x, w, geom, groups):
    p = _grouped(im2col(x, geom), groups)
    y = jnp.einsum("nijtgc,tcgo->nijgo", p, _grouped_kernel(w, groups))  # (N, oh, ow, G, Og)
    return y.reshape(*y.shape[:3], -1)


def _im2col_kernel_grad(dy, x, w, geom, groups):
    p = _grouped(im2col(x, geom), groups)  # (N, oh, ow, kh*kw, G, Cg)
    dy_g = dy.reshape(*dy.shape[:3], groups, -1)  # (N, oh, ow, G, Og)
    return jnp.einsum("nijtgc,nijgo->tcgo", p, dy_g).reshape(w.shape)  # patchesᵀ @ dy


def _im2col_input_grad(dy, w, geom, groups):
    kh, kw, cg, cout = w.shape
    if groups == 1:  # one (N·oh·ow, O) x (O, kh·kw·C) product
        dp = (dy.reshape(-1, cout) @ w.reshape(-1, cout).T).reshape(*dy.shape[:3], kh * kw, cg)
        return col2im(dp, geom)
    dy_g = dy.reshape(*dy.shape[:3], groups, -1)  # (N, oh, ow, G, Og)
    dp = jnp.einsum("nijgo,tcgo->nijtgc", dy_g, _grouped_kernel(w, groups))  # dy @ Wᵀ
    return col2im(dp.reshape(*dp.shape[:4], -1), geom)


# "taps": one (N, oh, ow, G, Cg) x (Cg, G, Og) product per kernel tap. ``_tap_product`` contracts the
# channel axis of ``a`` (N, oh, ow, G, K) with ``m`` (K, G, J) -> (N, oh, ow, G, J); for K up to
# TAPS_ELEMENTWISE_MAX as K broadcast multiply-adds.


def _tap_product(a, m):
    if a.shape[-1] > TAPS_ELEMENTWISE_MAX:
        return jnp.einsum("nijgk,kgo->nijgo", a, m)
    out = a[..., 0:1] * m[0]
    for k in range(1, a.shape[-1]):
        out = out + a[..., k : k + 1] * m[k]
    return out


def _taps_forward(x, w, geom, groups):
    return _computed_once(functools.partial(_taps_forward_sum, geom=geom, groups=groups), x, w)


def _taps_forward_sum(x, w, geom, groups):
    xpad = pad_input(x, geom)
    n, (oh, ow), cout = x.shape[0], geom.out_hw, w.shape[3]
    wg = w.reshape(*w.shape[:3], groups, cout // groups)  # (kh, kw, Cg, G, Og)
    y = None
    for a, b in taps(geom):
        tap = read_tap(xpad, geom, a, b).reshape(n, oh, ow, groups, -1)  # (N, oh, ow, G, Cg)
        term = _tap_product(tap, wg[a, b])
        y = term if y is None else y + term
    assert y is not None  # a window has at least one tap
    return y.reshape(n, oh, ow, cout)


def _taps_kernel_grad(dy, x, w, geom, groups):
    xpad = pad_input(x, geom)
    n, (oh, ow), cg = x.shape[0], geom.out_hw, w.shape[2]
    dy_g = dy.reshape(n, oh, ow, groups, -1)  # (N, oh, ow, G, Og)
    rows = []
    for a, b in taps(geom):
        tap = read_tap(xpad, geom, a, b).reshape(n, oh, ow, groups, cg)  # (N, oh, ow, G, Cg)
        rows.append(jnp.einsum("nijgc,nijgo->cgo", tap, dy_g))  # tapᵀ @ dy, contracting N * oh * ow
    return jnp.stack(rows).reshape(w.shape)  # (kh*kw, Cg, G, Og) -> (kh, kw, Cg, O)


def _taps_input_grad(dy, w, geom, groups):
    return _computed_once(functools.partial(_taps_input_grad_sum, geom=geom, groups=groups), dy, w)


def _taps_input_grad_sum(dy, w, geom, groups):
    n, (oh, ow), (kh, kw, cg, cout) = dy.shape[0], geom.out_hw, w.shape
    dy_g = dy.reshape(n, oh, ow, groups, -1)  # (N, oh, ow, G, Og)
    w_t = w.reshape(kh, kw, cg, groups, cout // groups).transpose(0, 1, 4, 3, 2)  # (kh, kw, Og, G, Cg)
    dx = None
    for a, b in taps(geom):
        term = place_tap(_tap_product(dy_g, w_t[a, b]).reshape(n, oh, ow, -1), geom, a, b)
        dx = term if dx is None else dx + term
    return dx


def _computed_once(f, *args):
    """``f(*args)``, written to memory once instead of fused into, and recomputed by, each of its consumers.

    XLA:CPU fuses cheap elementwise producers into every consumer. For a sum of ``kh * kw`` taps read
    by the forward and backward passes of the next layers (a pooling layer reads each element once per
    window tap and once more for the activation's gradient) that recomputation costs several times the
    sum itself. The result of a conditional is always materialised, so ``f`` runs as both branches of a
    ``lax.cond`` on a predicate that XLA cannot fold (whether the first element of the first argument
    equals itself, false only for NaN); both branches compute the same thing. (``lax.optimization_barrier``
    would say this directly, but XLA:CPU removes it before fusion.)
    """
    first = args[0].reshape(-1)[0]
    return lax.cond(first == first, f, f, *args)
