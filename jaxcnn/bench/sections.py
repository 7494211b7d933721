"""The sections of ``jaxcnn bench`` that time training: ``steps``, ``epoch`` and ``scaling`` (``peak`` is
:mod:`jaxcnn.bench.peak`, ``ops`` :mod:`jaxcnn.bench.per_op`).

Every contender times the functions training runs, nothing rebuilt for the benchmark:

* ``steps``: :func:`jaxcnn.train.step.train_step` of a :func:`~jaxcnn.train.step.make_step` step, jitted
  and called once per step from Python (``loop``, how a user calls it), and
  :func:`jaxcnn.train.loop.run_steps`, the ``lax.scan`` of it that training runs (``scan``), for each
  gradient route of :mod:`jaxcnn.gradients`, under each compile-option set; peers when installed.
* ``epoch``: :meth:`jaxcnn.train.Trainer.train_chunk` over one epoch, chunk by chunk, exactly as
  :func:`jaxcnn.fit` and ``jaxcnn train`` run it (its compiled ``run_steps`` in the ``scan`` loop form, its
  ``run_step`` per batch in the ``step`` form), so that their images/s and the benchmark's are the same
  measurement.
* ``scaling``: that epoch with the batch sharded over 1, 2, 4 and 8 devices.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from jaxcnn import provenance
from jaxcnn.bench import peak, peers
from jaxcnn.bench.config import LR, ROUTES, SCALING_DEVICES, BenchConfig, BenchError
from jaxcnn.bench.flops import model_flops
from jaxcnn.bench.harness import (
    Contender,
    best_of,
    compare,
    headline_ratios,
    loop_and_scan,
    measure,
    memory_ratios,
    round_ratio,
    training_ratios,
)


def _quiet(message: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------------
# Section: steps


def step_inputs(spec, batch: int):
    """A random batch ``(x, target)`` for a zoo spec: ``x (batch, *spec.input_shape[1:])`` in [0, 1) and
    the spec's targets of random digit labels."""
    import jax
    import jax.numpy as jnp

    x = jax.random.uniform(jax.random.PRNGKey(1), (batch, *spec.input_shape[1:]), jnp.float32)
    labels = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, 10)
    return x, spec.targets(labels)


def step_contenders(cfg: BenchConfig, model_name: str, opts: dict, routes=ROUTES, structures=None) -> list[Contender]:
    """The train step of the zoo model ``model_name`` (built with the default conv formulation) for each
    gradient route, as :func:`~jaxcnn.train.step.train_step` jitted and called per step (``loop``) and as
    :func:`~jaxcnn.train.loop.run_steps` (``scan``), under each option set; each route is its own family.
    ``structures`` maps a route to the structures to compile (default: both)."""
    import functools

    import jax

    from jaxcnn.models import get_model
    from jaxcnn.ops.conv import DEFAULT_METHOD
    from jaxcnn.train import config as train_config
    from jaxcnn.train import inputs, loop
    from jaxcnn.train import step as train_step_module

    spec = get_model(model_name)
    model = spec.build(conv_method=DEFAULT_METHOD)
    tx = train_config.make_optimizer(train_config.TrainConfig(lr=LR, schedule="constant"), 1)
    batch = cfg.batch_of(model_name)
    x, target = step_inputs(spec, batch)
    params, model_state, _ = model.init(jax.random.PRNGKey(0), (1, *x.shape[1:]))
    state = train_step_module.TrainState(params, model_state, tx.init(params))
    assert cfg.scan_steps is not None  # set by BenchConfig.resolved()
    out = []
    for route in routes:
        step = train_step_module.make_step(model, spec.loss, tx, grad=route)
        # Read from their modules when the contenders are built: what is timed is what jaxcnn.train defines.
        # The scan gathers each batch from the device-resident batch, unscaled and unshifted (augment 0), so
        # that both structures train on the same inputs.
        one_step = functools.partial(train_step_module.train_step, step)
        scan_steps = functools.partial(loop.run_steps, step, inputs.Scaling(), 0, jax.random.PRNGKey(0))
        out += loop_and_scan(
            one_step,
            scan_steps,
            state,
            x,
            target,
            cfg.scan_steps,
            opts,
            route,
            route,
            {"batch": batch, "route": route, "conv_method": DEFAULT_METHOD},
            (structures or {}).get(route, ("loop", "scan")),
        )
    return out


def quick_structures(cfg: BenchConfig) -> dict | None:
    """``--quick`` compiles each route in its usual best structure only (compilation dominates a smoke run):
    the manual step as the scan training runs, ``jax.grad`` as a per-step loop (on XLA:CPU a
    differentiated convolution is slowest inside ``lax.scan``)."""
    if not cfg.quick:
        return None
    return {"manual": ("scan",), "autodiff": ("loop",), "autodiff_same_forward": ("loop",)}


