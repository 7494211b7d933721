"""Experiment 6 — speed: hand-written backward vs ``jax.grad``, per op and per train step, as bar charts.

The numbers come from the benchmark suite, ``jaxcnn bench`` (:mod:`jaxcnn.bench`), which times every
contender round by round in one process and reports medians:

* ``--bench-json FILE`` plots a report written earlier by ``jaxcnn bench --json FILE``;
* otherwise this script runs the suite's ``ops`` and ``steps`` sections itself (no peers, the default
  compile options) and keeps the raw report as ``bench.json``.

Each op is timed standalone (``jit``) and inside ``lax.scan`` (the setting of the training loop, where
XLA:CPU compiles some convolutions differently); each train step (forward, loss, backward, optax update)
as a jitted step called from Python (``loop``) and as a ``lax.scan`` over steps (``scan``).

The two families compared are the suite's ``manual`` (the hand-written backward passes, every formulation
the suite times, the fastest kept) and ``autodiff``: for an op, ``jax.vjp`` of the ``lax`` op; for a train
step, ``jax.grad`` of the forward pass an autodiff user writes (``lax`` convolutions, the route
``jaxcnn train --grad autodiff`` trains with), the fair baseline. The suite's other families (``jax.grad``
of the manual route's own forward pass, Flax, PyTorch) stay in its report, not in these plots.

Writes ``speed.md`` (tables of medians and manual/autodiff ratios), ``speed.json`` (the rows plotted,
with provenance), ``speed.csv``, ``speed_ops.png`` and ``speed_steps.png``.

    python experiments/speed.py [--out DIR] [--smoke] [--bench-json FILE] [--models ...] [--rounds N]
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``experiments`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from experiments import common

NAME = "speed"
FAMILIES = ("manual", "autodiff")


@dataclasses.dataclass(frozen=True)
class Config:
    bench_json: str | None = None  # plot this ``jaxcnn bench --json`` report instead of measuring
    models: tuple = ("seed_net", "lenet5", "small_cnn")
    rounds: int = 7
    sample_s: float = 0.1  # target length of one timed sample
    quick: bool = False  # the suite's quick mode (tiny batches): a smoke test, not a measurement
    seed: int = 0


SMOKE = dict(models=("seed_net",), rounds=2, quick=True)


def make_config(smoke: bool = False, **overrides) -> Config:
    return Config(**{**(SMOKE if smoke else {}), **overrides})


# ---------------------------------------------------------------------------------------------------
# Getting a report


def _from_suite(config: Config, log) -> dict:
    """Runs the ``ops`` and ``steps`` sections of :mod:`jaxcnn.bench` with modest settings."""
    from jaxcnn import bench

    fields = {f.name for f in dataclasses.fields(bench.BenchConfig)}
    wanted = dict(
        models=tuple(config.models),
        sections=("ops", "steps"),
        peers=(),
        option_sets=("default",),
        rounds=config.rounds,
        sample_s=config.sample_s,
        quick=config.quick,
    )
    cfg = bench.BenchConfig(**{k: v for k, v in wanted.items() if k in fields})
    report = bench.run_benchmarks(cfg, log=lambda s: log("  " + s.strip()))
    return json.loads(bench.to_json(report))


# ---------------------------------------------------------------------------------------------------
# Rows to plot


def _structure(r: dict) -> str:
    if r.get("structure"):
        return r["structure"]
    m = re.search(r"\[(loop|scan)", r["contender"])
    return m.group(1) if m else ("scan" if r["benchmark"].endswith("[scan]") else "jit")


def rows_from_report(report: dict) -> list[dict]:
    """One row per (benchmark, structure): the fastest timed manual and autodiff contender and their ratio.

    The ratio is the median over rounds of the per-round time ratio when both have per-round samples of the
    same length (as the suite measures them), else the ratio of medians."""
    groups: dict[tuple, dict] = {}
    for r in report.get("results", []):
        if r.get("family") not in FAMILIES or r.get("status", "ok") != "ok" or not r.get("median_ms"):
            continue
        bench = r["benchmark"].removesuffix("[scan]")
        # Each structure on its own, and for train steps also the best of each family over structures
        # (what the suite's manual/autodiff ratio compares; its --quick mode times one structure each).
        keys = [(bench, _structure(r))] + ([(bench, "best")] if bench.startswith("step/") else [])
        for key in keys:
            best = groups.setdefault(key, {})
            if r["family"] not in best or r["median_ms"] < best[r["family"]]["median_ms"]:
                best[r["family"]] = r
    # Contenders the suite stopped timing after warm-up (far slower than their family's best): keep their note.
    pruned = {
        (r["benchmark"].removesuffix("[scan]"), _structure(r), r["family"]): r
        for r in report.get("results", [])
        if r.get("family") in FAMILIES and r.get("status") == "pruned"
    }
    rows = []
    for (bench, structure), best in groups.items():
        if set(best) != set(FAMILIES):
            continue
        m, a = best["manual"], best["autodiff"]
        sm, sa = m.get("samples_ms"), a.get("samples_ms")
        ratio = (
            statistics.median(x / y for x, y in zip(sm, sa, strict=True))
            if sm and sa and len(sm) == len(sa)
            else m["median_ms"] / a["median_ms"]
        )
        kind = bench.split("/")[0]
        rows.append(
            {
                "kind": kind,
                "benchmark": bench,
                "structure": structure,
                "manual_contender": m["contender"],
                "manual_ms": m["median_ms"],
                "autodiff_contender": a["contender"],
                "autodiff_ms": a["median_ms"],
                "manual_over_autodiff": ratio,
                "batch": m.get("batch") or (m.get("x_shape") or [None])[0],
                "pruned": [p["contender"] for k, p in pruned.items() if k[:2] == (bench, structure)],
            }
        )
    order = {"step": 0, "op": 1}
    rows.sort(key=lambda r: (order.get(r["kind"], 2), r["benchmark"], r["structure"]))
    return rows


def run(out_dir, *, smoke: bool = False, command: str | None = None, log=None, **overrides) -> dict:
    config = make_config(smoke, **overrides)
    log = log or common.logger(NAME)
    out = common.out_dir(out_dir)
    env = common.environment(command or f"speed.run(smoke={smoke}, {overrides})")
    if config.bench_json:
        report = json.loads(Path(config.bench_json).read_text())
        source = f"`jaxcnn bench` report {config.bench_json}"
        log(f"read {len(report.get('results', []))} records from {config.bench_json}")
    else:
        log(
            f"running jaxcnn.bench sections ops, steps for {', '.join(config.models)} "
            f"({config.rounds} rounds{', quick' if config.quick else ''})"
        )
        report = _from_suite(config, log)
        source = "jaxcnn.bench.run_benchmarks (sections ops and steps, default compile options, no peers)"
        common.write_json(out / "bench.json", report)
    rows = rows_from_report(report)
    if not rows:
        raise SystemExit(f"{NAME}: the report holds no benchmark timed for both manual and autodiff")
    for r in rows:
        log(
            f"{r['benchmark']} [{r['structure']}]: manual {r['manual_ms']:.3f} ms, autodiff {r['autodiff_ms']:.3f} ms, "
            f"manual/autodiff {r['manual_over_autodiff']:.2f}"
        )
    summary = {
        "experiment": NAME,
        "environment": env,
        "config": dataclasses.asdict(config),
        "source": source,
        "bench_machine": report.get("machine"),
        "bench_versions": report.get("versions"),
        "bench_load_average": report.get("load_average"),
        "bench_created": report.get("created"),
        "rows": rows,
    }
    common.write_json(out / f"{NAME}.json", summary)
    common.write_csv(
        out / f"{NAME}.csv",
        rows,
        [
            "kind",
            "benchmark",
            "structure",
            "batch",
            "manual_contender",
            "manual_ms",
            "autodiff_contender",
            "autodiff_ms",
            "manual_over_autodiff",
        ],
    )
    (out / f"{NAME}.md").write_text(_markdown(summary))
    log(f"wrote {NAME}.md, {NAME}.json, {NAME}.csv" + ("" if config.bench_json else ", bench.json"))
    plt = common.pyplot(log)
    if plt is not None:
        _figures(plt, out, rows, summary, log)
    return summary


def _markdown(s: dict) -> str:
    env = s["environment"]
    lines = [
        "# Speed: hand-written backward vs jax.grad\n",
        f"Command: `{env['command']}` ({env['date_utc']}; jax {env['jax']}; {env['cpu_count']} CPUs, {env['cpu']}; "
        f"load average at start {env['load_average_1_5_15_min']}). Timings: {s['source']}"
        + (f", load average during the suite {s['bench_load_average']}" if s.get("bench_load_average") else "")
        + ".\n",
        "Each row: the fastest manual and the fastest autodiff contender of a benchmark (median ms per op or per "
        "step), and **manual / autodiff**, the median over rounds of the per-round time ratio (below 1: the "
        "hand-written backward is faster). **autodiff** is `jax.vjp` of the `lax` op for an op, and for a train "
        "step `jax.grad` of the forward pass an autodiff user writes (`lax` convolutions; `--grad autodiff`). "
        "`jit`: the op or step compiled alone; `loop`: a jitted train step "
        "called from Python; `scan`: inside `lax.scan`, as the training loop runs it; `best`: the fastest of "
        "each family over `loop` and `scan` (the suite's headline manual / autodiff ratio).\n",
    ]
    for kind, title in (("step", "Train steps (forward, loss, backward, SGD-momentum update)"), ("op", "Ops")):
        sel = [r for r in s["rows"] if r["kind"] == kind]
        if not sel:
            continue
        lines.append(f"## {title}\n")
        lines.append(
            common.markdown_table(
                [
                    "benchmark",
                    "structure",
                    "batch",
                    "manual ms",
                    "autodiff ms",
                    "manual / autodiff",
                    "contenders (manual; autodiff)",
                ],
                [
                    [
                        r["benchmark"],
                        r["structure"],
                        r["batch"] or "",
                        f"{r['manual_ms']:.3f}",
                        f"{r['autodiff_ms']:.3f}",
                        f"**{r['manual_over_autodiff']:.2f}**",
                        f"{r['manual_contender']}; {r['autodiff_contender']}",
                    ]
                    for r in sel
                ],
                "llrrrrl",
            )
        )
    return "\n".join(lines)


def _short(bench: str) -> str:
    return bench.replace("op/", "").replace("step/", "")


def _bars(ax, rows, title, xlabel):
    y = np.arange(len(rows))
    h = 0.38
    for k, fam in enumerate(FAMILIES):
        vals = [r[f"{fam}_ms"] for r in rows]
        ax.barh(
            y + (k - 0.5) * h, vals, h, color=common.COLORS[fam], label=fam if fam == "autodiff" else "manual backward"
        )
    for i, r in enumerate(rows):
        ratio = r["manual_over_autodiff"]
        ax.text(
            max(r["manual_ms"], r["autodiff_ms"]) * 1.15,
            i,
            f"{ratio:.2f}x",
            va="center",
            fontsize=8,
            color="#2ca02c" if ratio < 1 else "#d62728",
        )
    ax.set_yticks(y, [f"{_short(r['benchmark'])} [{r['structure']}]" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    common.plain_log_axis(ax, "x")
    lo = min(min(r["manual_ms"], r["autodiff_ms"]) for r in rows)
    hi = max(max(r["manual_ms"], r["autodiff_ms"]) for r in rows)
    ax.set_xlim(lo / 2, hi * 6)
    ax.set(xlabel=xlabel, title=title)
    ax.legend(loc="lower right", fontsize=8)


def _figures(plt, out: Path, rows, s, log) -> None:
    steps = [r for r in rows if r["kind"] == "step"]
    if steps:
        fig, ax = plt.subplots(figsize=(8, 0.5 * len(steps) + 1.6))
        _bars(
            ax,
            steps,
            "Time per train step (label: manual / autodiff; green = manual faster)",
            "milliseconds per step (median, log scale)",
        )
        fig.tight_layout()
        common.save_figure(fig, out / f"{NAME}_steps.png", log)
    ops_rows = [r for r in rows if r["kind"] == "op"]
    if ops_rows:
        structures = sorted({r["structure"] for r in ops_rows}, key=lambda v: (v != "jit", v))
        n = max(sum(r["structure"] == st for r in ops_rows) for st in structures)
        fig, axes = plt.subplots(1, len(structures), figsize=(7.5 * len(structures), 0.36 * n + 1.8), squeeze=False)
        for ax, st in zip(axes[0], structures, strict=True):
            label = {"jit": "compiled alone (jit)", "scan": "inside lax.scan, as in the training loop"}.get(st, st)
            _bars(
                ax,
                [r for r in ops_rows if r["structure"] == st],
                f"Ops, {label}",
                "milliseconds per op (median, log scale)",
            )
        fig.suptitle("Per-op time: hand-written backward vs jax.vjp (label: manual / autodiff)", y=1.0)
        fig.tight_layout()
        common.save_figure(fig, out / f"{NAME}_ops.png", log)


def main(argv=None) -> int:
    parser = common.base_parser(NAME, __doc__.splitlines()[0])
    d = Config()
    parser.add_argument("--bench-json", default=None, metavar="FILE", help="plot this `jaxcnn bench --json` report")
    parser.add_argument("--models", nargs="+", default=None, help=f"models to benchmark (default {' '.join(d.models)})")
    parser.add_argument("--rounds", type=int, default=None, help=f"timed rounds per benchmark (default {d.rounds})")
    args = parser.parse_args(argv)
    overrides = {"seed": args.seed, "bench_json": args.bench_json}
    if args.models:
        overrides["models"] = tuple(args.models)
    if args.rounds:
        overrides["rounds"] = args.rounds
    run(args.out, smoke=args.smoke, command=common.command_line(NAME, argv), **overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
