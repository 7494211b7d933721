"""Using what was trained: ``load_checkpoint`` rebuilds a zoo run's network and a ``fit`` run's given one,
``predict`` gives what the trained parameters give, ``evaluate`` reproduces the training loop's test
accuracy, a checkpoint that does not fit is refused in one line, and ``jaxcnn evaluate`` / ``predict``
read IDX, ``.npy`` and PNG files; the PNG codec itself."""

from __future__ import annotations

import contextlib
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

import jax

import jaxcnn
from jaxcnn import cli, gradients
from jaxcnn import data as jdata
from jaxcnn.inference import Checkpoint, load_checkpoint
from jaxcnn.layers import Conv2D, Dense, Flatten, MaxPool2D, Relu, serial
from jaxcnn.models import lenet5, seed_net
from jaxcnn.train import ConfigError, TrainConfig, train_and_evaluate
from jaxcnn.train.checkpoint import CHECKPOINT
from jaxcnn.train.inputs import as_images, balanced_subset, scaling_for


@pytest.fixture(scope="module", autouse=True)
def _private_compilation_cache(compilation_cache):
    """Every test of this module shares one persistent compilation cache (conftest.py)."""


def quiet(line):
    pass


def zoo_config(**settings) -> TrainConfig:
    return TrainConfig(
        **{
            "model": "seed_net",
            "dataset": jdata.OFFLINE_NAME,
            "offline": True,
            "epochs": 1,
            "train_limit": 128,
            "batch_size": 32,
            "conv_method": "im2col",
            **settings,
        }
    )


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory):
    """``jaxcnn train``'s path: seed_net, 4 steps, into a directory; ``(directory, FitResult)``."""
    out = tmp_path_factory.mktemp("seed_run")
    return out, train_and_evaluate(zoo_config(), out, log=quiet)


def tiny_net(features: int = 4):
    return serial(
        Conv2D(features, 3, padding="VALID", method="im2col"),
        Relu(),
        MaxPool2D(2),
        Flatten(),
        Dense(10),
        name="tiny_net",
    )


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory, offline):
    """``jaxcnn.fit``'s path: a network of the user's own on the first 512 / 200 offline images."""
    out = tmp_path_factory.mktemp("fit_run")
    train = (offline.train_images[:512], offline.train_labels[:512])
    test = (offline.test_images[:200], offline.test_labels[:200])
    result = jaxcnn.fit(
        tiny_net(), gradients.softmax_cross_entropy, train, test, out=out, epochs=1, batch_size=64, log=quiet
    )
    return out, result, test


def same_accuracy(evaluation, logged: float) -> bool:
    """The loop logs ``correct / n`` in float32: equal at that precision, and the same count of hits."""
    return np.float32(evaluation.accuracy) == np.float32(logged) and round(
        evaluation.accuracy * evaluation.examples
    ) == round(logged * evaluation.examples)


def leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def direct_outputs(model, params, state, images_uint8):
    """The network's evaluation output computed here, without jaxcnn.inference: uint8 / 255, forward."""
    x = as_images(images_uint8, what="test").astype(np.float32) * np.float32(1 / 255)
    y, _, _ = jax.jit(lambda p, s, x: model.forward(p, s, x, train=False))(params, state, x)
    return np.asarray(y, np.float32)


# ---------------------------------------------------------------------------------------------------
# load_checkpoint, predict, evaluate


def test_zoo_run_loads_from_the_directory_or_the_file(seed_run):
    out, result = seed_run
    for where in (out, out / CHECKPOINT, str(out)):
        ck = load_checkpoint(where)
        assert isinstance(ck, Checkpoint) and ck.model.name == "seed_net" and ck.loss is gradients.mse
        assert (ck.epoch, ck.step, ck.input_shape, ck.path) == (1, 0, (1, 28, 28, 1), out / CHECKPOINT)
        assert ck.config["model"] == "seed_net" and ck.preset.name == "seed_net"
        leaves_equal(ck.params, result.params)
        leaves_equal(ck.state, result.state)