def bench_steps(cfg: BenchConfig, opts: dict, log, notes: list) -> tuple[list[dict], dict, dict]:
    from jaxcnn.models import get_model

    records, ratios, flops = [], {}, {}
    K = cfg.scan_steps
    torch_peer = peers.torch_peer(cfg, notes)
    flax_peer = peers.flax_peer(cfg, notes)
    for model_name in cfg.models:
        spec = get_model(model_name)
        batch = cfg.batch_of(model_name)
        flops[model_name] = model_flops(spec.build(), spec.input_shape)
        contenders = step_contenders(cfg, model_name, opts, structures=quick_structures(cfg))
        if flax_peer is not None:
            contenders += flax_peer(model_name, batch, K, opts)
        if torch_peer is not None:
            contenders += torch_peer(model_name, batch, K)
        # The peak programs run in the same rounds, so that the fraction of peak compares like with like.
        contenders += peak.peak_contenders(cfg, opts)
        recs = measure(f"step/{model_name}", contenders, cfg, log)
        peaks_here = peak.add_peak_fractions(recs, flops[model_name] * batch)
        records.extend(recs)
        r = ratios[f"step/{model_name}"] = headline_ratios(recs)
        r.update(training_ratios(recs))
        r.update({f"{kind} GFLOP/s in these rounds": v for kind, v in peaks_here.items()})
        r.update(memory_ratios(recs))
    return records, ratios, flops


# ---------------------------------------------------------------------------------------------------
# Section: epoch


def training_set(cfg: BenchConfig, model_name: str):
    """``(images, targets)``: the bundled MNIST subset (``cfg.epoch_examples`` of it), targets as the zoo
    spec makes them from the digit labels."""
    import numpy as np

    from jaxcnn import data as jdata
    from jaxcnn.models import get_model

    dataset = jdata.load_dataset(jdata.OFFLINE_NAME, train_limit=cfg.epoch_examples, log=_quiet)
    return dataset.train_images, np.asarray(get_model(model_name).targets(dataset.train_labels))


def epoch_trainer(
    cfg: BenchConfig,
    model_name: str,
    train,
    options: dict | None,
    *,
    devices: int | None = 1,
    grad: str = "manual",
    loop: str = "auto",
):
    """The :class:`~jaxcnn.train.Trainer` that ``jaxcnn train --model model_name --grad grad --loop loop``
    builds (the zoo model with the default conv formulation, every other setting its training default) at
    the benchmark's batch size, on ``devices`` devices; ``options=None`` takes the training loop's own
    compile options."""
    from jaxcnn.models import get_model
    from jaxcnn.train import TrainConfig, Trainer

    spec = get_model(model_name)
    config = TrainConfig(model=model_name, **epoch_settings(cfg, model_name, grad=grad, loop=loop, devices=devices))
    return Trainer(
        spec.build(conv_method=config.conv_method), spec.loss, train, None, config, compiler_options=options, log=_quiet
    )


def epoch_settings(cfg: BenchConfig, model_name: str, *, grad: str = "manual", loop: str = "auto", devices=1) -> dict:
    """The :class:`~jaxcnn.train.TrainConfig` settings (besides ``model``) of the epoch benchmark; every
    other setting keeps its field default."""
    return {"batch_size": cfg.batch_of(model_name), "lr": LR, "grad": grad, "loop": loop, "devices": devices}


def epoch_runner(trainer) -> Callable[[], None]:
    """``fn()`` trains one epoch (epoch 0's batch order) as :func:`jaxcnn.fit` does: ``trainer.train_chunk``
    on ``config.chunk_steps`` batches at a time, reading each chunk's losses back to the host. Keeps its
    own training state; the batch indices go to the device inside the timed region, as in training."""
    import jax

    from jaxcnn.train.runtime import host

    spe, batches = trainer.steps_per_epoch, trainer.epoch_batches(0)
    chunk = trainer.config.chunk_steps
    holder = [trainer.init_state()]

    def fn():
        state = holder[0]
        for begin in range(0, spe, chunk):
            state, metrics = trainer.train_chunk(state, batches[begin : begin + chunk], begin)
            host(metrics["loss"])
        holder[0] = jax.block_until_ready(state)

    return fn


EPOCH_FORMS = ("scan", "step")  # the loop forms of jaxcnn.train: a lax.scan per chunk, a compiled call per step
# The forms timed per route over a whole epoch. The autodiff route's scanned form is left to the steps
# section, which times it over 8 steps and prunes it there: XLA:CPU runs jax.grad's convolution gradients
# so much slower inside lax.scan (about 100x for small_cnn) that one epoch of it would take minutes.
EPOCH_FORMS_OF = {"manual": EPOCH_FORMS, "autodiff": ("step",)}


