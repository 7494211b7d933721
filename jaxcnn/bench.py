"""``jaxcnn bench``: how fast the hand-written backward passes are, against ``jax.grad`` and optional peers.

Everything runs in one process. The contenders of one benchmark are compiled first, warmed up, then
timed **round by round**, each round running every contender once in a rotated order, so that a change
in machine load hits all of them alike; a record reports the median (and quartiles) over rounds, never
a single timing, and a ratio is the median over rounds of the per-round ratio.

Sections (``--sections``):

* ``peak``: a large float32 matmul under each compile-option set on its own. The same matmul also runs
  in every round of the ``steps`` benchmarks, and a step's fraction of peak is taken against it round by
  round, so that machine load cancels out.
* ``ops``: each op of the zoo models at its real shape: conv forward, conv ``dx`` and ``dw`` in every
  formulation of :mod:`jaxcnn.ops.conv` against ``jax.vjp``, pooling and dense backward against
  ``jax.vjp``; standalone and inside ``lax.scan`` (where XLA:CPU compiles some convolutions differently).
* ``steps``: a whole train step (forward, loss, backward, optax update) per model for ``manual`` and
  ``autodiff`` gradients, each as a jitted step called from a Python loop and as ``lax.scan`` over steps,
  under every compile-option set; peers (PyTorch eager and ``torch.compile``, Flax) when installed.
  Records carry the achieved GFLOP/s (FLOPs counted analytically), the fraction of the measured peak
  and XLA's compiled memory analysis of the program.
* ``epoch``: images/s of the real training loop, :class:`jaxcnn.train.Trainer` ``run_steps``: one
  ``lax.scan`` over the epoch against a Python loop calling the same jitted function once per step.
* ``scaling``: images/s of that scanned epoch with the batch sharded over meshes of 1, 2, 4 and 8
  devices (simulated CPU devices in a child process on the CPU; the real devices on a GPU machine).

``--json FILE`` writes every figure: ``results`` (one record per benchmark and contender, with
``benchmark``, ``contender``, ``family``, ``median_ms``...), ``ratios`` (benchmark -> ``{"manual/autodiff":
..., "manual/torch": ...}``), ``targets``, ``peak_gflops``, ``flops_per_image``, the machine and versions.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

SCHEMA_VERSION = 1
MODELS = ("seed_net", "lenet5", "small_cnn")
BATCH = {"seed_net": 200, "lenet5": 128, "small_cnn": 128}  # the batch sizes of the issue's measurements
SECTIONS = ("peak", "ops", "steps", "epoch", "scaling")
SCALING_DEVICES = (1, 2, 4, 8)  # data-parallel mesh sizes of the scaling section
PEERS = ("torch", "torch.compile", "flax")
FAMILIES = ("manual", "autodiff", "torch", "torch.compile", "flax")
LR = 0.05  # SGD with momentum 0.9, the training default; the same for every contender and peer
MANUAL_CONV_METHOD = "auto"  # the zoo's conv backward formulation for the manual contender (see resolve_method)

# Compile-option sets tried on CPU. Each is checked against this jaxlib before use (unknown option names
# are rejected by XLA), so a set that this version lacks is skipped with a note, never silently ignored.
CPU_OPTION_SETS = {
    "default": {},
    "no-ynn": {"xla_cpu_experimental_ynn_fusion_type": ""},
}


class BenchError(ValueError):
    """A benchmark setting that cannot work (e.g. ``--device gpu`` without a GPU)."""


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to run. ``None`` fields take their full-run default, or the smaller ``quick`` value."""

    device: str = "cpu"
    quick: bool = False
    models: tuple[str, ...] = MODELS
    sections: tuple[str, ...] = SECTIONS
    peers: tuple[str, ...] = PEERS
    option_sets: tuple[str, ...] | None = None  # names from CPU_OPTION_SETS; None: all that exist (quick: default)
    rounds: int | None = None  # timed rounds per benchmark (full 9, quick 2)
    sample_s: float | None = None  # target length of one timed sample (full 0.25 s, quick 0.01 s)
    batch: int | None = None  # overrides every model's batch (quick: 16)
    scan_steps: int | None = None  # steps per call of the scan and loop step contenders (full 8, quick 2)
    epoch_examples: int | None = None  # training examples in the epoch benchmark (full: all 4,000)
    prune: float = 3.0  # drop a contender after warm-up when this many times slower than its family's best
    torch_threads: int = 2

    def resolved(self) -> "BenchConfig":
        q = self.quick
        return dataclasses.replace(
            self,
            rounds=self.rounds or (2 if q else 9),
            sample_s=self.sample_s or (0.01 if q else 0.25),
            scan_steps=self.scan_steps or (2 if q else 8),
            epoch_examples=self.epoch_examples or (64 if q else None),
            batch=self.batch or (16 if q else None),
            option_sets=self.option_sets or (("default",) if q else None),
        )

    def batch_of(self, model: str) -> int:
        return self.batch or BATCH.get(model, 128)


# ---------------------------------------------------------------------------------------------------
# Timing


@dataclasses.dataclass
class Contender:
    """One way of doing a benchmark's work: ``fn()`` does ``work`` units (ops, steps, epochs) and blocks."""

    name: str
    family: str
    fn: Callable[[], Any]
    work: int = 1
    info: dict = dataclasses.field(default_factory=dict)


def _percentile(values, q):
    return float(np.percentile(np.asarray(values, np.float64), q))


def _time(fn, reps):
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return time.perf_counter() - t0


