"""The model zoo: architecture (shapes, parameter counts), the presets' targets, losses and accuracy rule,
the gradient routes of every model agree (float64: hand-written, ``jax.grad`` of the same forward, ``jax.grad``
of the ``lax`` forward, ``custom_vjp``), for the default convolution formulation and for each explicit
one, and the layer-by-layer three-way check of :func:`jaxcnn.modelcheck.check_model`."""

from __future__ import annotations

import math

import numpy as np
import pytest

import jax
import jax.extend.core
import jax.numpy as jnp

from jaxcnn import data as jdata
from jaxcnn import gradients, models
from jaxcnn.modelcheck import check_model
from jaxcnn.models import INPUT_SHAPE, MODELS, get_model
from jaxcnn.ops.conv import DEFAULT_METHOD

ZOO = ("seed_net", "lenet5", "small_cnn", "resnet_small", "fast_cnn")
OUTPUTS = {"seed_net": 1, "lenet5": 10, "small_cnn": 10, "resnet_small": 10, "fast_cnn": 10}
# Explicit formulations; "auto" (the default, checked for every model) picks "taps" and "conv" per layer.
CONV_METHODS = ("conv", "im2col", "taps")
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
    # conv 5*5*1*24 + 24, BN 48; conv 3*3*24*48 + 48, BN 96; conv 3*3*48*96 + 96, BN 192; dense 3*3*96*10 + 10
    "fast_cnn": 624 + 48 + 10416 + 96 + 41568 + 192 + 8650,
}
TOL = 1e-10  # float64, relative per parameter array (measured: <= 4e-15)


def test_fast_cnn_kernels_are_fan_in_uniform():
    """Every kernel of fast_cnn lies in [-1/sqrt(fan_in), 1/sqrt(fan_in)] and fills it (variance 1 / (3 fan_in));
    biases start at zero."""
    params, _, _ = models.fast_cnn().init(jax.random.PRNGKey(0), INPUT_SHAPE)
    kernels = [p for p in params if "w" in p]
    assert len(kernels) == 4
    for p in kernels:
        w = np.asarray(p["w"])
        bound = 1 / np.sqrt(np.prod(w.shape[:-1]))
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
        np.testing.assert_allclose(w.std(), bound / np.sqrt(3), rtol=0.1)
        assert not np.any(np.asarray(p["b"]))


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
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_leaves(b), strict=True):
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
        assert spec.input_shape == INPUT_SHAPE
    with pytest.raises(
        ValueError, match=r"unknown model 'vgg16'; choose one of seed_net, lenet5, small_cnn, resnet_small, fast_cnn"
    ):
        get_model("vgg16")


@pytest.mark.parametrize("name", ZOO)
def test_architecture_output_shape_and_parameter_count(name):
    spec = get_model(name)
    params, state, out_shape = _abstract_init(spec.build(), (3, 28, 28, 1))
    assert tuple(out_shape) == (3, OUTPUTS[name])
    assert sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params)) == PARAMETER_COUNTS[name]
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves((params, state)))
    # The forward pass agrees with init's out_shape, for another batch size too.
    y = jax.eval_shape(
        lambda p, s, x: spec.build().forward(p, s, x, train=True)[0],
        params,
        state,
        jax.ShapeDtypeStruct((5, 28, 28, 1), jnp.float32),
    )
    assert y.shape == (5, out_shape[1])


def _primitives(fn, *args) -> set[str]:
    """Names of the primitives in the jaxpr of ``fn(*args)``, sub-jaxprs (``cond``, ``pjit``) included."""
    names = set()

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return names


@pytest.mark.parametrize("name", ZOO)
def test_builders_default_to_the_default_conv_method(name):
    """``spec.build()`` uses :data:`DEFAULT_METHOD` ("auto") for every Conv2D, and ``conv_method`` reaches them all."""
    assert DEFAULT_METHOD == "auto"
    spec = get_model(name)
    default, auto, lax_conv = spec.build(), spec.build(conv_method="auto"), spec.build(conv_method="conv")
    assert default.autodiff_forward is not None and auto.autodiff_forward is not None
    assert lax_conv.autodiff_forward is None  # its forward already is the lax form
    params, state, _ = _abstract_init(default, (2, 28, 28, 1))
    x = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)

    def jaxpr_of(forward):
        return jax.make_jaxpr(lambda p, s, x: forward(p, s, x, train=True)[0])(params, state, x)

    assert str(jaxpr_of(default.forward)) == str(jaxpr_of(auto.forward))
    assert str(jaxpr_of(default.autodiff_forward)) == str(jaxpr_of(lax_conv.forward))
    assert str(jaxpr_of(default.forward)) != str(
        jaxpr_of(lax_conv.forward)
    )  # "auto" takes taps for the 1-channel input


