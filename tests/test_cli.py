"""The ``jaxcnn`` command: ``train --help`` (one flag per TrainConfig field, with its help text), a small
training run (its files, the logged --train-limit subset, --conv-method reaching the network), one-line
errors with exit status 2, signals (130/143) and stopped runs (1), and ``gradcheck`` tables and exit status."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _records import HISTORY_KEYS

import jax
import jax.numpy as jnp

from jaxcnn import cli, models
from jaxcnn.layers import AvgPool2D, Dense, Flatten, Sigmoid, serial
from jaxcnn.train import CHECKPOINT, TrainConfig, loop, zoo

REPO = Path(__file__).resolve().parents[1]
SMALL_RUN = [
    "--recipe",
    "classic",
    "--model",
    "seed_net",
    "--dataset",
    "mnist-offline",
    "--train-limit",
    "256",
    "--batch-size",
    "32",
    "--epochs",
    "1",
    "--conv-method",
    "im2col",
    "--progress",
    "off",
]
# 16 steps of 16 per epoch, all in the first chunk (--chunk-steps 50).
TWO_EPOCHS = [
    "--recipe",
    "classic",
    "--model",
    "seed_net",
    "--dataset",
    "mnist-offline",
    "--train-limit",
    "256",
    "--batch-size",
    "16",
    "--epochs",
    "2",
    "--progress",
    "off",
]


@pytest.fixture(scope="module", autouse=True)
def _private_compilation_cache(compilation_cache):
    """Every test of this module shares one persistent compilation cache (conftest.py)."""


def patch_trainer(monkeypatch, after_call):
    """Makes the training loop's ``Trainer`` call ``after_call(trainer, call, args)`` around each compiled chunk:
    before it (returning the arguments to use) and, with ``call`` negated, after it."""
    calls = [0]

    class Patched(loop.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            real = self.run_steps

            def run_steps(*a):
                calls[0] += 1
                a = after_call(self, calls[0], a) or a
                out = real(*a)
                after_call(self, -calls[0], a)
                return out

            self.run_steps = run_steps

    monkeypatch.setattr(loop, "Trainer", Patched)


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxcnn")
    sub = parser.add_subparsers(dest="command")
    cli._train_parser(sub)
    return sub.choices["train"]


def option_blocks(help_text: str) -> dict[str, str]:
    """``{"--flag": "its help text"}`` from argparse's help output (one block per option)."""
    blocks, current = {}, None
    for line in help_text.splitlines():
        m = re.match(r"^  (-{1,2}[\w-]+)", line)
        if m:
            current = m.group(1)
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return {k: re.sub(r"\s+", " ", v) for k, v in blocks.items()}


def python_cli(*args, timeout=120, **kwargs):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "jaxcnn.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# train --help


def test_train_help_documents_every_flag_with_its_default():
    """Every flag shows its default: a TrainConfig field its field default (the flag itself defaults to absent,
    so that a recipe can tell what was given), and the help lists every recipe with its settings."""
    from jaxcnn.train.recipes import DEFAULT_RECIPE, RECIPES

    parser = train_parser()
    help_text = parser.format_help()
    blocks = option_blocks(help_text)
    defaults = TrainConfig()
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 20
    for action in flags:
        flag = action.option_strings[-1]
        assert flag in blocks, flag
        assert action.help, f"{flag} has no help"
        if action.dest in fields:
            assert action.default is argparse.SUPPRESS, flag
            shown = getattr(defaults, action.dest)
            shown = "off" if shown is None or shown is False else shown
            assert f"(default: {shown})" in blocks[flag], blocks[flag]
        else:
            assert f"(default: {action.default})" in blocks[flag], blocks[flag]
    assert f"(default: {DEFAULT_RECIPE})" in blocks["--recipe"]
    flat = re.sub(r"\s+", " ", help_text)
    for name in RECIPES:
        assert f"{name}: " in flat, name
    assert {"--check-every", "--out", "--resume", "--precision", "--grad", "--train-limit"} <= set(blocks)
    assert vars(parser.parse_args([])).keys() >= {"recipe", "out"}
    assert "offline" not in vars(parser.parse_args([])) and parser.parse_args(["--offline"]).offline is True


def test_every_train_config_field_is_a_flag_with_its_help_text():
    """The flags are generated from TrainConfig: each field is ``--name-with-dashes`` with the field's own help
    text, and parsing no flags gives TrainConfig's defaults."""
    from jaxcnn.train.config import from_flags

    parser = train_parser()
    blocks = option_blocks(parser.format_help())
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        assert flag in blocks, f"{field.name} has no {flag}"
        assert actions[field.name].option_strings == [flag]
        help_text = re.sub(r"\s+", " ", field.metadata["help"].replace("%%", "%"))
        assert help_text and help_text in blocks[flag], (help_text, blocks[flag])
    assert from_flags(parser.parse_args([])) == TrainConfig()
    config = from_flags(
        parser.parse_args(
            [
                "--conv-method",
                "im2col",
                "--offline",
                "--normalize",
                "--lr",
                "0.1",
                "--train-limit",
                "100",
                "--devices",
                "1",
            ]
        )
    )
    assert config == TrainConfig(conv_method="im2col", offline=True, normalize=True, lr=0.1, train_limit=100, devices=1)


