"""``jaxcnn.fit`` on networks and data outside the zoo: MNIST digits and 32x32 colour images (uint8 and float,
3 and 4 classes), the history it returns, optax optimisers, its one-line configuration errors, class-balanced
``train_limit`` subsets, augmentation's background fill, evaluation by the loss's own per-example form, and
the public train step called from a user's own loop.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from _records import HISTORY_KEYS
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

import jax
import jax.numpy as jnp
import optax

import jaxcnn
from jaxcnn import gradients
from jaxcnn.layers import AvgPool2D, BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, Relu, Tanh, serial
from jaxcnn.train import ConfigError, TrainConfig, Trainer, balanced_subset, make_step, random_shift, train_step
from jaxcnn.train.config import array_settings
from jaxcnn.train.inputs import scaling_for

CE, MSE = gradients.softmax_cross_entropy, gradients.mse
QUIET = dict(log=lambda s: None, progress=False)


def digits_net(classes: int = 10):
    """Not a zoo model: a strided conv with BatchNorm, tanh, average pooling and one dense layer."""
    return serial(
        Conv2D(8, 3, stride=2, padding="SAME", use_bias=False),
        BatchNorm(),
        Tanh(),
        AvgPool2D(2),
        Flatten(),
        Dense(classes),
        name="digits_net",
    )


def colour_net(classes: int):
    return serial(
        Conv2D(8, 3, stride=2, padding="SAME"), Relu(), MaxPool2D(2), Flatten(), Dense(classes), name="colour_net"
    )


def blobs(n: int, seed: int, *, by: str):
    """32x32x3 images in [0, 1] (float64): dim uniform noise and one bright 6x6 square. ``by="colour"``: 3
    classes, the class is the channel the square lights (anywhere in the image); ``by="quadrant"``: 4 classes,
    the class is the quadrant holding the square (in any one channel)."""
    rng = np.random.default_rng(seed)
    classes = 3 if by == "colour" else 4
    labels = rng.integers(0, classes, n)
    x = rng.uniform(0.0, 0.25, (n, 32, 32, 3))
    for i, c in enumerate(labels):
        if by == "colour":
            (r, q), channel = rng.integers(0, 32 - 6, 2), c
        else:
            r, q = rng.integers(0, 16 - 6, 2) + 16 * np.array([c // 2, c % 2])
            channel = rng.integers(0, 3)
        x[i, r : r + 6, q : q + 6, channel] = rng.uniform(0.75, 1.0)
    return x, labels


@pytest.fixture(scope="module", autouse=True)
def _private_compilation_cache(compilation_cache):
    """Every test of this module shares one persistent compilation cache (conftest.py)."""


@pytest.fixture(scope="module")
def sorted_digits(offline):
    """The first 1,000 training examples of the bundled subset, sorted by label (a prefix holds one class)."""
    order = np.argsort(offline.train_labels[:1000], kind="stable")
    return offline.train_images[:1000][order], offline.train_labels[:1000][order]


@pytest.fixture(scope="module")
def mnist_fit(offline, sorted_digits):
    """``digits_net`` trained by ``fit`` for 2 epochs on a 500-image class-balanced ``train_limit`` subset of
    ``sorted_digits``, tested on the subset's 1,000 held-out images."""
    log = []
    net = digits_net()
    result = jaxcnn.fit(
        net,
        CE,
        sorted_digits,
        (offline.test_images, offline.test_labels),
        epochs=2,
        batch_size=25,
        train_limit=500,
        log=log.append,
        progress=False,
    )
    return dict(net=net, result=result, log=log)


# ---------------------------------------------------------------------------------------------------
# Networks and data outside the zoo


def test_a_network_outside_the_zoo_learns_mnist(mnist_fit):
    history = mnist_fit["result"].history
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_accuracy"] > 0.6, history  # chance: 0.1
    assert any(
        line.startswith("digits_net (") and "500 train / 1,000 test images, 20 steps of 25 per epoch" in line
        for line in mnist_fit["log"]
    ), mnist_fit["log"]


