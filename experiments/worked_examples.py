"""Experiment 2 — the tutorials' worked examples, computed and checked.

Every small example of the seed tutorials is recomputed with the library and checked against the
numbers and formulas the tutorial writes, element by element:

* seed 003: the 3x3 image convolved with the 2x2 filter (outputs 9, 32, 14, 26);
* seed 002: ``dF = conv(X, dO)`` and ``dX = full_conv(dO, rot180 F)`` on that image and filter, each
  element from the tutorial's own expansion, against ``conv2d_backward`` (every formulation),
  ``jax.vjp`` and the NumPy loop reference;
* seed 001: max-pool gradient routing on a 4x4 input whose winners sit where the tutorial draws them,
  and the filter gradient ``dE/dF = conv(A, dE/dC)`` on its 6x6 input;
* seed 004: the output size ``(H - F + 2P)/S + 1`` tabulated over strides and paddings against the
  shapes ``conv2d`` returns, and the im2col matrix form;
* seed 000: the matrix-form shapes (input 100x22x22, 3x3 filters) of every quantity of the forward and
  backward pass, computed.

Where a tutorial formula has a slip, the report shows the formula as written, what it evaluates to, and
the mended formula. Writes ``worked_examples.md`` (the report), ``worked_examples.json`` (every check),
``output_size.csv`` and ``worked_examples_maxpool.png``. Exits with status 1 if a check fails.

    python experiments/worked_examples.py [--out DIR]
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import sys
from fractions import Fraction
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``experiments`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

import jax
import jax.numpy as jnp

from experiments import common
from jaxcnn import ops, reference
from jaxcnn.ops.conv import METHODS as CONV_METHODS
from jaxcnn.shapes import window_geometry

NAME = "worked_examples"

# Seed 003's example (also used for seed 002, which writes the same shapes symbolically).
IMAGE_003 = np.array([[1, 7, 2], [11, 1, 23], [2, 2, 2]], np.float64)
FILTER_003 = np.array([[1, 1], [0, 1]], np.float64)
OUTPUT_003 = np.array([[9, 32], [14, 26]], np.float64)  # "(1x1 + 7x1 + 11x0 + 1x1) = 9" ...
# The cotangent dE/dO for seed 002's backward pass (the tutorial keeps it symbolic); not symmetric, so a
# transposed or unrotated formula would show.
D_OUTPUT_002 = np.array([[1, 2], [-1, 3]], np.float64)

# Seed 001: the 6x6 input A drawn in the slides, and a 4x4 conv output C whose 2x2 max-pool winners are
# C01, C03, C20 and C32, the cells the slides route the gradient to.
A_001 = np.array([[5, 6, 7, 5, 6, 7], [6, 7, 8, 6, 7, 8], [7, 8, 9, 7, 8, 9]] * 2, np.float64)
C_001 = np.array([[1, 8, 3, 9], [4, 2, 5, 7], [6, 1, 2, 3], [0, 5, 9, 4]], np.float64)
D_POOLED_001 = np.array([[1, 2], [3, 4]], np.float64)  # dE/dP from "the next layer"
D_C_DENSE_001 = np.arange(1, 17, dtype=np.float64).reshape(4, 4)  # a dense dE/dC to show the dE/dF01 slip
FILTER_001 = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float64)  # any 3x3 filter (the slides keep F symbolic)


# ---------------------------------------------------------------------------------------------------
# Small helpers


def _num(v) -> str:
    v = float(v)
    return str(int(v)) if v == int(v) else f"{v:g}"


def _signed(v) -> str:
    return f"({_num(v)})" if float(v) < 0 else _num(v)


def _nhwc(a):
    return jnp.asarray(a, jnp.float64)[None, :, :, None]


def _hwio(a):
    return jnp.asarray(a, jnp.float64)[:, :, None, None]


def _grid(a) -> str:
    a = np.asarray(a)
    width = max(len(_num(v)) for v in a.ravel())
    return "\n".join("  ".join(_num(v).rjust(width) for v in row) for row in a)


class Report:
    """Collects the markdown text and the list of checks."""

    def __init__(self, log):
        self.parts: list[str] = []
        self.checks: list[dict] = []
        self.log = log

    def text(self, s: str) -> None:
        self.parts.append(s)

    def code(self, lines) -> None:
        self.parts.append("```\n" + ("\n".join(lines) if not isinstance(lines, str) else lines) + "\n```\n")

    def check(self, section: str, what: str, expected, got, *, tol: float = 0.0, note: str = "") -> bool:
        expected, got = np.asarray(expected, np.float64), np.asarray(got, np.float64)
        ok = expected.shape == got.shape and bool(np.all(np.abs(expected - got) <= tol))
        self.checks.append(
            {
                "section": section,
                "check": what,
                "expected": _small(expected),
                "got": _small(got),
                "ok": ok,
                "max_abs_diff": float(np.max(np.abs(expected - got))) if expected.shape == got.shape else None,
                "note": note,
            }
        )
        if not ok:
            self.log(f"CHECK FAILED [{section}] {what}: expected {expected.tolist()}, got {got.tolist()}")
        return ok

    def slip(self, section: str, what: str, as_written, mended, explanation: str) -> None:
        self.checks.append(
            {
                "section": section,
                "check": what,
                "slip": explanation,
                "as_written": np.asarray(as_written, np.float64),
                "mended": np.asarray(mended, np.float64),
                "ok": True,
            }
        )


def _small(a: np.ndarray):
    """The array itself when small enough to read in the JSON, else its shape (the check's verdict stays)."""
    return a if a.size <= 64 else {"shape": list(a.shape), "values": "omitted (large)"}


def _expand(terms, symbols) -> tuple[str, str, float]:
    """``terms``: list of products, each a tuple of symbol names -> (symbolic, numeric, value)."""
    sym = " + ".join("·".join(t) for t in terms)
    num = " + ".join("·".join(_signed(symbols[n]) for n in t) for t in terms)
    value = sum(float(np.prod([symbols[n] for n in t])) for t in terms)
    return sym, num, value


# ---------------------------------------------------------------------------------------------------
# The sections


def _methods() -> str:
    """The formulations of ``conv2d`` and ``conv2d_backward``, as the report names them."""
    words = {
        "conv": "`lax` convolution",
        "im2col": "im2col",
        "taps": "per-tap products",
        "auto": "`auto` (the default)",
    }
    return ", ".join(words.get(m, f"`{m}`") for m in CONV_METHODS)


def seed_003_forward(r: Report) -> None:
    sec = "003 forward"
    r.text("## Seed 003 — a 3x3 image convolved with a 2x2 filter\n")
    x, f = _nhwc(IMAGE_003), _hwio(FILTER_003)
    outputs = {m: np.asarray(ops.conv2d(x, f, method=m))[0, :, :, 0] for m in CONV_METHODS}
    ref = reference.conv2d(np.asarray(x), np.asarray(f))[0, :, :, 0]
    lines = [
        "image X             filter F",
        *[
            f"{'  '.join(_num(v).rjust(2) for v in IMAGE_003[i])}"
            + (f"          {'  '.join(_num(v) for v in FILTER_003[i])}" if i < 2 else "")
            for i in range(3)
        ],
        "",
    ]
    for i, j in itertools.product(range(2), range(2)):
        patch = IMAGE_003[i : i + 2, j : j + 2]
        num = " + ".join(
            f"{_num(patch[a, b])}x{_num(FILTER_003[a, b])}" for a, b in itertools.product(range(2), range(2))
        )
        got = outputs["conv"][i, j]
        ok = r.check(sec, f"O{i + 1}{j + 1}", OUTPUT_003[i, j], got)
        lines.append(
            f"O{i + 1}{j + 1} = ({num}) = {_num((patch * FILTER_003).sum())}    tutorial: {_num(OUTPUT_003[i, j])}"
            f"    conv2d: {_num(got)} {'✓' if ok else '✗'}"
        )
    r.code(lines)
    for m in (m for m in CONV_METHODS if m != "conv"):
        r.check(sec, f"conv2d(method='{m}') equals method='conv'", outputs["conv"], outputs[m])
    r.check(sec, "NumPy loop reference", OUTPUT_003, ref)
    n, k = 3, 2
    r.check(sec, "output size (n - f + 1)", n - k + 1, outputs["conv"].shape[0])
    r.text(
        f"Output size `(n - f + 1) = {n} - {k} + 1 = {n - k + 1}`, the shape conv2d returns: "
        f"`{tuple(outputs['conv'].shape)}`. Every formulation of `conv2d` ({_methods()}) and the "
        "NumPy loop reference give the tutorial's four numbers.\n"
    )


# Seed 002's expansions, transcribed term by term (1-based indices as in the article).
DF_002 = {  # dE/dF_ab = sum of dO_ij X_..
    "F11": [("δO11", "X11"), ("δO12", "X12"), ("δO21", "X21"), ("δO22", "X22")],
    "F12": [("δO11", "X12"), ("δO12", "X13"), ("δO21", "X22"), ("δO22", "X23")],
    "F21": [("δO11", "X21"), ("δO12", "X22"), ("δO21", "X31"), ("δO22", "X32")],
    "F22": [("δO11", "X22"), ("δO12", "X23"), ("δO21", "X32"), ("δO22", "X33")],
}
DX_002 = {  # "δX11 = F11 δO11", ... (the full-convolution figure)
    "X11": [("F11", "δO11")],
    "X12": [("F12", "δO11"), ("F11", "δO12")],
    "X13": [("F12", "δO12")],
    "X21": [("F21", "δO11"), ("F11", "δO21")],
    "X22": [("F22", "δO11"), ("F21", "δO12"), ("F12", "δO21"), ("F11", "δO22")],
    "X23": [("F22", "δO12"), ("F12", "δO22")],
    "X31": [("F21", "δO21")],
    "X32": [("F22", "δO21"), ("F21", "δO22")],
    "X33": [("F22", "δO22")],
}


def seed_002_backward(r: Report) -> None:
    sec = "002 backward"
    r.text("## Seed 002 — `dF = conv(X, dO)` and `dX = full_conv(dO, rot180 F)`\n")
    r.text(
        "The image `X` and filter `F` of seed 003, and an upstream gradient `δO = dE/dO` (the article keeps "
        "it symbolic; these values are not symmetric, so a transposed or unrotated formula would show):\n"
    )
    r.code(["δO =", _grid(D_OUTPUT_002)])
    symbols = {}
    for name, a in (("X", IMAGE_003), ("F", FILTER_003), ("δO", D_OUTPUT_002)):
        for i, j in np.ndindex(a.shape):
            symbols[f"{name}{i + 1}{j + 1}"] = a[i, j]
    x, f, dy = _nhwc(IMAGE_003), _hwio(FILTER_003), _nhwc(D_OUTPUT_002)
    lib = {m: ops.conv2d_backward(dy, x, f, method=m) for m in CONV_METHODS}
    _, vjp = jax.vjp(lambda x, f: ops.conv2d(x, f), x, f)
    auto_dx, auto_df = vjp(dy)
    ref_dx, ref_df, _ = reference.conv2d_backward(np.asarray(dy), np.asarray(x), np.asarray(f))
    dw = np.asarray(lib["conv"][1])[:, :, 0, 0]
    dx = np.asarray(lib["conv"][0])[0, :, :, 0]

    for title, expansions, got, label in (
        ("∂E/∂F, each element as the article expands it:", DF_002, dw, "∂E/∂{}"),
        ("∂E/∂X, each element as the article's full-convolution figure writes it:", DX_002, dx, "δ{}"),
    ):
        lines = [title]
        for name, terms in expansions.items():
            sym, num, value = _expand(terms, symbols)
            a, b = int(name[1]) - 1, int(name[2]) - 1
            ok = r.check(sec, f"dE/d{name} (article's expansion vs conv2d_backward)", value, got[a, b])
            head = label.format(name)
            lines += [
                f"{head} = {sym}",
                f"{' ' * len(head)} = {num} = {_num(value)}    conv2d_backward: {_num(got[a, b])} {'✓' if ok else '✗'}",
            ]
        r.code(lines)

    # The two matrix statements, computed literally with conv2d.
    df_as_conv = np.asarray(ops.conv2d(x, _hwio(D_OUTPUT_002)))[0, :, :, 0]  # correlate X with δO
    rot = FILTER_003[::-1, ::-1]
    padded = jnp.pad(dy, ((0, 0), (1, 1), (1, 1), (0, 0)))
    dx_as_full = np.asarray(ops.conv2d(padded, _hwio(rot)))[0, :, :, 0]  # full correlation with rot180 F
    dx_true_conv = np.asarray(
        jax.lax.conv_general_dilated(  # true convolution = correlation with flipped kernel
            padded, jnp.flip(_hwio(FILTER_003), (0, 1)), (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    )
    r.check(sec, "dF = conv(X, δO) computed with conv2d", dw, df_as_conv)
    r.check(sec, "dX = full_conv(δO, rot180 F) computed with conv2d on zero-padded δO", dx, dx_as_full)
    for m in CONV_METHODS:
        r.check(sec, f"conv2d_backward(method='{m}') dX vs jax.vjp", auto_dx, lib[m][0])
        r.check(sec, f"conv2d_backward(method='{m}') dF vs jax.vjp", auto_df, lib[m][1])
    r.check(sec, "dX vs NumPy loop reference", ref_dx, lib["conv"][0])
    r.check(sec, "dF vs NumPy loop reference", ref_df, lib["conv"][1])
    r.check(sec, "db = sum(δO)", D_OUTPUT_002.sum(), lib["conv"][2][0])
    r.code(
        [
            "dF = conv(X, δO):",
            _grid(df_as_conv),
            "",
            "rot180 F:",
            _grid(rot),
            "",
            "dX = full_conv(δO, rot180 F)  (δO zero-padded by 1, correlated with rot180 F):",
            _grid(dx_as_full),
        ]
    )
    r.check(
        sec, "the same dX as a true (flipping) convolution of padded δO with F", dx_as_full, dx_true_conv[0, :, :, 0]
    )
    r.text(
        "Both matrix statements hold, computed literally with `conv2d`, and agree with `conv2d_backward` "
        f"(every formulation: {_methods()}), `jax.vjp` and the NumPy loop reference. Notes on the text: the article "
        'says *convolution* for what it computes as *correlation* (it says so: "convolution is same as '
        'correlation, just for simplicity"), so `full_conv(dO, rot180 F)` means a full correlation with the '
        "rotated filter — equivalently a true full convolution with `F` itself, checked above. Its long-form "
        "`∂E/∂X22` writes `f12` for `F12` (a typo; the figure's `δX22` line has `F12`).\n"
    )


def seed_001_pooling(r: Report, plt, out: Path) -> None:
    sec = "001 max-pool routing"
    r.text("## Seed 001 — max-pool gradient routing on a 4x4 input\n")
    r.text(
        "A 4x4 conv output `C` whose 2x2 windows have their maxima at `C01`, `C03`, `C20` and `C32` — the cells "
        "the slides route the gradient to — and an upstream gradient `dE/dP` for the 2x2 pooled output `P`:\n"
    )
    c, dp = _nhwc(C_001), _nhwc(D_POOLED_001)
    p = np.asarray(ops.max_pool2d(c, window=2))[0, :, :, 0]
    dc = np.asarray(ops.max_pool2d_backward(dp, c, window=2))[0, :, :, 0]
    _, vjp = jax.vjp(lambda c: ops.max_pool2d(c, window=2), c)
    auto = np.asarray(vjp(dp)[0])[0, :, :, 0]
    ref = reference.max_pool2d_backward(np.asarray(dp), np.asarray(c))[0, :, :, 0]
    winners = [(0, 1), (0, 3), (2, 0), (3, 2)]
    expected = np.zeros((4, 4))
    as_written = np.zeros((4, 4))
    for (i, j), (wi, wj) in zip(itertools.product(range(2), range(2)), winners, strict=True):
        expected[wi, wj] = D_POOLED_001[i, j]  # local gradient 1
        as_written[wi, wj] = C_001[wi, wj] * D_POOLED_001[i, j]  # the slides' "C01 · dE/dP00"
    r.check(sec, "pooled output P", [[8, 9], [6, 9]], p)
    r.check(sec, "max_pool2d_backward routes dE/dP to the winners (local gradient 1)", expected, dc)
    r.check(sec, "jax.vjp of max_pool2d", expected, auto)
    r.check(sec, "NumPy loop reference", expected, ref)
    r.slip(
        sec,
        "local gradient of max: the slides write ∂/∂C01 max(C00, C01, C10, C11) = C01",
        as_written,
        expected,
        "the derivative of max with respect to its winning argument is 1, not the winning value",
    )
    r.code(
        [
            "C =",
            _grid(C_001),
            "",
            "P = maxpool2x2(C) =",
            _grid(p),
            "",
            "dE/dP =",
            _grid(D_POOLED_001),
            "",
            "dE/dC = routed gradient (max_pool2d_backward = jax.vjp = NumPy reference):",
            _grid(dc),
            "",
            "as the slides write it, ∂E/∂C01 = C01·∂E/∂P00 etc. (slip):",
            _grid(as_written),
        ]
    )
    r.text(
        "**Slip (001):** the slides write `∂/∂C01 max(C00, C01, C10, C11) · ∂E/∂P00 = C01 · ∂E/∂P00`. The local "
        "gradient of `max` with respect to its winner is **1**, so `∂E/∂C01 = ∂E/∂P00`; every other element of the "
        "window gets 0. As written, the routed gradient would be scaled by the winning values "
        f"({', '.join(_num(C_001[w]) for w in winners)}).\n"
    )
    # A tie, to show the policy.
    tie = C_001.copy()
    tie[1, 0] = tie[0, 1] = 8.0  # two maxima in the first window, (0, 1) first in row-major order
    dc_tie = np.asarray(ops.max_pool2d_backward(dp, _nhwc(tie), window=2))[0, :, :, 0]
    _, vjp = jax.vjp(lambda c: ops.max_pool2d(c, window=2), _nhwc(tie))
    auto_tie = np.asarray(vjp(dp)[0])[0, :, :, 0]
    r.check(sec, "tie: the first maximum in row-major order takes the whole gradient", D_POOLED_001[0, 0], dc_tie[0, 1])
    r.check(sec, "tie: the other maximum gets 0", 0.0, dc_tie[1, 0])
    r.check(sec, "tie: jax.vjp routes the same way", auto_tie, dc_tie)
    r.text(
        "Ties (the slides do not say): with `C10 = C01 = 8`, the first maximum in row-major window order (`C01`) "
        "takes the whole gradient and `C10` gets 0 — the library's documented policy, and what `jax.vjp` does.\n"
    )
    if plt is not None:
        _maxpool_figure(plt, out, p, dc, as_written, winners, r.log)


def seed_001_filter_gradient(r: Report) -> None:
    sec = "001 filter gradient"
    r.text("## Seed 001 — `dE/dF = conv(A, dE/dC)` on the slides' 6x6 input\n")
    symbols = {f"A{i}{j}": A_001[i, j] for i, j in np.ndindex(A_001.shape)}
    symbols.update({f"δC{i}{j}": D_C_DENSE_001[i, j] for i, j in np.ndindex(4, 4)})
    a, f = _nhwc(A_001), _hwio(FILTER_001)
    c = np.asarray(ops.conv2d(a, f))[0, :, :, 0]
    lines = ["The forward expansions C00..C03 (F symbolic in the slides; here a Sobel-like F):"]
    symbols.update({f"F{i}{j}": FILTER_001[i, j] for i, j in np.ndindex(3, 3)})
    for j in range(4):
        terms = [(f"A{p}{q + j}", f"F{p}{q}") for p, q in itertools.product(range(3), range(3))]
        sym, _, value = _expand(terms, symbols)
        ok = r.check(sec, f"C0{j} (slides' expansion vs conv2d)", value, c[0, j])
        lines.append(f"C0{j} = {sym} = {_num(value)}   conv2d: {_num(c[0, j])} {'✓' if ok else '✗'}")
    r.code(lines)
    r.text("The backward pass with a dense upstream gradient `δC = dE/dC` (values 1..16, so that every term counts):\n")
    r.code(["δC =", _grid(D_C_DENSE_001)])
    dw = np.asarray(ops.conv2d_backward(_nhwc(D_C_DENSE_001), a, f)[1])[:, :, 0, 0]
    ref = reference.conv2d_backward(np.asarray(_nhwc(D_C_DENSE_001)), np.asarray(a), np.asarray(f))[1][:, :, 0, 0]
    r.check(sec, "dE/dF vs NumPy loop reference", ref, dw)

    def full_terms(i, j):
        return [(f"δC{k}{l}", f"A{k + i}{l + j}") for k, l in itertools.product(range(4), range(4))]

    written = {  # the slides' first six terms of each expansion, then "..."
        (0, 0): [("δC00", "A00"), ("δC01", "A01"), ("δC02", "A02"), ("δC03", "A03"), ("δC10", "A10"), ("δC11", "A11")],
        (0, 1): [("δC00", "A01"), ("δC01", "A02"), ("δC02", "A03"), ("δC03", "A04"), ("δC10", "A11"), ("δC11", "A11")],
    }
    lines = []
    for (i, j), terms in written.items():
        mended = full_terms(i, j)[:6]
        sym_w, _, val_w = _expand(terms, symbols)
        sym_m, _, val_m = _expand(mended, symbols)
        _, _, full = _expand(full_terms(i, j), symbols)
        ok = r.check(sec, f"dE/dF{i}{j} = sum over all 16 δC_kl·A_(k+{i})(l+{j}) vs conv2d_backward", full, dw[i, j])
        lines.append(f"∂E/∂F{i}{j} as written: {sym_w} + …   (first six terms: {_num(val_w)})")
        if terms != mended:
            lines.append(f"        mended:     {sym_m} + …   (first six terms: {_num(val_m)})")
            r.slip(
                sec,
                f"dE/dF{i}{j} expansion, sixth term",
                val_w,
                val_m,
                "the term δC11·A11 should be δC11·A12 (A shifted by the filter column j = 1)",
            )
        lines.append(f"        all 16 terms: {_num(full)}    conv2d_backward: {_num(dw[i, j])} {'✓' if ok else '✗'}")
    r.code(lines)
    r.text(
        "**Slip (001):** the slides' expansion of `∂E/∂F01` has `∂E/∂C11 × A11` as its sixth term; shifting "
        "`A` by the filter's column offset gives `A12` (every other term of that line is shifted correctly). "
        f"With `A11 = {_num(A_001[1, 1])}` and `A12 = {_num(A_001[1, 2])}` the written sum is off by "
        f"`δC11 · (A12 − A11) = {_num(D_C_DENSE_001[1, 1] * (A_001[1, 2] - A_001[1, 1]))}`.\n"
    )
    # The slides' last picture: dE/dC is the sparse routed max-pool gradient, and dE/dF = conv(A, dE/dC).
    routed = np.asarray(ops.max_pool2d_backward(_nhwc(D_POOLED_001), _nhwc(C_001), window=2))
    dw_routed = np.asarray(ops.conv2d_backward(jnp.asarray(routed), a, f)[1])[:, :, 0, 0]
    literal = np.asarray(ops.conv2d(a, jnp.asarray(routed)[0, :, :, :, None]))[0, :, :, 0]
    r.check(sec, "dE/dF = conv(A, routed dE/dC) computed with conv2d vs conv2d_backward", literal, dw_routed)
    r.code(
        [
            "The slides' final picture: dE/dF = Convolution(A, dE/dC) with dE/dC the routed max-pool gradient above:",
            _grid(dw_routed),
        ]
    )


def seed_004_output_size(r: Report, out: Path, heights=(5, 6, 7, 28)) -> list[dict]:
    sec = "004 output size"
    r.text("## Seed 004 — output size `(H − F + 2P)/S + 1` against the shapes `conv2d` returns\n")
    rows = []
    for h, k, s, p in itertools.product(heights, (2, 3, 5), (1, 2, 3), (0, 1, 2)):
        if h + 2 * p < k:
            continue
        written = Fraction(h - k + 2 * p, s) + 1
        # The shapes conv2d and im2col return, traced without computing (jax.eval_shape runs the same code).
        x_spec = jax.ShapeDtypeStruct((1, h, h, 1), jnp.float64)
        w_spec = jax.ShapeDtypeStruct((k, k, 1, 1), jnp.float64)
        y = jax.eval_shape(functools.partial(ops.conv2d, stride=s, padding=p), x_spec, w_spec)
        geom = window_geometry(fn="im2col", in_hw=(h, h), window=k, stride=s, padding=p)
        patches = jax.eval_shape(functools.partial(ops.im2col, geom=geom), x_spec)
        actual = int(y.shape[1])
        floor = (h - k + 2 * p) // s + 1
        rows.append(
            {
                "H": h,
                "F": k,
                "S": s,
                "P": p,
                "formula_as_written": str(written),
                "formula_value": float(written),
                "integer": written.denominator == 1,
                "floor_formula": floor,
                "conv2d_output": actual,
                "im2col_rows": int(patches.shape[1] * patches.shape[2]),
                "matches_floor": actual == floor,
                "matches_as_written": written.denominator == 1 and actual == written,
            }
        )
    ok_floor = r.check(
        sec,
        "conv2d output = floor((H - F + 2P)/S) + 1 for every row",
        [x["floor_formula"] for x in rows],
        [x["conv2d_output"] for x in rows],
    )
    r.check(
        sec, "im2col has oh*ow patch rows", [x["floor_formula"] ** 2 for x in rows], [x["im2col_rows"] for x in rows]
    )
    non_integer = [x for x in rows if not x["integer"]]
    r.check(
        sec,
        "wherever the formula is an integer, it equals the conv2d output",
        [x["formula_value"] for x in rows if x["integer"]],
        [x["conv2d_output"] for x in rows if x["integer"]],
    )
    shown = [x for x in rows if x["H"] == 28 or (x["H"] == 7 and x["F"] == 3)]
    r.text(
        f"{len(rows)} combinations of `H ∈ {{{', '.join(map(str, heights))}}}`, `F ∈ {{2, 3, 5}}`, "
        "`S ∈ {1, 2, 3}`, `P ∈ {0, 1, 2}` "
        f"(all in `output_size.csv`); the rows for `H = 28` (MNIST) and `H = 7, F = 3`:\n"
    )
    r.text(
        common.markdown_table(
            ["H", "F", "S", "P", "(H − F + 2P)/S + 1", "floor form", "conv2d", ""],
            [
                [
                    x["H"],
                    x["F"],
                    x["S"],
                    x["P"],
                    x["formula_as_written"],
                    x["floor_formula"],
                    x["conv2d_output"],
                    "✓" if x["integer"] else "**not an integer: needs the floor**",
                ]
                for x in shown
            ],
            "rrrrrrrl",
        )
    )
    r.slip(
        sec,
        "output size formula without the floor",
        [x["formula_value"] for x in non_integer],
        [x["conv2d_output"] for x in non_integer],
        f"(H - F + 2P)/S + 1 is not an integer in {len(non_integer)} of {len(rows)} combinations; "
        "the size is floor((H - F + 2P)/S) + 1",
    )
    r.text(
        f"\n**Slip (004):** `(H − F + 2P)/S + 1` is fractional in {len(non_integer)} of the {len(rows)} combinations "
        "(whenever `S` does not divide `H − F + 2P`). The output size is `floor((H − F + 2P)/S) + 1`: the last "
        "window that fits starts at row `floor((H + 2P − F)/S)·S`, and trailing rows that fill no window are dropped "
        f"(they get zero gradient). The floor form matches every shape `conv2d` returns: {'✓' if ok_floor else '✗'}.\n"
    )
    preserve = []
    for k in (3, 5, 7):
        y = jax.eval_shape(
            lambda x, w, k=k: ops.conv2d(x, w, padding=(k - 1) // 2),
            jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float64),
            jax.ShapeDtypeStruct((k, k, 1, 1), jnp.float64),
        )
        preserve.append(int(y.shape[1]))
    r.check(sec, "S = 1, P = (F - 1)/2 preserves the size (F = 3, 5, 7 on H = 28)", [28, 28, 28], preserve)
    r.text(
        'The note "when `S = 1`, `P = (F − 1)/2` preserves the input volume size" holds for odd `F` '
        f"(`F = 3, 5, 7` on `H = 28` give {preserve}).\n"
    )
    # The matrix form: patches @ kernel, dx by col2im.
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 7, 7, 3)))
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 4)))
    geom = window_geometry(fn="im2col", in_hw=(7, 7), window=3, stride=2, padding=1)
    patches = ops.im2col(x, geom)  # (N, oh, ow, F*F, C)
    matrix = patches.reshape(-1, 27)  # (N*oh*ow, F*F*C)
    y = ops.conv2d(x, w, stride=2, padding=1)
    r.check(sec, "patch matrix shape (N·oh·ow, F·F·C)", [2 * 4 * 4, 27], list(matrix.shape))
    r.check(sec, "patches @ W = conv2d", y.reshape(-1, 4), matrix @ w.reshape(27, 4), tol=1e-12)
    dy = jnp.asarray(rng.standard_normal(y.shape))
    dx_col2im = ops.col2im((dy.reshape(-1, 4) @ w.reshape(27, 4).T).reshape(patches.shape), geom)
    dx_conv, dw_conv, _ = ops.conv2d_backward(dy, x, w, stride=2, padding=1, method="conv")
    r.check(sec, "dX = col2im(dY @ Wᵀ) = conv2d_backward dX", dx_conv, dx_col2im, tol=1e-12)
    r.check(
        sec, "dW = patchesᵀ @ dY = conv2d_backward dW", dw_conv.reshape(27, 4), matrix.T @ dy.reshape(-1, 4), tol=1e-12
    )
    r.text(
        "The im2col matrix form (seed 004), on `x` of shape `(2, 7, 7, 3)` with 4 filters 3x3, stride 2, padding 1: "
        f"the patch matrix is `{tuple(matrix.shape)}` = `(N·oh·ow, F·F·C)`; `patches @ W` is the convolution, "
        "`patchesᵀ @ dY` its kernel gradient and `col2im(dY @ Wᵀ)` its input gradient (col2im adds the overlapping "
        "windows back), all equal to `conv2d`/`conv2d_backward` to 1e-12. Seed 003's patch list for the 200 "
        "images is the same matrix: `(200, 576, 5, 5)` = 200 × 24·24 windows of 5x5.\n"
    )
    common.write_csv(out / "output_size.csv", rows)
    return rows