def test_seed_net_default_forward_has_no_lax_convolution():
    """seed_net's only convolution reads the 1-channel image: "auto" writes it as per-tap multiply-adds, and its
    autodiff form is lax's convolution."""
    model = get_model("seed_net").build()
    params, state, _ = _abstract_init(model, (2, 28, 28, 1))
    x = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
    forward = _primitives(lambda p, s, x: model.forward(p, s, x)[0], params, state, x)
    lax_form = _primitives(lambda p, s, x: model.autodiff_forward(p, s, x)[0], params, state, x)
    assert "conv_general_dilated" not in forward
    assert "conv_general_dilated" in lax_form


def test_resnet_small_has_batchnorm_state_and_a_projection_shortcut():
    params, state, _ = _abstract_init(models.resnet_small())
    n_bn = sum(1 for leaf in jax.tree_util.tree_leaves(state)) // 2  # mean and var per BatchNorm
    assert n_bn == 1 + 2 * 4 + 1  # stem, two per block, the projection's
    residuals = [p for p in params if isinstance(p, dict) and "shortcut" in p]
    assert len(residuals) == 4
    assert [bool(jax.tree_util.tree_leaves(r["shortcut"])) for r in residuals] == [False, False, True, False]
    assert residuals[2]["shortcut"][0]["w"].shape == (1, 1, 32, 64)


def test_model_spec_fields_and_defaults():
    assert models.ModelSpec._fields == ("name", "build", "loss", "description", "targets", "input_shape")
    custom = models.ModelSpec("mine", models.lenet5, gradients.softmax_cross_entropy, "a custom preset")
    assert custom.input_shape == INPUT_SHAPE
    labels = np.array([3, 1], np.uint8)
    np.testing.assert_array_equal(custom.targets(labels), [3, 1])
    assert custom.targets(labels).dtype == jnp.int32


def test_model_spec_targets_losses_and_correct():
    labels = np.array([0, 4, 5, 9], np.uint8)
    binary, multi = get_model("seed_net"), get_model("lenet5")
    np.testing.assert_array_equal(binary.targets(labels), [[0.0], [0.0], [1.0], [1.0]])  # "digit > 4"
    assert binary.targets(labels).dtype == jnp.float32
    np.testing.assert_array_equal(multi.targets(labels), labels)
    assert multi.targets(labels).dtype == jnp.int32
    assert binary.loss is gradients.mse and multi.loss is gradients.softmax_cross_entropy
    for spec in (get_model("small_cnn"), get_model("resnet_small")):
        assert spec.loss is gradients.softmax_cross_entropy and spec.targets is multi.targets
    # Accuracy: seed_net's one sigmoid output is thresholded at 0.5 (0.5 itself reads as "not > 4").
    outputs = jnp.array([[0.2], [0.7], [0.5], [0.9]])
    np.testing.assert_array_equal(binary.loss.correct(outputs, binary.targets(labels)), [True, False, False, True])
    # ...the others' 10 logits by their argmax.
    logits = jnp.eye(10)[jnp.array([0, 3, 5, 2])]
    np.testing.assert_array_equal(multi.loss.correct(logits, multi.targets(labels)), [True, False, True, False])


# ---------------------------------------------------------------------------------------------------
# Every gradient route of every zoo model agrees (float64): the hand-written backward ("manual"),
# jax.grad of the same forward ("autodiff_same_forward"), jax.grad of the lax forward ("autodiff") and
# jax.grad through with_manual_vjp.