@pytest.mark.parametrize("by, dtype", [("colour", np.uint8), ("quadrant", np.float64)])
def test_fit_learns_32x32_colour_images(by, dtype):
    """3 classes from uint8 pixels (scaled to [0, 1] by fit) and 4 classes from float64 pixels (trained as
    float32), both 32x32x3, neither the zoo's size nor its number of classes."""
    x, labels = blobs(900, 1, by=by)
    if dtype == np.uint8:
        x = np.round(x * 255).astype(np.uint8)
    classes = int(labels.max()) + 1
    log = []
    result = jaxcnn.fit(
        colour_net(classes),
        CE,
        (x[:600], labels[:600]),
        (x[600:], labels[600:]),
        epochs=3,
        batch_size=30,
        log=log.append,
        progress=False,
    )
    assert result.params[-1]["w"].shape == (8 * 8 * 8, classes)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(result.params))
    final = result.history[-1]
    assert final["test_accuracy"] > 0.8, result.history  # chance: 1/3 and 1/4
    assert final["train_loss"] < result.history[0]["train_loss"]
    assert "600 train / 300 test images" in log[0]


# ---------------------------------------------------------------------------------------------------
# The history


def test_history_has_exactly_the_documented_keys(mnist_fit, tmp_path):
    history = mnist_fit["result"].history
    for record in history:
        assert tuple(record) == HISTORY_KEYS
        assert isinstance(record["epoch"], int)
        assert all(isinstance(record[k], float) for k in HISTORY_KEYS[1:])
        assert 0 <= record["train_accuracy"] <= 1 and 0 <= record["test_accuracy"] <= 1
        assert record["images_per_s"] > 0 and record["wall_s"] > 0
    # Without test data: no test keys; with ``out``, metrics.jsonl holds the same records.
    x, labels = blobs(120, 2, by="colour")
    result = jaxcnn.fit(colour_net(3), CE, (x, labels), out=tmp_path, epochs=1, batch_size=30, **QUIET)
    assert [list(r) for r in result.history] == [[k for k in HISTORY_KEYS if not k.startswith(("test_", "eval_"))]]
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == result.history
    recorded = json.loads((tmp_path / "config.json").read_text())
    assert recorded["network"] == "colour_net" and recorded["loss"] == "softmax_cross_entropy"
    assert set(recorded) == {"network", "loss", "recipe", "data", *array_settings()} and recorded["recipe"] is None
    assert recorded["data"]["train"]["count"] == 120 and recorded["data"]["test"] is None


# ---------------------------------------------------------------------------------------------------
# Optimisers