# What the slides of seed 000 write for each quantity (None: the slides give no shape for it).
SLIDES_000 = {
    1: {
        "X": "[100x22x22]",
        "f": "[3 × 3]",
        "Z1": "[100x20x20]",
        "H1": "[400 × 100] (H1 = [100x20x20])",
        "WT": "[1 × 400]",
        "O": "[1 × 100]",
        "delta": "(1X100) * (1X100)",
        "per_example": None,
        "dW": "(400X100), (1X100)",
        "db": "dZ2/db × [dE/dO * dO/dZ2]ᵀ",
        "dH1": None,
        "df": "conv((1X100) * (1X100) * (1X400) * (400X100), (100x22x22))",
    },
    3: {
        "X": "[100x22x22]",
        "f": "[5 × 3 × 3] (slip)",
        "Z1": "[100x20x20]",
        "H1": "H1 = [100x20x20x3]",
        "WT": "Wᵀ = [1200 × 1] (W's shape)",
        "O": "[1 x 100]",
        "delta": None,
        "per_example": "[1 x 100] * [1200 x 100]",
        "dW": "[1200 × 100] * [1 × 100] = [1200 × 100] (slip)",
        "db": None,
        "dH1": None,
        "df": None,
    },
}
ROWS_000 = [
    ("X", "X"),
    ("f", "f"),
    ("Z1", "Z1 = conv(X, f)"),
    ("H1", "H1 = sigmoid(Z1) flattened, one column per example"),
    ("WT", "Wᵀ"),
    ("O", "Z2 = Wᵀ·H1 + b and O = sigmoid(Z2)"),
    ("delta", "δ = dE/dO * dO/dZ2 = (O − Y) * O(1 − O)"),
    ("per_example", "each example's dE/dW, side by side (not summed)"),
    ("dW", "dE/dW = H1 · δᵀ (summed over the batch)"),
    ("db", "dE/db = Σ δ"),
    ("dH1", "dE/dH1 = W · δ, as images"),
    ("df", "dE/df = conv(X, dE/dH1 * H1(1 − H1)), summed over the batch"),
]


