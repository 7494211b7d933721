"""``jaxcnn evaluate`` and ``jaxcnn predict``: the parsers, the commands and their text reports.

``evaluate`` scores a run's checkpoint on a test set (by default the one it was trained with) and prints
the loss, the accuracy, the accuracy per class and the confusion matrix, optionally plotted to a PNG
(matplotlib, ``pip install 'jaxcnn[plots]'``). ``predict`` classifies the images in PNG, ``.npy`` and
IDX files (:func:`jaxcnn.data.read_image_file`) and prints a table or JSON.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from jaxcnn.data import ImageFile, read_image_file
from jaxcnn.inference import Checkpoint, Evaluation, evaluate, load_checkpoint, model_inputs, predict
from jaxcnn.train.config import ConfigError

PLOT = "evaluation.png"


def positive_int(value: str) -> int:
    """An ``argparse`` type: an integer >= 1."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Registers ``jaxcnn evaluate`` and ``jaxcnn predict`` on an ``argparse`` subparsers object."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--out", required=True, metavar="DIR", help="the --out directory of a training run (or its checkpoint.npz)"
    )
    common.add_argument(
        "--eval-batch-size",
        type=positive_int,
        default=None,
        metavar="N",
        help="images per forward pass (default: the run's --eval-batch-size)",
    )
    common.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser(
        "evaluate",
        parents=[common],
        help="test loss, accuracy, per-class accuracy and confusion matrix of a run",
        description="Load the checkpoint a jaxcnn train run wrote to --out and evaluate it on a test set: by "
        "default the run's own dataset, scaled as training scaled it. Prints the test loss, accuracy, "
        "per-class accuracy and the confusion matrix.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="test on this dataset's test split instead of the run's "
        "(mnist, fashion-mnist, mnist-offline or a directory of the four IDX files)",
    )
    p.add_argument("--data-dir", default=None, help="directory searched first for the dataset's files")
    p.add_argument("--offline", action="store_true", help="never download (also: JAXCNN_OFFLINE=1)")
    p.add_argument(
        "--plot",
        action="store_true",
        help=f"also draw the confusion matrix and per-class accuracy to DIR/{PLOT} (needs matplotlib)",
    )

    p = sub.add_parser(
        "predict",
        parents=[common],
        help="classify the images in PNG, .npy or IDX files with a trained run",
        description="Load the checkpoint a jaxcnn train run wrote to --out and print the predicted class and "
        "the class probabilities of every image in FILES: PNG images (8-bit, non-interlaced; "
        "colour is turned into gray for one-channel networks), .npy arrays and IDX files of shape "
        "(N, H, W), (N, H, W, C) or one image (H, W), uint8 (0-255) or float (as the training "
        "images were). Images must have the size of the training images.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="PNG, .npy or IDX files of images")


# ---------------------------------------------------------------------------------------------------
# evaluate


def run_evaluate(args) -> int:
    """``jaxcnn evaluate``: returns the exit status."""
    from jaxcnn import data as jdata

    ck = load_checkpoint(args.out)
    name = args.dataset or ck.config.get("dataset", "mnist")
    data_dir = args.data_dir if args.dataset or args.data_dir else ck.config.get("data_dir")
    offline = args.offline or bool(ck.config.get("offline"))
    say = (lambda line: None) if args.json else print
    dataset = jdata.load_dataset(name, data_dir=data_dir, download=not offline, log=say)
    result = evaluate(ck, dataset.test_images, ck.targets(dataset.test_labels), batch_size=args.eval_batch_size)
    plot = None
    if args.plot:
        plot = (ck.path.parent if ck.path is not None else Path(args.out)) / PLOT
        plot_evaluation(result, plot, title=f"{ck.model.name} on {name}: accuracy {result.accuracy:.4f}")
    if args.json:
        record = {
            "checkpoint": str(ck.path),
            "model": ck.model.name,
            "epoch": ck.epoch,
            "dataset": str(name),
            "source": dataset.source,
            **evaluation_json(result),
        }
        if plot is not None:
            record["plot"] = str(plot)
        print(json.dumps(record, indent=1))
        return 0
    print(
        f"{ck.model.name} from {ck.path} (epoch {ck.epoch}{f', step {ck.step}' if ck.step else ''}) on "
        f"{dataset.source}: {result.examples:,} test images"
    )
    print(format_evaluation(result))
    if plot is not None:
        print(f"plot written to {plot}")
    return 0


def evaluation_json(result: Evaluation) -> dict:
    """An :class:`Evaluation` as JSON values (NaN per-class accuracies as ``null``)."""
    return {
        "examples": result.examples,
        "loss": _finite(result.loss),
        "accuracy": result.accuracy,
        "per_class_accuracy": [_finite(a) for a in result.per_class_accuracy.tolist()],
        "confusion": result.confusion.tolist(),
    }


def _finite(x: float):
    return x if math.isfinite(x) else None


def format_evaluation(result: Evaluation) -> str:
    """The text report: loss and accuracy, a per-class table, the confusion matrix (rows: true class)."""
    confusion = result.confusion
    k = len(confusion)
    totals = confusion.sum(axis=1)
    lines = [f"test loss {result.loss:.4f}  accuracy {result.accuracy:.4f}", "", "class  examples  correct  accuracy"]
    for c in range(k):
        acc = result.per_class_accuracy[c]
        shown = "       -" if math.isnan(acc) else f"{acc:>8.4f}"
        lines.append(f"{c:>5}  {totals[c]:>8,}  {confusion[c, c]:>7,}  {shown}")
    width = max(5, len(f"{confusion.max():,}") + 1)
    lines += [
        "",
        "confusion matrix (rows: true class, columns: predicted class)",
        "true" + "".join(f"{c:>{width}}" for c in range(k)),
    ]
    lines += [f"{c:>4}" + "".join(f"{n:>{width},}" for n in confusion[c]) for c in range(k)]
    return "\n".join(lines)


def plot_evaluation(result: Evaluation, path: Path, *, title: str) -> None:
    """Draws the confusion matrix (counts in the cells) beside the per-class accuracy bars into ``path`` (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib; install it with pip install 'jaxcnn[plots]'") from None
    confusion, k = result.confusion, len(result.confusion)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5), gridspec_kw={"width_ratios": [1.2, 1]})
    left.imshow(confusion, cmap="Blues")
    for (i, j), n in np.ndenumerate(confusion):
        left.text(
            j, i, f"{n}", ha="center", va="center", fontsize=7, color="white" if n > confusion.max() / 2 else "black"
        )
    left.set(xticks=range(k), yticks=range(k), xlabel="predicted class", ylabel="true class", title="confusion matrix")
    right.bar(range(k), np.nan_to_num(result.per_class_accuracy), color="tab:blue")
    right.axhline(result.accuracy, color="tab:red", linestyle="--")
    right.set(
        xticks=range(k),
        ylim=(0, 1),
        xlabel="true class",
        ylabel="accuracy",
        title=f"per-class accuracy (dashed: overall {result.accuracy:.4f})",
    )
    fig.suptitle(title)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# predict


def file_images(image_file: ImageFile, input_shape: tuple, *, uint8_training: bool = True) -> np.ndarray:
    """The images of one file as the NHWC batch a network of ``input_shape`` ``(1, H, W, C)`` takes.

    A PNG is one image: its alpha channel is dropped, and RGB becomes gray (ITU-R BT.601 luma, rounded)
    for a one-channel network, gray becomes RGB for a three-channel one. An array of shape ``(H, W)`` or
    ``(H, W, C)`` equal to the training images' is one image; otherwise it is ``(N, H, W)`` or ``(N, H, W, C)``.
    Integer arrays other than uint8 (``numpy.save`` of a default int64 array, an IDX int32 file) with values
    in 0-255 are read as uint8 pixels when the network was trained on uint8 images (``uint8_training``).
    """
    _, h, w, c = input_shape
    a = image_file.array
    if uint8_training and a.dtype.kind in "iu" and a.dtype != np.uint8 and a.size and 0 <= a.min() and a.max() <= 255:
        a = a.astype(np.uint8)
    if image_file.kind == "png":
        if a.shape[2] in (2, 4):
            a = a[..., :-1]
        if a.shape[2] == 3 and c == 1:
            luma = a.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
            a = np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]
        elif a.shape[2] == 1 and c == 3:
            a = np.repeat(a, 3, axis=2)
        a = a[None]
    elif a.shape == (h, w) or (a.shape == (h, w, c) and a.shape[1:] != (h, w)):
        a = a[None]
    return model_inputs(a, input_shape, what=str(image_file.path))


def run_predict(args) -> int:
    """``jaxcnn predict``: returns the exit status."""
    ck = load_checkpoint(args.out)
    uint8_training = ck.scaling.scale != 1.0  # the training images were uint8, scaled by 1/255
    batches = [
        (str(f), file_images(read_image_file(f), ck.input_shape, uint8_training=uint8_training)) for f in args.files
    ]  # every file read and checked before the first prediction
    rows = []
    for name, images in batches:
        result = predict(ck, images, batch_size=args.eval_batch_size)
        pairs = zip(result.classes, result.probabilities, strict=True)
        rows += [(name, i, int(c), p) for i, (c, p) in enumerate(pairs)]
    if args.json:
        print(
            json.dumps(
                [
                    {"file": name, "index": i, "class": c, "probabilities": [round(float(x), 6) for x in p]}
                    for name, i, c, p in rows
                ],
                indent=1,
            )
        )
        return 0
    print(format_predictions(rows, ck))
    return 0


def format_predictions(rows: list, ck: Checkpoint) -> str:
    """One line per image: file, index in the file, predicted class, its probability, then every class's."""
    k = len(rows[0][3])
    name_width = max(4, *(len(r[0]) for r in rows))
    columns = "  ".join(f"{'p(' + str(c) + ')':>6}" for c in range(k))
    header = f"{'file':<{name_width}}  index  class  p(class)  {columns}"
    lines = [f"{ck.model.name} from {ck.path} (epoch {ck.epoch})", header]
    for name, i, c, p in rows:
        lines.append(f"{name:<{name_width}}  {i:>5}  {c:>5}  {p[c]:>8.4f}  " + "  ".join(f"{x:>6.4f}" for x in p))
    return "\n".join(lines)
