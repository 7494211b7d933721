"""Layers: every layer alone through the three-way gradient check (float64), shapes and dtypes of init,
BatchNorm's running statistics, Dropout's key handling, the combinators, and ``with_manual_vjp``."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import jax
import jax.extend.core
import jax.numpy as jnp

from jaxcnn import gradients, layers, ops
from jaxcnn.gradcheck import GradCheckError
from jaxcnn.gradients import gradcheck_layer, with_manual_vjp
from jaxcnn.layers import (
    AvgPool2D,
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool,
    Layer,
    LeakyRelu,
    LogSoftmax,
    MaxPool2D,
    Relu,
    Residual,
    Sigmoid,
    Softmax,
    Tanh,
    serial,
)

KEY = jax.random.PRNGKey(0)


def f64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def tie_free(seed: int, shape, dtype=jnp.float64):
    """Normal values pushed at least 0.1 away from 0 (no ReLU kink within a finite-difference step);
    continuous draws, so no two entries of a pooling window are equal. NumPy: no compile per shape."""
    z = np.random.default_rng(seed).standard_normal(shape)
    return jnp.asarray(np.sign(z) * (0.1 + np.abs(z)), dtype)


def compiled_init(layer: Layer, key, in_shape):
    """``layer.init`` under one ``jax.jit``: eagerly, every initializer compiles per shape (seconds each)."""
    box = {}

    def init(key):
        params, state, box["out_shape"] = layer.init(key, in_shape)
        return params, state

    params, state = jax.jit(init)(key)
    return params, state, box["out_shape"]


def setup(layer: Layer, in_shape, *, seed: int = 0, state_fn=None):
    """float64 params/state and a tie-free float64 input for ``layer``."""
    params, state, out_shape = compiled_init(layer, jax.random.PRNGKey(seed), in_shape)
    params, state = f64(params), f64(state)
    if state_fn is not None:
        state = state_fn(state)
    return params, state, tie_free(seed + 1, in_shape), out_shape


def _random_running_stats(state):
    """Non-trivial running statistics, so that BatchNorm's evaluation mode is a real affine map."""
    c = state["mean"].shape[0]
    return {"mean": jnp.linspace(-0.5, 0.7, c), "var": jnp.linspace(0.3, 2.0, c)}


def _perturbed_affine(params):
    """BatchNorm scale/bias away from their (1, 0) init, so a slip in either gradient shows."""
    c = params["scale"].shape[0]
    return {"scale": jnp.linspace(0.5, 1.5, c), "bias": jnp.linspace(-0.3, 0.4, c)}


SLOW = pytest.mark.slow
# Shared input shapes: gradcheck runs op by op and every new shape compiles, so cases reuse these.
IMG = (2, 6, 6, 4)  # NHWC
IMG6 = (2, 5, 5, 6)  # NHWC, more channels than "taps" writes as multiply-adds
VEC = (3, 6)  # (N, features)
TRAIN = dict(train=True)
DROP = dict(train=True, key=jax.random.PRNGKey(7))

