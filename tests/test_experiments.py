"""Smoke tests of the experiment scripts in ``experiments/``.

Each experiment's ``run(out_dir, smoke=True)`` runs on tiny data into ``tmp_path`` (never into the
committed ``experiments/results/``), and the test checks the files it writes and the values in them: the
worked examples equal the tutorials' numbers, manual and autodiff gradients agree to rounding, the NumPy
loop version of the tutorial network computes the same gradient. Figures are checked only when
matplotlib (the ``plots`` extra) is installed. The README's commands and committed results are checked
against the scripts.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import platform
import re
import sys

import numpy as np
import pytest
from conftest import REPO

sys.path.insert(0, str(REPO))  # ``experiments`` is a directory of scripts beside the package, not installed

from experiments import (
    check_tolerance,
    common,
    conv_formulations,
    dp_sgd,
    gradient_report,
    host_allocator,
    readme_numbers,
    recipe_cv,
    speed,
    time_to_accuracy,
    training_comparison,
    tutorial_cnn,
    what_it_learned,
    worked_examples,
)

try:
    import matplotlib  # noqa: F401  (only whether it imports matters)

    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False

SCRIPTS = {
    m.NAME: m
    for m in (
        tutorial_cnn,
        worked_examples,
        gradient_report,
        training_comparison,
        what_it_learned,
        speed,
        check_tolerance,
        readme_numbers,
        dp_sgd,
        time_to_accuracy,
        recipe_cv,
        host_allocator,
        conv_formulations,
    )
}
EXPERIMENTS_README = (REPO / "experiments" / "README.md").read_text()


def quiet(_message: str) -> None:
    pass


def assert_files(out, names, figures=()):
    for name in names:
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, f"{name} was not written"
    if HAVE_MATPLOTLIB:
        for name in figures:
            path = out / name
            assert path.is_file(), f"figure {name} was not written"
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{name} is not a PNG"
            assert path.stat().st_size < 300_000, f"{name} is {path.stat().st_size:,} bytes"


def load_json(path):
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------------
# Experiment 2 (fast, no training): the worked examples


def test_worked_examples_match_the_tutorials(tmp_path):
    summary = worked_examples.run(tmp_path, smoke=True, log=quiet)
    assert summary["failed"] == []
    assert summary["n_checks"] >= 50
    assert_files(
        tmp_path, ["worked_examples.md", "worked_examples.json", "output_size.csv"], ["worked_examples_maxpool.png"]
    )
    checks = load_json(tmp_path / "worked_examples.json")["checks"]
    by_name = {(c["section"], c["check"]): c for c in checks}
    # Seed 003's four outputs, as the tutorial writes them.
    for name, value in (("O11", 9), ("O12", 32), ("O21", 14), ("O22", 26)):
        c = by_name[("003 forward", name)]
        assert c["ok"] and c["got"] == value == c["expected"]
    # Seed 002: every dF and dX element from the article's expansion equals conv2d_backward.
    backward = [c for c in checks if c["section"] == "002 backward"]
    assert len([c for c in backward if "expansion" in c["check"]]) == 4 + 9
    assert all(c["ok"] for c in backward)
    # Seed 001: the routed gradient has the upstream values at the winners, and the slip is shown.
    routed = by_name[("001 max-pool routing", "max_pool2d_backward routes dE/dP to the winners (local gradient 1)")]
    assert np.array_equal(routed["got"], [[0, 1, 0, 2], [0, 0, 0, 0], [3, 0, 0, 0], [0, 0, 4, 0]])
    slips = [c for c in checks if "slip" in c]
    assert {c["section"] for c in slips} == {
        "001 max-pool routing",
        "001 filter gradient",
        "004 output size",
        "000 matrix-form shapes",
    }
    # Every formulation of conv2d and conv2d_backward gives the tutorials' numbers.
    from jaxcnn.ops.conv import METHODS

    for m in METHODS:
        assert by_name[("002 backward", f"conv2d_backward(method='{m}') dF vs jax.vjp")]["ok"]
        if m != "conv":
            assert by_name[("003 forward", f"conv2d(method='{m}') equals method='conv'")]["ok"]
    report = (tmp_path / "worked_examples.md").read_text()
    assert "**Slip (001):**" in report and "**Slip (004):**" in report and "**Slips (000):**" in report
    assert "✗" not in report
    rows = (tmp_path / "output_size.csv").read_text().splitlines()
    assert rows[0].startswith("H,F,S,P,") and len(rows) > 20


# ---------------------------------------------------------------------------------------------------
# Experiment 1: the tutorial CNN


def test_tutorial_cnn_smoke(tmp_path):
    summary = tutorial_cnn.run(tmp_path, smoke=True, offline=True, log=quiet)
    assert_files(
        tmp_path,
        ["tutorial_cnn.md", "tutorial_cnn.json", "tutorial_cnn_steps.csv"],
        ["tutorial_cnn_loss.png", "tutorial_cnn_grad_diff.png", "tutorial_cnn_step_time.png"],
    )
    stored = load_json(tmp_path / "tutorial_cnn.json")
    assert stored["environment"]["jax"] and stored["config"]["steps"] == tutorial_cnn.SMOKE["steps"]
    with open(tmp_path / stored["steps_csv"], newline="") as f:
        steps = list(csv.DictReader(f))
    assert len(steps) == tutorial_cnn.SMOKE["steps"]
    for row in steps:  # the two trajectories coincide
        assert float(row["loss_manual"]) == pytest.approx(float(row["loss_autodiff"]), rel=1e-5)
    gaps = summary["max_gradient_difference_over_all_steps"]
    assert set(gaps["manual_vs_autodiff"]) == {"conv2d.b", "conv2d.w", "dense.b", "dense.w"}
    assert max(gaps["manual_vs_autodiff_relative_to_scale"].values()) < 1e-4  # float32 rounding, nothing more
    # The second witness, jax.grad of the lax forward pass, agrees as closely.
    assert set(gaps["manual_vs_autodiff_lax"]) == set(gaps["manual_vs_autodiff"])
    assert max(gaps["manual_vs_autodiff_lax_relative_to_scale"].values()) < 1e-4
    # The NumPy loop version computes seed_net's gradient exactly (float64) and follows the same trajectory.
    check = summary["numpy_check"]
    assert max(check["gradient_rel_diff_vs_jitted_float64"].values()) < 1e-12
    assert check["max_rel_loss_diff_vs_float64"] < 1e-12
    assert set(summary["time_per_step"]) == {
        "NumPy loops (float64)",
        "jitted manual (float64)",
        "jitted manual (float32)",
        tutorial_cnn.AUTODIFF_LAX,
        tutorial_cnn.AUTODIFF_SAME,
    }
    assert all(t["median_ms"] > 0 for t in summary["time_per_step"].values())


def test_tutorial_numpy_network_matches_seed_net_on_a_few_images():
    """The mended tutorial code, on its own: its loss and gradients are seed_net's (float64)."""
    import jax
    import jax.numpy as jnp

    from jaxcnn.gradients import value_and_grad
    from jaxcnn.models import get_model

    rng = np.random.default_rng(0)
    images = rng.random((3, 28, 28))
    labels = np.array([0.0, 1.0, 1.0])
    spec = get_model("seed_net")
    model = spec.build()
    params, _, _ = model.init(jax.random.PRNGKey(1), spec.input_shape)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
    net = tutorial_cnn.TutorialNumpyCNN.from_params(params)
    X = np.moveaxis(images, 0, -1)
    loss, grads, _ = net.loss_and_grads(net.patches(X, 5, 5), X, labels[None, :])
    (ref_loss, _), ref = value_and_grad(model, spec.loss, "autodiff_same_forward")(
        params, tuple({} for _ in params), jnp.asarray(images[..., None]), jnp.asarray(labels[:, None])
    )
    assert loss == pytest.approx(float(ref_loss), rel=1e-13)
    for got, want in zip(
        jax.tree_util.tree_leaves(net.grads_as_params(grads)), jax.tree_util.tree_leaves(ref), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-14)