def test_predictions_are_what_the_trained_params_give(seed_run, offline):
    out, result = seed_run
    ck = load_checkpoint(out)
    images = offline.test_images[:50]
    got = jaxcnn.predict(ck, images)
    want = direct_outputs(seed_net(conv_method="im2col"), result.params, result.state, images)
    np.testing.assert_allclose(got.outputs, want, rtol=1e-6, atol=1e-7)
    # seed_net: one sigmoid output p = P(digit > 4); probabilities [1 - p, p], class 1 when p > 0.5.
    p = want[:, 0]
    np.testing.assert_array_equal(got.classes, (p > 0.5).astype(np.int64))
    np.testing.assert_allclose(got.probabilities, np.stack([1 - p, p], axis=1), rtol=1e-6, atol=1e-6)
    # A path works as well as a Checkpoint, and float images in [0, 1] predict what uint8 ones do.
    np.testing.assert_array_equal(jaxcnn.predict(out, images).classes, got.classes)
    floats = jaxcnn.predict(ck, images.astype(np.float32) / 255)
    np.testing.assert_allclose(floats.outputs, got.outputs, atol=1e-6)


def test_evaluate_reproduces_the_loops_test_accuracy(seed_run, offline):
    out, result = seed_run
    ck = load_checkpoint(out)
    ev = jaxcnn.evaluate(ck, offline.test_images, ck.targets(offline.test_labels))
    final = result.history[-1]
    assert same_accuracy(ev, final["test_accuracy"])
    assert ev.loss == pytest.approx(final["test_loss"], rel=1e-5)
    assert ev.examples == len(offline.test_images) and ev.confusion.shape == (2, 2)
    assert ev.confusion.sum() == ev.examples
    assert ev.confusion.trace() == round(ev.accuracy * ev.examples)
    truth = (offline.test_labels > 4).astype(int)
    np.testing.assert_array_equal(ev.confusion.sum(axis=1), np.bincount(truth, minlength=2))
    np.testing.assert_allclose(ev.per_class_accuracy, np.diag(ev.confusion) / ev.confusion.sum(axis=1))


def test_a_normalized_run_is_scaled_by_its_training_statistics(tmp_path, offline):
    result = train_and_evaluate(zoo_config(normalize=True, train_limit=64), tmp_path, log=quiet)
    ck = load_checkpoint(tmp_path)
    keep, _ = balanced_subset(offline.train_labels, 64, 0)
    want = scaling_for(as_images(offline.train_images[keep], what="train"), True)
    assert ck.scaling.mean == pytest.approx(want.mean, rel=1e-12)
    assert ck.scaling.std == pytest.approx(want.std, rel=1e-12)
    assert ck.scaling.mean > 0.05
    ev = jaxcnn.evaluate(ck, offline.test_images, ck.targets(offline.test_labels))
    assert same_accuracy(ev, result.history[-1]["test_accuracy"])


