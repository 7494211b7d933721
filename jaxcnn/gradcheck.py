"""Three-way gradient checker: hand-written backward vs ``jax.vjp`` vs central finite differences.

For a function ``f(*primals)`` and its hand-written ``backward(dy, *primals)``, :func:`gradcheck` draws
a random cotangent ``dy`` and compares, for every array (pytree leaf) of every differentiated argument:

* **manual vs autodiff**: ``backward(dy, ...)`` against ``jax.vjp(f, ...)(dy)``, in the primals' dtype.
* **manual vs finite differences**, in float64: for directions ``v`` (every unit vector of a small
  array, random ones for a large array), ``<manual, v>`` against the central difference
  ``(L(p + h v) - L(p - h v)) / 2h`` of ``L(p) = <dy, f(p)>``.
* **adjoint identity**: ``<backward(dy), v> = <dy, J v>`` with ``J v`` from forward-mode ``jax.jvp``,
  a witness independent of both reverse-mode paths.

Errors are relative to the reference's scale: ``max|manual - ref| / max|ref|`` for arrays and
``|<g, v> - <dy, J v>| / max(|g| |v|, |dy| |J v|)`` for the adjoint identity (the Cauchy-Schwarz bound
of its terms, so that cancellation in the sums does not inflate it). Finite differences are only
meaningful where ``f`` is smooth: check activations and max pooling on inputs away from kinks and ties.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

import jax
import jax.numpy as jnp


class Tolerance(NamedTuple):
    """The largest accepted relative difference of each comparison a gradient check makes."""

    autodiff: float  # manual vs jax.vjp, in the primals' dtype
    finite_difference: float  # manual vs central differences, in float64
    adjoint: float  # <backward(dy), v> vs <dy, J v>, in the primals' dtype


# The tolerances of each dtype: float64 checks every formula tightly; float32 allows its rounding.
TOLERANCES = {
    "float64": Tolerance(autodiff=1e-12, finite_difference=1e-6, adjoint=1e-12),
    "float32": Tolerance(autodiff=1e-5, finite_difference=1e-6, adjoint=1e-5),
}


class GradCheckRow(NamedTuple):
    """One compared array (a parameter or the input gradient) of a gradient check, with its differences."""

    name: str
    shape: tuple
    max_abs: float  # max |manual - autodiff|
    vs_autodiff: float  # relative
    vs_finite_difference: float  # relative, float64
    autodiff_vs_finite_difference: float  # relative, float64 (sanity of the witness itself)
    fd_directions: int  # directions compared with finite differences
    fd_skipped: int  # directions skipped because a kink lay within the step (``skip_kinks``)


class GradCheckResult(NamedTuple):
    """A gradient check of one layer or model: its rows, the adjoint identity and whether all passed."""

    name: str
    dtype: str
    rows: tuple[GradCheckRow, ...]
    adjoint: float
    tolerance: Tolerance

    @property
    def failures(self) -> list[str]:
        """Human-readable reasons this check fails; empty when it passes."""
        tol, out = self.tolerance, []
        for r in self.rows:
            if not r.vs_autodiff <= tol.autodiff:
                out.append(f"{r.name}: manual vs autodiff {r.vs_autodiff:.2e} > {tol.autodiff:.0e}")
            if not r.vs_finite_difference <= tol.finite_difference:
                out.append(
                    f"{r.name}: manual vs finite differences {r.vs_finite_difference:.2e} > {tol.finite_difference:.0e}"
                )
        if not self.adjoint <= tol.adjoint:
            out.append(f"adjoint identity {self.adjoint:.2e} > {tol.adjoint:.0e}")
        return out

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def worst(self) -> Tolerance:
        """The largest error of each kind over all rows (same fields as the tolerance)."""
        return Tolerance(
            max((r.vs_autodiff for r in self.rows), default=0.0),
            max((r.vs_finite_difference for r in self.rows), default=0.0),
            self.adjoint,
        )

    def table(self) -> str:
        """A fixed-width table, one row per checked array, then the adjoint identity and the verdict."""
        head = (
            f"{'array':<28} {'shape':<18} {'max abs':>9} {'vs autodiff':>12} {'vs FD (f64)':>12} "
            f"{'AD vs FD':>9} {'FD dirs':>8}"
        )
        lines = [f"gradcheck {self.name} [{self.dtype}]", head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r.name:<28} {r.shape!s:<18} {r.max_abs:>9.1e} {r.vs_autodiff:>12.1e} "
                f"{r.vs_finite_difference:>12.1e} {r.autodiff_vs_finite_difference:>9.1e} "
                f"{r.fd_directions:>4}" + (f"-{r.fd_skipped}k" if r.fd_skipped else "")
            )
        t = self.tolerance
        lines.append(f"adjoint identity <backward(dy), v> vs <dy, J v>: {self.adjoint:.1e}")
        lines.append(
            f"tolerances: autodiff {t.autodiff:.0e}, finite differences {t.finite_difference:.0e}, "
            f"adjoint {t.adjoint:.0e}"
        )
        lines.append("OK" if self.ok else "FAILED: " + "; ".join(self.failures))
        return "\n".join(lines)


class GradCheckError(AssertionError):
    """Raised by :func:`gradcheck` when a tolerance is exceeded; the message is the full table."""

    def __init__(self, result: GradCheckResult, detail: str = ""):
        super().__init__(result.table() + (f"\n{detail}" if detail else ""))
        self.result = result


def _rel(a, b) -> float:
    """``max|a - b| / max|b|`` (0 when both vanish), computed in float64 NumPy."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.max(np.abs(b), initial=0.0)
    err = np.max(np.abs(a - b), initial=0.0)
    return float(err / scale) if scale > 0 else float(err)