# ---------------------------------------------------------------------------------------------------
# Experiment 3: the gradient report


@pytest.mark.slow
def test_gradient_report_smoke(tmp_path):
    summary = gradient_report.run(tmp_path, smoke=True, log=quiet)
    assert summary["failed"] == []
    assert_files(
        tmp_path,
        ["gradient_report.md", "gradient_report.json", "gradient_report.csv"],
        ["gradient_report_histogram.png"],
    )
    rows = summary["rows"]
    assert {(r["case"], r["dtype"]) for r in rows if r["kind"] == "op"} == {
        (c, d) for c in gradient_report.SMOKE["cases"] for d in gradient_report.DTYPES
    }
    for r in rows:
        if r["dtype"] == "float64":
            assert r["manual_vs_autodiff"] < 1e-12 and r["manual_vs_fd"] < 1e-6
        elif r["dtype"] == "float32":
            assert r["manual_vs_autodiff"] < 1e-5
        else:
            assert r["manual_vs_float64"] < 5e-2
    (model_row,) = [r for r in rows if r["kind"] == "model" and r["case"] == "seed_net"]
    assert model_row["manual_vs_autodiff_lax"] is not None  # the second witness: jax.grad of the lax forward
    elementwise = summary["elementwise"]
    assert all(elementwise[d]["elements"] > 0 for d in ("float64", "float32", "bfloat16"))