def test_a_network_of_your_own_round_trips_with_model(fit_run):
    out, result, (test_images, test_labels) = fit_run
    with pytest.raises(ConfigError, match=r"network of your own \('tiny_net'.*model=") as info:
        load_checkpoint(out)
    assert str(out / CHECKPOINT) in str(info.value) and "\n" not in str(info.value)
    ck = load_checkpoint(out, model=tiny_net())
    assert ck.loss is gradients.softmax_cross_entropy  # resolved from the recorded loss name
    leaves_equal(ck.params, result.params)
    pred = jaxcnn.predict(ck, test_images)
    want = direct_outputs(tiny_net(), result.params, result.state, test_images)
    np.testing.assert_allclose(pred.outputs, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred.probabilities.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(pred.classes, np.argmax(want, axis=1))
    ev = jaxcnn.evaluate(ck, test_images, test_labels)
    assert same_accuracy(ev, result.history[-1]["test_accuracy"])
    assert ev.confusion.shape == (10, 10) and ev.confusion.sum() == len(test_images)
    # from_fit: the same without a file.
    mem = jaxcnn.from_fit(tiny_net(), gradients.softmax_cross_entropy, result)
    assert jaxcnn.evaluate(mem, test_images, test_labels).accuracy == ev.accuracy


def test_a_fit_run_on_float_colour_images_keeps_their_shape_and_scale(tmp_path):
    """The checkpoint's training-set fingerprint gives the input shape and dtype: float images are not divided
    by 255, and no input_shape= is needed for 12x12x3 images."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (64, 12, 12, 3)).astype(np.float32)
    labels = rng.integers(0, 10, 64)
    result = jaxcnn.fit(
        tiny_net(),
        gradients.softmax_cross_entropy,
        (images, labels),
        out=tmp_path,
        epochs=1,
        batch_size=32,
        augment=0,
        log=quiet,
    )
    ck = load_checkpoint(tmp_path, model=tiny_net())
    assert ck.input_shape == (1, 12, 12, 3) and ck.scaling.scale == 1.0
    y, _, _ = jax.jit(lambda p, s, x: tiny_net().forward(p, s, x, train=False))(result.params, result.state, images)
    np.testing.assert_allclose(jaxcnn.predict(ck, images).outputs, np.asarray(y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: lenet5(conv_method="im2col"), r"holds \d+ arrays, the model needs \d+ model arrays"),
        (lambda: tiny_net(features=5), r"array 0 is float32\[4\] but the model's params\[0\]\['b'\] is float32\[5\]"),
    ],
)
def test_a_checkpoint_that_does_not_fit_the_model_is_refused_in_one_line(fit_run, make, message):
    out = fit_run[0]
    with pytest.raises(ConfigError, match=message) as info:
        load_checkpoint(out, model=make())
    text = str(info.value)
    assert "\n" not in text and text.startswith(str(out / CHECKPOINT))
    assert "pass the network it was trained with" in text


def test_missing_and_corrupt_checkpoints_are_one_line_errors(tmp_path, seed_run):
    with pytest.raises(ConfigError, match=r"no checkpoint at .*jaxcnn train --out DIR"):
        load_checkpoint(tmp_path)
    bad = tmp_path / CHECKPOINT
    bad.write_bytes(seed_run[0].joinpath(CHECKPOINT).read_bytes()[:500])
    with pytest.raises(ConfigError, match="is not a readable jaxcnn checkpoint") as info:
        load_checkpoint(tmp_path)
    assert "\n" not in str(info.value)


def test_images_of_another_size_or_no_targets_are_refused(seed_run, offline):
    ck = load_checkpoint(seed_run[0])
    with pytest.raises(ConfigError, match=r"images of shape \(32, 32, 1\).*trained on 28x28 images with 1 channel"):
        jaxcnn.predict(ck, np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(ConfigError, match="3 images but 2 targets"):
        jaxcnn.evaluate(ck, offline.test_images[:3], ck.targets(offline.test_labels[:2]))


# ---------------------------------------------------------------------------------------------------
# jaxcnn evaluate / predict


def run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_cli_evaluate_prints_loss_accuracy_classes_and_confusion(seed_run):
    out, result = seed_run
    code, text, err = run_cli("evaluate", "--out", out)
    assert code == 0, err
    final = result.history[-1]
    assert f"test loss {final['test_loss']:.4f}  accuracy {final['test_accuracy']:.4f}" in text
    assert "class  examples  correct  accuracy" in text and "confusion matrix (rows: true class" in text
    code, text, err = run_cli("evaluate", "--out", out, "--json", "--eval-batch-size", "300")
    record = json.loads(text)
    assert code == 0 and np.float32(record["accuracy"]) == np.float32(final["test_accuracy"])
    assert record["model"] == "seed_net"
    assert np.array(record["confusion"]).sum() == record["examples"] == 1000


def test_cli_evaluate_plot(seed_run):
    pytest.importorskip("matplotlib")
    code, text, err = run_cli("evaluate", "--out", seed_run[0], "--plot")
    assert code == 0, err
    png = seed_run[0] / "evaluation.png"
    assert f"plot written to {png}" in text
    assert jdata.read_png(png).shape[2] in (3, 4)


def test_cli_predict_reads_idx_npy_and_png(tmp_path, seed_run, offline):
    out = seed_run[0]
    images = offline.test_images[:6]
    want = jaxcnn.predict(out, images)
    jdata.write_idx(tmp_path / "a-idx3-ubyte", images[:3])
    np.save(tmp_path / "b.npy", images[3:5])
    jdata.write_png(tmp_path / "c.png", images[5])
    rgb = np.repeat(images[5][..., None], 3, axis=2)
    jdata.write_png(tmp_path / "d.png", np.concatenate([rgb, np.full_like(rgb[..., :1], 255)], axis=2))  # RGBA
    np.save(tmp_path / "e.npy", images[0].astype(np.int64))  # one (H, W) image, int64 pixels 0-255
    files = [tmp_path / n for n in ("a-idx3-ubyte", "b.npy", "c.png", "d.png", "e.npy")]
    code, text, err = run_cli("predict", "--out", out, *files, "--json")
    assert code == 0, err
    rows = json.loads(text)
    assert [(Path(r["file"]).name, r["index"]) for r in rows] == [
        ("a-idx3-ubyte", 0),
        ("a-idx3-ubyte", 1),
        ("a-idx3-ubyte", 2),
        ("b.npy", 0),
        ("b.npy", 1),
        ("c.png", 0),
        ("d.png", 0),
        ("e.npy", 0),
    ]
    expected = [*want.classes.tolist(), int(want.classes[5]), int(want.classes[0])]
    assert [r["class"] for r in rows] == expected
    np.testing.assert_allclose([r["probabilities"] for r in rows[:6]], want.probabilities, atol=1e-6)
    code, text, err = run_cli("predict", "--out", out, files[2])
    assert code == 0 and "index  class  p(class)" in text and "c.png" in text


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("big.png", "png32", r"big.png: images of shape \(32, 32, 1\)"),
        ("notes.txt", b"hello world", "notes.txt: unrecognised image file"),
        ("bad.png", b"\x89PNG\r\n\x1a\n\x00\x00", "bad.png: truncated PNG"),
        ("obj.npy", "object", "obj.npy: unreadable .npy file"),
        ("missing.npy", None, "missing.npy: no such file"),
    ],
)
def test_cli_predict_refuses_unusable_files_in_one_line(tmp_path, seed_run, name, content, message):
    path = tmp_path / name
    if content == "png32":
        jdata.write_png(path, np.zeros((32, 32), np.uint8))
    elif content == "object":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif content is not None:
        path.write_bytes(content)
    code, _, err = run_cli("predict", "--out", seed_run[0], path)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("jaxcnn predict: ") and __import__("re").search(message, lines[0]), lines[0]


def test_cli_refuses_a_fit_run_and_a_missing_checkpoint(tmp_path, fit_run):
    code, _, err = run_cli("evaluate", "--out", fit_run[0])
    assert code == 2 and "network of your own" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("predict", "--out", tmp_path, tmp_path / "x.npy")
    assert code == 2 and "no checkpoint at" in err


def test_cli_evaluate_plot_without_matplotlib_is_one_line(seed_run, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib raises ImportError
    code, _, err = run_cli("evaluate", "--out", seed_run[0], "--plot")
    assert code == 2
    assert err.strip() == "jaxcnn evaluate: --plot needs matplotlib; install it with pip install 'jaxcnn[plots]'"


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"jaxcnn {jaxcnn.__version__}" == "jaxcnn 0.1.0"


# ---------------------------------------------------------------------------------------------------
# The PNG codec


def encode_png(image: np.ndarray, filters: list[int]) -> bytes:
    """A grayscale PNG whose row ``y`` uses filter ``filters[y % len(filters)]`` (written here from the spec)."""
    h, w = image.shape
    img = image.astype(np.int32)
    raw = bytearray()
    for y in range(h):
        kind = filters[y % len(filters)]
        prior = img[y - 1] if y else np.zeros(w, np.int32)
        left = np.concatenate([[0], img[y, :-1]])
        up_left = np.concatenate([[0], prior[:-1]])
        if kind == 0:
            pred = np.zeros(w, np.int32)
        elif kind == 1:
            pred = left
        elif kind == 2:
            pred = prior
        elif kind == 3:
            pred = (left + prior) // 2
        else:
            p = left + prior - up_left
            pa, pb, pc = abs(p - left), abs(p - prior), abs(p - up_left)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prior, up_left))
        raw += bytes([kind]) + ((img[y] - pred) & 0xFF).astype(np.uint8).tobytes()

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(bytes(raw)))
        + chunk(b"IEND", b"")
    )


def test_png_reader_undoes_every_filter_type(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (10, 9), dtype=np.uint8)
    path = tmp_path / "f.png"
    path.write_bytes(encode_png(image, [0, 1, 2, 3, 4]))
    np.testing.assert_array_equal(jdata.read_png(path)[..., 0], image)


@pytest.mark.parametrize("shape", [(28, 28), (5, 7, 3), (4, 6, 4), (3, 3, 2), (1, 1)])
def test_png_round_trip(tmp_path, shape):
    image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    jdata.write_png(tmp_path / "r.png", image)
    np.testing.assert_array_equal(jdata.read_png(tmp_path / "r.png").reshape(shape), image)


def test_png_reader_refuses_corrupt_and_unsupported_files(tmp_path):
    path = tmp_path / "x.png"
    jdata.write_png(path, np.zeros((4, 4), np.uint8))
    blob = bytearray(path.read_bytes())
    blob[30] ^= 0xFF  # inside IHDR: its CRC no longer matches
    path.write_bytes(bytes(blob))
    with pytest.raises(jdata.DataError, match=r"x\.png: corrupt PNG: expected the CRC of chunk b'IHDR'"):
        jdata.read_png(path)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    for depth, interlace in ((16, 0), (8, 1)):
        header = struct.pack(">IIBBBBB", 4, 4, depth, 0, 0, 0, interlace)
        path.write_bytes(
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 40))
            + chunk(b"IEND", b"")
        )
        with pytest.raises(jdata.DataError, match=r"unsupported PNG: expected 8-bit samples, not interlaced.*Re-save"):
            jdata.read_png(path)
