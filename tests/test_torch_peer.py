"""The PyTorch peer of ``jaxcnn train`` (``experiments/torch_peer.py``) follows jaxcnn's recipe: the learning rate
of every step is optax's, the rotation, zoom and shift are jaxcnn's, and a run writes ``config.json`` and
``metrics.jsonl`` with ``jaxcnn train``'s keys. Skipped without PyTorch, which jaxcnn never depends on."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
import pytest
from conftest import REPO

import jax
import jax.numpy as jnp
import optax

torch = pytest.importorskip("torch")
F = torch.nn.functional

sys.path.insert(0, str(REPO))  # ``experiments`` is a directory of scripts beside the package, not installed

from experiments import torch_peer  # noqa: E402  (needs torch and the repository on sys.path, above)
from jaxcnn.train import inputs  # noqa: E402
from jaxcnn.train.config import TrainConfig, make_optimizer  # noqa: E402


def _optax_rates(config: TrainConfig, steps_per_epoch: int, dtype=jnp.float32) -> np.ndarray:
    """The learning rate of each step of jaxcnn's optimiser, jitted as the train step runs it: with momentum 0
    and a gradient of 1, an update is -lr."""
    tx = make_optimizer(config, steps_per_epoch)
    param, update_fn = jnp.zeros((), dtype), jax.jit(tx.update)
    state, rates = tx.init(param), []
    for _ in range(config.epochs * steps_per_epoch):
        update, state = update_fn(jnp.ones((), dtype), state, param)
        rates.append(-float(update))
    return np.array(rates)


def _torch_rates(config: TrainConfig, steps_per_epoch: int) -> np.ndarray:
    """The learning rate each ``optimizer.step()`` of the peer's loop applies (set per step, as the loop does)."""
    param = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    optimizer = torch_peer.make_optimizer(config, [param])
    lr_at = torch_peer.learning_rate(config, steps_per_epoch)
    rates = []
    for step in range(config.epochs * steps_per_epoch):
        torch_peer.set_lr(optimizer, lr_at(step))
        before = param.item()
        param.grad = torch.ones((), dtype=torch.float64)
        optimizer.step()
        rates.append(before - param.item())
    return np.array(rates)


@pytest.mark.parametrize(
    "settings",
    [
        dict(schedule="linear", warmup=0.2),
        dict(schedule="cosine"),
        dict(schedule="cosine", warmup=0.1),
        dict(schedule="step", warmup=0.3),
    ],
    ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()),
)
@pytest.mark.parametrize("epochs,steps_per_epoch", [(3, 13), (2, 3)])
def test_schedule_matches_optax(settings, epochs, steps_per_epoch):
    config = TrainConfig(lr=0.1, epochs=epochs, optimizer="sgd", momentum=0.0, **settings)
    expected = _optax_rates(config, steps_per_epoch)
    got = _torch_rates(config, steps_per_epoch)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    if int(config.warmup * epochs * steps_per_epoch):
        assert got[0] == 0.0  # the warm-up starts from 0


@pytest.mark.parametrize("degrees,zoom", [(12.0, 1.1), (-30.0, 0.85), (90.0, 1.0)])
def test_rotate_and_zoom_matches_jaxcnn(degrees, zoom):
    rng = np.random.default_rng(0)
    x = rng.random((3, 28, 28, 1), dtype=np.float32)
    x += np.float32(0.25) * np.arange(3, dtype=np.float32)[:, None, None, None]  # distinct backgrounds
    angle = np.full(3, np.deg2rad(degrees), np.float32)
    zooms = np.full(3, zoom, np.float32)
    expected = np.asarray(inputs.rotate_and_zoom(jnp.asarray(x), jnp.asarray(angle), jnp.asarray(zooms)))
    got = torch_peer.rotate_and_zoom(
        torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(angle), torch.from_numpy(zooms)
    )
    np.testing.assert_allclose(got.numpy().transpose(0, 2, 3, 1), expected, atol=1e-5)


