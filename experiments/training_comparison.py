"""Experiment 4 — training on real data, hand-written gradients vs ``jax.grad``.

``lenet5`` and ``small_cnn`` are trained on MNIST and on Fashion-MNIST twice each, with the same seed,
data order, initialisation and optimiser, by the library's training loop
(:func:`jaxcnn.train.train_and_evaluate`, what ``jaxcnn train`` runs: a jit-compiled step scanned over
device-resident batches), once per gradient route:

* ``grad="manual"``: the hand-written backward passes of the zoo model (convolutions in their default
  formulation, ``conv_method="auto"``);
* ``grad="autodiff"``: ``jax.value_and_grad`` of the forward pass an autodiff user writes (``lax``
  convolutions, as Flax builds them; :func:`jaxcnn.layers.autodiff_forward`), the fair baseline.

Both compute the same function, so the trajectories agree up to float32 rounding; what differs is speed.

MNIST is the full set when its files are found (or downloadable); otherwise the 5,000 real MNIST
training images bundled with jaxcnn, tested on the official 10,000-image test set when its files are
present (``../shared/data/mnist`` beside the checkout, or ``$JAXCNN_SHARED_DATA``). Fashion-MNIST is the
full set (``apt-get install dataset-fashion-mnist`` puts it where the loader looks); ``--fashion-train``
trains on a seeded, class-balanced subset of N of its training images (``jaxcnn train --train-limit N``)
to keep the run short.

Writes ``training_comparison.md`` (final accuracies and throughput), ``training_comparison.json``
(per-epoch metrics, configs, data sources, provenance), ``training_comparison.csv`` and
``training_comparison.png`` (accuracy and loss per epoch, images/s).

    python experiments/training_comparison.py [--out DIR] [--smoke] [--epochs N] [--fashion-train N]
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``experiments`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from experiments import common
from jaxcnn import data as jdata
from jaxcnn.train import TrainConfig, train_and_evaluate

NAME = "training_comparison"
GRADS = ("manual", "autodiff")


@dataclasses.dataclass(frozen=True)
class Config:
    models: tuple = ("lenet5", "small_cnn")
    datasets: tuple = ("mnist", "fashion-mnist")
    epochs: int = 3
    batch_size: int = 128
    lr: float = 0.05
    train_limit: tuple = (("fashion-mnist", 5_000),)  # (dataset, N): a class-balanced subset of N training images
    test_limit: int | None = None  # evaluate on the first N test images (smoke runs only)
    offline: bool = False  # never download dataset files
    seed: int = 0


SMOKE = dict(
    models=("lenet5",), datasets=("mnist",), epochs=1, batch_size=64, train_limit=(("mnist", 256),), test_limit=500
)


def make_config(smoke: bool = False, **overrides) -> Config:
    return Config(**{**(SMOKE if smoke else {}), **overrides})


def load(name: str, config: Config, log) -> jdata.Dataset:
    data_dir = common.shared_mnist_dir() if name == "mnist" else None
    ds = jdata.load_dataset(name, data_dir=data_dir, download=not config.offline, log=log)
    if config.test_limit is not None:
        ds = ds._replace(
            test_images=ds.test_images[: config.test_limit],
            test_labels=ds.test_labels[: config.test_limit],
            source=f"{ds.source}; testing on the first {config.test_limit:,} test images",
        )
    return ds


def steady_images_per_s(history: list[dict]) -> float:
    """Median images/s of the epochs after the first (whose time includes compilation); the first if alone."""
    values = [h["images_per_s"] for h in history[1:]] or [history[0]["images_per_s"]]
    return float(np.median(values))


def run(out_dir, *, smoke: bool = False, command: str | None = None, log=None, **overrides) -> dict:
    config = make_config(smoke, **overrides)
    log = log or common.logger(NAME)
    out = common.out_dir(out_dir)
    env = common.environment(command or f"training_comparison.run(smoke={smoke}, {overrides})")
    runs, sources, csv_rows = [], {}, []
    for ds_name in config.datasets:
        t0 = time.perf_counter()
        try:
            ds = load(ds_name, config, log)
        except jdata.DataError as error:
            hint = " (apt-get install dataset-fashion-mnist)" if ds_name == "fashion-mnist" else ""
            log(f"{ds_name}: skipped, not available{hint}: {error}")
            sources[ds_name] = f"not available: {error}"
            continue
        sources[ds_name] = ds.source
        log(
            f"{ds_name}: {len(ds.train_labels):,} train / {len(ds.test_labels):,} test images "
            f"({time.perf_counter() - t0:.1f} s): {ds.source}"
        )
        for model in config.models:
            for grad in GRADS:
                tc = TrainConfig(
                    model=model,
                    dataset=ds_name,
                    epochs=config.epochs,
                    batch_size=config.batch_size,
                    lr=config.lr,
                    seed=config.seed,
                    grad=grad,
                    offline=config.offline,
                    train_limit=dict(config.train_limit).get(ds_name),
                )
                log(f"training {model} on {ds_name} with {grad} gradients, {config.epochs} epoch(s)")
                t0 = time.perf_counter()
                history = train_and_evaluate(tc, None, dataset=ds, log=lambda s: log("  " + s), progress=False).history
                record = {
                    "dataset": ds_name,
                    "model": model,
                    "grad": grad,
                    "train_config": tc.to_json(),
                    "history": history,
                    "final_test_accuracy": history[-1]["test_accuracy"],
                    "final_test_loss": history[-1]["test_loss"],
                    "steady_images_per_s": steady_images_per_s(history),
                    "wall_s": time.perf_counter() - t0,
                }
                runs.append(record)
                csv_rows += [{"dataset": ds_name, "model": model, "grad": grad, **h} for h in history]
                log(
                    f"{model} on {ds_name}, {grad}: test accuracy {record['final_test_accuracy']:.4f}, "
                    f"{record['steady_images_per_s']:,.0f} images/s, {record['wall_s']:.0f} s"
                )

    pairs = []
    for ds_name in config.datasets:
        for model in config.models:
            by = {r["grad"]: r for r in runs if r["dataset"] == ds_name and r["model"] == model}
            if set(by) != set(GRADS):
                continue
            m, a = by["manual"], by["autodiff"]
            pairs.append(
                {
                    "dataset": ds_name,
                    "model": model,
                    "test_accuracy": {g: by[g]["final_test_accuracy"] for g in GRADS},
                    "test_loss": {g: by[g]["final_test_loss"] for g in GRADS},
                    "images_per_s": {g: by[g]["steady_images_per_s"] for g in GRADS},
                    "speedup_manual_over_autodiff": m["steady_images_per_s"] / a["steady_images_per_s"],
                    "max_abs_diff_per_epoch": {
                        k: max(abs(hm[k] - ha[k]) for hm, ha in zip(m["history"], a["history"], strict=True))
                        for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy")
                    },
                }
            )
    summary = {
        "experiment": NAME,
        "environment": env,
        "config": dataclasses.asdict(config),
        "data": sources,
        "comparison": pairs,
        "runs": runs,
    }
    common.write_json(out / f"{NAME}.json", summary)
    common.write_csv(
        out / f"{NAME}.csv",
        csv_rows,
        [
            "dataset",
            "model",
            "grad",
            "epoch",
            "train_loss",
            "train_accuracy",
            "test_loss",
            "test_accuracy",
            "images_per_s",
            "wall_s",
        ],
    )
    (out / f"{NAME}.md").write_text(_markdown(summary))
    log(f"wrote {NAME}.md, {NAME}.json, {NAME}.csv")
    plt = common.pyplot(log)
    if plt is not None and runs:
        _figure(plt, out, summary, log)
    return summary


def _markdown(s: dict) -> str:
    c, env = s["config"], s["environment"]
    lines = [
        "# Training on real data: hand-written gradients vs jax.grad\n",
        f"Command: `{env['command']}` ({env['date_utc']}; jax {env['jax']}; {env['cpu_count']} CPUs, {env['cpu']}; "
        f"load average at start {env['load_average_1_5_15_min']}).\n",
        f"Each model is trained twice with identical seed ({c['seed']}), data order, initialisation and optimiser "
        f"(`jaxcnn train` defaults: SGD with momentum 0.9, cosine schedule from lr {c['lr']}, batch {c['batch_size']}, "
        f"random-shift augmentation), {c['epochs']} epoch(s), by the library's training loop; only the gradient "
        "route differs: the hand-written backward passes (`--grad manual`, convolutions in the zoo's default "
        "formulation, `--conv-method auto`) or `jax.value_and_grad` of the forward pass an autodiff user writes "
        "(`--grad autodiff`: `lax` convolutions, as Flax builds them), the fair baseline. Both compute the same "
        "function in different formulations.\n",
        "## Data\n",
    ]
    limits = dict(c["train_limit"])
    lines += [
        f"- **{k}**: {v}"
        + (
            f"; training on a class-balanced subset of {limits[k]:,} images (seed {c['seed']}, "
            f"`--train-limit {limits[k]}`)"
            if limits.get(k)
            else ""
        )
        for k, v in s["data"].items()
    ]
    lines.append("\n## Final test accuracy and throughput\n")
    rows = []
    for p in s["comparison"]:
        rows.append(
            [
                p["dataset"],
                p["model"],
                f"{p['test_accuracy']['manual']:.4f}",
                f"{p['test_accuracy']['autodiff']:.4f}",
                common.sci(p["max_abs_diff_per_epoch"]["test_accuracy"]),
                common.sci(p["max_abs_diff_per_epoch"]["train_loss"]),
                f"{p['images_per_s']['manual']:,.0f}",
                f"{p['images_per_s']['autodiff']:,.0f}",
                f"{p['speedup_manual_over_autodiff']:.2f}x",
            ]
        )
    lines.append(
        common.markdown_table(
            [
                "dataset",
                "model",
                "test acc. manual",
                "test acc. autodiff",
                "max Δ test acc. (any epoch)",
                "max Δ train loss",
                "images/s manual",
                "images/s autodiff",
                "manual / autodiff speed",
            ],
            rows,
            "llrrrrrrr",
        )
    )
    lines.append(
        "\nImages/s: training throughput (forward, backward, update) by the training loop, the median over the "
        "epochs after the first (the first includes compilation). Δ: the largest difference between the two "
        "runs' per-epoch values. The two runs compute the same function in different formulations and follow "
        "the same trajectory up to float32 rounding (which grows along the steps), so the curves coincide; "
        "what differs is speed.\n"
    )
    lines.append(
        "\nEach route trains in the loop form measured fastest for it (`jaxcnn train --loop auto`): the "
        "hand-written step scanned over chunks of steps (`lax.scan`), the autodiff step as one compiled call "
        "per batch, since inside `lax.scan` XLA:CPU compiles the kernel gradient that `jax.grad` derives for "
        "a convolution into a far slower loop. The hand-written backward computes each gradient in the "
        "formulation measured fastest for its shape (`auto`; `docs/benchmarks.md`), which is where the speed "
        "difference comes from. Per-step timings of both routes in both forms are in the speed experiment "
        "(`experiments/speed.py`) and the benchmark report (`docs/bench/cpu.md`).\n"
    )
    lines.append("\n## Per epoch\n")
    rows = [
        [
            r["dataset"],
            r["model"],
            r["grad"],
            h["epoch"],
            f"{h['train_loss']:.4f}",
            f"{h['train_accuracy']:.4f}",
            f"{h['test_loss']:.4f}",
            f"{h['test_accuracy']:.4f}",
            f"{h['images_per_s']:,.0f}",
        ]
        for r in s["runs"]
        for h in r["history"]
    ]
    lines.append(
        common.markdown_table(
            ["dataset", "model", "grad", "epoch", "train loss", "train acc.", "test loss", "test acc.", "images/s"],
            rows,
            "lllrrrrrr",
        )
    )
    return "\n".join(lines)


def _figure(plt, out: Path, s: dict, log) -> None:
    datasets = [d for d in s["config"]["datasets"] if any(r["dataset"] == d for r in s["runs"])]
    models = list(s["config"]["models"])
    # Fewer models than markers take the first ones (the zoo has four models, one marker each).
    markers = dict(zip(models, "os^D", strict=False))
    fig, axes = plt.subplots(
        len(datasets), 3, figsize=(13, 3.6 * len(datasets)), squeeze=False, gridspec_kw={"width_ratios": [1, 1, 0.8]}
    )
    for row, ds in zip(axes, datasets, strict=True):
        ax_acc, ax_loss, ax_speed = row
        for r in (r for r in s["runs"] if r["dataset"] == ds):
            epochs = [h["epoch"] for h in r["history"]]
            manual = r["grad"] == "manual"
            style = dict(
                color=common.COLORS[r["grad"]],
                marker=markers[r["model"]],
                lw=2.6 if manual else 1.2,
                ls="-" if manual else "--",
                ms=7 if manual else 4,
                mfc="none" if manual else None,
            )
            ax_acc.plot(epochs, [h["test_accuracy"] for h in r["history"]], label=f"{r['model']} {r['grad']}", **style)
            ax_loss.plot(
                epochs, [h["test_loss"] for h in r["history"]], label=f"{r['model']} {r['grad']} (test)", **style
            )
            ax_loss.plot(
                epochs,
                [h["train_loss"] for h in r["history"]],
                alpha=0.45,
                **{**style, "ls": ":" if manual else (0, (1, 3))},
            )
        ax_acc.set(xlabel="epoch", ylabel="test accuracy", title=f"{ds}: test accuracy per epoch")
        ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title=f"{ds}: test loss (train loss faint)")
        for ax in (ax_acc, ax_loss):
            ax.set_xticks(epochs)
        ax_acc.legend(fontsize=8, loc="lower right")
        pairs = [p for p in s["comparison"] if p["dataset"] == ds]
        x = np.arange(len(pairs))
        for k, grad in enumerate(("manual", "autodiff")):
            vals = [p["images_per_s"][grad] for p in pairs]
            bars = ax_speed.bar(x + (k - 0.5) * 0.38, vals, 0.38, color=common.COLORS[grad], label=grad)
            for bar, v in zip(bars, vals, strict=True):
                ax_speed.text(
                    bar.get_x() + bar.get_width() / 2, v * 1.08, f"{v:,.0f}", ha="center", va="bottom", fontsize=8
                )
        ax_speed.set_xticks(x, [p["model"] for p in pairs])
        ax_speed.set_yscale("log")
        common.plain_log_axis(ax_speed, "y")
        top = max(max(p["images_per_s"].values()) for p in pairs)
        ax_speed.set_ylim(min(min(p["images_per_s"].values()) for p in pairs) / 3, top * 4)
        ax_speed.set(ylabel="training images/s (log scale)", title=f"{ds}: throughput in the training loop")
        ax_speed.legend(fontsize=8, loc="upper right")
    fig.suptitle(
        "Manual backward (solid, open markers) vs jax.grad of the lax forward (dashed): the curves coincide", y=1.0
    )
    fig.tight_layout()
    common.save_figure(fig, out / f"{NAME}.png", log)


def main(argv=None) -> int:
    parser = common.base_parser(NAME, __doc__.splitlines()[0])
    d = Config()
    parser.add_argument("--models", nargs="+", default=None, help=f"zoo models (default {' '.join(d.models)})")
    parser.add_argument("--datasets", nargs="+", default=None, help=f"datasets (default {' '.join(d.datasets)})")
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs per run (default {d.epochs})")
    parser.add_argument(
        "--fashion-train",
        type=int,
        default=None,
        help="train on a seeded, class-balanced subset of N Fashion-MNIST training images "
        f"(default {dict(d.train_limit)['fashion-mnist']:,}; 0: all)",
    )
    parser.add_argument("--offline", action="store_true", help="never download dataset files")
    args = parser.parse_args(argv)
    overrides = {"seed": args.seed, "offline": args.offline}
    for key in ("models", "datasets"):
        if getattr(args, key) is not None:
            overrides[key] = tuple(getattr(args, key))
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.fashion_train is not None:
        overrides["train_limit"] = (("fashion-mnist", args.fashion_train or None),)
    run(args.out, smoke=args.smoke, command=common.command_line(NAME, argv), **overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
