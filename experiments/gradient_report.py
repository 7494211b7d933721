"""Experiment 3 — gradient agreement report: manual vs autodiff vs finite differences, for everything.

For every op, every layer and every zoo model, in float64, float32 and (where it applies: the ops,
layers and models that run in bfloat16, as ``jaxcnn train --precision bfloat16`` does) bfloat16:

* **float64 / float32**: the library's three-way check (:func:`jaxcnn.gradcheck.gradcheck`, and
  :func:`jaxcnn.modelcheck.check_model` for the zoo: each layer, then the whole model with its loss):
  max relative error of the hand-written backward against ``jax.vjp`` of the very same forward pass (in
  that dtype), against central finite differences (float64), of ``jax.vjp`` itself against finite
  differences, and the adjoint identity ``<backward(dy), v> = <dy, J v>``.
* **bfloat16**: finite differences mean nothing at 8 significant bits, so the manual and the autodiff
  cotangents, both computed in bfloat16, are compared with each other and with ``jax.vjp`` in float64 on
  the same (bfloat16-rounded) inputs.
* **element-wise**: for every case and dtype, every element's ``|g - g_ref| / max|g_ref|`` (manual vs
  autodiff, and each vs float64), summarised as histograms.

"autodiff" is the correctness witness, ``jax.vjp`` of the same forward pass the hand-written backward
belongs to (route ``"autodiff_same_forward"`` of :func:`jaxcnn.gradients.value_and_grad`): same
formulation, same rounding. Every convolution case runs in each formulation (``method``: ``conv``,
``im2col``, ``taps`` and the default ``auto``), forward and backward alike. For the zoo models a second
witness is recorded: the ``"autodiff"`` route, ``jax.grad`` of the forward pass an autodiff user writes
(``lax`` convolutions, :func:`jaxcnn.layers.autodiff_forward`), which agrees to rounding as well.

Writes ``gradient_report.md`` (tables), ``gradient_report.json`` (every number, with provenance),
``gradient_report.csv`` (one row per case and dtype) and ``gradient_report_histogram.png``.

    python experiments/gradient_report.py [--out DIR] [--smoke]
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

if __package__ in (None, ""):  # run as a script: make ``experiments`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

import jax
import jax.numpy as jnp

from experiments import common
from jaxcnn import gradients, ops
from jaxcnn import layers as L
from jaxcnn.gradcheck import gradcheck
from jaxcnn.modelcheck import check_model
from jaxcnn.models import MODELS, get_model
from jaxcnn.ops.conv import METHODS as CONV_METHODS

NAME = "gradient_report"
DTYPES = ("float64", "float32", "bfloat16")
BINS = np.arange(-18.0, 0.51, 0.25)  # log10 of the element-wise relative error
ZERO = 1e-300  # an exactly equal element
# The second witness (the "autodiff" route: jax.grad of the lax forward pass) differs from the manual gradient
# by the rounding of another formulation; it must stay within these (float64; float32: --check-every's tolerance).
LAX_TOLERANCE = {"float64": 1e-12, "float32": 1e-4}


class Case(NamedTuple):
    """A function and its hand-written backward, with a recipe for its inputs.

    ``inputs(rng)`` returns float64 NumPy arrays (and integer labels); they are cast to each dtype, so every
    dtype sees the same values up to its rounding. ``kind`` is ``"op"`` or ``"layer"``.
    """

    kind: str
    name: str
    f: Callable
    backward: Callable
    inputs: Callable
    names: tuple
    argnums: tuple | None = None
    skip_kinks: bool = False
    bfloat16: bool = True
    # False where a float64 rerun is not the same function: Dropout's mask, drawn by jax.random.bernoulli,
    # depends on whether float64 is enabled, so the float64 reference would drop other elements.
    float64_reference: bool = True


# ---------------------------------------------------------------------------------------------------
# Inputs


def _normal(rng, *shape):
    return rng.standard_normal(shape)


def _away_from_zero(rng, *shape):
    """Normal values pushed at least 0.1 from 0 (ReLU's kink), exactly representable after the push."""
    x = rng.standard_normal(shape)
    return np.where(x >= 0, x + 0.1, x - 0.1)


def _distinct(rng, *shape):
    """A permutation of ``k / 64``: distinct and exact in bfloat16 too (integers up to 256 are), so no
    max-pool window ever holds a tie in any dtype."""
    n = int(np.prod(shape))
    assert n <= 256, "bfloat16 holds the integers exactly only up to 256"
    return (rng.permutation(n).reshape(shape) - n / 2) / 64.0


# ---------------------------------------------------------------------------------------------------
# The cases


def _conv_case(label: str, x_shape, w_shape, method: str, **kw) -> Case:
    """``conv2d`` and its backward in one formulation: ``jax.vjp`` differentiates the forward the backward
    belongs to."""

    def f(x, w, b):
        return ops.conv2d(x, w, b, method=method, **kw)

    def backward(dy, x, w, b):
        return ops.conv2d_backward(dy, x, w, method=method, **kw)

    return Case(
        "op",
        f"conv2d {label}, method={method}",
        f,
        backward,
        lambda rng: (
            _normal(rng, *x_shape),
            _normal(rng, *w_shape) / np.sqrt(np.prod(w_shape[:3])),
            _normal(rng, w_shape[3]),
        ),
        ("x", "w", "b"),
    )


def _activation_case(name, f, backward, from_output: bool, kink: bool = False) -> Case:
    def bwd(dy, x):
        return (backward(dy, f(x) if from_output else x),)

    return Case(
        "op", name, f, bwd, lambda rng: ((_away_from_zero if kink else _normal)(rng, 4, 10),), ("x",), skip_kinks=kink
    )


def op_cases() -> list[Case]:
    convs = [
        ("3x3 VALID", (2, 7, 7, 3), (3, 3, 3, 4), {}),
        ("3x3 stride 2 pad 1", (2, 8, 8, 3), (3, 3, 3, 4), dict(stride=2, padding=1)),
        ("3x3 dilation 2 SAME", (2, 9, 9, 2), (3, 3, 2, 3), dict(dilation=2, padding="SAME")),
        ("3x3 depthwise (groups 3)", (2, 6, 6, 3), (3, 3, 1, 6), dict(groups=3, padding=1)),
        (
            "2x3 stride (2,1) pad ((1,0),(2,1))",
            (1, 7, 6, 2),
            (2, 3, 2, 3),
            dict(stride=(2, 1), padding=((1, 0), (2, 1))),
        ),
        ("5x5 stride 3 (rows unread)", (2, 10, 10, 1), (5, 5, 1, 2), dict(stride=3)),
    ]
    cases = [_conv_case(label, xs, ws, m, **kw) for label, xs, ws, kw in convs for m in CONV_METHODS]

    def pool(name, op, op_backward, shape, **kw):
        return Case(
            "op",
            name,
            lambda x: op(x, **kw),
            lambda dy, x: (op_backward(dy, x, **kw),),
            lambda rng: (_distinct(rng, *shape),),
            ("x",),
            skip_kinks=op is ops.max_pool2d,
        )

    cases += [
        pool("max_pool2d 2x2", ops.max_pool2d, ops.max_pool2d_backward, (2, 6, 6, 3), window=2),
        pool(
            "max_pool2d 3x3 stride 2 pad 1 (overlapping)",
            ops.max_pool2d,
            ops.max_pool2d_backward,
            (2, 7, 7, 2),
            window=3,
            stride=2,
            padding=1,
        ),
        pool("avg_pool2d 2x2", ops.avg_pool2d, ops.avg_pool2d_backward, (2, 6, 6, 3), window=2),
        pool(
            "avg_pool2d 3x3 stride 2 pad 1, count_include_pad=False",
            ops.avg_pool2d,
            ops.avg_pool2d_backward,
            (2, 7, 7, 2),
            window=3,
            stride=2,
            padding=1,
            count_include_pad=False,
        ),
        Case(
            "op",
            "dense",
            lambda x, w, b: ops.dense(x, w, b),
            lambda dy, x, w, b: ops.dense_backward(dy, x, w),
            lambda rng: (_normal(rng, 4, 10), _normal(rng, 10, 5) / 3, _normal(rng, 5)),
            ("x", "w", "b"),
        ),
        _activation_case("relu", ops.relu, ops.relu_backward, False, kink=True),
        _activation_case("leaky_relu", ops.leaky_relu, ops.leaky_relu_backward, False, kink=True),
        _activation_case("sigmoid", ops.sigmoid, ops.sigmoid_backward, True),
        _activation_case("tanh", ops.tanh, ops.tanh_backward, True),
        _activation_case("softmax", ops.softmax, ops.softmax_backward, True),
        _activation_case("log_softmax", ops.log_softmax, ops.log_softmax_backward, True),
        Case(
            "op",
            "mse",
            ops.mse,
            lambda d, p, t: (ops.mse_backward(d, p, t),),
            lambda rng: (_normal(rng, 8, 1), (rng.random((8, 1)) > 0.5).astype(np.float64)),
            ("pred",),
            argnums=(0,),
        ),
        Case(
            "op",
            "binary_cross_entropy_with_logits",
            ops.binary_cross_entropy_with_logits,
            lambda d, z, y: (ops.binary_cross_entropy_with_logits_backward(d, z, y),),
            lambda rng: (3 * _normal(rng, 8, 1), (rng.random((8, 1)) > 0.5).astype(np.float64)),
            ("logits",),
            argnums=(0,),
        ),
        Case(
            "op",
            "softmax_cross_entropy",
            ops.softmax_cross_entropy,
            lambda d, z, y: (ops.softmax_cross_entropy_backward(d, z, y),),
            lambda rng: (3 * _normal(rng, 8, 10), rng.integers(0, 10, 8).astype(np.int32)),
            ("logits",),
            argnums=(0,),
        ),
    ]
    return cases


def _layer_case(
    name: str,
    layer: L.Layer,
    in_shape,
    *,
    train: bool = False,
    inputs=_normal,
    kink: bool = False,
    state_fn=None,
    float64_reference: bool = True,
) -> Case:
    """A layer checked with respect to its params and its input, like :func:`jaxcnn.gradients.gradcheck_layer`.
    The layer is initialised when the inputs are first drawn (so unused cases cost nothing)."""
    key = jax.random.PRNGKey(7)
    held = {}

    def current_state(dtype):
        return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), held["state"])

    def f(params, x):
        return layer.forward(params, current_state(x.dtype), x, train=train, key=key)[0]

    def backward(dy, params, x):
        _, _, residuals = layer.forward(params, current_state(x.dtype), x, train=train, key=key)
        return layer.backward(params, residuals, dy)

    def make(rng):
        params, state, _ = layer.init(jax.random.PRNGKey(1), in_shape)
        held["state"] = jax.tree_util.tree_map(np.asarray, state_fn(state) if state_fn else state)
        return jax.tree_util.tree_map(np.asarray, params), inputs(rng, *in_shape)

    return Case("layer", name, f, backward, make, ("params", "x"), skip_kinks=kink, float64_reference=float64_reference)


