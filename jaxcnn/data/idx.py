"""Reading and writing the IDX format of MNIST and its relatives, plain or gzip-compressed.

An IDX file is a 4-byte magic number, ``rank`` big-endian uint32 dimensions, then the elements in
C order, big-endian. The magic number is two zero bytes, an element-type code and the rank::

    0x08 uint8   0x09 int8   0x0B int16   0x0C int32   0x0D float32   0x0E float64

:func:`read_idx` checks the magic number, the type code, the rank and that the dimensions account
for exactly the bytes in the file (after decompression for ``.gz``), and raises
:class:`~jaxcnn.data.errors.DataError` naming the file, what was expected and what was found.
Compression is recognised by the gzip signature, not by the file name.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import DataError, file_error

IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
"""Element-type code -> on-disk (big-endian) dtype."""

_GZIP_SIGNATURE = b"\x1f\x8b"
# Deflate expands data by at most about 1032:1, so a gzip file of n bytes holds at most this many
# times n bytes; a header that declares more is reported as truncated without allocating for it.
_MAX_DEFLATE_RATIO = 1032
_CHUNK_BYTES = 1 << 20
_REMEDY = "Delete the file and download it again, or replace it with an intact copy."
_TYPE_LIST = ", ".join(f"0x{code:02X} ({dtype.newbyteorder('=').name})" for code, dtype in IDX_TYPES.items())


class IdxFile(NamedTuple):
    """The contents of an IDX file with the digests used to verify it against a published table."""

    array: np.ndarray
    gzip_md5: str | None
    """MD5 of the file's bytes when it is gzip-compressed, else ``None``."""
    data_sha256: str | None
    """SHA-256 of the IDX bytes (after decompression); ``None`` when not asked for."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (plain or gzip-compressed) into a native-byte-order NumPy array.

    The elements are read straight into the buffer of the returned array (multi-byte types are
    byte-swapped in place), so the only other copy held in memory is the compressed file, if any.

    Raises:
        DataError: the file is missing or unreadable, is not IDX, is a corrupt gzip stream, or its
            length does not match the dimensions in its header.
    """
    return _read(Path(path), with_digests=False, label=None).array


def read_idx_file(path: str | os.PathLike, *, label: str | None = None) -> IdxFile:
    """Like :func:`read_idx`, and also returns the digests of the file for checksum verification.

    ``label`` replaces the path in error messages (e.g. the URL a temporary file came from).
    """
    return _read(Path(path), with_digests=True, label=label)


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool | None = None) -> None:
    """Writes ``array`` as an IDX file; gzip-compressed when ``compress`` is true.

    ``compress`` defaults to whether the file name ends in ``.gz``. The array's dtype must be one of
    uint8, int8, int16, int32, float32 or float64 (any byte order); it needs at least one dimension
    and each dimension must fit in 32 bits.
    """
    path = Path(path)
    array = np.asarray(array)
    code = _type_code(array.dtype)
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"write_idx: the IDX format needs 1 to 255 dimensions, got shape {array.shape}")
    if max(array.shape) >= 2**32:
        raise ValueError(f"write_idx: every dimension must be below 2**32, got shape {array.shape}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = np.ascontiguousarray(array, dtype=IDX_TYPES[code]).reshape(-1).view(np.uint8).data
    if compress is None:
        compress = path.name.endswith(".gz")
    with gzip.GzipFile(path, "wb", mtime=0) if compress else open(path, "wb") as stream:
        stream.write(header)
        stream.write(data)


def _type_code(dtype: np.dtype) -> int:
    for code, idx_dtype in IDX_TYPES.items():
        if dtype.kind == idx_dtype.kind and dtype.itemsize == idx_dtype.itemsize:
            return code
    raise ValueError(f"write_idx: dtype {dtype} has no IDX element type; supported: {_TYPE_LIST}")


def _read(path: Path, *, with_digests: bool, label: str | None) -> IdxFile:
    name = label or str(path)
    try:
        with open(path, "rb") as file:
            is_gzip = file.read(2) == _GZIP_SIGNATURE
            file.seek(0)
            if not is_gzip:
                size = os.fstat(file.fileno()).st_size
                header, data = _read_elements(file, name, capacity=size, exact_size=size)
                return _finish(header, data, None, with_digests)
            compressed = file.read()
    except FileNotFoundError:
        raise DataError(f"{name}: no such file.") from None
    except OSError as error:
        raise DataError(f"{name}: cannot read the file ({error.strerror or error}).") from None
    gzip_md5 = hashlib.md5(compressed).hexdigest() if with_digests else None
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(compressed)) as stream:
            header, data = _read_elements(stream, name, capacity=_MAX_DEFLATE_RATIO * len(compressed), exact_size=None)
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise file_error(
            name, "corrupt gzip data", expected="a complete gzip stream", found=f"{error}", remedy=_REMEDY
        ) from None
    return _finish(header, data, gzip_md5, with_digests)


