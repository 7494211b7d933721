"""The benchmark report: its targets, its markdown tables, and its JSON."""

from __future__ import annotations

import math

from jaxcnn import provenance
from jaxcnn.bench.harness import TRAINING_STRUCTURES, best_of, round_ratio

# Targets of the train step, in the configuration ``jaxcnn train`` runs (hand-written backward, default conv
# formulation, the training loop's compile options), as training runs it (``scan``) and as one jitted step
# called from Python (``loop``). Each limit is on manual time / the other's, lower is better.
STEP_TARGETS = {
    "torch.compile": {"seed_net": 0.9, "lenet5": 0.9, "small_cnn": 0.9},
    "best_autodiff": {"seed_net": 0.5, "lenet5": 0.5, "small_cnn": 0.8},
}
PEAK_TARGET = ("small_cnn", 0.5)  # the model whose step must reach this fraction of the float32 peak
FIT_TOLERANCE = 0.1  # jaxcnn.fit's epoch images/s within this fraction of the benchmark's


def evaluate_targets(report: dict) -> list[dict]:
    """The targets, each with the measured value and whether it is met (``None``: not measured).

    The train-step targets compare the hand-written step as training configures it (see
    :data:`STEP_TARGETS`) with ``torch.compile`` and with the best ``jax.grad`` baseline (the fastest of
    ``jax.grad`` of the lax forward, of the manual route's own forward, and Flax), each at its best
    structure and compile options; then the fraction of the float32 peak (the best of the peak programs of
    :mod:`jaxcnn.bench.peak`, each one's fraction in the detail), compiled memory, ``jaxcnn.fit``'s epoch
    speed against the benchmark's, and the per-example gradient targets.
    """
    ratios, recs, out = report["ratios"], report["results"], []
    models = report["config"]["models"]

    def add(target, value, limit, higher_is_better=False, detail="", within=None):
        if value is None:
            met = None
        elif within is not None:
            met = abs(value - limit) <= within
        else:
            met = value >= limit if higher_is_better else value <= limit
        out.append({"target": target, "value": value, "limit": limit, "met": met, "detail": detail})

    def ratio(benchmark, key):
        r = ratios.get(benchmark, {})
        return r.get(key), r.get(f"{key} contenders", "")

    for other, limits in STEP_TARGETS.items():
        for m in (m for m in models if m in limits):
            for structure in TRAINING_STRUCTURES:
                value, detail = ratio(f"step/{m}", f"manual[{structure}]/{other}")
                add(f"step {m} ({structure}): manual / {other} <= {limits[m]}", value, limits[m], detail=detail)
    model, fraction = PEAK_TARGET
    trained = [
        x
        for x in recs
        if x["benchmark"] == f"step/{model}" and x.get("structure") == "scan" and x.get("training_options")
    ]
    best = best_of(trained, "manual")
    kinds = ", ".join(f"{100 * v:.0f}% of {k}" for k, v in (best or {}).get("peak_fractions", {}).items())
    add(
        f"step {model} (scan): >= {100 * fraction:.0f}% of the float32 peak",
        best.get("peak_fraction") if best else None,
        fraction,
        higher_is_better=True,
        detail=f"{best['contender']}: {kinds}" if best else "",
    )
    for m in models:
        value, detail = ratio(f"step/{m}", "memory manual/best_autodiff")
        add(
            f"step {m}: manual compiled memory <= best autodiff's",
            value,
            1.0,
            detail=f"XLA compiled memory analysis: {detail}" if detail else "",
        )
    for m in models:
        value, _ = ratio(f"epoch/{m}", "fit/benchmark images_per_s")
        add(
            f"epoch {m}: jaxcnn.fit images/s = the benchmark's (within {100 * FIT_TOLERANCE:.0f}%)",
            value,
            1.0,
            within=FIT_TOLERANCE,
            detail="median of per-epoch ratios, the two alternating",
        )
    for m in models:
        if m == "seed_net":  # the targets name the convolutional models
            continue
        for what in ("norms", "dp_step"):
            value, detail = ratio(f"per_example/{what}/{m}", "manual/vmap_grad")
            add(f"per_example {what} {m}: manual / vmap(jax.grad) <= 1/3", value, 1 / 3, detail=detail)
        value, detail = ratio(f"per_example/dp_step/{m}", "manual/opacus")
        add(f"per_example dp_step {m}: manual / Opacus < 1", value, 1.0, detail=detail)
    return out


def to_json(report: dict) -> str:
    """The report as strict JSON (NaN and infinities as ``null``)."""
    return provenance.dumps(report, nonfinite="null", indent=1)


def _fmt(v, spec=".2f"):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def op_pivot(records: list[dict]) -> list[str]:
    """Per-op medians (ms) as one row per op and one column per contender, each cell the best over the
    compile-option sets (which one in brackets), the fastest in bold; pruned contenders show ``>`` their
    warm-up time."""

    def base(name):
        return name.split("[")[0]

    columns = sorted(
        dict.fromkeys(base(r["contender"]) for r in records), key=lambda c: (not c.startswith("autodiff"), c)
    )
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