def layer_cases() -> list[Case]:
    img = (2, 6, 6, 3)

    def running(s):
        return {"mean": np.linspace(-0.5, 0.5, 3), "var": np.linspace(0.5, 2.0, 3)}

    cases = [
        _layer_case("Conv2D(4, 3, SAME), method auto (the default)", L.Conv2D(4, 3, padding="SAME"), img),
        _layer_case("BatchNorm (training: batch statistics)", L.BatchNorm(), img, train=True),
    ]
    # A convolution followed by BatchNorm has no bias (as in resnet_small): BatchNorm subtracts the batch mean,
    # so such a bias has an exactly zero gradient and its "relative error" would compare rounding noise.
    block = L.serial(
        L.Conv2D(3, 3, padding="SAME", use_bias=False), L.BatchNorm(), L.Relu(), L.Conv2D(3, 3, padding="SAME")
    )
    project = L.serial(L.Conv2D(6, 1, stride=2, use_bias=False), L.BatchNorm())
    body = L.serial(L.Conv2D(6, 3, stride=2, padding="SAME"), L.Relu(), L.Conv2D(6, 3, padding="SAME"))
    cases += [
        _layer_case(
            "Conv2D(4, 3, stride 2, SAME), method conv", L.Conv2D(4, 3, stride=2, padding="SAME", method="conv"), img
        ),
        _layer_case("Conv2D(4, 3, SAME), method im2col", L.Conv2D(4, 3, padding="SAME", method="im2col"), img),
        _layer_case("Conv2D(4, 3, SAME), method taps", L.Conv2D(4, 3, padding="SAME", method="taps"), img),
        _layer_case("Dense(5)", L.Dense(5), (4, 10)),
        _layer_case("BatchNorm (evaluation: running statistics)", L.BatchNorm(), img, train=False, state_fn=running),
        _layer_case("Dropout(0.3) (training, fixed key)", L.Dropout(0.3), img, train=True, float64_reference=False),
        _layer_case("MaxPool2D(2)", L.MaxPool2D(2), img, inputs=_distinct, kink=True),
        _layer_case("AvgPool2D(2)", L.AvgPool2D(2), img),
        _layer_case("GlobalAvgPool", L.GlobalAvgPool(), img),
        _layer_case("Flatten", L.Flatten(), img),
        _layer_case("Relu", L.Relu(), img, inputs=_away_from_zero, kink=True),
        _layer_case("LeakyRelu(0.01)", L.LeakyRelu(), img, inputs=_away_from_zero, kink=True),
        _layer_case("Sigmoid", L.Sigmoid(), img),
        _layer_case("Tanh", L.Tanh(), img),
        _layer_case("Softmax", L.Softmax(), (4, 10)),
        _layer_case("LogSoftmax", L.LogSoftmax(), (4, 10)),
        _layer_case(
            "Residual (identity shortcut, BatchNorm in the block)", L.Residual(block), img, train=True, kink=True
        ),
        _layer_case(
            "Residual (strided 1x1 projection shortcut)", L.Residual(body, project), img, train=True, kink=True
        ),
    ]
    return cases