def test_an_optax_transformation_is_the_optimiser(tmp_path):
    x, labels = blobs(240, 3, by="quadrant")
    train = (x.astype(np.float32), labels)
    net = colour_net(4)
    init_params, _, _ = net.init(jax.random.fold_in(jax.random.PRNGKey(0), 0), (1, 32, 32, 3))
    tx = optax.adam(1e-2)
    result = jaxcnn.fit(net, CE, train, out=tmp_path, optimizer=tx, epochs=3, batch_size=30, **QUIET)
    # The returned optimiser state is the transformation's own (Adam's moments), and it trained.
    assert jax.tree_util.tree_structure(result.opt_state) == jax.tree_util.tree_structure(tx.init(init_params))
    assert any(isinstance(s, optax.ScaleByAdamState) for s in result.opt_state)
    assert result.history[-1]["train_loss"] < 0.8 * result.history[0]["train_loss"]
    assert json.loads((tmp_path / "config.json").read_text())["optimizer"].startswith("custom ")
    # An update that is always zero leaves the initial parameters (seeded by fold_in(PRNGKey(seed), 0)) as they are.
    frozen = jaxcnn.fit(net, CE, train, optimizer=optax.set_to_zero(), epochs=1, batch_size=30, **QUIET)
    for got, want in zip(jax.tree_util.tree_leaves(frozen.params), jax.tree_util.tree_leaves(init_params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ---------------------------------------------------------------------------------------------------
# Configuration errors: one line, before anything is compiled


def _one_line_config_error(call, match: str) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


def test_fit_rejects_presets_unknown_settings_and_bad_values():
    x, labels = blobs(60, 4, by="colour")
    train = (x, labels)

    def fit(**kwargs):
        return lambda: jaxcnn.fit(colour_net(3), CE, train, **QUIET, **kwargs)

    for preset in ("dataset", "model", "conv_method", "data_dir", "offline"):
        message = _one_line_config_error(fit(**{preset: "x"}), rf"^fit: unknown setting '{preset}'")
        assert "jaxcnn train" in message and "pass the network and the arrays instead" in message
    message = _one_line_config_error(fit(epoch=3), r"^fit: unknown setting 'epoch'; settings are ")
    assert "epochs" in message and "batch_size" in message and "dataset" not in message
    _one_line_config_error(fit(epochs=0), r"^--epochs must be >= 1, got 0$")
    _one_line_config_error(fit(optimizer=object()), r"^--optimizer must be one of sgd, nesterov, adam or an optax")
    _one_line_config_error(fit(batch_size=61), r"^--batch-size 61 exceeds the 60 training examples")


@pytest.mark.parametrize(
    "train, test, match",
    [
        (
            (np.zeros((10, 784), np.float32), np.zeros(10, np.int32)),
            None,
            r"^train images must be NHWC \(N, H, W, C\) or \(N, H, W\), got shape \(10, 784\)$",
        ),
        ((np.zeros((2, 10, 8, 8, 1)), np.zeros(2, np.int32)), None, r"^train images must be NHWC"),
        ((np.zeros((10, 8, 8, 1), np.float32), np.zeros(9, np.int32)), None, r"^train: 10 images but 9 targets$"),
        ((np.zeros((0, 8, 8, 1), np.float32), np.zeros(0, np.int32)), None, r"^train: no examples$"),
        ((np.full((10, 8, 8, 1), "a"), np.zeros(10, np.int32)), None, r"^train images must be uint8 or floating point"),
        (np.zeros((10, 8, 8, 1), np.float32), None, r"^train must be a pair \(images, targets\)$"),
        (
            (np.zeros((10, 8, 8, 1), np.float32), np.zeros(10, np.int32)),
            (np.zeros((5, 8, 8, 1), np.float32), np.zeros(4, np.int32)),
            r"^test: 5 images but 4 targets$",
        ),
        (
            (np.zeros((10, 8, 8, 1), np.float32), np.zeros(10, np.int32)),
            (np.zeros((5, 8, 8, 3), np.float32), np.zeros(5, np.int32)),
            r"^test images \(8, 8, 3\) and train images \(8, 8, 1\) differ in shape$",
        ),
    ],
)
def test_bad_shapes_and_lengths_are_config_errors(train, test, match):
    _one_line_config_error(lambda: jaxcnn.fit(colour_net(3), CE, train, test, batch_size=2, **QUIET), match)


# ---------------------------------------------------------------------------------------------------
# train_limit: a seeded, class-balanced subset


def test_train_limit_draws_a_class_balanced_subset_and_logs_it(mnist_fit, sorted_digits):
    images, labels = sorted_digits
    assert set(labels[:100].tolist()) == {0}  # a prefix would hold one digit
    assert ("train_limit 500: a class-balanced subset (seed 0): 50 each of classes 0-9") in mnist_fit["log"]
    log = []
    trainer = Trainer(
        digits_net(), CE, sorted_digits, None, TrainConfig(train_limit=100, batch_size=10, seed=5), log=log.append
    )
    assert log == ["train_limit 100: a class-balanced subset (seed 5): 10 each of classes 0-9"]
    kept = np.asarray(trainer.train_targets)
    assert trainer.train_count == 100 and np.bincount(kept, minlength=10).tolist() == [10] * 10
    # The kept images are those of the drawn indices (in their original order), with their own labels.
    keep, _counts = balanced_subset(labels, 100, 5)
    np.testing.assert_array_equal(np.asarray(trainer.train_images)[..., 0], images[keep])
    np.testing.assert_array_equal(kept, labels[keep])
    # One-hot float targets are balanced by their argmax; uneven counts are logged class by class.
    onehot = np.eye(10, dtype=np.float32)[labels]
    log = []
    trainer = Trainer(
        digits_net(), MSE, (images, onehot), None, TrainConfig(train_limit=23, batch_size=1), log=log.append
    )
    assert log == [
        "train_limit 23: a class-balanced subset (seed 0): class 0: 3, class 1: 3, class 2: 3, class 3: 2, "
        "class 4: 2, class 5: 2, class 6: 2, class 7: 2, class 8: 2, class 9: 2"
    ]
    assert np.bincount(np.asarray(trainer.train_targets).argmax(1), minlength=10).tolist() == [3] * 3 + [2] * 7
    # A limit at or above the number of examples keeps everything and logs nothing.
    log = []
    assert (
        Trainer(digits_net(), CE, sorted_digits, None, TrainConfig(train_limit=1000), log=log.append).train_count
        == 1000
    )
    assert log == []


@hsettings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=8), n=st.integers(1, 200), seed=st.integers(0, 2**31))
def test_balanced_subset_properties(sizes, n, seed):
    classes = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(sizes)) * 3, sizes))
    total = len(classes)
    keep, counts = balanced_subset(classes, n, seed)
    if n >= total:
        np.testing.assert_array_equal(keep, np.arange(total))
    assert len(keep) == min(n, total) == sum(counts.values())
    assert np.all(np.diff(keep) > 0) and (total == 0 or keep.max() < total)  # distinct, in original order
    values, got = np.unique(classes[keep], return_counts=True)
    assert dict(zip(values.tolist(), got.tolist(), strict=True)) == counts
    present = {int(c): int(s) for c, s in zip(*np.unique(classes, return_counts=True), strict=True)}
    share = min(n, total) // max(len(present), 1)
    for c, size in present.items():
        if size <= share:
            assert counts[c] == size  # a class smaller than its share gives all it has
        elif counts.get(c, 0) < size:  # the others are filled evenly: at most one fewer than the largest count
            assert max(counts.values()) - counts.get(c, 0) <= 1, (present, counts)
    again, _ = balanced_subset(classes, n, seed)
    np.testing.assert_array_equal(keep, again)  # deterministic per seed


