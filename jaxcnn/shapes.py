"""Index arithmetic shared by every windowed op: argument normalisation, padding, output sizes.

Everything here runs at trace time on Python ints, so a bad argument is reported before any
computation is compiled. Messages name the calling function, the argument and the numbers.

Output size. For one spatial dimension with input size ``H``, padding ``(lo, hi)``, window ``F``,
dilation ``D`` and stride ``S``, the dilated window spans ``F_eff = (F - 1) * D + 1`` positions and::

    out = floor((H + lo + hi - F_eff) / S) + 1

This is the tutorials' ``(H - F + 2P) / S + 1`` with ``lo = hi = P`` and ``D = 1``, made exact for
strides that do not divide ``H + 2P - F``: trailing rows and columns that do not fill a whole window
are left out of the output (as in ``lax`` and PyTorch) and so receive zero gradient.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import NamedTuple, cast

import numpy as np

Pair = tuple[int, int]
Padding2D = tuple[Pair, Pair]
IntOrPair = int | Sequence[int]  # a stride, dilation or window: one int for both dimensions, or (height, width)
PaddingLike = int | str | Sequence[int] | Sequence[Sequence[int]]  # every padding form resolve_padding accepts

_DIM_NAMES = ("height", "width")


def _as_int(value, *, fn: str, name: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{fn}: {name} must be an int, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{fn}: {name} must be an int or a pair of ints, got {value!r}") from None


def pair(value: IntOrPair, *, fn: str, name: str) -> Pair:
    """Turns ``int | (int, int)`` into ``(int, int)``; ``fn`` and ``name`` go into error messages."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{fn}: {name} must be an int or a pair of ints, got {value!r}")
        return (_as_int(value[0], fn=fn, name=name), _as_int(value[1], fn=fn, name=name))
    v = _as_int(value, fn=fn, name=name)
    return (v, v)


def positive_pair(value: IntOrPair, *, fn: str, name: str) -> Pair:
    """Like :func:`pair`, and every entry must be >= 1 (strides, dilations, windows)."""
    p = pair(value, fn=fn, name=name)
    if min(p) < 1:
        raise ValueError(f"{fn}: {name} must be positive, got {value!r}")
    return p


def effective_window(window: int, dilation: int = 1) -> int:
    """Span of a window of ``window`` taps spaced ``dilation`` apart: ``(window - 1) * dilation + 1``."""
    return (window - 1) * dilation + 1


def output_size(size: int, window: int, stride: int = 1, padding: Pair = (0, 0), dilation: int = 1) -> int:
    """``floor((size + lo + hi - (window - 1) * dilation - 1) / stride) + 1``; may be <= 0 (no check).

    Examples:
      >>> from jaxcnn.shapes import output_size
      >>> output_size(28, 5, padding=(2, 2))  # a 5x5 kernel padded by 2 keeps the size
      28
      >>> output_size(7, 3, stride=2)  # (7 - 3) / 2 + 1
      3
      >>> output_size(7, 3, stride=3)  # the last column is read by no window
      2
      >>> output_size(9, 3, dilation=2)  # the dilated window spans 5 positions
      5
    """
    lo, hi = padding
    return (size + lo + hi - effective_window(window, dilation)) // stride + 1