# (layer factory, input shape, forward kwargs, options)
CASES = [
    # Conv2D: each formulation (forward and backward) on geometries that exercise stride, dilation,
    # asymmetric padding and groups; the remaining geometry/method combinations are marked slow (every
    # formulation is also checked op by op in test_ops_conv.py and in whole models in test_models.py). IMG's
    # 4 channels make "taps" (and "auto", which picks it here) use the broadcast multiply-adds; IMG6's 6
    # channels, the per-tap matrix products.
    *[
        pytest.param(
            lambda m=m, kw=kw: Conv2D(4, **kw, method=m),
            IMG,
            {},
            {},
            id=f"conv-{name}-{m}",
            marks=() if m in default else SLOW,
        )
        for name, kw, default in [
            ("k3-s2-same", dict(kernel=3, stride=2, padding="SAME"), ("conv", "auto")),
            ("k2x3-s2x1-p1-d2", dict(kernel=(2, 3), stride=(2, 1), padding=1, dilation=2), ("im2col", "taps")),
            ("groups2-asym-pad", dict(kernel=(3, 2), padding=((1, 0), (0, 1)), groups=2), ("im2col", "conv")),
            ("k3-nobias", dict(kernel=3, use_bias=False), ()),
            ("depthwise", dict(kernel=3, groups=4, padding="SAME"), ("auto",)),
        ]
        for m in ("im2col", "conv", "taps", "auto")
    ],
    pytest.param(
        lambda: Conv2D(4, 3, stride=2, padding=1, groups=2, method="im2col"),
        IMG,
        {},
        {},
        id="conv-k3-s2-p1-groups2-im2col",
        marks=SLOW,
    ),
    pytest.param(
        lambda: Conv2D(4, 3, stride=2, padding=1, method="taps"), IMG6, {}, {}, id="conv-taps-matmul-s2-p1", marks=SLOW
    ),
    pytest.param(lambda: Conv2D(5, 3, padding="SAME", method="taps"), IMG6, {}, {}, id="conv-taps-matmul", marks=SLOW),
    pytest.param(lambda: Dense(5), VEC, {}, {}, id="dense"),
    pytest.param(lambda: Dense(5, use_bias=False), VEC, {}, {}, id="dense-nobias"),
    pytest.param(BatchNorm, IMG, TRAIN, dict(params_fn=_perturbed_affine), id="batchnorm-nhwc-train"),
    pytest.param(
        BatchNorm, IMG, {}, dict(params_fn=_perturbed_affine, state_fn=_random_running_stats), id="batchnorm-nhwc-eval"
    ),
    pytest.param(BatchNorm, VEC, TRAIN, dict(params_fn=_perturbed_affine), id="batchnorm-dense-train", marks=SLOW),
    pytest.param(
        BatchNorm, VEC, {}, dict(params_fn=_perturbed_affine, state_fn=_random_running_stats), id="batchnorm-dense-eval"
    ),
    pytest.param(lambda: Dropout(0.0), IMG, DROP, {}, id="dropout-0-train"),
    pytest.param(lambda: Dropout(0.5), IMG, DROP, {}, id="dropout-0.5-train"),
    pytest.param(lambda: Dropout(0.5), VEC, {}, {}, id="dropout-0.5-eval"),
    pytest.param(lambda: MaxPool2D(2), IMG, {}, {}, id="maxpool-2"),
    pytest.param(lambda: MaxPool2D(3, stride=2, padding=1), IMG, {}, {}, id="maxpool-3-s2-p1-overlap"),
    pytest.param(lambda: AvgPool2D(2), IMG, {}, {}, id="avgpool-2"),
    pytest.param(lambda: AvgPool2D(3, stride=2, padding=1), IMG, {}, {}, id="avgpool-3-s2-p1-incl-pad"),
    pytest.param(
        lambda: AvgPool2D(3, stride=2, padding=1, count_include_pad=False), IMG, {}, {}, id="avgpool-3-s2-p1-excl-pad"
    ),
    pytest.param(GlobalAvgPool, IMG, {}, {}, id="global-avgpool"),
    pytest.param(Flatten, IMG, {}, {}, id="flatten"),
    pytest.param(Relu, IMG, {}, {}, id="relu"),
    pytest.param(lambda: LeakyRelu(0.1), IMG, {}, {}, id="leaky-relu"),
    pytest.param(Sigmoid, VEC, {}, {}, id="sigmoid"),
    pytest.param(Tanh, VEC, {}, {}, id="tanh"),
    pytest.param(Softmax, VEC, {}, {}, id="softmax"),
    pytest.param(LogSoftmax, VEC, {}, {}, id="log-softmax"),
    pytest.param(
        lambda: serial(
            Conv2D(4, 3, stride=2, padding="SAME", use_bias=False, method="conv"),
            BatchNorm(),
            Relu(),
            MaxPool2D(3, stride=2, padding=1),
            Flatten(),
            Dense(5),
        ),
        IMG,
        TRAIN,
        dict(skip_kinks=True),
        id="serial-conv-bn-relu-pool-dense",
    ),
    pytest.param(
        lambda: Residual(
            serial(
                Conv2D(4, 3, padding="SAME", use_bias=False, method="conv"),
                BatchNorm(),
                Relu(),
                Conv2D(4, 3, padding="SAME", use_bias=False, method="conv"),
                BatchNorm(),
            )
        ),
        IMG,
        TRAIN,
        dict(skip_kinks=True),
        id="residual-identity",
        marks=SLOW,
    ),
    pytest.param(
        lambda: Residual(
            serial(Conv2D(4, 3, stride=2, padding="SAME", use_bias=False, method="conv"), BatchNorm(), Relu()),
            serial(Conv2D(4, 1, stride=2, use_bias=False, method="conv"), BatchNorm()),
        ),
        IMG,
        TRAIN,
        dict(skip_kinks=True),
        id="residual-projection",
    ),
    pytest.param(
        lambda: Residual(
            serial(Conv2D(4, 3, padding="SAME", method="conv"), BatchNorm()),
            shortcut=serial(Conv2D(4, 1, method="conv"), BatchNorm()),
        ),
        IMG,
        {},
        dict(state_fn=lambda s: jax.tree_util.tree_map(lambda a: a * 0.5 + 0.25, s)),
        id="residual-projection-eval",
        marks=SLOW,
    ),
]


@pytest.mark.parametrize("factory, in_shape, fwd, opts", CASES)
def test_layer_gradcheck_float64(factory, in_shape, fwd, opts):
    """Hand-written backward vs jax.vjp (<= 1e-12), vs central differences (<= 1e-6) and the adjoint identity."""
    layer = factory()
    params, state, x, _ = setup(layer, in_shape, state_fn=opts.get("state_fn"))
    if "params_fn" in opts:
        params = opts["params_fn"](params)
    result = gradcheck_layer(layer, params, state, x, skip_kinks=opts.get("skip_kinks", False), **fwd)
    assert result.ok and result.dtype == "float64"
    # Every array was compared, including the input, and finite differences probed each of them.
    expected = len(jax.tree_util.tree_leaves(params)) + 1
    assert len(result.rows) == expected
    assert result.rows[-1].name == "x"
    assert all(r.fd_directions > 0 for r in result.rows)


def test_layer_gradcheck_with_loss_covers_the_loss_gradient():
    layer = serial(Dense(5), Relu(), Dense(3))
    params, state, x, _ = setup(layer, VEC)
    labels = jnp.array([0, 2, 1])
    result = gradcheck_layer(
        layer, params, state, x, loss=gradients.softmax_cross_entropy, target=labels, skip_kinks=True
    )
    assert result.ok


def test_layer_gradcheck_float32():
    layer = serial(Dense(4), Tanh())
    params, state, _, _ = setup(layer, VEC)
    x32 = tie_free(1, VEC, jnp.float32)
    params32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    result = gradcheck_layer(layer, params32, state, x32)
    assert result.ok and result.dtype == "float32"


def _scaled_backward(layer: Layer, factor: float) -> Layer:
    """``layer`` whose backward is deliberately multiplied by ``factor``: a wrong gradient."""

    def backward(params, residuals, dy):
        dparams, dx = layer.backward(params, residuals, dy)
        return jax.tree_util.tree_map(lambda g: factor * g, dparams), factor * dx

    return layer._replace(backward=backward)


