"""Experiment 5 — what the network learned: first-layer filters, feature maps, confusion matrix.

Trains a zoo model (``lenet5`` by default, in its default convolution formulation) on MNIST with the
hand-written gradients, through :func:`jaxcnn.train.train_and_evaluate` as ``jaxcnn train`` does — or
loads the checkpoint of a run of ``jaxcnn train --out DIR`` given as ``--workdir DIR`` — then shows:

* the first convolution's filters as images;
* the feature maps (after the first convolution and its ReLU) of a few test digits;
* the confusion matrix on the test set, per-class accuracy, and the most confident mistakes.

MNIST is found as in the training comparison: the full set if present or downloadable, otherwise the
bundled 5,000 real training images, tested on the official 10,000 test images when their files are there.

Writes ``what_it_learned.md`` (accuracy, per-class table, top confusions), ``what_it_learned.json``
(confusion matrix, history, provenance), ``what_it_learned_confusion.csv`` and four figures
(``_filters``, ``_feature_maps``, ``_confusion``, ``_mistakes``).

    python experiments/what_it_learned.py [--out DIR] [--smoke] [--model lenet5] [--epochs N] [--workdir RUN]
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``experiments`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

import jax
import jax.numpy as jnp

from experiments import common
from jaxcnn import data as jdata
from jaxcnn import gradients
from jaxcnn.models import MODELS, get_model
from jaxcnn.train import TrainConfig, Trainer, restore_checkpoint, train_and_evaluate

NAME = "what_it_learned"


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = "lenet5"
    epochs: int = 10
    train_limit: int | None = None  # train on a seeded, class-balanced subset of N images (``--train-limit``)
    test_limit: int | None = None  # smoke runs only
    n_digits: int = 4  # test digits whose feature maps are shown
    n_mistakes: int = 12
    workdir: str | None = None  # a ``jaxcnn train --out`` directory to load instead of training
    offline: bool = False  # never download dataset files
    seed: int = 0


SMOKE = dict(epochs=1, train_limit=512, test_limit=500, n_mistakes=6)


def make_config(smoke: bool = False, **overrides) -> Config:
    return Config(**{**(SMOKE if smoke else {}), **overrides})


def _load_data(config: Config, log) -> jdata.Dataset:
    ds = jdata.load_dataset("mnist", data_dir=common.shared_mnist_dir(), download=not config.offline, log=log)
    if config.test_limit is not None:
        ds = ds._replace(
            test_images=ds.test_images[: config.test_limit],
            test_labels=ds.test_labels[: config.test_limit],
            source=f"{ds.source}; testing on the first {config.test_limit:,} test images",
        )
    return ds


def _saved_config(workdir: Path) -> TrainConfig:
    """The :class:`TrainConfig` of a ``jaxcnn train --out`` run (or of a ``jaxcnn.fit(out=...)`` run of a zoo model)."""
    fields = json.loads((workdir / "config.json").read_text())
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = {k: v for k, v in fields.items() if k in known}
    if "model" not in fields:  # written by jaxcnn.fit: the network's name, which is the preset's for a zoo model
        if fields.get("network") not in MODELS:
            raise SystemExit(
                f"{NAME}: {workdir} holds a run of the network {fields.get('network')!r}, not of a zoo "
                f"model ({', '.join(MODELS)}); it cannot be rebuilt here"
            )
        settings["model"] = fields["network"]
    if str(settings.get("optimizer", "")).startswith("custom"):
        raise SystemExit(
            f"{NAME}: {workdir} was trained with an optax transformation passed to jaxcnn.fit "
            f"({settings['optimizer']}); its checkpoint can only be restored with that optimiser"
        )
    return TrainConfig(**settings)


def _trained(config: Config, ds: jdata.Dataset, log):
    """(train config, params, model state, history): trained here, or loaded from ``config.workdir``."""
    if config.workdir:
        workdir = Path(config.workdir)
        tc = _saved_config(workdir)
        spec = get_model(tc.model)
        train = (ds.train_images, np.asarray(spec.targets(ds.train_labels)))
        template = Trainer(
            spec.build(conv_method=tc.conv_method), spec.loss, train, None, tc, log=lambda s: None
        ).init_state()
        ts, meta = restore_checkpoint(workdir, template)
        metrics = workdir / "metrics.jsonl"
        history = (
            [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
        )
        log(f"loaded {tc.model} from {workdir} (epoch {meta['epoch']})")
        return tc, ts.params, ts.model_state, history
    tc = TrainConfig(
        model=config.model,
        epochs=config.epochs,
        seed=config.seed,
        grad="manual",
        offline=config.offline,
        train_limit=config.train_limit,
    )
    result = train_and_evaluate(tc, None, dataset=ds, log=lambda s: log("  " + s), progress=False)
    return tc, result.params, result.state, result.history


def _ten_class(name: str):
    """The zoo preset ``name`` if it outputs ten digit logits (softmax cross-entropy); exits otherwise."""
    try:
        spec = get_model(name)
    except ValueError as error:
        raise SystemExit(f"{NAME}: {error}") from None
    if spec.loss is not gradients.softmax_cross_entropy:
        classifiers = ", ".join(n for n, m in MODELS.items() if m.loss is gradients.softmax_cross_entropy)
        raise SystemExit(
            f"{NAME}: {name} does not output ten digit classes (the confusion matrix needs them); "
            f"choose one of {classifiers}"
        )
    return spec


def _inputs(images_u8):
    return jnp.asarray(images_u8, jnp.float32)[..., None] / 255.0


def run(out_dir, *, smoke: bool = False, command: str | None = None, log=None, **overrides) -> dict:
    config = make_config(smoke, **overrides)
    log = log or common.logger(NAME)
    out = common.out_dir(out_dir)
    env = common.environment(command or f"what_it_learned.run(smoke={smoke}, {overrides})")
    ds = _load_data(config, log)
    log(f"data: {len(ds.train_labels):,} train / {len(ds.test_labels):,} test images: {ds.source}")
    if not config.workdir:
        _ten_class(config.model)
    tc, params, state, history = _trained(config, ds, log)
    spec = _ten_class(tc.model)
    model = spec.build(conv_method=tc.conv_method)
    if tc.normalize:
        raise SystemExit(f"{NAME}: runs trained with --normalize are not supported (the figures show raw-pixel inputs)")

    # Predictions on the test set, in batches (evaluation mode).
    forward = jax.jit(lambda x: jax.nn.softmax(model.forward(params, state, x, train=False)[0]))
    probs = np.concatenate(
        [np.asarray(forward(_inputs(ds.test_images[i : i + 1000]))) for i in range(0, len(ds.test_labels), 1000)]
    )
    pred, labels = probs.argmax(axis=1), ds.test_labels.astype(int)
    confusion = np.zeros((10, 10), np.int64)
    np.add.at(confusion, (labels, pred), 1)
    accuracy = float(np.trace(confusion) / confusion.sum())
    per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    off = [(int(confusion[t, p]), t, p) for t in range(10) for p in range(10) if t != p and confusion[t, p]]
    top_confusions = sorted(off, reverse=True)[:8]
    log(
        f"test accuracy {accuracy:.4f} on {len(labels):,} images; most confused: "
        + ", ".join(f"{t}→{p} ({n})" for n, t, p in top_confusions[:4])
    )
    wrong = np.flatnonzero(pred != labels)
    mistakes = wrong[np.argsort(-probs[wrong, pred[wrong]])][: config.n_mistakes]

    # First convolution: its filters, and its feature maps (after the ReLU/sigmoid that follows) for a few digits.
    # The first layer whose parameters hold a 4-D (HWIO) kernel: found by structure, not by name.
    first = next(i for i, p in enumerate(params) if isinstance(p, dict) and np.ndim(p.get("w")) == 4)
    kernel = np.asarray(params[first]["w"])  # (kh, kw, 1, O)
    digits = [int(np.flatnonzero(labels == d)[0]) for d in _spread_digits(labels, config.n_digits)]

    def activations(x):
        for i, (layer, p, s) in enumerate(zip(model.children, params, state, strict=True)):
            x, _, _ = layer.forward(p, s, x, train=False)
            if i == first + 1:  # the nonlinearity after the first convolution
                return x
        return x

    maps = np.asarray(jax.jit(activations)(_inputs(ds.test_images[digits])))  # (n, H, W, O)

    summary = {
        "experiment": NAME,
        "environment": env,
        "config": dataclasses.asdict(config),
        "train_config": tc.to_json(),
        "data": ds.source,
        "history": history,
        "test_images": len(labels),
        "test_accuracy": accuracy,
        "per_class_accuracy": {str(d): float(a) for d, a in enumerate(per_class)},
        "confusion_matrix": confusion,
        "top_confusions": [{"true": t, "predicted": p, "count": n} for n, t, p in top_confusions],
        "first_layer": {"index": first, "name": model.children[first].name, "kernel_shape": list(kernel.shape)},
        "feature_map_digits": {"test_index": digits, "label": [int(labels[i]) for i in digits]},
        "mistakes": [
            {
                "test_index": int(i),
                "true": int(labels[i]),
                "predicted": int(pred[i]),
                "probability": float(probs[i, pred[i]]),
            }
            for i in mistakes
        ],
    }
    common.write_json(out / f"{NAME}.json", summary)
    common.write_csv(
        out / f"{NAME}_confusion.csv",
        [{"true": t, **{f"pred_{p}": int(confusion[t, p]) for p in range(10)}} for t in range(10)],
    )
    (out / f"{NAME}.md").write_text(_markdown(summary, confusion, per_class))
    log(f"wrote {NAME}.md, {NAME}.json, {NAME}_confusion.csv")
    plt = common.pyplot(log)
    if plt is not None:
        _figures(plt, out, summary, kernel, ds.test_images, maps, confusion, probs, pred, labels, log)
    return summary


def _spread_digits(labels, n: int) -> list[int]:
    """``n`` different digit classes spread over 0-9 that occur in ``labels``."""
    present = sorted({int(v) for v in labels})
    picks = np.linspace(0, len(present) - 1, min(n, len(present))).round().astype(int)
    return [present[i] for i in picks]


def _markdown(s: dict, confusion, per_class) -> str:
    env, tc = s["environment"], s["train_config"]
    h = s["history"][-1] if s["history"] else None
    lines = [
        "# What the network learned\n",
        f"Command: `{env['command']}` ({env['date_utc']}, jax {env['jax']}).\n",
        f"`{tc['model']}` trained with the {'hand-written' if tc['grad'] == 'manual' else tc['grad']} gradients for "
        f"{tc['epochs']} epochs (`jaxcnn train` defaults otherwise: SGD momentum 0.9, cosine schedule from lr "
        f"{tc['lr']}, batch {tc['batch_size']}, seed {tc['seed']}, convolutions `{tc['conv_method']}`) on {s['data']}"
        + (f"; training on a class-balanced subset of {tc['train_limit']:,} images" if tc.get("train_limit") else "")
        + ".\n",
        f"**Test accuracy {s['test_accuracy']:.4f}** on {s['test_images']:,} test images"
        + (f" (training loss {h['train_loss']:.4f} in the last epoch)." if h else ".")
        + "\n",
        "## Per-class accuracy\n",
        common.markdown_table(
            ["digit", *map(str, range(10))],
            [["test images", *[int(v) for v in confusion.sum(axis=1)]], ["accuracy", *[f"{a:.3f}" for a in per_class]]],
            "l" + "r" * 10,
        ),
        "\n## Most frequent confusions\n",
        common.markdown_table(
            ["true digit", "predicted", "count"],
            [[c["true"], c["predicted"], c["count"]] for c in s["top_confusions"]],
            "rrr",
        ),
        "\n## Confusion matrix (rows: true digit, columns: predicted)\n",
        common.markdown_table(
            ["", *map(str, range(10))], [[str(t), *[int(v) for v in confusion[t]]] for t in range(10)], "l" + "r" * 10
        ),
        f"\nFigures: the first layer's filters (`{NAME}_filters.png`), their feature maps for "
        f"{len(s['feature_map_digits']['label'])} test digits (`{NAME}_feature_maps.png`), the confusion matrix "
        f"(`{NAME}_confusion.png`) and the most confident mistakes (`{NAME}_mistakes.png`).\n",
    ]
    return "\n".join(lines)


def _figures(plt, out: Path, s: dict, kernel, test_images, maps, confusion, probs, pred, labels, log) -> None:
    n_filters = kernel.shape[-1]
    cols = min(n_filters, 8)
    rows = -(-n_filters // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols, 1.65 * rows + 0.6), squeeze=False)
    vmax = np.abs(kernel).max()
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n_filters:
            im = ax.imshow(kernel[:, :, 0, k], cmap="RdBu_r", vmin=-vmax, vmax=vmax)
            ax.set_title(f"filter {k}", fontsize=9)
    fig.colorbar(im, ax=axes, fraction=0.025, pad=0.02, label="weight")
    fig.suptitle(
        f"{s['train_config']['model']}: the {n_filters} first-layer filters "
        f"({kernel.shape[0]}x{kernel.shape[1]}; red positive, blue negative)",
        fontsize=11,
    )
    common.save_figure(fig, out / f"{NAME}_filters.png", log)

    digits = s["feature_map_digits"]["test_index"]
    n_maps = min(maps.shape[-1], 8)
    fig, axes = plt.subplots(
        len(digits), n_maps + 1, figsize=(1.45 * (n_maps + 1), 1.55 * len(digits) + 0.5), squeeze=False
    )
    for r, idx in enumerate(digits):
        axes[r, 0].imshow(test_images[idx], cmap="gray_r")
        axes[r, 0].set_title(f"test #{idx}: digit {labels[idx]}", fontsize=8)
        for c in range(n_maps):
            axes[r, c + 1].imshow(maps[r, :, :, c], cmap="magma")
            if r == 0:
                axes[r, c + 1].set_title(f"map {c}", fontsize=9)
        for ax in axes[r]:
            ax.axis("off")
    first_name = s["first_layer"]["name"]
    fig.suptitle(
        f"Feature maps after {first_name} and its activation (each map on its own scale; bright = strong response)",
        fontsize=11,
    )
    fig.tight_layout()
    common.save_figure(fig, out / f"{NAME}_feature_maps.png", log)

    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    rate = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(rate, cmap="Blues", vmin=0, vmax=1)
    for (t, p), v in np.ndenumerate(confusion):
        if v:
            ax.text(
                p, t, str(v), ha="center", va="center", fontsize=7.5, color="white" if rate[t, p] > 0.6 else "black"
            )
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    ax.grid(False)
    ax.set(
        xlabel="predicted digit",
        ylabel="true digit",
        title=f"Confusion matrix, {s['test_images']:,} test images (accuracy {s['test_accuracy']:.4f})",
    )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true digit's images")
    fig.tight_layout()
    common.save_figure(fig, out / f"{NAME}_confusion.png", log)

    mistakes = s["mistakes"]
    if mistakes:
        cols = min(len(mistakes), 6)
        rows = -(-len(mistakes) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 1.95 * rows + 0.5), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, m in zip(axes.flat, mistakes, strict=False):  # the grid's last row may have spare axes
            ax.imshow(test_images[m["test_index"]], cmap="gray_r")
            ax.set_title(f"{m['true']} → {m['predicted']}  (p={m['probability']:.2f})", fontsize=9)
        fig.suptitle("The most confident mistakes on the test set (true → predicted, softmax probability)", fontsize=11)
        fig.tight_layout()
        common.save_figure(fig, out / f"{NAME}_mistakes.png", log)


def main(argv=None) -> int:
    parser = common.base_parser(NAME, __doc__.splitlines()[0])
    d = Config()
    parser.add_argument("--model", default=d.model, help="zoo model to train")
    parser.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {d.epochs})")
    parser.add_argument("--workdir", default=None, help="load this `jaxcnn train --out` run instead of training")
    parser.add_argument("--offline", action="store_true", help="never download dataset files")
    args = parser.parse_args(argv)
    overrides = {"seed": args.seed, "model": args.model, "workdir": args.workdir, "offline": args.offline}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    run(args.out, smoke=args.smoke, command=common.command_line(NAME, argv), **overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