def test_train_help_runs_as_a_module():
    result = python_cli("train", "--help")
    assert result.returncode == 0, result.stderr
    assert "--check-every N" in result.stdout and "(default: small_cnn)" in result.stdout


# ---------------------------------------------------------------------------------------------------
# A small run, its files, and what a second invocation says


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """``jaxcnn train`` in this process, recording the keyword arguments the preset's network is built with."""
    out = tmp_path_factory.mktemp("cli-run")
    stdout = io.StringIO()
    built = []
    real_get_model = zoo.get_model

    def recording_get_model(name):
        spec = real_get_model(name)

        def build(**kwargs):
            built.append(kwargs)
            return spec.build(**kwargs)

        return spec._replace(build=build)

    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(zoo, "get_model", recording_get_model)
        status = cli.main(["train", *SMALL_RUN, "--out", str(out)])
    return dict(status=status, out=out, stdout=stdout.getvalue().splitlines(), built=built)


def test_small_training_run(small_run):
    status, out, stdout = small_run["status"], small_run["out"], small_run["stdout"]
    assert status == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.npz", "config.json", "metrics.jsonl"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["epoch"] == 1
    assert tuple(records[0]) == HISTORY_KEYS
    saved = json.loads((out / "config.json").read_text())
    # jaxcnn train records every setting, its presets included, and the data actually used.
    assert saved.pop("data")["source"].startswith("the bundled MNIST subset")
    assert saved.pop("recipe") == "classic"
    assert (
        saved
        == TrainConfig(
            model="seed_net", dataset="mnist-offline", train_limit=256, batch_size=32, epochs=1, conv_method="im2col"
        ).to_json()
    )
    # The class-balanced --train-limit subset is drawn by digit and logged.
    assert stdout[0] == (
        "train_limit 256: a class-balanced subset (seed 0): class 0: 26, class 1: 26, class 2: 26, "
        "class 3: 26, class 4: 26, class 5: 26, class 6: 25, class 7: 25, class 8: 25, class 9: 25"
    )
    assert any("256 train / 1,000 test images, 8 steps of 32 per epoch" in line for line in stdout), stdout
    assert re.fullmatch(r"final test accuracy 0\.\d{4} after 1 epoch \(\d+\.\d s\)", stdout[-1]), stdout


def test_conv_method_reaches_the_network(small_run):
    assert small_run["built"] == [{"conv_method": "im2col"}]
    assert json.loads((small_run["out"] / "config.json").read_text())["conv_method"] == "im2col"
    with np.load(small_run["out"] / CHECKPOINT) as z:
        assert json.loads(bytes(z["meta"]).decode())["config"]["conv_method"] == "im2col"


def test_second_invocation_needs_resume_and_the_same_settings(small_run, capsys):
    out = small_run["out"]
    assert cli.main(["train", *SMALL_RUN, "--out", str(out)]) == 2
    assert "already holds a checkpoint; pass --resume" in one_line_error(capsys.readouterr().err)
    assert cli.main(["train", *SMALL_RUN, "--out", str(out), "--resume", "--lr", "0.1"]) == 2
    assert "other settings (lr 0.05 -> 0.1)" in one_line_error(capsys.readouterr().err)
    assert cli.main(["train", *SMALL_RUN, "--out", str(out), "--resume", "--conv-method", "taps"]) == 2
    assert "other settings (conv_method 'im2col' -> 'taps')" in one_line_error(capsys.readouterr().err)
    # Resuming a finished run trains nothing and reports the recorded result.
    assert cli.main(["train", *SMALL_RUN, "--out", str(out), "--resume"]) == 0
    captured = capsys.readouterr()
    assert "resuming from" in captured.out and "final test accuracy" in captured.out
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------
# User errors: one line on stderr, exit status 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "jaxcnn train: --epochs must be >= 1, got 0"),
        (["--lr", "-1"], "jaxcnn train: --lr must be a positive number, got -1.0"),
        (["--resume"], "jaxcnn train: --resume needs --out DIR"),
        (["--augment", "9"], "jaxcnn train: --augment must be between 0 and 8 pixels, got 9"),
        (
            ["--dataset", "mnist-offline", "--batch-size", "9000"],
            "jaxcnn train: --batch-size 9000 exceeds the 4000 training examples",
        ),
    ],
)
def test_bad_values_exit_2_with_one_line(argv, message, capsys, tmp_path):
    assert cli.main(["train", *argv]) == 2
    assert one_line_error(capsys.readouterr().err).startswith(message)


def test_missing_dataset_directory_exits_2_without_traceback(tmp_path):
    missing = tmp_path / "no-such-dir"
    result = python_cli("train", "--dataset", str(missing), "--epochs", "1")
    assert result.returncode == 2, result.stderr
    line = one_line_error(result.stderr)
    assert line.startswith("jaxcnn train: ") and str(missing) in line and "unknown dataset" in line
    # An existing directory without the IDX files: says which files are missing.
    missing.mkdir()
    result = python_cli("train", "--dataset", str(missing), "--epochs", "1")
    assert result.returncode == 2
    assert "not a dataset directory" in one_line_error(result.stderr)