def test_elastic_distortion_matches_jaxcnn():
    """The same displacement field moves the pixels alike (with a rotation and zoom), and the peer's fields have
    jaxcnn's size."""
    rng = np.random.default_rng(2)
    x = rng.random((3, 28, 28, 1), dtype=np.float32)
    angle, zooms = np.full(3, 0.2, np.float32), np.full(3, 1.1, np.float32)
    moved = np.array(inputs.elastic_displacement(jax.random.PRNGKey(0), (3, 28, 28), 34.0))  # writable, for torch
    expected = np.asarray(inputs.rotate_and_zoom(*map(jnp.asarray, (x, angle, zooms, moved))))
    got = torch_peer.rotate_and_zoom(
        torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), *map(torch.from_numpy, (angle, zooms, moved))
    )
    np.testing.assert_allclose(got.numpy().transpose(0, 2, 3, 1), expected, atol=1e-4)
    torch.manual_seed(0)
    theirs = torch_peer.elastic_displacement(2048, 28, 28, 34.0).numpy()[:, 10:18, 10:18]
    ours = np.asarray(inputs.elastic_displacement(jax.random.PRNGKey(1), (2048, 28, 28), 34.0))[:, 10:18, 10:18]
    assert abs(theirs.std() / ours.std() - 1) < 0.08


def test_shift_matches_jaxcnn():
    rng = np.random.default_rng(1)
    x = rng.random((4, 28, 28, 1), dtype=np.float32)
    key = jax.random.PRNGKey(3)
    expected = np.asarray(inputs.random_shift(key, jnp.asarray(x), 2))
    offsets = torch.from_numpy(np.array(jax.random.randint(key, (4, 2), 0, 5))).long()  # random_shift's draw
    got = torch_peer.shift(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), offsets, 2)
    np.testing.assert_allclose(got.numpy().transpose(0, 2, 3, 1), expected, atol=1e-6)


def _fast_cnn_params_from(net) -> tuple:
    """jaxcnn ``fast_cnn`` parameters holding the PyTorch twin's weights: OIHW kernels as HWIO, and the dense
    kernel's rows from PyTorch's (C, H, W) flattening order to jaxcnn's (H, W, C)."""
    convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in net if isinstance(m, torch.nn.BatchNorm2d)]
    as_jax = lambda t: jnp.asarray(t.detach().numpy())  # noqa: E731
    params: list = []
    for conv, norm in zip(convs, norms, strict=True):  # each block: conv, ReLU, pool, BatchNorm
        params += [{"w": as_jax(conv.weight.permute(2, 3, 1, 0)), "b": as_jax(conv.bias)}, {}, {}]
        params.append({"scale": as_jax(norm.weight), "bias": as_jax(norm.bias)})
    dense = net[-1]
    w = dense.weight.reshape(10, 96, 3, 3).permute(2, 3, 1, 0).reshape(864, 10)
    return (*params, {}, {"w": as_jax(w), "b": as_jax(dense.bias)})


