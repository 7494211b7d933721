"""Recipes and the settings they use: resolution (recipe < explicit settings), ``--recipe`` and ``config.json``,
label smoothing through a whole model (three ways), the learning-rate schedules with warm-up, rotations,
zooms and mirror images, and evaluation every N epochs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jaxcnn
from jaxcnn import gradients
from jaxcnn.layers import Conv2D, Dense, Flatten, Relu, serial
from jaxcnn.models import MODELS
from jaxcnn.train import ConfigError, TrainConfig, make_optimizer
from jaxcnn.train.config import array_settings
from jaxcnn.train.inputs import (
    ELASTIC_SIGMA,
    Augmentation,
    background,
    elastic_displacement,
    random_affine,
    random_flip,
    rotate_and_zoom,
)
from jaxcnn.train.recipes import DEFAULT_RECIPE, RECIPES, describe, get_recipe, resolve

QUIET = dict(log=lambda s: None, progress=False)


# ---------------------------------------------------------------------------------------------------
# Recipes


def test_every_recipe_is_a_valid_partial_configuration():
    fields = set(TrainConfig.__dataclass_fields__)
    assert DEFAULT_RECIPE in RECIPES
    for name, recipe in RECIPES.items():
        assert recipe.name == name and recipe.description
        assert set(recipe.settings) <= fields, name
        config = resolve(name, {})
        for key, value in recipe.settings.items():
            assert getattr(config, key) == value, (name, key)
        assert config.model in MODELS
        assert describe(recipe).startswith(f"{name}: ")
    assert resolve("classic", {}) == TrainConfig()


def test_explicit_settings_override_the_recipe():
    config = resolve("mnist", {"epochs": 3, "lr": 0.01, "model": "lenet5"})
    assert (config.epochs, config.lr, config.model) == (3, 0.01, "lenet5")
    # The recipe's other settings stay; explicit settings equal to a field default still override.
    assert config.label_smoothing == RECIPES["mnist"].settings["label_smoothing"]
    assert resolve("mnist", {"label_smoothing": 0.0}).label_smoothing == 0.0
    assert resolve(None, {"epochs": 2}) == TrainConfig(epochs=2)


def test_recipe_errors_are_one_line():
    with pytest.raises(
        ConfigError, match=r"^--recipe must be one of mnist, fashion_quick, fashion, classic, got 'fast'$"
    ):
        get_recipe("fast")
    with pytest.raises(ConfigError, match=r"^unknown setting 'epoch'$"):
        resolve("mnist", {"epoch": 3})
    with pytest.raises(ConfigError, match=r"^--label-smoothing must be in \[0, 1\), got 1.0$"):
        resolve("mnist", {"label_smoothing": 1.0})


def test_fit_applies_a_recipe_but_not_its_model(tmp_path):
    """``fit(recipe=...)`` takes the recipe's array settings, explicit keywords over them, and records both the
    recipe and the resolved settings in config.json."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 12, 12, 1), dtype=np.uint8)
    labels = (images.reshape(64, -1).mean(axis=1) > images.mean()).astype(np.int32)
    model = serial(Flatten(), Dense(2), name="tiny")
    fitted = jaxcnn.fit(
        model,
        gradients.softmax_cross_entropy,
        (images, labels),
        (images[:16], labels[:16]),
        recipe="mnist",
        epochs=2,
        batch_size=16,
        out=tmp_path,
        **QUIET,
    )
    assert [r["epoch"] for r in fitted.history] == [1, 2]
    # The recipe evaluates after the last epoch only.
    assert "test_accuracy" not in fitted.history[0] and "test_accuracy" in fitted.history[1]
    recorded = json.loads((tmp_path / "config.json").read_text())
    assert recorded["recipe"] == "mnist" and recorded["network"] == "tiny"
    assert "model" not in recorded  # a preset of jaxcnn train, not of fit
    for key, value in RECIPES["mnist"].settings.items():
        if key in array_settings() and key not in ("epochs",):
            assert recorded[key] == value, key
    assert recorded["epochs"] == 2 and recorded["batch_size"] == 16


# ---------------------------------------------------------------------------------------------------
# Label smoothing