def test_gradient_report_cases_cover_ops_and_layers():
    cases = gradient_report.op_cases() + gradient_report.layer_cases()
    names = [c.name for c in cases]
    assert len(names) == len(set(names))
    for op in (
        "conv2d",
        "max_pool2d",
        "avg_pool2d",
        "dense",
        "relu",
        "sigmoid",
        "tanh",
        "softmax",
        "log_softmax",
        "mse",
        "binary_cross_entropy_with_logits",
        "softmax_cross_entropy",
    ):
        assert any(n.startswith(op) for n in names), op
    for layer in (
        "Conv2D",
        "Dense",
        "BatchNorm",
        "Dropout",
        "MaxPool2D",
        "AvgPool2D",
        "GlobalAvgPool",
        "Flatten",
        "Relu",
        "LeakyRelu",
        "Sigmoid",
        "Tanh",
        "Softmax",
        "LogSoftmax",
        "Residual",
    ):
        assert any(n.startswith(layer) for n in names), layer
    # Every convolution formulation, as an op (forward and backward alike) and as a layer.
    from jaxcnn.ops.conv import METHODS

    for method in METHODS:
        assert sum(n.startswith("conv2d ") and n.endswith(f"method={method}") for n in names) >= 6, method
        assert any(n.startswith("Conv2D") and f"method {method}" in n for n in names), method
    assert set(gradient_report.SMOKE["cases"]) <= set(names)


# ---------------------------------------------------------------------------------------------------
# Experiments 4 and 5: training on real data


@pytest.mark.slow
def test_training_comparison_smoke(tmp_path):
    summary = training_comparison.run(tmp_path, smoke=True, offline=True, log=quiet)
    assert_files(
        tmp_path,
        ["training_comparison.md", "training_comparison.json", "training_comparison.csv"],
        ["training_comparison.png"],
    )
    (pair,) = summary["comparison"]
    assert pair["model"] == "lenet5" and pair["dataset"] == "mnist"
    assert pair["max_abs_diff_per_epoch"]["train_loss"] < 1e-3  # same trajectory up to float32 rounding
    assert pair["max_abs_diff_per_epoch"]["test_accuracy"] <= 2 / training_comparison.SMOKE["test_limit"]
    assert all(v > 0 for v in pair["images_per_s"].values())
    assert len(summary["runs"]) == 2 and all(len(r["history"]) == 1 for r in summary["runs"])
    assert {r["train_config"]["grad"] for r in summary["runs"]} == {"manual", "autodiff"}  # autodiff: the lax baseline
    assert all(
        r["train_config"]["train_limit"] == dict(training_comparison.SMOKE["train_limit"])["mnist"]
        for r in summary["runs"]
    )