# ---------------------------------------------------------------------------------------------------
# Element-wise comparisons in one dtype against float64


def _cast(tree, dtype):
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, dtype) if np.issubdtype(np.asarray(a).dtype, np.floating) else jnp.asarray(a), tree
    )


def _leaves64(tree):
    return [
        np.asarray(jnp.asarray(a, jnp.float32) if a.dtype == jnp.bfloat16 else a, np.float64)
        for a in jax.tree_util.tree_leaves(tree)
    ]


COMPARISONS = ("manual_vs_autodiff", "manual_vs_float64", "autodiff_vs_float64")


def _compare(manual, auto, ref, names) -> dict:
    """Per-array max relative errors (and which array is worst) and every element's relative error (histograms).
    ``names``: one display name per array (leaf) of the cotangents."""
    out = dict.fromkeys(COMPARISONS, 0.0)
    out.update(
        elements=0,
        worst_array=dict.fromkeys(COMPARISONS),
        hist={k: np.zeros(len(BINS) - 1, np.int64) for k in COMPARISONS},
        exact=dict.fromkeys(COMPARISONS, 0),
    )
    for name, m, a, r in zip(names, _leaves64(manual), _leaves64(auto), _leaves64(ref), strict=True):
        for key, got, want in (
            ("manual_vs_autodiff", m, a),
            ("manual_vs_float64", m, r),
            ("autodiff_vs_float64", a, r),
        ):
            scale = np.max(np.abs(want), initial=0.0)
            err = np.abs(got - want) / (scale if scale > 0 else 1.0)
            worst = float(np.max(err, initial=0.0))
            if worst > out[key]:
                out[key], out["worst_array"][key] = worst, f"{name} {tuple(m.shape)}"
            out["exact"][key] += int(np.sum(err == 0))
            out["hist"][key] += np.histogram(np.log10(np.clip(err[err > 0], 10.0 ** BINS[0], None)), BINS)[0]
        out["elements"] += m.size
    return out