def same_padding(size: int, window: int, stride: int = 1, dilation: int = 1) -> Pair:
    """``"SAME"`` padding as ``lax`` computes it: ``out = ceil(size / stride)``, the odd extra at the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + effective_window(window, dilation) - size, 0)
    return (total // 2, total - total // 2)


def resolve_padding(
    padding: PaddingLike,
    *,
    fn: str,
    in_hw: Pair,
    window_hw: Pair,
    stride: Pair = (1, 1),
    dilation: Pair = (1, 1),
) -> Padding2D:
    """Normalises every accepted padding form to ``((top, bottom), (left, right))``.

    Accepted: an int ``p`` (all four sides), a pair ``(ph, pw)`` (both sides of each dimension),
    a pair of pairs ``((top, bottom), (left, right))``, ``"VALID"`` (no padding) or ``"SAME"``
    (output size ``ceil(in / stride)``; an odd total puts the extra row/column at the bottom/right).
    """
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return ((0, 0), (0, 0))
        if mode == "SAME":
            height, width = (same_padding(*args) for args in zip(in_hw, window_hw, stride, dilation, strict=True))
            return (height, width)
        raise ValueError(f"{fn}: padding must be an int, a pair, a pair of pairs, 'VALID' or 'SAME'; got {padding!r}")
    pads: Padding2D
    if isinstance(padding, (tuple, list)) and len(padding) == 2 and all(isinstance(p, (tuple, list)) for p in padding):
        height, width = (pair(p, fn=fn, name="padding") for p in padding)
        pads = (height, width)
    elif isinstance(padding, (tuple, list)) and any(isinstance(p, (tuple, list)) for p in padding):
        raise ValueError(f"{fn}: padding must be an int, a pair, a pair of pairs, 'VALID' or 'SAME'; got {padding!r}")
    else:
        ph, pw = pair(cast(IntOrPair, padding), fn=fn, name="padding")  # the branches above took the nested forms
        pads = ((ph, ph), (pw, pw))
    if min(min(p) for p in pads) < 0:
        raise ValueError(f"{fn}: padding must be non-negative, got {padding!r}")
    return pads


class Geometry(NamedTuple):
    """Everything about a 2-D windowed op that depends only on static shapes and hyperparameters."""

    in_hw: Pair
    window: Pair  # taps per dimension (kernel or pooling window size)
    stride: Pair
    padding: Padding2D
    dilation: Pair
    out_hw: Pair

    @property
    def padded_hw(self) -> Pair:
        height, width = (n + lo + hi for n, (lo, hi) in zip(self.in_hw, self.padding, strict=True))
        return (height, width)

    @property
    def effective_window(self) -> Pair:
        height, width = (effective_window(k, d) for k, d in zip(self.window, self.dilation, strict=True))
        return (height, width)


def window_geometry(
    *,
    fn: str,
    in_hw: Sequence[int],
    window: IntOrPair,
    stride: IntOrPair,
    padding: PaddingLike,
    dilation: IntOrPair = 1,
    window_name: str = "kernel",
) -> Geometry:
    """Checks the hyperparameters of a windowed op against its input and returns its :class:`Geometry`.

    Raises ``ValueError`` showing the arithmetic when the (dilated) window does not fit the padded input.

    Examples:
      >>> from jaxcnn.shapes import window_geometry
      >>> geom = window_geometry(fn="conv2d", in_hw=(7, 7), window=3, stride=2, padding="SAME")
      >>> geom.padding, geom.out_hw
      (((1, 1), (1, 1)), (4, 4))
      >>> window_geometry(fn="conv2d", in_hw=(5, 5), window=7, stride=1, padding=0)  # doctest: +NORMALIZE_WHITESPACE
      Traceback (most recent call last):
        ...
      ValueError: conv2d: kernel height 7 exceeds the padded input height 5 (5 + 0 + 0); output height would be
      (5 - 7)/1 + 1 = -1
    """
    window_hw = positive_pair(window, fn=fn, name=window_name)
    stride_hw = positive_pair(stride, fn=fn, name="stride")
    dilation_hw = positive_pair(dilation, fn=fn, name="dilation")
    in_hw = (int(in_hw[0]), int(in_hw[1]))
    eff = tuple(effective_window(k, d) for k, d in zip(window_hw, dilation_hw, strict=True))
    pads = resolve_padding(padding, fn=fn, in_hw=in_hw, window_hw=window_hw, stride=stride_hw, dilation=dilation_hw)
    out = []
    for dim, n, k, d, e, s, (lo, hi) in zip(
        _DIM_NAMES, in_hw, window_hw, dilation_hw, eff, stride_hw, pads, strict=True
    ):
        padded = n + lo + hi
        size = (padded - e) // s + 1
        if size < 1:
            dilated = f" (dilation {d} -> {e})" if d != 1 else ""
            raise ValueError(
                f"{fn}: {window_name} {dim} {k}{dilated} exceeds the padded input {dim} {padded} "
                f"({n} + {lo} + {hi}); output {dim} would be ({padded} - {e})/{s} + 1 = {size}"
            )
        out.append(size)
    return Geometry(in_hw, window_hw, stride_hw, pads, dilation_hw, (out[0], out[1]))
