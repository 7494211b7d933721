"""Turning uint8 image arrays into network inputs, and the seeded per-epoch shuffle."""

from __future__ import annotations

import operator

import numpy as np


def preprocess(
    images: np.ndarray,
    *,
    normalize: bool = False,
    mean: float | None = None,
    std: float | None = None,
) -> np.ndarray:
    """Scales uint8 images ``(N, H, W)`` to float32 ``(N, H, W, 1)`` (NHWC, one channel) in [0, 1].

    With ``normalize=True`` the scaled pixels are standardised, ``(x - mean) / std``, with ``mean``
    and ``std`` on the [0, 1] scale. Leave them out to use these images' own statistics; for test
    data pass the training set's (see :func:`pixel_statistics`).

    Raises:
        ValueError: ``images`` is not a uint8 array of rank 3, ``mean`` / ``std`` are given without
            ``normalize=True``, or the standard deviation is not positive.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"preprocess: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    if not normalize and (mean is not None or std is not None):
        raise ValueError("preprocess: mean and std are only used with normalize=True")
    scaled = np.divide(images[..., np.newaxis], np.float32(255), dtype=np.float32)
    if not normalize:
        return scaled
    if mean is None or std is None:
        own_mean, own_std = pixel_statistics(images)
        mean = own_mean if mean is None else mean
        std = own_std if std is None else std
    if not std > 0:
        raise ValueError(f"preprocess: std must be positive, got {std}")
    scaled -= np.float32(mean)
    scaled /= np.float32(std)
    return scaled


def pixel_statistics(images: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of the pixels of uint8 ``images`` on the [0, 1] scale.

    Computed exactly from a histogram of the 256 pixel values, without a float copy of the images.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.size == 0:
        raise ValueError(f"pixel_statistics: expected a non-empty uint8 array, got {images.dtype} {images.shape}")
    counts = np.bincount(images.reshape(-1), minlength=256).astype(np.float64)
    values = np.arange(256, dtype=np.float64) / 255
    mean = counts @ values / images.size
    variance = counts @ np.square(values - mean) / images.size
    return float(mean), float(np.sqrt(variance))


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """A permutation of ``range(n)`` that depends only on ``(seed, epoch)``.

    Drawn with NumPy's PCG64 generator seeded by ``SeedSequence([seed, epoch])``, so it is the same
    on every platform and run, and different epochs give independent shuffles.

    Raises:
        ValueError: ``seed``, ``epoch`` or ``n`` is negative.
    """
    seed, epoch, n = (operator.index(value) for value in (seed, epoch, n))
    if seed < 0 or epoch < 0 or n < 0:
        raise ValueError(f"epoch_permutation: seed, epoch and n must be non-negative, got {seed}, {epoch}, {n}")
    return np.random.default_rng([seed, epoch]).permutation(n)