@pytest.fixture(scope="module")
def mnist_batch():
    """Two real images (with the exact zeros of MNIST's background, where ReLU sits on its kink) and labels."""
    ds = jdata.load_dataset(jdata.OFFLINE_NAME)
    return jnp.asarray(ds.train_images[:2], jnp.float64)[..., None] / 255.0, ds.train_labels[:2]


def _problem(spec, model, mnist_batch):
    """float64 mid-training parameters, the model's state and the batch's loss targets."""
    params, state, _ = model.init(jax.random.PRNGKey(0), INPUT_SHAPE)
    params, state = _f64(params), _f64(state)
    # Mid-training parameters: biases away from 0 too, so ReLUs and max-pool windows see varied inputs.
    params = jax.tree_util.tree_map(lambda p: p + 0.01 * jnp.sin(1.7 * jnp.arange(p.size).reshape(p.shape)), params)
    images, labels = mnist_batch
    target = spec.targets(labels)
    if jnp.issubdtype(target.dtype, jnp.floating):
        target = target.astype(jnp.float64)
    return params, state, images, target


def _all_routes(spec, model, params, state, x, target, *, train):
    """Every route's ``((loss, (pred, new_state)), grads)`` and the custom_vjp gradient, in one jit."""
    apply = gradients.with_manual_vjp(model, train=train)

    @jax.jit
    def run(params):
        routes = {
            route: gradients.value_and_grad(model, spec.loss, route)(params, state, x, target, train=train)
            for route in gradients.ROUTES
        }
        g_vjp = jax.grad(lambda p: spec.loss.value(apply(p, state, x)[0], target))(params)
        return routes, g_vjp

    return run(params)


def _assert_routes_agree(spec, model, params, state, x, target, *, train=True):
    assert gradients.ROUTES == ("manual", "autodiff", "autodiff_same_forward")
    routes, g_vjp = _all_routes(spec, model, params, state, x, target, train=train)
    (loss_m, (pred_m, state_m)), g_manual = routes["manual"]
    (loss_s, (pred_s, state_s)), g_same = routes["autodiff_same_forward"]
    (loss_a, (pred_a, state_a)), g_auto = routes["autodiff"]

    # The same forward pass: identical values. The lax forward: the same function, to rounding.
    assert loss_m == loss_s
    np.testing.assert_array_equal(pred_m, pred_s)
    for a, b in zip(jax.tree_util.tree_leaves(state_m), jax.tree_util.tree_leaves(state_s), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(loss_a, loss_m, rtol=1e-13)
    assert max(_max_rel_per_leaf(pred_a, pred_m).values()) <= 1e-13
    assert jax.tree_util.tree_structure(state_a) == jax.tree_util.tree_structure(state)
    for a, b in zip(jax.tree_util.tree_leaves(state_a), jax.tree_util.tree_leaves(state_m), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)

    n_leaves = len(jax.tree_util.tree_leaves(params))
    for g in (g_manual, g_same, g_auto, g_vjp):
        assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(params)
    comparisons = {
        "manual vs autodiff_same_forward": _max_rel_per_leaf(g_manual, g_same),
        "manual vs autodiff": _max_rel_per_leaf(g_manual, g_auto),
        "autodiff_same_forward vs autodiff": _max_rel_per_leaf(g_same, g_auto),
        "custom_vjp vs manual": _max_rel_per_leaf(g_vjp, g_manual),
        "custom_vjp vs autodiff": _max_rel_per_leaf(g_vjp, g_auto),
    }
    for what, errors in comparisons.items():
        assert len(errors) == n_leaves
        assert max(errors.values()) <= TOL, (what, errors)
    # No gradient is trivially zero (which would make the comparison vacuous).
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree_util.tree_leaves(g_auto))


@pytest.mark.parametrize("name", ZOO)
def test_gradient_routes_agree_float64_default_conv_method(name, mnist_batch):
    """Each zoo model as ``spec.build()`` builds it (conv "auto"), in training mode (BatchNorm batch statistics)."""
    spec = get_model(name)
    model = spec.build()
    assert model.autodiff_forward is not None  # the "autodiff" route really runs another forward
    _assert_routes_agree(spec, model, *_problem(spec, model, mnist_batch), train=True)


