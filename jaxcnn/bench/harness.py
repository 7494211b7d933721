"""How ``jaxcnn bench`` times and compares: contenders alternated round by round, medians over rounds,
per-round ratios, the best of a family, compilation with XLA options, compiled memory.

The contenders of one benchmark are compiled first, warmed up, then timed **round by round**, each round
running every contender once in a rotated order, so that a change in machine load hits all of them
alike; a record reports the median (and quartiles) over rounds, never a single timing, and a ratio is the
median over rounds of the per-round ratio.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from jaxcnn.bench.config import BASELINES, CPU_EXTRA_OPTION_SETS, CPU_OPTION_SETS, BenchConfig, BenchError


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


def _failure(e: Exception) -> str:
    first = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def measure(
    benchmark: str, contenders: list[Contender], cfg: BenchConfig, log: Callable[[str], None] | None = None
) -> list[dict]:
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
            warm[c.name] = ("failed", _failure(e))
    ran = [c for c in contenders if not isinstance(warm[c.name], tuple)]

    def family_best():
        best: dict[str, float] = {}
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
    samples: dict[str, list[float]] = {c.name: [] for c in live}
    assert cfg.rounds is not None  # set by BenchConfig.resolved()
    for r in range(cfg.rounds):
        k = r % max(len(live), 1)
        for c in live[k:] + live[:k]:
            samples[c.name].append(_time(c.fn, reps[c.name]) / (reps[c.name] * c.work))
    records = []
    for c in contenders:
        rec = {"benchmark": benchmark, "contender": c.name, "family": c.family, **c.info}
        if c.name in samples:
            s = samples[c.name]
            rec.update(
                status="ok",
                median_ms=1e3 * statistics.median(s),
                p25_ms=1e3 * _percentile(s, 25),
                p75_ms=1e3 * _percentile(s, 75),
                min_ms=1e3 * min(s),
                rounds=len(s),
                reps=reps[c.name],
                samples_ms=[1e3 * v for v in s],
            )
        elif isinstance(warm[c.name], tuple):
            rec.update(status="failed", median_ms=None, note=warm[c.name][1])
        else:
            rec.update(
                status="pruned",
                median_ms=1e3 * warm[c.name],
                rounds=0,
                note=f"not timed further: its warm-up run took {warm[c.name] / best[c.family]:.1f}x "
                f"the best {c.family} contender's",
            )
        records.append(rec)
    if log:
        top = min((r for r in records if r["status"] == "ok"), key=lambda r: r["median_ms"], default=None)
        if top:
            log(f"  {benchmark}: best {top['contender']} {top['median_ms']:.3f} ms")
    return records


# ---------------------------------------------------------------------------------------------------
# Comparing records


def best_of(records: list[dict], family: str | Iterable[str]) -> dict | None:
    """The timed record of ``family`` (a name, or several: the best over all of them) with the lowest
    median; pruned and failed records do not count."""
    families = {family} if isinstance(family, str) else set(family)
    ok = [r for r in records if r["family"] in families and r["status"] == "ok"]
    return min(ok, key=lambda r: r["median_ms"]) if ok else None


def round_ratio(a: dict, b: dict) -> float:
    """Median over rounds of ``a``'s time / ``b``'s time in the same round."""
    return float(statistics.median(x / y for x, y in zip(a["samples_ms"], b["samples_ms"], strict=True)))


def compare(out: dict, key: str, a: dict | None, b: dict | None, invert: bool = False) -> None:
    """Sets ``out[key]`` to :func:`round_ratio` of records ``a`` and ``b`` (its inverse with ``invert``, for
    throughputs) and ``out[key + " contenders"]`` to the two contenders' names, when both records exist."""
    if a and b:
        ratio = round_ratio(a, b)
        out[key] = 1 / ratio if invert else ratio
        out[f"{key} contenders"] = f"{a['contender']} / {b['contender']}"


def family_ratios(
    records: list[dict], num: str = "manual", dens: Iterable[str] = (*BASELINES, "torch", "torch.compile")
) -> dict:
    """``{"manual/autodiff": ..., "manual/torch": ...}`` between the best contender of each family, with
    ``"manual/autodiff contenders"`` naming the two records compared."""
    out: dict[str, float | str] = {}
    a = best_of(records, num)
    for den in dens:
        compare(out, f"{num}/{den}", a, best_of(records, den))
    return out


def headline_ratios(
    records: list[dict],
    num: str = "manual",
    baselines: Iterable[str] = BASELINES,
    peers: Iterable[str] = ("torch", "torch.compile"),
) -> dict:
    """``"manual/best_autodiff"``: the best ``num`` contender against the fastest contender of any of
    ``baselines`` (``jax.grad`` of either forward, Flax), then the per-family ratios of
    :func:`family_ratios`."""
    baselines = tuple(baselines)
    out: dict[str, float | str] = {}
    compare(out, f"{num}/best_autodiff", best_of(records, num), best_of(records, baselines))
    out.update(family_ratios(records, num, (*baselines, *peers)))
    return out


TRAINING_STRUCTURES = ("scan", "loop")  # how the training loop runs the step; how a user's own loop calls it


