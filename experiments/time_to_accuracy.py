"""Time to accuracy: each recipe's target run of ``jaxcnn train``, and the PyTorch peer on the same recipe.

Every run is a command as a user types it, launched as a subprocess and timed from launch to exit (Python
start-up, imports, data loading, compilation from a cold cache, training and the final evaluation), with
the same command for the PyTorch peer (``experiments/torch_peer.py``, the same flags resolved by the same
recipe code) right after it, seed by seed, so that the two alternate on one machine. The peer runs in its
fastest form: eager, channels-last, or ``torch.compile`` are each run once on the first row's first seed
and the fastest from launch to exit is used for every row (``--peer-form`` names one instead).


* ``mnist``: ``jaxcnn train --dataset DIR``, every setting default (the recipe ``mnist``), where DIR holds
  the 5,000 real MNIST training images of the bundled subset as IDX files and the official 10,000-image
  test set (from ``--mnist-dir``); target: a mean test accuracy >= 0.99 over seeds 0, 1 and 2, each run
  <= 60 s.
* ``offline``: ``JAXCNN_OFFLINE=1 jaxcnn train`` (4,000 bundled training images, the held-out 1,000 as test
  set); the same target.
* ``fashion_quick`` and ``fashion``: ``jaxcnn train --recipe NAME --dataset fashion-mnist`` (60,000 training
  images, the official 10,000 test images); targets >= 0.92 in <= 120 s and >= 0.93 in <= 300 s.

The recipes were chosen on held-out training images (:mod:`jaxcnn.train.recipes`); the test sets are
reported here once. The figure shows every run's final accuracy against its wall time, the two Fashion-MNIST
recipes joined, and for ``mnist`` a curve run (seed 0, ``--eval-every 1``): the accuracy after every epoch
against the time spent up to it (start-up and training; the extra evaluations' time is subtracted).

    python experiments/time_to_accuracy.py [--rows mnist offline ...] [--no-peer] [--peer-form FORM]

``python experiments/readme_numbers.py --write-readme`` then puts its table into README.md.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

if __package__ in (None, ""):  # run as a script: make ``experiments`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import common

NAME = "time_to_accuracy"
PEER = common.REPO / "experiments" / "torch_peer.py"


class Target(NamedTuple):
    key: str
    shown: str  # the command as the README shows it
    args: tuple  # jaxcnn train's arguments; "{mnist5k}" stands for the IDX directory made from the subset
    test_set: str
    accuracy: float  # the target: mean test accuracy over the seeds
    seconds: float  # within this wall time per run
    seeds: tuple = (0, 1, 2)
    env: tuple = ()
    curve: bool = False  # also a run with --eval-every 1 (seed 0) for the figure's accuracy-against-time curve


TARGETS = (
    Target(
        "mnist",
        "`jaxcnn train --dataset DIR` (DIR: 5,000 real MNIST training images, the official test set)",
        ("--dataset", "{mnist5k}"),
        "official MNIST, 10,000",
        0.99,
        60,
        curve=True,
    ),
    Target(
        "offline",
        "`JAXCNN_OFFLINE=1 jaxcnn train` (the bundled subset)",
        (),
        "bundled held-out 1,000",
        0.99,
        60,
        env=(("JAXCNN_OFFLINE", "1"),),
    ),
    Target(
        "fashion_quick",
        "`jaxcnn train --recipe fashion_quick --dataset fashion-mnist`",
        ("--recipe", "fashion_quick", "--dataset", "fashion-mnist"),
        "official Fashion-MNIST, 10,000",
        0.92,
        120,
        seeds=(0,),
    ),
    Target(
        "fashion",
        "`jaxcnn train --recipe fashion --dataset fashion-mnist`",
        ("--recipe", "fashion", "--dataset", "fashion-mnist"),
        "official Fashion-MNIST, 10,000",
        0.93,
        300,
        seeds=(0,),
    ),
)


def make_mnist5k(directory: Path, mnist_dir: Path) -> Path:
    """Writes the bundled subset's 5,000 training images and labels as IDX files beside a link to the official
    test files of ``mnist_dir`` (the MNIST files themselves stay where they are)."""
    from jaxcnn.data.idx import write_idx
    from jaxcnn.data.offline import load_offline_subset

    images, labels = load_offline_subset()
    directory.mkdir(parents=True, exist_ok=True)
    write_idx(directory / "train-images-idx3-ubyte", images)
    write_idx(directory / "train-labels-idx1-ubyte", labels)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        link = directory / name
        if not link.exists():
            link.symlink_to((mnist_dir / name).resolve())
    return directory


def run_one(argv: list[str], workdir: Path, env: dict, log) -> dict:
    """Runs one training command into ``workdir`` and returns its figures (process wall time included)."""
    records, process_s = common.run_training(argv, workdir, env)
    final = records[-1]
    startup_s = process_s - final["wall_s"]
    log(f"  {final['test_accuracy']:.4f} after {final['epoch']} epochs, {process_s:.1f} s ({startup_s:.1f} s start-up)")
    return {
        "test_accuracy": final["test_accuracy"],
        "epochs": final["epoch"],
        "process_s": process_s,
        "startup_s": startup_s,
        "curve": [
            {
                "epoch": r["epoch"],
                "test_accuracy": r["test_accuracy"],
                # start-up plus training time up to this epoch, without the time of the evaluations
                "seconds": startup_s + r["wall_s"] - sum(q.get("eval_s", 0.0) for q in records[: i + 1]),
            }
            for i, r in enumerate(records)
            if "test_accuracy" in r
        ],
    }


# The PyTorch peer's forms (experiments/torch_peer.py's options). Unless --peer-form names one, each is run once
# on the first row's first seed and the fastest from launch to exit is the peer of every row.
PEER_FORMS = {"eager": (), "channels-last": ("--channels-last",), "compile": ("--compile", "--channels-last")}


def commands(
    target: Target, mnist5k: Path, seed: int, extra: tuple = (), peer_options: tuple = ()
) -> dict[str, list[str]]:
    args = [a.replace("{mnist5k}", str(mnist5k)) for a in target.args]
    args += ["--seed", str(seed), *extra]
    return {
        "jaxcnn": [sys.executable, "-m", "jaxcnn.cli", "train", *args, "--progress", "off"],
        "pytorch": [sys.executable, str(PEER), *args, *peer_options],
    }


def target_env(target: Target) -> dict:
    """The environment of a row's runs: this one's, with the row's variables, without a compilation cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(dict(target.env))
    return env