def test_gradcheck_layer_catches_a_wrong_backward():
    """The harness above can fail: a backward off by 1e-6 (relative) is reported, naming the arrays."""
    layer = _scaled_backward(Dense(3), 1.0 + 1e-6)
    params, state, x, _ = setup(layer, (2, 4))
    with pytest.raises(GradCheckError, match="manual vs autodiff") as info:
        gradcheck_layer(layer, params, state, x)
    assert "params['w']" in str(info.value) and "FAILED" in str(info.value)


def test_gradcheck_layer_catches_a_backward_that_ignores_the_batch_statistics():
    """BatchNorm's training backward treated as if it were the evaluation one (a classic slip) fails."""
    bn = BatchNorm()

    def eval_like_backward(params, residuals, dy):
        ((x_hat, inv_std),) = residuals.values()
        return bn.backward(params, {"eval": (x_hat, inv_std)}, dy)

    layer = bn._replace(backward=eval_like_backward)
    params, state, x, _ = setup(layer, (4, 3))
    with pytest.raises(GradCheckError, match=r"x: manual vs autodiff"):
        gradcheck_layer(layer, params, state, x, train=True)


def test_relu_gradient_at_exactly_zero_matches_autodiff():
    """MNIST backgrounds and zero-initialised biases give pre-activations that are exactly 0; both paths
    must use the same derivative there (0), or manual and autodiff training drift apart."""
    layer = serial(Dense(3), Relu())
    params, state, _, _ = setup(layer, (4, 2))
    params = (dict(params[0], b=jnp.zeros(3)), {})
    x = jnp.zeros((4, 2)).at[0].set(jnp.array([1.0, -2.0]))
    (_, _), manual = gradients.value_and_grad(layer, gradients.mse, "manual")(params, state, x, jnp.ones((4, 3)))
    for route in ("autodiff", "autodiff_same_forward"):
        (_, _), auto = gradients.value_and_grad(layer, gradients.mse, route)(params, state, x, jnp.ones((4, 3)))
        for m, a in zip(jax.tree_util.tree_leaves(manual), jax.tree_util.tree_leaves(auto), strict=True):
            np.testing.assert_array_equal(m, a)


def test_value_and_grad_rejects_an_unknown_route():
    with pytest.raises(
        ValueError,
        match=r"value_and_grad: route must be one of manual, autodiff, autodiff_same_forward, "
        r"got 'jax'",
    ):
        gradients.value_and_grad(Dense(2), gradients.mse, "jax")


# ---------------------------------------------------------------------------------------------------
# init: shapes, dtypes, out_shape


SHAPE_CASES = [
    (lambda: Conv2D(5, 3), (1, 8, 8, 3), (1, 6, 6, 5)),
    (lambda: Conv2D(5, (3, 1), stride=(2, 1), padding="SAME"), (1, 9, 8, 2), (1, 5, 8, 5)),
    (lambda: Conv2D(6, 3, dilation=2, padding=1, groups=3), (1, 9, 9, 3), (1, 7, 7, 6)),
    (lambda: Dense(4), (1, 10), (1, 4)),
    (BatchNorm, (1, 4, 4, 3), (1, 4, 4, 3)),
    (lambda: Dropout(0.3), (1, 5), (1, 5)),
    (lambda: MaxPool2D(2), (1, 7, 7, 2), (1, 3, 3, 2)),
    (lambda: MaxPool2D(3, stride=2, padding=1), (1, 7, 7, 2), (1, 4, 4, 2)),
    (lambda: AvgPool2D(2, stride=1), (1, 5, 5, 2), (1, 4, 4, 2)),
    (GlobalAvgPool, (1, 5, 6, 4), (1, 4)),
    (Flatten, (1, 3, 4, 5), (1, 60)),
    (Softmax, (1, 10), (1, 10)),
    (lambda: serial(Conv2D(4, 5, padding="SAME"), Relu(), MaxPool2D(2), Flatten(), Dense(7)), (1, 28, 28, 1), (1, 7)),
    (lambda: Residual(Conv2D(4, 3, stride=2, padding="SAME"), Conv2D(4, 1, stride=2)), (1, 7, 7, 2), (1, 4, 4, 4)),
]


def abstract_init(layer: Layer, in_shape):
    """``layer.init`` traced, not run (no compilation): params and state as ``ShapeDtypeStruct``s."""
    box = {}

    def init(key):
        params, state, box["out_shape"] = layer.init(key, in_shape)
        return params, state

    params, state = jax.eval_shape(init, KEY)
    return params, state, box["out_shape"]


@pytest.mark.parametrize("factory, in_shape, expected", SHAPE_CASES)
def test_init_out_shape_matches_the_forward_output(factory, in_shape, expected):
    layer = factory()
    params, state, out_shape = abstract_init(layer, in_shape)
    assert tuple(out_shape) == expected
    # The batch dimension is free: init with batch 1, run with batch 3 (abstractly: shapes and dtypes).
    x = jax.ShapeDtypeStruct((3, *in_shape[1:]), jnp.float32)
    y, new_state = jax.eval_shape(
        lambda p, s, x: layer.forward(p, s, x, train=True, key=jax.random.PRNGKey(1))[:2], params, state, x
    )
    assert y.shape == (3, *expected[1:])
    assert y.dtype == jnp.float32
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
    assert all(
        a.shape == b.shape and a.dtype == b.dtype
        for a, b in zip(jax.tree_util.tree_leaves(new_state), jax.tree_util.tree_leaves(state), strict=True)
    )
    for leaf in jax.tree_util.tree_leaves(params):
        assert leaf.dtype == jnp.float32