def seed_000_shapes(r: Report) -> None:
    sec = "000 matrix-form shapes"
    r.text("## Seed 000 — the matrix-form shapes, computed\n")
    rng = np.random.default_rng(0)
    n = 100
    x = jnp.asarray(rng.random((n, 22, 22, 1)))
    y_true = jnp.asarray((rng.random((n, 1)) > 0.5).astype(np.float64))

    def loss_fn(f, w, b):
        h1 = ops.sigmoid(ops.conv2d(x, f)).reshape(n, -1)
        o = ops.sigmoid(ops.dense(h1, w, b))
        return 0.5 * jnp.sum((o - y_true) ** 2)  # E = ½ Σ (O − Y)², so dE/dO = O − Y as the slides write

    @jax.jit
    def matrix_form(f, w, b):
        """The slides' forward and backward pass, examples as columns, with the library's backward ops."""
        z1 = ops.conv2d(x, f)  # (100, 20, 20, filters)
        h1 = ops.sigmoid(z1)
        h1_cols = h1.reshape(n, -1).T  # the slides' H1: (features, 100)
        o = ops.sigmoid(w.T @ h1_cols + b)  # (1, 100)
        delta = (o - y_true.T) * o * (1 - o)  # (1, 100)
        dh1 = (w @ delta).T.reshape(h1.shape)  # (100, 20, 20, filters)
        _, df, _ = ops.conv2d_backward(ops.sigmoid_backward(dh1, h1), x, f)
        return {
            "X": x[..., 0],
            "f": f,
            "Z1": z1,
            "H1": h1_cols,
            "WT": w.T,
            "O": o,
            "delta": delta,
            "per_example": h1_cols * delta,
            "dW": h1_cols @ delta.T,
            "db": delta.sum(axis=1),
            "dH1": dh1,
            "df": df,
        }

    table = []
    for filters in (1, 3):
        f = jnp.asarray(0.3 * rng.standard_normal((3, 3, 1, filters)))
        w = jnp.asarray(0.05 * rng.standard_normal((20 * 20 * filters, 1)))
        b = jnp.zeros((1,), jnp.float64)
        q = matrix_form(f, w, b)
        auto_f, auto_w, auto_b = jax.jit(jax.grad(loss_fn, argnums=(0, 1, 2)))(f, w, b)
        r.check(sec, f"{filters} filter(s): dE/dW = H1 · δᵀ vs jax.grad", auto_w, q["dW"], tol=1e-12)
        r.check(
            sec,
            f"{filters} filter(s): per-example products summed over the batch = dE/dW",
            q["dW"][:, 0],
            q["per_example"].sum(axis=1),
            tol=1e-12,
        )
        r.check(sec, f"{filters} filter(s): dE/db = Σ δ vs jax.grad", auto_b, q["db"], tol=1e-12)
        r.check(sec, f"{filters} filter(s): dE/df = conv(X, δ1) vs jax.grad", auto_f, q["df"], tol=1e-12)
        squeeze = {
            "f": (2,),
            "Z1": (3,),
            "dH1": (3,),
            "df": (2,),
        }  # drop the size-1 channel axes the slides do not write
        for name, label in ROWS_000:
            a = np.asarray(q[name])
            if name in squeeze:
                a = a.squeeze(axis=tuple(ax for ax in squeeze[name] if a.shape[ax] == 1))
                if filters == 1 and name in ("f", "df"):
                    a = a[..., 0]
            if name in ("f", "df") and filters > 1:
                a = np.moveaxis(a, -1, 0)  # filters first, as the slides write a filter bank
            table.append([filters, label, SLIDES_000[filters][name] or "—", "x".join(str(d) for d in a.shape)])
    r.text(
        "On random data of the slides' sizes (100 images 22x22, 3x3 filters, sigmoid, dense 1, sigmoid, "
        "`E = ½ Σ (O − Y)²`), each quantity as the slides write its shape (— where they do not) and as computed. "
        "The two slides are the one-filter and the three-filter versions; every gradient agrees with `jax.grad` "
        "to 1e-12:\n"
    )
    r.text(common.markdown_table(["filters", "quantity", "slides", "computed"], table, "rlll"))
    r.slip(
        sec,
        "dE/dW shape with 3 filters",
        [1200, 100],
        [1200, 1],
        "[1200 × 100] * [1 × 100] = [1200 × 100] is the matrix of per-example gradients; summed over the batch, "
        "dE/dW = H1 · δᵀ = [1200 × 100] · [100 × 1] = [1200 × 1], the shape of W",
    )
    r.slip(
        sec,
        "filter bank shape",
        [5, 3, 3],
        [3, 3, 3],
        "f = [5 × 3 × 3] but H1 = [100x20x20x3] has 3 channels: 3 filters of 3x3",
    )
    r.text(
        "\n**Slips (000):** with 3 filters the slides give `dE/dW = [1200 × 100] * [1 × 100] = [1200 × 100]`, which "
        "is each example's gradient side by side; `W` is `1200 × 1`, and the gradient of a loss summed over the "
        "batch is `H1 · δᵀ = [1200 × 100] · [100 × 1] = [1200 × 1]` (checked above: the per-example columns sum to "
        "it). The filter bank is written `[5 × 3 × 3]` although `H1 = [100x20x20x3]` has 3 channels: 3 filters "
        "of 3x3. Smaller: the three-filter slide writes `Wᵀ = [1200 × 1]` (the shape of `W`) and "
        "`Z2 * Wᵀ H1 + b` for `Z2 = Wᵀ H1 + b`; the three-filter slide keeps `Z1 = [100x20x20]`, "
        "the size of each filter's map.\n"
    )