def elementwise(f, backward, primals, argnums, dtype, seed: int, names=None) -> dict:
    """Manual and autodiff cotangents in ``dtype``; the reference is ``jax.vjp`` in float64 on the same
    (``dtype``-rounded) inputs and cotangent."""
    with jax.enable_x64(jnp.dtype(dtype) == jnp.float64):
        return _elementwise(f, backward, primals, argnums, dtype, seed, names)


def _elementwise(f, backward, primals, argnums, dtype, seed: int, names) -> dict:
    argnums = tuple(range(len(primals))) if argnums is None else tuple(argnums)
    names = _arg_names(tuple(primals[i] for i in argnums), names or [f"arg{i}" for i in argnums])
    low = _cast(primals, dtype)

    def vjp_of(prims):
        def g(*diff):
            args = list(prims)
            for i, d in zip(argnums, diff, strict=True):
                args[i] = d
            return f(*args)

        return jax.vjp(g, *(prims[i] for i in argnums))[1]

    def both(prims, dy):
        return tuple(backward(dy, *prims)), vjp_of(prims)(dy)

    rng = np.random.default_rng([seed, 2])  # neither the inputs' stream nor gradcheck's: dy must not equal an input
    y = jax.eval_shape(lambda prims: f(*prims), low)
    dy = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), y)
    manual, auto = jax.jit(both)(low, dy)
    with jax.enable_x64(True):
        ref = jax.jit(lambda prims, dy: vjp_of(prims)(dy))(
            _cast(_exact(low), jnp.float64), _cast(_exact(dy), jnp.float64)
        )
        return _compare(manual, auto, ref, names)


def _without_reference(cmp: dict) -> dict:
    """``cmp`` with its comparisons against float64 emptied (kept: manual vs autodiff)."""
    out = dict(cmp, hist=dict(cmp["hist"]), exact=dict(cmp["exact"]))
    for key in ("manual_vs_float64", "autodiff_vs_float64"):
        out[key] = None
        out["hist"][key] = np.zeros_like(cmp["hist"][key])
        out["exact"][key] = 0
    return out


