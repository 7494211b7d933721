"""Shared helpers for the op tests: tolerances keyed by dtype, random and tie-free inputs, padding
forms written independently of :mod:`jaxcnn.shapes`, and a record of the worst error seen per op.

Errors are relative to the reference's scale, ``max|got - ref| / max|ref|``, the same measure as
:mod:`jaxcnn.gradcheck` uses. Every comparison goes through :func:`assert_close`, which keeps the
largest error per ``(op, dtype, kind)``; set ``JAXCNN_ERROR_REPORT=path.json`` to have the table
written there (and printed) when the test process exits.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
from collections import defaultdict

import numpy as np
from hypothesis import strategies as st

import jax
import jax.numpy as jnp
from jax import lax

# Forward values against a float64 reference, by the dtype the op ran in. bfloat16 keeps 8 significant
# bits (relative spacing 2**-7 = 7.8e-3); its reference is float32 on the same bf16-rounded inputs.
FWD_TOL = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 2e-2}
# Gradients against an independent reference (NumPy loops, jax.vjp), by dtype.
GRAD_TOL = {"float64": 1e-12, "float32": 1e-5}

DTYPES = {"float64": np.float64, "float32": np.float32}

_WORST: dict[tuple[str, str, str], float] = defaultdict(float)


def dtype_name(a) -> str:
    return jnp.result_type(a).name


def rel_err(got, ref) -> float:
    """``max|got - ref| / max|ref|`` in float64 (the absolute error when ``ref`` is all zero)."""
    got = np.asarray(jnp.asarray(got, jnp.float64) if dtype_name(got) == "bfloat16" else got, np.float64)
    ref = np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"shape {got.shape} != reference shape {ref.shape}"
    err = float(np.max(np.abs(got - ref), initial=0.0))
    scale = float(np.max(np.abs(ref), initial=0.0))
    return err / scale if scale > 0 else err


def record(op: str, dtype: str, kind: str, err: float) -> None:
    key = (op, dtype, kind)
    _WORST[key] = max(_WORST[key], float(err))


def assert_close(got, ref, tol: float, *, op: str, dtype: str, kind: str, what: str = "") -> float:
    """Asserts ``rel_err(got, ref) <= tol`` and records the error under ``(op, dtype, kind)``."""
    err = rel_err(got, ref)
    record(op, dtype, kind, err)
    assert err <= tol, f"{op} [{dtype}] {kind} {what}: relative error {err:.3e} > {tol:.0e}"
    return err


def record_gradcheck(op: str, result) -> None:
    """Keeps the worst manual-vs-autodiff, manual-vs-FD and adjoint errors of a gradcheck result."""
    worst = result.worst
    record(op, result.dtype, "grad vs autodiff", worst.autodiff)
    record(op, result.dtype, "grad vs FD", worst.finite_difference)
    record(op, result.dtype, "adjoint identity", worst.adjoint)


def worst_table() -> str:
    lines = [f"{'op':<28} {'dtype':<9} {'comparison':<22} {'worst rel. error':>16}"]
    for (op, dt, kind), err in sorted(_WORST.items()):
        lines.append(f"{op:<28} {dt:<9} {kind:<22} {err:>16.2e}")
    return "\n".join(lines)


@atexit.register
def _write_report() -> None:
    path = os.environ.get("JAXCNN_ERROR_REPORT")
    if not path or not _WORST:
        return
    with open(path, "w") as fh:
        json.dump(
            [{"op": o, "dtype": d, "kind": k, "error": e} for (o, d, k), e in sorted(_WORST.items())], fh, indent=1
        )
    print("\nworst relative errors seen by the op tests\n" + worst_table())


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def normal(rng: np.random.Generator, shape, dtype=np.float64) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


def tie_free(rng: np.random.Generator, shape, dtype=np.float64, spacing: float = 0.125) -> np.ndarray:
    """Distinct values (a random permutation of an evenly spaced grid, spacing exact in binary):
    no window has two equal maxima, and no finite-difference step of 1e-5 can reorder them."""
    n = int(np.prod(shape))
    return ((rng.permutation(n) - n // 2) * spacing).reshape(shape).astype(dtype)


def away_from_zero(rng: np.random.Generator, shape, dtype=np.float64, gap: float = 0.1) -> np.ndarray:
    """Normal draws pushed at least ``gap`` away from 0 (for kinked activations)."""
    x = rng.standard_normal(shape)
    return (np.sign(x) * (np.abs(x) + gap)).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Padding, independently of jaxcnn.shapes
# ----------------------------------------------------------------------------------------------

PADDING_FORMS = ("int", "pair", "pairs", "VALID", "SAME")


def explicit_pads(padding, in_hw, window_eff, stride):
    """``[(top, bottom), (left, right)]`` for any accepted padding form, SAME via ``lax.padtype_to_pads``."""
    if isinstance(padding, str):
        return [tuple(p) for p in lax.padtype_to_pads(tuple(in_hw), tuple(window_eff), tuple(stride), padding)]
    if isinstance(padding, int):
        return [(padding, padding), (padding, padding)]
    if isinstance(padding[0], int):
        return [(padding[0], padding[0]), (padding[1], padding[1])]
    return [tuple(padding[0]), tuple(padding[1])]


def as_pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def out_size(n, k_eff, s, lo, hi) -> int:
    return (n + lo + hi - k_eff) // s + 1


def np_tree(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


# ----------------------------------------------------------------------------------------------
# Hypothesis strategies (small shapes: batch <= 3, H/W <= 9, channels <= 6)
# ----------------------------------------------------------------------------------------------


def _padding_form(draw, max_pad: tuple[int, int]):
    """One of the accepted padding forms with every side <= ``max_pad`` of its dimension."""
    form = draw(st.sampled_from(PADDING_FORMS))
    if form in ("VALID", "SAME"):
        return form
    if form == "int":
        return draw(st.integers(0, min(max_pad)))
    if form == "pair":
        return (draw(st.integers(0, max_pad[0])), draw(st.integers(0, max_pad[1])))
    return tuple((draw(st.integers(0, m)), draw(st.integers(0, m))) for m in max_pad)


def _maybe_int(draw, p):
    return p[0] if p[0] == p[1] and draw(st.booleans()) else p


@st.composite
def conv_configs(draw, max_hw: int = 9):
    """Conv hyperparameters and shapes; the (dilated) kernel always fits the padded input."""
    groups = draw(st.sampled_from((1, 1, 2, 3)))
    cg = draw(st.integers(1, min(3, 6 // groups)))
    og = draw(st.integers(1, min(3, 6 // groups)))
    kernel, dilation, stride = [], [], []
    for _ in range(2):
        k = draw(st.integers(1, 4))
        d = draw(st.integers(1, 3)) if k > 1 else 1
        while (k - 1) * d + 1 > max_hw - 1:
            d -= 1
        kernel.append(k)
        dilation.append(d)
        stride.append(draw(st.integers(1, 4)))
    padding = _padding_form(draw, (3, 3))
    hw = []
    for dim in range(2):
        eff = (kernel[dim] - 1) * dilation[dim] + 1
        if padding == "SAME":
            lo_hi = eff  # SAME always fits
        elif padding == "VALID":
            lo_hi = 0
        else:
            lo_hi = sum(explicit_pads(padding, (1, 1), (1, 1), (1, 1))[dim])
        hw.append(draw(st.integers(max(1, eff - lo_hi), max_hw)))
    n = draw(st.integers(1, 3))
    return dict(
        x_shape=(n, hw[0], hw[1], groups * cg),
        w_shape=(kernel[0], kernel[1], cg, groups * og),
        stride=_maybe_int(draw, tuple(stride)),
        padding=padding,
        dilation=_maybe_int(draw, tuple(dilation)),
        groups=groups,
    )


@st.composite
def pool_configs(draw, max_hw: int = 9):
    """Pooling hyperparameters and shapes: every pad is smaller than the window; the window fits."""
    window = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 4), st.integers(1, 4))))
    padding = _padding_form(draw, (window[0] - 1, window[1] - 1))
    hw = []
    for dim in range(2):
        if padding == "SAME":
            lo_hi = window[dim]
        elif padding == "VALID":
            lo_hi = 0
        else:
            lo_hi = sum(explicit_pads(padding, (1, 1), (1, 1), (1, 1))[dim])
        hw.append(draw(st.integers(max(1, window[dim] - lo_hi), max_hw)))
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    return dict(
        x_shape=(n, hw[0], hw[1], c),
        window=_maybe_int(draw, window),
        stride=None if stride is None else _maybe_int(draw, stride),
        padding=padding,
    )


def resolved(cfg, window_key: str = "w_shape"):
    """``(window, stride, dilation, pads)`` as explicit pairs, computed without jaxcnn.shapes."""
    in_hw = cfg["x_shape"][1:3]
    if window_key == "w_shape":
        window = tuple(cfg["w_shape"][:2])
        dilation = as_pair(cfg["dilation"])
        stride = as_pair(cfg["stride"])
    else:
        window = as_pair(cfg["window"])
        dilation = (1, 1)
        stride = window if cfg["stride"] is None else as_pair(cfg["stride"])
    eff = tuple((k - 1) * d + 1 for k, d in zip(window, dilation, strict=True))
    pads = explicit_pads(cfg["padding"], in_hw, eff, stride)
    return window, stride, dilation, tuple(tuple(p) for p in pads)


def unread_mask(in_hw, window, stride, dilation, pads, out_hw) -> np.ndarray:
    """``(H, W)`` booleans: True where no window tap reads the input (those get exactly zero gradient)."""
    read = []
    for n, k, s, d, (lo, _), o in zip(in_hw, window, stride, dilation, pads, out_hw, strict=True):
        rows = np.zeros(n, bool)
        for i in range(o):
            for a in range(k):
                r = i * s + a * d - lo
                if 0 <= r < n:
                    rows[r] = True
        read.append(rows)
    return ~np.logical_and.outer(read[0], read[1])


@functools.cache
def _jit_partial(fn, static):
    return jax.jit(functools.partial(fn, **dict(static)))


def J(fn, **static):
    """``jax.jit(functools.partial(fn, **static))``, cached: one compile per op, hyperparameters and shapes
    (an eager call would compile every primitive of the op separately)."""
    return _jit_partial(fn, tuple(sorted(static.items())))
