"""Every number in README.md, regenerated: the accuracy rows and the speed table.

Each accuracy row is one ``jaxcnn train`` command, run as a user runs it (a subprocess, ``--out`` under
``experiments/results/readme_numbers/<row>/``, leaving its ``config.json`` and ``metrics.jsonl``). The
speed table comes from the benchmark report ``docs/bench/cpu.json`` (``jaxcnn bench --sections peak ops
steps epoch --json docs/bench/cpu.json``; ``--bench`` reruns it here first; ``--rows`` with no row reruns no
training run). ``readme_numbers.json`` collects every figure,
and :func:`render` turns it into the README's generated blocks (between ``<!-- readme:NAME -->`` and
``<!-- /readme:NAME -->``); ``--write-readme`` puts them into README.md, and ``tests/test_readme.py``
checks that README.md holds exactly what the committed results render.

    python experiments/readme_numbers.py [--rows KEY ...] [--bench] [--write-readme]
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

if __package__ in (None, ""):  # run as a script: make ``experiments`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import common

NAME = "readme_numbers"
README = common.REPO / "README.md"
BENCH_JSON = common.REPO / "docs" / "bench" / "cpu.json"
MNIST_DIR = "../shared/data/mnist"
BENCH_ARGS = ("--sections", "peak", "ops", "steps", "epoch")  # what the README and docs/benchmarks.md report


class Row(NamedTuple):
    key: str
    shown: str  # the command as the README shows it
    args: tuple  # jaxcnn train's arguments
    test_set: str
    env: tuple = ()  # extra environment variables, (name, value) pairs


ROWS = (
    Row(
        "small_cnn_30",
        "`jaxcnn train --recipe classic --epochs 30 --data-dir DIR` (small_cnn)",
        ("--recipe", "classic", "--epochs", "30", "--data-dir", MNIST_DIR),
        "official MNIST, 10,000",
    ),
    Row(
        "lenet5_30",
        "`jaxcnn train --recipe classic --model lenet5 --epochs 30 --data-dir DIR`",
        ("--recipe", "classic", "--model", "lenet5", "--epochs", "30", "--data-dir", MNIST_DIR),
        "official MNIST, 10,000",
    ),
    Row(
        "small_cnn_autodiff_30",
        "`jaxcnn train --recipe classic --grad autodiff --epochs 30 --data-dir DIR` (small_cnn)",
        ("--recipe", "classic", "--grad", "autodiff", "--epochs", "30", "--data-dir", MNIST_DIR),
        "official MNIST, 10,000",
    ),
)


def run_row(row: Row, out: Path, log) -> dict:
    """Runs one row's command into ``out / row.key`` and returns its figures."""
    workdir = out / row.key
    command = [sys.executable, "-m", "jaxcnn.cli", "train", *row.args, "--progress", "off"]
    log(f"{row.key}: {' '.join(command[2:])} --out {workdir}")
    records, seconds = common.run_training(command, workdir, {**os.environ, **dict(row.env)})
    final = records[-1]
    log(f"{row.key}: test accuracy {final['test_accuracy']:.4f}, {final['wall_s']:.1f} s ({seconds:.0f} s in all)")
    return {
        "key": row.key,
        "shown": row.shown,
        "test_set": row.test_set,
        "command": " ".join([*command[2:], "--out", str(workdir)]),
        "env": dict(row.env),
        "epochs": final["epoch"],
        "test_accuracy": final["test_accuracy"],
        "wall_s": final["wall_s"],
        "images_per_s_last_epoch": final["images_per_s"],
    }


# ---------------------------------------------------------------------------------------------------
# The README's generated blocks


def render_accuracy(results: dict) -> str:
    rows = [
        [r["shown"], r["test_set"], f"{r['test_accuracy']:.4f}", f"{r['wall_s']:.0f} s"]
        for r in (results["rows"][row.key] for row in ROWS if row.key in results["rows"])
    ]
    return common.markdown_table(["command", "test set", "test accuracy", "wall time"], rows, align="llrr")


