"""From the user's arrays to what a step consumes: image layout and scaling, augmentation, subsets."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jaxcnn.train.config import ConfigError


class Scaling(NamedTuple):
    """How stored images become network inputs: ``x = (images * scale - mean) / std`` (float32).

    ``scale`` is ``1/255`` for uint8 images and 1 for float ones; ``mean``/``std`` standardise the pixels
    (``normalize``) or are 0 and 1.
    """

    scale: float = 1.0
    mean: float = 0.0
    std: float = 1.0

    def __call__(self, images):
        return (images.astype(jnp.float32) * self.scale - self.mean) / self.std


def as_images(images, *, what: str) -> np.ndarray:
    """``images`` as an NHWC NumPy array (a channel axis is added to ``(N, H, W)``); uint8 stays uint8,
    any other real dtype becomes float32. :class:`ConfigError` for anything else."""
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4:
        raise ConfigError(f"{what} images must be NHWC (N, H, W, C) or (N, H, W), got shape {a.shape}")
    if a.dtype == np.uint8:
        return a
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ConfigError(f"{what} images must be uint8 or floating point, got dtype {a.dtype}")
    return a.astype(np.float32)


def scaling_for(images: np.ndarray, normalize: bool) -> Scaling:
    """The :class:`Scaling` of a training set: uint8 to [0, 1]; with ``normalize`` also its mean and std."""
    scale = 1.0 / 255.0 if images.dtype == np.uint8 else 1.0
    if not normalize:
        return Scaling(scale)
    pixels = images.astype(np.float64) * scale
    std = float(pixels.std())
    return Scaling(scale, float(pixels.mean()), std if std > 0 else 1.0)


def background(x):
    """Per image and channel, the mean of the outermost ring of pixels: ``(B, H, W, C) -> (B, 1, 1, C)``.

    For digits on a plain background (MNIST) this is exactly the background value, also after
    normalisation; for natural images it is the colour at the border, which a shift extends.
    """
    h, w = x.shape[1:3]
    ring = jnp.concatenate([x[:, 0], x[:, h - 1], x[:, 1 : h - 1, 0], x[:, 1 : h - 1, w - 1]], axis=1)  # (B, ring, C)
    return jnp.mean(ring, axis=1)[:, None, None, :]


def random_shift(key: jax.Array, x: jax.Array, max_shift: int) -> jax.Array:
    """Translates each image of ``x (B, H, W, C)`` by its own random offset in ``[-max_shift, max_shift]``
    pixels along each axis; the uncovered border takes the image's :func:`background` value."""
    if max_shift == 0:
        return x
    b, h, w, c = x.shape
    fill = background(x)
    padded = jnp.pad(x - fill, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    offsets = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    return jax.vmap(crop)(padded, offsets) + fill


def rotate_and_zoom(
    x: jax.Array, angle: jax.Array, zoom: jax.Array, displacement: jax.Array | None = None
) -> jax.Array:
    """Rotates each image of ``x (B, H, W, C)`` counter-clockwise by ``angle (B,)`` radians about its centre and
    magnifies it by ``zoom (B,)``, sampling bilinearly; pixels that come from outside the image take its
    :func:`background` value. Output pixel ``p`` reads the input at ``centre + R(-angle) (p - centre) / zoom``,
    plus ``displacement[b, p] (B, H, W, 2)`` (rows, columns) when given (:func:`elastic_displacement`).
    """
    _, h, w, _ = x.shape
    fill = background(x)
    rows, cols = jnp.meshgrid(jnp.arange(h) - (h - 1) / 2, jnp.arange(w) - (w - 1) / 2, indexing="ij")

    def warp(image, angle, zoom, moved=None):  # (H, W, C); rows grow downwards, so +angle turns it counter-clockwise
        cos, sin = jnp.cos(angle) / zoom, jnp.sin(angle) / zoom
        source = [cos * rows + sin * cols + (h - 1) / 2, -sin * rows + cos * cols + (w - 1) / 2]
        if moved is not None:
            source = [source[0] + moved[..., 0], source[1] + moved[..., 1]]
        sample = lambda channel: jax.scipy.ndimage.map_coordinates(channel, source, order=1, cval=0.0)  # noqa: E731
        return jax.vmap(sample, in_axes=2, out_axes=2)(image)

    moved = () if displacement is None else (displacement,)
    return jax.vmap(warp)(x - fill, angle, zoom, *moved) + fill


ELASTIC_SIGMA = 4.0  # the smoothing of elastic distortions, in pixels (Simard et al. 2003 found 4 best on MNIST)


def elastic_displacement(
    key: jax.Array, shape: tuple[int, int, int], alpha: float, dtype: DTypeLike = jnp.float32
) -> jax.Array:
    """Random smooth displacement fields ``(B, H, W, 2)`` for ``shape = (B, H, W)``: uniform noise in [-1, 1]
    per pixel and axis, smoothed by a normalised Gaussian of standard deviation :data:`ELASTIC_SIGMA` pixels
    (zero outside the image) and multiplied by ``alpha`` (elastic distortions, Simard et al. 2003)."""
    b, h, w = shape
    noise = jax.random.uniform(key, (b, h, w, 2), dtype, minval=-1.0, maxval=1.0)
    blur_h, blur_w = jnp.asarray(gaussian_blur_matrix(h), dtype), jnp.asarray(gaussian_blur_matrix(w), dtype)
    return alpha * jnp.einsum("ij,bjkc,lk->bilc", blur_h, noise, blur_w)


def gaussian_blur_matrix(n: int, sigma: float = ELASTIC_SIGMA) -> np.ndarray:
    """``(n, n)``: the taps of a Gaussian of standard deviation ``sigma`` at every distance ``i - j`` up to
    ``3 sigma``, normalised to sum 1 over the whole kernel; ``G @ v`` smooths ``v`` with zeros outside it."""
    taps = lambda d: np.exp(-0.5 * (d / sigma) ** 2)  # noqa: E731
    radius = int(3 * sigma)
    d = np.subtract.outer(np.arange(n), np.arange(n))
    return np.where(np.abs(d) <= radius, taps(d), 0.0) / np.sum(taps(np.arange(-radius, radius + 1)))


def random_affine(
    key: jax.Array, x: jax.Array, max_degrees: float, max_scale: float, elastic: float = 0.0
) -> jax.Array:
    """:func:`rotate_and_zoom` of each image of ``x (B, H, W, C)`` by its own angle, drawn uniformly from
    ``[-max_degrees, max_degrees]`` degrees, and zoom, drawn from ``[1 - max_scale, 1 + max_scale]``, plus an
    :func:`elastic_displacement` of strength ``elastic`` (0: none)."""
    if not max_degrees and not max_scale and not elastic:
        return x
    k_angle, k_zoom = jax.random.split(key)
    b, h, w, _ = x.shape
    angle = jnp.deg2rad(jax.random.uniform(k_angle, (b,), minval=-max_degrees, maxval=max_degrees))
    zoom = jax.random.uniform(k_zoom, (b,), minval=1.0 - max_scale, maxval=1.0 + max_scale)
    moved = elastic_displacement(jax.random.fold_in(key, 3), (b, h, w), elastic, x.dtype) if elastic else None
    return rotate_and_zoom(x, angle, zoom, moved)


def random_flip(key: jax.Array, x: jax.Array) -> jax.Array:
    """Mirrors each image of ``x (B, H, W, C)`` left to right with probability 1/2."""
    flip = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1, 1))
    return jnp.where(flip, x[:, :, ::-1], x)


