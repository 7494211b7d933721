"""What the named datasets consist of: their files, published checksums, mirrors and sizes.

Every named dataset is the four standard IDX files. A file is accepted when either its gzip bytes
match the published MD5, or the SHA-256 of its decompressed bytes matches the table below; the
second check accepts faithful copies that were re-compressed (Debian's ``dataset-fashion-mnist``)
or stored uncompressed. No SHA-256 of the decompressed MNIST training images is published, so only
the original ``train-images-idx3-ubyte.gz`` verifies for that one file.
"""

from __future__ import annotations

from typing import NamedTuple

ROLES = ("train_images", "train_labels", "test_images", "test_labels")
"""The four files of an MNIST-format dataset, in the order they are looked up and reported."""

STANDARD_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
"""Uncompressed file name of each role; the distributed files add ``.gz``."""

IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10


def candidate_names(role: str) -> tuple[str, ...]:
    """File names accepted for ``role`` in a directory, in order of preference.

    The gzip file, the uncompressed file, and the dotted spelling some redistributions use
    (``train-images.idx3-ubyte``).
    """
    stem = STANDARD_STEMS[role]
    dotted = stem.replace("-idx", ".idx")
    return (f"{stem}.gz", stem, dotted)


class FileSpec(NamedTuple):
    """One published file and the checksums that identify its contents."""

    role: str
    filename: str
    gzip_md5: str
    data_sha256: str | None


class DatasetSpec(NamedTuple):
    """A named dataset: display title, files, public mirrors (base URLs) and split sizes."""

    name: str
    title: str
    files: dict[str, FileSpec]
    mirrors: tuple[str, ...]
    train_count: int
    test_count: int


def _files(checksums: dict[str, tuple[str, str | None]]) -> dict[str, FileSpec]:
    return {
        role: FileSpec(role, f"{STANDARD_STEMS[role]}.gz", gzip_md5, data_sha256)
        for role, (gzip_md5, data_sha256) in checksums.items()
    }


MNIST = DatasetSpec(
    name="mnist",
    title="MNIST",
    files=_files(
        {
            "train_images": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", None),
            "train_labels": (
                "d53e105ee54ea40749a09fcbcd1e9432",
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            ),
            "test_images": (
                "9fb629c4189551a2d022fa330f9573f3",
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            ),
            "test_labels": (
                "ec29112dd5afa0611ce80d1b7f02629c",
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
            ),
        }
    ),
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    train_count=60_000,
    test_count=10_000,
)

FASHION_MNIST = DatasetSpec(
    name="fashion-mnist",
    title="Fashion-MNIST",
    files=_files(
        {
            "train_images": (
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            ),
            "train_labels": (
                "25c81989df183df01b3e8a0aad5dffbe",
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            ),
            "test_images": (
                "bef4ecab320f06d8554ea6380940ec79",
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            ),
            "test_labels": (
                "bb300cfdad3c16e7a12a480ee83cd310",
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            ),
        }
    ),
    mirrors=(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
    ),
    train_count=60_000,
    test_count=10_000,
)

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (MNIST, FASHION_MNIST)}
"""The named datasets that can be located, downloaded and verified."""


def identify(gzip_md5: str | None, data_sha256: str | None) -> tuple[DatasetSpec, FileSpec] | None:
    """The published file whose checksum matches, if any (to say what a misplaced file really is)."""
    for spec in DATASETS.values():
        for file_spec in spec.files.values():
            if (gzip_md5 is not None and gzip_md5 == file_spec.gzip_md5) or (
                data_sha256 is not None and data_sha256 == file_spec.data_sha256
            ):
                return spec, file_spec
    return None