def test_balanced_subset_counts_and_seeds():
    classes = np.repeat(np.arange(5), [100, 100, 100, 100, 3])
    keep, counts = balanced_subset(classes, 103, 0)
    assert counts == {0: 25, 1: 25, 2: 25, 3: 25, 4: 3}
    keep, counts = balanced_subset(classes, 104, 0)
    assert sorted(counts.values()) == [3, 25, 25, 25, 26]
    keep_other, _ = balanced_subset(classes, 104, 1)
    assert not np.array_equal(keep, keep_other)  # another seed, another draw
    keep, counts = balanced_subset(classes, 15, 7)
    assert counts == {0: 3, 1: 3, 2: 3, 3: 3, 4: 3}
    keep, counts = balanced_subset(classes, 50, 7)
    assert counts == {0: 12, 1: 12, 2: 12, 3: 11, 4: 3}
    keep, counts = balanced_subset(classes, 1000, 7)
    np.testing.assert_array_equal(keep, np.arange(403))
    assert counts == {0: 100, 1: 100, 2: 100, 3: 100, 4: 3}


# ---------------------------------------------------------------------------------------------------
# Augmentation fills with each image's background


def _shifted(image, dy: int, dx: int, fill):
    """``image`` moved by ``(dy, dx)`` pixels, the uncovered border set to ``fill``."""
    h, w = image.shape[:2]
    out = np.broadcast_to(np.asarray(fill, image.dtype), image.shape).copy()
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def test_random_shift_fills_normalised_digits_with_their_background(offline):
    """Standardised MNIST digits: the background (0 before normalisation) becomes -mean/std; every shifted image
    is its original moved by at most ``s`` pixels with the uncovered border exactly at that value, not 0."""
    images = offline.train_images[..., None]
    ring = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], axis=1)
    digits = images[~ring.any(axis=(1, 2))][:64]  # a plain background at the border, as nearly all MNIST digits
    scaling = scaling_for(images, True)
    x = np.asarray(scaling(jnp.asarray(digits)))
    background = x[0, 0, 0, 0]
    assert background < -0.3 and np.all(x[:, 0] == background)  # -mean/std
    s = 3
    y = np.asarray(random_shift(jax.random.PRNGKey(0), jnp.asarray(x), s))
    assert y.shape == x.shape and y.dtype == np.float32
    moved = 0
    for original, got in zip(x, y, strict=True):
        matches = [
            (dy, dx)
            for dy in range(-s, s + 1)
            for dx in range(-s, s + 1)
            if np.allclose(got, _shifted(original, dy, dx, background), rtol=0, atol=1e-6)
        ]
        assert matches, "not a shift of the original"
        dy, dx = matches[0]
        uncovered = _shifted(np.zeros_like(original), dy, dx, 1.0) == 1.0
        np.testing.assert_array_equal(got[uncovered], background)  # exactly the background
        moved += bool(uncovered.any())
    assert moved >= 48  # most of the 64 images moved (offsets are uniform in [-3, 3]^2)
    assert np.all(np.asarray(random_shift(jax.random.PRNGKey(0), jnp.asarray(x), 0)) == x)