def test_label_smoothed_loss_through_a_model_three_ways():
    """The label-smoothed loss under a network: the hand-written gradient against jax.grad of the same forward
    and against central finite differences, in float64."""
    loss = gradients.label_smoothed_cross_entropy(0.2)
    model = serial(Conv2D(3, 3, padding="SAME"), Relu(), Flatten(), Dense(4), name="ls_net")
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 5, 2), jnp.float64)
    labels = jnp.array([0, 3, 1])
    params, state, _ = model.init(jax.random.PRNGKey(1), x.shape)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
    (value, _), manual = gradients.value_and_grad(model, loss, "manual")(params, state, x, labels)
    _, witness = gradients.value_and_grad(model, loss, "autodiff_same_forward")(params, state, x, labels)
    for got, want in zip(jax.tree_util.tree_leaves(manual), jax.tree_util.tree_leaves(witness), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)

    def objective(p):
        return loss.value(model.forward(p, state, x, train=True)[0], labels)

    leaves, treedef = jax.tree_util.tree_flatten(params)
    grads = jax.tree_util.tree_leaves(manual)
    for i, (leaf, g) in enumerate(zip(leaves, grads, strict=True)):
        direction = jax.random.normal(jax.random.PRNGKey(10 + i), leaf.shape, jnp.float64)

        def moved(sign, i=i, direction=direction, h=1e-6):
            new = list(leaves)
            new[i] = leaves[i] + sign * h * direction
            return float(objective(jax.tree_util.tree_unflatten(treedef, new)))

        finite_difference = (moved(1) - moved(-1)) / 2e-6
        np.testing.assert_allclose(float(jnp.vdot(g, direction)), finite_difference, rtol=1e-7)
    # The smoothed value: the plain cross-entropy mixed with the mean negative log-probability.
    logits = model.forward(params, state, x, train=True)[0]
    log_p = jax.nn.log_softmax(logits)
    plain = -log_p[jnp.arange(3), labels]
    np.testing.assert_allclose(float(value), float(jnp.mean(0.8 * plain - 0.2 * log_p.mean(axis=1))), rtol=1e-13)


def test_label_smoothing_zero_is_the_plain_loss_and_bad_values_are_refused():
    assert gradients.label_smoothed_cross_entropy(0.0) is gradients.softmax_cross_entropy
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\), got -0.1"):
        gradients.label_smoothed_cross_entropy(-0.1)
    with pytest.raises(ValueError, match=r"softmax_cross_entropy: label_smoothing must be in \[0, 1\), got 1.5"):
        jaxcnn.ops.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.array([0, 1]), label_smoothing=1.5)