def _read_elements(
    stream: io.BufferedIOBase, name: str, *, capacity: int, exact_size: int | None
) -> tuple[bytes, np.ndarray]:
    """Reads the header and the elements; returns the header bytes and the elements as an array.

    ``capacity`` bounds the number of bytes the stream can hold, ``exact_size`` is the number it
    does hold when known (plain files). Sizes are checked before any allocation for the elements.
    """
    magic = _read_exactly(stream, 4, name, offset=0, what="the magic number")
    code, rank = magic[2], magic[3]
    if magic[:2] != b"\0\0":
        found = f"0x{magic.hex().upper()}"
        if magic.lstrip().startswith(b"<"):
            found += ", the start of an HTML or XML page (a web server's error page saved in place of the file?)"
        raise file_error(
            name,
            "not an IDX file",
            expected="a magic number 0x0000TTRR (two zero bytes, element-type code TT, rank RR)",
            found=found,
            remedy=_REMEDY,
        )
    if code not in IDX_TYPES:
        raise file_error(name, "unknown IDX element type", expected=_TYPE_LIST, found=f"0x{code:02X}", remedy=_REMEDY)
    if rank == 0:
        raise file_error(name, "invalid IDX rank", expected="at least one dimension", found="rank 0", remedy=_REMEDY)
    dims_bytes = _read_exactly(stream, 4 * rank, name, offset=4, what=f"the magic number and {rank} dimensions")
    header = magic + dims_bytes
    shape = struct.unpack(f">{rank}I", dims_bytes)
    dtype = IDX_TYPES[code]
    payload_size = math.prod(shape) * dtype.itemsize
    declared = len(header) + payload_size
    unit = "bytes" if exact_size is not None else "bytes after decompression"

    def length_error(found: str) -> DataError:
        layout = f"{len(header)} header + {dtype.newbyteorder('=').name} data of shape {shape}"
        expected = f"{declared:,} bytes ({layout})"
        return file_error(
            name, "file length does not match the IDX header", expected=expected, found=found, remedy=_REMEDY
        )

    if exact_size is not None and exact_size != declared:
        raise length_error(f"{exact_size:,} {unit} ({'truncated' if exact_size < declared else 'trailing bytes'})")
    if declared > capacity:
        raise length_error(f"a file that can hold at most {capacity:,} {unit} (truncated)")

    data = np.empty(payload_size, dtype=np.uint8)
    view = data.data
    filled = 0
    while filled < payload_size:
        count = stream.readinto(view[filled:])
        if not count:
            raise length_error(f"{len(header) + filled:,} {unit} (truncated)")
        filled += count
    extra = 0
    while chunk := stream.read(_CHUNK_BYTES):
        extra += len(chunk)
    if extra:
        raise length_error(f"{declared + extra:,} {unit} (trailing bytes)")
    try:
        return header, data.view(dtype).reshape(shape)
    except ValueError:  # e.g. a zero dimension beside dimensions whose product overflows NumPy's limit
        raise file_error(
            name,
            "invalid IDX dimensions",
            expected="dimensions NumPy can represent",
            found=f"shape {shape}",
            remedy=_REMEDY,
        ) from None


def _read_exactly(stream: io.BufferedIOBase, count: int, name: str, *, offset: int, what: str) -> bytes:
    """Reads ``count`` header bytes that start at ``offset``; ``what`` describes the header up to there."""
    data = stream.read(count)
    if len(data) != count:
        raise file_error(
            name,
            "truncated IDX header",
            expected=f"{offset + count} bytes ({what})",
            found=f"{offset + len(data)} bytes",
            remedy=_REMEDY,
        )
    return data


def _finish(header: bytes, array: np.ndarray, gzip_md5: str | None, with_digests: bool) -> IdxFile:
    """Computes the digest of the raw bytes, then makes the array native-byte-order in place."""
    data_sha256 = None
    if with_digests:
        digest = hashlib.sha256(header)
        digest.update(array.reshape(-1).view(np.uint8).data)
        data_sha256 = digest.hexdigest()
    if not array.dtype.isnative:
        array = array.byteswap(inplace=True).view(array.dtype.newbyteorder("="))
    return IdxFile(array, gzip_md5, data_sha256)