def epoch_contenders(
    cfg: BenchConfig, model_name: str, train, opts: dict, grads=("manual", "autodiff"), forms=EPOCH_FORMS
) -> list[Contender]:
    """Per option set, gradient route in ``grads`` and loop form in ``forms``: one epoch of
    ``Trainer.train_chunk`` as ``jaxcnn train --grad G --loop F`` runs it. Each (route, form) is its own
    family ``"G-F"``, so that no form is pruned for being slower than the other."""
    from jaxcnn.train.runtime import default_compiler_options

    out = []
    for oname, o in opts.items():
        for grad in grads:
            for form in (f for f in forms if f in EPOCH_FORMS_OF[grad]):
                trainer = epoch_trainer(cfg, model_name, train, o, grad=grad, loop=form)
                spe, c = trainer.steps_per_epoch, trainer.config
                auto = default_form(grad)
                out.append(
                    Contender(
                        f"{grad}[{form},{oname}]",
                        f"{grad}-{form}",
                        epoch_runner(trainer),
                        1,
                        {
                            "batch": c.batch_size,
                            "steps": spe,
                            "images": spe * c.batch_size,
                            "options": oname,
                            "training_options": o == default_compiler_options(),
                            "grad": grad,
                            "structure": trainer.loop,
                            "training_default_form": form == auto,
                            "chunk_steps": c.chunk_steps,
                            "conv_method": c.conv_method,
                            "augment": c.augment,
                            "schedule": c.schedule,
                            "runs": "jaxcnn.train.Trainer.train_chunk",
                        },
                    )
                )
    return out


def fit_against_benchmark(cfg: BenchConfig, model_name: str, train, log) -> dict:
    """Whether :func:`jaxcnn.fit` trains at the speed the benchmark reports: ``jaxcnn.fit`` with the epoch
    benchmark's settings runs ``cfg.rounds + 1`` epochs, and after each (from its per-epoch log call) the
    benchmark's own epoch (the training loop's compile options and default loop form) runs once, so that the
    two alternate. Returns fit's images/s per epoch from its history (the first, which compiles, left out),
    the benchmark's in the same rounds, and the median of the per-round ratios fit / benchmark."""
    import statistics
    import time

    from jaxcnn.models import get_model
    from jaxcnn.train import fit

    spec = get_model(model_name)
    trainer = epoch_trainer(cfg, model_name, train, None)
    run_epoch, images = epoch_runner(trainer), trainer.steps_per_epoch * trainer.config.batch_size
    run_epoch()  # compiles
    bench_ips: list[float] = []

    def after_each_epoch(line: str) -> None:
        if line.startswith("epoch "):  # fit's per-epoch line; the others are set-up
            t0 = time.perf_counter()
            run_epoch()
            bench_ips.append(images / (time.perf_counter() - t0))

    settings = epoch_settings(cfg, model_name)
    assert cfg.rounds is not None  # set by BenchConfig.resolved()
    result = fit(
        spec.build(conv_method=trainer.config.conv_method),
        spec.loss,
        train,
        epochs=cfg.rounds + 1,
        log=after_each_epoch,
        progress=False,
        **settings,
    )
    fit_ips = [h["images_per_s"] for h in result.history][1:]
    ratio = statistics.median(f / b for f, b in zip(fit_ips, bench_ips[1:], strict=True))
    log(f"  epoch/{model_name}: jaxcnn.fit {statistics.median(fit_ips):,.0f} images/s, fit / benchmark {ratio:.3f}")
    return {
        "fit images_per_s": statistics.median(fit_ips),
        "benchmark images_per_s in the same rounds": statistics.median(bench_ips[1:]),
        "fit/benchmark images_per_s": ratio,
    }


def default_form(grad: str) -> str:
    """The loop form ``jaxcnn train --grad grad`` uses by default (``--loop auto``)."""
    from jaxcnn.train import TrainConfig
    from jaxcnn.train.loop import loop_form

    return loop_form(TrainConfig(grad=grad))


def _add_images_per_s(recs: list[dict]) -> list[dict]:
    for r in recs:
        if r.get("median_ms"):
            r["images_per_s"] = r["images"] / (r["median_ms"] * 1e-3)
    return recs