def measure(benchmark: str, contenders: list[Contender], cfg: BenchConfig, log=None) -> list[dict]:
    """Times ``contenders`` round by round; returns one record per contender.

    Warm-up runs each contender once (its first run after compilation) and once more to choose how many
    repetitions make a sample of about ``cfg.sample_s``. A contender that is ``cfg.prune`` times slower than
    the best of its family after warm-up is not timed further; its record says so and holds the warm-up
    time. Each round then times every remaining contender once, starting one later than the last round.
    """
    warm, reps, live = {}, {}, []
    for c in contenders:
        try:
            warm[c.name] = _time(c.fn, 1) / c.work
        except Exception as e:  # a peer that cannot run this model, a compiler failure
            warm[c.name] = ("failed", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    ran = [c for c in contenders if not isinstance(warm[c.name], tuple)]

    def family_best():
        best = {}
        for c in ran:
            best[c.family] = min(best.get(c.family, math.inf), warm[c.name])
        return best

    # Pathologically slow contenders (e.g. several seconds per step) are dropped after one run; the
    # others run once more (the first run after compilation can be slow) and are dropped only if still slow.
    best = family_best()
    for c in ran:
        if not (warm[c.name] > cfg.prune * best[c.family] and warm[c.name] * c.work > 1.0):
            second = _time(c.fn, 1) / c.work
            reps[c.name] = max(1, min(1000, round(cfg.sample_s / max(second * c.work, 1e-7))))
            warm[c.name] = min(warm[c.name], second)
    best = family_best()
    for c in ran:
        if c.name in reps and not (warm[c.name] > cfg.prune * best[c.family] and warm[c.name] * c.work > 0.05):
            live.append(c)
    best_first = best
    samples = {c.name: [] for c in live}
    for r in range(cfg.rounds):
        k = r % max(len(live), 1)
        for c in live[k:] + live[:k]:
            samples[c.name].append(_time(c.fn, reps[c.name]) / (reps[c.name] * c.work))
    records = []
    for c in contenders:
        rec = {"benchmark": benchmark, "contender": c.name, "family": c.family, **c.info}
        if c.name in samples:
            s = samples[c.name]
            rec.update(status="ok", median_ms=1e3 * statistics.median(s), p25_ms=1e3 * _percentile(s, 25),
                       p75_ms=1e3 * _percentile(s, 75), min_ms=1e3 * min(s), rounds=len(s), reps=reps[c.name],
                       samples_ms=[1e3 * v for v in s])
        elif isinstance(warm[c.name], tuple):
            rec.update(status="failed", median_ms=None, note=warm[c.name][1])
        else:
            rec.update(status="pruned", median_ms=1e3 * warm[c.name], rounds=0,
                       note=f"not timed further: its warm-up run took {warm[c.name] / best_first[c.family]:.1f}x "
                            f"the best {c.family} contender's")
        records.append(rec)
    if log:
        best = min((r for r in records if r["status"] == "ok"), key=lambda r: r["median_ms"], default=None)
        if best:
            log(f"  {benchmark}: best {best['contender']} {best['median_ms']:.3f} ms")
    return records


def best_of(records: list[dict], family: str) -> dict | None:
    """The timed record of ``family`` with the lowest median (pruned and failed ones do not count)."""
    ok = [r for r in records if r["family"] == family and r["status"] == "ok"]
    return min(ok, key=lambda r: r["median_ms"]) if ok else None


def round_ratio(a: dict, b: dict) -> float:
    """Median over rounds of ``a``'s time / ``b``'s time in the same round."""
    return float(statistics.median(x / y for x, y in zip(a["samples_ms"], b["samples_ms"])))


def family_ratios(records: list[dict], num: str = "manual", dens=("autodiff", "torch", "torch.compile", "flax")) -> dict:
    """``{"manual/autodiff": ..., "manual/torch": ...}`` between the best contender of each family."""
    out = {}
    a = best_of(records, num)
    for den in dens:
        b = best_of(records, den)
        if a and b:
            out[f"{num}/{den}"] = round_ratio(a, b)
            out[f"{num}/{den} contenders"] = f"{a['contender']} / {b['contender']}"
    return out


# ---------------------------------------------------------------------------------------------------
# Compile options, devices, FLOPs


def option_sets(cfg: BenchConfig, log=None) -> dict[str, dict]:
    """The compile-option sets to try on this device, each verified to exist in this jaxlib."""
    import jax
    import jax.numpy as jnp

    if cfg.device != "cpu":
        return {"default": {}}
    names = cfg.option_sets or tuple(CPU_OPTION_SETS)
    unknown = [n for n in names if n not in CPU_OPTION_SETS]
    if unknown:
        raise BenchError(f"--options: unknown option set {unknown[0]!r}; choose from {', '.join(CPU_OPTION_SETS)}")
    probe = jax.jit(lambda a: a @ a).lower(jnp.ones((8, 8), jnp.float32))
    out = {}
    for name in names:
        try:
            probe.compile(compiler_options=CPU_OPTION_SETS[name])
        except Exception as e:  # XLA rejects option names it does not know
            if log:
                log(f"note: compile-option set {name!r} is not supported by this jaxlib ({str(e).splitlines()[0][:120]}); skipped")
            continue
        out[name] = CPU_OPTION_SETS[name]
    return out


def compile_with(fn, args, options, donate=()):
    """AOT-compiles ``jax.jit(fn)`` for ``args`` with XLA ``options``."""
    import jax

    return jax.jit(fn, donate_argnums=donate).lower(*args).compile(compiler_options=options)


def memory_bytes(compiled) -> dict:
    """XLA's compiled memory analysis: arguments + outputs + temporaries - aliased (donated) bytes."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return {}
    if m is None:
        return {}
    arg, out, temp, alias = (int(getattr(m, f"{k}_size_in_bytes", 0)) for k in ("argument", "output", "temp", "alias"))
    return {"memory_bytes": arg + out + temp - alias, "temp_bytes": temp}


def layer_flops(model, in_shape) -> list[dict]:
    """Multiply-add FLOPs (x2) per image of every conv and dense layer of a serial ``model``.

    ``fwd`` is the layer's forward product, ``dw`` its kernel gradient and ``dx`` its input gradient, each
    as many FLOPs as the forward; the first layer's ``dx`` is not counted (nothing needs it).
    """
    import jax

    layers = model.children or (model,)
    shape, rows = (1, *in_shape[1:]), []
    key = jax.random.PRNGKey(0)
    for i, layer in enumerate(layers):
        params, _, out_shape = layer.init(key, shape)
        w = params.get("w") if isinstance(params, dict) else None
        if w is not None and w.ndim in (2, 4):
            per_out = math.prod(w.shape[:-1]) if w.ndim == 4 else w.shape[0]
            fwd = 2 * per_out * math.prod(out_shape[1:])
            rows.append({"layer": i, "name": layer.name, "in_shape": shape[1:], "out_shape": tuple(out_shape[1:]),
                         "w_shape": tuple(w.shape), "fwd": fwd, "dw": fwd, "dx": fwd if rows else 0})
        shape = out_shape
    return rows


def model_flops(model, in_shape=(1, 28, 28, 1)) -> int:
    """FLOPs per image of one train step (forward + backward) of ``model``, counted analytically."""
    return sum(r["fwd"] + r["dw"] + r["dx"] for r in layer_flops(model, in_shape))


# ---------------------------------------------------------------------------------------------------
# Section: peak


def peak_size(cfg: BenchConfig) -> int:
    return 512 if cfg.quick else 2048


def matmul_contenders(cfg: BenchConfig, opts: dict) -> list[Contender]:
    """float32 ``n x n @ n x n`` under each option set (family ``"peak"``)."""
    import jax
    import jax.numpy as jnp

    n = peak_size(cfg)
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    out = []
    for oname, o in opts.items():
        f = compile_with(lambda a, b: a @ b, (a, b), o)
        out.append(Contender(f"matmul{n}[{oname}]", "peak", lambda f=f: f(a, b).block_until_ready(),
                             info={"options": oname, "n": n, "flops": 2 * n ** 3}))
    return out


def bench_peak(cfg: BenchConfig, opts: dict, log) -> tuple[list[dict], float]:
    """The matmul under each option set on its own; returns the records and the best median GFLOP/s."""
    recs = measure(f"peak/matmul{peak_size(cfg)}", matmul_contenders(cfg, opts), cfg, log)
    for r in recs:
        if r["status"] == "ok":
            r["gflops"] = r["flops"] / (r["median_ms"] * 1e-3) / 1e9
            r["gflops_best_round"] = r["flops"] / (r["min_ms"] * 1e-3) / 1e9
    peak = max((r["gflops"] for r in recs if "gflops" in r), default=float("nan"))
    return recs, peak


def add_peak_fractions(recs: list[dict], flops: float) -> float | None:
    """Sets ``gflops`` and ``peak_fraction`` of every timed record of one step benchmark whose contenders
    included the matmul (family ``"peak"``): the fraction is the median over rounds of the step's GFLOP/s
    over the best matmul GFLOP/s of the same round, so that load on the machine cancels out. Returns the
    median matmul GFLOP/s of those rounds."""
    peaks = [r for r in recs if r["family"] == "peak" and r["status"] == "ok"]
    per_round = [max(p["flops"] / (p["samples_ms"][k] * 1e-3) for p in peaks) for k in range(len(peaks[0]["samples_ms"]))] if peaks else []
    for r in recs:
        if r["family"] == "peak":
            if r["status"] == "ok":
                r["gflops"] = r["flops"] / (r["median_ms"] * 1e-3) / 1e9
            continue
        if r.get("median_ms"):
            r["gflops"] = flops / (r["median_ms"] * 1e-3) / 1e9
            r["images_per_s"] = r["batch"] / (r["median_ms"] * 1e-3)
        if r["status"] == "ok" and per_round:
            r["peak_fraction"] = float(statistics.median(
                flops / (t * 1e-3) / pk for t, pk in zip(r["samples_ms"], per_round)))
    return statistics.median(per_round) / 1e9 if per_round else None


# ---------------------------------------------------------------------------------------------------
# Section: ops


def _conv_layers(spec_name: str, batch: int):
    """``(name, x_shape, w_shape, hyper, first)`` for every Conv2D of a zoo model, from its init shapes."""
    import jax

    from jaxcnn.models import get_model

    model = get_model(spec_name).build()
    rows, shape, conv_i = [], (batch, 28, 28, 1), 0
    for i, layer in enumerate(model.children):
        params, _, out = layer.init(jax.random.PRNGKey(0), shape)
        if layer.name.startswith("Conv2D"):
            conv_i += 1
            rows.append((f"{spec_name}.conv{conv_i}", shape, tuple(params["w"].shape), i, (batch, *out[1:])))
        shape = (batch, *out[1:])
    return rows


# Each zoo Conv2D's hyperparameters, by the position of the conv in its model (the models are fixed).
_CONV_HYPER = {
    "seed_net.conv1": dict(padding="VALID"),
    "lenet5.conv1": dict(padding="SAME"),
    "lenet5.conv2": dict(padding=0),
    "small_cnn.conv1": dict(padding="SAME"),
    "small_cnn.conv2": dict(padding="SAME"),
}


def _scanned(op):
    """``op`` applied to each of ``S`` stacked argument sets inside ``lax.scan`` (the training loop's setting).

    The result is carried from iteration to iteration (as a train step carries its parameters), not
    stacked as the scan's output: XLA:CPU fuses producers into the in-place update of a stacked output,
    which emits them far slower and would measure that instead of the op.
    """
    import jax
    import jax.numpy as jnp

    def run(*stacked):
        shapes = jax.eval_shape(op, *(a[0] for a in stacked))
        init = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return jax.lax.scan(lambda carry, args: (op(*args), None), init, stacked)[0]

    return run


def bench_ops(cfg: BenchConfig, opts: dict, log) -> tuple[list[dict], dict]:
    import jax
    import jax.numpy as jnp

    from jaxcnn import ops
    from jaxcnn.ops.conv import METHODS

    formulations = [m for m in METHODS if m != "auto"]
    records, ratios = [], {}
    S = 2 if cfg.quick else 4  # ops per scan call
    models = cfg.models[:1] if cfg.quick else cfg.models
    key = iter(jax.random.split(jax.random.PRNGKey(0), 1000))

    def rnd(shape):
        return jax.random.normal(next(key), shape, jnp.float32)

    def run(benchmark, variants, arg_shapes, flops=None):
        """``variants``: ``[(name, family, fn, info)]`` of ops on arrays of ``arg_shapes``."""
        for structure in ("jit",) if cfg.quick else ("jit", "scan"):
            args = [rnd(s) for s in arg_shapes]
            work = 1
            if structure == "scan":
                args = [jnp.broadcast_to(a, (S, *a.shape)) + 0 for a in args]
                work = S
            contenders = []
            for name, family, fn, info in variants:
                for oname, o in opts.items():
                    f = _scanned(fn) if structure == "scan" else fn
                    compiled = compile_with(f, args, o)
                    contenders.append(Contender(
                        f"{name}[{oname}]", family,
                        lambda c=compiled: jax.block_until_ready(c(*args)), work,
                        {**info, "options": oname, "structure": structure}))
            bname = f"{benchmark}[scan]" if structure == "scan" else benchmark
            recs = measure(bname, contenders, cfg, log)
            if flops:
                for r in recs:
                    if r.get("median_ms"):
                        r["gflops"] = flops / (r["median_ms"] * 1e-3) / 1e9
            records.extend(recs)
            ratios[bname] = family_ratios(recs, dens=("autodiff",))

    for model in models:
        batch = cfg.batch_of(model)
        for lname, xs, ws, index, y_shape in _conv_layers(model, batch):
            hyper = _CONV_HYPER[lname]
            got = jax.eval_shape(lambda x, w, hyper=hyper: ops.conv2d(x, w, **hyper),
                                 jax.ShapeDtypeStruct(xs, jnp.float32), jax.ShapeDtypeStruct(ws, jnp.float32)).shape
            if tuple(got) != tuple(y_shape):  # the table above no longer matches the model
                raise BenchError(f"{lname}: its benchmark hyperparameters give {got}, the model gives {y_shape}")
            flops = 2 * math.prod(y_shape) * math.prod(ws[:3])
            shape_info = {"x_shape": list(xs), "w_shape": list(ws), **{k: str(v) for k, v in hyper.items()}}

            def lax_fwd(x, w, hyper=hyper):
                return ops.conv2d(x, w, method="conv", **hyper)

            fwd = [("autodiff:lax.conv", "autodiff", lax_fwd, shape_info)]
            fwd += [(f"manual:{m}", "manual", lambda x, w, m=m, hyper=hyper: ops.conv2d(x, w, method=m, **hyper),
                     {**shape_info, "formulation": m}) for m in formulations if m != "conv"]
            run(f"op/conv_fwd/{lname}", fwd, [xs, ws], flops)

            def vjp_dw(dy, x, w, hyper=hyper):
                return jax.vjp(lambda w: lax_fwd(x, w, hyper), w)[1](dy)[0]

            def vjp_dx(dy, x, w, hyper=hyper):
                return jax.vjp(lambda x: lax_fwd(x, w, hyper), x)[1](dy)[0]

            dw = [("autodiff:jax.vjp", "autodiff", vjp_dw, shape_info)]
            dw += [(f"manual:{m}", "manual", lambda dy, x, w, m=m, hyper=hyper: ops.conv2d_backward(dy, x, w, method=m, **hyper)[1],
                    {**shape_info, "formulation": m}) for m in formulations]
            if cfg.quick:  # one forward benchmark is enough for a smoke test
                continue
            run(f"op/conv_dw/{lname}", dw, [y_shape, xs, ws], flops)
            if index > 0:  # the first layer's dx is never needed (and never computed under jit)
                dx = [("autodiff:jax.vjp", "autodiff", vjp_dx, shape_info)]
                dx += [(f"manual:{m}", "manual", lambda dy, x, w, m=m, hyper=hyper: ops.conv2d_backward(dy, x, w, method=m, **hyper)[0],
                        {**shape_info, "formulation": m}) for m in formulations]
                run(f"op/conv_dx/{lname}", dx, [y_shape, xs, ws], flops)
        if cfg.quick:
            continue
        # Pooling and dense backward at the model's shapes.
        for lname, kind, xs in _pool_layers(model, batch):
            pool = ops.max_pool2d if kind == "max" else ops.avg_pool2d
            if kind == "max":
                def manual(dy, x):
                    return ops.max_pool2d_backward(dy, x, window=2, y=ops.max_pool2d(x, window=2))
            else:
                def manual(dy, x):
                    return ops.avg_pool2d_backward(dy, x, window=2)

            def vjp(dy, x, pool=pool):
                return jax.vjp(lambda x: pool(x, window=2), x)[1](dy)[0]

            ys = (xs[0], xs[1] // 2, xs[2] // 2, xs[3])
            info = {"x_shape": list(xs)}
            run(f"op/{kind}pool_bwd/{lname}", [("autodiff:jax.vjp", "autodiff", vjp, info),
                                               ("manual", "manual", manual, info)], [ys, xs])
        for lname, xs, ws in _dense_layers(model, batch):
            def manual(dy, x, w):
                return ops.dense_backward(dy, x, w)[:2]

            def vjp(dy, x, w):
                return jax.vjp(ops.dense, x, w)[1](dy)

            info = {"x_shape": list(xs), "w_shape": list(ws)}
            run(f"op/dense_bwd/{lname}", [("autodiff:jax.vjp", "autodiff", vjp, info), ("manual", "manual", manual, info)],
                [(xs[0], ws[1]), xs, ws], 4 * xs[0] * ws[0] * ws[1])
    return records, ratios


def _walk_shapes(model_name: str, batch: int):
    import jax

    from jaxcnn.models import get_model

    shape = (batch, 28, 28, 1)
    for layer in get_model(model_name).build().children:
        params, _, out = layer.init(jax.random.PRNGKey(0), shape)
        yield layer, params, shape
        shape = (batch, *out[1:])


def _pool_layers(model_name, batch):
    n = 0
    for layer, _, shape in _walk_shapes(model_name, batch):
        if layer.name.startswith(("MaxPool2D(2)", "AvgPool2D(2)")):
            n += 1
            yield f"{model_name}.pool{n}", "max" if layer.name.startswith("Max") else "avg", shape


def _dense_layers(model_name, batch):
    n = 0
    for layer, params, shape in _walk_shapes(model_name, batch):
        if layer.name.startswith("Dense"):
            n += 1
            if params["w"].shape[0] * params["w"].shape[1] >= 10_000:  # the tiny ones are not worth a benchmark
                yield f"{model_name}.dense{n}", shape, tuple(params["w"].shape)


# ---------------------------------------------------------------------------------------------------
# Section: steps


def _step_fn(grad_fn, tx):
    """``step((params, model_state, opt_state), (x, target)) -> (new carry, loss)``: one train step."""
    import optax

    def step(carry, batch):
        params, model_state, opt_state = carry
        x, target = batch
        (loss, (_, model_state)), grads = grad_fn(params, model_state, x, target)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), model_state, opt_state), loss

    return step


def _loop_and_scan(step, carry, batch, K, opts, name, family, info, structures=("loop", "scan")):
    """Contenders for ``step``: ``K`` calls of the jitted step from Python (``"loop"``) and one ``lax.scan``
    over ``K`` steps (``"scan"``), under every option set; the carry is donated in both, as in training."""
    import jax
    import jax.numpy as jnp

    xs = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (K, *a.shape)) + 0, batch)
    programs = {"loop": (step, (carry, batch)), "scan": (lambda c, xs: jax.lax.scan(step, c, xs), (carry, xs))}
    out = []
    for oname, o in opts.items():
        compiled, compile_s = {}, {}
        for structure in structures:
            t0 = time.perf_counter()
            compiled[structure] = compile_with(*programs[structure], o, donate=(0,))
            compile_s[structure] = time.perf_counter() - t0
        for structure, compiled in compiled.items():
            holder = [jax.tree_util.tree_map(jnp.copy, carry)]
            if structure == "loop":
                def fn(c=compiled, h=holder):
                    s = h[0]
                    for _ in range(K):
                        s, _loss = c(s, batch)
                    h[0] = jax.block_until_ready(s)
            else:
                def fn(c=compiled, h=holder):
                    h[0] = jax.block_until_ready(c(h[0], xs)[0])
            out.append(Contender(f"{name}[{structure},{oname}]", family, fn, K,
                                 {**info, "structure": structure, "options": oname, "compile_s": compile_s[structure],
                                  **memory_bytes(compiled)}))
    return out


def step_setup(model_name: str, batch: int, method: str = "manual", conv_method: str | None = None):
    """``(step, carry, (x, target), spec)`` for a zoo model's train step with ``method`` gradients."""
    import jax

    from jaxcnn.gradients import value_and_grad
    from jaxcnn.models import get_model
    from jaxcnn.train import TrainConfig, make_optimizer

    spec = get_model(model_name)
    model = spec.build() if conv_method is None else spec.build(method=conv_method)
    params, model_state, _ = model.init(jax.random.PRNGKey(0), (1, 28, 28, 1))
    tx = make_optimizer(TrainConfig(model=model_name, lr=LR, schedule="constant"), 1)
    x = jax.random.uniform(jax.random.PRNGKey(1), (batch, 28, 28, 1), jax.numpy.float32)
    labels = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, 10)
    step = _step_fn(value_and_grad(model, spec.loss, method), tx)
    return step, (params, model_state, tx.init(params)), (x, spec.targets(labels)), spec


def bench_steps(cfg: BenchConfig, opts: dict, log, notes: list) -> tuple[list[dict], dict, dict]:
    from jaxcnn.models import get_model

    records, ratios, flops = [], {}, {}
    K = cfg.scan_steps
    torch_peer = _torch_peer(cfg, notes)
    flax_peer = _flax_peer(cfg, notes)
    for model_name in cfg.models:
        batch = cfg.batch_of(model_name)
        flops[model_name] = model_flops(get_model(model_name).build())
        contenders = []
        for method in ("manual", "autodiff"):
            conv = MANUAL_CONV_METHOD if method == "manual" else None
            step, carry, data, _ = step_setup(model_name, batch, method, conv)
            # --quick compiles only each method's usual best structure (compilation dominates its time).
            structures = (("scan",) if method == "manual" else ("loop",)) if cfg.quick else ("loop", "scan")
            contenders += _loop_and_scan(step, carry, data, K, opts, method, method,
                                         {"batch": batch, **({"conv_method": conv} if conv else {})}, structures)
        if flax_peer is not None:
            contenders += flax_peer(model_name, batch, K, opts)
        if torch_peer is not None:
            contenders += torch_peer(model_name, batch, K)
        # The matmul runs in the same rounds, so that the fraction of peak compares like with like.
        contenders += matmul_contenders(cfg, opts)
        recs = measure(f"step/{model_name}", contenders, cfg, log)
        peak_here = add_peak_fractions(recs, flops[model_name] * batch)
        records.extend(recs)
        ratios[f"step/{model_name}"] = family_ratios(recs)
        if peak_here:
            ratios[f"step/{model_name}"]["matmul GFLOP/s in these rounds"] = peak_here
        ratios[f"step/{model_name}"].update(_memory_ratio(recs))
    return records, ratios, flops


def _memory_ratio(recs) -> dict:
    """Compiled memory of the manual vs the autodiff program under the same options: the one-step
    (``loop``) programs when both were compiled, otherwise whichever structures were."""
    out = {}
    for options in sorted({r.get("options") for r in recs if r["family"] == "manual" and r.get("memory_bytes")}):
        def pick(family):
            rs = [r for r in recs if r["family"] == family and r.get("options") == options and r.get("memory_bytes")]
            return next((r for r in rs if r.get("structure") == "loop"), rs[0] if rs else None)

        m, a = pick("manual"), pick("autodiff")
        if m and a:
            where = options if m["structure"] == a["structure"] == "loop" else f"{options}, {m['structure']} vs {a['structure']}"
            out[f"memory manual/autodiff [{where}]"] = m["memory_bytes"] / a["memory_bytes"]
    return out


def _torch_peer(cfg: BenchConfig, notes: list):
    wanted = [p for p in ("torch", "torch.compile") if p in cfg.peers]
    if not wanted or cfg.device != "cpu":
        return None
    try:
        from jaxcnn import bench_torch
    except ImportError as e:
        notes.append(f"PyTorch peer skipped: {e}")
        return None
    if not bench_torch.available():
        notes.append("PyTorch peer skipped: torch is not installed (pip install torch; it is never a dependency)")
        return None
    if cfg.quick and "torch.compile" in wanted:
        wanted.remove("torch.compile")
        notes.append("torch.compile skipped in --quick (its compilation takes minutes on a small machine)")

    def make(model_name, batch, K):
        out = []
        for peer in wanted:
            try:
                fn, info = bench_torch.make_step(model_name, batch, K, compiled=peer == "torch.compile",
                                                 lr=LR, threads=cfg.torch_threads)
            except Exception as e:
                notes.append(f"{peer} {model_name}: could not build the step ({type(e).__name__}: {str(e)[:160]})")
                continue
            out.append(Contender(peer, peer, fn, K, {"batch": batch, **info}))
        return out

    return make


def _flax_peer(cfg: BenchConfig, notes: list):
    if "flax" not in cfg.peers:
        return None
    try:
        import flax  # noqa: F401
    except ImportError:
        notes.append("Flax peer skipped: flax is not installed (pip install flax; it is never a dependency)")
        return None

    def make(model_name, batch, K, opts):
        import jax

        try:
            step, carry, data = _flax_step(model_name, batch)
        except KeyError:
            notes.append(f"Flax peer: no Flax version of {model_name}")
            return []
        # Only the per-step loop: jax.grad of a convolution runs far slower inside lax.scan on XLA:CPU
        # (see the autodiff contenders), so the loop is Flax's best setting.
        return _loop_and_scan(step, carry, data, K, opts, "flax", "flax", {"batch": batch, "flax": flax_version()},
                              ("loop",))

    return make


def flax_version():
    import flax

    return flax.__version__


def _flax_step(model_name: str, batch: int):
    """The zoo model written with ``flax.linen`` (NHWC), trained with ``jax.value_and_grad`` + the same optax SGD."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from jaxcnn.models import get_model
    from jaxcnn.train import TrainConfig, make_optimizer

    def seed_net(x):
        x = nn.sigmoid(nn.Conv(3, (5, 5), padding="VALID")(x))
        return nn.sigmoid(nn.Dense(1)(x.reshape(x.shape[0], -1)))

    def lenet5(x):
        x = nn.max_pool(nn.relu(nn.Conv(6, (5, 5), padding="SAME")(x)), (2, 2), (2, 2))
        x = nn.max_pool(nn.relu(nn.Conv(16, (5, 5), padding="VALID")(x)), (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(84)(nn.relu(nn.Dense(120)(x))))
        return nn.Dense(10)(x)

    def small_cnn(x):
        x = nn.avg_pool(nn.relu(nn.Conv(32, (3, 3), padding="SAME")(x)), (2, 2), (2, 2))
        x = nn.avg_pool(nn.relu(nn.Conv(64, (3, 3), padding="SAME")(x)), (2, 2), (2, 2))
        x = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)

    body = {"seed_net": seed_net, "lenet5": lenet5, "small_cnn": small_cnn}[model_name]

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return body(x)

    spec = get_model(model_name)
    net = Net()
    x = jax.random.uniform(jax.random.PRNGKey(1), (batch, 28, 28, 1), jnp.float32)
    target = spec.targets(jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, 10))
    params = net.init(jax.random.PRNGKey(0), x[:1])
    tx = make_optimizer(TrainConfig(model=model_name, lr=LR, schedule="constant"), 1)

    def loss_fn(p, x, t):
        pred = net.apply(p, x)
        if spec.binary:
            return 0.5 * jnp.mean(jnp.square(pred - t))
        return optax.softmax_cross_entropy_with_integer_labels(pred, t).mean()

    def step(carry, data):
        p, ms, o = carry
        loss, g = jax.value_and_grad(loss_fn)(p, *data)
        u, o = tx.update(g, o, p)
        return (optax.apply_updates(p, u), ms, o), loss

    return step, (params, (), tx.init(params)), (x, target)


# ---------------------------------------------------------------------------------------------------
# Section: epoch


def _epoch_runners(trainer) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(scan_epoch, loop_epoch)``: one epoch of ``trainer.run_steps`` as one ``lax.scan`` over the epoch,
    and as a Python loop calling the same jitted function once per step. Each keeps its own training state
    and blocks on it. Both place their batch indices on the device inside the timed region, as
    ``train_and_evaluate`` does (once per call), so the loop pays what a per-step loop pays."""
    import jax

    spe = trainer.steps_per_epoch
    batches = trainer.epoch_batches(0)

    def scan_epoch(tr=trainer, h=[trainer.init_state()]):  # noqa: B006 (the holder is the point)
        ts, _, _, _ = tr.run_steps(h[0], tr.train_images, tr.train_targets, tr.batch_indices(batches),
                                   tr.place(np.int32(0)))
        h[0] = jax.block_until_ready(ts)

    def loop_epoch(tr=trainer, h=[trainer.init_state()]):  # noqa: B006
        ts = h[0]
        for i in range(spe):
            ts, _, _, _ = tr.run_steps(ts, tr.train_images, tr.train_targets, tr.batch_indices(batches[i:i + 1]),
                                       tr.place(np.int32(i)))
        h[0] = jax.block_until_ready(ts)

    return scan_epoch, loop_epoch


def _epoch_trainer(cfg: BenchConfig, model_name: str, dataset, options: dict | None, devices: int | None = 1):
    """A manual-gradient :class:`~jaxcnn.train.Trainer` of the benchmark's batch and learning rate;
    ``options=None`` takes the training loop's own compile options."""
    from jaxcnn import data as jdata
    from jaxcnn.models import get_model
    from jaxcnn.train import TrainConfig, Trainer

    tcfg = TrainConfig(model=model_name, dataset=jdata.OFFLINE_NAME, batch_size=cfg.batch_of(model_name), lr=LR,
                       schedule="constant", chunk_steps=10 ** 6, grad="manual", devices=devices)
    trainer = Trainer(tcfg, dataset, compiler_options=options)
    # The zoo model with the conv formulations the step benchmark times (traced at the first call).
    trainer.model = get_model(model_name).build(method=MANUAL_CONV_METHOD)
    return trainer


def _add_images_per_s(recs: list[dict]) -> list[dict]:
    for r in recs:
        if r.get("median_ms"):
            r["images_per_s"] = r["images"] / (r["median_ms"] * 1e-3)
    return recs


def bench_epoch(cfg: BenchConfig, opts: dict, log) -> tuple[list[dict], dict]:
    """Images/s of ``Trainer.run_steps`` over one epoch of the bundled MNIST subset: one ``lax.scan`` over the
    epoch against a Python loop calling the same jitted function once per step, under each option set."""
    from jaxcnn import data as jdata

    dataset = jdata.load_dataset(jdata.OFFLINE_NAME, train_limit=cfg.epoch_examples, log=lambda s: None)
    records, ratios = [], {}
    models = cfg.models[:1] if cfg.quick else cfg.models
    for model_name in models:
        contenders = []
        for oname, o in opts.items():
            trainer = _epoch_trainer(cfg, model_name, dataset, o)
            scan_epoch, loop_epoch = _epoch_runners(trainer)
            spe, batch = trainer.steps_per_epoch, trainer.config.batch_size
            info = {"batch": batch, "steps": spe, "images": spe * batch, "options": oname, "conv_method": MANUAL_CONV_METHOD}
            contenders += [Contender(f"manual[scan,{oname}]", "manual", scan_epoch, 1, {**info, "structure": "scan"}),
                           Contender(f"manual[loop,{oname}]", "manual-loop", loop_epoch, 1, {**info, "structure": "loop"})]
        recs = _add_images_per_s(measure(f"epoch/{model_name}", contenders, cfg, log))
        records.extend(recs)
        scan, loop = best_of(recs, "manual"), best_of(recs, "manual-loop")
        if scan and loop:
            ratio = round_ratio(scan, loop)
            ratios[f"epoch/{model_name}"] = {"scan/loop time": ratio, "scan/loop images_per_s": 1 / ratio,
                                             "scan/loop contenders": f"{scan['contender']} / {loop['contender']}"}
    return records, ratios


# ---------------------------------------------------------------------------------------------------
# Section: scaling


def scaling_model(cfg: BenchConfig) -> str:
    """The model the scaling section trains: ``small_cnn`` when it is benchmarked (the heaviest), else the first."""
    return "small_cnn" if "small_cnn" in cfg.models else cfg.models[0]


def scaling_records(cfg: BenchConfig, counts, log) -> list[dict]:
    """Images/s of one scanned training epoch (``Trainer.run_steps``, manual gradients) on meshes of each
    device count in ``counts``, alternated round by round in this process. Every count gets its own family
    so that none is pruned for being slow."""
    from jaxcnn import data as jdata

    model_name = scaling_model(cfg)
    dataset = jdata.load_dataset(jdata.OFFLINE_NAME, train_limit=cfg.epoch_examples, log=lambda s: None)
    contenders = []
    for n in counts:
        trainer = _epoch_trainer(cfg, model_name, dataset, None, devices=n)  # the training loop's compile options
        scan_epoch, _ = _epoch_runners(trainer)
        spe, batch = trainer.steps_per_epoch, trainer.config.batch_size
        contenders.append(Contender(f"{n} device{'s' if n > 1 else ''}", f"devices={n}", scan_epoch, 1,
                                    {"devices": n, "batch": batch, "per_device_batch": batch // n, "steps": spe,
                                     "images": spe * batch, "structure": "scan", "options": "jaxcnn train's",
                                     "platform": trainer.mesh.devices.flat[0].platform}))
    return _add_images_per_s(measure(f"scaling/{model_name}", contenders, cfg, log))


def bench_scaling(cfg: BenchConfig, log) -> tuple[list[dict], dict, list[str]]:
    """Data-parallel throughput on 1, 2, 4 and 8 devices (those that exist).

    On the CPU the devices are simulated (``--xla_force_host_platform_device_count``), which must be set
    before JAX starts, so the measurement runs in a child process; the simulated devices share this
    machine's cores, so the table shows the cost of sharding and collectives, not a speed-up. On a GPU
    machine it runs here, over the real devices. Returns records, ratios against 1 device, and notes.
    """
    import subprocess

    import jax

    notes = []
    if cfg.device == "cpu":
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={max(SCALING_DEVICES)}").strip()
        child = subprocess.run([sys.executable, "-m", "jaxcnn.bench", "--scaling-worker",
                                json.dumps(_plain(dataclasses.asdict(cfg)))],
                               env=env, stdout=subprocess.PIPE, stderr=None, text=True, check=False)
        if child.returncode != 0:
            raise BenchError(f"scaling: the child process failed with exit status {child.returncode}")
        records = json.loads(child.stdout)
        notes.append(f"scaling: {max(SCALING_DEVICES)} simulated CPU devices sharing {os.cpu_count()} cores "
                     "(XLA_FLAGS=--xla_force_host_platform_device_count): no device adds hardware, so a ratio "
                     "above 1 means that per-device programs kept the cores busier than one program did")
    else:
        available = len(jax.devices(cfg.device))
        counts = [n for n in SCALING_DEVICES if n <= available]
        records = scaling_records(cfg, counts, log)
        if available < max(SCALING_DEVICES):
            notes.append(f"scaling: {available} {cfg.device} device(s) here; larger meshes not measured")
    ratios = {}
    one = next((r for r in records if r.get("devices") == 1 and r["status"] == "ok"), None)
    if one:
        ratios[records[0]["benchmark"]] = {f"images_per_s {r['devices']}/1 devices": 1 / round_ratio(r, one)
                                           for r in records if r["status"] == "ok" and r["devices"] != 1}
    return records, ratios, notes


def _scaling_worker(cfg_json: str) -> int:
    """The child process of :func:`bench_scaling`: records as JSON on stdout, progress on stderr."""
    fields = json.loads(cfg_json)
    cfg = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    records = scaling_records(cfg, SCALING_DEVICES, lambda s: print(s, file=sys.stderr, flush=True))
    print(to_json(records))
    return 0


# ---------------------------------------------------------------------------------------------------
# Targets and report


def evaluate_targets(report: dict) -> list[dict]:
    """The issue's targets, each with the measured value and whether it is met (``None``: not measured)."""
    ratios, recs, out = report["ratios"], report["results"], []

    def add(target, value, limit, higher_is_better=False, detail=""):
        met = None if value is None else (value >= limit if higher_is_better else value <= limit)
        out.append({"target": target, "value": value, "limit": limit, "met": met, "detail": detail})

    for m in report["config"]["models"]:
        r = ratios.get(f"step/{m}", {})
        add(f"step {m}: manual / autodiff <= 1.0", r.get("manual/autodiff"), 1.0, detail=r.get("manual/autodiff contenders", ""))
    for m in report["config"]["models"]:
        r = ratios.get(f"step/{m}", {})
        add(f"step {m}: manual / torch eager <= 1.0", r.get("manual/torch"), 1.0, detail=r.get("manual/torch contenders", ""))
    r = ratios.get("step/small_cnn", {})
    add("step small_cnn: manual / torch.compile <= 1.0", r.get("manual/torch.compile"), 1.0,
        detail=r.get("manual/torch.compile contenders", ""))
    best = best_of([x for x in recs if x["benchmark"] == "step/small_cnn"], "manual")
    add("step small_cnn: >= 60% of the measured matmul peak", best.get("peak_fraction") if best else None, 0.6,
        higher_is_better=True, detail=best["contender"] if best else "")
    for m in report["config"]["models"]:
        r = ratios.get(f"epoch/{m}", {})
        add(f"epoch {m}: scan images/s >= 1.2 x per-step loop", r.get("scan/loop images_per_s"), 1.2, higher_is_better=True)
    for m in report["config"]["models"]:
        r = ratios.get(f"step/{m}", {})
        vals = [v for k, v in r.items() if k.startswith("memory manual/autodiff")]
        add(f"step {m}: manual peak memory <= autodiff's", max(vals) if vals else None, 1.0,
            detail="XLA compiled memory analysis, one-step programs, worst option set")
    return out


def _versions() -> dict:
    import jax
    import jaxlib
    import optax

    v = {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
         "optax": optax.__version__, "numpy": np.__version__}
    for mod in ("torch", "flax"):
        try:
            v[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return v


def _machine(cfg: BenchConfig) -> dict:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = jax.devices(cfg.device)[0]
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "device": str(dev),
            "device_kind": getattr(dev, "device_kind", "")}


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_benchmarks(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict:
    """Runs the configured sections; returns the report (what ``--json`` writes)."""
    import jax

    t_start = time.perf_counter()
    raw_log = log

    def log(message):  # noqa: F811 - every line says when it happened
        raw_log(f"[{time.perf_counter() - t_start:6.1f} s] {message}")

    cfg = cfg.resolved()
    bad = [m for m in cfg.models if m not in BATCH]
    if bad:
        raise BenchError(f"--models: {bad[0]!r} is not benchmarked; choose from {', '.join(BATCH)}")
    bad = [s for s in cfg.sections if s not in SECTIONS]
    if bad:
        raise BenchError(f"--sections: unknown section {bad[0]!r}; choose from {', '.join(SECTIONS)}")
    try:
        device = jax.devices(cfg.device)[0]
    except RuntimeError as e:
        raise BenchError(f"--device {cfg.device}: no such JAX backend here ({str(e).splitlines()[0][:160]})") from None
    notes: list[str] = []
    started = time.perf_counter()
    load_start = _load()
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "jaxcnn bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None,
        "config": dataclasses.asdict(cfg),
        "machine": _machine(cfg),
        "versions": _versions(),
        "results": [],
        "ratios": {},
        "notes": notes,
    }
    with jax.default_device(device):
        opts = option_sets(cfg, lambda s: notes.append(s) or log(s))
        report["option_sets"] = {k: v for k, v in opts.items()}
        peak = float("nan")
        if "peak" in cfg.sections:
            log("peak: float32 matmul")
            recs, peak = bench_peak(cfg, opts, log)
            report["results"] += recs
        report["peak_gflops"] = peak
        if "ops" in cfg.sections:
            log("ops: per-op formulations vs jax.vjp")
            recs, ratios = bench_ops(cfg, opts, log)
            report["results"] += recs
            report["ratios"].update(ratios)
        if "steps" in cfg.sections:
            log("steps: whole train step, manual vs autodiff vs peers")
            recs, ratios, flops = bench_steps(cfg, opts, log, notes)
            report["results"] += recs
            report["ratios"].update(ratios)
            report["flops_per_image"] = flops
        if "epoch" in cfg.sections:
            log("epoch: Trainer.run_steps, scan vs per-step loop")
            recs, ratios = bench_epoch(cfg, opts, log)
            report["results"] += recs
            report["ratios"].update(ratios)
        if "scaling" in cfg.sections:
            log(f"scaling: one training epoch on {', '.join(map(str, SCALING_DEVICES))} devices")
            recs, ratios, more = bench_scaling(cfg, log)
            report["results"] += recs
            report["ratios"].update(ratios)
            for n in more:
                notes.append(n)
                log(n)
    report["targets"] = evaluate_targets(report)
    report["load_average"] = {"start": load_start, "end": _load()}
    report["wall_s"] = time.perf_counter() - started
    return report


def _fmt(v, spec=".2f"):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def op_pivot(records: list[dict]) -> list[str]:
    """Per-op medians (ms) as one row per op and one column per contender, each cell the best over the
    compile-option sets (which one in brackets), the fastest in bold; pruned contenders show ``>`` their
    warm-up time."""
    def base(name):
        return name.split("[")[0]

    columns = sorted(dict.fromkeys(base(r["contender"]) for r in records), key=lambda c: (not c.startswith("autodiff"), c))
    lines = ["| op | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for bench in dict.fromkeys(r["benchmark"] for r in records):
        rows = [r for r in records if r["benchmark"] == bench]
        cells, best_ms = {}, min((r["median_ms"] for r in rows if r["status"] == "ok"), default=None)
        for col in columns:
            mine = [r for r in rows if base(r["contender"]) == col and r.get("median_ms") is not None]
            ok = [r for r in mine if r["status"] == "ok"]
            if ok:
                r = min(ok, key=lambda r: r["median_ms"])
                text = f"{r['median_ms']:.3f} [{r.get('options', '')}]"
                cells[col] = f"**{text}**" if r["median_ms"] == best_ms else text
            elif mine:
                cells[col] = f">{min(r['median_ms'] for r in mine):.1f} (pruned)"
            else:
                cells[col] = ""
        lines.append(f"| {bench} | " + " | ".join(cells[c] for c in columns) + " |")
    return lines


def format_markdown(report: dict) -> str:
    """The report as markdown tables: step and epoch results, targets, ratios, then every per-op record."""
    lines = []
    m = report["machine"]
    v = report["versions"]
    lines.append(f"Machine: {m['cpu']}, {m['cores']} cores, device {m['device']}; "
                 + ", ".join(f"{k} {x}" for k, x in v.items()) + ".")
    if report.get("load_average"):
        lines.append(f"Load average (1, 5, 15 min) at start {report['load_average']['start']}, "
                     f"at end {report['load_average']['end']}.")
    lines.append(f"Measured matmul peak: {_fmt(report.get('peak_gflops'), '.1f')} GFLOP/s.")
    lines.append("")
    recs = report["results"]
    steps = [r for r in recs if r["benchmark"].startswith(("step/", "epoch/", "peak/", "scaling/"))]
    if steps:
        lines += ["| benchmark | contender | median ms | p25-p75 ms | GFLOP/s | % peak | images/s | memory MB | note |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in steps:
            mem = r.get("memory_bytes")
            lines.append(
                f"| {r['benchmark']} | {r['contender']} | {_fmt(r.get('median_ms'))} | "
                f"{_fmt(r.get('p25_ms'))}-{_fmt(r.get('p75_ms'))} | {_fmt(r.get('gflops'), '.1f')} | "
                f"{_fmt(100 * r['peak_fraction'] if r.get('peak_fraction') else None, '.0f')} | "
                f"{_fmt(r.get('images_per_s'), ',.0f')} | {_fmt(mem / 2**20 if mem else None, '.1f')} | "
                f"{r.get('note', '') if r['status'] != 'ok' else ''} |")
        lines.append("")
    if report.get("targets"):
        lines += ["| target | measured | met |", "|---|---:|---|"]
        for t in report["targets"]:
            met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
            lines.append(f"| {t['target']} | {_fmt(t['value'], '.3f')} | {met} |")
        lines.append("")
    if report["ratios"]:
        keys = sorted({k for r in report["ratios"].values() for k in r if not k.endswith("contenders")})
        lines += ["| benchmark | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
        for b, r in report["ratios"].items():
            lines.append(f"| {b} | " + " | ".join(_fmt(r.get(k), ".3f") for k in keys) + " |")
        lines.append("")
    opsr = [r for r in recs if r["benchmark"].startswith("op/")]
    if opsr:
        lines += op_pivot(opsr)
        lines.append("")
    for n in report.get("notes", []):
        lines.append(f"- {n}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Command line


def add_parser(sub) -> None:
    """Registers ``jaxcnn bench`` on an ``argparse`` subparsers object."""
    p = sub.add_parser(
        "bench", help="benchmark hand-written vs autodiff gradients (and PyTorch/Flax when installed)",
        description="Time per-op formulations, whole train steps and whole epochs of the zoo models with "
                    "hand-written and jax.grad gradients, contenders alternated round by round; print markdown "
                    "tables of medians and ratios and optionally write every figure as JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"), help="JAX backend to run on")
    p.add_argument("--quick", action="store_true", help="small sizes and two rounds (a smoke test, not a measurement)")
    p.add_argument("--json", default=None, metavar="FILE", help="write every figure to this JSON file")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(BATCH), help="zoo models to benchmark")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS), help="what to run")
    p.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS),
                   help="optional peers, used when installed (none: pass --peers with no value)")
    p.add_argument("--options", nargs="+", default=None, choices=list(CPU_OPTION_SETS),
                   help="compile-option sets to try (default: every set this jaxlib supports)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per benchmark (default 9, --quick 2)")
    p.add_argument("--batch", type=int, default=None, help="one batch size for every model (default: per model)")


