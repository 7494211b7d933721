"""``jaxcnn bench``: the smoke test CI runs (``--quick --json``), what the benchmark times (the functions
training runs), the timing harness's bookkeeping and ratios, the FLOP counts, the provenance recorded with
every report, and the agreement of every conv formulation the benchmark compares."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO

import jax
import jax.numpy as jnp

from jaxcnn import bench, ops, provenance
from jaxcnn.bench import peers, per_op, sections
from jaxcnn.cli import main
from jaxcnn.models import get_model
from jaxcnn.train import loop as train_loop
from jaxcnn.train import step as train_step_module


@pytest.mark.slow
def test_quick_run_writes_valid_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "jaxcnn.cli", "bench", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert report["schema_version"] == bench.SCHEMA_VERSION == 2
    # Provenance: the CPU model and its vector extensions, the versions.
    assert report["machine"]["cpu"] == provenance.cpu_name()
    assert report["machine"]["cpu_vector_extensions"] == provenance.vector_extensions()
    assert {"jax", "jaxlib", "optax", "numpy", "python"} <= report["versions"].keys()
    assert report["results"], "no results"
    for rec in report["results"]:
        assert {"benchmark", "contender", "family", "median_ms", "status"} <= rec.keys(), rec
        assert isinstance(rec["benchmark"], str) and isinstance(rec["contender"], str)
        assert rec["status"] in ("ok", "pruned", "failed")
        if rec["status"] == "ok":
            assert rec["median_ms"] > 0 and rec["rounds"] >= 1
        elif rec["status"] == "failed":
            assert rec["median_ms"] is None
    benchmarks = {r["benchmark"] for r in report["results"]}
    assert {f"step/{m}" for m in bench.MODELS} <= benchmarks
    for name in bench.MODELS:
        steps = [r for r in report["results"] if r["benchmark"] == f"step/{name}"]
        # Both autodiff routes, named apart; the manual step is the scan training runs.
        assert {"manual", "autodiff", "autodiff_same_forward"} <= {r["family"] for r in steps}
        assert all(r["runs"] == "jaxcnn.train.loop.run_steps" for r in steps if r["family"] == "manual")
        assert all(r["runs"] == "jaxcnn.train.step.train_step" for r in steps if r["family"].startswith("autodiff"))
        ratios = report["ratios"][f"step/{name}"]
        for key in (
            "manual/best_autodiff",
            "manual/autodiff",
            "manual/autodiff_same_forward",
            "memory manual/best_autodiff",
        ):
            assert ratios[key] > 0, (name, key)
        # The headline ratio is against the fastest autodiff contender, whichever route it is.
        fastest = min(
            (r for r in steps if r["family"] in bench.BASELINES and r["status"] == "ok"), key=lambda r: r["median_ms"]
        )
        assert ratios["manual/best_autodiff"] == ratios[f"manual/{fastest['family']}"]
        assert ratios["manual/best_autodiff contenders"].endswith(f" / {fastest['contender']}")
    for name, ratios in report["ratios"].items():
        assert name in benchmarks
        assert all(isinstance(v, (float, str)) for v in ratios.values())
    assert {t["met"] for t in report["targets"]} <= {True, False, None}
    # The epoch: Trainer.train_chunk, as jaxcnn train runs it, in both loop forms.
    epoch = [r for r in report["results"] if r["benchmark"].startswith("epoch/")]
    assert epoch and all(r["runs"] == "jaxcnn.train.Trainer.train_chunk" for r in epoch)
    assert {r["structure"] for r in epoch} == {"scan", "step"}
    assert report["ratios"]["epoch/seed_net"]["scan/step images_per_s"] > 0
    # The per_example section: norms and the DP-SGD step that jaxcnn train --dp-clip runs, against vmap(jax.grad)
    # (--quick: of the first model only, a smoke test of the section's code).
    per_example = {r["benchmark"] for r in report["results"] if r["benchmark"].startswith("per_example/")}
    assert per_example == {f"per_example/{what}/{bench.MODELS[0]}" for what in ("norms", "dp_step")}
    for name in bench.MODELS[:1]:
        for what in ("norms", "dp_step"):
            recs = [r for r in report["results"] if r["benchmark"] == f"per_example/{what}/{name}"]
            # Opacus joins the DP step when it is installed (it is a benchmark peer, never a dependency).
            assert {"manual", "vmap_grad"} <= {r["family"] for r in recs} <= {"manual", "vmap_grad", "opacus"}
            assert report["ratios"][f"per_example/{what}/{name}"]["manual/vmap_grad"] > 0
        step = [r for r in report["results"] if r["benchmark"] == f"per_example/dp_step/{name}"]
        assert all(r["runs"] == "jaxcnn.train.loop.run_steps" for r in step if r["family"] == "manual")
    # The scaling section: one epoch on 1, 2, 4 and 8 simulated devices, each timed, with ratios to 1 device
    # (--quick: of the first model).
    scaling = [r for r in report["results"] if r["benchmark"] == "scaling/seed_net"]
    assert sorted(r["devices"] for r in scaling) == list(bench.SCALING_DEVICES)
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in scaling), scaling
    assert set(report["ratios"]["scaling/seed_net"]) == {f"images_per_s {n}/1 devices" for n in (2, 4, 8)}
    assert "| benchmark | contender | median ms" in proc.stdout  # the markdown table
    assert report["machine"]["cpu"] in proc.stdout


# ---------------------------------------------------------------------------------------------------
# What is timed: the functions training runs


TINY = bench.BenchConfig(quick=True, batch=4, scan_steps=2, epoch_examples=16).resolved()


def _recording(monkeypatch, module, name, calls):
    """Replaces ``module.name`` by a wrapper that records ``(name, step.grad)`` each time it is traced."""
    original = getattr(module, name)

    def wrapper(step, *args, **kwargs):
        calls.append((name, step.grad))
        return original(step, *args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def test_step_contenders_time_train_step_and_run_steps(monkeypatch):
    calls = []
    _recording(monkeypatch, train_step_module, "train_step", calls)
    _recording(monkeypatch, train_loop, "run_steps", calls)
    contenders = sections.step_contenders(TINY, "seed_net", {"default": {}})
    by_name = {c.name: c for c in contenders}
    assert set(by_name) == {f"{route}[{s},default]" for route in bench.ROUTES for s in ("loop", "scan")}
    for c in contenders:
        assert c.family == c.info["route"] and c.work == TINY.scan_steps and c.info["memory_bytes"] > 0
        c.fn()  # runs: the compiled program takes the state it returned
    # Compiling traced exactly these functions, for each route: the jitted train_step (loop) and run_steps (scan).
    assert {("train_step", r) for r in bench.ROUTES} <= set(calls)
    assert {("run_steps", r) for r in bench.ROUTES} <= set(calls)


def test_epoch_contenders_run_trainer_train_chunk(monkeypatch):
    calls, chunks = [], []
    # What Trainer compiles (it looks them up when built): the scan form's run_steps, the step form's run_step.
    _recording(monkeypatch, train_loop, "run_steps", calls)
    _recording(monkeypatch, train_loop, "run_step", calls)
    original = train_loop.Trainer.train_chunk

    def train_chunk(self, state, batch_indices, first_step):
        chunks.append((self.step.grad, self.loop, len(batch_indices), first_step))
        return original(self, state, batch_indices, first_step)

    monkeypatch.setattr(train_loop.Trainer, "train_chunk", train_chunk)
    train = sections.training_set(TINY, "seed_net")
    contenders = sections.epoch_contenders(TINY, "seed_net", train, {"default": {}})
    assert [(c.name, c.family) for c in contenders] == [
        ("manual[scan,default]", "manual-scan"),
        ("manual[step,default]", "manual-step"),
        ("autodiff[step,default]", "autodiff-step"),
    ]  # the scanned autodiff step is timed in the steps section
    steps = TINY.epoch_examples // TINY.batch
    for c in contenders:
        grad, form = c.info["grad"], c.info["structure"]
        assert c.info["training_default_form"] == (form == {"manual": "scan", "autodiff": "step"}[grad])
        del chunks[:], calls[:]
        c.fn()  # one epoch as jaxcnn.fit runs it: chunks of chunk_steps (here the whole epoch)
        assert chunks == [(grad, form, steps, 0)]
        # The compiled entry point of that loop form, traced for this route (the scan traces run_step inside).
        assert calls[0] == ("run_steps" if form == "scan" else "run_step", grad)
        assert set(calls) <= {("run_steps", grad), ("run_step", grad)}
    info = contenders[0].info
    assert info["images"] == steps * TINY.batch and info["conv_method"] == "auto"


def test_epoch_trainer_is_what_jaxcnn_train_builds():
    from jaxcnn.train import TrainConfig, default_compiler_options

    trainer = sections.epoch_trainer(TINY, "lenet5", sections.training_set(TINY, "lenet5"), None)
    assert trainer.config == TrainConfig(model="lenet5", batch_size=TINY.batch, devices=1)  # else the defaults
    assert trainer.compiler_options == default_compiler_options()
    assert trainer.input_shape == get_model("lenet5").input_shape


# ---------------------------------------------------------------------------------------------------
# The harness


def _fake(name, family, seconds):
    return bench.Contender(name, family, lambda: time.sleep(seconds))


def test_measure_alternates_prunes_and_takes_median_ratios():
    cfg = bench.BenchConfig(rounds=3, sample_s=0.001, prune=3.0).resolved()
    calls = []

    def failing():
        raise RuntimeError("no such kernel\nmore text")

    contenders = [
        bench.Contender("a", "manual", lambda: calls.append("a") or time.sleep(0.002)),
        bench.Contender("b", "autodiff", lambda: calls.append("b") or time.sleep(0.004)),
        _fake("slow", "autodiff", 0.06),
        bench.Contender("broken", "torch", failing),
    ]
    recs = {r["contender"]: r for r in bench.measure("unit", contenders, cfg)}
    assert recs["a"]["status"] == recs["b"]["status"] == "ok"
    assert recs["slow"]["status"] == "pruned" and "warm-up" in recs["slow"]["note"]
    assert recs["broken"]["status"] == "failed" and recs["broken"]["median_ms"] is None
    assert recs["broken"]["note"] == "RuntimeError: no such kernel"
    assert len(recs["a"]["samples_ms"]) == 3
    # Round r starts with contender r % 2: the timed calls alternate their order.
    timed = calls[4:]  # two warm-up calls each
    assert timed[0] == "a" and timed[recs["a"]["reps"] + recs["b"]["reps"]] == "b"
    ratios = bench.family_ratios(list(recs.values()))
    assert 0.2 < ratios["manual/autodiff"] < 1.0
    assert ratios["manual/autodiff contenders"] == "a / b"
    assert "manual/torch" not in ratios


def _rec(contender, family, samples, status="ok", **info):
    return {
        "benchmark": "step/x",
        "contender": contender,
        "family": family,
        "status": status,
        "median_ms": float(np.median(samples)),
        "samples_ms": samples,
        **info,
    }


@pytest.mark.parametrize("fastest", ["autodiff", "autodiff_same_forward", "flax"])
def test_headline_ratio_is_against_the_best_autodiff_contender(fastest):
    times = {"autodiff": 4.0, "autodiff_same_forward": 5.0, "flax": 6.0}
    times[fastest] = 3.0
    recs = [
        _rec("manual[scan,default]", "manual", [2.0, 2.0, 2.4], structure="scan", options="default", memory_bytes=50),
        _rec("manual[loop,default]", "manual", [2.5, 2.5, 2.5], structure="loop", options="default", memory_bytes=60),
        _rec("torch", "torch", [1.0, 1.0, 1.0]),
    ]
    for family, t in times.items():
        recs.append(
            _rec(
                f"{family}[loop,default]",
                family,
                [t, t, t],
                structure="loop",
                options="default",
                memory_bytes=100 if family == fastest else 10,
            )
        )
        recs.append(
            _rec(
                f"{family}[scan,default]",
                family,
                [9.0] * 3,
                status="pruned",
                structure="scan",
                options="default",
                memory_bytes=1,
            )
        )
    ratios = bench.headline_ratios(recs)
    assert ratios["manual/best_autodiff"] == pytest.approx(2.0 / 3.0)
    assert ratios["manual/best_autodiff contenders"] == f"manual[scan,default] / {fastest}[loop,default]"
    for family, t in times.items():  # the per-family ratios stand beside it
        assert ratios[f"manual/{family}"] == pytest.approx(2.0 / t)
    assert ratios["manual/torch"] == pytest.approx(2.0)
    # Memory: the best contender's program against the manual program of the same structure and options.
    memory = bench.memory_ratios(recs)
    assert memory["memory manual/best_autodiff"] == pytest.approx(0.6)
    assert memory["memory manual/best_autodiff contenders"] == f"manual[loop,default] / {fastest}[loop,default]"
    # As training configures it (the training loop's options), in each structure, against each family's best.
    for r in recs:
        r["training_options"] = r["family"] == "manual"
    trained = bench.training_ratios(recs)
    assert trained["manual[scan]/best_autodiff"] == pytest.approx(np.median([2.0 / 3.0, 2.0 / 3.0, 2.4 / 3.0]))
    assert trained["manual[loop]/best_autodiff"] == pytest.approx(2.5 / 3.0)
    assert trained["manual[loop]/torch"] == pytest.approx(2.5)
    assert trained["manual[scan]/best_autodiff contenders"] == f"manual[scan,default] / {fastest}[loop,default]"
    assert "manual[scan]/torch.compile" not in trained  # not measured
    recs[0]["training_options"] = False  # the scan under other options is not what training runs
    assert not any(k.startswith("manual[scan]") for k in bench.training_ratios(recs))
    models = ["seed_net", "small_cnn"]
    report = {
        "config": {"models": models},
        "results": [{**r, "benchmark": f"step/{m}"} for m in models for r in recs],
        "ratios": {f"step/{m}": {**ratios, **trained, **memory} for m in models},
    }
    targets = {t["target"]: t for t in bench.evaluate_targets(report)}
    # The limits differ by model: 0.5 for seed_net and lenet5, 0.8 for small_cnn.
    assert targets["step seed_net (loop): manual / best_autodiff <= 0.5"]["met"] is False
    assert targets["step small_cnn (loop): manual / best_autodiff <= 0.8"]["met"] is (2.5 / 3.0 <= 0.8)
    assert (
        targets["step small_cnn (loop): manual / best_autodiff <= 0.8"]["value"]
        == trained["manual[loop]/best_autodiff"]
    )
    assert targets["step small_cnn (scan): manual / torch.compile <= 0.9"]["met"] is None
    assert targets["step small_cnn: manual compiled memory <= best autodiff's"]["met"] is True


def test_peak_fractions_are_per_round_against_each_peak_program():
    flops = 1e9  # per step: 1 GFLOP
    peak_rec = lambda name, kind, gflop, samples: {  # noqa: E731
        **_rec(name, "peak", samples),
        "peak_kind": kind,
        "flops": gflop * 1e9,
    }
    recs = [
        peak_rec("fma", "fma", 1.0, [10.0, 20.0, 10.0]),  # 100, 50, 100 GFLOP/s
        peak_rec("matmul", "matmul_xla", 2.0, [10.0, 10.0, 40.0]),  # 200, 200, 50 GFLOP/s
        _rec("manual[scan,no-ynn]", "manual", [10.0, 10.0, 10.0], batch=4),  # 100 GFLOP/s every round
        _rec("manual[loop,no-ynn]", "manual", [1.0], status="pruned", batch=4),
    ]
    peaks = bench.add_peak_fractions(recs, flops)
    assert peaks == {"best": pytest.approx(200.0), "fma": pytest.approx(100.0), "matmul_xla": pytest.approx(200.0)}
    step = recs[2]
    assert step["gflops"] == pytest.approx(100.0) and step["images_per_s"] == pytest.approx(400.0)
    # Round by round: the best peak is 200, 200, 100 -> 0.5, 0.5, 1.0; against fma alone 1, 2, 1.
    assert step["peak_fraction"] == pytest.approx(0.5)
    assert step["peak_fractions"] == {"fma": pytest.approx(1.0), "matmul_xla": pytest.approx(0.5)}
    assert "peak_fraction" not in recs[3]


def test_fma_program_computes_its_chains():
    from jaxcnn.bench import peak

    x = jnp.linspace(0.0, 1.0, 16, dtype=jnp.float64)
    a, b, n = 0.999, 1e-4, peak.FMA_DEPTH
    got = jax.jit(peak.fma_chains)(x, jnp.float64(a), jnp.float64(b))
    # n steps of c -> a c + b from c0 = x + k/1000: a^n c0 + b (1 - a^n) / (1 - a), summed over the chains.
    want = sum(a**n * (np.asarray(x) + k * 1e-3) + b * (1 - a**n) / (1 - a) for k in range(peak.FMA_CHAINS))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12)
    cfg = bench.BenchConfig(quick=True).resolved()
    (fma,) = peak.fma_contenders(cfg, {"default": {}})
    assert fma.info["flops"] == 2 * peak.FMA_CHAINS * n * peak.fma_size(cfg) and fma.family == "peak:fma"
    # Each kind is its own family: the harness prunes within a family by time, and their work differs.
    kinds = {c.info["peak_kind"]: c.family for c in peak.peak_contenders(cfg, {"default": {}})}
    assert {"fma", "matmul_xla", "matmul_numpy"} <= set(kinds) and len(set(kinds.values())) == len(kinds)


def test_fit_trains_at_the_benchmarks_speed_measured_alternately():
    train = sections.training_set(TINY, "seed_net")
    lines = []
    r = sections.fit_against_benchmark(TINY, "seed_net", train, lines.append)
    assert r["fit images_per_s"] > 0 and r["benchmark images_per_s in the same rounds"] > 0
    assert r["fit/benchmark images_per_s"] > 0 and "jaxcnn.fit" in lines[0]


def test_readme_speed_rows_compare_with_the_strongest_peer():
    from jaxcnn.bench.report import readme_speed_rows

    recs = [
        {**_rec("manual[scan,no-ynn]", "manual", [2.0, 2.0, 3.0], batch=8), "benchmark": "step/x"},
        {**_rec("flax[loop,no-ynn]", "flax", [4.0, 4.0, 4.0], batch=8), "benchmark": "step/x"},
        {**_rec("torch.compile", "torch.compile", [1.0, 1.0, 1.5], batch=8), "benchmark": "step/x"},
    ]
    report = {"config": {"models": ["x"]}, "results": recs, "ratios": {"step/x": {"manual/best_autodiff": 0.5}}}
    headers, (row,) = readme_speed_rows(report)
    assert headers[-2:] == ["hand-written / best autodiff", "hand-written / fastest other"]
    # Against torch.compile, the fastest family, round by round: 2/1, 2/1, 3/1.5.
    assert row == ["`x` (8)", "2.00", "4.00", "**1.00**", "0.50", "2.00"]


def test_flop_counts_match_the_reference_counts():
    # Analytic counts per image, forward + backward (no dx for the first layer), at each spec's input shape.
    flops = {m: bench.model_flops(get_model(m).build(), get_model(m).input_shape) for m in bench.MODELS}
    assert flops["seed_net"] == 2 * 86_400 + 3 * 3_456  # ~0.18 MFLOP
    assert round(flops["lenet5"] / 1e6, 1) == 2.3
    assert round(flops["small_cnn"] / 1e6) == 27
    # Other input shapes are counted from the shapes, not assumed: a 32x32x3 input.
    assert bench.model_flops(get_model("small_cnn").build(), (1, 32, 32, 3)) > flops["small_cnn"]


def test_ops_find_layers_by_their_shapes():
    spec = get_model("lenet5")
    kinds = [
        per_op.layer_kind(p, i, o)
        for _, _, p, _, i, o in bench.flops.layers_with_shapes(spec.build(), (2, *spec.input_shape[1:]))
    ]
    assert kinds == ["conv", None, "pool", "conv", None, "pool", None, "dense", None, "dense", None, "dense"]


def test_json_is_strict_and_targets_evaluate():
    report = {
        "config": {"models": ["small_cnn"]},
        "results": [],
        "peak_gflops": float("nan"),
        "ratios": {
            "step/small_cnn": {
                "manual[scan]/torch.compile": 0.85,
                "manual[loop]/torch.compile": 0.95,
                "memory manual/best_autodiff": 0.8,
            },
            "epoch/small_cnn": {"fit/benchmark images_per_s": 0.93},
        },
    }
    targets = {t["target"]: t for t in bench.evaluate_targets(report)}
    assert targets["step small_cnn (scan): manual / torch.compile <= 0.9"]["met"] is True
    assert targets["step small_cnn (loop): manual / torch.compile <= 0.9"]["met"] is False
    assert targets["step small_cnn (scan): manual / best_autodiff <= 0.8"]["met"] is None
    assert targets["step small_cnn: manual compiled memory <= best autodiff's"]["met"] is True
    assert targets["epoch small_cnn: jaxcnn.fit images/s = the benchmark's (within 10%)"]["met"] is True
    report["ratios"]["epoch/small_cnn"]["fit/benchmark images_per_s"] = 1.12  # two-sided: too fast also fails
    targets = {t["target"]: t for t in bench.evaluate_targets(report)}
    assert targets["epoch small_cnn: jaxcnn.fit images/s = the benchmark's (within 10%)"]["met"] is False
    text = bench.to_json({**report, "targets": list(targets.values()), "t": (1, np.float32(2.5))})
    back = json.loads(text)
    assert back["peak_gflops"] is None and back["t"] == [1, 2.5]


def test_missing_peers_are_skipped_with_a_note(monkeypatch):
    monkeypatch.setattr(peers, "installed", lambda package: False)
    notes = []
    cfg = bench.BenchConfig().resolved()
    assert peers.torch_peer(cfg, notes) is None and peers.flax_peer(cfg, notes) is None
    assert any("torch is not installed" in n for n in notes) and any("flax is not installed" in n for n in notes)
    notes = []
    assert peers.torch_peer(bench.BenchConfig(peers=()), notes) is None and not notes  # not wanted: no note


# ---------------------------------------------------------------------------------------------------
# Provenance


X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Example Xeon(R) CPU @ 2.00GHz
flags\t\t: fpu sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 avx512f avx512bw avx512_bf16 amx_tile

processor\t: 1
model name\t: Example Xeon(R) CPU @ 2.00GHz
"""
ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes sha2 asimdhp asimddp sve sve2 bf16 i8mm
CPU implementer\t: 0x41
"""


def test_cpu_model_and_vector_extensions(tmp_path):
    (tmp_path / "x86").write_text(X86)
    (tmp_path / "arm").write_text(ARM)
    assert provenance.cpu_name(tmp_path / "x86") == "Example Xeon(R) CPU @ 2.00GHz"
    assert provenance.vector_extensions(tmp_path / "x86") == [
        "sse4_1",
        "sse4_2",
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512_bf16",
        "amx_tile",
    ]
    assert provenance.vector_extensions(tmp_path / "arm") == [
        "asimd",
        "asimdhp",
        "asimddp",
        "bf16",
        "i8mm",
        "sve",
        "sve2",
    ]
    assert provenance.vector_extensions(tmp_path / "absent") is None  # unknown, not "none"
    assert provenance.cpu_name(tmp_path / "absent")  # platform's guess
    m = provenance.machine()
    assert m["cpu"] == provenance.cpu_name() and m["cpu_vector_extensions"] == provenance.vector_extensions()
    assert m["cores"] >= 1 and m["backend"] == jax.default_backend()


def test_jsonable_and_write_json(tmp_path):
    value = {
        "a": (1, np.int64(2)),
        "f": np.float32(0.5),
        "nan": float("nan"),
        "inf": np.float64("inf"),
        "arr": np.arange(3),
        "jax": jnp.asarray(1.5),
        "jaxv": jnp.ones(2),
        "b": np.bool_(True),
        "p": tmp_path,
        3: None,
    }
    assert provenance.jsonable(value) == {
        "a": [1, 2],
        "f": 0.5,
        "nan": "nan",
        "inf": "inf",
        "arr": [0, 1, 2],
        "jax": 1.5,
        "jaxv": [1.0, 1.0],
        "b": True,
        "p": str(tmp_path),
        "3": None,
    }
    assert provenance.jsonable(value, nonfinite="null")["nan"] is None
    path = provenance.write_json(tmp_path / "x.json", value)
    assert json.loads(path.read_text())["inf"] == "inf" and path.read_text().endswith("\n")
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary file left behind
    json.loads(provenance.dumps(value), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    with pytest.raises(ValueError, match="nonfinite"):
        provenance.jsonable(1.0, nonfinite="zero")


# ---------------------------------------------------------------------------------------------------
# The command line


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rounds", "0"], "--rounds must be >= 1"),
        (["--json", "/nonexistent-dir/x.json"], "does not exist"),
    ],
)
def test_cli_reports_bad_settings(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxcnn bench: ") and message in err


def test_gpu_without_a_gpu_is_a_clean_error(capsys):
    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("a GPU is present")
    assert main(["bench", "--device", "gpu", "--quick"]) == 2
    assert "no such JAX backend" in capsys.readouterr().err


def test_option_sets_are_checked_against_this_jaxlib(monkeypatch):
    monkeypatch.setitem(bench.CPU_OPTION_SETS, "bogus", {"xla_no_such_option_anywhere": 1})
    notes = []
    sets = bench.option_sets(bench.BenchConfig(option_sets=("default", "bogus")), notes.append)
    assert list(sets) == ["default"]
    assert "bogus" in notes[0]
    # The extra sets run only when named; each adds its library to the training loop's options.
    assert set(bench.option_sets(bench.BenchConfig())) <= set(bench.CPU_OPTION_SETS)
    named = bench.option_sets(bench.BenchConfig(option_sets=tuple(bench.CPU_EXTRA_OPTION_SETS)), notes.append)
    for name, options in named.items():
        assert options.items() >= bench.CPU_OPTION_SETS["no-ynn"].items() and len(options) == 2, name
    unknown = r"unknown option set 'nope'; choose from default, no-ynn, .*no-ynn\+onednn"
    with pytest.raises(bench.BenchError, match=unknown):
        bench.option_sets(bench.BenchConfig(option_sets=("nope",)))


# Every formulation the benchmark times gives the numbers of jax.vjp, at the zoo's conv shapes.
ZOO_CONVS = [
    ((3, 28, 28, 1), (5, 5, 1, 3), dict(padding="VALID")),
    ((3, 28, 28, 1), (5, 5, 1, 6), dict(padding="SAME")),
    ((3, 14, 14, 6), (5, 5, 6, 16), dict(padding=0)),
    ((3, 28, 28, 1), (3, 3, 1, 32), dict(padding="SAME")),
    ((3, 14, 14, 32), (3, 3, 32, 64), dict(padding="SAME")),
    ((2, 9, 10, 4), (3, 2, 2, 6), dict(stride=(2, 3), padding=((1, 2), (0, 1)), dilation=(2, 1), groups=2)),
    ((2, 9, 9, 8), (3, 3, 1, 8), dict(stride=2, padding=1, groups=8)),
]


@pytest.mark.parametrize("x_shape, w_shape, hyper", ZOO_CONVS)
@pytest.mark.parametrize("method", ["taps", "auto"])
def test_formulations_match_vjp(x_shape, w_shape, hyper, method):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=w_shape), jnp.float32)
    ref = functools.partial(ops.conv2d, method="conv", **hyper)
    y_ref, vjp = jax.vjp(ref, x, w)
    dy = jnp.asarray(rng.normal(size=y_ref.shape), jnp.float32)
    dx_ref, dw_ref = vjp(dy)
    y = jax.jit(functools.partial(ops.conv2d, method=method, **hyper))(x, w)
    dx, dw, db = jax.jit(functools.partial(ops.conv2d_backward, method=method, **hyper))(dy, x, w)
    for got, want in ((y, y_ref), (dx, dx_ref), (dw, dw_ref), (db, dy.sum((0, 1, 2)))):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(want))))


# The one-command GPU check: valid bash, it names test files that exist, and without a GPU it stops at once
# with one line that says why (before running any test or benchmark).
GPU_CHECK = REPO / "scripts" / "gpu_check.sh"


def test_gpu_check_script_is_valid_and_names_real_tests():
    subprocess.run(["bash", "-n", str(GPU_CHECK)], check=True)
    text = GPU_CHECK.read_text()
    named = set(re.findall(r"tests/test_\w+\.py", text))
    assert {"tests/test_ops_conv.py", "tests/test_layers.py", "tests/test_models.py"} <= named
    missing = [t for t in named if not (REPO / t).exists()]
    assert not missing, missing
    assert "JAX_DEFAULT_MATMUL_PRECISION=highest" in text
    assert "--device gpu" in text and "gpu.json" in text


def test_gpu_check_script_refuses_a_machine_without_gpu(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(["bash", str(GPU_CHECK), str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode != 0
    assert "not 'gpu'" in run.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "gpu.json").exists()


def test_per_example_baselines_compute_what_the_hand_written_route_computes():
    """The benchmark's vmap(jax.grad) contenders are the same computation: equal norms, and with no noise the
    optax DP-SGD step applies the mean of the clipped per-example gradients that the manual step applies."""
    import optax

    from jaxcnn import gradients
    from jaxcnn.bench import per_example as bench_pe
    from jaxcnn.train import TrainState, make_step, train_step

    spec = get_model("lenet5")
    model = spec.build()
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 28, 28, 1), jnp.float32)
    target = jnp.arange(4, dtype=jnp.int32)
    params, state, _ = model.init(jax.random.PRNGKey(0), (1, 28, 28, 1))
    want = gradients.per_example_grad_norms(model, spec.loss, params, state, x, target)
    got = jax.jit(bench_pe.vmap_grad_norms(model, spec.loss))(params, state, x, target)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    clip = float(np.median(want))
    tx = optax.sgd(1.0)
    init, step = bench_pe.vmap_grad_dp_step(model, spec.loss, tx, clip=clip, noise=0.0)
    (new_params, _, _), _ = jax.jit(step)((params, state, init(params)), x, target, jax.random.PRNGKey(2))
    manual = make_step(model, spec.loss, tx, dp_clip=clip, dp_noise_multiplier=0.0)
    ours, _ = jax.jit(functools.partial(train_step, manual))(
        TrainState(params, state, tx.init(params)), x, target, jax.random.PRNGKey(2)
    )
    for a, b in zip(jax.tree_util.tree_leaves(new_params), jax.tree_util.tree_leaves(ours.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
