"""The ``ops`` section: each op of the zoo models at its real shape, hand-written against ``jax.vjp``.

Every benchmarked op is a layer of the zoo model itself, recognised by its shapes: a convolution has a
4-D kernel ``"w"``, a dense layer a 2-D one, a pooling layer no parameters and a smaller output of the
same channels. For a convolution: the forward in each formulation of :mod:`jaxcnn.ops.conv` against
``lax``'s (the layer's :func:`~jaxcnn.layers.autodiff_forward`), the kernel gradient ``dw`` and the input
gradient ``dx`` of the layer's hand-written backward in each formulation against ``jax.vjp`` of that
forward; for pooling and dense layers, the hand-written backward against ``jax.vjp``. Each runs standalone
(``jit``) and inside ``lax.scan`` (``[scan]``), where XLA:CPU compiles some convolutions differently.
"""

from __future__ import annotations

import collections
import math

from jaxcnn.bench.config import BenchConfig
from jaxcnn.bench.flops import kernel_of, layers_with_shapes
from jaxcnn.bench.harness import Contender, compile_with, family_ratios, measure


def _scanned(op):
    """``op`` applied to each of ``S`` stacked argument sets inside ``lax.scan`` (the training loop's setting).

    The result is carried from iteration to iteration (as a train step carries its parameters), not
    stacked as the scan's output: XLA:CPU fuses producers into the in-place update of a stacked output,
    which emits them far slower and would measure that instead of the op.
    """
    import jax
    import jax.numpy as jnp

    def run(*stacked):
        shapes = jax.eval_shape(op, *jax.tree_util.tree_map(lambda a: a[0], stacked))
        init = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return jax.lax.scan(lambda carry, args: (op(*args), None), init, stacked)[0]

    return run


def layer_kind(params, in_shape, out_shape) -> str | None:
    """``"conv"``, ``"dense"``, ``"pool"`` or ``None`` (not benchmarked), from the layer's shapes alone."""
    import jax

    w = kernel_of(params)
    if w is not None:
        return "conv" if w.ndim == 4 else "dense"
    same_channels = len(in_shape) == len(out_shape) == 4 and in_shape[3] == out_shape[3]
    # Shapes of different rank (Flatten) compare their common leading sizes only; same_channels rules them out.
    smaller = (
        all(o <= i for o, i in zip(out_shape[1:3], in_shape[1:3], strict=False)) and out_shape[1:3] != in_shape[1:3]
    )
    if not jax.tree_util.tree_leaves(params) and same_channels and smaller:
        return "pool"
    return None


def _grad_fns(layer, state):
    """``(manual, autodiff)``: ``f(dy, x, params) -> (grads, dx)`` by the layer's hand-written backward
    (after the forward it needs) and by ``jax.vjp`` of its autodiff forward."""
    import jax

    from jaxcnn.layers import autodiff_forward

    def manual(dy, x, params):
        residuals = layer.forward(params, state, x, train=True)[2]
        return layer.backward(params, residuals, dy)

    def autodiff(dy, x, params):
        _, vjp = jax.vjp(lambda p, x: autodiff_forward(layer)(p, state, x, train=True)[0], params, x)
        return vjp(dy)

    return manual, autodiff


def _kernel_and_input_grads(grad_fn):
    """``f(dy, x, params) -> (dw, dx)`` of a ``(grads, dx)`` function of :func:`_grad_fns`."""

    def f(dy, x, params):
        grads, dx = grad_fn(dy, x, params)
        return grads["w"], dx

    return f


def _forward_of(layer, state):
    """``f(x, params) -> y``: the layer's hand-written forward in training mode with model state ``state``."""
    return lambda x, p: layer.forward(p, state, x, train=True)[0]


