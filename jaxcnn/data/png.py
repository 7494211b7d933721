"""A small PNG reader and writer (zlib only, no imaging library), for digit-sized images.

:func:`read_png` decodes non-interlaced 8-bit PNGs of every colour type: grayscale, grayscale with
alpha, RGB, RGBA and palette. It checks the signature, every chunk's CRC, the header and that the image
data decompresses to exactly the bytes the header implies, and raises
:class:`~jaxcnn.data.errors.DataError` naming the file otherwise; 16-bit, 1/2/4-bit and interlaced files
are refused with a line saying how to re-save them. Rows filtered with Average or Paeth are undone pixel
by pixel in Python, which is fine for the small images a CNN of this library takes (28x28 digits) and
slow for photographs. :func:`write_png` writes 8-bit grayscale, gray+alpha, RGB or RGBA, unfiltered.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import numpy.typing as npt

from .errors import DataError, file_error

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Colour type -> channels of the decoded image (palette images decode to RGB, or RGBA with a tRNS chunk).
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_MAX_PIXELS = 1 << 26  # 64 megapixels: far beyond any network input, small enough to allocate
_REMEDY = "Re-save it as an 8-bit, non-interlaced PNG."


def read_png(path: str | os.PathLike) -> np.ndarray:
    """Decodes the PNG file ``path`` into a uint8 array ``(H, W, C)``.

    ``C`` is 1 (grayscale), 2 (grayscale + alpha), 3 (RGB; also palette images) or 4 (RGBA; also palette
    images with transparency). Values are the stored 8-bit samples, unchanged.

    Raises:
        DataError: the file is missing or unreadable, not a PNG, corrupt (bad CRC, truncated, wrong
            amount of image data), or a kind this reader does not decode (16-bit, 1/2/4-bit, interlaced).
    """
    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file.") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read the file ({error.strerror or error}).") from None
    if not blob.startswith(SIGNATURE):
        raise file_error(path, "not a PNG file", expected="the PNG signature", found=repr(blob[:8]), remedy=_REMEDY)
    header, palette, transparency, data = _chunks(path, blob)
    width, height, depth, colour, compression, filtering, interlace = header
    if colour not in _CHANNELS or depth != 8 or compression or filtering or interlace:
        kind = f"colour type {colour}, bit depth {depth}" + (", interlaced" if interlace else "")
        raise file_error(path, "unsupported PNG", expected="8-bit samples, not interlaced", found=kind, remedy=_REMEDY)
    if not (0 < width and 0 < height and width * height <= _MAX_PIXELS):
        raise file_error(
            path,
            "unsupported PNG size",
            expected=f"at most {_MAX_PIXELS:,} pixels",
            found=f"{width}x{height}",
            remedy="Resize the image to what the network takes.",
        )
    samples = _CHANNELS[colour]
    row_bytes = width * samples
    expected = height * (1 + row_bytes)
    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(data, expected + 1)
    except zlib.error as error:
        raise file_error(
            path, "corrupt PNG image data", expected="a zlib stream", found=str(error), remedy=_REMEDY
        ) from None
    if len(raw) != expected:
        raise file_error(
            path,
            "wrong amount of PNG image data",
            expected=f"{expected} bytes for {width}x{height}",
            found=f"{len(raw)}{'+' if len(raw) > expected else ''} bytes",
            remedy=_REMEDY,
        )
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + row_bytes)
    image = _unfilter(path, rows[:, 0], rows[:, 1:], samples).reshape(height, width, samples)
    if colour == 3:
        return _apply_palette(path, image[..., 0], palette, transparency)
    return image


def write_png(path: str | os.PathLike, image: npt.ArrayLike) -> None:
    """Writes uint8 ``image`` ``(H, W)`` or ``(H, W, C)`` with ``C`` in 1-4 (gray, gray+alpha, RGB, RGBA)
    as an 8-bit PNG (rows unfiltered, zlib level 9)."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4) or 0 in a.shape:
        raise ValueError(f"write_png: expected uint8 (H, W) or (H, W, 1-4), got {a.dtype} {a.shape}")
    height, width, channels = a.shape
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = np.concatenate([np.zeros((height, 1), np.uint8), a.reshape(height, -1)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    Path(path).write_bytes(
        SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    )


def _chunks(path: Path, blob: bytes):
    """``(IHDR fields, PLTE bytes, tRNS bytes, concatenated IDAT data)``, every CRC checked."""
    offset, header, palette, transparency, data = len(SIGNATURE), None, None, None, []
    while True:
        if offset + 8 > len(blob):
            raise file_error(
                path,
                "truncated PNG",
                expected="an IEND chunk",
                found=f"the end of the file at byte {offset}",
                remedy=_REMEDY,
            )
        length, kind = struct.unpack(">I4s", blob[offset : offset + 8])
        body = blob[offset + 8 : offset + 8 + length]
        crc = blob[offset + 8 + length : offset + 12 + length]
        if len(body) != length or len(crc) != 4:
            raise file_error(
                path,
                "truncated PNG",
                expected=f"{length} bytes of chunk {kind!r} and its CRC",
                found=f"{len(body)}",
                remedy=_REMEDY,
            )
        if struct.unpack(">I", crc)[0] != zlib.crc32(kind + body):
            raise file_error(
                path,
                "corrupt PNG",
                expected=f"the CRC of chunk {kind!r} to match",
                found="a different CRC",
                remedy=_REMEDY,
            )
        if kind == b"IHDR":
            if length != 13:
                raise file_error(
                    path, "corrupt PNG", expected="a 13-byte IHDR", found=f"{length} bytes", remedy=_REMEDY
                )
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            palette = body
        elif kind == b"tRNS":
            transparency = body
        elif kind == b"IDAT":
            data.append(body)
        elif kind == b"IEND":
            break
        offset += 12 + length
    if header is None or not data:
        raise file_error(path, "corrupt PNG", expected="IHDR and IDAT chunks", found="none", remedy=_REMEDY)
    return header, palette, transparency, b"".join(data)


def _unfilter(path: Path, filters: np.ndarray, rows: np.ndarray, bpp: int) -> np.ndarray:
    """Undoes the per-row PNG filters (0 None, 1 Sub, 2 Up, 3 Average, 4 Paeth): ``(H, W*bpp)`` uint8."""
    out = np.zeros(rows.shape, np.uint8)
    prior = np.zeros(rows.shape[1], np.int32)
    for y, (kind, row) in enumerate(zip(filters.tolist(), rows, strict=True)):
        row = row.astype(np.int32)
        if kind == 0:
            recon = row
        elif kind == 1:  # Sub: a running sum, per channel, of the bytes to the left
            recon = np.cumsum(row.reshape(-1, bpp), axis=0).reshape(-1) & 0xFF
        elif kind == 2:  # Up
            recon = (row + prior) & 0xFF
        elif kind in (3, 4):  # Average, Paeth: each byte depends on the reconstructed byte to its left
            recon = np.zeros_like(row)
            for x in range(row.size):
                left = int(recon[x - bpp]) if x >= bpp else 0
                up = int(prior[x])
                if kind == 3:
                    predictor = (left + up) >> 1
                else:
                    up_left = int(prior[x - bpp]) if x >= bpp else 0
                    p = left + up - up_left
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                    predictor = left if pa <= pb and pa <= pc else up if pb <= pc else up_left
                recon[x] = (int(row[x]) + predictor) & 0xFF
        else:
            raise file_error(
                path, "corrupt PNG", expected="row filter types 0-4", found=f"{kind} in row {y}", remedy=_REMEDY
            )
        out[y] = recon
        prior = recon
    return out


def _apply_palette(path: Path, indices: np.ndarray, palette: bytes | None, transparency: bytes | None) -> np.ndarray:
    """Palette indices ``(H, W)`` -> RGB ``(H, W, 3)``, or RGBA when the file has a tRNS chunk."""
    if palette is None or len(palette) % 3 or not palette:
        raise file_error(
            path, "corrupt PNG", expected="a PLTE chunk for a palette image", found="none or a bad one", remedy=_REMEDY
        )
    colours = np.frombuffer(palette, np.uint8).reshape(-1, 3)
    if transparency is not None:
        alpha = np.full(len(colours), 255, np.uint8)
        alpha[: min(len(transparency), len(colours))] = np.frombuffer(transparency, np.uint8)[: len(colours)]
        colours = np.concatenate([colours, alpha[:, None]], axis=1)
    if int(indices.max()) >= len(colours):
        raise file_error(
            path,
            "corrupt PNG",
            expected=f"palette indices below {len(colours)}",
            found=f"index {int(indices.max())}",
            remedy=_REMEDY,
        )
    return colours[indices]