def test_init_param_shapes_and_initial_values():
    params, state, _ = abstract_init(Conv2D(8, (3, 5), groups=2), (1, 9, 9, 4))
    assert params["w"].shape == (3, 5, 2, 8) and params["b"].shape == (8,) and state == {}
    assert set(abstract_init(Conv2D(8, 3, use_bias=False), (1, 5, 5, 2))[0]) == {"w"}
    dense, _, _ = abstract_init(Dense(6), (1, 11))
    assert dense["w"].shape == (11, 6) and dense["b"].shape == (6,)
    # Values: He normal, std sqrt(2 / fan_in) with fan_in = 3 * 3 * 8 (a truncated normal: a loose bound); zero bias.
    conv, _, _ = compiled_init(Conv2D(32, 3), KEY, (1, 8, 8, 8))
    assert abs(float(jnp.std(conv["w"])) - np.sqrt(2 / 72)) < 0.1 * np.sqrt(2 / 72)
    np.testing.assert_array_equal(conv["b"], 0.0)
    bn_params, bn_state, _ = BatchNorm().init(KEY, (1, 4, 4, 3))
    np.testing.assert_array_equal(bn_params["scale"], 1.0)
    np.testing.assert_array_equal(bn_params["bias"], 0.0)
    np.testing.assert_array_equal(bn_state["mean"], 0.0)
    np.testing.assert_array_equal(bn_state["var"], 1.0)
    for layer in (Relu(), MaxPool2D(2), Flatten(), Dropout(0.5)):
        p, s, _ = layer.init(KEY, (1, 4, 4, 2))
        assert p == {} and s == {}


@pytest.mark.parametrize(
    "factory, shape",
    [
        (lambda d: Conv2D(2, 3, dtype=d), (1, 5, 5, 1)),
        (lambda d: Dense(2, dtype=d), (1, 3)),
        (lambda d: BatchNorm(dtype=d), (1, 3)),
    ],
)
def test_init_dtype_argument(factory, shape):
    params, state, _ = abstract_init(factory(jnp.float64), shape)
    for leaf in jax.tree_util.tree_leaves((params, state)):
        assert leaf.dtype == jnp.float64


def test_serial_params_are_a_tuple_per_layer_and_keys_differ():
    net = serial(Dense(3), Relu(), Dense(3), name="mlp")
    params, _state, _ = net.init(KEY, (1, 3))
    assert isinstance(params, tuple) and len(params) == 3 and params[1] == {}
    assert not np.allclose(params[0]["w"], params[2]["w"])  # each layer gets its own key
    assert net.name == "mlp" and len(net.children) == 3
    res = Residual(Dense(3))
    p, _s, _ = res.init(KEY, (1, 3))
    assert set(p) == {"block", "shortcut"} and p["shortcut"] == {}
    assert len(res.children) == 2


def test_residual_forward_is_block_plus_shortcut():
    block, shortcut = Dense(4), Dense(4, use_bias=False)
    res = Residual(block, shortcut)
    params, state, _ = res.init(KEY, (1, 3))
    x = jax.random.normal(KEY, (2, 3))
    y, _, _ = res.forward(params, state, x)
    expected = x @ params["block"]["w"] + params["block"]["b"] + x @ params["shortcut"]["w"]
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    y_id, _, _ = Residual(Dense(3)).forward(
        {"block": params["block"] | {"w": jnp.eye(3)[:, :3], "b": jnp.zeros(3)}, "shortcut": {}},
        {"block": {}, "shortcut": {}},
        x,
    )
    np.testing.assert_allclose(y_id, 2 * x)


# ---------------------------------------------------------------------------------------------------
# autodiff_forward: the lax-convolution form of the forward pass, composed by serial and Residual