def _maxpool_figure(plt, out: Path, p, dc, as_written, winners, log) -> None:
    panels = [
        ("C (4x4), windows and winners", C_001),
        ("dE/dP (upstream)", D_POOLED_001),
        ("dE/dC, routed (local gradient 1)", dc),
        ("dE/dC as the slides write it\n(C · dE/dP: slip)", as_written),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
    for ax, (title, a) in zip(axes, panels, strict=True):
        vmax = max(a.max(), 1) * 1.6
        ax.imshow(a, cmap="Blues", vmin=min(0, a.min()), vmax=vmax)
        for (i, j), v in np.ndenumerate(a):
            bold = a.shape == (4, 4) and (i, j) in winners
            dark = v > 0.55 * vmax
            color = "white" if dark else ("black" if (bold or a.shape == (2, 2)) else "0.35")
            ax.text(
                j,
                i,
                _num(v),
                ha="center",
                va="center",
                fontsize=12,
                fontweight="bold" if bold else "normal",
                color=color,
            )
        ax.set_xticks(range(a.shape[1]))
        ax.set_yticks(range(a.shape[0]))
        ax.set_xlabel("column")
        ax.set_ylabel("row")
        ax.set_title(title, fontsize=10)
        ax.grid(False)
        if a.shape == (4, 4):
            for k in (1.5,):
                ax.axhline(k, color="k", lw=1.5)
                ax.axvline(k, color="k", lw=1.5)
            for i, j in winners:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="#d62728", lw=2))
    fig.suptitle("Seed 001: 2x2 max-pool backward routes each dE/dP entry to its window's maximum (red boxes)", y=1.02)
    fig.tight_layout()
    common.save_figure(fig, out / f"{NAME}_maxpool.png", log)


# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0  # only for the CLI's uniformity; every example here is fixed


def run(out_dir, *, smoke: bool = False, command: str | None = None, log=None, **overrides) -> dict:
    """Computes every worked example, writes the report and returns the summary (``summary['failed']``)."""
    config = Config(**overrides)
    log = log or common.logger(NAME)
    out = common.out_dir(out_dir)
    env = common.environment(command or "worked_examples.run()")
    plt = common.pyplot(log)
    r = Report(log)
    r.text("# The tutorials' worked examples, computed\n")
    r.text(
        f"Every number below is computed by `jaxcnn` in float64 and checked against what the tutorial writes "
        f"(✓ = equal). Command: `{env['command']}` ({env['date_utc']}, jax {env['jax']}). Slips in the tutorials "
        "are marked **Slip**, with the formula as written and mended.\n"
    )
    with jax.enable_x64(True):
        for name, section in (
            ("seed 003 forward", lambda: seed_003_forward(r)),
            ("seed 002 backward", lambda: seed_002_backward(r)),
            ("seed 001 max-pool routing", lambda: seed_001_pooling(r, plt, out)),
            ("seed 001 filter gradient", lambda: seed_001_filter_gradient(r)),
            (
                "seed 004 output size and im2col",
                lambda: seed_004_output_size(r, out, (7, 28) if smoke else (5, 6, 7, 28)),
            ),
            ("seed 000 matrix-form shapes", lambda: seed_000_shapes(r)),
        ):
            before = len(r.checks)
            section()
            checks = r.checks[before:]
            failed = [c for c in checks if not c["ok"]]
            slips = [c for c in checks if "slip" in c]
            log(
                f"{name}: {len(checks) - len(slips) - len(failed)}/{len(checks) - len(slips)} checks pass"
                + (f", {len(slips)} slip(s) in the tutorial shown" if slips else "")
            )
    failed = [c for c in r.checks if not c["ok"]]
    n_checks = sum(1 for c in r.checks if "slip" not in c)
    r.text(
        f"## Summary\n\n{n_checks - len(failed)} of {n_checks} checks pass; "
        f"{sum(1 for c in r.checks if 'slip' in c)} slips in the tutorials are shown with their mended forms.\n"
    )
    (out / f"{NAME}.md").write_text("\n".join(r.parts))
    summary = {
        "experiment": NAME,
        "environment": env,
        "config": dataclasses.asdict(config),
        "n_checks": n_checks,
        "failed": [f"[{c['section']}] {c['check']}" for c in failed],
        "checks": r.checks,
    }
    common.write_json(out / f"{NAME}.json", summary)
    log(f"{n_checks - len(failed)}/{n_checks} checks pass; wrote {NAME}.md, {NAME}.json, output_size.csv")
    return summary


def main(argv=None) -> int:
    args = common.base_parser(NAME, __doc__.splitlines()[0]).parse_args(argv)
    summary = run(args.out, smoke=args.smoke, command=common.command_line(NAME, argv))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