def choose_peer_form(target: Target, out: Path, mnist5k: Path, log) -> dict:
    """Runs the PyTorch peer in each of its forms on ``target``'s first seed; returns their wall times and the
    fastest form's name."""
    seconds = {}
    for form, options in PEER_FORMS.items():
        argv = commands(target, mnist5k, target.seeds[0], peer_options=options)["pytorch"]
        log(f"peer form {form}: {' '.join(argv[1:])}")
        seconds[form] = run_one(argv, out / target.key / f"pytorch_form_{form}", target_env(target), log)["process_s"]
    return {"seconds": seconds, "chosen": min(seconds, key=seconds.__getitem__), "row": target.key}


def run_target(target: Target, out: Path, mnist5k: Path, peers: tuple[str, ...], log, peer_options=()) -> dict:
    env = target_env(target)
    runs: dict[str, list] = {who: [] for who in peers}
    for seed in target.seeds:
        for who, argv in commands(target, mnist5k, seed, peer_options=peer_options).items():
            if who in peers:
                log(f"{target.key} seed {seed} {who}: {' '.join(argv[2:] if who == 'jaxcnn' else argv[1:])}")
                runs[who].append({"seed": seed, **run_one(argv, out / target.key / f"{who}_seed{seed}", env, log)})
    curves = {}
    for who, argv in commands(target, mnist5k, target.seeds[0], ("--eval-every", "1"), peer_options).items():
        if who in peers and target.curve:
            log(f"{target.key} curve {who}")
            curves[who] = run_one(argv, out / target.key / f"{who}_curve", env, log)["curve"]
    summary = {}
    for who, rows in runs.items():
        accuracies = [r["test_accuracy"] for r in rows]
        seconds = [r["process_s"] for r in rows]
        summary[who] = {
            "mean_accuracy": sum(accuracies) / len(accuracies),
            "min_accuracy": min(accuracies),
            "max_accuracy": max(accuracies),
            "mean_seconds": sum(seconds) / len(seconds),
            "max_seconds": max(seconds),
            "met": sum(accuracies) / len(accuracies) >= target.accuracy and max(seconds) <= target.seconds,
        }
    if "jaxcnn" in summary and "pytorch" in summary:
        summary["seconds_ratio"] = summary["jaxcnn"]["mean_seconds"] / summary["pytorch"]["mean_seconds"]
    return {
        "key": target.key,
        "shown": target.shown,
        "test_set": target.test_set,
        "target": {"accuracy": target.accuracy, "seconds": target.seconds},
        "commands": {
            who: " ".join(argv[2:] if who == "jaxcnn" else argv[1:])
            for who, argv in commands(target, mnist5k, 0, peer_options=peer_options).items()
        },
        "runs": runs,
        "curves": curves,
        "summary": summary,
    }


