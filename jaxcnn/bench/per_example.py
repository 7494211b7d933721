"""Section ``per_example``: per-example gradient norms and a DP-SGD step, hand-written against ``vmap(jax.grad)``.

For each zoo model (``--quick``: the first, a smoke test of the section), at its benchmark batch size:

* ``norms/<model>``: every example's gradient norm. ``manual`` is
  :func:`jaxcnn.gradients.per_example_grad_norms` (one forward pass, the layers' norm rules: dense
  ``‖x_n‖²‖dy_n‖²``, conv ghost norm or per-example kernel gradient); ``vmap_grad`` is how a JAX user gets
  them, ``jax.vmap`` of ``jax.grad`` of one example's loss through the lax forward (the JAX and optax DP-SGD
  examples), then the norms of those gradients.
* ``dp_step/<model>``: one DP-SGD training step, clip 1 and noise multiplier 1.1. ``manual`` is
  :func:`jaxcnn.train.step.train_step` with ``dp_clip`` (what ``jaxcnn train --dp-clip`` runs), called per
  step and scanned as training runs it; ``vmap_grad`` is the optax way: per-example gradients by
  ``vmap(jax.grad)`` fed to ``optax.contrib.differentially_private_aggregate`` chained with the same
  optimiser, jitted per step.

* ``conv_grads/<model>``: each convolution's per-example kernel gradients alone
  (:func:`jaxcnn.per_example.conv2d_per_example_grads`) in both formulations, ``taps[<layer>]`` and
  ``im2col[<layer>]``, at the layer's shapes, under the first option set, reported per layer as
  ``taps/im2col`` (``method="auto"`` picks one per layer: :func:`jaxcnn.per_example.conv2d_grads_method`).

Both contenders of a benchmark are alternated round by round (:func:`jaxcnn.bench.harness.measure`); the
ratio ``manual/vmap_grad`` is the median of per-round ratios, and memory is XLA's compiled memory analysis.
Opacus, the PyTorch peer, is timed when installed (its ``GradSampleModule`` with the same network, batch
and clipping; ghost clipping where its version offers it).
"""

from __future__ import annotations

import functools
import time

from jaxcnn.bench.config import LR, BenchConfig
from jaxcnn.bench.harness import (
    Contender,
    best_of,
    compare,
    compile_with,
    function_name,
    loop_and_scan,
    measure,
    memory_bytes,
    round_ratio,
)

DP_CLIP, DP_NOISE = 1.0, 1.1  # TensorFlow Privacy's MNIST tutorial settings
FAMILIES = ("manual", "vmap_grad", "opacus")


def vmap_grad_per_example(model, loss):
    """``grads(params, state, x, target) -> per-example gradients``: ``vmap`` over examples of ``jax.grad`` of
    one example's loss through :func:`jaxcnn.layers.autodiff_forward` (a batch of one; evaluation-mode
    state, as per-example gradients require)."""
    import jax

    from jaxcnn.layers import autodiff_forward

    forward = autodiff_forward(model)

    def one(params, state, x, target):
        pred, _, _ = forward(params, state, x[None], train=True)
        return loss.value(pred, target[None])

    return jax.vmap(jax.grad(one), in_axes=(None, None, 0, 0))


def vmap_grad_norms(model, loss):
    """``norms(params, state, x, target) -> (N,)`` from :func:`vmap_grad_per_example`."""
    import jax
    import jax.numpy as jnp

    grads_of = vmap_grad_per_example(model, loss)

    def norms(params, state, x, target):
        grads = grads_of(params, state, x, target)
        sq = sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in jax.tree_util.tree_leaves(grads))
        return jnp.sqrt(sq)

    return norms


def vmap_grad_dp_step(model, loss, tx, *, clip: float = DP_CLIP, noise: float = DP_NOISE):
    """``(init, step)``: a DP-SGD step as the optax examples write it, ``step(state, x, target, key) ->
    (state, {})`` with ``state = (params, model_state, opt_state)`` (the signature of a train step; the noise
    comes from the optax state, not ``key``): per-example gradients by ``vmap(jax.grad)``, then
    ``optax.contrib.differentially_private_aggregate`` (clip, sum, noise, mean) chained with ``tx``."""
    import optax

    dp_tx = optax.chain(optax.contrib.differentially_private_aggregate(clip, noise, key=0), tx)
    grads_of = vmap_grad_per_example(model, loss)

    def step(state, x, target, key):
        del key
        params, model_state, opt_state = state
        grads = grads_of(params, model_state, x, target)
        updates, opt_state = dp_tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), model_state, opt_state), {}

    return dp_tx.init, step