def test_random_shift_fills_colour_images_with_their_border_colour():
    """Per image and channel, the fill is the mean of the outermost ring: a plain border colour is extended."""
    rng = np.random.default_rng(0)
    colours = rng.uniform(-1, 1, (16, 1, 1, 3)).astype(np.float32)
    x = np.broadcast_to(colours, (16, 12, 12, 3)).copy()
    x[:, 4:8, 4:8] = rng.uniform(2, 3, (16, 4, 4, 3))  # content well inside
    y = np.asarray(random_shift(jax.random.PRNGKey(1), jnp.asarray(x), 2))
    np.testing.assert_allclose(y[:, :2], np.broadcast_to(colours, y[:, :2].shape), rtol=0, atol=1e-6)
    np.testing.assert_allclose(y[:, :, -2:], np.broadcast_to(colours, y[:, :, -2:].shape), rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        y.sum(axis=(1, 2), dtype=np.float64), x.sum(axis=(1, 2), dtype=np.float64), rtol=0, atol=1e-4
    )  # content moved, not cut


# ---------------------------------------------------------------------------------------------------
# Evaluation by the loss's own per-example form


def _predictions(net, result, images):
    x = jnp.asarray(images, jnp.float32)
    x = (x[..., None] if x.ndim == 3 else x) / 255.0
    pred, _, _ = net.forward(result.params, result.state, x, train=False)
    return np.asarray(pred, np.float64)


def test_cross_entropy_evaluation_matches_an_independent_computation(mnist_fit, offline):
    logits = _predictions(mnist_fit["net"], mnist_fit["result"], offline.test_images)
    labels = offline.test_labels.astype(np.int64)
    top = logits.max(axis=1)
    nll = top + np.log(np.exp(logits - top[:, None]).sum(axis=1)) - logits[np.arange(len(labels)), labels]
    final = mnist_fit["result"].history[-1]
    assert final["test_loss"] == pytest.approx(nll.mean(), rel=1e-5)
    assert final["test_accuracy"] == pytest.approx(np.mean(logits.argmax(1) == labels), abs=1e-6)