def bench_epoch(cfg: BenchConfig, opts: dict, log) -> tuple[list[dict], dict]:
    """Images/s of one training epoch of the bundled MNIST subset as ``jaxcnn train`` runs it, for each
    gradient route (``--quick``: manual only) in each loop form, under each option set. Ratios: the manual
    route's scan form against its per-step form, and manual against autodiff each in the form it trains in
    by default (and each at its best)."""
    records: list[dict] = []
    ratios: dict[str, dict] = {}
    for model_name in cfg.models[:1] if cfg.quick else cfg.models:
        train = training_set(cfg, model_name)
        grads = ("manual",) if cfg.quick else ("manual", "autodiff")
        recs = _add_images_per_s(
            measure(f"epoch/{model_name}", epoch_contenders(cfg, model_name, train, opts, grads), cfg, log)
        )
        records.extend(recs)
        r = ratios[f"epoch/{model_name}"] = {}
        compare(r, "scan/step images_per_s", best_of(recs, "manual-scan"), best_of(recs, "manual-step"), invert=True)
        default = {g: best_of(recs, f"{g}-{default_form(g)}") for g in grads}
        compare(r, "manual/autodiff", default["manual"], default.get("autodiff"))
        r.update(fit_against_benchmark(cfg, model_name, train, log))
        best = {g: best_of(recs, [f"{g}-{f}" for f in EPOCH_FORMS]) for g in grads}
        compare(r, "manual/autodiff best forms", best["manual"], best.get("autodiff"))
    return records, ratios


# ---------------------------------------------------------------------------------------------------
# Section: scaling


def scaling_model(cfg: BenchConfig) -> str:
    """The model the scaling section trains: ``small_cnn`` when it is benchmarked (the heaviest), else the
    first; ``--quick``: the first (the cheapest to compile for four meshes)."""
    return "small_cnn" if "small_cnn" in cfg.models and not cfg.quick else cfg.models[0]


def scaling_records(cfg: BenchConfig, counts, log) -> list[dict]:
    """Images/s of one training epoch (``Trainer.train_chunk``, manual gradients, the training loop's
    compile options) on meshes of each device count in ``counts``, alternated round by round in this
    process. Every count gets its own family so that none is pruned for being slow."""
    model_name = scaling_model(cfg)
    train = training_set(cfg, model_name)
    contenders = []
    for n in counts:
        trainer = epoch_trainer(cfg, model_name, train, None, devices=n)
        spe, batch = trainer.steps_per_epoch, trainer.config.batch_size
        contenders.append(
            Contender(
                f"{n} device{'s' if n > 1 else ''}",
                f"devices={n}",
                epoch_runner(trainer),
                1,
                {
                    "devices": n,
                    "batch": batch,
                    "per_device_batch": batch // n,
                    "steps": spe,
                    "images": spe * batch,
                    "structure": "scan",
                    "options": "jaxcnn train's",
                    "platform": trainer.placement.mesh.devices.flat[0].platform,
                },
            )
        )
    return _add_images_per_s(measure(f"scaling/{model_name}", contenders, cfg, log))


def scaling_worker(cfg_json: str) -> int:
    """The child process of :func:`bench_scaling`: records as JSON on stdout, progress on stderr."""
    fields = json.loads(cfg_json)
    settings: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    cfg = BenchConfig(**settings)
    records = scaling_records(cfg, SCALING_DEVICES, lambda s: print(s, file=sys.stderr, flush=True))
    print(provenance.dumps(records))
    return 0


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
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={max(SCALING_DEVICES)}"
        ).strip()
        child = subprocess.run(
            [
                sys.executable,
                "-m",
                "jaxcnn.bench",
                "--scaling-worker",
                provenance.dumps(dataclasses.asdict(cfg), indent=None),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
            check=False,
        )
        if child.returncode != 0:
            raise BenchError(f"scaling: the child process failed with exit status {child.returncode}")
        records = json.loads(child.stdout)
        notes.append(
            f"scaling: {max(SCALING_DEVICES)} simulated CPU devices sharing {os.cpu_count()} cores "
            "(XLA_FLAGS=--xla_force_host_platform_device_count): no device adds hardware, so a ratio "
            "above 1 means that per-device programs kept the cores busier than one program did"
        )
    else:
        available = len(jax.devices(cfg.device))
        counts = [n for n in SCALING_DEVICES if n <= available]
        records = scaling_records(cfg, counts, log)
        if available < max(SCALING_DEVICES):
            notes.append(f"scaling: {available} {cfg.device} device(s) here; larger meshes not measured")
    ratios = {}
    one = next((r for r in records if r.get("devices") == 1 and r["status"] == "ok"), None)
    if one:
        ratios[records[0]["benchmark"]] = {
            f"images_per_s {r['devices']}/1 devices": 1 / round_ratio(r, one)
            for r in records
            if r["status"] == "ok" and r["devices"] != 1
        }
    return records, ratios, notes