def test_unparsable_flag_value_exits_2_with_a_usage_message(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--epochs", "abc"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "jaxcnn train: error: argument --epochs: invalid int value: 'abc'" in err
    with pytest.raises(SystemExit):
        cli.main(["train", "--model", "vgg16"])
    assert "argument --model: invalid choice: 'vgg16'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Signals and stopped runs


def test_sigint_saves_and_exits_130(tmp_path, monkeypatch, capsys):
    def interrupt(trainer, call, args):
        if call < 0:
            os.kill(os.getpid(), signal.SIGINT)

    patch_trainer(monkeypatch, interrupt)
    # 16 steps per epoch, all in the first chunk: the signal stops the run at the end of epoch 1 of 2.
    assert cli.main(["train", *TWO_EPOCHS, "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert re.search(
        r"SIGINT: checkpoint saved to .*checkpoint\.npz at epoch 2, step 0; "
        r"continue with the same command plus --resume",
        err,
    ), err
    assert (tmp_path / CHECKPOINT).exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_non_finite_loss_exits_1(tmp_path, monkeypatch, capsys):
    """The parameters are poisoned before the first chunk: the step computes a NaN loss and the command stops."""

    def poison(trainer, call, args):
        if call == 1:
            state = args[0]
            params = jax.tree_util.tree_map(lambda p: jnp.full_like(p, jnp.nan), state.params)
            return (trainer.placement.put(state._replace(params=params)), *args[1:])

    patch_trainer(monkeypatch, poison)
    assert cli.main(["train", *TWO_EPOCHS, "--out", str(tmp_path)]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert re.match(r"jaxcnn train: loss became nan at step 0 of epoch 1 \(global step 0\); try a lower --lr$", line), (
        line
    )
    assert not (tmp_path / CHECKPOINT).exists()


def test_sigterm_to_a_running_jaxcnn_train_saves_a_checkpoint_and_exits_143(tmp_path):
    """A real process: SIGTERM once training has started; the checkpoint is written and the exit status is 143."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    args = [
        sys.executable,
        "-m",
        "jaxcnn.cli",
        "train",
        "--model",
        "seed_net",
        "--dataset",
        "mnist-offline",
        "--batch-size",
        "32",
        "--epochs",
        "500",
        "--progress",
        "off",
        "--out",
        str(tmp_path),
    ]  # far more than 2 s
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # the line logged just before the training loop starts
            if "steps of 32 per epoch" in line:
                break
        time.sleep(2.0)
        assert proc.poll() is None, "training finished before it could be interrupted"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "SIGTERM: checkpoint saved to" in err and "Traceback" not in err
    with np.load(tmp_path / CHECKPOINT) as z:
        meta = json.loads(bytes(z["meta"]).decode())
    assert (meta["epoch"], meta["step"]) != (0, 0)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary file left behind


# ---------------------------------------------------------------------------------------------------
# gradcheck


def test_gradcheck_seed_net_prints_the_tables_and_exits_0(tmp_path, capsys):
    report = tmp_path / "gradcheck.json"
    assert cli.main(["gradcheck", "--model", "seed_net", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    names = [
        "seed_net[0] Conv2D(3, kernel=5)",
        "seed_net[1] Sigmoid",
        "seed_net[2] Flatten",
        "seed_net[3] Dense(1)",
        "seed_net[4] Sigmoid",
        "seed_net + mse",
    ]
    for name in names:
        assert f"gradcheck {name} [float64]" in out
    assert out.count("\nOK\n") == len(names)
    assert "vs autodiff" in out and "vs FD (f64)" in out and "adjoint identity" in out
    assert out.rstrip().endswith("6 passed, 0 failed")
    results = json.loads(report.read_text())
    assert [r["name"] for r in results] == names and all(r["ok"] for r in results)
    assert all(row["vs_autodiff"] <= 1e-12 for r in results for row in r["rows"])


def _bad_zoo_model(**_):
    """A cheap stand-in for a zoo model whose Dense backward is off by 0.1%."""
    dense = Dense(1)

    def backward(params, residuals, dy):
        dparams, dx = dense.backward(params, residuals, dy)
        return jax.tree_util.tree_map(lambda g: 1.001 * g, dparams), dx

    return serial(AvgPool2D(4), Flatten(), dense._replace(backward=backward), Sigmoid(), name="bad")


def test_gradcheck_exits_1_on_a_disagreement(monkeypatch, capsys):
    monkeypatch.setitem(models.MODELS, "seed_net", models.get_model("seed_net")._replace(build=_bad_zoo_model))
    assert cli.main(["gradcheck", "--model", "seed_net", "--batch", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: params['b']: manual vs autodiff" in out
    assert out.rstrip().endswith("3 passed, 2 failed")  # the dense layer alone and the whole model