@pytest.mark.slow
def test_what_it_learned_smoke(tmp_path):
    summary = what_it_learned.run(tmp_path, smoke=True, offline=True, log=quiet)
    assert_files(
        tmp_path,
        ["what_it_learned.md", "what_it_learned.json", "what_it_learned_confusion.csv"],
        [
            "what_it_learned_filters.png",
            "what_it_learned_feature_maps.png",
            "what_it_learned_confusion.png",
            "what_it_learned_mistakes.png",
        ],
    )
    confusion = np.asarray(summary["confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == what_it_learned.SMOKE["test_limit"]
    assert summary["test_accuracy"] == pytest.approx(np.trace(confusion) / confusion.sum())
    assert summary["first_layer"]["kernel_shape"] == [5, 5, 1, 6]  # lenet5's first convolution
    assert all(m["true"] != m["predicted"] for m in summary["mistakes"])


def test_what_it_learned_reads_the_config_of_a_run(tmp_path):
    """--workdir takes a `jaxcnn train --out` run, or a `jaxcnn.fit(out=...)` run of a zoo network."""
    (tmp_path / "config.json").write_text(
        json.dumps({"model": "small_cnn", "conv_method": "conv", "epochs": 3, "download": True})
    )  # an unknown (older) field is ignored
    tc = what_it_learned._saved_config(tmp_path)
    assert (tc.model, tc.conv_method, tc.epochs) == ("small_cnn", "conv", 3)
    (tmp_path / "config.json").write_text(
        json.dumps({"network": "lenet5", "loss": "softmax_cross_entropy", "epochs": 2})
    )
    assert what_it_learned._saved_config(tmp_path).model == "lenet5"
    (tmp_path / "config.json").write_text(json.dumps({"network": "serial", "loss": "mse"}))
    with pytest.raises(SystemExit, match="not of a zoo model"):
        what_it_learned._saved_config(tmp_path)
    with pytest.raises(SystemExit, match="ten digit classes"):
        what_it_learned._ten_class("seed_net")


# ---------------------------------------------------------------------------------------------------
# Experiment 6: speed


def _synthetic_report():
    """A report in the format ``jaxcnn bench --json`` writes, with known medians and per-round samples."""

    def rec(bench, contender, family, samples, **info):
        return {
            "benchmark": bench,
            "contender": contender,
            "family": family,
            "status": "ok",
            "median_ms": float(np.median(samples)),
            "samples_ms": samples,
            **info,
        }

    return {
        "results": [
            rec("step/lenet5", "manual[loop,default]", "manual", [2.0, 2.2, 2.1], structure="loop", batch=128),
            rec("step/lenet5", "autodiff[loop,default]", "autodiff", [4.0, 4.0, 4.2], structure="loop", batch=128),
            rec("step/lenet5", "manual[scan,default]", "manual", [1.9, 2.0, 2.0], structure="scan", batch=128),
            rec("step/lenet5", "autodiff[scan,default]", "autodiff", [20.0, 21.0, 19.0], structure="scan", batch=128),
            rec("op/conv_dw/lenet5.conv2", "manual:im2col[default]", "manual", [0.5, 0.5, 0.5], structure="jit"),
            rec("op/conv_dw/lenet5.conv2", "manual:conv[default]", "manual", [0.9, 0.9, 0.9], structure="jit"),
            rec("op/conv_dw/lenet5.conv2", "autodiff:jax.vjp[default]", "autodiff", [1.0, 1.0, 1.0], structure="jit"),
            rec("peak/matmul2048", "matmul[default]", "peak", [10.0, 10.0, 10.0]),
        ],
        "ratios": {},
    }


def test_speed_plots_a_bench_report(tmp_path):
    report = tmp_path / "bench.json"
    report.write_text(json.dumps(_synthetic_report()))
    summary = speed.run(tmp_path / "out", bench_json=str(report), log=quiet)
    rows = {(r["benchmark"], r["structure"]): r for r in summary["rows"]}
    assert set(rows) == {
        ("step/lenet5", "loop"),
        ("step/lenet5", "scan"),
        ("step/lenet5", "best"),
        ("op/conv_dw/lenet5.conv2", "jit"),
    }
    assert rows[("step/lenet5", "loop")]["manual_over_autodiff"] == pytest.approx(
        np.median([2.0 / 4.0, 2.2 / 4.0, 2.1 / 4.2])
    )
    best = rows[("step/lenet5", "best")]  # the scan step for manual, the loop step for autodiff
    assert (best["manual_contender"], best["autodiff_contender"]) == ("manual[scan,default]", "autodiff[loop,default]")
    assert best["manual_over_autodiff"] == pytest.approx(np.median([1.9 / 4.0, 2.0 / 4.0, 2.0 / 4.2]))
    assert (
        rows[("op/conv_dw/lenet5.conv2", "jit")]["manual_contender"] == "manual:im2col[default]"
    )  # the fastest manual
    assert_files(tmp_path / "out", ["speed.md", "speed.json", "speed.csv"], ["speed_steps.png", "speed_ops.png"])


@pytest.mark.slow
def test_speed_smoke(tmp_path):
    summary = speed.run(tmp_path, smoke=True, log=quiet)
    assert_files(tmp_path, ["speed.md", "speed.json", "speed.csv", "bench.json"], ["speed_steps.png"])
    steps = [r for r in summary["rows"] if r["kind"] == "step"]
    assert steps and all(r["manual_ms"] > 0 and r["autodiff_ms"] > 0 for r in steps)


# ---------------------------------------------------------------------------------------------------
# The command lines, the README and the committed results


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_command_line_help(name):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        SCRIPTS[name].main(["--help"])
    assert exit_info.value.code == 0
    assert "--out" in out.getvalue() and "--smoke" in out.getvalue()


def _readme_commands():
    return re.findall(r"python experiments/(\w+)\.py([^\n`]*)", EXPERIMENTS_README)


def test_readme_commands_name_real_scripts_and_flags():
    commands = _readme_commands()
    assert {name for name, _ in commands} >= set(SCRIPTS)
    for name, args in commands:
        assert name in SCRIPTS, f"experiments/README.md runs experiments/{name}.py, which does not exist"
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            SCRIPTS[name].main(["--help"])
        for flag in re.findall(r"--[a-z][a-z-]*", args):
            assert flag in out.getvalue(), f"experiments/README.md uses {flag} for {name}.py, which has no such flag"


def test_committed_results_match_the_readme():
    """Every figure and table the README shows exists, and each experiment's results record the README's command."""
    results = REPO / "experiments" / "results"
    linked = re.findall(r"\]\((results/[^)]+)\)", EXPERIMENTS_README)
    assert linked, "experiments/README.md links no results"
    for link in linked:
        assert (REPO / "experiments" / link).is_file(), f"experiments/README.md links {link}, which is not committed"
    commands = {}
    for name, args in _readme_commands():  # the first command given for each script is the one that made its results
        commands.setdefault(name, f"python experiments/{name}.py{args}".strip())
    for name in SCRIPTS:
        stored = results / name / f"{name}.json"
        assert stored.is_file(), f"no committed results for {name}"
        recorded = load_json(stored)["environment"]["command"]
        assert recorded == commands[name], (
            f"{name}: results were made by `{recorded}`, the README gives `{commands[name]}`"
        )
        assert not load_json(stored).get("failed"), f"{name}: the committed results record failures"
        for png in (results / name).glob("*.png"):
            assert png.stat().st_size < 200_000, (
                f"{png.name} is {png.stat().st_size:,} bytes; keep committed figures small"
            )


def test_check_tolerance_smoke(tmp_path):
    """A short measurement on seed_net: correct gradients far below the tolerance, a 0.1% error far above."""
    assert check_tolerance.main(["--smoke", "--models", "seed_net", "--out", str(tmp_path)]) == 0
    report = load_json(tmp_path / "check_tolerance.json")
    (model,) = report["models"]
    assert model["model"] == "seed_net" and len(model["rows"]) == 2
    assert model["max"]["manual_vs_autodiff"] < 1e-5 and model["perturbed_min"] > 9e-4
    assert (tmp_path / "check_tolerance.md").read_text() == check_tolerance.render(report)


@pytest.mark.slow
def test_readme_numbers_smoke(tmp_path):
    """One real jaxcnn train run into the results layout; the README's blocks render from it."""
    assert readme_numbers.main(["--smoke", "--out", str(tmp_path)]) == 0
    results = load_json(tmp_path / "readme_numbers.json")
    row = results["rows"]["smoke"]
    records = [json.loads(line) for line in (tmp_path / "smoke" / "metrics.jsonl").read_text().splitlines()]
    # 4 steps of lenet5: above the 10-class chance level, not yet trained.
    assert row["test_accuracy"] == records[-1]["test_accuracy"] and 0.15 < row["test_accuracy"] <= 1.0
    assert not (tmp_path / "smoke" / "checkpoint.npz").exists()


def test_dp_sgd_smoke(tmp_path):
    """Four DP-SGD steps of lenet5: the epsilon recorded is the accountant's for those steps, the report renders."""
    from jaxcnn.train import privacy

    assert dp_sgd.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = load_json(tmp_path / "dp_sgd.json")
    (epoch,) = report["history"]
    assert epoch["dp_epsilon"] == privacy.epsilon(noise_multiplier=1.1, sample_rate=64 / 256, steps=4, delta=1e-5)
    assert report["jaxcnn_train"].startswith("jaxcnn train --model lenet5 --dataset mnist-offline")
    assert (tmp_path / "dp_sgd.md").read_text() == dp_sgd.report(report)
    assert_files(tmp_path, ["dp_sgd.json", "dp_sgd.md"], figures=["dp_sgd.png"])


def test_host_allocator_smoke(tmp_path):
    """One process per setting; the setting is applied only in its own, and the report renders the JSON."""
    assert host_allocator.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = load_json(tmp_path / "host_allocator.json")
    assert report["results"]["default"]["applied"] is False
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert report["results"]["keep"]["applied"] is glibc
    for setting in host_allocator.SETTINGS:
        assert set(report["results"][setting]) == {"applied", "per-example norms", "train step"}
    assert (tmp_path / "host_allocator.md").read_text() == host_allocator.report(report)
    assert_files(tmp_path, ["host_allocator.json", "host_allocator.md"])


def test_conv_formulations_smoke(tmp_path):
    """Every formulation agrees at every shape; the report renders the JSON."""
    assert conv_formulations.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = load_json(tmp_path / "conv_formulations.json")
    assert [r["label"] for r in report["per_example"]] == [s.label for s in conv_formulations.SMOKE_PER_EXAMPLE_SHAPES]
    assert [r["label"] for r in report["input_grad"]] == [s.label for s in conv_formulations.SMOKE_INPUT_GRAD_SHAPES]
    assert all(r["max_rel_diff"] < 1e-5 for r in report["per_example"] + report["input_grad"])
    assert (tmp_path / "conv_formulations.md").read_text() == conv_formulations.report(report)
    assert_files(tmp_path, ["conv_formulations.json", "conv_formulations.md"])


def test_conv_auto_rules_hold_on_the_committed_run():
    """The "auto" rules, as the code decides them today, are the picks the committed run timed; on every zoo
    convolution (the rows named after a model) each pick was the fastest formulation or within ``WITHIN`` of
    it, alone and inside ``lax.scan``; the report is the JSON's."""
    from jaxcnn import per_example
    from jaxcnn.ops import conv as conv_module

    out = common.RESULTS / conv_formulations.NAME
    report = load_json(out / "conv_formulations.json")
    assert [r["label"] for r in report["per_example"]] == [s.label for s in conv_formulations.PER_EXAMPLE_SHAPES]
    assert [r["label"] for r in report["input_grad"]] == [s.label for s in conv_formulations.INPUT_GRAD_SHAPES]
    zoo = ("seed_net", "lenet5", "small_cnn", "fast_cnn", "resnet_small")
    for r in report["per_example"]:
        assert r["auto"] == per_example.conv2d_grads_method(r["channels"], r["outputs"]), r["label"]
        assert r["ok"] or not r["label"].startswith(zoo), r["label"]
    for r in report["input_grad"]:
        w_shape = (r["kernel"], r["kernel"], r["channels"] // r["groups"], r["outputs"])
        auto = conv_module.resolve_method("input_grad", w_shape, r["groups"], strided=r["stride"] != 1)
        assert r["auto"] == auto, r["label"]
        assert (r["alone"]["ok"] and r["scan"]["ok"]) or not r["label"].startswith(zoo), r["label"]
    assert all(r["max_rel_diff"] < 1e-5 for r in report["per_example"] + report["input_grad"])
    assert (out / "conv_formulations.md").read_text() == conv_formulations.report(report)


def test_matplotlib_hint_names_the_extra():
    assert "jaxcnn[plots]" in common.MATPLOTLIB_HINT


@pytest.mark.slow
def test_time_to_accuracy_smoke(tmp_path):
    """One real ``jaxcnn train`` run of the default recipe (one epoch), timed from launch, into the layout the
    README's table renders from."""
    assert time_to_accuracy.main(["--smoke", "--out", str(tmp_path)]) == 0
    records = [
        json.loads(line) for line in (tmp_path / "smoke" / "jaxcnn_seed0" / "metrics.jsonl").read_text().splitlines()
    ]
    config = load_json(tmp_path / "smoke" / "jaxcnn_seed0" / "config.json")
    assert config["recipe"] == "mnist" and config["model"] == "fast_cnn" and config["epochs"] == 1
    assert len(records) == 1 and 0.3 < records[0]["test_accuracy"] <= 1.0
    assert not (tmp_path / "smoke" / "jaxcnn_seed0" / "checkpoint.npz").exists()


def test_recipe_cv_smoke(tmp_path):
    """Both initialisations trained on one fold through jaxcnn.fit and scored on its held-out images."""
    assert recipe_cv.main(["--smoke", "--folds", "2", "--out", str(tmp_path)]) == 0
    runs = load_json(tmp_path / "recipe_cv.json")["runs"]
    assert [(r["variant"], r["fold"]) for r in runs] == [("fan_in_uniform", 2), ("he_normal", 2)]
    assert all(0.0 <= r["held_out_accuracy"] <= 1.0 and np.isfinite(r["train_loss"]) for r in runs)
    assert "fan_in_uniform - he_normal, held-out accuracy, points per fold:" in (tmp_path / "recipe_cv.md").read_text()


def test_recipe_cv_compares_run_lengths(tmp_path):
    """--compare epochs: the recipe's own length first, then shorter runs, each through jaxcnn.fit."""
    assert recipe_cv.main(["--smoke", "--folds", "0", "--compare", "epochs", "--out", str(tmp_path)]) == 0
    results = load_json(tmp_path / "recipe_cv_epochs.json")
    assert results["compare"] == "epochs"
    assert [r["variant"] for r in results["runs"]] == ["30 epochs", "25 epochs", "20 epochs"]
    assert "30 epochs - 20 epochs, held-out accuracy" in (tmp_path / "recipe_cv_epochs.md").read_text()


def test_recipe_cv_refuses_folds_of_the_single_fashion_split(capsys):
    with pytest.raises(SystemExit) as e:
        recipe_cv.main(["--dataset", "fashion-mnist", "--folds", "1"])
    assert e.value.code == 2
    assert "--folds: fashion-mnist has one split, its last 10,000 training images" in capsys.readouterr().err


def test_recipe_cv_report_pairs_the_folds():
    runs = [
        {"variant": v, "fold": f, "held_out_accuracy": a, "train_loss": 0.5, "seconds": 10.0 + f}
        for v, f, a in (
            ("fan_in_uniform", 0, 0.990),
            ("he_normal", 0, 0.985),
            ("fan_in_uniform", 1, 0.980),
            ("he_normal", 1, 0.982),
        )
    ]
    text = recipe_cv.report(runs, ["fan_in_uniform", "he_normal"])
    assert "| mean | 0.9850 | 0.5000 | 0.9835 | 0.5000 |" in text
    assert "points per fold: +0.5, -0.2 (mean +0.15)" in text
    assert "Mean seconds per run: fan_in_uniform 10 s, he_normal 10 s." in text


def test_time_to_accuracy_table_and_targets():
    """The table states each target as met or missed from the runs it summarises."""
    rows = {
        "mnist": {
            "shown": "`cmd`",
            "test_set": "official MNIST, 10,000",
            "target": {"accuracy": 0.99, "seconds": 60},
            "runs": {
                "jaxcnn": [
                    {"seed": s, "test_accuracy": a, "process_s": t} for s, a, t in ((0, 0.991, 50.0), (1, 0.988, 52.0))
                ]
            },
            "curves": {},
            "summary": {"jaxcnn": {"mean_accuracy": 0.9895, "max_seconds": 52.0, "met": False}},
        }
    }
    table = time_to_accuracy.render_table({"rows": rows})
    assert (
        "| `cmd` | official MNIST, 10,000 | >= 0.99 in <= 60 s | 0.9895 (mean of 2) | 52 s | missed | — | — |" in table
    )
