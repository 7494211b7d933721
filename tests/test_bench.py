"""``jaxcnn bench``: the smoke test CI runs (``--quick --json``, schema only), the timing harness's
bookkeeping, the FLOP counts, and the agreement of every conv formulation the benchmark compares."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxcnn import bench, ops
from jaxcnn.cli import main
from jaxcnn.models import get_model

from conftest import REPO


@pytest.mark.slow
def test_quick_run_writes_valid_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "jaxcnn.cli", "bench", "--quick", "--json", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert report["schema_version"] == bench.SCHEMA_VERSION
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
    assert isinstance(report["ratios"], dict)
    for name in bench.MODELS:
        assert f"step/{name}" in report["ratios"]
        assert report["ratios"][f"step/{name}"]["manual/autodiff"] > 0
    for name, ratios in report["ratios"].items():
        assert name in benchmarks
        assert all(isinstance(v, (float, str)) for v in ratios.values())
    assert {t["met"] for t in report["targets"]} <= {True, False, None}
    # The scaling section: one epoch on 1, 2, 4 and 8 simulated devices, each timed, with ratios to 1 device.
    scaling = [r for r in report["results"] if r["benchmark"] == "scaling/small_cnn"]
    assert sorted(r["devices"] for r in scaling) == list(bench.SCALING_DEVICES)
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in scaling), scaling
    assert set(report["ratios"]["scaling/small_cnn"]) == {f"images_per_s {n}/1 devices" for n in (2, 4, 8)}
    assert "| benchmark | contender | median ms" in proc.stdout  # the markdown table


def _fake(name, family, seconds):
    import time

    return bench.Contender(name, family, lambda: time.sleep(seconds))


def test_measure_alternates_prunes_and_takes_median_ratios():
    cfg = bench.BenchConfig(rounds=3, sample_s=0.001, prune=3.0).resolved()
    calls = []

    def failing():
        raise RuntimeError("no such kernel\nmore text")

    contenders = [
        bench.Contender("a", "manual", lambda: calls.append("a") or __import__("time").sleep(0.002)),
        bench.Contender("b", "autodiff", lambda: calls.append("b") or __import__("time").sleep(0.004)),
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


def test_flop_counts_match_the_issue():
    # The issue's analytic counts per image, forward + backward (no dx for the first layer).
    flops = {m: bench.model_flops(get_model(m).build()) for m in bench.MODELS}
    assert flops["seed_net"] == 2 * 86_400 + 3 * 3_456  # ~0.18 MFLOP
    assert round(flops["lenet5"] / 1e6, 1) == 2.3
    assert round(flops["small_cnn"] / 1e6) == 27


def test_json_is_strict_and_targets_evaluate():
    report = {"config": {"models": ["small_cnn"]}, "results": [], "peak_gflops": float("nan"),
              "ratios": {"step/small_cnn": {"manual/autodiff": 0.9, "manual/torch": 1.2,
                                             "memory manual/autodiff [default]": 0.8}}}
    targets = {t["target"]: t for t in bench.evaluate_targets(report)}
    assert targets["step small_cnn: manual / autodiff <= 1.0"]["met"] is True
    assert targets["step small_cnn: manual / torch eager <= 1.0"]["met"] is False
    assert targets["step small_cnn: manual / torch.compile <= 1.0"]["met"] is None
    assert targets["step small_cnn: manual peak memory <= autodiff's"]["met"] is True
    text = bench.to_json({**report, "targets": list(targets.values()), "t": (1, np.float32(2.5))})
    back = json.loads(text)
    assert back["peak_gflops"] is None and back["t"] == [1, 2.5]


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--json", "/nonexistent-dir/x.json"], "does not exist"),
])
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