def _setup(model_name: str, batch: int):
    import jax

    from jaxcnn.bench.sections import step_inputs
    from jaxcnn.models import get_model
    from jaxcnn.ops.conv import DEFAULT_METHOD

    spec = get_model(model_name)
    model = spec.build(conv_method=DEFAULT_METHOD)
    x, target = step_inputs(spec, batch)
    params, model_state, _ = model.init(jax.random.PRNGKey(0), (1, *x.shape[1:]))
    return spec, model, x, target, params, model_state


def _jit_contender(name, family, fn, args, options, info, *, donate=()) -> Contender:
    """A contender calling ``fn(*args)`` compiled under ``options``, with its compiled memory."""
    import jax

    t0 = time.perf_counter()
    compiled = compile_with(fn, args, options, donate=donate)
    info = {**info, "runs": function_name(fn), "compile_s": time.perf_counter() - t0, **memory_bytes(compiled)}
    return Contender(name, family, lambda: jax.block_until_ready(compiled(*args)), 1, info)


def norm_contenders(cfg: BenchConfig, model_name: str, opts: dict) -> list[Contender]:
    """``manual`` (:func:`jaxcnn.gradients.per_example_grad_norms`) and ``vmap_grad`` norms, per option set."""
    from jaxcnn import gradients

    spec, model, x, target, params, model_state = _setup(model_name, cfg.batch_of(model_name))
    manual = functools.partial(gradients.per_example_grad_norms, model, spec.loss)
    baseline = vmap_grad_norms(model, spec.loss)
    info = {"batch": x.shape[0]}
    out = []
    for oname, o in opts.items():
        args = (params, model_state, x, target)
        out.append(_jit_contender(f"manual[{oname}]", "manual", manual, args, o, {**info, "options": oname}))
        out.append(_jit_contender(f"vmap_grad[{oname}]", "vmap_grad", baseline, args, o, {**info, "options": oname}))
    return out


def dp_step_contenders(cfg: BenchConfig, model_name: str, opts: dict) -> list[Contender]:
    """The DP-SGD step: ``manual`` as :func:`~jaxcnn.train.step.train_step` with ``dp_clip`` (per step and
    scanned, as :func:`jaxcnn.train.loop.run_steps`), ``vmap_grad`` the optax way (per step)."""
    import jax

    from jaxcnn.train import config as train_config
    from jaxcnn.train import inputs, loop
    from jaxcnn.train import step as train_step_module

    assert cfg.scan_steps is not None  # set by BenchConfig.resolved()
    steps = cfg.scan_steps
    spec, model, x, target, params, model_state = _setup(model_name, cfg.batch_of(model_name))
    tx = train_config.make_optimizer(train_config.TrainConfig(lr=LR, schedule="constant"), 1)
    step = train_step_module.make_step(model, spec.loss, tx, dp_clip=DP_CLIP, dp_noise_multiplier=DP_NOISE)
    state = train_step_module.TrainState(params, model_state, tx.init(params))
    info = {"batch": x.shape[0], "dp_clip": DP_CLIP, "dp_noise_multiplier": DP_NOISE}
    out = loop_and_scan(
        functools.partial(train_step_module.train_step, step),
        functools.partial(loop.run_steps, step, inputs.Scaling(), 0, jax.random.PRNGKey(0)),
        state,
        x,
        target,
        cfg.scan_steps,
        opts,
        "manual",
        "manual",
        info,
        ("scan",) if cfg.quick else ("loop", "scan"),
    )
    init, baseline = vmap_grad_dp_step(model, spec.loss, tx)
    out += loop_and_scan(
        baseline,
        None,
        (params, model_state, init(params)),
        x,
        target,
        steps,
        opts,
        "vmap_grad",
        "vmap_grad",
        info,
        ("loop",),
    )
    return out


