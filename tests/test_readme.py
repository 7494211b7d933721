"""README.md: its Python examples run as written, its commands name real flags, and it holds exactly the
figures of the committed results that produced them.

``python experiments/readme_numbers.py --write-readme`` regenerates the README's generated blocks from
``experiments/results/readme_numbers/readme_numbers.json`` (each row a real ``jaxcnn train`` run, its
``metrics.jsonl`` committed beside it) and from the benchmark report ``docs/bench/cpu.json``. These tests
render the blocks again from the committed files and compare them with README.md, check that every row's
figures are those of its own ``metrics.jsonl``, and that no measured figure stands in README.md outside
the generated blocks.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import jax

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from _docblocks import python_blocks, run_blocks  # noqa: E402  (needs tests/ on sys.path, above)

from experiments import readme_numbers as rn  # noqa: E402  (needs the repository on sys.path, above)

README = (REPO / "README.md").read_text()


@pytest.fixture(scope="module")
def results():
    return rn.load_results()


def test_every_readme_row_was_measured(results):
    assert set(results["rows"]) == {row.key for row in rn.ROWS}


@pytest.mark.parametrize("row", rn.ROWS, ids=lambda r: r.key)
def test_row_figures_are_those_of_its_run(results, row):
    got = results["rows"][row.key]
    records = [
        json.loads(line) for line in (rn.common.RESULTS / rn.NAME / row.key / "metrics.jsonl").read_text().splitlines()
    ]
    config = json.loads((rn.common.RESULTS / rn.NAME / row.key / "config.json").read_text())
    final = records[-1]
    assert got["test_accuracy"] == final["test_accuracy"] and got["wall_s"] == final["wall_s"]
    assert final["epoch"] == config["epochs"] == got["epochs"]
    assert [r["epoch"] for r in records] == list(range(1, final["epoch"] + 1))
    # The command shown in the README is the one that ran.
    for arg in row.args:
        if not arg.startswith("../"):
            assert arg in got["command"]


@pytest.mark.parametrize("name", ["accuracy", "speed", "recipes", "time_to_accuracy"])
def test_readme_blocks_equal_the_committed_results(results, name):
    blocks = rn.render(results, rn.load_bench(), rn.load_time_to_accuracy())
    assert name in blocks, f"no committed result renders the {name} block"
    assert rn.fill_readme(README, {name: blocks[name]}) == README, (
        f"README.md's {name} block differs from the committed results; run "
        "python experiments/readme_numbers.py --write-readme"
    )


def test_time_to_accuracy_rows_are_those_of_their_runs():
    """Every run in the committed time-to-accuracy results: its accuracy and epochs are those of its own
    metrics.jsonl, its config.json is the recipe resolved as the command says, and the row's summary is
    computed from its runs; the README's first command (``jaxcnn train`` with no data at hand, the row
    ``offline``) is among them."""
    from experiments import time_to_accuracy as tta
    from jaxcnn.train.recipes import DEFAULT_RECIPE

    results = rn.load_time_to_accuracy()
    assert results is not None and set(results["rows"]) == {t.key for t in tta.TARGETS}
    # The README's first command ends in a bare ``jaxcnn train``; the row offline ran exactly that (plus its seed).
    assert "pip install -e . && jaxcnn train\n" in README
    assert results["rows"]["offline"]["commands"]["jaxcnn"].endswith("jaxcnn.cli train --seed 0 --progress off")
    for target in tta.TARGETS:
        row = results["rows"][target.key]
        for who, runs in row["runs"].items():
            assert [r["seed"] for r in runs] == list(target.seeds), (target.key, who)
            for r in runs:
                workdir = rn.common.RESULTS / "time_to_accuracy" / target.key / f"{who}_seed{r['seed']}"
                records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
                config = json.loads((workdir / "config.json").read_text())
                assert r["test_accuracy"] == records[-1]["test_accuracy"] and r["epochs"] == records[-1]["epoch"]
                assert config["seed"] == r["seed"] and config["epochs"] == r["epochs"]
                assert config["recipe"] == (target.args[1] if target.args[:1] == ("--recipe",) else DEFAULT_RECIPE)
            accuracies = [r["test_accuracy"] for r in runs]
            summary = row["summary"][who]
            assert summary["mean_accuracy"] == pytest.approx(np.mean(accuracies), abs=1e-12)
            assert summary["max_seconds"] == max(r["process_s"] for r in runs)
            assert summary["met"] == (
                summary["mean_accuracy"] >= target.accuracy and summary["max_seconds"] <= target.seconds
            )
    # The PyTorch peer ran in the form that was fastest on the first row's first seed, in every row.
    form = results["peer_form"]
    assert set(form["seconds"]) == set(tta.PEER_FORMS) and form["row"] == tta.TARGETS[0].key
    assert form["chosen"] == min(form["seconds"], key=form["seconds"].__getitem__)
    options = tta.PEER_FORMS[form["chosen"]]
    for target in tta.TARGETS:
        for r in results["rows"][target.key]["runs"]["pytorch"]:
            workdir = rn.common.RESULTS / "time_to_accuracy" / target.key / f"pytorch_seed{r['seed']}"
            config = json.loads((workdir / "config.json").read_text())
            assert (config["compile"], config["channels_last"]) == (
                "--compile" in options,
                "--channels-last" in options,
            )


def _outside_generated_blocks(text: str) -> str:
    text = re.sub(r"<!-- readme:(\w+) -->.*?<!-- /readme:\1 -->", "", text, flags=re.S)
    return re.sub(r"```.*?```", "", text, flags=re.S)


def test_no_measured_figure_outside_the_generated_blocks():
    prose = _outside_generated_blocks(README)
    figures = re.findall(r"\b0\.\d{3,}\b|\b\d+(?:\.\d+)?x\b|\b\d+(?:\.\d+)? ms\b|\b[\d,]{4,} images/s\b", prose)
    assert figures == [], f"README.md states figures outside its generated blocks: {figures}"


def test_readme_python_blocks_run():
    blocks = python_blocks(README, source="README.md")
    assert len(blocks) >= 4
    # In order, in one namespace, with a user's default configuration (the suite enables float64 globally).
    namespace = run_blocks(blocks, "README.md")
    # The tour's claims: the conv output shape, both backward formulations agree, the check passes.
    assert namespace["y"].shape == (2, 5, 5, 6)
    np.testing.assert_allclose(namespace["dx"], namespace["dx2"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(namespace["dw"], namespace["dw2"], rtol=1e-5, atol=1e-5)
    assert namespace["result"].ok
    # fit on the user's own 32x32x3 arrays: a history per epoch with the documented keys.
    history = namespace["fitted"].history
    assert [h["epoch"] for h in history] == [1, 2] and 0.0 <= history[-1]["test_accuracy"] <= 1.0
    # The public train step in a loop of one's own.
    assert np.isfinite(float(namespace["metrics"]["loss"])) and int(namespace["metrics"]["correct"]) <= 32
    assert jax.tree_util.tree_structure(namespace["grads"]) == jax.tree_util.tree_structure(namespace["state"].params)


def test_readme_train_flags_exist():
    import contextlib
    import io

    from jaxcnn.cli import main

    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text):
        try:
            main(["train", "--help"])
        except SystemExit:
            pass
    used = set(re.findall(r"jaxcnn train[^\n]*", README))
    flags = {flag for line in used for flag in re.findall(r"--[a-z][a-z-]+", line)}
    assert flags, "the README shows no jaxcnn train flags"
    missing = sorted(f for f in flags if f not in help_text.getvalue())
    assert not missing, f"README uses flags that jaxcnn train does not have: {missing}"