def run(args) -> int:
    """Runs ``jaxcnn bench`` from parsed arguments; returns the exit status."""
    if args.rounds is not None and args.rounds < 1:
        raise BenchError(f"--rounds must be >= 1, got {args.rounds}")
    if args.batch is not None and args.batch < 1:
        raise BenchError(f"--batch must be >= 1, got {args.batch}")
    if args.json:
        parent = Path(args.json).resolve().parent
        if not parent.is_dir():
            raise BenchError(f"--json: directory {parent} does not exist")
    cfg = BenchConfig(device=args.device, quick=args.quick, models=tuple(args.models), sections=tuple(args.sections),
                      peers=tuple(args.peers), option_sets=tuple(args.options) if args.options else None,
                      rounds=args.rounds, batch=args.batch)
    report = run_benchmarks(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_markdown(report))
    if args.json:
        Path(args.json).write_text(to_json(report))
    return 0


def _plain(o):
    """JSON-safe copy: tuples become lists, NumPy scalars Python numbers, NaN and infinities ``null``."""
    if isinstance(o, dict):
        return {str(k): _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if o is None or isinstance(o, (str, int, float, bool)):
        return o
    return str(o)


def to_json(report: dict) -> str:
    """The report as strict JSON (no NaN)."""
    return json.dumps(_plain(report), indent=1, allow_nan=False)


if __name__ == "__main__":  # only as the scaling section's child process; users run ``jaxcnn bench``
    if sys.argv[1:2] != ["--scaling-worker"] or len(sys.argv) != 3:
        sys.exit("python -m jaxcnn.bench is internal; run `jaxcnn bench --help`")
    sys.exit(_scaling_worker(sys.argv[2]))
