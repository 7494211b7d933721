"""Layers: small triples of pure functions whose backward pass is written by hand.

A :class:`Layer` is ``(init, forward, backward)``:

* ``init(key, in_shape) -> (params, state, out_shape)``. ``in_shape`` and ``out_shape`` include the
  batch dimension (any value, usually 1). ``params`` are what the optimiser updates; ``state`` holds
  what the layer updates itself (BatchNorm's running statistics) and is ``{}`` for most layers.
* ``forward(params, state, x, *, train=False, key=None) -> (y, new_state, residuals)``. ``train``
  selects training behaviour (batch statistics, dropout), ``key`` is the PRNG key of layers that draw
  random numbers. ``residuals`` are what ``backward`` needs from the forward pass.
* ``backward(params, residuals, dy) -> (dparams, dx)``: the vector-Jacobian product, written by hand
  from the ops in :mod:`jaxcnn.ops`. ``dparams`` has the structure of ``params``.

Everything is a pytree of arrays; hyperparameters are captured by the factory functions (``Conv2D(32,
kernel=3)``) and never stored in params, so ``forward`` and ``backward`` can be jit-compiled with the
layer closed over. :func:`serial` composes layers into a layer; :func:`Residual` adds a skip connection.
Layouts: NHWC activations, HWIO kernels, ``(in, out)`` dense weights.

Owning the backward pass lets a layer also leave its batch sum open: ``per_example_backward`` returns every
example's parameter gradient and ``per_example_sq_norms`` their squared norms (:mod:`jaxcnn.per_example`,
``docs/per_example.md``); :func:`per_example_backward` and :func:`per_example_sq_norms` read them, and
:func:`per_example_sq_norms_and_sum` also the sum of the gradients reweighted per example (DP-SGD's clipping).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.nn import initializers
from jax.typing import DTypeLike

from jaxcnn import ops
from jaxcnn import per_example as pe
from jaxcnn.ops.pool import pool_geometry
from jaxcnn.shapes import IntOrPair, PaddingLike, pair, window_geometry

Shape = tuple[int, ...]  # a shape with its batch dimension, e.g. ``(N, H, W, C)``
EMPTY: dict = {}  # the params, state and parameter gradients of a layer that has none


class Layer(NamedTuple):
    """``(init, forward, backward)`` of one layer or a whole network (see the module docstring).

    ``autodiff_forward``, when set, computes the same function as ``forward`` the way an autodiff user
    writes it (``lax`` convolutions, as Flax does), for ``jax.grad`` to differentiate: the formulations
    that make the hand-written backward fast are not the ones ``jax.grad`` differentiates fastest. ``None``
    means ``forward`` is already that form. :func:`autodiff_forward` reads it.

    ``per_example_backward(params, residuals, dy) -> (dparams, dx)`` is ``backward`` with the batch sum of
    the parameter gradients left open: every leaf of ``dparams`` has a leading axis ``N``, entry ``n`` being
    the contribution of ``dy[n]`` (which, for ``dy`` the cotangent of a sum of per-example losses, is example
    ``n``'s gradient); ``dx`` is ``backward``'s. ``per_example_sq_norms(params, residuals, dy) -> (sq, dx)``
    returns instead the ``(N,)`` squared L2 norms of those gradients over all the layer's params, where the
    algebra gives them without forming the gradients. ``None`` (layers without params, and layers with no
    rule of their own) means :func:`per_example_backward` and :func:`per_example_sq_norms` derive them from
    ``backward``. ``per_example_sq_norms_and_sum(params, residuals, dy) -> (sq, dx, weighted_sum)`` adds
    ``weighted_sum(c) -> dparams``, ``Σ_n c[n]`` times example ``n``'s gradient, computed from the
    cotangents this pass already holds (:func:`per_example_sq_norms_and_sum`); combinators set it, and
    :func:`Conv2D`, whose norm pass may form the per-example gradients that the sum can reuse; other leaves
    leave it ``None``. A layer whose ``backward`` is replaced (``layer._replace(backward=...)``) keeps these
    fields: replace them too, or set them to ``None``.
    """

    init: Callable[..., tuple[Any, Any, Shape]]
    forward: Callable[..., tuple[jax.Array, Any, Any]]
    backward: Callable[..., tuple[Any, jax.Array]]
    name: str = "layer"
    children: tuple = ()  # the layers a combinator is made of, for inspection (e.g. ``jaxcnn gradcheck``)
    autodiff_forward: Callable[..., tuple[jax.Array, Any, Any]] | None = None
    per_example_backward: Callable[..., tuple[Any, jax.Array]] | None = None
    per_example_sq_norms: Callable[..., tuple[jax.Array, jax.Array]] | None = None
    per_example_sq_norms_and_sum: Callable[..., tuple[jax.Array, jax.Array, Callable]] | None = None


def autodiff_forward(layer: Layer) -> Callable[..., tuple[jax.Array, Any, Any]]:
    """The forward pass of ``layer`` as an autodiff user writes it: ``layer.autodiff_forward`` or ``layer.forward``.

    Same signature and the same function as ``layer.forward``; only the formulation of each op may differ.
    """
    return layer.autodiff_forward if layer.autodiff_forward is not None else layer.forward


def _has_params(params) -> bool:
    return bool(jax.tree_util.tree_leaves(params))


def per_example_backward(layer: Layer) -> Callable[..., tuple[Any, jax.Array]]:
    """``per_example_backward(params, residuals, dy) -> (dparams with a leading N axis, dx)`` of ``layer``.

    ``layer.per_example_backward`` when set. Otherwise, for a layer without params, ``layer.backward`` (its
    ``dparams`` has no leaves to give a batch axis); for a layer with params but no rule,
    :func:`jaxcnn.per_example.masked_per_example_backward` (``N`` backward passes, exact for any layer that
    does not mix examples).
    """
    if layer.per_example_backward is not None:
        return layer.per_example_backward
    masked = pe.masked_per_example_backward(layer.backward)

    def derived(params, residuals, dy):
        if not _has_params(params):
            return layer.backward(params, residuals, dy)
        return masked(params, residuals, dy)

    return derived


def per_example_sq_norms(layer: Layer) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """``per_example_sq_norms(params, residuals, dy) -> ((N,) squared gradient norms, dx)`` of ``layer``.

    ``layer.per_example_sq_norms`` when set; zeros for a layer without params; otherwise the squared norms
    of :func:`per_example_backward`'s gradients.
    """
    if layer.per_example_sq_norms is not None:
        return layer.per_example_sq_norms
    grads_of = per_example_backward(layer)

    def derived(params, residuals, dy):
        if not _has_params(params):
            _, dx = layer.backward(params, residuals, dy)
            return jnp.zeros((dy.shape[0],), dy.dtype), dx
        grads, dx = grads_of(params, residuals, dy)
        return pe.sq_norms(grads, dy.shape[0], dy.dtype), dx

    return derived


def per_example_sq_norms_and_sum(layer: Layer) -> Callable[..., tuple[jax.Array, jax.Array, Callable]]:
    """``f(params, residuals, dy) -> (sq, dx, weighted_sum)``: :func:`per_example_sq_norms` of ``layer`` and
    ``weighted_sum(c) -> dparams``, the parameter gradients of ``dy`` with row ``n`` scaled by ``c[n]``
    (``c`` of shape ``(N,)``): ``Σ_n c[n] g_n`` when row ``n`` of ``dy`` carries example ``n``'s cotangent.

    This is what DP-SGD's clipped sum needs once the norms are known (:func:`jaxcnn.gradients.clipped_grad_sum`,
    ``c[n] = min(1, C / ‖g_n‖)``). In a network whose layers mix no examples each layer's cotangent is linear
    in its rows, so scaling the loss's cotangent by ``c`` scales every layer's by ``c``: each layer's
    ``weighted_sum`` scales the ``dy`` that the norm pass handed it and takes the parameter part of its
    ``backward``, and no second pass of input gradients through the network is needed (the "book-keeping"
    form of Bu et al. 2023). Under ``jax.jit`` the input gradient that ``backward`` also returns is dead code.

    ``layer.per_example_sq_norms_and_sum`` when set (:func:`serial` and :func:`Residual` set it, composing
    their layers'; :func:`Conv2D`, contracting with ``c`` the per-example kernel gradients that its
    ``"direct"`` norm formed); otherwise derived from :func:`per_example_sq_norms` and ``layer.backward`` as above.
    """
    if layer.per_example_sq_norms_and_sum is not None:
        return layer.per_example_sq_norms_and_sum
    sq_norms_of = per_example_sq_norms(layer)

    def derived(params, residuals, dy):
        sq, dx = sq_norms_of(params, residuals, dy)
        return sq, dx, lambda c: layer.backward(params, residuals, _scale_rows(dy, c))[0]

    return derived


def _weighted_sum(per_example_grads: Any, c: jax.Array) -> Any:
    """``Σ_n c[n] g[n]`` for every leaf ``g`` (leading axis ``N``) of a pytree of per-example gradients."""
    return jax.tree_util.tree_map(lambda g: jnp.tensordot(c.astype(g.dtype), g, axes=1), per_example_grads)


def _scale_rows(a: jax.Array, c: jax.Array) -> jax.Array:
    """``a`` with row ``n`` (its leading axis) multiplied by ``c[n]``, in ``a``'s dtype."""
    return a * c.astype(a.dtype).reshape((-1,) + (1,) * (a.ndim - 1))


