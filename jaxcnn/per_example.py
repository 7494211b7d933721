"""Per-example gradients and their norms, from the hand-written backward passes with the batch sum left open.

A batch loss is the mean of per-example losses, ``E = (1/N) Σ_n E_n``. Every parameter gradient of a
layer is a sum over the batch of a product of what the forward pass kept (``x``, ``x̂``) and the output
cotangent ``dy``: dense ``dw = Σ_n x_nᵀ dy_n``, conv ``dw = Σ_n Σ_p patch_npᵀ dy_np``, BatchNorm (evaluation)
``dγ = Σ_n Σ_p dy_np x̂_np``. If ``dy`` is the cotangent of the *sum* of per-example losses and the layers
above mix no examples, row ``n`` of ``dy`` is the cotangent of ``E_n`` alone, so the ``n``-th term of that
batch sum is ``∂E_n/∂params``: leaving the sum open gives every example's gradient from one forward and one
backward pass (no ``jax.vmap(jax.grad)``). The derivations, with shapes, are in ``docs/per_example.md``.

The squared norm ``‖∂E_n/∂w‖²`` often costs less than the gradient itself:

* dense, ``dw_n = x_nᵀ dy_n`` (an outer product of two vectors): ``‖dw_n‖² = ‖x_n‖² ‖dy_n‖²``;
* conv, ``dw_n = P_nᵀ dY_n`` with ``P_n`` the ``(T, k·Cg)`` patch matrix of example ``n`` and ``dY_n`` its
  ``(T, Og)`` cotangent (``T`` output positions, per group): ``‖dw_n‖² = Σ_{p,q} (P_np · P_nq)(dY_np · dY_nq)``,
  the "ghost norm", cheaper than forming ``dw_n`` when ``T`` is small against the channel counts
  (:func:`conv2d_norm_method`).

Layers use these through ``Layer.per_example_backward`` and ``Layer.per_example_sq_norms``
(:mod:`jaxcnn.layers`); :func:`jaxcnn.gradients.per_example_grads`, ``per_example_grad_norms`` and
``clipped_grad_sum`` run them on whole models. Layouts as everywhere: NHWC, HWIO, dense ``(in, out)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import DTypeLike

from jaxcnn.ops._checks import check_array, check_cotangent
from jaxcnn.ops._windows import pad_input, read_tap, taps
from jaxcnn.ops.conv import conv2d_geometry
from jaxcnn.shapes import IntOrPair, PaddingLike

# The ways conv2d_per_example_sq_norms computes a squared norm (conv2d_norm_method chooses for "auto").
NORM_METHODS = ("ghost", "direct", "auto")
# The formulations of conv2d_per_example_grads.
GRADS_FORMULATIONS = ("taps", "im2col")
# What its method argument takes: a formulation, or "auto" (the default), which picks one by conv2d_grads_method.
GRADS_METHODS = (*GRADS_FORMULATIONS, "auto")


# ---------------------------------------------------------------------------------------------------
# Convolution


def _conv_geometry(fn: str, dy, x, w_shape, *, stride, padding, dilation, groups):
    """Checks ``x`` (NHWC) and ``dy`` against a kernel of shape ``w_shape``; returns the geometry."""
    check_array(fn, "x", x, rank=4, layout="NHWC")
    if len(w_shape) != 4:
        raise ValueError(f"{fn}: w must have rank 4 (HWIO), got shape {tuple(w_shape)}")
    geom = conv2d_geometry(fn, x.shape, w_shape, stride=stride, padding=padding, dilation=dilation, groups=groups)
    check_cotangent(fn, dy, (x.shape[0], *geom.out_hw, w_shape[3]))
    return geom


def _patch_matrices(x, geom, groups: int):
    """The patch matrix of every example and group, channel-major: ``(N, G, kh·kw·Cg, T)``, ``T = oh * ow``.

    Row ``(a, b, c)`` (the order of an HWIO kernel's ``(kh, kw, Cg)``) of group ``g`` holds
    ``xp[n, i·sh + a·dh, j·sw + b·dw, g·Cg + c]`` at column ``i·ow + j``: the transpose of seed 004's
    ``(T, kh·kw·Cg)`` patch matrix, laid out so that ``P_n dY_n`` is a plain batched matrix product. The
    input is transposed to ``(N, C, Hp, Wp)`` once, then the kernel rows are cut from it and the kernel
    columns from those, two stacking passes instead of one per tap.
    """
    (sh, sw), (dh, dw), (oh, ow), (kh, kw) = geom.stride, geom.dilation, geom.out_hw, geom.window
    n, c = x.shape[0], x.shape[3]
    xt = jnp.transpose(pad_input(x, geom), (0, 3, 1, 2))  # (N, C, Hp, Wp)
    rows = jnp.stack(
        [lax.slice_in_dim(xt, a * dh, a * dh + (oh - 1) * sh + 1, sh, axis=2) for a in range(kh)], axis=1
    )  # (N, kh, C, oh, Wp)
    cols = [lax.slice_in_dim(rows, b * dw, b * dw + (ow - 1) * sw + 1, sw, axis=4) for b in range(kw)]
    patches = jnp.stack(cols, axis=2).reshape(n, kh * kw, groups, c // groups, oh * ow)  # (N, kh*kw, G, Cg, T)
    return jnp.moveaxis(patches, 2, 1).reshape(n, groups, kh * kw * (c // groups), oh * ow)


def _tap_groups(x, geom, groups: int):
    """Each kernel tap of the (padded) input, positions flattened and channels split by group:
    ``[(N, T, G, Cg)]`` in row-major tap order, ``T = oh * ow``."""
    xpad, (n, c) = pad_input(x, geom), (x.shape[0], x.shape[3])
    t = geom.out_hw[0] * geom.out_hw[1]
    return [read_tap(xpad, geom, a, b).reshape(n, t, groups, c // groups) for a, b in taps(geom)]


def conv2d_grads_method(in_channels: int, out_channels: int) -> str:
    """The formulation :func:`conv2d_per_example_grads` uses for ``method="auto"``: ``"taps"`` or ``"im2col"``.

    ``"taps"`` for a layer that reads one input channel and writes fewer than 8, ``"im2col"`` otherwise.
    Per example, ``"taps"`` multiplies a ``(1, T)`` tap by the ``(T, O)`` cotangent ``kh·kw`` times, which
    wins only while ``O`` is tiny; everywhere else the one ``(kh·kw·Cg, T)`` product of ``"im2col"`` wins.
    Time of ``"im2col"`` over ``"taps"`` at batch 128 on a 2-core AMD EPYC (AVX2), XLA:CPU with the training
    loop's options (``python experiments/conv_formulations.py``): 3.23 with 3 outputs (seed_net), 1.33 with
    6 (LeNet-5's first convolution), 0.90 with 8; 0.33-0.94 on the other 15 shapes, 1 to 48 input channels
    per group, strided, 1x1 and depthwise included.
    """
    return "taps" if in_channels == 1 and out_channels < 8 else "im2col"


def conv2d_per_example_grads(
    dy: jax.Array,
    x: jax.Array,
    w: jax.Array,
    *,
    stride: IntOrPair = 1,
    padding: PaddingLike = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    method: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """Per-example kernel and bias gradients of :func:`jaxcnn.ops.conv2d`: the kernel gradient without its batch sum.

    ``dw[n, a, b, c, o] = Σ_{i, j} xp[n, i·sh + a·dh, j·sw + b·dw, g(o)·Cg + c] · dy[n, i, j, o]`` and
    ``db[n, o] = Σ_{i, j} dy[n, i, j, o]``. Their sums over ``n`` are :func:`jaxcnn.ops.conv2d_backward`'s
    ``(dw, db)``.

    Both formulations are products with the batch kept as a batch dimension, per group:

    * ``"im2col"``: the channel-major patch matrix ``P_n`` of example ``n``, ``(kh·kw·Cg, T)`` (seed 004's
      im2col, transposed), times its ``(T, Og)`` cotangent ``dY_n``: ``dw_n = P_n dY_n``, one batched
      product of ``kh·kw·Cg`` rows;
    * ``"taps"``: one product per kernel tap ``(a, b)``, ``dw_n[a, b] = tap_ab(x)_nᵀ dY_n``, the tap being a
      strided view of the padded input, so no patch matrix is written, but each product has only ``Cg`` rows;
    * ``"auto"`` (the default): :func:`conv2d_grads_method`.

    Args:
      dy: cotangent of the output, ``(N, oh, ow, O)``.
      x: the forward input, ``(N, H, W, C)``.
      w: the kernel ``(kh, kw, C / groups, O)`` (only its shape is read).
      stride, padding, dilation, groups: as passed to :func:`jaxcnn.ops.conv2d`.
      method: ``"auto"``, ``"im2col"`` or ``"taps"``.

    Returns:
      ``(dw, db)``: ``(N, kh, kw, C / groups, O)`` and ``(N, O)``.
    """
    fn = "conv2d_per_example_grads"
    if method not in GRADS_METHODS:
        raise ValueError(f"{fn}: method must be one of {GRADS_METHODS}, got {method!r}")
    w_shape = tuple(jnp.shape(w))
    geom = _conv_geometry(fn, dy, x, w_shape, stride=stride, padding=padding, dilation=dilation, groups=groups)
    n, (kh, kw, cg, cout) = x.shape[0], w_shape
    t, og = geom.out_hw[0] * geom.out_hw[1], cout // groups
    if method == "auto":
        method = conv2d_grads_method(cg * groups, cout)
    dy_g = dy.reshape(n, t, groups, og)  # (N, T, G, Og)
    if method == "taps":
        per_tap = [jnp.einsum("ntgc,ntgo->ncgo", tap, dy_g) for tap in _tap_groups(x, geom, groups)]
        dw = jnp.stack(per_tap, axis=1)  # (N, kh*kw, Cg, G, Og)
    else:
        dy_t = jnp.moveaxis(dy_g, 2, 1)  # (N, G, T, Og)
        dw = lax.dot_general(_patch_matrices(x, geom, groups), dy_t, (((3,), (2,)), ((0, 1), (0, 1))))
        dw = jnp.moveaxis(dw.reshape(n, groups, kh * kw, cg, og), 1, 3)  # (N, kh*kw, Cg, G, Og)
    return dw.reshape(n, kh, kw, cg, cout), jnp.sum(dy, axis=(1, 2))


def conv2d_norm_method(out_positions: int, patch_size: int, outputs_per_group: int) -> str:
    """How :func:`conv2d_per_example_sq_norms` computes ``‖dw_n‖²`` for ``method="auto"``: the cheaper in multiply-adds.

    Per example and group, with ``T = out_positions`` (``oh·ow``), ``K = patch_size`` (``kh·kw·Cg``) and
    ``O = outputs_per_group`` (``Og``):

    * ``"direct"`` forms ``dw_n = P_nᵀ dY_n`` (``T·K·O``) and squares it (``K·O``);
    * ``"ghost"`` forms the Gram matrices ``P_n P_nᵀ`` (``T²·K``) and ``dY_n dY_nᵀ`` (``T²·O``) and takes
      their inner product (``T²``).

    ``"ghost"`` when ``T·(K + O) < K·O`` (the ``T²`` and ``K·O`` terms are ignored), i.e. when the output
    is small against the channels: e.g. ``T = 49`` (7x7), ``K = 576``, ``O = 64`` (3x3 conv, 64 channels)
    gives ``31,360 < 36,864``; a 28x28 layer (``T = 784``) never does. Memory: ``N·G·T²`` for the Gram
    matrices against ``N·T·G·K`` for the patch matrix plus ``N·K·G·O`` for the per-example kernels.
    """
    return "ghost" if out_positions * (patch_size + outputs_per_group) < patch_size * outputs_per_group else "direct"


def conv2d_per_example_sq_norms(
    dy: jax.Array,
    x: jax.Array,
    w: jax.Array,
    *,
    stride: IntOrPair = 1,
    padding: PaddingLike = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    use_bias: bool = True,
    method: str = "auto",
) -> jax.Array:
    """``‖∂E_n/∂w‖² (+ ‖∂E_n/∂b‖²)`` for every example of a convolution, ``(N,)``.

    With ``P_n`` the ``(T, kh·kw·Cg)`` patch matrix of example ``n`` in one group and ``dY_n`` its
    ``(T, Og)`` cotangent, ``dw_n = P_nᵀ dY_n`` and

        ‖dw_n‖² = Σ_g ‖P_ngᵀ dY_ng‖² = Σ_g Σ_{p, q} (P_ngp · P_ngq)(dY_ngp · dY_ngq)

    ``method="direct"`` forms ``dw_n`` (:func:`conv2d_per_example_grads`) and squares it; ``"ghost"`` takes the
    right-hand side, the inner product of the two ``(T, T)`` Gram matrices, accumulating ``P P ᵀ`` tap by
    tap; ``"auto"`` chooses by :func:`conv2d_norm_method`. The bias adds ``‖Σ_p dY_np‖²``.

    Args:
      dy, x, w, stride, padding, dilation, groups: as for :func:`conv2d_per_example_grads`.
      use_bias: whether the layer has a bias, whose gradient's squared norm is added.
      method: ``"ghost"``, ``"direct"`` or ``"auto"``.

    Returns:
      ``(N,)`` squared norms.
    """
    return conv2d_per_example_sq_norms_and_grads(
        dy, x, w, stride=stride, padding=padding, dilation=dilation, groups=groups, use_bias=use_bias, method=method
    )[0]


def conv2d_per_example_sq_norms_and_grads(
    dy: jax.Array,
    x: jax.Array,
    w: jax.Array,
    *,
    stride: IntOrPair = 1,
    padding: PaddingLike = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    use_bias: bool = True,
    method: str = "auto",
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """:func:`conv2d_per_example_sq_norms` and the per-example gradients ``(dw, db)`` of
    :func:`conv2d_per_example_grads` when its method (``"direct"``, or what ``"auto"`` resolves to) formed
    them, else ``None``: what DP-SGD's clipped sum can reuse (:class:`jaxcnn.layers.Conv2D`)."""
    fn = "conv2d_per_example_sq_norms"
    if method not in NORM_METHODS:
        raise ValueError(f"{fn}: method must be one of {NORM_METHODS}, got {method!r}")
    w_shape = tuple(jnp.shape(w))
    geom = _conv_geometry(fn, dy, x, w_shape, stride=stride, padding=padding, dilation=dilation, groups=groups)
    n, (kh, kw, cg, cout) = x.shape[0], w_shape
    t, og = geom.out_hw[0] * geom.out_hw[1], cout // groups
    if method == "auto":
        method = conv2d_norm_method(t, kh * kw * cg, og)
    db = jnp.sum(dy, axis=(1, 2))  # (N, O)
    sq = jnp.sum(db * db, axis=1) if use_bias else jnp.zeros((n,), dy.dtype)
    if method == "direct":
        dw, _ = conv2d_per_example_grads(dy, x, w, stride=stride, padding=padding, dilation=dilation, groups=groups)
        return sq + jnp.sum(dw * dw, axis=(1, 2, 3, 4)), (dw, db)
    dy_g = dy.reshape(n, t, groups, og)  # (N, T, G, Og)
    gram_x = sum(jnp.einsum("npgc,nqgc->ngpq", tap, tap) for tap in _tap_groups(x, geom, groups))  # (N, G, T, T)
    gram_dy = jnp.einsum("npgo,nqgo->ngpq", dy_g, dy_g)  # (N, G, T, T)
    return sq + jnp.einsum("ngpq,ngpq->n", gram_x, gram_dy), None


# ---------------------------------------------------------------------------------------------------
# Dense


def _dense_operands(fn: str, dy, x):
    check_array(fn, "x", x, rank=2, layout="(N, in)")
    check_array(fn, "dy", dy, rank=2, layout="(N, out)")
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"{fn}: dy {tuple(dy.shape)} and x {tuple(x.shape)} hold different numbers of examples")


def dense_per_example_grads(dy: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example gradients of :func:`jaxcnn.ops.dense`: ``dw[n] = x[n]ᵀ dy[n]`` (an outer product), ``db[n] = dy[n]``.

    Args:
      dy: cotangent of the output, ``(N, out)``.
      x: the forward input, ``(N, in)``.

    Returns:
      ``(dw, db)``: ``(N, in, out)`` and ``(N, out)``; their sums over ``n`` are ``xᵀ dy`` and ``Σ_n dy[n]``.
    """
    _dense_operands("dense_per_example_grads", dy, x)
    return x[:, :, None] * dy[:, None, :], dy


def dense_per_example_sq_norms(dy: jax.Array, x: jax.Array, *, use_bias: bool = True) -> jax.Array:
    """``‖x_n‖² ‖dy_n‖² (+ ‖dy_n‖²)`` for every example, ``(N,)``, without forming the ``(N, in, out)`` gradients.

    ``‖x_nᵀ dy_n‖²_F = Σ_{i, o} x_ni² dy_no² = ‖x_n‖² ‖dy_n‖²``: exact because each example contributes
    one row to ``x`` and to ``dy`` (the dense input is ``(N, in)``; a dense layer applied at several
    positions would be a convolution, whose norm needs :func:`conv2d_per_example_sq_norms`).
    """
    _dense_operands("dense_per_example_sq_norms", dy, x)
    dy_sq = jnp.sum(dy * dy, axis=1)  # (N,)
    sq = jnp.sum(x * x, axis=1) * dy_sq
    return sq + dy_sq if use_bias else sq


# ---------------------------------------------------------------------------------------------------
# Any layer


def sq_norms(per_example_grads: Any, n: int, dtype: DTypeLike = jnp.float32) -> jax.Array:
    """``Σ over leaves of Σ over all but the leading axis of g²``: ``(N,)`` squared L2 norms of a pytree
    whose leaves carry a leading batch axis (zeros of ``dtype`` when it has no leaves)."""
    total = jnp.zeros((n,), dtype)
    for g in jax.tree_util.tree_leaves(per_example_grads):
        total = total + jnp.sum(jnp.square(g).reshape(n, -1), axis=1)
    return total


def masked_per_example_backward(backward: Callable[..., tuple[Any, jax.Array]]) -> Callable[..., tuple[Any, jax.Array]]:
    """Per-example ``dparams`` for a layer with no rule of its own: ``backward`` once per example, vmapped.

    Example ``n``'s gradient is ``backward`` applied to ``dy`` with every other example's rows zeroed
    (``backward`` is linear in ``dy``; exact when the layer does not mix examples). This costs ``N``
    backward passes over the whole batch, against one for a layer whose rule leaves the batch sum open
    (:class:`jaxcnn.layers.Conv2D`, ``Dense``, ``BatchNorm`` in evaluation mode): a fallback.

    Returns ``per_example_backward(params, residuals, dy) -> (dparams with a leading N axis, dx)``.
    """

    def per_example_backward(params, residuals, dy):
        n = dy.shape[0]
        zero = jnp.zeros((), dy.dtype)

        def only(row):
            keep = (jnp.arange(n) == row).reshape((n,) + (1,) * (dy.ndim - 1))
            return backward(params, residuals, jnp.where(keep, dy, zero))[0]

        _, dx = backward(params, residuals, dy)
        return jax.vmap(only)(jnp.arange(n)), dx

    return per_example_backward