def _conv_count(fn, *args) -> int:
    """How many ``conv_general_dilated`` equations the jaxpr of ``fn(*args)`` has, sub-jaxprs included."""

    def count(jaxpr):
        n = 0
        for eqn in jaxpr.eqns:
            n += eqn.primitive.name == "conv_general_dilated"
            n += sum(count(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
        return n

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


GRAY = (2, 7, 7, 1)  # one input channel: "taps" writes the convolution as multiply-adds, without lax's conv


@pytest.mark.parametrize("method, has_lax_form", [("conv", False), ("im2col", True), ("taps", True), ("auto", True)])
def test_conv2d_autodiff_forward_is_the_lax_convolution(method, has_lax_form):
    layer = Conv2D(3, 3, stride=2, padding=1, method=method)
    assert (layer.autodiff_forward is not None) == has_lax_form
    params, state, x, _ = setup(layer, GRAY)
    fwd = layers.autodiff_forward(layer)
    assert fwd is (layer.autodiff_forward if has_lax_form else layer.forward)
    y, _, res = jax.jit(layer.forward)(params, state, x)
    y_ad, _, res_ad = jax.jit(fwd)(params, state, x)
    np.testing.assert_allclose(y_ad, y, rtol=1e-13, atol=1e-15)
    np.testing.assert_array_equal(res_ad, res)  # the same residuals: the input
    assert _conv_count(lambda p, x: fwd(p, state, x)[0], params, x) == 1
    # On a 1-channel input, "taps" and "auto" (which picks taps there) and "im2col" use no lax convolution.
    assert _conv_count(lambda p, x: layer.forward(p, state, x)[0], params, x) == (0 if has_lax_form else 1)


def _composed_networks():
    """Networks whose autodiff_forward must differ from forward, with the number of their Conv2D layers."""
    return {
        "serial": (serial(Conv2D(3, 3, padding="SAME", method="taps"), Relu(), MaxPool2D(2), Flatten(), Dense(4)), 1),
        "serial-mixed": (
            serial(
                Conv2D(1, 3, padding="SAME", method="taps"), Tanh(), Conv2D(2, 3, method="conv"), Flatten(), Dense(4)
            ),
            2,
        ),
        "nested": (serial(serial(Conv2D(2, 3, method="auto"), Relu()), Flatten(), Dense(3)), 1),
        "residual-block": (Residual(serial(Conv2D(1, 3, padding="SAME", method="taps"), Relu())), 1),
        "residual-shortcut": (Residual(Conv2D(2, 3, padding="SAME", method="conv"), Conv2D(2, 1, method="im2col")), 2),
        "residual-only-shortcut": (Residual(serial(Relu(), Tanh()), Conv2D(1, 1, method="taps")), 1),
    }


@pytest.mark.parametrize("name", list(_composed_networks()))
def test_serial_and_residual_compose_autodiff_forward(name):
    net, n_convs = _composed_networks()[name]
    assert net.autodiff_forward is not None
    assert layers.autodiff_forward(net) is net.autodiff_forward
    params, state, x, _ = setup(net, GRAY)
    y, new_state, res = jax.jit(net.forward)(params, state, x)
    y_ad, new_state_ad, res_ad = jax.jit(net.autodiff_forward)(params, state, x)
    np.testing.assert_allclose(y_ad, y, rtol=1e-13, atol=1e-15)
    assert jax.tree_util.tree_structure((new_state_ad, res_ad)) == jax.tree_util.tree_structure((new_state, res))
    # Every Conv2D of the network, whatever its method, is a lax convolution in the autodiff form.
    assert _conv_count(lambda p, x: net.autodiff_forward(p, state, x)[0], params, x) == n_convs
    n_lax_in_forward = {"serial-mixed": 1, "residual-shortcut": 1}.get(name, 0)
    assert _conv_count(lambda p, x: net.forward(p, state, x)[0], params, x) == n_lax_in_forward


def test_composed_autodiff_forward_in_training_mode_keeps_state_and_keys():
    """BatchNorm's running statistics and Dropout's mask come out of both forms alike: serial hands each
    layer the same state and the same key in both."""
    net = serial(
        Conv2D(3, 3, padding="SAME", method="taps"),
        BatchNorm(),
        Relu(),
        Dropout(0.5),
        Residual(serial(Conv2D(3, 3, padding="SAME", method="im2col"), BatchNorm())),
        Flatten(),
        Dense(2),
    )
    params, state, x, _ = setup(net, GRAY)
    key = jax.random.PRNGKey(3)
    y, new_state, res = jax.jit(functools.partial(net.forward, train=True))(params, state, x, key=key)
    y_ad, new_state_ad, res_ad = jax.jit(functools.partial(net.autodiff_forward, train=True))(params, state, x, key=key)
    np.testing.assert_allclose(y_ad, y, rtol=1e-12, atol=1e-14)
    for a, b in zip(jax.tree_util.tree_leaves(new_state_ad), jax.tree_util.tree_leaves(new_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
    np.testing.assert_array_equal(res_ad[3], res[3])  # the dropout mask
    assert not np.all(np.asarray(res[3]))


@pytest.mark.parametrize(
    "net",
    [
        pytest.param(lambda: serial(Dense(3), Relu(), Dense(2)), id="mlp"),
        pytest.param(lambda: serial(BatchNorm(), MaxPool2D(2), AvgPool2D(1), GlobalAvgPool(), Dense(2)), id="no-conv"),
        pytest.param(lambda: serial(Conv2D(2, 3, method="conv"), Relu(), Flatten(), Dense(2)), id="conv-method-conv"),
        pytest.param(lambda: Residual(Dense(3)), id="residual-dense"),
        pytest.param(
            lambda: Residual(serial(Conv2D(2, 3, padding="SAME", method="conv")), Conv2D(2, 1, method="conv")),
            id="residual-conv-method-conv",
        ),
        pytest.param(
            lambda: serial(serial(Conv2D(2, 3, method="conv")), Residual(Relu())), id="nested-conv-method-conv"
        ),
    ],
)
def test_autodiff_forward_is_none_when_forward_already_is_the_lax_form(net):
    net = net()
    assert net.autodiff_forward is None
    assert layers.autodiff_forward(net) is net.forward


def test_value_and_grad_autodiff_route_differentiates_autodiff_forward():
    """The "autodiff" route runs jax.grad of autodiff_forward, through serial; "autodiff_same_forward" of
    forward. A deliberately different autodiff form (doubled outputs) shows which one ran."""
    dense = Dense(2, dtype=jnp.float64)

    def doubled(params, state, x, *, train=False, key=None):
        y, s, r = dense.forward(params, state, x, train=train, key=key)
        return 2 * y, s, r

    net = serial(dense._replace(autodiff_forward=doubled), Relu())
    assert net.autodiff_forward is not None
    params, state, x, _ = setup(net, (3, 4))
    target = jnp.zeros((3, 2))
    (loss_m, _), g_m = gradients.value_and_grad(net, gradients.mse, "manual")(params, state, x, target)
    (loss_s, _), g_s = gradients.value_and_grad(net, gradients.mse, "autodiff_same_forward")(params, state, x, target)
    (loss_a, (pred_a, _)), g_a = gradients.value_and_grad(net, gradients.mse, "autodiff")(params, state, x, target)
    assert loss_s == loss_m
    np.testing.assert_allclose(loss_a, 4 * loss_m, rtol=1e-14)  # mse of doubled outputs
    np.testing.assert_allclose(pred_a, 2 * net.forward(params, state, x)[0], rtol=1e-14)
    np.testing.assert_allclose(g_s[0]["w"], g_m[0]["w"], rtol=1e-13)
    np.testing.assert_allclose(g_a[0]["w"], 4 * g_m[0]["w"], rtol=1e-13)


@pytest.mark.parametrize(
    "make, shape, match",
    [
        (lambda: Conv2D(4, 3, groups=2), (1, 5, 5, 3), "groups=2 does not divide the 3 input channels"),
        (lambda: Conv2D(3, 3, groups=2), (1, 5, 5, 4), "groups=2 does not divide the 3 output features"),
        (lambda: Conv2D(4, 3), (1, 5, 5), r"expects NHWC inputs \(rank 4\)"),
        (lambda: Conv2D(4, 7), (1, 5, 5, 1), "Conv2D"),
        (lambda: Dense(4), (1, 5, 5), r"expects \(N, features\) inputs"),
        (lambda: MaxPool2D(2), (1, 5), "MaxPool2D"),
        (lambda: GlobalAvgPool(), (1, 5), "GlobalAvgPool"),
        (lambda: BatchNorm(), (5,), "rank >= 2"),
        (lambda: Residual(Conv2D(4, 3, stride=2, padding="SAME")), (1, 6, 6, 4), "give a projection shortcut"),
    ],
)
def test_init_rejects_bad_shapes_with_a_message(make, shape, match):
    with pytest.raises(ValueError, match=match):
        make().init(KEY, shape)


# A pooling layer that its op would reject fails at init, with the op's own message (named after the layer).
POOL_INIT_ERRORS = [
    (
        lambda: MaxPool2D(2, padding=2),
        ops.max_pool2d,
        dict(window=2, padding=2),
        r"padding \(2, 2\) along the height must be smaller than the window height 2",
    ),
    (
        lambda: MaxPool2D(3, padding=((0, 3), (0, 0))),
        ops.max_pool2d,
        dict(window=3, padding=((0, 3), (0, 0))),
        r"padding \(0, 3\) along the height must be smaller than the window height 3",
    ),
    (
        lambda: AvgPool2D(3, padding=(1, 3)),
        ops.avg_pool2d,
        dict(window=3, padding=(1, 3)),
        r"padding \(3, 3\) along the width must be smaller than the window width 3",
    ),
    (
        lambda: AvgPool2D(2, stride=1, padding=((0, 0), (2, 0)), count_include_pad=False),
        ops.avg_pool2d,
        dict(window=2, stride=1, padding=((0, 0), (2, 0)), count_include_pad=False),
        r"padding \(2, 0\) along the width must be smaller than the window width 2",
    ),
    (lambda: MaxPool2D(7), ops.max_pool2d, dict(window=7), "window height 7 exceeds the padded input height 5"),
    (lambda: AvgPool2D(2, stride=0), ops.avg_pool2d, dict(window=2, stride=0), "stride must be positive"),
]


@pytest.mark.parametrize("make, op, hyper, match", POOL_INIT_ERRORS)
def test_pool_init_rejects_what_the_op_rejects_with_the_same_message(make, op, hyper, match):
    layer = make()
    shape = (1, 5, 5, 2)
    with pytest.raises(ValueError, match=match) as from_op:
        op(np.zeros(shape), **hyper)
    with pytest.raises(ValueError, match=match) as from_init:
        layer.init(KEY, shape)
    layer_name, op_name = layer.name.split("(")[0], op.__name__
    assert str(from_op.value).startswith(f"{op_name}: ")
    assert str(from_init.value) == str(from_op.value).replace(f"{op_name}: ", f"{layer_name}: ", 1)
    # Traced init (how models are usually initialised) fails the same way.
    with pytest.raises(ValueError, match=match):
        abstract_init(layer, shape)


@pytest.mark.parametrize(
    "make, op, hyper, out_hw",
    [
        (lambda: MaxPool2D(2, padding=1), ops.max_pool2d, dict(window=2, padding=1), (3, 3)),
        (
            lambda: MaxPool2D(3, stride=2, padding=((0, 2), (2, 0))),
            ops.max_pool2d,
            dict(window=3, stride=2, padding=((0, 2), (2, 0))),
            (3, 3),
        ),
        (lambda: AvgPool2D(3, stride=1, padding=2), ops.avg_pool2d, dict(window=3, stride=1, padding=2), (7, 7)),
        (
            lambda: AvgPool2D(3, padding=(2, 1), count_include_pad=False),
            ops.avg_pool2d,
            dict(window=3, padding=(2, 1), count_include_pad=False),
            (3, 2),
        ),
        (lambda: MaxPool2D(2, padding="SAME"), ops.max_pool2d, dict(window=2, padding="SAME"), (3, 3)),
    ],
)
def test_pool_init_accepts_padding_smaller_than_the_window(make, op, hyper, out_hw):
    layer = make()
    x = tie_free(3, (2, 5, 5, 2))
    params, state, out_shape = layer.init(KEY, (1, 5, 5, 2))
    assert tuple(out_shape) == (1, *out_hw, 2) and params == {} and state == {}
    y, _, residuals = layer.forward(params, state, x)
    np.testing.assert_array_equal(y, op(x, **hyper))
    assert y.shape == (2, *out_hw, 2)
    _, dx = layer.backward(params, residuals, jnp.ones_like(y))
    assert dx.shape == x.shape


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Conv2D(0), "features must be positive"),
        (lambda: Dense(0), "features must be positive"),
        (lambda: Dropout(1.0), r"rate must be in \[0, 1\)"),
        (lambda: Dropout(-0.1), r"rate must be in \[0, 1\)"),
        (lambda: BatchNorm(momentum=1.0), r"momentum must be in \[0, 1\)"),
        (lambda: serial(), "needs at least one layer"),
    ],
)
def test_factories_reject_bad_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---------------------------------------------------------------------------------------------------
# BatchNorm statistics


def test_batchnorm_running_statistics_hand_computed():
    bn = BatchNorm(momentum=0.9, epsilon=1e-5, dtype=jnp.float64)
    params, state, _ = bn.init(KEY, (3, 2))
    x = jnp.array([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]])
    # mean (3, 6); biased variance (8/3, 32/3); unbiased (4, 16).
    y, new_state, _ = bn.forward(params, state, x, train=True)
    np.testing.assert_allclose(new_state["mean"], [0.1 * 3.0, 0.1 * 6.0], rtol=1e-15)
    np.testing.assert_allclose(new_state["var"], [0.9 + 0.1 * 4.0, 0.9 + 0.1 * 16.0], rtol=1e-15)
    np.testing.assert_allclose(y, (x - jnp.array([3.0, 6.0])) / jnp.sqrt(jnp.array([8 / 3, 32 / 3]) + 1e-5), rtol=1e-14)
    # A second step moves the running values again from the updated ones.
    _, state2, _ = bn.forward(params, new_state, x + 1.0, train=True)
    np.testing.assert_allclose(state2["mean"], [0.9 * 0.3 + 0.1 * 4.0, 0.9 * 0.6 + 0.1 * 7.0], rtol=1e-15)
    np.testing.assert_allclose(state2["var"], [0.9 * 1.3 + 0.1 * 4.0, 0.9 * 2.5 + 0.1 * 16.0], rtol=1e-15)