def _vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


def _adjoint_error(manual, v, dy, jv) -> float:
    """``|<manual, v> - <dy, J v>|`` relative to the Cauchy-Schwarz bound ``max(|manual||v|, |dy||J v|)``.

    Both inner products are sums of many terms that may cancel; dividing by the size of the terms, not
    by the (possibly tiny) sums, measures the disagreement on the scale rounding acts on. Summed in float64.
    """

    def flat(tree):
        return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(tree)])

    m, v, dy, jv = flat(manual), flat(v), flat(dy), flat(jv)
    scale = max(np.linalg.norm(m) * np.linalg.norm(v), np.linalg.norm(dy) * np.linalg.norm(jv))
    return float(abs(m @ v - dy @ jv) / scale) if scale > 0 else 0.0


def _random_like(seed: int | tuple[int, ...], tree):
    """Standard normal arrays shaped like ``tree``'s leaves, drawn with NumPy (no compilation per shape)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(rng.standard_normal(jnp.shape(x)), jnp.result_type(x)) for x in leaves]
    )


def _leaf_names(tree, prefix: str) -> list[str]:
    return [prefix + jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _directions(rng: np.random.Generator, size: int, max_coordinates: int, random_directions: int):
    """Unit vectors for every coordinate of a small array; sampled coordinates plus random directions otherwise."""
    if size <= max_coordinates:
        return [np.eye(1, size, i)[0] for i in range(size)]
    picks = rng.choice(size, max_coordinates // 2, replace=False)
    return [np.eye(1, size, i)[0] for i in picks] + [rng.standard_normal(size) for _ in range(random_directions)]


def gradcheck(
    f: Callable,
    backward: Callable,
    primals: Sequence,
    *,
    argnums: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
    name: str = "f",
    seed: int = 0,
    step: float = 1e-5,
    max_coordinates: int = 24,
    random_directions: int = 6,
    tolerance: Tolerance | None = None,
    skip_kinks: bool = False,
    raise_on_failure: bool = True,
) -> GradCheckResult:
    """Checks a hand-written backward three ways and returns (or raises with) the table of errors.

    Args:
      f: ``f(*primals) -> y``, any pytree of float arrays.
      backward: ``backward(dy, *primals) -> cotangents``, a tuple with one entry per differentiated
        argument (``argnums``), each shaped like that argument (pytrees allowed).
      primals: the arguments, all of one floating dtype (float32 or float64) for the differentiated ones.
        Non-differentiated arguments (e.g. integer labels) are passed through unchanged.
      argnums: which arguments ``backward`` differentiates; default all.
      names: display names of the differentiated arguments; default ``arg0, arg1, ...``.
      name: display name of the function in the table.
      seed: seeds the cotangent, the adjoint direction and the finite-difference directions.
      step: central-difference step ``h`` (float64).
      max_coordinates: arrays up to this size are probed along every coordinate; larger ones along
        ``max_coordinates // 2`` sampled coordinates plus ``random_directions`` random directions.
      tolerance: overrides :data:`TOLERANCES` for the primals' dtype.
      skip_kinks: for functions with kinks (ReLU, max pooling) at points where a step may cross one:
        also take the central difference with step ``h / 4``; a direction whose two estimates differ
        by more than the finite-difference tolerance is not smooth within the step and is skipped
        (counted as ``k`` in the table's ``FD dirs``). An array whose every direction is skipped fails.
      raise_on_failure: raise :class:`GradCheckError` (an ``AssertionError``) when a tolerance is exceeded.

    Returns:
      A :class:`GradCheckResult`; ``result.table()`` formats it.

    The finite-difference error of a direction ``v`` is ``|<g, v> - fd| / max(|fd|, 1e-3 |g| |v|)``:
    relative, with a floor at a thousandth of the array's gradient norm so that a component that is
    zero up to rounding is not divided by zero.

    Examples:
      The dense layer's backward, every coordinate of its three small arrays probed:

      >>> import jax.numpy as jnp
      >>> from jaxcnn import ops
      >>> from jaxcnn.gradcheck import gradcheck
      >>> x = jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32).reshape(2, 3)
      >>> w = jnp.linspace(0.5, -0.5, 12, dtype=jnp.float32).reshape(3, 4)
      >>> b = jnp.zeros((4,), jnp.float32)
      >>> def backward(dy, x, w, b):
      ...     return ops.dense_backward(dy, x, w)  # (dx, dw, db)
      >>> result = gradcheck(ops.dense, backward, (x, w, b), names=("x", "w", "b"), name="dense")
      >>> result.ok, result.dtype
      (True, 'float32')
      >>> [(row.name, row.shape, row.fd_directions) for row in result.rows]
      [('x', (2, 3), 6), ('w', (3, 4), 12), ('b', (4,), 4)]
    """
    primals = tuple(primals)
    argnums = tuple(range(len(primals))) if argnums is None else tuple(argnums)
    names = tuple(names) if names is not None else tuple(f"arg{i}" for i in argnums)
    if len(names) != len(argnums):
        raise ValueError(f"gradcheck: {len(names)} names for {len(argnums)} differentiated arguments")
    dtypes = {jnp.result_type(leaf).name for i in argnums for leaf in jax.tree_util.tree_leaves(primals[i])}
    if len(dtypes) != 1 or next(iter(dtypes)) not in TOLERANCES:
        raise TypeError(
            f"gradcheck {name}: differentiated arguments must all be float32 or all float64, got {sorted(dtypes)}"
        )
    dtype = dtypes.pop()
    tol = tolerance or TOLERANCES[dtype]
    seed_dy, seed_v = (seed, 0), (seed, 1)
    rng = np.random.default_rng(seed)

    def with_args(diff_args, base=primals):
        args = list(base)
        for i, a in zip(argnums, diff_args, strict=True):
            args[i] = a
        return tuple(args)

    def check_shapes(diff, manual, auto):
        """A cotangent not shaped like its argument fails the check (instead of broadcasting or crashing later)."""
        labels = [n for d, arg_name in zip(diff, names, strict=True) for n in _leaf_names(d, arg_name)]
        m_leaves, a_leaves = jax.tree_util.tree_leaves(manual), jax.tree_util.tree_leaves(auto)
        wrong = [
            (label, tuple(np.shape(m)), tuple(np.shape(a)))
            # Compares the arrays both have; a different number of arrays is reported below.
            for label, m, a in zip(labels, m_leaves, a_leaves, strict=False)
            if np.shape(m) != np.shape(a)
        ]
        if not wrong and len(m_leaves) == len(a_leaves):
            return
        rows = tuple(GradCheckRow(label, m_shape, *(math.inf,) * 4, 0, 0) for label, m_shape, _ in wrong)
        detail = "; ".join(
            f"{label}: backward returned shape {m} but the argument has shape {a}" for label, m, a in wrong
        )
        if len(m_leaves) != len(a_leaves):
            detail = f"backward returned {len(m_leaves)} arrays for {len(a_leaves)} differentiated arrays. " + detail
        raise GradCheckError(GradCheckResult(name, dtype, rows, math.inf, tol), detail)

    def run_in_dtype(prims):
        # Op by op rather than one jit: eager primitives are compiled once per shape and reused by every
        # later check, which makes a suite of many small checks much faster than one compile per check.
        def g(*diff):
            return f(*with_args(diff, prims))

        diff = tuple(prims[i] for i in argnums)
        y, vjp = jax.vjp(g, *diff)
        dy = _random_like(seed_dy, y)
        manual = tuple(backward(dy, *prims))
        if len(manual) != len(argnums):
            raise ValueError(
                f"gradcheck {name}: backward returned {len(manual)} cotangents for {len(argnums)} arguments"
            )
        auto = vjp(dy)
        check_shapes(diff, manual, auto)
        v = _random_like(seed_v, diff)
        _, jv = jax.jvp(g, diff, v)
        adjoint = _adjoint_error(manual, v, dy, jv)
        return diff, dy, manual, auto, adjoint

    with jax.enable_x64(dtype == "float64"):
        diff, _, manual, auto, adjoint = run_in_dtype(primals)
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(
            lambda a: a.astype(jnp.float64) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a, primals
        )
        diff64, dy64, manual64, auto64, _ = run_in_dtype(p64)
        loss = jax.jit(lambda *d: _vdot(dy64, f(*with_args(d, p64))))
        flat64, treedef = jax.tree_util.tree_flatten(diff64)
        m_flat = [np.asarray(x) for x in jax.tree_util.tree_leaves(manual64)]
        a_flat = [np.asarray(x) for x in jax.tree_util.tree_leaves(auto64)]

        def central(k, v, h):
            """``(L(p + h v) - L(p - h v)) / 2h`` with ``v`` a direction of the ``k``-th array."""

            def shifted(sign):
                leaves = list(flat64)
                leaves[k] = flat64[k] + sign * h * v
                return float(loss(*jax.tree_util.tree_unflatten(treedef, leaves)))

            return (shifted(1.0) - shifted(-1.0)) / (2 * h)

        fd_stats = []
        for k, leaf in enumerate(flat64):
            worst_m = worst_a = 0.0
            directions = _directions(rng, leaf.size, max_coordinates, random_directions)
            skipped = 0
            for d in directions:
                v = jnp.asarray(d.reshape(leaf.shape))
                fd = central(k, v, step)
                scale = max(abs(fd), float(np.sqrt(np.sum(m_flat[k] ** 2) * np.sum(d**2))) * 1e-3, 1e-300)
                if skip_kinks and abs(central(k, v, step / 4) - fd) / scale > tol.finite_difference:
                    skipped += 1  # f is not smooth on [p - h v, p + h v]: a kink lies within the step
                    continue
                worst_m = max(worst_m, abs(float(np.vdot(m_flat[k], d)) - fd) / scale)
                worst_a = max(worst_a, abs(float(np.vdot(a_flat[k], d)) - fd) / scale)
            if skipped == len(directions):
                worst_m = worst_a = math.inf  # nothing was checked: report it as a failure
            fd_stats.append((worst_m, worst_a, len(directions) - skipped, skipped))

    labels = [n for i, arg_name in zip(range(len(diff)), names, strict=True) for n in _leaf_names(diff[i], arg_name)]
    rows = tuple(
        GradCheckRow(
            label,
            tuple(np.shape(m)),
            float(np.max(np.abs(np.asarray(m, np.float64) - np.asarray(a, np.float64)), initial=0.0)),
            _rel(m, a),
            *stats,
        )
        for label, m, a, stats in zip(
            labels, jax.tree_util.tree_leaves(manual), jax.tree_util.tree_leaves(auto), fd_stats, strict=True
        )
    )
    result = GradCheckResult(name, dtype, rows, adjoint, tol)
    if raise_on_failure and not result.ok:
        raise GradCheckError(result)
    return result


def worst_errors(results: Sequence[GradCheckResult]) -> Tolerance:
    """The largest error of each kind across several results."""
    worst = [r.worst for r in results]
    return (
        Tolerance(*(max((w[i] for w in worst), default=0.0) for i in range(3))) if worst else Tolerance(0.0, 0.0, 0.0)
    )


__all__ = ["TOLERANCES", "GradCheckError", "GradCheckResult", "GradCheckRow", "Tolerance", "gradcheck", "worst_errors"]