def training_ratios(
    records: list[dict],
    num: str = "manual",
    baselines: Iterable[str] = BASELINES,
    peers: Iterable[str] = ("torch", "torch.compile"),
) -> dict:
    """The ``num`` step in the configuration training runs (the training loop's compile options), in each
    of :data:`TRAINING_STRUCTURES`, against the best contender of ``baselines`` (as one family,
    ``best_autodiff``) and of each peer family, each at its best structure and options:
    ``"manual[scan]/torch.compile"``, ``"manual[loop]/best_autodiff"``... Structures not timed with the
    training options (``--quick`` compiles one option set) are left out."""
    out: dict[str, float | str] = {}
    dens = [("best_autodiff", best_of(records, baselines))] + [(p, best_of(records, p)) for p in peers]
    for structure in TRAINING_STRUCTURES:
        mine = [
            r for r in records if r["family"] == num and r.get("structure") == structure and r.get("training_options")
        ]
        for name, b in dens:
            compare(out, f"{num}[{structure}]/{name}", best_of(mine, num), b)
    return out


def memory_ratios(records: list[dict], num: str = "manual", baselines: Iterable[str] = BASELINES) -> dict:
    """Compiled memory of ``num``'s program against that of the best baseline contender
    (``"memory manual/best_autodiff"``) and of each baseline family's best, each time the ``num`` program
    of the same compile options and, when it was compiled, the same structure (one step or a scan), so that
    like is compared with like; the ``contenders`` entry names the two programs."""
    baselines = tuple(baselines)
    out: dict[str, float | str] = {}
    pairs = [("best_autodiff", best_of(records, baselines))] + [(f, best_of(records, f)) for f in baselines]
    for key, den in pairs:
        if not den or not den.get("memory_bytes"):
            continue
        same = [
            r
            for r in records
            if r["family"] == num and r.get("memory_bytes") and r.get("options") == den.get("options")
        ]
        # The same structure when it was compiled (a --quick run compiles one structure per route).
        mine = next((r for r in same if r.get("structure") == den.get("structure")), same[0] if same else None)
        if mine:
            out[f"memory {num}/{key}"] = mine["memory_bytes"] / den["memory_bytes"]
            out[f"memory {num}/{key} contenders"] = f"{mine['contender']} / {den['contender']}"
    return out


# ---------------------------------------------------------------------------------------------------
# Compilation


def option_sets(cfg: BenchConfig, log: Callable[[str], None] | None = None) -> dict[str, dict]:
    """The compile-option sets to try on this device, each verified to exist in this jaxlib."""
    import jax
    import jax.numpy as jnp

    if cfg.device != "cpu":
        return {"default": {}}
    known = {**CPU_OPTION_SETS, **CPU_EXTRA_OPTION_SETS}
    names = cfg.option_sets or tuple(CPU_OPTION_SETS)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BenchError(f"--options: unknown option set {unknown[0]!r}; choose from {', '.join(known)}")
    probe = jax.jit(lambda a: a @ a).lower(jnp.ones((8, 8), jnp.float32))
    out = {}
    for name in names:
        try:
            probe.compile(compiler_options=dict(known[name]))
        except Exception as e:  # XLA rejects option names it does not know
            if log:
                log(
                    f"note: compile-option set {name!r} is not supported by this jaxlib "
                    f"({str(e).splitlines()[0][:120]}); skipped"
                )
            continue
        out[name] = known[name]
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


# ---------------------------------------------------------------------------------------------------
# Train steps as a user's loop and as a scan


def loop_and_scan(
    one_step,
    scan_steps,
    state,
    x,
    target,
    steps: int,
    opts: dict,
    name: str,
    family: str,
    info: dict,
    structures=("loop", "scan"),
) -> list[Contender]:
    """Contenders that train ``steps`` steps on the batch ``(x, target)``, under every option set in ``opts``:

    * ``"loop"``: ``one_step(state, x, target, key) -> (state, metrics)``, compiled, called once per step
      from Python (how a user calls a jitted train step);
    * ``"scan"``: ``scan_steps(state, images, targets, batch_indices, first_step) -> (state, metrics)``,
      compiled, called once on ``steps`` rows of batch indices into the device-resident ``images`` (here
      the batch itself), as the training loop runs it.

    The state is donated in both, as in training. Each record's ``runs`` names the function compiled, and
    ``training_options`` says whether its option set is the one the training loop compiles with.
    """
    import jax
    import jax.numpy as jnp

    from jaxcnn.train.runtime import default_compiler_options

    key = jax.random.PRNGKey(0)
    indices = jnp.tile(jnp.arange(x.shape[0], dtype=jnp.int32), (steps, 1))
    first = jnp.int32(0)
    programs = {"loop": (one_step, (state, x, target, key)), "scan": (scan_steps, (state, x, target, indices, first))}
    out = []
    for oname, o in opts.items():
        for structure in structures:
            fn, args = programs[structure]
            t0 = time.perf_counter()
            compiled = compile_with(fn, args, o, donate=(0,))
            compile_s = time.perf_counter() - t0
            holder = [jax.tree_util.tree_map(jnp.copy, state)]
            if structure == "loop":

                def run(c=compiled, h=holder):
                    s = h[0]
                    for _ in range(steps):
                        s, _metrics = c(s, x, target, key)
                    h[0] = jax.block_until_ready(s)
            else:

                def run(c=compiled, h=holder):
                    h[0] = jax.block_until_ready(c(h[0], x, target, indices, first)[0])

            out.append(
                Contender(
                    f"{name}[{structure},{oname}]",
                    family,
                    run,
                    steps,
                    {
                        **info,
                        "structure": structure,
                        "options": oname,
                        "training_options": o == default_compiler_options(),
                        "runs": function_name(fn),
                        "compile_s": compile_s,
                        **memory_bytes(compiled),
                    },
                )
            )
    return out


def function_name(fn) -> str:
    """``module.qualname`` of a function, of the function inside a ``functools.partial``."""
    while hasattr(fn, "func"):
        fn = fn.func
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