# ---------------------------------------------------------------------------------------------------
# Tables and figure


def render_table(results: dict) -> str:
    rows = []
    for target in TARGETS:
        r = results["rows"].get(target.key)
        if r is None:
            continue
        s = r["summary"]
        mine = s["jaxcnn"]
        seeds = len(r["runs"]["jaxcnn"])
        peer = s.get("pytorch")
        rows.append(
            [
                r["shown"],
                r["test_set"],
                f">= {target.accuracy:.2f} in <= {target.seconds:.0f} s",
                f"{mine['mean_accuracy']:.4f}" + (f" (mean of {seeds})" if seeds > 1 else ""),
                f"{mine['max_seconds']:.0f} s",
                "met" if mine["met"] else "missed",
                "—" if peer is None else f"{peer['mean_accuracy']:.4f}, {peer['max_seconds']:.0f} s",
                "—" if peer is None else f"{s['seconds_ratio']:.2f}",
            ]
        )
    return common.markdown_table(
        [
            "command",
            "test set",
            "target",
            "test accuracy",
            "wall time (longest run)",
            "",
            "PyTorch, same recipe",
            "time ratio",
        ],
        rows,
        align="lllrrlrr",
    )


def render_report(results: dict) -> str:
    """The markdown report: what was run, the table, the figure and the machine."""
    env = results["environment"]
    peers = [
        json.loads(path.read_text()).get("torch")
        for path in sorted((common.RESULTS / NAME).glob("*/pytorch_seed0/config.json"))
    ]
    return "\n".join(
        [
            "# Time to accuracy",
            "",
            " ".join(__doc__.split("\n\n")[1].split()),
            "",
            render_table(results),
            "",
            "Test accuracy is the fraction of the test set classified right after the last epoch; wall time is "
            "from launch to exit of the command; the time ratio is jaxcnn's mean wall time over PyTorch's.",
            "",
            *render_peer_form(results.get("peer_form")),
            f"![test accuracy against wall time]({NAME}.png)",
            "",
            f"Command: `{env['command']}`. Machine: {env['cpu']} ({env['cpu_count']} cores; "
            f"{', '.join(env['cpu_vector_extensions'])}); Python {env['python']}, jax {env['jax']}, "
            f"jaxlib {env['jaxlib']}" + (f", torch {peers[0]}" if peers and peers[0] else "") + f"; {env['date_utc']}.",
            "",
        ]
    )


def render_peer_form(peer_form: dict | None) -> list[str]:
    """The sentence that says which form of the PyTorch peer ran, and how it was chosen."""
    if not peer_form:
        return []
    if "seconds" not in peer_form:
        return [f"The PyTorch peer ran in the form {peer_form['chosen']} (named by --peer-form).", ""]
    trials = ", ".join(f"{form} {s:.1f} s" for form, s in peer_form["seconds"].items())
    return [
        f"The PyTorch peer ran in its fastest form, {peer_form['chosen']}: each form ran the {peer_form['row']} "
        f"row's first seed once, from launch to exit: {trials}.",
        "",
    ]


PANELS = (("mnist",), ("offline",), ("fashion_quick", "fashion"))  # the figure's panels: rows drawn together
PEER_COLOURS = {"jaxcnn": common.COLORS["manual"], "pytorch": common.COLORS["autodiff"]}


