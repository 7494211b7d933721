"""The model zoo: architecture (shapes, parameter counts), the three gradient routes of every model agree
(float64), and the layer-by-layer three-way check of :func:`jaxcnn.modelcheck.check_model`."""

from __future__ import annotations

import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxcnn import data as jdata
from jaxcnn import gradients, models
from jaxcnn.modelcheck import check_model
from jaxcnn.models import INPUT_SHAPE, MODELS, get_model

ZOO = ("seed_net", "lenet5", "small_cnn", "resnet_small")
# Parameter counts worked out by hand from the architectures in the docstrings.
PARAMETER_COUNTS = {
    # conv 5*5*1*3 + 3; dense 24*24*3 + 1
    "seed_net": 78 + 1729,
    # conv 5*5*1*6 + 6; conv 5*5*6*16 + 16; dense 400*120 + 120, 120*84 + 84, 84*10 + 10
    "lenet5": 156 + 2416 + 48120 + 10164 + 850,
    # conv 3*3*1*32 + 32; conv 3*3*32*64 + 64; dense 7*7*64*256 + 256, 256*10 + 10
    "small_cnn": 320 + 18496 + 803072 + 2570,
    # stem 3*3*1*32 + BN 64; two blocks of 2 * (3*3*32*32 + BN 64); the projected block
    # 3*3*32*64 + 3*3*64*64 + 1*1*32*64 + 3 BN of 128; one block of 2 * (3*3*64*64 + BN 128); dense 64*10 + 10
    "resnet_small": 352 + 2 * 18560 + (18432 + 36864 + 2048 + 3 * 128) + 2 * (36864 + 128) + 650,
}
TOL = 1e-10  # float64, relative per parameter array (the bound; measured: <= 1e-14)


def _f64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def _abstract_init(model, shape=INPUT_SHAPE):
    box = {}

    def init(key):
        params, state, box["out"] = model.init(key, shape)
        return params, state

    params, state = jax.eval_shape(init, jax.random.PRNGKey(0))
    return params, state, box["out"]


def _max_rel_per_leaf(a, b):
    """``{leaf path: max|a - b| / max|b|}``."""
    out = {}
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        out[jax.tree_util.keystr(path)] = float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-300))
    return out


# ---------------------------------------------------------------------------------------------------
# The zoo


def test_zoo_names_and_unknown_model_error():
    assert tuple(MODELS) == ZOO
    for name in ZOO:
        spec = get_model(name)
        assert spec.name == name and spec.description
    with pytest.raises(ValueError, match=r"unknown model 'vgg16'; choose one of seed_net, lenet5, small_cnn, resnet_small"):
        get_model("vgg16")


@pytest.mark.parametrize("name", ZOO)
def test_architecture_output_shape_and_parameter_count(name):
    spec = get_model(name)
    params, state, out_shape = _abstract_init(spec.build(), (3, 28, 28, 1))
    assert tuple(out_shape) == ((3, 1) if spec.binary else (3, 10))
    assert sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params)) == PARAMETER_COUNTS[name]
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves((params, state)))
    # The forward pass agrees with init's out_shape, for another batch size too.
    y = jax.eval_shape(lambda p, s, x: spec.build().forward(p, s, x, train=True)[0], params, state,
                       jax.ShapeDtypeStruct((5, 28, 28, 1), jnp.float32))
    assert y.shape == (5, out_shape[1])


def test_resnet_small_has_batchnorm_state_and_a_projection_shortcut():
    params, state, _ = _abstract_init(models.resnet_small())
    n_bn = sum(1 for leaf in jax.tree_util.tree_leaves(state)) // 2  # mean and var per BatchNorm
    assert n_bn == 1 + 2 * 4 + 1  # stem, two per block, the projection's
    residuals = [p for p in params if isinstance(p, dict) and "shortcut" in p]
    assert len(residuals) == 4
    assert [bool(jax.tree_util.tree_leaves(r["shortcut"])) for r in residuals] == [False, False, True, False]
    assert residuals[2]["shortcut"][0]["w"].shape == (1, 1, 32, 64)


def test_model_spec_targets_and_predictions():
    labels = np.array([0, 4, 5, 9], np.uint8)
    binary, multi = get_model("seed_net"), get_model("lenet5")
    np.testing.assert_array_equal(binary.targets(labels), [[0.0], [0.0], [1.0], [1.0]])  # "digit > 4"
    assert binary.targets(labels).dtype == jnp.float32
    np.testing.assert_array_equal(multi.targets(labels), labels)
    assert multi.targets(labels).dtype == jnp.int32
    np.testing.assert_array_equal(binary.predictions(jnp.array([[0.2], [0.7]])), [0, 1])
    np.testing.assert_array_equal(multi.predictions(jnp.eye(10)[jnp.array([3, 7])]), [3, 7])
    assert binary.loss is gradients.mse and multi.loss is gradients.softmax_cross_entropy


# ---------------------------------------------------------------------------------------------------
# Manual, autodiff and custom_vjp gradients of every zoo model agree (float64)


@pytest.fixture(scope="module")
def mnist_batch():
    """Two real images (with the exact zeros of MNIST's background, where ReLU sits on its kink) and labels."""
    ds = jdata.load_dataset(jdata.OFFLINE_NAME)
    return jnp.asarray(ds.train_images[:2], jnp.float64)[..., None] / 255.0, ds.train_labels[:2]