@pytest.mark.parametrize("method", CONV_METHODS)
def test_gradient_routes_agree_float64_lenet5_each_conv_method(method, mnist_batch):
    spec = get_model("lenet5")
    model = spec.build(conv_method=method)
    assert (model.autodiff_forward is None) == (method == "conv")
    _assert_routes_agree(spec, model, *_problem(spec, model, mnist_batch), train=True)


def test_gradient_routes_agree_float64_resnet_small_evaluation_mode(mnist_batch):
    """BatchNorm with running statistics (a per-channel affine map): the routes agree in evaluation mode too."""
    spec = get_model("resnet_small")
    model = spec.build()
    params, state, images, target = _problem(spec, model, mnist_batch)
    # Non-trivial running statistics, so that evaluation differs from the identity-like initial state.
    state = jax.tree_util.tree_map(
        lambda s: s + 0.1 * jnp.cos(jnp.arange(s.size, dtype=s.dtype)).reshape(s.shape) ** 2, state
    )
    _assert_routes_agree(spec, model, params, state, images, target, train=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", ("lenet5", "resnet_small"))
def test_conv_method_gives_the_same_model_gradients(name, mnist_batch):
    spec = get_model(name)
    images, labels = mnist_batch
    grads = {}
    for method in (*CONV_METHODS, "auto"):
        model = spec.build(conv_method=method)
        params, state, _ = model.init(jax.random.PRNGKey(0), INPUT_SHAPE)
        f = jax.jit(gradients.value_and_grad(model, spec.loss, "manual"))
        grads[method] = f(_f64(params), _f64(state), images, spec.targets(labels))[1]
    for method in ("im2col", "taps", "auto"):
        assert max(_max_rel_per_leaf(grads[method], grads["conv"]).values()) <= 1e-12, method


def test_resnet_small_evaluation_mode_uses_running_statistics(mnist_batch):
    spec = get_model("resnet_small")
    model = spec.build(conv_method="conv")
    params, state, _ = model.init(jax.random.PRNGKey(0), INPUT_SHAPE)
    images, _ = mnist_batch
    images = images.astype(jnp.float32)
    forward = jax.jit(model.forward, static_argnames="train")
    y_train, new_state, _ = forward(params, state, images, train=True)
    y_eval, same_state, _ = forward(params, state, images, train=False)
    assert not np.allclose(y_train, y_eval)
    for a, b in zip(jax.tree_util.tree_leaves(same_state), jax.tree_util.tree_leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)  # evaluation leaves the running statistics alone
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree_util.tree_leaves(new_state), jax.tree_util.tree_leaves(state), strict=True)
    )


# ---------------------------------------------------------------------------------------------------
# modelcheck: every layer alone, then the whole model with its loss


def _assert_model_check(name, results, dtype="float64"):
    model = get_model(name).build()
    assert len(results) == len(model.children) + 1
    for i, (layer, result) in enumerate(zip(model.children, results[:-1], strict=True)):
        assert result.name == f"{name}[{i}] {layer.name}"
    assert results[-1].name == f"{name} + {get_model(name).loss.name}"
    failures = [r.table() for r in results if not r.ok]
    assert not failures, "\n\n".join(failures)
    for r in results:
        assert r.dtype == dtype
        if dtype == "float64":
            assert r.worst.autodiff <= 1e-12 and r.worst.finite_difference <= 1e-6 and r.adjoint <= 1e-12
        # Every array took part; at most a few finite-difference directions were skipped at a kink.
        assert all(row.fd_directions > 0 for row in r.rows)
    # The whole model's check covers every parameter array and the input.
    assert len(results[-1].rows) == len(jax.tree_util.tree_leaves(_abstract_init(model)[0])) + 1


def test_check_model_seed_net_float64():
    """seed_net's targets are float ("digit > 4" as 0/1): they follow the check's dtype."""
    _assert_model_check("seed_net", check_model("seed_net", dtype="float64", batch=2))


@pytest.mark.slow
def test_check_model_seed_net_float32():
    _assert_model_check("seed_net", check_model("seed_net", dtype="float32", batch=2), dtype="float32")


@pytest.mark.slow
@pytest.mark.parametrize("name", ("lenet5", "small_cnn", "resnet_small"))
def test_check_model_float64_heavier_models(name):
    _assert_model_check(name, check_model(name, dtype="float64", batch=2))