def _check_in_shape(name: str, in_shape, rank: int, layout: str) -> Shape:
    in_shape = tuple(int(d) for d in in_shape)
    if len(in_shape) != rank:
        raise ValueError(f"{name}: expects {layout} inputs (rank {rank}), got input shape {in_shape}")
    return in_shape


def _stateless(name: str, out_shape_fn: Callable[[Shape], Shape], fwd: Callable, bwd: Callable) -> Layer:
    """A layer without params or state: ``fwd(x) -> (y, residuals)``, ``bwd(residuals, dy) -> dx``."""

    def init(key, in_shape):
        del key
        return EMPTY, EMPTY, out_shape_fn(tuple(in_shape))

    def forward(params, state, x, *, train=False, key=None):
        del params, train, key
        y, res = fwd(x)
        return y, state, res

    def backward(params, residuals, dy):
        del params
        return EMPTY, bwd(residuals, dy)

    return Layer(init, forward, backward, name)


# ---------------------------------------------------------------------------------------------------
# Parametric layers


def Conv2D(
    features: int,
    kernel: IntOrPair = 3,
    *,
    stride: IntOrPair = 1,
    padding: PaddingLike = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    use_bias: bool = True,
    method: str = ops.conv.DEFAULT_METHOD,
    kernel_init: Callable = initializers.he_normal(),
    dtype: DTypeLike = jnp.float32,
) -> Layer:
    """2-D convolution, NHWC -> NHWC, with kernel ``(kh, kw, C / groups, features)`` and bias ``(features,)``.

    Params ``{"w", "b"}`` (no ``"b"`` when ``use_bias=False``). Default init: He normal (fan-in
    ``kh * kw * C / groups``), zero bias.

    ``method`` is the formulation of both :func:`jaxcnn.ops.conv2d` and :func:`jaxcnn.ops.conv2d_backward`
    (``"conv"``, ``"im2col"``, ``"taps"`` or ``"auto"``); all compute the same numbers. The default,
    :data:`jaxcnn.ops.conv.DEFAULT_METHOD` (``"auto"``), chooses per gradient and kernel shape
    (:func:`jaxcnn.ops.conv.resolve_method`) by measurement (``jaxcnn bench``, ``docs/benchmarks.md``):
    per-tap multiply-adds for a handful of channels (a layer reading a 1-channel image), the input
    gradient of a layer with few input channels or a stride as one product and a separable ``col2im``,
    otherwise ``lax``'s convolution, with the kernel gradient in the layout that keeps its speed inside
    ``lax.scan`` (the training loop). The layer's :func:`autodiff_forward` is always ``lax``'s
    convolution, the form ``jax.grad`` differentiates best.

    Per example: ``dw[n]`` contracts only the output positions of example ``n``
    (:func:`jaxcnn.per_example.conv2d_per_example_grads`); the squared norms use the ghost norm or the
    gradients themselves, whichever costs less (:func:`jaxcnn.per_example.conv2d_norm_method`); DP-SGD's
    weighted sum contracts those gradients when they were formed, and otherwise is ``backward`` of the rescaled ``dy``.
    """
    name = f"Conv2D({features}, kernel={kernel})"
    kh, kw = pair(kernel, fn="Conv2D", name="kernel")
    if features < 1:
        raise ValueError(f"Conv2D: features must be positive, got {features}")
    hyper: dict[str, Any] = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)

    def init(key, in_shape):
        n, h, w, c = _check_in_shape(name, in_shape, 4, "NHWC")
        if c % groups:
            raise ValueError(
                f"{name}: groups={groups} does not divide the {c} input channels of shape {tuple(in_shape)}"
            )
        if features % groups:
            raise ValueError(f"{name}: groups={groups} does not divide the {features} output features")
        geom = window_geometry(
            fn=name, in_hw=(h, w), window=(kh, kw), stride=stride, padding=padding, dilation=dilation
        )
        params = {"w": kernel_init(key, (kh, kw, c // groups, features), dtype)}
        if use_bias:
            params["b"] = jnp.zeros((features,), dtype)
        return params, EMPTY, (n, *geom.out_hw, features)

    def forward(params, state, x, *, train=False, key=None):
        del train, key
        return ops.conv2d(x, params["w"], params.get("b"), method=method, **hyper), state, x

    def lax_forward(params, state, x, *, train=False, key=None):
        del train, key
        return ops.conv2d(x, params["w"], params.get("b"), method="conv", **hyper), state, x

    def param_grads(dw, db):
        return {"w": dw, "b": db} if use_bias else {"w": dw}

    def backward(params, x, dy):
        dx, dw, db = ops.conv2d_backward(dy, x, params["w"], method=method, **hyper)
        return param_grads(dw, db), dx

    def input_grad(params, x, dy):
        # conv2d_backward's dx alone: under jit its unused dw and db are dead code and never computed.
        return ops.conv2d_backward(dy, x, params["w"], method=method, **hyper)[0]

    def per_example_backward(params, x, dy):
        dw, db = pe.conv2d_per_example_grads(dy, x, params["w"], **hyper)  # (N, kh, kw, Cg, O), (N, O)
        return param_grads(dw, db), input_grad(params, x, dy)

    def per_example_sq_norms_and_sum(params, x, dy):
        sq, formed = pe.conv2d_per_example_sq_norms_and_grads(dy, x, params["w"], use_bias=use_bias, **hyper)
        dx = input_grad(params, x, dy)
        if formed is None:  # the ghost norm formed no per-example gradient: backward of the rescaled dy
            return sq, dx, lambda c: backward(params, x, _scale_rows(dy, c))[0]
        # The direct norm formed them: contract them with c (N·|w| multiply-adds), no second kernel gradient.
        grads = param_grads(*formed)
        return sq, dx, lambda c: _weighted_sum(grads, c)

    return Layer(
        init,
        forward,
        backward,
        name,
        autodiff_forward=None if method == "conv" else lax_forward,
        per_example_backward=per_example_backward,
        per_example_sq_norms=_without_sum(per_example_sq_norms_and_sum),
        per_example_sq_norms_and_sum=per_example_sq_norms_and_sum,
    )


def Dense(
    features: int,
    *,
    use_bias: bool = True,
    kernel_init: Callable = initializers.he_normal(),
    dtype: DTypeLike = jnp.float32,
) -> Layer:
    """Fully connected ``(N, in) -> (N, features)``; params ``{"w": (in, features), "b": (features,)}``.

    Per example: ``dw[n] = x[n]ᵀ dy[n]``, ``db[n] = dy[n]``, with squared norm ``‖x_n‖² ‖dy_n‖² + ‖dy_n‖²``
    (:mod:`jaxcnn.per_example`).
    """
    name = f"Dense({features})"
    if features < 1:
        raise ValueError(f"Dense: features must be positive, got {features}")

    def init(key, in_shape):
        n, d = _check_in_shape(name, in_shape, 2, "(N, features)")
        params = {"w": kernel_init(key, (d, features), dtype)}
        if use_bias:
            params["b"] = jnp.zeros((features,), dtype)
        return params, EMPTY, (n, features)

    def forward(params, state, x, *, train=False, key=None):
        del train, key
        return ops.dense(x, params["w"], params.get("b")), state, x

    def backward(params, x, dy):
        dx, dw, db = ops.dense_backward(dy, x, params["w"])
        return ({"w": dw, "b": db} if use_bias else {"w": dw}), dx

    def per_example_backward(params, x, dy):
        dw, db = pe.dense_per_example_grads(dy, x)  # (N, in, features), (N, features)
        return ({"w": dw, "b": db} if use_bias else {"w": dw}), dy @ params["w"].T

    def per_example_sq_norms(params, x, dy):
        return pe.dense_per_example_sq_norms(dy, x, use_bias=use_bias), dy @ params["w"].T

    return Layer(
        init,
        forward,
        backward,
        name,
        per_example_backward=per_example_backward,
        per_example_sq_norms=per_example_sq_norms,
    )


def _at_least_float32(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def BatchNorm(*, momentum: float = 0.9, epsilon: float = 1e-5, dtype: DTypeLike = jnp.float32) -> Layer:
    """Batch normalisation over every axis but the last (NHWC: per channel; ``(N, F)``: per feature).

    Training: ``x̂ = (x - μ_B) / sqrt(σ²_B + ε)``, ``y = γ x̂ + β`` with the biased batch variance, and the
    running statistics move as ``r ← momentum · r + (1 - momentum) · batch`` (the running variance uses
    the unbiased batch variance, as in PyTorch). Evaluation uses the running statistics.

    Backward in training mode (``m`` elements per channel, sums over them)::

        dγ = Σ dy · x̂,   dβ = Σ dy,   dx = γ / (m · sqrt(σ²_B + ε)) · (m · dy - dβ - x̂ · dγ)

    and in evaluation mode, where ``y`` is affine in ``x``: ``dx = γ · dy / sqrt(r_var + ε)``.

    Per example (evaluation mode only): ``dγ[n] = Σ dy[n] · x̂[n]``, ``dβ[n] = Σ dy[n]``, the sums over every
    axis but the batch and the channel. In training mode every output depends on every example through
    the batch statistics: the cotangent of one example's loss reaches every row of ``dx``, so the terms of
    the batch sum are not the examples' gradients, and ``per_example_backward`` raises ``ValueError``.

    Inputs narrower than float32 (bfloat16 compute) are normalised and differentiated in float32, as
    mixed-precision training does: the batch statistics and the sums of the backward pass cancel, which
    bfloat16's 8-bit significand cannot carry. ``y`` and ``dx`` come back in the input's dtype.
    """
    name = "BatchNorm"
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"BatchNorm: momentum must be in [0, 1), got {momentum}")

    def init(key, in_shape):
        del key
        in_shape = tuple(in_shape)
        if len(in_shape) < 2:
            raise ValueError(f"BatchNorm: expects inputs of rank >= 2, got input shape {in_shape}")
        c = in_shape[-1]
        params = {"scale": jnp.ones((c,), dtype), "bias": jnp.zeros((c,), dtype)}
        state = {"mean": jnp.zeros((c,), dtype), "var": jnp.ones((c,), dtype)}
        return params, state, in_shape

    def forward(params, state, x, *, train=False, key=None):
        del key
        axes = tuple(range(x.ndim - 1))
        out_dtype = x.dtype
        x = x.astype(_at_least_float32(x.dtype))
        if train:
            mean = jnp.mean(x, axis=axes)
            var = jnp.mean(jnp.square(x - mean), axis=axes)
            m = math.prod(x.shape[:-1])
            unbiased = var * (m / max(m - 1, 1))
            new_state = {
                "mean": momentum * state["mean"] + (1 - momentum) * mean.astype(state["mean"].dtype),
                "var": momentum * state["var"] + (1 - momentum) * unbiased.astype(state["var"].dtype),
            }
        else:
            mean, var, new_state = state["mean"].astype(x.dtype), state["var"].astype(x.dtype), state
        inv_std = jax.lax.rsqrt(var + epsilon)  # (C,)
        x_hat = (x - mean) * inv_std
        y = (x_hat * params["scale"] + params["bias"]).astype(out_dtype)
        # The mode is recorded in the residuals' structure (a static dict key), not as a value.
        return y, new_state, {"train" if train else "eval": (x_hat, inv_std)}

    def backward(params, residuals, dy):
        train = "train" in residuals
        x_hat, inv_std = residuals["train" if train else "eval"]
        out_dtype = dy.dtype
        dy = dy.astype(x_hat.dtype)
        axes = tuple(range(dy.ndim - 1))
        d_bias = jnp.sum(dy, axis=axes)  # (C,)
        d_scale = jnp.sum(dy * x_hat, axis=axes)  # (C,)
        if train:
            m = math.prod(dy.shape[:-1])
            dx = (params["scale"] * inv_std / m) * (m * dy - d_bias - x_hat * d_scale)
        else:
            dx = dy * (params["scale"] * inv_std)
        pdt = params["scale"].dtype
        return {"scale": d_scale.astype(pdt), "bias": d_bias.astype(pdt)}, dx.astype(out_dtype)

    def per_example_backward(params, residuals, dy):
        if "train" in residuals:
            raise ValueError(
                "BatchNorm: per-example gradients are not available in training mode, where the batch "
                "statistics couple the examples; use evaluation mode (train=False) or a model without "
                "batch normalisation (e.g. a per-example normalisation such as GroupNorm)"
            )
        x_hat, inv_std = residuals["eval"]
        out_dtype = dy.dtype
        dy = dy.astype(x_hat.dtype)
        axes = tuple(range(1, dy.ndim - 1))  # every axis but the batch and the channel
        d_bias = jnp.sum(dy, axis=axes)  # (N, C)
        d_scale = jnp.sum(dy * x_hat, axis=axes)  # (N, C)
        dx = dy * (params["scale"] * inv_std)
        pdt = params["scale"].dtype
        return {"scale": d_scale.astype(pdt), "bias": d_bias.astype(pdt)}, dx.astype(out_dtype)

    return Layer(init, forward, backward, name, per_example_backward=per_example_backward)


def Dropout(rate: float) -> Layer:
    """Inverted dropout: in training, ``y = x · mask / (1 - rate)`` with ``mask ~ Bernoulli(1 - rate)`` drawn
    from ``key``; identity in evaluation. The backward reuses the mask: ``dx = dy · mask / (1 - rate)``."""
    name = f"Dropout({rate})"
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"Dropout: rate must be in [0, 1), got {rate}")

    def fwd_train(x, key):
        if key is None:
            raise ValueError(f"{name}: training mode needs a PRNG key (forward(..., train=True, key=key))")
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        scale = jnp.asarray(1.0 / (1.0 - rate), x.dtype)
        return jnp.where(keep, x * scale, jnp.zeros((), x.dtype)), keep

    def init(key, in_shape):
        del key
        return EMPTY, EMPTY, tuple(in_shape)

    def forward(params, state, x, *, train=False, key=None):
        del params
        if not train or rate == 0.0:
            return x, state, None
        y, keep = fwd_train(x, key)
        return y, state, keep

    def backward(params, keep, dy):
        del params
        if keep is None:
            return EMPTY, dy
        return EMPTY, jnp.where(keep, dy * jnp.asarray(1.0 / (1.0 - rate), dy.dtype), jnp.zeros((), dy.dtype))

    return Layer(init, forward, backward, name)


# ---------------------------------------------------------------------------------------------------
# Parameter-free layers


def _pool_out_shape(name: str, in_shape, *, window, stride, padding) -> Shape:
    """Output shape of a pooling layer, checked by the op's own rules (:func:`jaxcnn.ops.pool.pool_geometry`),
    so that a layer that the op would reject fails at ``init``."""
    n, h, w, c = _check_in_shape(name, in_shape, 4, "NHWC")
    geom = pool_geometry(
        name, jax.ShapeDtypeStruct((n, h, w, c), jnp.float32), window=window, stride=stride, padding=padding
    )
    return (n, *geom.out_hw, c)


def MaxPool2D(window: IntOrPair = 2, *, stride: IntOrPair | None = None, padding: PaddingLike = 0) -> Layer:
    """Max pooling, NHWC; ``stride`` defaults to ``window``. Tie policy: see :mod:`jaxcnn.ops.pool`."""
    hyper: dict[str, Any] = dict(window=window, stride=stride, padding=padding)

    def out_shape(s):
        return _pool_out_shape("MaxPool2D", s, **hyper)

    def fwd(x):
        y = ops.max_pool2d(x, **hyper)
        return y, (x, y)

    return _stateless(
        f"MaxPool2D({window})", out_shape, fwd, lambda res, dy: ops.max_pool2d_backward(dy, res[0], y=res[1], **hyper)
    )


def AvgPool2D(
    window: IntOrPair = 2,
    *,
    stride: IntOrPair | None = None,
    padding: PaddingLike = 0,
    count_include_pad: bool = True,
) -> Layer:
    """Average pooling, NHWC; ``stride`` defaults to ``window``."""
    hyper: dict[str, Any] = dict(window=window, stride=stride, padding=padding, count_include_pad=count_include_pad)

    def out_shape(s):
        return _pool_out_shape("AvgPool2D", s, window=window, stride=stride, padding=padding)

    return _stateless(
        f"AvgPool2D({window})",
        out_shape,
        lambda x: (ops.avg_pool2d(x, **hyper), x),
        lambda x, dy: ops.avg_pool2d_backward(dy, x, **hyper),
    )


def GlobalAvgPool() -> Layer:
    """Mean over height and width: ``(N, H, W, C) -> (N, C)``; backward spreads ``dy / (H W)`` evenly."""

    def out_shape(s):
        n, _, _, c = _check_in_shape("GlobalAvgPool", s, 4, "NHWC")
        return (n, c)

    def bwd(x, dy):  # only x's shape is used; under jit the array itself is never kept
        _, h, w, _ = x.shape
        return jnp.broadcast_to((dy / (h * w))[:, None, None, :], x.shape)

    return _stateless("GlobalAvgPool", out_shape, lambda x: (jnp.mean(x, axis=(1, 2)), x), bwd)


def Flatten() -> Layer:
    """``(N, ...) -> (N, prod(...))``, row-major; the backward reshapes ``dy`` back."""
    return _stateless(
        "Flatten",
        lambda s: (s[0], math.prod(s[1:])),
        lambda x: (x.reshape(x.shape[0], -1), x),  # x's shape is what the backward needs
        lambda x, dy: dy.reshape(x.shape),
    )


def _elementwise(name: str, f: Callable, f_backward: Callable, from_output: bool) -> Layer:
    """An activation whose backward reads the output (``from_output``) or the input."""

    def fwd(x):
        y = f(x)
        return y, (y if from_output else x)

    return _stateless(name, lambda s: s, fwd, lambda res, dy: f_backward(dy, res))


def Relu() -> Layer:
    """``max(x, 0)``; gradient 0 at 0."""
    return _elementwise("Relu", ops.relu, ops.relu_backward, from_output=False)


def LeakyRelu(negative_slope: float = 0.01) -> Layer:
    """``x`` for ``x >= 0``, ``negative_slope * x`` otherwise."""
    return _elementwise(
        f"LeakyRelu({negative_slope})",
        lambda x: ops.leaky_relu(x, negative_slope),
        lambda dy, x: ops.leaky_relu_backward(dy, x, negative_slope),
        from_output=False,
    )


def Sigmoid() -> Layer:
    """Logistic sigmoid; backward from the output, ``y (1 - y)``."""
    return _elementwise("Sigmoid", ops.sigmoid, ops.sigmoid_backward, from_output=True)


def Tanh() -> Layer:
    """``tanh``; backward from the output, ``1 - y²``."""
    return _elementwise("Tanh", ops.tanh, ops.tanh_backward, from_output=True)


def Softmax() -> Layer:
    """Softmax over the last axis; backward from the output."""
    return _elementwise("Softmax", ops.softmax, ops.softmax_backward, from_output=True)


def LogSoftmax() -> Layer:
    """Log-softmax over the last axis; backward from the output."""
    return _elementwise("LogSoftmax", ops.log_softmax, ops.log_softmax_backward, from_output=True)


# ---------------------------------------------------------------------------------------------------
# Combinators


def _layer_keys(key, n: int):
    return [None] * n if key is None else list(jax.random.split(key, n))


def serial(*layers: Layer, name: str = "serial") -> Layer:
    """Composes layers left to right; the result is a layer.

    ``params`` and ``state`` are tuples with one entry per layer. The forward pass stacks each layer's
    residuals; the backward pass walks them in reverse, feeding each layer's ``dx`` to the layer before.
    ``per_example_backward`` and ``per_example_sq_norms`` walk them the same way with each layer's
    per-example rule (:func:`per_example_backward`); the squared norms of the layers add up, their params
    being disjoint.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> from jaxcnn.layers import Conv2D, Dense, Flatten, MaxPool2D, Relu, serial
      >>> net = serial(Conv2D(4, 3, padding="SAME"), Relu(), MaxPool2D(2), Flatten(), Dense(10))
      >>> params, state, out_shape = net.init(jax.random.PRNGKey(0), (1, 8, 8, 1))
      >>> out_shape
      (1, 10)
      >>> x = jnp.ones((2, 8, 8, 1), jnp.float32)
      >>> y, state, residuals = net.forward(params, state, x)
      >>> y.shape
      (2, 10)
      >>> grads, dx = net.backward(params, residuals, jnp.ones_like(y))
      >>> [g["w"].shape for g in grads if "w" in g], dx.shape
      ([(3, 3, 1, 4), (64, 10)], (2, 8, 8, 1))
    """
    if not layers:
        raise ValueError("serial: needs at least one layer")

    def init(key, in_shape):
        params, state, shape = [], [], tuple(in_shape)
        for layer, k in zip(layers, jax.random.split(key, len(layers)), strict=True):
            p, s, shape = layer.init(k, shape)
            params.append(p)
            state.append(s)
        return tuple(params), tuple(state), shape

    def forward_with(forward_of):
        def forward(params, state, x, *, train=False, key=None):
            new_state, residuals = [], []
            for layer, p, s, k in zip(layers, params, state, _layer_keys(key, len(layers)), strict=True):
                x, s, r = forward_of(layer)(p, s, x, train=train, key=k)
                new_state.append(s)
                residuals.append(r)
            return x, tuple(new_state), tuple(residuals)

        return forward

    def backward_with(backward_of):
        def backward(params, residuals, dy):
            grads = [None] * len(layers)
            for i in reversed(range(len(layers))):
                grads[i], dy = backward_of(layers[i])(params[i], residuals[i], dy)
            return tuple(grads), dy

        return backward

    def sq_norms_and_sum(params, residuals, dy):
        total = jnp.zeros((dy.shape[0],), dy.dtype)  # (N,); the layers' params are disjoint, so squared norms add
        sums: list[Callable] = [None] * len(layers)  # type: ignore[list-item]
        for i in reversed(range(len(layers))):
            sq, dy, sums[i] = per_example_sq_norms_and_sum(layers[i])(params[i], residuals[i], dy)
            total = total + sq
        return total, dy, lambda c: tuple(weighted_sum(c) for weighted_sum in sums)

    differs = any(layer.autodiff_forward is not None for layer in layers)
    return Layer(
        init,
        forward_with(lambda layer: layer.forward),
        backward_with(lambda layer: layer.backward),
        name,
        tuple(layers),
        forward_with(autodiff_forward) if differs else None,
        backward_with(per_example_backward),
        _without_sum(sq_norms_and_sum),
        sq_norms_and_sum,
    )


def _without_sum(sq_norms_and_sum: Callable) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """``per_example_sq_norms`` from ``per_example_sq_norms_and_sum``: its weighted sum is never called."""

    def sq_norms(params, residuals, dy):
        sq, dx, _ = sq_norms_and_sum(params, residuals, dy)
        return sq, dx

    return sq_norms


def Residual(block: Layer, shortcut: Layer | None = None, *, name: str = "Residual") -> Layer:
    """``y = block(x) + shortcut(x)``, the shortcut being the identity by default (ResNet).

    Backward: the cotangent ``dy`` flows into both branches and their input gradients add,
    ``dx = block.backward(dy) + shortcut.backward(dy)``. Params ``{"block", "shortcut"}``. The per-example
    rules combine the branches the same way (per-example gradients side by side, squared norms added).
    """
    skip = (
        shortcut if shortcut is not None else _stateless("Identity", lambda s: s, lambda x: (x, None), lambda r, dy: dy)
    )

    def init(key, in_shape):
        kb, ks = jax.random.split(key)
        pb, sb, out_b = block.init(kb, in_shape)
        ps, ss, out_s = skip.init(ks, in_shape)
        if tuple(out_b) != tuple(out_s):
            raise ValueError(
                f"{name}: block output {tuple(out_b)} and shortcut output {tuple(out_s)} differ; "
                "give a projection shortcut (e.g. a 1x1 Conv2D with the block's stride)"
            )
        return {"block": pb, "shortcut": ps}, {"block": sb, "shortcut": ss}, out_b

    def forward_with(forward_of):
        def forward(params, state, x, *, train=False, key=None):
            kb, ks = _layer_keys(key, 2)
            yb, sb, rb = forward_of(block)(params["block"], state["block"], x, train=train, key=kb)
            ys, ss, rs = forward_of(skip)(params["shortcut"], state["shortcut"], x, train=train, key=ks)
            return yb + ys, {"block": sb, "shortcut": ss}, (rb, rs)

        return forward

    def backward_with(backward_of):
        def backward(params, residuals, dy):
            rb, rs = residuals
            gb, dxb = backward_of(block)(params["block"], rb, dy)
            gs, dxs = backward_of(skip)(params["shortcut"], rs, dy)
            return {"block": gb, "shortcut": gs}, dxb + dxs

        return backward

    def sq_norms_and_sum(params, residuals, dy):
        rb, rs = residuals
        sq_b, dxb, sum_b = per_example_sq_norms_and_sum(block)(params["block"], rb, dy)
        sq_s, dxs, sum_s = per_example_sq_norms_and_sum(skip)(params["shortcut"], rs, dy)
        return sq_b + sq_s, dxb + dxs, lambda c: {"block": sum_b(c), "shortcut": sum_s(c)}

    differs = block.autodiff_forward is not None or skip.autodiff_forward is not None
    return Layer(
        init,
        forward_with(lambda layer: layer.forward),
        backward_with(lambda layer: layer.backward),
        name,
        (block, skip),
        forward_with(autodiff_forward) if differs else None,
        backward_with(per_example_backward),
        _without_sum(sq_norms_and_sum),
        sq_norms_and_sum,
    )