def conv_grads_contenders(cfg: BenchConfig, model_name: str, opts: dict) -> list[Contender]:
    """``taps[<layer>]`` and ``im2col[<layer>]``: :func:`jaxcnn.per_example.conv2d_per_example_grads` at the
    shapes of each convolution of the model (random input and cotangent), compiled under the first option set.
    The zoo's convolutions have stride 1, no dilation and one group; the padding is read off the shapes
    (``out - in + k - 1`` rows, the extra one after)."""
    import jax
    import jax.numpy as jnp

    from jaxcnn import per_example
    from jaxcnn.bench.flops import kernel_of, layers_with_shapes
    from jaxcnn.models import get_model

    spec, batch = get_model(model_name), cfg.batch_of(model_name)
    oname, options = next(iter(opts.items()))
    out = []
    for i, layer, params, _, xs, ys in layers_with_shapes(spec.build(), (batch, *spec.input_shape[1:])):
        w = kernel_of(params)
        if w is None or w.ndim != 4:
            continue
        totals = [o - n + k - 1 for o, n, k in zip(ys[1:3], xs[1:3], w.shape[:2], strict=True)]
        pads = [(total // 2, total - total // 2) for total in totals]
        keys = jax.random.split(jax.random.PRNGKey(i), 3)
        args = tuple(jax.random.normal(k, a, jnp.float32) for k, a in zip(keys, (ys, xs, w.shape), strict=True))
        label = f"{i}:{layer.name}"
        for method in per_example.GRADS_FORMULATIONS:
            fn = functools.partial(per_example.conv2d_per_example_grads, padding=pads, method=method)
            info = {"batch": batch, "layer": label, "x_shape": list(xs), "options": oname}
            out.append(_jit_contender(f"{method}[{label}]", method, fn, args, options, info))
    return out


def opacus_contenders(cfg: BenchConfig, model_name: str) -> list[Contender]:
    """Opacus's DP-SGD step on the PyTorch twin of the model, same batch, clip, noise and optimiser, in each
    of its per-example modes (:data:`jaxcnn.bench.peers_torch.OPACUS_MODES`)."""
    import warnings

    from jaxcnn.bench import peers_torch

    assert cfg.scan_steps is not None  # set by BenchConfig.resolved()
    out = []
    for mode in peers_torch.OPACUS_MODES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus's notes on its insecure RNG and on backward hooks
            fn, info = peers_torch.make_dp_step(
                model_name,
                cfg.batch_of(model_name),
                cfg.scan_steps,
                mode=mode,
                clip=DP_CLIP,
                noise=DP_NOISE,
                lr=LR,
                threads=cfg.torch_threads,
            )

        def run(fn=fn):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn()

        out.append(
            Contender(f"opacus[{mode}]", "opacus", run, cfg.scan_steps, {**info, "batch": cfg.batch_of(model_name)})
        )
    return out


def _ratios(records: list[dict]) -> dict:
    out: dict[str, float | str] = {}
    a = best_of(records, "manual")
    for den in ("vmap_grad", "opacus"):
        b = best_of(records, den)
        compare(out, f"manual/{den}", a, b)
        if a and b and a.get("memory_bytes") and b.get("memory_bytes"):
            out[f"memory manual/{den}"] = a["memory_bytes"] / b["memory_bytes"]
    return out


def bench_per_example(cfg: BenchConfig, opts: dict, log, notes: list) -> tuple[list[dict], dict]:
    """Runs the section; returns its records and ratios (``per_example/norms/<model>``,
    ``per_example/dp_step/<model>``)."""
    import importlib.util

    with_opacus = "torch" in cfg.peers and importlib.util.find_spec("opacus") is not None
    if not with_opacus:
        notes.append("per_example: Opacus is not installed (or --peers leaves out torch); its contender is left out")
    records, ratios = [], {}
    for model_name in cfg.models[:1] if cfg.quick else cfg.models:
        for what, make in (("norms", norm_contenders), ("dp_step", dp_step_contenders)):
            name = f"per_example/{what}/{model_name}"
            contenders = make(cfg, model_name, opts)
            if what == "dp_step" and with_opacus:
                contenders += opacus_contenders(cfg, model_name)
            recs = measure(name, contenders, cfg, log)
            records += recs
            ratios[name] = _ratios(recs)
        if not cfg.quick:
            name = f"per_example/conv_grads/{model_name}"
            recs = measure(name, conv_grads_contenders(cfg, model_name, opts), cfg, log)
            records += recs
            ratios[name] = _formulation_ratios(recs)
    return records, ratios


def _formulation_ratios(records: list[dict]) -> dict:
    """``taps/im2col <layer>``: the median per-round ratio of the two formulations on each layer."""
    by_name = {r["contender"]: r for r in records if r.get("samples_ms")}
    out: dict[str, float | str] = {}
    for r in records:
        label = r.get("layer")
        taps, im2col = by_name.get(f"taps[{label}]"), by_name.get(f"im2col[{label}]")
        if r["contender"].startswith("taps[") and taps and im2col:
            out[f"taps/im2col {label}"] = round_ratio(taps, im2col)
    return out