def test_batchnorm_eval_uses_running_statistics_and_leaves_them_alone():
    bn = BatchNorm(epsilon=1e-3, dtype=jnp.float64)
    params, _, _ = bn.init(KEY, (1, 2))
    params = {"scale": jnp.array([2.0, 0.5]), "bias": jnp.array([1.0, -1.0])}
    state = {"mean": jnp.array([0.5, -1.0]), "var": jnp.array([4.0, 0.25])}
    x = jnp.array([[1.0, 2.0], [3.0, -4.0]])
    y, new_state, _ = bn.forward(params, state, x, train=False)
    expected = (x - state["mean"]) / jnp.sqrt(state["var"] + 1e-3) * params["scale"] + params["bias"]
    np.testing.assert_allclose(y, expected, rtol=1e-14)
    assert new_state is state
    # The batch's own statistics play no part: one example gives the same output alone.
    y0, _, _ = bn.forward(params, state, x[:1], train=False)
    np.testing.assert_allclose(y0, expected[:1], rtol=1e-14)


def test_batchnorm_nhwc_statistics_are_per_channel_over_batch_and_space():
    bn = BatchNorm(momentum=0.0, dtype=jnp.float64)  # momentum 0: running = this batch
    params, state, _ = bn.init(KEY, (2, 3, 3, 2))
    x = jax.random.normal(KEY, (2, 3, 3, 2), jnp.float64) * jnp.array([1.0, 3.0]) + jnp.array([0.5, -2.0])
    y, new_state, _ = bn.forward(params, state, x, train=True)
    flat = np.asarray(x).reshape(-1, 2)
    np.testing.assert_allclose(new_state["mean"], flat.mean(0), rtol=1e-13)
    np.testing.assert_allclose(new_state["var"], flat.var(0, ddof=1), rtol=1e-13)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 2).mean(0), 0.0, atol=1e-14)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 2).var(0), flat.var(0) / (flat.var(0) + 1e-5), rtol=1e-12)


