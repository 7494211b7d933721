"""The checker itself: it passes correct backward passes, fails (GradCheckError) on subtly wrong ones,
and its table names the arrays. Also: no hand-written backward uses JAX's own differentiation."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from _opcases import normal, record_gradcheck

import jax
import jax.numpy as jnp
from jax import lax

import jaxcnn.ops
from jaxcnn import ops
from jaxcnn.gradcheck import TOLERANCES, GradCheckError, gradcheck, worst_errors
from jaxcnn.ops import conv as conv_module
from jaxcnn.ops._windows import transpose_padding
from jaxcnn.ops.conv import conv2d_geometry

# One geometry for every check in this file: stride 2 with overlapping 3x3 windows, padding 1.
HYPER = dict(stride=2, padding=1)
DN = ("NHWC", "HWIO", "NHWC")


def _inputs(dtype=np.float64):
    rng = np.random.default_rng(0)
    return normal(rng, (2, 7, 7, 3), dtype), normal(rng, (3, 3, 3, 4), dtype), normal(rng, (4,), dtype)


def conv_f(x, w, b):
    return ops.conv2d(x, w, b, **HYPER)


def conv_bwd(dy, x, w, b):
    return ops.conv2d_backward(dy, x, w, **HYPER)


def _geom(x, w):
    return conv2d_geometry("test", x.shape, w.shape, stride=2, padding=1, dilation=1, groups=1)


def _input_grad(dy, w, geom, *, flip=True, lhs_dilation=None, pads=None):
    """The stride-dilated full correlation of dy with the (optionally unflipped) kernel, in/out swapped."""
    w_t = (jnp.flip(w, (0, 1)) if flip else w).transpose(0, 1, 3, 2)
    return lax.conv_general_dilated(
        dy,
        w_t,
        (1, 1),
        pads or transpose_padding(geom),
        lhs_dilation=geom.stride if lhs_dilation is None else lhs_dilation,
        dimension_numbers=DN,
    )


def bwd_dw_scaled(dy, x, w, b):
    dx, dw, db = conv_bwd(dy, x, w, b)
    return dx, dw * 1.001, db


def bwd_kernel_not_rotated(dy, x, w, b):
    _, dw, db = conv_bwd(dy, x, w, b)
    return _input_grad(dy, w, _geom(x, w), flip=False), dw, db


def bwd_dw_transposed(dy, x, w, b):
    dx, dw, db = conv_bwd(dy, x, w, b)
    return dx, dw.transpose(1, 0, 2, 3), db  # kh <-> kw of a square kernel: same shape, wrong layout


def bwd_no_stride_dilation(dy, x, w, b):
    """dx without the zeros between the entries of dy: the output comes out 4 x 4 instead of 7 x 7."""
    _, dw, db = conv_bwd(dy, x, w, b)
    return _input_grad(dy, w, _geom(x, w), lhs_dilation=(1, 1)), dw, db


def bwd_no_stride_dilation_padded(dy, x, w, b):
    """The same mistake, padded so that the shape is right: only the values are wrong."""
    _, dw, db = conv_bwd(dy, x, w, b)
    return _input_grad(dy, w, _geom(x, w), lhs_dilation=(1, 1), pads=((2, 3), (2, 3))), dw, db


def bwd_db_missing(dy, x, w, b):
    dx, dw, _ = conv_bwd(dy, x, w, b)
    return dx, dw, jnp.zeros_like(b)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_passes_a_correct_backward_and_names_the_arrays(dtype):
    result = gradcheck(conv_f, conv_bwd, _inputs(dtype), names=("x", "w", "b"), name="conv2d")
    record_gradcheck("conv2d[conv]", result)
    assert result.ok and result.failures == [] and result.dtype == np.dtype(dtype).name
    assert [r.name for r in result.rows] == ["x", "w", "b"]
    assert [r.shape for r in result.rows] == [(2, 7, 7, 3), (3, 3, 3, 4), (4,)]
    table = result.table()
    assert table.splitlines()[0] == f"gradcheck conv2d [{np.dtype(dtype).name}]"
    for label in ("x ", "w ", "b "):
        assert any(line.startswith(label) for line in table.splitlines())
    assert table.splitlines()[-1] == "OK"
    tol = TOLERANCES[np.dtype(dtype).name]
    worst = result.worst
    assert (
        worst.autodiff <= tol.autodiff
        and worst.finite_difference <= tol.finite_difference
        and worst.adjoint <= tol.adjoint
    )
    assert worst_errors([result]) == worst


def test_default_names_and_pytree_arguments():
    x, w, b = _inputs()

    def f(x, params):
        return ops.conv2d(x, params["w"], params["b"], **HYPER)

    def bwd(dy, x, params):
        dx, dw, db = ops.conv2d_backward(dy, x, params["w"], **HYPER)
        return dx, {"b": db, "w": dw}

    result = gradcheck(f, bwd, (x, {"w": w, "b": b}))
    assert [r.name for r in result.rows] == ["arg0", "arg1['b']", "arg1['w']"]


WRONG = {
    "dw scaled by 1.001": (bwd_dw_scaled, ["w"]),
    "kernel not rotated in dx": (bwd_kernel_not_rotated, ["x"]),
    "dw with kh and kw transposed": (bwd_dw_transposed, ["w"]),
    "dx without stride dilation (shape padded)": (bwd_no_stride_dilation_padded, ["x"]),
    "db missing": (bwd_db_missing, ["b"]),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", list(WRONG))
def test_fails_on_a_wrong_backward(case, dtype):
    bwd, bad = WRONG[case]
    with pytest.raises(GradCheckError) as info:
        gradcheck(conv_f, bwd, _inputs(dtype), names=("x", "w", "b"), name=f"conv2d ({case})")
    result = info.value.result
    assert not result.ok
    failing = sorted({f.split(":")[0] for f in result.failures if not f.startswith("adjoint")})
    assert failing == bad, result.table()
    # Each wrong array fails both witnesses, autodiff and finite differences.
    row = next(r for r in result.rows if r.name == bad[0])
    tol = TOLERANCES[np.dtype(dtype).name]
    assert row.vs_autodiff > tol.autodiff and row.vs_finite_difference > tol.finite_difference
    message = str(info.value)
    assert isinstance(info.value, AssertionError) and "FAILED" in message and f"{bad[0]}: manual vs autodiff" in message


def test_fails_on_a_wrongly_shaped_cotangent():
    # The stride-dilation mistake left unpadded: dx comes back (2, 4, 4, 3) for x (2, 7, 7, 3).
    x, w, b = _inputs()
    assert bwd_no_stride_dilation(jnp.ones((2, 4, 4, 4)), x, w, b)[0].shape == (2, 4, 4, 3)
    with pytest.raises(
        GradCheckError, match=r"x: backward returned shape \(2, 4, 4, 3\) but the argument has shape \(2, 7, 7, 3\)"
    ):
        gradcheck(conv_f, bwd_no_stride_dilation, (x, w, b), names=("x", "w", "b"), name="conv2d")


def test_fails_on_a_small_error_in_float32():
    # 1e-4 relative: well above float32 rounding, so the float32 tolerance (1e-5) must catch it.
    x, w, b = _inputs(np.float32)

    def bwd(dy, x, w, b):
        dx, dw, db = conv_bwd(dy, x, w, b)
        return dx * (1 + 1e-4), dw, db

    with pytest.raises(GradCheckError, match=r"x: manual vs autodiff"):
        gradcheck(conv_f, bwd, (x, w, b), names=("x", "w", "b"))


def test_raise_on_failure_false_returns_the_failures():
    result = gradcheck(conv_f, bwd_dw_scaled, _inputs(), names=("x", "w", "b"), raise_on_failure=False)
    assert not result.ok
    assert any(f.startswith("w: manual vs autodiff") for f in result.failures)
    assert any(f.startswith("w: manual vs finite differences") for f in result.failures)
    assert result.table().splitlines()[-1].startswith("FAILED: ")


def test_non_differentiated_integer_argument():
    rng = np.random.default_rng(1)
    z, labels = normal(rng, (3, 4)), np.array([0, 3, 1])
    result = gradcheck(
        ops.softmax_cross_entropy,
        lambda dl, z, y: (ops.softmax_cross_entropy_backward(dl, z, y),),
        (z, labels),
        argnums=(0,),
        names=("logits",),
        name="softmax_cross_entropy",
    )
    assert [r.name for r in result.rows] == ["logits"]
    with pytest.raises(GradCheckError, match=r"logits: manual vs autodiff"):
        gradcheck(
            ops.softmax_cross_entropy,
            lambda dl, z, y: (2 * ops.softmax_cross_entropy_backward(dl, z, y),),
            (z, labels),
            argnums=(0,),
            names=("logits",),
        )


def test_rejects_bad_arguments():
    x, w, b = _inputs()
    with pytest.raises(TypeError, match=r"gradcheck f: differentiated arguments must all be float32 or all float64"):
        gradcheck(conv_f, conv_bwd, (x.astype(np.float32), w, b))
    with pytest.raises(ValueError, match=r"gradcheck: 2 names for 3 differentiated arguments"):
        gradcheck(conv_f, conv_bwd, (x, w, b), names=("x", "w"))
    with pytest.raises(ValueError, match=r"backward returned 2 cotangents for 3 arguments"):
        gradcheck(conv_f, lambda dy, x, w, b: conv_bwd(dy, x, w, b)[:2], (x, w, b))


# ----------------------------------------------------------------------------------------------
# The backward passes are hand-written: no JAX differentiation anywhere in jaxcnn/ops
# ----------------------------------------------------------------------------------------------

FORBIDDEN = {
    "grad",
    "vjp",
    "jvp",
    "linear_transpose",
    "value_and_grad",
    "jacrev",
    "jacfwd",
    "hessian",
    "custom_vjp",
    "custom_jvp",
    "linearize",
    "transpose",
}


def test_ops_sources_use_no_autodiff():
    """Scans the code (not the docstrings) of every module under jaxcnn/ops for differentiation APIs."""
    offenders = []
    for path in sorted(Path(jaxcnn.ops.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in FORBIDDEN - {"transpose"}:
                offenders.append(f"{path.name}:{node.lineno} .{node.attr}")
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jax"):
                offenders += [f"{path.name}:{node.lineno} import {a.name}" for a in node.names if a.name in FORBIDDEN]
            elif (
                isinstance(node, ast.Attribute)
                and node.attr == "transpose"
                and isinstance(node.value, ast.Name)
                and node.value.id in {"jax", "lax"}
            ):
                offenders.append(f"{path.name}:{node.lineno} {node.value.id}.transpose")
    assert offenders == []


# conv2d_backward runs every formulation on three kernels (x (1, 5, 4, C), w (2, 2, C, O), stride 1) chosen
# so that "auto" and "taps" take every code path of the input gradient: (C, O) = (1, 3): "auto" takes "taps",
# which uses broadcast multiply-adds (at most TAPS_ELEMENTWISE_MAX outputs); (6, 8): "auto" takes "im2col"
# (at most INPUT_GRAD_FEW_CHANNELS_MAX inputs), "taps" a matrix product; (10, 6): "auto" takes "conv". Its
# kernel gradient is "conv" for every shape.
CONV_CHANNELS = ((1, 3), (6, 8), (10, 6))


def test_auto_resolves_to_every_input_grad_formulation_for_the_shapes_run_below():
    picked = [
        (
            conv_module.resolve_method("input_grad", (2, 2, c, o)),
            conv_module.resolve_method("kernel_grad", (2, 2, c, o)),
        )
        for c, o in CONV_CHANNELS
    ]
    assert picked == [("taps", "conv"), ("im2col", "conv"), ("conv", "conv")]
    # "taps" contracts the input gradient over O output channels: multiply-adds for (2, 3), a product for (6, 8).
    assert CONV_CHANNELS[0][1] <= conv_module.TAPS_ELEMENTWISE_MAX < CONV_CHANNELS[1][1]


def test_backwards_run_with_jax_differentiation_disabled(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a hand-written backward called JAX's differentiation")

    for name in ("grad", "vjp", "jvp", "linear_transpose", "value_and_grad", "jacrev", "jacfwd", "linearize"):
        monkeypatch.setattr(jax, name, forbidden)
    rng = np.random.default_rng(2)

    @jax.jit  # tracing runs every line of Python in the backward passes; one compile for all of them
    def all_backwards(convs, x, dy_pool, z, labels):
        out = [
            ops.conv2d_backward(dy_conv, x_conv, w, method=m)
            for x_conv, w, dy_conv in convs
            for m in conv_module.METHODS
        ]
        out += [ops.max_pool2d_backward(dy_pool, x), ops.avg_pool2d_backward(dy_pool, x, count_include_pad=False)]
        out.append(ops.dense_backward(z[:, :3], z, z.T))
        out += [
            bwd(z, z)
            for bwd in (
                ops.sigmoid_backward,
                ops.tanh_backward,
                ops.relu_backward,
                ops.leaky_relu_backward,
                ops.softmax_backward,
                ops.log_softmax_backward,
            )
        ]
        out += [
            ops.mse_backward(1.0, z, z),
            ops.binary_cross_entropy_with_logits_backward(1.0, z, z),
            ops.softmax_cross_entropy_backward(1.0, z, labels),
        ]
        return out

    convs = [
        (normal(rng, (1, 5, 4, c)), normal(rng, (2, 2, c, o)), normal(rng, (1, 4, 3, o))) for c, o in CONV_CHANNELS
    ]
    out = all_backwards(
        convs, normal(rng, (1, 5, 4, 2)), normal(rng, (1, 2, 2, 2)), normal(rng, (3, 4)), np.array([0, 1, 2])
    )
    assert len(out) == len(CONV_CHANNELS) * len(conv_module.METHODS) + 12
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree_util.tree_leaves(out))
