"""What every experiment script shares: where results go, how they are written, what machine made them.

* :func:`base_parser`: the ``--out DIR``, ``--smoke`` and ``--seed`` flags of every script.
* :func:`write_json`, :func:`write_csv`, :func:`markdown_table`: the raw numbers and the tables.
* :func:`environment`: the command, versions, date and machine, stored with every result.
* :func:`pyplot`: matplotlib (an optional extra) with a message saying how to install it when missing.
* :func:`interleaved_times`: wall-clock timings of several contenders, measured in alternation.
* :func:`shared_mnist_dir`: the real MNIST files beside the checkout, when they are there.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxcnn import provenance

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
MATPLOTLIB_HINT = (
    "figures need matplotlib, an optional extra of jaxcnn: pip install 'jaxcnn[plots]' "
    "(or pip install matplotlib); the tables and JSON/CSV files are written without it"
)
# One colour per gradient path, the same in every figure.
COLORS = {"manual": "#1f77b4", "autodiff": "#ff7f0e", "numpy": "#2ca02c", "reference": "#7f7f7f"}

Log = Callable[[str], None]


def logger(name: str) -> Log:
    """``log(message)`` prints ``[name  seconds since start] message`` and flushes: one line per step of work."""
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{name} {time.perf_counter() - start:6.1f}s] {message}", flush=True)

    return log


# ---------------------------------------------------------------------------------------------------
# Command line


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The flags every experiment has; ``--out`` defaults to ``experiments/results/<name>``."""
    parser = argparse.ArgumentParser(
        prog=f"python experiments/{name}.py",
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", default=str(RESULTS / name), help="directory for tables, figures and raw numbers")
    parser.add_argument("--smoke", action="store_true", help="tiny data and few steps (what the tests run)")
    parser.add_argument("--seed", type=int, default=0, help="seeds initialisation, data order and random inputs")
    return parser


def command_line(name: str, argv: Sequence[str] | None) -> str:
    """The command as a reader would type it, for the results' provenance."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", f"experiments/{name}.py", *args])


# ---------------------------------------------------------------------------------------------------
# Data


def shared_mnist_dir() -> Path | None:
    """``../shared/data/mnist`` beside the checkout (or ``$JAXCNN_SHARED_DATA/mnist``) when it exists.

    Passed as ``data_dir`` it lets the MNIST loader find the official test set (and whatever else is
    there) without a download; ``None`` when absent, and the loader's own lookup then applies.
    """
    root = Path(os.environ.get("JAXCNN_SHARED_DATA", REPO.parent / "shared" / "data"))
    path = root / "mnist"
    return path if path.is_dir() else None


# ---------------------------------------------------------------------------------------------------
# Writing results


def out_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_training(argv: Sequence[str], workdir: Path, env: Mapping[str, str]) -> tuple[list[dict], float]:
    """Runs a training command (``jaxcnn train`` or its PyTorch peer) with ``--out workdir`` as a subprocess from
    the repository, keeps its stdout as ``stdout.txt`` beside its ``config.json`` and ``metrics.jsonl`` (not its
    checkpoint), and returns the metrics records and the seconds from launch to exit.

    Raises:
      RuntimeError: the command failed; the message ends with its stderr.
    """
    for name in ("checkpoint.npz", "metrics.jsonl", "config.json"):
        (workdir / name).unlink(missing_ok=True)
    t0 = time.perf_counter()
    done = subprocess.run(
        [*argv, "--out", str(workdir)], cwd=REPO, env=dict(env), capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    (workdir / "stdout.txt").write_text(done.stdout)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    (workdir / "checkpoint.npz").unlink(missing_ok=True)  # the figures are kept, not the weights
    return records, seconds


def _jsonable(value: Any) -> Any:
    """``value`` as JSON values (:func:`jaxcnn.provenance.jsonable`; NaN and infinities as strings)."""
    return provenance.jsonable(value, nonfinite="string")


def write_json(path: Path, obj: Any) -> Path:
    """Writes ``obj`` as indented JSON (:func:`jaxcnn.provenance.write_json`, atomically)."""
    return provenance.write_json(path, obj, nonfinite="string", indent=2)


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    columns = list(columns or (rows[0].keys() if rows else []))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _jsonable(row.get(k)) for k in columns})
    return path


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one character per column, ``l`` or ``r`` (default: all left)."""
    align = align or "l" * len(headers)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def sci(x: float, digits: int = 1) -> str:
    """``1.2e-07``-style, ``0`` for an exact zero, the word for inf/nan."""
    if x is None:
        return "—"
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    return "0" if x == 0 else f"{x:.{digits}e}"


def environment(command: str) -> dict:
    """Provenance of a result: the command, library versions, date and machine (CPU model and vector
    extensions included; see :mod:`jaxcnn.provenance`)."""
    import jax

    versions = provenance.versions(("jax", "jaxlib", "numpy"), optional=())
    return {
        "command": command,
        "date_utc": provenance.utc_now(),
        "python": versions["python"],
        "jax": versions["jax"],
        "jaxlib": versions["jaxlib"],
        "numpy": versions["numpy"],
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_vector_extensions": provenance.vector_extensions(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15_min": provenance.load_average(),
    }


def _cpu_name() -> str:
    return provenance.cpu_name()


# ---------------------------------------------------------------------------------------------------
# Figures


def pyplot(log: Log | None = None):
    """``matplotlib.pyplot`` with the non-interactive Agg backend, or ``None`` (and one log line) if missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if log is not None:
            log(f"matplotlib not found: no figures. {MATPLOTLIB_HINT}")
        return None
    plt.rcParams.update(
        {
            "figure.dpi": 100,
            "savefig.dpi": 100,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.titlesize": 11,
            "axes.labelsize": 10,
            "legend.fontsize": 9,
        }
    )
    return plt


def plain_log_axis(ax, which: str = "x") -> None:
    """A log axis labelled with plain numbers (0.1, 1, 10, ...) and no minor-tick labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_locator(LogLocator(base=10))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,g}"))
    axis.set_minor_formatter(NullFormatter())


def save_figure(fig, path: Path, log: Log | None = None) -> Path:
    """Writes a PNG at 100 dpi (small enough to commit) and closes the figure."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    if log is not None:
        log(f"wrote {path.name} ({path.stat().st_size / 1024:.0f} kB)")
    return path


# ---------------------------------------------------------------------------------------------------
# Timing


def block(tree):
    """Waits for every array in ``tree`` (JAX dispatch is asynchronous)."""
    import jax

    return jax.block_until_ready(tree)


def interleaved_times(
    contenders: Mapping[str, Callable[[], Any]], rounds: int, rounds_of: Mapping[str, int] | None = None
) -> dict[str, list[float]]:
    """Seconds per call of each contender, measured round-robin so that a change in machine load hits
    all of them alike. ``rounds_of[name]`` caps the rounds of a slow contender (it joins the first ones).
    Each callable must finish its work before returning (call :func:`block` on JAX results)."""
    rounds_of = dict(rounds_of or {})
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(rounds):
        for name, fn in contenders.items():
            if r >= rounds_of.get(name, rounds):
                continue
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def summarize_times(seconds: Sequence[float]) -> dict:
    s = np.asarray(seconds, np.float64)
    return {
        "median_ms": float(np.median(s) * 1e3),
        "min_ms": float(s.min() * 1e3),
        "q25_ms": float(np.percentile(s, 25) * 1e3),
        "q75_ms": float(np.percentile(s, 75) * 1e3),
        "n": int(s.size),
    }