def test_batchnorm_float32_state_with_bfloat16_activations_keeps_float32_state():
    bn = BatchNorm()
    params, state, _ = bn.init(KEY, (4, 3))
    x = jax.random.normal(KEY, (4, 3), jnp.bfloat16)
    params_bf16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    y, new_state, _ = bn.forward(params_bf16, state, x, train=True)
    assert y.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in new_state.values())
    y_eval, _, _ = bn.forward(params_bf16, new_state, x, train=False)
    assert y_eval.dtype == jnp.bfloat16


# ---------------------------------------------------------------------------------------------------
# Dropout


def test_dropout_needs_a_key_in_training():
    layer = Dropout(0.5)
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match=r"training mode needs a PRNG key"):
        layer.forward({}, {}, x, train=True)
    # Evaluation is the identity and needs no key; so is rate 0 in training.
    y, _, _ = layer.forward({}, {}, x, train=False)
    assert y is x
    y0, _, res = Dropout(0.0).forward({}, {}, x, train=True)
    assert y0 is x and res is None


def test_dropout_mask_scale_and_determinism():
    layer = Dropout(0.5)
    x = jnp.ones((100, 100), jnp.float64)
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    y1, _, keep = layer.forward({}, {}, x, train=True, key=k1)
    y1_again, _, _ = layer.forward({}, {}, x, train=True, key=k1)
    y2, _, _ = layer.forward({}, {}, x, train=True, key=k2)
    np.testing.assert_array_equal(y1, y1_again)
    assert not np.array_equal(y1, y2)
    assert set(np.unique(np.asarray(y1)).tolist()) == {0.0, 2.0}  # inverted dropout: kept values scaled by 1/(1-p)
    assert abs(float(jnp.mean(y1 == 0)) - 0.5) < 0.03
    _, dx = layer.backward({}, keep, jnp.full((100, 100), 3.0))
    np.testing.assert_array_equal(dx, jnp.where(keep, 6.0, 0.0))  # the same mask, the same scale


def test_dropout_in_serial_gets_distinct_keys_per_layer():
    net = serial(Dropout(0.5), Dropout(0.5))
    x = jnp.ones((1, 1000))
    _, _, (keep1, keep2) = net.forward(*net.init(KEY, (1, 1000))[:2], x, train=True, key=jax.random.PRNGKey(5))
    assert not np.array_equal(keep1, keep2)


