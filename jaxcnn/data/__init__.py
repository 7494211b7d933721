"""Datasets for jaxcnn: IDX files, MNIST and Fashion-MNIST with verified downloads, a bundled offline subset.

* :func:`read_idx` / :func:`write_idx`: the IDX format, plain or gzip-compressed.
* :func:`load_dataset`: ``"mnist"``, ``"fashion-mnist"``, ``"mnist-offline"`` (:data:`OFFLINE_NAME`,
  5,000 real MNIST training images shipped in the package) or a directory of IDX files, as uint8
  arrays in a :class:`Dataset`. Files are looked up locally, downloaded from public mirrors when
  missing, and verified against published checksums.
* :func:`preprocess` and :func:`epoch_permutation`: network inputs and the seeded shuffle.
* :func:`seed_task`: the tutorial's 200-image binary task (digit > 4).
* :func:`read_image_file`: a PNG, ``.npy`` or IDX file of images (``jaxcnn predict``); :func:`read_png`
  and :func:`write_png`, a small zlib-only PNG codec.

Every problem a user can fix raises :class:`DataError`, whose message says which file, what was
expected, what was found and what to do. See ``docs/data.md``.
"""

from .datasets import Dataset, check_split, load_dataset, load_directory, seed_task
from .errors import DataError
from .idx import read_idx, write_idx
from .imagefiles import ImageFile, read_image_file
from .offline import OFFLINE_NAME
from .png import read_png, write_png
from .preprocessing import epoch_permutation, pixel_statistics, preprocess

__all__ = [
    "OFFLINE_NAME",
    "DataError",
    "Dataset",
    "ImageFile",
    "check_split",
    "epoch_permutation",
    "load_dataset",
    "load_directory",
    "pixel_statistics",
    "preprocess",
    "read_idx",
    "read_image_file",
    "read_png",
    "seed_task",
    "write_idx",
    "write_png",
]