def _arg_names(tree, names) -> list[str]:
    """``x``, ``params['w']``...: one name per leaf of a tuple of cotangents, from the arguments' names."""
    return [names[p[0].idx] + jax.tree_util.keystr(p[1:]) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _param_names(model, params) -> list[str]:
    """``Conv2D(6, kernel=5)['w']``...: one name per parameter array of a serial model."""
    return [
        model.children[p[0].idx].name + jax.tree_util.keystr(p[1:]) if model.children else jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
    ]


def _exact(tree):
    """NumPy copies holding exactly the values of ``tree`` (bfloat16 goes through float32, which holds it)."""
    return jax.tree_util.tree_map(
        lambda a: np.asarray(jnp.asarray(a, jnp.float32) if a.dtype == jnp.bfloat16 else a), tree
    )


# ---------------------------------------------------------------------------------------------------
# Models


def model_elementwise(name: str, dtype: str, seed: int, batch: int = 4) -> dict:
    """Parameter gradients of model + loss: manual and autodiff (same forward) in ``dtype`` vs autodiff in float64.

    bfloat16 runs as training does (:func:`jaxcnn.train.step.compute_network`): bfloat16 weights and
    activations, outputs cast to float32 for the loss. Also returns ``manual_vs_autodiff_lax`` and
    ``autodiff_lax_vs_float64``: the second witness, the ``"autodiff"`` route (``jax.grad`` of the ``lax``
    forward pass) in ``dtype``."""
    with jax.enable_x64(dtype == "float64"):
        return _model_elementwise(name, dtype, seed, batch)


def _max_relative(got, want) -> float:
    """The largest ``max|g - w| / max|w|`` over the arrays of two gradients (both as float64)."""
    worst = 0.0
    for g, w in zip(_leaves64(got), _leaves64(want), strict=True):
        scale = np.max(np.abs(w), initial=0.0)
        worst = max(worst, float(np.max(np.abs(g - w), initial=0.0) / (scale if scale > 0 else 1.0)))
    return worst


def _model_elementwise(name: str, dtype: str, seed: int, batch: int) -> dict:
    from jaxcnn.train.step import compute_network

    spec = get_model(name)
    model = spec.build()
    key = jax.random.PRNGKey(seed)
    params, state, _ = model.init(key, spec.input_shape)
    rng = np.random.default_rng([seed, 3])
    images = rng.random((batch, *spec.input_shape[1:]))
    labels = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    dropout = jax.random.fold_in(key, 3)
    target = spec.targets(labels)  # float32 (N, 1) for seed_net's "digit > 4", int32 labels otherwise
    floating = jnp.issubdtype(target.dtype, jnp.floating)
    network = compute_network(model, "bfloat16") if dtype == "bfloat16" else model
    p, s, x = _cast(params, dtype), _cast(state, dtype), jnp.asarray(images, dtype)
    t = target.astype(dtype) if floating and dtype != "bfloat16" else target

    def jitted_grad(vg):
        """The parameter gradient of the value-and-grad function ``vg`` in training mode, jitted."""
        return jax.jit(lambda p, s, x, t: vg(p, s, x, t, train=True, key=dropout)[1])

    grads = {}
    for route in ("manual", "autodiff_same_forward", "autodiff"):
        grads[route] = jitted_grad(gradients.value_and_grad(network, spec.loss, route))(p, s, x, t)
    with jax.enable_x64(True):  # the reference: autodiff of the same forward in float64 on exactly the same values
        vg64 = gradients.value_and_grad(model, spec.loss, "autodiff_same_forward")
        p64, s64, x64 = (_cast(_exact(v), jnp.float64) for v in (p, s, x))
        t64 = target.astype(jnp.float64) if floating else target
        ref = jitted_grad(vg64)(p64, s64, x64, t64)
        out = _compare(grads["manual"], grads["autodiff_same_forward"], ref, _param_names(model, params))
        out["manual_vs_autodiff_lax"] = _max_relative(grads["manual"], grads["autodiff"])
        out["autodiff_lax_vs_float64"] = _max_relative(grads["autodiff"], ref)
        return out


# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    cases: tuple = ()  # names of the op and layer cases to run (empty: all)
    models: tuple = tuple(MODELS)
    model_dtypes: tuple = DTYPES  # dtypes in which the zoo models are checked
    seed: int = 0


SMOKE = dict(
    cases=("conv2d 3x3 stride 2 pad 1, method=im2col", "softmax_cross_entropy"),
    models=("seed_net",),
    model_dtypes=("bfloat16",),
)


def make_config(smoke: bool = False, **overrides) -> Config:
    return Config(**{**(SMOKE if smoke else {}), **overrides})


def _gradcheck_row(result) -> dict:
    fd_ad = max((r.autodiff_vs_finite_difference for r in result.rows), default=0.0)
    w = result.worst
    return {
        "manual_vs_autodiff": w.autodiff,
        "manual_vs_fd": w.finite_difference,
        "autodiff_vs_fd": fd_ad,
        "adjoint": result.adjoint,
        "ok": result.ok,
        "failures": result.failures,
        "arrays": [dict(r._asdict()) for r in result.rows],
    }


def run(out_dir, *, smoke: bool = False, command: str | None = None, log=None, **overrides) -> dict:
    config = make_config(smoke, **overrides)
    log = log or common.logger(NAME)
    out = common.out_dir(out_dir)
    env = common.environment(command or f"gradient_report.run(smoke={smoke}, {overrides})")
    rows: list[dict] = []
    hist = {
        d: {
            k: np.zeros(len(BINS) - 1, np.int64)
            for k in ("manual_vs_autodiff", "manual_vs_float64", "autodiff_vs_float64")
        }
        for d in DTYPES
    }
    exact = {d: dict.fromkeys(("manual_vs_autodiff", "manual_vs_float64", "autodiff_vs_float64"), 0) for d in DTYPES}
    elements = dict.fromkeys(DTYPES, 0)

    def add_hist(dtype, cmp):
        for k in hist[dtype]:
            hist[dtype][k] += cmp["hist"][k]
            exact[dtype][k] += cmp["exact"][k]
        elements[dtype] += cmp["elements"]

    cases = op_cases() + layer_cases()
    if config.cases:
        cases = [c for c in cases if c.name in config.cases]
    log(f"{len(cases)} op and layer cases, {len(config.models)} models; dtypes {', '.join(DTYPES)}")
    for i, case in enumerate(cases):
        t0 = time.perf_counter()
        # Inputs from their own stream. NumPy seeds ``s`` and ``(s, 0)`` give the same numbers, and gradcheck draws
        # its cotangent from ``(seed, 0)``: seeding the inputs with ``seed`` would make the cotangent equal an input.
        rng = np.random.default_rng([config.seed, 1000 + i])
        values = case.inputs(rng)
        line = []
        for dtype in DTYPES:
            if dtype == "bfloat16" and not case.bfloat16:
                continue
            row = {"kind": case.kind, "case": case.name, "dtype": dtype}
            if dtype == "bfloat16":
                cmp = elementwise(
                    case.f, case.backward, values, case.argnums, jnp.bfloat16, config.seed + i, case.names
                )
                tol = 3e-2  # a few bfloat16 roundings (2^-8 = 3.9e-3 each), relative to the array's scale
                row.update({k: cmp[k] for k in COMPARISONS}, worst_array=cmp["worst_array"])
                row["ok"] = cmp["manual_vs_float64"] <= max(tol, 2 * cmp["autodiff_vs_float64"])
            else:
                with jax.enable_x64(dtype == "float64"):
                    primals = _cast(values, jnp.float64 if dtype == "float64" else jnp.float32)
                    result = gradcheck(
                        case.f,
                        case.backward,
                        primals,
                        argnums=case.argnums,
                        names=case.names,
                        name=case.name,
                        seed=config.seed + i,
                        skip_kinks=case.skip_kinks,
                        raise_on_failure=False,
                    )
                row.update(_gradcheck_row(result))
                cmp = elementwise(
                    case.f,
                    case.backward,
                    values,
                    case.argnums,
                    jnp.float64 if dtype == "float64" else jnp.float32,
                    config.seed + i,
                    case.names,
                )
                row["manual_vs_float64"], row["autodiff_vs_float64"] = (
                    cmp["manual_vs_float64"],
                    cmp["autodiff_vs_float64"],
                )
            if not case.float64_reference:
                cmp = _without_reference(cmp)
                row.update(manual_vs_float64=None, autodiff_vs_float64=None, worst_array=None)
                row["ok"] = row["manual_vs_autodiff"] <= (3e-2 if dtype == "bfloat16" else 1.0) and row["ok"]
            add_hist(dtype, cmp)
            rows.append(row)
            line.append(f"{dtype} {common.sci(row['manual_vs_autodiff'])}{'' if row['ok'] else ' FAIL'}")
        log(
            f"[{i + 1}/{len(cases)}] {case.kind} {case.name}: manual vs autodiff "
            + ", ".join(line)
            + f"  ({time.perf_counter() - t0:.1f} s)"
        )

    for name in config.models:
        for dtype in config.model_dtypes:
            t0 = time.perf_counter()
            row = {"kind": "model", "case": name, "dtype": dtype}
            try:
                if dtype == "bfloat16":
                    cmp = model_elementwise(name, dtype, config.seed)
                    row.update({k: cmp[k] for k in COMPARISONS}, worst_array=cmp["worst_array"])
                    row["ok"] = cmp["manual_vs_float64"] <= max(3e-2, 2 * cmp["autodiff_vs_float64"])
                    row["manual_vs_autodiff_lax"] = cmp["manual_vs_autodiff_lax"]
                    row["autodiff_lax_vs_float64"] = cmp["autodiff_lax_vs_float64"]
                else:
                    results = check_model(name, dtype=dtype, seed=config.seed)
                    worst = [_gradcheck_row(r) for r in results]
                    row.update(
                        {
                            k: max(w[k] for w in worst)
                            for k in ("manual_vs_autodiff", "manual_vs_fd", "autodiff_vs_fd", "adjoint")
                        }
                    )
                    row["ok"] = all(r.ok for r in results)
                    row["failures"] = [f"{r.name}: {f}" for r in results for f in r.failures]
                    row["checks"] = [{"name": r.name, **_gradcheck_row(r)} for r in results]
                    cmp = model_elementwise(name, dtype, config.seed)
                    row["manual_vs_float64"], row["autodiff_vs_float64"] = (
                        cmp["manual_vs_float64"],
                        cmp["autodiff_vs_float64"],
                    )
                    row["manual_vs_autodiff_lax"] = cmp["manual_vs_autodiff_lax"]
                    row["autodiff_lax_vs_float64"] = cmp["autodiff_lax_vs_float64"]
                    if not cmp["manual_vs_autodiff_lax"] <= LAX_TOLERANCE[dtype]:
                        row["ok"] = False
                        row["failures"].append(
                            f"{name}: manual vs autodiff (lax forward) "
                            f"{cmp['manual_vs_autodiff_lax']:.1e} > {LAX_TOLERANCE[dtype]:.0e}"
                        )
                add_hist(dtype, cmp)
            except Exception as error:  # a model that cannot even be built or run is reported, not hidden
                row.update({"ok": False, "error": f"{type(error).__name__}: {error}"})
                log(f"model {name} [{dtype}] raised {type(error).__name__}: {error}")
            rows.append(row)
            extra = f", {len(row.get('checks', []))} checks (each layer, then model + loss)" if "checks" in row else ""
            log(
                f"model {name} [{dtype}]: manual vs autodiff {common.sci(row.get('manual_vs_autodiff'))}, "
                f"vs autodiff (lax forward) {common.sci(row.get('manual_vs_autodiff_lax'))}"
                f"{extra}{'' if row['ok'] else '  FAIL'}  ({time.perf_counter() - t0:.1f} s)"
            )

    failed = [f"{r['case']} [{r['dtype']}]" for r in rows if not r["ok"]]
    summary = {
        "experiment": NAME,
        "environment": env,
        "config": dataclasses.asdict(config),
        "failed": failed,
        "rows": rows,
        "elementwise": {
            d: {"elements": elements[d], "exactly_equal": exact[d], "log10_bins": BINS, "counts": hist[d]}
            for d in DTYPES
        },
    }
    common.write_json(out / f"{NAME}.json", summary)
    common.write_csv(
        out / f"{NAME}.csv",
        rows,
        [
            "kind",
            "case",
            "dtype",
            "manual_vs_autodiff",
            "manual_vs_fd",
            "autodiff_vs_fd",
            "adjoint",
            "manual_vs_float64",
            "autodiff_vs_float64",
            "manual_vs_autodiff_lax",
            "autodiff_lax_vs_float64",
            "ok",
        ],
    )
    (out / f"{NAME}.md").write_text(_markdown(summary))
    log(f"{len(rows) - len(failed)}/{len(rows)} checks pass; wrote {NAME}.md, {NAME}.json, {NAME}.csv")
    plt = common.pyplot(log)
    if plt is not None:
        _histogram(plt, out, summary, log)
    return summary


def _markdown(s: dict) -> str:
    rows, env = s["rows"], s["environment"]
    lines = [
        "# Gradient agreement: manual vs autodiff vs finite differences\n",
        f"Command: `{env['command']}` ({env['date_utc']}, jax {env['jax']}, {env['platform']}).\n",
        "Every number is a maximum relative error `max |a − b| / max |b|` over an array, maximised over the arrays "
        "(inputs and parameters) of the case. **manual** is the library's hand-written backward, **autodiff** is "
        "`jax.vjp` of the very same forward pass, same formulation (both computed in the table's dtype; the route "
        "`autodiff_same_forward` of `jaxcnn.gradients.value_and_grad`). Convolutions run in each formulation "
        "(`method`), forward and backward alike. **FD**: central finite differences "
        "in float64 on the same inputs, against the backward evaluated in float64 — they check the formula; the "
        "dtype's rounding shows in the other columns. **adjoint**: `|<backward(dy), v> − <dy, J v>|` relative, with "
        "`J v` from forward mode. **vs float64**: against `jax.vjp` in float64 on exactly the same (dtype-rounded) "
        "inputs and cotangent, i.e. the error the dtype's arithmetic adds. **autodiff (lax)**, zoo models only: a "
        "second witness, `jax.grad` of the forward pass an autodiff user writes (`lax` convolutions; the route "
        "`autodiff` that `jaxcnn train --grad autodiff` trains with), which computes the same function in another "
        "formulation.\n",
    ]
    n_fail = len(s["failed"])
    lines.append(
        f"**{len(rows) - n_fail} of {len(rows)} checks pass**"
        + (f"; failing: {', '.join(s['failed'])}" if n_fail else "")
        + ". Tolerances: float64 1e-12 vs autodiff (either witness) and 1e-6 vs FD; float32 1e-5 vs autodiff, "
        "1e-4 vs autodiff (lax); bfloat16: the manual gradient's distance to float64 within 3e-2 or twice "
        "autodiff's.\n"
    )
    lines.append("## Summary by kind and dtype (worst case)\n")
    summary_rows = []
    for kind in ("op", "layer", "model"):
        for dtype in DTYPES:
            sel = [r for r in rows if r["kind"] == kind and r["dtype"] == dtype and "error" not in r]
            if not sel:
                continue

            def worst(key, sel=sel):
                vals = [r[key] for r in sel if r.get(key) is not None]
                return common.sci(max(vals)) if vals else "—"

            summary_rows.append(
                [
                    kind,
                    dtype,
                    len(sel),
                    sum(r["ok"] for r in sel),
                    worst("manual_vs_autodiff"),
                    worst("manual_vs_autodiff_lax"),
                    worst("manual_vs_fd"),
                    worst("autodiff_vs_fd"),
                    worst("manual_vs_float64"),
                    worst("autodiff_vs_float64"),
                ]
            )
    lines.append(
        common.markdown_table(
            [
                "kind",
                "dtype",
                "cases",
                "pass",
                "manual vs autodiff",
                "manual vs autodiff (lax)",
                "manual vs FD",
                "autodiff vs FD",
                "manual vs float64",
                "autodiff vs float64",
            ],
            summary_rows,
            "llrrrrrrrr",
        )
    )
    for dtype in DTYPES:
        sel = [r for r in rows if r["dtype"] == dtype]
        if not sel:
            continue
        lines.append(f"\n## {dtype}\n")
        if dtype == "bfloat16":
            lines.append(
                common.markdown_table(
                    [
                        "kind",
                        "case",
                        "manual vs autodiff",
                        "manual vs float64",
                        "autodiff vs float64",
                        "autodiff (lax) vs float64",
                        "worst array: manual; autodiff",
                        "ok",
                    ],
                    [
                        [
                            r["kind"],
                            r["case"],
                            common.sci(r.get("manual_vs_autodiff")),
                            common.sci(r.get("manual_vs_float64")),
                            common.sci(r.get("autodiff_vs_float64")),
                            common.sci(r.get("autodiff_lax_vs_float64")),
                            "; ".join(
                                f"`{(r.get('worst_array') or {}).get(k)}`"
                                for k in ("manual_vs_float64", "autodiff_vs_float64")
                            ),
                            "✓" if r["ok"] else f"✗ {r.get('error', '')}",
                        ]
                        for r in sel
                    ],
                    "llrrrrll",
                )
            )
            lines.append(
                "\nbfloat16 keeps 8 significant bits (unit roundoff 2⁻⁸ ≈ 3.9e-3). The largest errors are in "
                "gradients that are long sums — a kernel or bias gradient sums over the batch and every output "
                "position — and how large they get depends on how XLA accumulates that sum, which differs "
                "between the hand-written kernel gradient and the one `jax.vjp` derives from the same forward "
                "pass. The worst-array column names the worst array of each path.\n"
            )
        else:
            lines.append(
                common.markdown_table(
                    [
                        "kind",
                        "case",
                        "manual vs autodiff",
                        "manual vs autodiff (lax)",
                        "manual vs FD",
                        "autodiff vs FD",
                        "adjoint",
                        "manual vs float64",
                        "ok",
                    ],
                    [
                        [
                            r["kind"],
                            r["case"] + (f" ({len(r['checks'])} checks)" if "checks" in r else ""),
                            common.sci(r.get("manual_vs_autodiff")),
                            common.sci(r.get("manual_vs_autodiff_lax")),
                            common.sci(r.get("manual_vs_fd")),
                            common.sci(r.get("autodiff_vs_fd")),
                            common.sci(r.get("adjoint")),
                            common.sci(r.get("manual_vs_float64")),
                            "✓" if r["ok"] else "✗ " + (r.get("error") or "; ".join(r.get("failures", []))),
                        ]
                        for r in sel
                    ],
                    "llrrrrrrl",
                )
            )
    lines.append(
        "\nA model's row is the worst over its checks: each top-level layer on a random input of the shape it "
        "receives in the model, then the whole model with its loss (`jaxcnn.modelcheck.check_model`; "
        "`jaxcnn gradcheck --model NAME` prints them one by one). Its float64 and autodiff (lax) comparisons "
        "are of the parameter gradients of model + loss. The zoo models are built with their default "
        "convolution formulation (`auto`).\n"
    )
    e = s["elementwise"]
    lines.append("\n## Element-wise (the histogram figure)\n")
    lines.append(
        common.markdown_table(
            ["dtype", "gradient elements", "manual = autodiff exactly", "median manual vs autodiff (nonzero)", "p99"],
            [
                [
                    d,
                    f"{e[d]['elements']:,}",
                    f"{e[d]['exactly_equal']['manual_vs_autodiff']:,}",
                    _quantile(e[d]["counts"]["manual_vs_autodiff"], 0.5),
                    _quantile(e[d]["counts"]["manual_vs_autodiff"], 0.99),
                ]
                for d in DTYPES
                if e[d]["elements"]
            ],
            "lrrrr",
        )
    )
    return "\n".join(lines)


def _quantile(counts, q: float) -> str:
    """The ``q`` quantile of the binned errors, as the bin's centre (``2e-08``)."""
    counts = np.asarray(counts)
    if counts.sum() == 0:
        return "—"
    k = int(np.searchsorted(np.cumsum(counts), q * counts.sum()))
    return f"{10 ** (BINS[k] + (BINS[1] - BINS[0]) / 2):.0e}"


def _histogram(plt, out: Path, s: dict, log) -> None:
    e = s["elementwise"]
    dtypes = [d for d in DTYPES if e[d]["elements"]]
    fig, axes = plt.subplots(1, len(dtypes), figsize=(4.3 * len(dtypes), 3.8), sharey=True, squeeze=False)
    styles = {
        "manual_vs_autodiff": ("manual vs autodiff", "#9467bd", "-"),
        "manual_vs_float64": ("manual vs float64", common.COLORS["manual"], "-"),
        "autodiff_vs_float64": ("autodiff vs float64", common.COLORS["autodiff"], "--"),
    }
    eps = {"float64": 2.0**-53, "float32": 2.0**-24, "bfloat16": 2.0**-8}
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        for key, (label, color, ls) in styles.items():
            if dtype == "float64" and key != "manual_vs_autodiff":
                continue  # in float64 the reference *is* autodiff
            counts = np.asarray(e[dtype]["counts"][key])
            ax.stairs(
                np.maximum(counts, 0.8),
                BINS,
                color=color,
                ls=ls,
                lw=1.6,
                label=f"{label} ({e[dtype]['exactly_equal'][key]:,} exact)",
            )
        ax.axvline(np.log10(eps[dtype]), color="k", ls=":", lw=1)
        ax.text(
            np.log10(eps[dtype]) + 0.2,
            0.97,
            {"float64": "2⁻⁵³", "float32": "2⁻²⁴", "bfloat16": "2⁻⁸"}[dtype],
            transform=ax.get_xaxis_transform(),
            va="top",
            ha="left",
            fontsize=9,
        )
        ax.set_yscale("log")
        ax.set_xlim(-18, 0.5)
        ax.set(
            xlabel="log10 of |g − g_ref| / max |g_ref|", title=f"{dtype}: {e[dtype]['elements']:,} gradient elements"
        )
        ax.legend(loc="center right" if dtype == "float64" else "upper left", fontsize=7.5)
    top = max(max(np.max(e[d]["counts"][k]) for k in styles) for d in dtypes)
    axes[0][0].set_ylim(0.8, top * 4)
    axes[0][0].set_ylabel("number of elements")
    fig.suptitle(
        "Element-wise gradient errors over every op, layer and model case "
        "(dotted: the dtype's unit roundoff; exact zeros counted in the legend)",
        y=1.0,
    )
    fig.tight_layout()
    common.save_figure(fig, out / f"{NAME}_histogram.png", log)


def main(argv=None) -> int:
    parser = common.base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="*", default=None, help=f"zoo models to check (default: all, {', '.join(MODELS)})"
    )
    args = parser.parse_args(argv)
    overrides = {"seed": args.seed}
    if args.models is not None:
        overrides["models"] = tuple(args.models)
    summary = run(args.out, smoke=args.smoke, command=common.command_line(NAME, argv), **overrides)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
