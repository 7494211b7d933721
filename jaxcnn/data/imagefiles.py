"""Reading the image files ``jaxcnn predict`` takes: PNG, NumPy ``.npy`` and IDX, told apart by content.

The kind is recognised by the first bytes (the PNG signature, NumPy's ``\\x93NUMPY`` magic, otherwise IDX,
plain or gzip-compressed), not by the file name, so a misnamed file still reads or fails with the
reason. Every problem raises :class:`~jaxcnn.data.errors.DataError` naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import DataError, file_error
from .idx import read_idx
from .png import SIGNATURE as PNG_SIGNATURE
from .png import read_png

NPY_MAGIC = b"\x93NUMPY"


class ImageFile(NamedTuple):
    """One file's contents: ``kind`` is ``"png"`` (``array`` uint8 ``(H, W, C)``, see
    :func:`~jaxcnn.data.png.read_png`), ``"npy"`` or ``"idx"`` (``array`` as stored: typically
    ``(N, H, W)``, ``(N, H, W, C)`` or one image ``(H, W)``)."""

    path: Path
    kind: str
    array: np.ndarray


def read_image_file(path: str | os.PathLike) -> ImageFile:
    """Reads a PNG, ``.npy`` or IDX file (see the module docstring).

    Raises:
        DataError: a missing, unreadable or corrupt file, a ``.npy`` holding Python objects, or an
            array that is not real numbers.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file.") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not an image file.") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read the file ({error.strerror or error}).") from None
    if head.startswith(PNG_SIGNATURE):
        return ImageFile(path, "png", read_png(path))
    if head.startswith(NPY_MAGIC):
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise file_error(
                path,
                "unreadable .npy file",
                expected="a NumPy array of numbers",
                found=str(error),
                remedy="Save the images with numpy.save as a uint8 or float array.",
            ) from None
        if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
            raise file_error(
                path,
                "unsupported .npy array",
                expected="uint8 or floating-point images",
                found=f"dtype {array.dtype}",
                remedy="Save the images as uint8 or float32.",
            )
        return ImageFile(path, "npy", array)
    if head[:2] not in (b"\x00\x00", b"\x1f\x8b"):  # neither an IDX magic number nor gzip
        raise file_error(
            path,
            "unrecognised image file",
            expected="a PNG, a .npy array or an IDX file",
            found=f"the bytes {head!r}",
            remedy="Convert it to PNG or save the array with numpy.save.",
        )
    return ImageFile(path, "idx", read_idx(path))