def render_speed(bench: dict) -> str:
    """The step-time table of a ``jaxcnn bench`` report: ms per train step of each contender family."""
    from jaxcnn.bench.report import readme_speed_rows

    headers, rows = readme_speed_rows(bench)
    return common.markdown_table(headers, rows, align="l" + "r" * (len(headers) - 1))


def render_recipes() -> str:
    """The recipes, one bullet each, from :mod:`jaxcnn.train.recipes` (no measured figure)."""
    from jaxcnn.train.recipes import DEFAULT_RECIPE, RECIPES, describe

    lines = []
    for recipe in RECIPES.values():
        name, _, rest = describe(recipe).partition(": ")
        lines.append(f"- `{name}`{' (the default)' if name == DEFAULT_RECIPE else ''}: {rest}")
    return "\n".join(lines)


def render(results: dict, bench: dict | None, time_to_accuracy: dict | None = None) -> dict[str, str]:
    blocks = {"accuracy": render_accuracy(results), "recipes": render_recipes()}
    if bench is not None:
        blocks["speed"] = render_speed(bench)
    if time_to_accuracy is not None:
        from experiments import time_to_accuracy as tta

        blocks["time_to_accuracy"] = tta.render_table(time_to_accuracy)
    return blocks


def fill_readme(text: str, blocks: dict[str, str]) -> str:
    for name, body in blocks.items():
        pattern = re.compile(rf"(<!-- readme:{name} -->\n).*?(<!-- /readme:{name} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"README.md has no <!-- readme:{name} --> block")
        text = pattern.sub(lambda m, body=body: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text)
    return text


def load_results(out: Path = common.RESULTS / NAME) -> dict:
    return json.loads((out / f"{NAME}.json").read_text())


def load_bench(path: Path = BENCH_JSON) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def load_time_to_accuracy(path: Path = common.RESULTS / "time_to_accuracy" / "time_to_accuracy.json") -> dict | None:
    """The committed results of ``experiments/time_to_accuracy.py`` (the README's recipe rows), if any."""
    return json.loads(path.read_text()) if path.exists() else None


def main(argv=None) -> int:
    parser = common.base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument(
        "--rows",
        nargs="*",
        default=[r.key for r in ROWS],
        choices=[r.key for r in ROWS],
        help="rerun only these rows (the others keep their committed results); --rows alone reruns none, "
        "e.g. to rewrite the speed block after a new docs/bench/cpu.json",
    )
    parser.add_argument(
        "--bench",
        action="store_true",
        help=f"rerun jaxcnn bench {' '.join(BENCH_ARGS)} --json docs/bench/cpu.json first",
    )
    parser.add_argument("--write-readme", action="store_true", help="write the generated blocks into README.md")
    args = parser.parse_args(argv)
    log = common.logger(NAME)
    out = common.out_dir(args.out)
    path = out / f"{NAME}.json"
    results = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    if args.smoke:
        rows = [
            Row(
                "smoke",
                "`jaxcnn train --epochs 1 --train-limit 512 --dataset mnist-offline`",
                ("--epochs", "1", "--train-limit", "512", "--dataset", "mnist-offline", "--model", "lenet5"),
                "bundled held-out 1,000",
            )
        ]
    else:
        rows = [r for r in ROWS if r.key in args.rows]
    if args.bench:
        log(f"jaxcnn bench {' '.join(BENCH_ARGS)} --json docs/bench/cpu.json")
        subprocess.run(
            [sys.executable, "-m", "jaxcnn.cli", "bench", *BENCH_ARGS, "--json", str(BENCH_JSON)],
            cwd=common.REPO,
            check=True,
        )
    for row in rows:
        results["rows"][row.key] = run_row(row, out, log)
    if rows:  # the environment of the rows' runs; with none rerun, the committed results stay as they are
        results["environment"] = common.environment(common.command_line(NAME, argv))
        common.write_json(path, results)
        log(f"wrote {path}")
    if args.write_readme and not args.smoke:
        README.write_text(fill_readme(README.read_text(), render(results, load_bench(), load_time_to_accuracy())))
        log("README.md updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