def test_label_smoothing_needs_softmax_cross_entropy_and_reports_the_plain_test_loss():
    rng = np.random.default_rng(1)
    images = rng.random((32, 6, 6, 1), dtype=np.float32)
    labels = rng.integers(0, 3, 32)
    model = serial(Flatten(), Dense(3), name="linear")
    with pytest.raises(
        ConfigError, match=r"^--label-smoothing smooths the labels of softmax cross-entropy; this run's"
    ):
        jaxcnn.fit(model, gradients.mse, (images, np.eye(3)[labels]), label_smoothing=0.1, **QUIET)
    fitted = jaxcnn.fit(
        model,
        gradients.softmax_cross_entropy,
        (images, labels),
        (images, labels),
        epochs=1,
        batch_size=32,
        lr=1e-9,
        augment=0,
        label_smoothing=0.3,
        **QUIET,
    )
    params, state = fitted.params, fitted.state
    logits = model.forward(params, state, jnp.asarray(images))[0]
    plain = float(gradients.softmax_cross_entropy.value(logits, jnp.asarray(labels)))
    np.testing.assert_allclose(fitted.history[0]["test_loss"], plain, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Schedules


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "step"])
def test_warmup_rises_linearly_then_the_schedule_takes_over(schedule):
    config = TrainConfig(epochs=10, lr=0.2, schedule=schedule, warmup=0.25, optimizer="sgd", momentum=0.0)
    tx = make_optimizer(config, steps_per_epoch=10)  # 100 steps, 25 of warm-up
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    rates = []
    for _ in range(100):
        updates, state = tx.update({"w": jnp.ones(())}, state, params)
        rates.append(-float(updates["w"]))
    rates = np.array(rates)
    np.testing.assert_allclose(rates[:25], 0.2 * np.arange(25) / 25, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(rates[25], 0.2, rtol=1e-6)
    if schedule == "linear":
        np.testing.assert_allclose(rates[25:], 0.2 * (1 - np.arange(75) / 75), rtol=1e-5, atol=1e-8)
    elif schedule == "cosine":
        np.testing.assert_allclose(rates[25:], 0.1 * (1 + np.cos(np.pi * np.arange(75) / 75)), rtol=1e-5, atol=1e-8)
    elif schedule == "constant":
        np.testing.assert_allclose(rates[25:], 0.2, rtol=1e-6)
    else:
        assert rates[25 + 36] == pytest.approx(0.2) and rates[25 + 37] == pytest.approx(0.02)  # x0.1 at 37 of 75


def test_linear_schedule_without_warmup_decays_to_zero():
    tx = make_optimizer(TrainConfig(epochs=1, lr=0.1, schedule="linear", momentum=0.0), steps_per_epoch=4)
    params = {"w": jnp.zeros(())}
    state, rates = tx.init(params), []
    for _ in range(4):
        updates, state = tx.update({"w": jnp.ones(())}, state, params)
        rates.append(-float(updates["w"]))
    np.testing.assert_allclose(rates, [0.1, 0.075, 0.05, 0.025], rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Augmentation


def test_rotate_and_zoom_quarter_turn_identity_and_zoom():
    x = np.arange(1.0, 26.0, dtype=np.float32).reshape(1, 5, 5, 1)
    x2 = np.concatenate([x, 10 * x], axis=-1)  # two channels, turned alike
    quarter = np.asarray(rotate_and_zoom(jnp.asarray(x2), jnp.array([np.pi / 2]), jnp.array([1.0])))
    np.testing.assert_allclose(quarter[0, ..., 0], np.rot90(x[0, ..., 0]), atol=1e-4)  # counter-clockwise
    np.testing.assert_allclose(quarter[0, ..., 1], np.rot90(10 * x[0, ..., 0]), atol=1e-3)
    same = rotate_and_zoom(jnp.asarray(x), jnp.zeros(1), jnp.ones(1))
    np.testing.assert_allclose(same, x, atol=1e-5)
    # Zoom 2 about the centre pixel: output (r, c) reads input (2 + (r-2)/2, 2 + (c-2)/2), bilinearly.
    zoomed = np.asarray(rotate_and_zoom(jnp.asarray(x), jnp.zeros(1), jnp.full(1, 2.0)))[0, ..., 0]
    rows = 2 + (np.arange(5) - 2) / 2
    expected = np.array([[1 + 5 * r + c for c in rows] for r in rows])  # x is linear in (row, col)
    np.testing.assert_allclose(zoomed, expected, atol=1e-4)


def test_rotations_fill_with_the_background_and_keep_a_constant_image():
    """A digit on a background of -0.42 (as after normalisation): corners a rotation uncovers take the
    background; an image of one value stays that value."""
    x = np.full((2, 28, 28, 1), -0.42, np.float32)
    x[:, 8:20, 12:16] = 2.5
    y = np.asarray(random_affine(jax.random.PRNGKey(0), jnp.asarray(x), 30.0, 0.2))
    assert y.shape == x.shape and np.all(np.isfinite(y))
    np.testing.assert_allclose(y[:, 0, 0], -0.42, atol=1e-5)
    np.testing.assert_allclose(np.asarray(background(jnp.asarray(y)))[:, 0, 0, 0], -0.42, atol=1e-5)
    assert not np.allclose(y, x)
    constant = np.full((3, 7, 9, 2), 0.3, np.float32)
    np.testing.assert_allclose(
        random_affine(jax.random.PRNGKey(1), jnp.asarray(constant), 45.0, 0.3), constant, atol=1e-6
    )
    assert random_affine(jax.random.PRNGKey(0), jnp.asarray(x), 0.0, 0.0) is not None
    np.testing.assert_array_equal(random_affine(jax.random.PRNGKey(0), jnp.asarray(x), 0.0, 0.0), x)


def test_elastic_displacement_is_smooth_and_of_the_documented_size():
    """Uniform noise smoothed by a normalised Gaussian of sigma 4 has, away from the border, a standard deviation
    of ``alpha * sqrt(1/3) / (2 sqrt(pi) sigma)`` per axis; neighbouring pixels move almost alike."""
    d = np.asarray(elastic_displacement(jax.random.PRNGKey(0), (2048, 28, 28), 34.0))
    assert d.shape == (2048, 28, 28, 2) and d.dtype == np.float32
    centre = d[:, 10:18, 10:18]
    expected = 34.0 * np.sqrt(1 / 3) / (2 * np.sqrt(np.pi) * ELASTIC_SIGMA)
    # The centre of one field moves nearly as one value: about 2 * 2048 independent samples.
    assert abs(centre.std() - expected) < 0.06 * expected
    assert abs(centre.mean()) < 4 * expected / np.sqrt(2 * 2048)
    step = np.abs(np.diff(centre, axis=1)).mean()
    assert step < 0.2 * np.abs(centre).mean()  # smooth: a 1-pixel step moves far less than the field itself
    np.testing.assert_array_equal(elastic_displacement(jax.random.PRNGKey(0), (2, 5, 6), 0.0), np.zeros((2, 5, 6, 2)))


def test_a_displacement_moves_where_each_pixel_reads():
    """A displacement of one row everywhere reads every pixel one row further down; the uncovered row takes
    the background; with no rotation or zoom and no displacement the image is unchanged."""
    x = np.arange(1.0, 31.0, dtype=np.float32).reshape(1, 5, 6, 1)
    one_row = np.zeros((1, 5, 6, 2), np.float32)
    one_row[..., 0] = 1.0
    y = np.asarray(rotate_and_zoom(jnp.asarray(x), jnp.zeros(1), jnp.ones(1), jnp.asarray(one_row)))
    np.testing.assert_allclose(y[0, :4], x[0, 1:], atol=1e-5)
    np.testing.assert_allclose(y[0, 4, :, 0], np.asarray(background(jnp.asarray(x)))[0, 0, 0, 0], atol=1e-5)
    np.testing.assert_allclose(
        rotate_and_zoom(jnp.asarray(x), jnp.zeros(1), jnp.ones(1), jnp.zeros((1, 5, 6, 2))), x, atol=1e-5
    )


def test_elastic_augmentation_keeps_the_other_settings_draws():
    """Turning ``elastic`` on adds a displacement; the angles and zooms of the other settings are drawn as
    before (the displacement has a key of its own), and ``elastic=0`` is what the earlier versions drew."""
    x = np.full((4, 28, 28, 1), 0.1, np.float32)
    x[:, 6:22, 12:16] = 1.0
    x = jnp.asarray(x)
    key = jax.random.PRNGKey(5)
    plain = Augmentation(shift=1, rotate=10.0, scale=0.1)
    np.testing.assert_array_equal(Augmentation(shift=1, rotate=10.0, scale=0.1, elastic=0.0)(key, x), plain(key, x))
    bent = np.asarray(Augmentation(rotate=10.0, scale=0.1, elastic=34.0)(key, x))
    assert bent.shape == x.shape and np.all(np.isfinite(bent))
    assert not np.allclose(bent, Augmentation(rotate=10.0, scale=0.1)(key, x), atol=1e-3)
    # Elastic alone draws the same angle-and-zoom keys, with no rotation or zoom: a constant image stays constant.
    constant = jnp.full((3, 8, 8, 1), 0.7)
    np.testing.assert_allclose(Augmentation(elastic=50.0)(key, constant), constant, atol=1e-6)


def test_flip_mirrors_about_half_of_the_images():
    x = jnp.asarray(np.random.default_rng(0).random((400, 3, 4, 1), dtype=np.float32))
    y = np.asarray(random_flip(jax.random.PRNGKey(0), x))
    mirrored = np.all(y == np.asarray(x)[:, :, ::-1], axis=(1, 2, 3))
    kept = np.all(y == np.asarray(x), axis=(1, 2, 3))
    assert np.all(mirrored ^ kept) and 150 < mirrored.sum() < 250


def test_augmentation_of_a_shift_alone_is_the_shift_it_always_was():
    """``Augmentation(shift=2)`` draws with the same key as the shift of earlier versions (so that the default
    runs and their resumed checkpoints are unchanged), and an int still means a shift."""
    from jaxcnn.train import random_shift
    from jaxcnn.train.inputs import as_augmentation

    x = jnp.asarray(np.random.default_rng(0).random((8, 10, 10, 1), dtype=np.float32))
    key = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(Augmentation(shift=2)(key, x), random_shift(key, x, 2))
    assert as_augmentation(2) == Augmentation(shift=2)
    both = Augmentation(shift=1, rotate=10.0, scale=0.1, flip=True)(key, x)
    assert both.shape == x.shape and not np.allclose(both, x)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"rotate": -1.0}, r"--rotate must be between 0 and 180 degrees, got -1.0"),
        ({"scale": 1.0}, r"--scale must be in \[0, 1\), got 1.0"),
        ({"flip": 1}, r"--flip must be true or false, got 1"),
        ({"elastic": -2.0}, r"--elastic must be between 0 and 100, got -2.0"),
        ({"warmup": 1.0}, r"--warmup must be a fraction in \[0, 1\), got 1.0"),
        ({"eval_every": -1}, r"--eval-every must be >= 0, got -1"),
        ({"schedule": "onecycle"}, r"--schedule must be one of constant, cosine, linear, step, got 'onecycle'"),
    ],
)
def test_new_settings_are_checked(settings, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        TrainConfig(**settings).validate()


def test_eval_every_evaluates_every_n_epochs_and_the_last():
    rng = np.random.default_rng(2)
    images = rng.random((32, 6, 6, 1), dtype=np.float32)
    labels = rng.integers(0, 2, 32)
    model = serial(Flatten(), Dense(2), name="linear")
    data = dict(train=(images, labels), test=(images, labels))
    for every, evaluated in ((2, [2, 4, 5]), (0, [5]), (1, [1, 2, 3, 4, 5])):
        history = jaxcnn.fit(
            model, gradients.softmax_cross_entropy, **data, epochs=5, batch_size=16, eval_every=every, **QUIET
        ).history
        assert [r["epoch"] for r in history if "test_accuracy" in r] == evaluated, every


# ---------------------------------------------------------------------------------------------------
# Test-time augmentation


def test_tta_flip_averages_the_outputs_of_each_image_and_its_mirror_image():
    from jaxcnn.train.step import eval_outputs, make_step

    model = serial(Conv2D(2, 3, padding="SAME"), Relu(), Flatten(), Dense(3), name="lopsided")
    params, state, _ = model.init(jax.random.PRNGKey(0), (1, 5, 6, 1))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 5, 6, 1))
    plain = make_step(model, gradients.softmax_cross_entropy, None)
    flipped = make_step(model, gradients.softmax_cross_entropy, None, tta="flip")
    one = eval_outputs(plain, params, state, x)
    mirror = eval_outputs(plain, params, state, x[:, :, ::-1])
    assert not np.allclose(one, mirror)  # the network is not symmetric, so the average is not trivial
    np.testing.assert_allclose(eval_outputs(flipped, params, state, x), (one + mirror) / 2, rtol=1e-12, atol=1e-12)