def test_mse_evaluation_matches_an_independent_computation(offline):
    """MSE on float one-hot targets: the reported test loss is the mean over the test set of each example's
    ``0.5 * mean((pred - target)**2)``, accuracy the argmax agreement; 130 test images in batches of 64 (the
    last one masked) and BatchNorm's running statistics in the returned state."""
    eye = np.eye(10, dtype=np.float32)
    train = (offline.train_images[:400], eye[offline.train_labels[:400]])
    test = (offline.test_images[:130], eye[offline.test_labels[:130]])
    net = digits_net()
    result = jaxcnn.fit(net, MSE, train, test, epochs=2, batch_size=20, lr=0.5, eval_batch_size=64, **QUIET)
    pred = _predictions(net, result, test[0])
    expected = np.mean(0.5 * np.mean((pred - test[1]) ** 2, axis=1))
    final = result.history[-1]
    assert final["test_loss"] == pytest.approx(expected, rel=1e-5)
    assert final["test_accuracy"] == pytest.approx(np.mean(pred.argmax(1) == test[1].argmax(1)), abs=1e-6)
    assert final["test_accuracy"] > 0.3  # it learnt something (chance: 0.1)
    assert jax.tree_util.tree_leaves(result.state)  # the running statistics exist and were used above


# ---------------------------------------------------------------------------------------------------
# The train step is the public pure function that the loop scans


def test_a_user_loop_over_train_step_matches_run_steps(offline):
    """``jax.jit(functools.partial(train_step, step))`` called step by step with the loop's documented keys gives
    the parameters, model state and losses that :func:`run_steps` gives over the same batches.

    Not bit for bit: XLA compiles the step inside ``lax.scan`` and on its own with different fusions, so the
    two round differently (measured: <= 2e-5 relative per array after 6 steps). The same loop with another
    dropout key scheme differs by more than 1e-3, so the tolerance below does tell the keys apart.
    """
    net = serial(
        Conv2D(4, 3, stride=2, use_bias=False),
        BatchNorm(),
        Relu(),
        Dropout(0.3),
        Flatten(),
        Dense(10),
        name="dropout_net",
    )
    images = offline.train_images[:320].astype(np.float32)[..., None] / 255.0  # float: fed to the step as they are
    labels = offline.train_labels[:320].astype(np.int32)
    tx = optax.sgd(0.05, momentum=0.9)
    seed, steps = 7, 6
    trainer = Trainer(
        net,
        CE,
        (images, labels),
        None,
        TrainConfig(optimizer=tx, seed=seed, batch_size=32, augment=0, chunk_steps=steps),
        log=lambda s: None,
    )
    batches = trainer.epoch_batches(0)[:steps]
    scanned, metrics = trainer.train_chunk(trainer.init_state(), batches, 0)
    assert np.asarray(metrics["loss"]).shape == (steps,)

    # The user's side: their own initialisation (the documented key), their own step, their own loop.
    root = jax.random.PRNGKey(seed)
    step = jax.jit(functools.partial(train_step, make_step(net, CE, tx)))

    def user_loop(dropout_root):
        params, model_state, _ = net.init(jax.random.fold_in(root, 0), (1, 28, 28, 1))
        state = jaxcnn.train.TrainState(params, model_state, tx.init(params))
        losses = []
        for t, idx in enumerate(batches):
            state, m = step(
                state, jnp.asarray(images[idx]), jnp.asarray(labels[idx]), jax.random.fold_in(dropout_root, t), t
            )
            losses.append(float(m["loss"]))
        return state, np.asarray(losses)

    def max_relative_difference(got, want):
        return max(
            float(np.max(np.abs(np.asarray(g) - np.asarray(w))) / np.max(np.abs(np.asarray(w))))
            for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True)
        )

    state, losses = user_loop(jax.random.fold_in(root, 1))
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(scanned)
    np.testing.assert_allclose(losses, np.asarray(metrics["loss"]), rtol=2e-5, atol=0)
    assert max_relative_difference(state, scanned) <= 1e-4
    other_keys, _ = user_loop(jax.random.fold_in(root, 2))
    assert max_relative_difference(other_keys, scanned) > 1e-3