def plot(results: dict, path: Path, log) -> None:
    """One panel per group of rows: every run's final accuracy against its wall time (the runs of a group's
    recipes joined in order), each curve run's accuracy after every epoch, and the targets."""
    plt = common.pyplot(log)
    if plt is None:
        return
    panels = [[k for k in keys if k in results["rows"]] for keys in PANELS]
    panels = [keys for keys in panels if keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6), squeeze=False)
    for ax, keys in zip(axes[0], panels, strict=True):
        rows = [results["rows"][k] for k in keys]
        for who, colour in PEER_COLOURS.items():
            for row in rows:
                curve = row["curves"].get(who)
                if curve:
                    ax.plot(
                        [p["seconds"] for p in curve],
                        [p["test_accuracy"] for p in curve],
                        "-",
                        color=colour,
                        lw=1.0,
                        alpha=0.7,
                        label=f"{who}, after every epoch (seed 0)",
                    )
            finals = [r for row in rows for r in row["runs"].get(who, [])]
            if finals:
                ax.plot(
                    [r["process_s"] for r in finals],
                    [r["test_accuracy"] for r in finals],
                    "o--" if len(rows) > 1 else "o",
                    color=colour,
                    lw=0.8,
                    label=f"{who}, target runs",
                )
        for row in rows:
            target = row["target"]
            ax.plot(
                [0, target["seconds"], target["seconds"]],
                [target["accuracy"]] * 2 + [0.0],
                color="grey",
                lw=0.8,
                ls=":",
            )
        low = min(r["target"]["accuracy"] for r in rows)
        ax.set_ylim(low - 0.03, min(1.0, max(r["target"]["accuracy"] for r in rows) + 0.012))
        ax.set_xlim(left=0)
        ax.set_title(" and ".join(keys) + f" ({rows[0]['test_set']})", fontsize=9)
        ax.set_xlabel("seconds from launch (2-core CPU)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    common.save_figure(fig, path, log)


def main(argv=None) -> int:
    parser = common.base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=[t.key for t in TARGETS], choices=[t.key for t in TARGETS])
    parser.add_argument("--no-peer", action="store_true", help="run jaxcnn only (no PyTorch peer)")
    parser.add_argument(
        "--peer-form",
        choices=["fastest", *PEER_FORMS],
        default="fastest",
        help="the PyTorch peer's form (default: the fastest of them on the first row's first seed)",
    )
    parser.add_argument(
        "--mnist-dir",
        default=str(common.shared_mnist_dir() or ""),
        help="directory with the official MNIST test files (t10k-*.gz)",
    )
    args = parser.parse_args(argv)
    log = common.logger(NAME)
    out = common.out_dir(args.out)
    path = out / f"{NAME}.json"
    results = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    peers = ("jaxcnn",) if args.no_peer else ("jaxcnn", "pytorch")
    if "pytorch" in peers:
        try:
            import torch  # noqa: F401
        except ImportError:
            log("PyTorch is not installed: running jaxcnn only")
            peers = ("jaxcnn",)
    targets = [t for t in TARGETS if t.key in args.rows]
    if args.smoke:  # one short run of the default command on the bundled subset, no peer
        targets = [Target("smoke", "smoke", ("--epochs", "1", "--dataset", "mnist-offline"), "bundled", 0.0, 1e9, (0,))]
        peers = ("jaxcnn",)
    with tempfile.TemporaryDirectory() as tmp:
        mnist5k = Path(tmp) / "mnist5k"
        if any("{mnist5k}" in " ".join(t.args) for t in targets):
            if not args.mnist_dir:
                parser.error("--mnist-dir: the official MNIST test files are needed for the row mnist")
            make_mnist5k(mnist5k, Path(args.mnist_dir))
        if "pytorch" in peers:
            if args.peer_form == "fastest":
                results["peer_form"] = choose_peer_form(targets[0], out, mnist5k, log)
            else:
                results["peer_form"] = {"chosen": args.peer_form}
            log(f"PyTorch peer: {results['peer_form']['chosen']}")
        peer_options = PEER_FORMS[results["peer_form"]["chosen"]] if "pytorch" in peers else ()
        for target in targets:
            results["rows"][target.key] = run_target(target, out, mnist5k, peers, log, peer_options)
            if not args.smoke:  # each row is kept as soon as it is measured: a failure later loses no row
                results["environment"] = common.environment(common.command_line(NAME, argv))
                common.write_json(path, results)
    if args.smoke:
        return 0
    (out / f"{NAME}.md").write_text(render_report(results))
    plot(results, out / f"{NAME}.png", log)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
