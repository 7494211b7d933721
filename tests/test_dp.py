"""DP-SGD in the train step and in ``jaxcnn.fit``: the step's gradient is the mean of the clipped per-example
gradients plus Gaussian noise of the stated scale, the privacy accountant's epsilon behaves as the Gaussian
mechanism's must, BatchNorm's coupling of examples is refused in one line, and the bfloat16 network keeps
the per-example rules."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax

import jaxcnn
from jaxcnn import gradients
from jaxcnn.layers import BatchNorm, Conv2D, Dense, Flatten, MaxPool2D, Relu, serial
from jaxcnn.train import ConfigError, TrainConfig, TrainState, make_step, privacy, train_step
from jaxcnn.train.step import compute_network

CE = gradients.softmax_cross_entropy
QUIET = dict(log=lambda s: None, progress=False)


def small_net(features: int = 4):
    return serial(Conv2D(features, 3, padding="SAME"), Relu(), MaxPool2D(2), Flatten(), Dense(3), name="small_net")


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(6, 8, 8, 1)), jnp.float32)
    target = jnp.asarray(rng.integers(0, 3, 6), jnp.int32)
    model = small_net()
    params, state, _ = model.init(jax.random.PRNGKey(1), (1, 8, 8, 1))
    return model, params, state, x, target


def _step_gradient(model, params, state, x, target, *, clip, noise, key):
    """The gradient a DP-SGD train step applies: plain SGD with learning rate 1 makes it ``params - new``."""
    step = make_step(model, CE, optax.sgd(1.0), dp_clip=clip, dp_noise_multiplier=noise)
    new, _ = jax.jit(functools.partial(train_step, step))(
        TrainState(params, state, step.tx.init(params)), x, target, key
    )
    return jax.tree_util.tree_map(lambda p, q: p - q, params, new.params)


def test_noiseless_step_applies_the_mean_of_clipped_per_example_gradients(batch):
    model, params, state, x, target = batch
    per_example = gradients.per_example_grads(model, CE, params, state, x, target)
    norms = np.sqrt(
        sum(np.sum(np.asarray(g).reshape(len(x), -1) ** 2, axis=1) for g in jax.tree_util.tree_leaves(per_example))
    )
    clip = float(np.median(norms))  # half the examples are clipped, half are not
    assert (norms > clip).sum() >= 2 and (norms < clip).sum() >= 2
    factor = np.minimum(1.0, clip / norms)
    want = jax.tree_util.tree_map(lambda g: np.tensordot(factor, np.asarray(g), axes=1) / len(x), per_example)
    got = _step_gradient(model, params, state, x, target, clip=clip, noise=0.0, key=jax.random.PRNGKey(2))
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6 * np.abs(w).max())


def test_noise_is_gaussian_with_std_sigma_clip_over_batch(batch):
    _, _, state, x, target = batch
    model = small_net(features=16)  # 931 parameters: the noise's std is estimated to about 2%
    params, _, _ = model.init(jax.random.PRNGKey(1), (1, 8, 8, 1))
    clip, sigma, key = 0.5, 2.0, jax.random.PRNGKey(3)
    clean = _step_gradient(model, params, state, x, target, clip=clip, noise=0.0, key=key)
    noisy = _step_gradient(model, params, state, x, target, clip=clip, noise=sigma, key=key)
    z = np.concatenate(
        [
            (np.asarray(n) - np.asarray(c)).ravel()
            for n, c in zip(jax.tree_util.tree_leaves(noisy), jax.tree_util.tree_leaves(clean), strict=True)
        ]
    )
    z = z * len(x) / (sigma * clip)  # standard normal if the noise has the documented scale
    assert z.size == 931
    assert abs(z.mean()) < 4 / math.sqrt(z.size)
    assert abs(z.std() - 1) < 0.1
    other = _step_gradient(model, params, state, x, target, clip=clip, noise=sigma, key=jax.random.PRNGKey(4))
    assert not np.allclose(jax.tree_util.tree_leaves(other)[0], jax.tree_util.tree_leaves(noisy)[0])


def test_bfloat16_network_keeps_the_per_example_rules(batch):
    model, params, state, x, target = batch
    network = compute_network(model, "bfloat16")
    assert network.per_example_backward is not None and network.per_example_sq_norms is not None
    cast = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), params)
    got = gradients.per_example_grad_norms(network, CE, cast, state, x.astype(jnp.bfloat16), target)
    want = gradients.per_example_grad_norms(model, CE, params, state, x, target)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=5e-2)


def test_epsilon_of_the_gaussian_mechanism():
    eps = functools.partial(privacy.epsilon, delta=1e-5)
    assert eps(noise_multiplier=1.1, sample_rate=0.01, steps=0) == 0.0
    assert eps(noise_multiplier=0.0, sample_rate=0.01, steps=10) == math.inf
    base = eps(noise_multiplier=1.1, sample_rate=256 / 60000, steps=1000)
    assert 0 < base < eps(noise_multiplier=1.1, sample_rate=256 / 60000, steps=4000)  # composition spends more
    assert eps(noise_multiplier=2.0, sample_rate=256 / 60000, steps=1000) < base  # more noise spends less
    assert eps(noise_multiplier=1.1, sample_rate=512 / 60000, steps=1000) > base  # a larger sample spends more
    # Without subsampling (q = 1) the Gaussian mechanism's RDP is alpha T / (2 sigma^2); the classic conversion
    # min_alpha RDP(alpha) + log(1/delta) / (alpha - 1) bounds the accountant's (tighter) epsilon from above.
    sigma, steps, delta = 5.0, 4, 1e-5
    classic = min(a * steps / (2 * sigma**2) + math.log(1 / delta) / (a - 1) for a in np.linspace(1.01, 200, 20000))
    got = privacy.epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=steps, delta=delta)
    assert 0.8 * classic < got <= classic


def _digits(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(0, 0.3, (n, 8, 8, 1)).astype(np.float32)
    for i, c in enumerate(y):
        x[i, 2 * c : 2 * c + 3, 2:6, 0] += 2.0
    return x, y


def test_fit_reports_epsilon_per_epoch_and_learns():
    train, test = _digits(192, 0), _digits(96, 1)
    result = jaxcnn.fit(
        small_net(),
        CE,
        train,
        test,
        epochs=2,
        batch_size=32,
        lr=0.1,
        augment=0,
        dp_clip=1.0,
        dp_noise_multiplier=0.8,
        dp_delta=1e-4,
        **QUIET,
    )
    eps = [h["dp_epsilon"] for h in result.history]
    want = [privacy.epsilon(noise_multiplier=0.8, sample_rate=32 / 192, steps=6 * e, delta=1e-4) for e in (1, 2)]
    assert eps == want and eps[0] < eps[1]
    assert all(h["dp_delta"] == 1e-4 for h in result.history)
    assert result.history[-1]["test_accuracy"] > 0.6  # three classes; the signal survives clipping and noise


def test_dp_settings_are_checked_in_one_line():
    bn_net = serial(Conv2D(4, 3), BatchNorm(), Relu(), Flatten(), Dense(3))
    with pytest.raises(ConfigError, match=r"^--dp-clip: .*BatchNorm"):
        jaxcnn.fit(bn_net, CE, _digits(64, 0), epochs=1, batch_size=32, dp_clip=1.0, **QUIET)
    for settings, message in [
        (dict(dp_clip=0.0), "--dp-clip must be a positive number, got 0.0"),
        (
            dict(dp_noise_multiplier=1.0),
            "--dp-noise-multiplier scales the noise by the clipping norm; it needs --dp-clip",
        ),
        (dict(dp_clip=1.0, dp_noise_multiplier=-1.0), "--dp-noise-multiplier must be >= 0"),
        (dict(dp_clip=1.0, dp_delta=1.0), "--dp-delta must be in (0, 1)"),
        (dict(dp_clip=1.0, grad="autodiff"), "--dp-clip clips per-example gradients"),
        (dict(dp_clip=1.0, check_every=5), "--check-every compares batch gradients"),
    ]:
        with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
            TrainConfig(**settings).validate()