def bench_ops(cfg: BenchConfig, opts: dict, log) -> tuple[list[dict], dict]:
    import jax
    import jax.numpy as jnp

    from jaxcnn.layers import autodiff_forward
    from jaxcnn.models import get_model
    from jaxcnn.ops.conv import METHODS

    formulations = [m for m in METHODS if m != "auto"]  # "auto" picks one of these per shape
    records, ratios = [], {}
    S = 2 if cfg.quick else 4  # ops per scan call
    key = iter(jax.random.split(jax.random.PRNGKey(0), 1000))

    def rnd(shape):
        return jax.random.normal(next(key), shape, jnp.float32)

    def run(benchmark, variants, args, flops=None):
        """``variants``: ``[(name, family, fn, info)]`` of ops on the pytree of arrays ``args``."""
        for structure in ("jit",) if cfg.quick else ("jit", "scan"):
            call_args, work = args, 1
            if structure == "scan":
                call_args = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (S, *a.shape)) + 0, args)
                work = S
            contenders = []
            for name, family, fn, info in variants:
                for oname, o in opts.items():
                    compiled = compile_with(_scanned(fn) if structure == "scan" else fn, call_args, o)
                    contenders.append(
                        Contender(
                            f"{name}[{oname}]",
                            family,
                            lambda c=compiled, a=call_args: jax.block_until_ready(c(*a)),  # type: ignore[misc]  # mypy cannot type a default-bound lambda
                            work,
                            {**info, "options": oname, "structure": structure},
                        )
                    )
            bname = f"{benchmark}[scan]" if structure == "scan" else benchmark
            recs = measure(bname, contenders, cfg, log)
            if flops:
                for r in recs:
                    if r.get("median_ms"):
                        r["gflops"] = flops / (r["median_ms"] * 1e-3) / 1e9
            records.extend(recs)
            ratios[bname] = family_ratios(recs, dens=("autodiff",))

    for model_name in cfg.models[:1] if cfg.quick else cfg.models:
        spec = get_model(model_name)
        batch = cfg.batch_of(model_name)
        builds = {m: spec.build(conv_method=m) for m in formulations}  # the same layers, one per formulation
        counts: collections.Counter[str] = collections.Counter()
        for i, layer, params, state, xs, ys in layers_with_shapes(builds["conv"], (batch, *spec.input_shape[1:])):
            kind = layer_kind(params, xs, ys)
            if kind is None:
                continue
            counts[kind] += 1
            lname = f"{model_name}.{kind}{counts[kind]}"
            params = jax.tree_util.tree_map(lambda a: rnd(a.shape), params)
            state = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), state)
            x, dy = rnd(xs), rnd(ys)
            info = {"layer": layer.name, "x_shape": list(xs), "y_shape": list(ys)}
            if kind == "conv":
                ws = tuple(params["w"].shape)
                info["w_shape"] = list(ws)
                flops = 2 * math.prod(ys) * math.prod(ws[:3])
                of = {m: builds[m].children[i] for m in formulations}

                lax_fwd = autodiff_forward(layer)
                fwd = [
                    ("autodiff:lax.conv", "autodiff", lambda x, p, f=lax_fwd, s=state: f(p, s, x, train=True)[0], info)
                ]
                fwd += [
                    (f"manual:{m}", "manual", _forward_of(of[m], state), {**info, "formulation": m})
                    for m in formulations
                    if m != "conv"
                ]  # the "conv" formulation's forward is lax's
                run(f"op/conv_fwd/{lname}", fwd, (x, params), flops)
                if cfg.quick:  # one forward benchmark is enough for a smoke test
                    continue
                grads = {m: _kernel_and_input_grads(_grad_fns(of[m], state)[0]) for m in formulations}
                auto = _kernel_and_input_grads(_grad_fns(of["conv"], state)[1])
                dw = [("autodiff:jax.vjp", "autodiff", lambda dy, x, p, f=auto: f(dy, x, p)[0], info)]
                dw += [
                    (f"manual:{m}", "manual", lambda dy, x, p, f=grads[m]: f(dy, x, p)[0], {**info, "formulation": m})
                    for m in formulations
                ]
                run(f"op/conv_dw/{lname}", dw, (dy, x, params), flops)
                if i > 0:  # the first layer's dx is never needed (and never computed under jit)
                    dx = [("autodiff:jax.vjp", "autodiff", lambda dy, x, p, f=auto: f(dy, x, p)[1], info)]
                    dx += [
                        (
                            f"manual:{m}",
                            "manual",
                            lambda dy, x, p, f=grads[m]: f(dy, x, p)[1],
                            {**info, "formulation": m},
                        )
                        for m in formulations
                    ]
                    run(f"op/conv_dx/{lname}", dx, (dy, x, params), flops)
            elif cfg.quick:
                continue
            elif kind == "pool":
                manual, auto = _grad_fns(layer, state)
                run(
                    f"op/pool_bwd/{lname}",
                    [
                        ("autodiff:jax.vjp", "autodiff", lambda dy, x, p, f=auto: f(dy, x, p)[1], info),
                        ("manual", "manual", lambda dy, x, p, f=manual: f(dy, x, p)[1], info),
                    ],
                    (dy, x, params),
                )
            elif params["w"].size >= 10_000:  # dense; the tiny ones are not worth a benchmark
                manual, auto = (_kernel_and_input_grads(f) for f in _grad_fns(layer, state))
                info["w_shape"] = list(params["w"].shape)
                run(
                    f"op/dense_bwd/{lname}",
                    [("autodiff:jax.vjp", "autodiff", auto, info), ("manual", "manual", manual, info)],
                    (dy, x, params),
                    4 * xs[0] * params["w"].size,
                )
    return records, ratios