def _three_gradients(spec, model, params, state, x, target):
    apply = gradients.with_manual_vjp(model, train=True)

    @jax.jit
    def run(params):
        (loss_m, (pred_m, state_m)), g_manual = gradients.value_and_grad(model, spec.loss, "manual")(params, state, x, target)
        (loss_a, (pred_a, state_a)), g_auto = gradients.value_and_grad(model, spec.loss, "autodiff")(params, state, x, target)
        g_vjp = jax.grad(lambda p: spec.loss.value(apply(p, state, x)[0], target))(params)
        return (loss_m, loss_a), (state_m, state_a), g_manual, g_auto, g_vjp

    return run(params)


@pytest.mark.parametrize("name", ZOO)
def test_manual_autodiff_and_custom_vjp_gradients_agree_float64(name, mnist_batch):
    spec = get_model(name)
    model = spec.build()
    params, state, _ = model.init(jax.random.PRNGKey(0), INPUT_SHAPE)
    params, state = _f64(params), _f64(state)
    images, labels = mnist_batch
    target = spec.targets(labels)
    target = target.astype(jnp.float64) if spec.binary else target
    # Mid-training parameters: biases away from 0 too, so ReLUs and max-pool windows see varied inputs.
    params = jax.tree_util.tree_map(lambda p: p + 0.01 * jnp.sin(1.7 * jnp.arange(p.size).reshape(p.shape)), params)
    (loss_m, loss_a), (state_m, state_a), g_manual, g_auto, g_vjp = _three_gradients(spec, model, params, state, images, target)

    assert loss_m == loss_a
    for a, b in zip(jax.tree_util.tree_leaves(state_m), jax.tree_util.tree_leaves(state_a)):
        np.testing.assert_array_equal(a, b)
    assert jax.tree_util.tree_structure(g_manual) == jax.tree_util.tree_structure(params)
    manual_vs_auto = _max_rel_per_leaf(g_manual, g_auto)
    vjp_vs_manual = _max_rel_per_leaf(g_vjp, g_manual)
    vjp_vs_auto = _max_rel_per_leaf(g_vjp, g_auto)
    assert len(manual_vs_auto) == len(jax.tree_util.tree_leaves(params))
    assert max(manual_vs_auto.values()) <= TOL, manual_vs_auto
    assert max(vjp_vs_manual.values()) <= TOL, vjp_vs_manual
    assert max(vjp_vs_auto.values()) <= TOL, vjp_vs_auto
    # No gradient is trivially zero (which would make the comparison vacuous).
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree_util.tree_leaves(g_auto))


@pytest.mark.slow
@pytest.mark.parametrize("name", ("lenet5", "resnet_small"))
def test_conv_backward_method_gives_the_same_model_gradients(name, mnist_batch):
    spec = get_model(name)
    images, labels = mnist_batch
    grads = []
    for method in ("im2col", "conv"):
        model = spec.build(method=method)
        params, state, _ = model.init(jax.random.PRNGKey(0), INPUT_SHAPE)
        f = jax.jit(gradients.value_and_grad(model, spec.loss, "manual"))
        grads.append(f(_f64(params), _f64(state), images, spec.targets(labels))[1])
    assert max(_max_rel_per_leaf(*grads).values()) <= 1e-12


def test_resnet_small_evaluation_mode_uses_running_statistics(mnist_batch):
    spec = get_model("resnet_small")
    model = spec.build(method="conv")
    params, state, _ = model.init(jax.random.PRNGKey(0), INPUT_SHAPE)
    images, _ = mnist_batch
    images = images.astype(jnp.float32)
    forward = jax.jit(model.forward, static_argnames="train")
    y_train, new_state, _ = forward(params, state, images, train=True)
    y_eval, same_state, _ = forward(params, state, images, train=False)
    assert not np.allclose(y_train, y_eval)
    for a, b in zip(jax.tree_util.tree_leaves(same_state), jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(a, b)  # evaluation leaves the running statistics alone
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(new_state), jax.tree_util.tree_leaves(state)))


# ---------------------------------------------------------------------------------------------------
# modelcheck: every layer alone, then the whole model with its loss


def _assert_model_check(name, results):
    model = get_model(name).build()
    assert len(results) == len(model.children) + 1
    for i, (layer, result) in enumerate(zip(model.children, results)):
        assert result.name == f"{name}[{i}] {layer.name}"
    assert results[-1].name == f"{name} + {get_model(name).loss.name}"
    failures = [r.table() for r in results if not r.ok]
    assert not failures, "\n\n".join(failures)
    for r in results:
        assert r.dtype == "float64"
        assert r.worst.autodiff <= 1e-12 and r.worst.finite_difference <= 1e-6 and r.adjoint <= 1e-12
        # Every array took part; at most a few finite-difference directions were skipped at a kink.
        assert all(row.fd_directions > 0 for row in r.rows)


def test_check_model_seed_net_float64():
    _assert_model_check("seed_net", check_model("seed_net", dtype="float64", batch=2))


@pytest.mark.slow
@pytest.mark.parametrize("name", ("lenet5", "small_cnn", "resnet_small"))
def test_check_model_float64_heavier_models(name):
    _assert_model_check(name, check_model(name, dtype="float64", batch=2))