# ---------------------------------------------------------------------------------------------------
# with_manual_vjp


def _small_model():
    # Dense layers keep the compiled programs small (the zoo's convolutions go through the same path in
    # test_models.py); BatchNorm (state) and Dropout (key) exercise the custom_vjp's extra arguments.
    # No bias before BatchNorm: in training mode its gradient is exactly 0, so comparing it is comparing noise.
    return serial(Dense(5, use_bias=False), BatchNorm(), Relu(), Dropout(0.3), Dense(3), name="small")


@pytest.fixture(scope="module")
def small_problem():
    model = _small_model()
    params, state, _ = compiled_init(model, KEY, VEC)
    params, state = f64(params), f64(state)
    x = tie_free(1, VEC)
    labels = jnp.array([0, 2, 1])
    return model, params, state, x, labels, jax.random.PRNGKey(9)


def _max_rel(a, b):
    return max(
        float(jnp.max(jnp.abs(u - v)) / jnp.max(jnp.abs(v)))
        for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def test_with_manual_vjp_grad_equals_manual_and_autodiff_under_jit(small_problem):
    model, params, state, x, labels, key = small_problem
    loss = gradients.softmax_cross_entropy
    apply = with_manual_vjp(model, train=True)

    @jax.jit
    def via_custom_vjp(params, x):
        return jax.grad(lambda p, x: loss.value(apply(p, state, x, key)[0], labels), argnums=(0, 1))(params, x)

    g_vjp, dx_vjp = via_custom_vjp(params, x)
    (_, _), g_manual = jax.jit(gradients.value_and_grad(model, loss, "manual"))(params, state, x, labels, key=key)
    (_, _), g_auto = jax.jit(gradients.value_and_grad(model, loss, "autodiff"))(params, state, x, labels, key=key)
    assert jax.tree_util.tree_structure(g_vjp) == jax.tree_util.tree_structure(params)
    assert _max_rel(g_vjp, g_manual) <= 1e-12
    assert _max_rel(g_vjp, g_auto) <= 1e-10
    # The input gradient too, against jax.grad of the plain forward.
    dx_auto = jax.grad(lambda x: loss.value(model.forward(params, state, x, train=True, key=key)[0], labels))(x)
    assert _max_rel(dx_vjp, dx_auto) <= 1e-10


def test_with_manual_vjp_returns_the_new_state_and_forward_values(small_problem):
    model, params, state, x, _, key = small_problem
    y, new_state = jax.jit(with_manual_vjp(model, train=True))(params, state, x, key)
    y_ref, state_ref, _ = model.forward(params, state, x, train=True, key=key)
    np.testing.assert_allclose(y, y_ref, rtol=1e-13, atol=1e-15)  # jit vs eager: rounding only
    for a, b in zip(jax.tree_util.tree_leaves(new_state), jax.tree_util.tree_leaves(state_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
    # Evaluation mode, no key.
    y_eval, _ = with_manual_vjp(model)(params, state, x)
    np.testing.assert_array_equal(y_eval, model.forward(params, state, x)[0])


def test_with_manual_vjp_runs_the_hand_written_backward():
    """A backward deliberately scaled by 3 must show up scaled in jax.grad: proof that custom_vjp is used
    (jax.grad of the forward alone would give the unscaled gradient)."""
    dense = Dense(2, dtype=jnp.float64)
    scaled = _scaled_backward(dense, 3.0)
    params, state, _ = compiled_init(dense, KEY, (3, 4))
    x = jax.random.normal(KEY, (3, 4), jnp.float64)

    def objective(layer):
        apply = with_manual_vjp(layer)
        return jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(apply(p, state, x)[0])), argnums=(0, 1)))

    g_true, dx_true = objective(dense)(params, x)
    g_scaled, dx_scaled = objective(scaled)(params, x)
    g_auto = jax.grad(lambda p: jnp.sum(jnp.sin(dense.forward(p, state, x)[0])))(params)
    np.testing.assert_allclose(g_true["w"], g_auto["w"], rtol=1e-13)
    np.testing.assert_allclose(g_scaled["w"], 3.0 * g_auto["w"], rtol=1e-13)
    np.testing.assert_allclose(g_scaled["b"], 3.0 * g_true["b"], rtol=1e-13)
    np.testing.assert_allclose(dx_scaled, 3.0 * dx_true, rtol=1e-13)
    # jax.vjp sees the same hand-written backward.
    _, vjp = jax.vjp(lambda p: with_manual_vjp(scaled)(p, state, x)[0], params)
    (g_vjp,) = vjp(jnp.ones((3, 2)))
    np.testing.assert_allclose(g_vjp["b"], 3.0 * 3.0 * jnp.ones(2), rtol=1e-13)


def test_with_manual_vjp_state_and_key_cotangents_are_zero(small_problem):
    model, params, state, x, _labels, key = small_problem
    apply = with_manual_vjp(model, train=True)
    d_state = jax.grad(lambda s: jnp.sum(apply(params, s, x, key)[0]))(state)
    for leaf in jax.tree_util.tree_leaves(d_state):
        np.testing.assert_array_equal(leaf, 0.0)


def test_layers_module_exports_the_documented_layers():
    for name in (
        "Conv2D",
        "Dense",
        "BatchNorm",
        "Dropout",
        "MaxPool2D",
        "AvgPool2D",
        "GlobalAvgPool",
        "Flatten",
        "Relu",
        "LeakyRelu",
        "Sigmoid",
        "Tanh",
        "Softmax",
        "LogSoftmax",
        "serial",
        "Residual",
    ):
        assert callable(getattr(layers, name))