def machine_line(report: dict) -> str:
    m, v = report["machine"], report["versions"]
    ext = m.get("cpu_vector_extensions")
    ext = f" ({', '.join(ext) if ext else 'no vector extensions listed'})" if ext is not None else ""
    return (
        f"Machine: {m['cpu']}{ext}, {m['cores']} cores, device {m['device']}; "
        + ", ".join(f"{k} {x}" for k, x in v.items())
        + "."
    )


def format_markdown(report: dict) -> str:
    """The report as markdown: step, epoch and scaling results, targets, ratios, then every per-op record."""
    lines = [machine_line(report)]
    if report.get("load_average"):
        lines.append(
            f"Load average (1, 5, 15 min) at start {report['load_average']['start']}, "
            f"at end {report['load_average']['end']}."
        )
    peak = _fmt(report.get("peak_gflops"), ".1f")
    lines.append(
        f"Measured float32 peak (best of the peak programs): {peak} GFLOP/s."
        if peak
        else "Peak: not measured (section peak)."
    )
    lines.append("")
    recs = report["results"]
    steps = [r for r in recs if r["benchmark"].startswith(("step/", "epoch/", "peak", "scaling/", "per_example/"))]
    if steps:
        lines += [
            "| benchmark | contender | median ms | p25-p75 ms | GFLOP/s | % peak | images/s | memory MB | note |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in steps:
            mem = r.get("memory_bytes")
            lines.append(
                f"| {r['benchmark']} | {r['contender']} | {_fmt(r.get('median_ms'))} | "
                f"{_fmt(r.get('p25_ms'))}-{_fmt(r.get('p75_ms'))} | {_fmt(r.get('gflops'), '.1f')} | "
                f"{_fmt(100 * r['peak_fraction'] if r.get('peak_fraction') else None, '.0f')} | "
                f"{_fmt(r.get('images_per_s'), ',.0f')} | {_fmt(mem / 2**20 if mem else None, '.1f')} | "
                f"{r.get('note', '') if r['status'] != 'ok' else ''} |"
            )
        lines.append("")
    if report.get("targets"):
        lines += ["| target | measured | met | compared |", "|---|---:|---|---|"]
        for t in report["targets"]:
            met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
            lines.append(f"| {t['target']} | {_fmt(t['value'], '.3f')} | {met} | {t.get('detail', '')} |")
        lines.append("")
    ratio_rows = [
        (b, k, v, r.get(f"{k} contenders", ""))
        for b, r in report["ratios"].items()
        for k, v in r.items()
        if not k.endswith("contenders")
    ]
    if ratio_rows:
        lines += ["| benchmark | ratio | value | contenders |", "|---|---|---:|---|"]
        lines += [f"| {b} | {k} | {_fmt(v, '.3f')} | {c} |" for b, k, v, c in ratio_rows]
        lines.append("")
    opsr = [r for r in recs if r["benchmark"].startswith("op/")]
    if opsr:
        lines += op_pivot(opsr)
        lines.append("")
    for n in report.get("notes", []):
        lines.append(f"- {n}")
    return "\n".join(lines)


README_FAMILIES = (
    ("manual", "hand-written"),
    ("autodiff", "`jax.grad`, lax forward"),
    ("autodiff_same_forward", "`jax.grad`, same forward"),
    ("flax", "Flax"),
    ("torch", "PyTorch eager"),
    ("torch.compile", "`torch.compile`"),
)


def readme_speed_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """The README's speed table: per model, ms per train step of each family's best contender (its best
    structure and compile options), and the hand-written step against the best autodiff contender and
    against the fastest contender of any other family (the strongest peer), each the median of per-round
    ratios. Families the run did not measure are left out."""
    recs, ratios = report["results"], report["ratios"]
    families = [
        (f, label) for f, label in README_FAMILIES if any(r["family"] == f and r.get("median_ms") for r in recs)
    ]
    headers = [
        "train step, ms (batch)",
        *[label for _, label in families],
        "hand-written / best autodiff",
        "hand-written / fastest other",
    ]
    others = [f for f, _ in families if f != "manual"]
    rows = []
    for model in report["config"]["models"]:
        mine = [r for r in recs if r["benchmark"] == f"step/{model}"]
        if not mine:
            continue
        best = {f: best_of(mine, f) for f, _ in families}
        batch = next(r["batch"] for r in mine if r.get("batch"))
        ms = [_fmt(b["median_ms"]) if (b := best[f]) else "" for f, _ in families]  # per step
        fastest = min((i for i, v in enumerate(ms) if v), key=lambda i: float(ms[i]))
        ms[fastest] = f"**{ms[fastest]}**"
        ratio = ratios.get(f"step/{model}", {}).get("manual/best_autodiff")
        manual, strongest = best["manual"], best_of(mine, others)
        against_strongest = round_ratio(manual, strongest) if manual and strongest else None
        rows.append([f"`{model}` ({batch})", *ms, _fmt(ratio), _fmt(against_strongest)])
    return headers, rows
