"""One benchmark run: the configured sections in order, collected into the report ``--json`` writes."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from typing import Any

from jaxcnn import provenance
from jaxcnn.bench import peak, per_example, per_op, sections
from jaxcnn.bench.config import BATCH, SCALING_DEVICES, SCHEMA_VERSION, SECTIONS, BenchConfig, BenchError
from jaxcnn.bench.harness import option_sets
from jaxcnn.bench.report import evaluate_targets


def run_benchmarks(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict:
    """Runs the configured sections; returns the report (what ``--json`` writes)."""
    import jax

    t_start = time.perf_counter()

    def stamped(message):  # every line says when it happened
        log(f"[{time.perf_counter() - t_start:6.1f} s] {message}")

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
    load_start = provenance.load_average()
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "created": provenance.utc_now(),
        "command": "jaxcnn bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None,
        "config": dataclasses.asdict(cfg),
        "machine": provenance.machine(device),
        "versions": provenance.versions(),
        "results": [],
        "ratios": {},
        "notes": notes,
    }

    def note(message):
        notes.append(message)
        stamped(message)

    with jax.default_device(device):
        opts = option_sets(cfg, note)
        report["option_sets"] = dict(opts)
        report["peak_gflops"] = float("nan")
        if "peak" in cfg.sections:
            stamped("peak: FMA throughput and float32 matmuls")
            recs, best = peak.bench_peak(cfg, opts, stamped)
            report["results"] += recs
            report["peak_gflops"] = best
        if "ops" in cfg.sections:
            stamped("ops: per-op formulations vs jax.vjp")
            recs, ratios = per_op.bench_ops(cfg, opts, stamped)
            report["results"] += recs
            report["ratios"].update(ratios)
        if "steps" in cfg.sections:
            stamped("steps: train_step and run_steps, manual vs autodiff routes vs peers")
            recs, ratios, flops = sections.bench_steps(cfg, opts, stamped, notes)
            report["results"] += recs
            report["ratios"].update(ratios)
            report["flops_per_image"] = flops
        if "epoch" in cfg.sections:
            stamped("epoch: Trainer.train_chunk over one epoch, as jaxcnn train runs it")
            recs, ratios = sections.bench_epoch(cfg, opts, stamped)
            report["results"] += recs
            report["ratios"].update(ratios)
        if "scaling" in cfg.sections:
            stamped(f"scaling: one training epoch on {', '.join(map(str, SCALING_DEVICES))} devices")
            recs, ratios, more = sections.bench_scaling(cfg, stamped)
            report["results"] += recs
            report["ratios"].update(ratios)
            for n in more:
                note(n)
        if "per_example" in cfg.sections:
            stamped("per_example: per-example gradient norms and a DP-SGD step, manual vs vmap(jax.grad)")
            recs, ratios = per_example.bench_per_example(cfg, opts, stamped, notes)
            report["results"] += recs
            report["ratios"].update(ratios)
    report["targets"] = evaluate_targets(report)
    report["load_average"] = {"start": load_start, "end": provenance.load_average()}
    report["wall_s"] = time.perf_counter() - t_start
    return report