def test_same_weights_and_batches_follow_one_trajectory_in_float64():
    """From the twin's weights, on the same batches, the peer's loss, BatchNorm and Nesterov update compute what
    jaxcnn's do: in float64 every parameter and running statistic agrees after 20 steps. The peer is handed
    optax's learning rates (test_schedule_matches_optax checks the peer's own, to float32 rounding)."""
    from jaxcnn import gradients, models
    from jaxcnn.bench import peers_torch
    from jaxcnn.train.recipes import resolve

    config = resolve("mnist", {"epochs": 2, "warmup": 0.25})
    steps_per_epoch, batch = 10, 16
    images = np.random.default_rng(0).random((steps_per_epoch * batch, 28, 28, 1))
    labels = np.random.default_rng(1).integers(0, 10, steps_per_epoch * batch)
    torch.manual_seed(0)
    net, _ = peers_torch.build("fast_cnn", 1)
    net = net.double()
    with torch.no_grad():
        net.eval()
        net(torch.zeros(1, 1, 28, 28, dtype=torch.float64))  # sizes the lazy dense layer
    net.train()
    optimizer = torch_peer.make_optimizer(config, net.parameters())
    model, loss = models.fast_cnn(), gradients.label_smoothed_cross_entropy(config.label_smoothing)
    with jax.enable_x64(True):
        rates = _optax_rates(dataclasses.replace(config, optimizer="sgd", momentum=0.0), steps_per_epoch, jnp.float64)
        params = _fast_cnn_params_from(net)
        _, state, _ = model.init(jax.random.PRNGKey(0), (1, 28, 28, 1))
        state = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), state)
        tx = make_optimizer(config, steps_per_epoch)
        opt_state = tx.init(params)
        grad_fn = gradients.value_and_grad(model, loss)

        @jax.jit
        def step(params, state, opt_state, x, t):
            (value, (_, state)), grads = grad_fn(params, state, x, t, train=True)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), state, opt_state, value

        for k in range(config.epochs * steps_per_epoch):
            idx = slice((k % steps_per_epoch) * batch, (k % steps_per_epoch + 1) * batch)
            x, t = images[idx], labels[idx]
            params, state, opt_state, value = step(params, state, opt_state, jnp.asarray(x), jnp.asarray(t))
            torch_peer.set_lr(optimizer, float(rates[k]))
            optimizer.zero_grad()
            out = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
            peer_loss = F.cross_entropy(out, torch.from_numpy(t), label_smoothing=config.label_smoothing)
            peer_loss.backward()
            optimizer.step()
            np.testing.assert_allclose(float(value), peer_loss.item(), rtol=1e-9)
        want = _fast_cnn_params_from(net)
        for got, expected in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-7, atol=1e-9)
        norms = [m for m in net if isinstance(m, torch.nn.BatchNorm2d)]
        for i, norm in enumerate(norms):
            np.testing.assert_allclose(np.asarray(state[4 * i + 3]["mean"]), norm.running_mean.numpy(), atol=1e-9)
            np.testing.assert_allclose(np.asarray(state[4 * i + 3]["var"]), norm.running_var.numpy(), rtol=1e-8)


def test_tiny_run_writes_config_and_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--recipe", "classic", "--model", "lenet5", "--epochs", "1", "--dataset", "mnist-offline", "--offline"]
    assert torch_peer.main([*argv, "--train-limit", "512", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "final test accuracy" in printed and "after 1 epoch" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"] == "classic" and config["peer"] == "pytorch" and config["model"] == "lenet5"
    assert config["schedule"] == "cosine" and config["train_limit"] == 512  # the recipe's, and the flag's
    assert {"torch", "threads", "compile", "channels_last"} <= set(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1
    keys = {"epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "images_per_s", "wall_s", "eval_s"}
    assert set(records[0]) == keys
    assert 0 <= records[0]["test_accuracy"] <= 1 and records[0]["wall_s"] >= records[0]["eval_s"] > 0


def test_model_without_a_twin_is_one_line(tmp_path, capsys, monkeypatch):
    def build(model_name, channels):
        raise KeyError(model_name)  # what peers_torch.build raises for a zoo model it has no twin of

    monkeypatch.setattr(torch_peer.peers_torch, "build", build)
    code = torch_peer.main(["--model", "lenet5", "--dataset", "mnist-offline", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "no PyTorch twin" in err and len(err.strip().splitlines()) == 1


def test_compile_starts_from_an_empty_inductor_cache(monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    with torch_peer.cold_inductor_cache(True) as recorded:
        path = os.environ["TORCHINDUCTOR_CACHE_DIR"]
        assert recorded == "fresh" and os.listdir(path) == []
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ and not os.path.exists(path)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/warm")
    with torch_peer.cold_inductor_cache(True) as recorded:
        assert recorded == "/somewhere/warm"  # the user's choice is kept, and recorded