class Augmentation(NamedTuple):
    """The random transformations of each training image, in this order: a mirror image (``flip``), a rotation
    by up to ``rotate`` degrees and a zoom by up to ``scale`` (:func:`random_affine`), a shift by up to
    ``shift`` pixels (:func:`random_shift`). All off by default; ``augmentation(key, x)`` applies them."""

    shift: int = 0
    rotate: float = 0.0
    scale: float = 0.0
    flip: bool = False
    elastic: float = 0.0

    def __call__(self, key: jax.Array, x: jax.Array) -> jax.Array:
        if self.flip or self.rotate or self.scale or self.elastic:  # the shift alone keeps the key it always had
            k_flip, k_affine, key = jax.random.split(key, 3)
            if self.flip:
                x = random_flip(k_flip, x)
            x = random_affine(k_affine, x, self.rotate, self.scale, self.elastic)
        return random_shift(key, x, self.shift)


def as_augmentation(augment: Augmentation | int) -> Augmentation:
    """``augment`` as an :class:`Augmentation` (an int is a shift alone)."""
    return augment if isinstance(augment, Augmentation) else Augmentation(shift=int(augment))


def classes_of(targets) -> np.ndarray:
    """The class of each example, for class-balanced subsets: integer labels as they are, one column of
    {0, 1} targets rounded, several columns (one-hot or scores) by their argmax."""
    t = np.asarray(targets)
    if t.ndim == 1:
        return t.astype(np.int64) if np.issubdtype(t.dtype, np.integer) else np.rint(t).astype(np.int64)
    t = t.reshape(t.shape[0], -1)
    if t.shape[1] == 1:
        return (t[:, 0] > 0.5).astype(np.int64)
    return np.argmax(t, axis=1)


def balanced_subset(classes: npt.ArrayLike, n: int, seed: int) -> tuple[np.ndarray, dict[int, int]]:
    """Indices of ``n`` examples drawn evenly across classes (seeded), in their original order, and how
    many of each class were taken.

    Every class gets ``n // k`` examples (``k`` classes) and the first ``n % k`` classes one more; a class
    with fewer examples than its share gives all it has and the rest is spread over the others. With
    ``n >= len(classes)`` every index is returned. The draw depends only on ``(seed, classes, n)``.
    """
    classes = np.asarray(classes)
    total = len(classes)
    if n >= total:
        values, counts = np.unique(classes, return_counts=True)
        return np.arange(total), dict(zip(values.tolist(), counts.tolist(), strict=True))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EB5E7]))
    values = np.unique(classes)
    members = {v: rng.permutation(np.flatnonzero(classes == v)) for v in values.tolist()}
    quota = dict.fromkeys(members, 0)
    left = n
    while left:
        # The classes with the fewest examples so far first, so that the remainder's extra examples keep the
        # counts of the classes that have enough within 1 of each other.
        open_classes = sorted((v for v in members if quota[v] < len(members[v])), key=lambda v: quota[v])
        share, extra = divmod(left, len(open_classes))
        for i, v in enumerate(open_classes):
            take = min(share + (i < extra), len(members[v]) - quota[v])
            quota[v] += take
            left -= take
    chosen = np.sort(np.concatenate([members[v][: quota[v]] for v in members]))
    return chosen, {v: q for v, q in quota.items() if q}


def describe_counts(counts: dict[int, int]) -> str:
    """``"100 each of classes 0-9"`` or ``"class 0: 12, class 1: 11, ..."``."""
    values = sorted(counts)
    if len(set(counts.values())) == 1 and values == list(range(values[0], values[-1] + 1)):
        return f"{counts[values[0]]} each of classes {values[0]}-{values[-1]}"
    return ", ".join(f"class {v}: {counts[v]}" for v in values)