def test_tta_reaches_the_test_accuracy_and_the_loaded_checkpoint(tmp_path):
    """A run with ``tta="flip"`` scores its test set on the averaged outputs, and jaxcnn.evaluate on its
    checkpoint (which records the setting) reproduces that accuracy."""
    rng = np.random.default_rng(3)
    images = rng.random((96, 8, 8, 1), dtype=np.float32)
    labels = (images[:, :, :4].mean(axis=(1, 2, 3)) > images[:, :, 4:].mean(axis=(1, 2, 3))).astype(np.int32)
    model = serial(Flatten(), Dense(2), name="halves")
    fitted = jaxcnn.fit(
        model,
        gradients.softmax_cross_entropy,
        (images, labels),
        (images, labels),
        epochs=2,
        batch_size=32,
        augment=0,
        tta="flip",
        out=tmp_path,
        **QUIET,
    )
    logits = model.forward(fitted.params, fitted.state, jnp.asarray(images))[0]
    mirrored = model.forward(fitted.params, fitted.state, jnp.asarray(images[:, :, ::-1]))[0]
    want = float(np.mean(np.argmax(np.asarray(logits + mirrored), axis=1) == labels))
    assert fitted.history[-1]["test_accuracy"] == pytest.approx(want)
    checkpoint = jaxcnn.load_checkpoint(tmp_path, model)
    assert jaxcnn.evaluate(checkpoint, images, labels).accuracy == pytest.approx(want)
    with pytest.raises(ConfigError, match=r"^--tta must be one of none, flip, got 'shift'$"):
        TrainConfig(tta="shift").validate()
