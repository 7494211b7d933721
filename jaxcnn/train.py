"""Training: a jit-compiled step (forward, loss, hand-written or autodiff backward, optax update) scanned
over device-resident data, with evaluation, metrics, atomic checkpoints, resume and clean interruption.

``train_and_evaluate(config, workdir)`` is the whole job; ``jaxcnn train`` is its command line. The
training set lives on the device as uint8; each call of the compiled ``run_steps`` gathers, scales and
trains on ``chunk_steps`` batches inside one ``lax.scan``, so no Python runs between steps. Chunks are
aligned to the epoch start, which makes an interrupted-and-resumed run compute exactly what an
uninterrupted one computes.

Determinism: parameters are initialised from ``fold_in(PRNGKey(seed), 0)``, the batch order of epoch
``e`` is :func:`jaxcnn.data.epoch_permutation` ``(seed, e, n)``, the dropout key of global step ``t``
is ``fold_in(fold_in(PRNGKey(seed), 1), t)`` and its augmentation key ``fold_in(fold_in(PRNGKey(seed), 2), t)``. The last partial batch of an epoch is dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxcnn import data as jdata
from jaxcnn.gradients import value_and_grad
from jaxcnn.layers import Layer
from jaxcnn.models import ModelSpec, get_model

OPTIMIZERS = ("sgd", "nesterov", "adam")
SCHEDULES = ("constant", "cosine", "step")
PRECISIONS = ("float32", "bfloat16")
# Largest relative difference between manual and autodiff gradients accepted by --check-every.
# --check-every: largest max-relative difference per parameter array between the hand-written and the
# jax.grad gradient, both computed in float32 (also in a bfloat16 run, see Trainer._run_steps). Measured
# along training (every 10 of 60 steps, batch 64): lenet5 <= 5e-7 and small_cnn <= 7e-7, but resnet_small
# up to 8.1e-4. There jax.grad's own float32 gradient of a convolution feeding BatchNorm is the inexact
# one: at initialisation it is 1e-4 to 2e-4 from the float64 gradient, the hand-written one within
# 3.1e-6 (BatchNorm's backward as a closed formula cancels less). 2e-3 stays above that and still stops
# a backward that is 1% off.
CHECK_TOLERANCE = 2e-3


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; ``jaxcnn train --help`` documents each flag of the same name."""

    model: str = "small_cnn"
    dataset: str = "mnist"
    data_dir: str | None = None
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    seed: int = 0
    grad: str = "manual"
    check_every: int = 0
    train_limit: int | None = None
    precision: str = "float32"
    normalize: bool = False
    augment: int = 2
    devices: int | None = None
    download: bool = True
    chunk_steps: int = 50
    eval_batch_size: int = 1000

    def validate(self) -> "TrainConfig":
        """Raises ``ValueError`` naming the first setting that cannot work."""
        try:
            get_model(self.model)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr), f"--lr must be a positive number, got {self.lr}"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"),
            (self.grad in ("manual", "autodiff"), f"--grad must be manual or autodiff, got {self.grad!r}"),
            (self.check_every >= 0, f"--check-every must be >= 0, got {self.check_every}"),
            (self.check_every == 0 or self.grad == "manual",
             "--check-every compares hand-written with autodiff gradients; it needs --grad manual"),
            (self.train_limit is None or self.train_limit >= 1, f"--train-limit must be >= 1, got {self.train_limit}"),
            (self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.devices is None or self.devices >= 1, f"--devices must be >= 1, got {self.devices}"),
            (0 <= self.augment <= 8, f"--augment must be between 0 and 8 pixels, got {self.augment}"),
            (self.chunk_steps >= 1 and self.eval_batch_size >= 1, "chunk_steps and eval_batch_size must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self


class ConfigError(ValueError):
    """A setting or a ``--resume`` that cannot work; the message says which and why."""


class TrainState(NamedTuple):
    params: Any
    model_state: Any
    opt_state: Any


class TrainingStopped(Exception):
    """Training ended early for a reason the user must see (non-finite loss, gradient check failure)."""


# ---------------------------------------------------------------------------------------------------
# Building blocks


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD with momentum (default), Nesterov or Adam; optional decoupled weight decay; a learning-rate schedule."""
    total = max(config.epochs * steps_per_epoch, 1)
    if config.schedule == "cosine":
        lr = optax.cosine_decay_schedule(config.lr, total)
    elif config.schedule == "step":
        lr = optax.piecewise_constant_schedule(config.lr, {int(total * 0.5): 0.1, int(total * 0.75): 0.1})
    else:
        lr = optax.constant_schedule(config.lr)
    if config.optimizer == "adam":
        return optax.adamw(lr, weight_decay=config.weight_decay) if config.weight_decay else optax.adam(lr)
    sgd = optax.sgd(lr, momentum=config.momentum, nesterov=config.optimizer == "nesterov")
    return optax.chain(optax.add_decayed_weights(config.weight_decay), sgd) if config.weight_decay else sgd


def Cast(dtype) -> Layer:
    """Casts activations to ``dtype``; the backward casts the cotangent back to the input's dtype."""

    def init(key, in_shape):
        return {}, {}, tuple(in_shape)

    def forward(params, state, x, *, train=False, key=None):
        return x.astype(dtype), state, jnp.zeros((0,), x.dtype)  # the residual records only the dtype

    def backward(params, marker, dy):
        return {}, dy.astype(marker.dtype)

    return Layer(init, forward, backward, f"Cast({jnp.dtype(dtype).name})")


def compute_model(spec: ModelSpec, precision: str) -> Layer:
    """The network that a step runs: in bfloat16, activations and weights are bfloat16 and the outputs
    are cast back to float32 before the loss, so the loss and the parameter updates stay float32."""
    model = spec.build()
    if precision == "float32":
        return model
    cast = Cast(jnp.float32)

    # Not ``serial(model, cast)``: that would nest the params one level deeper (and split the init key),
    # so the compute model must keep the structure of ``spec.build()``'s params, state and checkpoints.
    def forward(params, state, x, *, train=False, key=None):
        y, new_state, residuals = model.forward(params, state, x, train=train, key=key)
        y, _, marker = cast.forward({}, {}, y)
        return y, new_state, (residuals, marker)

    def backward(params, residuals, dy):
        residuals, marker = residuals
        _, dy = cast.backward({}, marker, dy)
        return model.backward(params, residuals, dy)

    return Layer(model.init, forward, backward, model.name, model.children)


def _to_inputs(images_u8, mean: float, std: float, dtype):
    """uint8 ``(B, 28, 28)`` -> ``(B, 28, 28, 1)`` scaled to [0, 1] then standardised by ``mean``/``std``."""
    x = images_u8.astype(jnp.float32)[..., None] / 255.0
    return ((x - mean) / std).astype(dtype)


def random_shift(key, x, max_shift: int):
    """Translates each image of ``x (B, H, W, C)`` by its own random offset in ``[-max_shift, max_shift]``
    pixels along each axis, filling with zeros (the background of MNIST-style digits)."""
    if max_shift == 0:
        return x
    b, h, w, _ = x.shape
    padded = jnp.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    offsets = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, image.shape[-1]))

    return jax.vmap(crop)(padded, offsets)


def _max_relative_errors(a, b):
    return jnp.stack([jnp.max(jnp.abs(x - y)) / jnp.maximum(jnp.max(jnp.abs(y)), 1e-30)
                      for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))])


def _host(x) -> np.ndarray:
    """The value of a replicated (or single-device) array as NumPy, also when other processes hold copies."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def data_mesh(devices: int | None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over the first ``devices`` devices (all of them by default;
    across processes after :func:`jax.distributed.initialize`)."""
    available = jax.devices()
    count = len(available) if devices is None else devices
    if count > len(available):
        raise ConfigError(f"--devices {count} but only {len(available)} device(s) are available ({available[0].platform})")
    return Mesh(np.array(available[:count]), ("data",))


# XLA:CPU options for the training step, chosen by measurement (``jaxcnn bench``, docs/benchmarks.md):
# the experimental YNNPACK fusions slowed every zoo model's step, so they are switched off when this
# jaxlib knows the option (an unknown option name is an error, so it is checked first).
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.lru_cache(maxsize=None)
def default_compiler_options() -> dict:
    """:data:`CPU_COMPILER_OPTIONS` when the default backend is the CPU and this jaxlib accepts them, else ``{}``."""
    if jax.default_backend() != "cpu":
        return {}
    try:
        jax.jit(lambda a: a + 1).lower(jnp.zeros((2,), jnp.float32)).compile(compiler_options=CPU_COMPILER_OPTIONS)
    except Exception:  # noqa: BLE001 - an option this XLA does not have: keep its defaults
        return {}
    return dict(CPU_COMPILER_OPTIONS)


class Trainer:
    """Compiled functions and device data of one run; used by :func:`train_and_evaluate` and the benchmark.

    Data parallelism: on a mesh of ``D`` devices, every batch is split along its examples over the mesh
    axis ``"data"`` while parameters, optimiser state and the (small) datasets are replicated. The step
    is the single-device program with sharding annotations: XLA partitions it and adds the all-reduces
    that the batch contractions need (in ``dw = patchesᵀ @ dy``, the loss mean, BatchNorm's batch
    statistics), so a step on ``D`` devices computes the same numbers as on one, up to the order of
    floating-point additions. This was chosen over ``shard_map`` with an explicit ``lax.pmean`` of the
    gradients because it keeps the hand-written backward unchanged and BatchNorm's statistics global.
    """

    def __init__(self, config: TrainConfig, dataset: jdata.Dataset, *, compiler_options: dict | None = None):
        self.config = config.validate()
        self.compiler_options = dict(default_compiler_options() if compiler_options is None else compiler_options)
        self.spec = get_model(config.model)
        self.dataset = dataset
        self.dtype = jnp.bfloat16 if config.precision == "bfloat16" else jnp.float32
        self.model = compute_model(self.spec, config.precision)
        self.mesh = data_mesh(config.devices)
        self.num_devices = self.mesh.size
        if config.batch_size % self.num_devices:
            raise ConfigError(f"--batch-size {config.batch_size} does not divide evenly over {self.num_devices} devices; "
                              f"use a multiple of {self.num_devices} or pass --devices")
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharded = NamedSharding(self.mesh, P(None, "data"))
        n = len(dataset.train_labels)
        if n < config.batch_size:
            raise ConfigError(f"--batch-size {config.batch_size} exceeds the {n} training examples; lower it")
        self.steps_per_epoch = n // config.batch_size
        self.tx = make_optimizer(config, self.steps_per_epoch)
        if config.normalize:
            pixels = dataset.train_images.astype(np.float64) / 255.0
            self.mean, self.std = float(pixels.mean()), float(pixels.std())
        else:
            self.mean, self.std = 0.0, 1.0
        self.train_images = self.place(dataset.train_images)
        self.train_targets = self.place(np.asarray(self.spec.targets(dataset.train_labels)))
        self.test_images = self.place(dataset.test_images)
        self.test_labels = self.place(dataset.test_labels.astype(np.int32))
        self.root_key = jax.random.PRNGKey(config.seed)
        rep = self.replicated
        self.run_steps = jax.jit(self._run_steps, donate_argnums=(0,), in_shardings=(rep, rep, rep, self.batch_sharded, rep),
                                 out_shardings=rep, compiler_options=self.compiler_options)
        self.evaluate_fn = jax.jit(self._evaluate, in_shardings=rep, out_shardings=rep)

    def place(self, tree, sharding=None):
        """Puts host values (the same on every process) on the mesh, replicated unless ``sharding`` says otherwise."""
        sharding = sharding or self.replicated

        def put(a):
            a = _host(a)
            return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

        return jax.tree_util.tree_map(put, tree)

    def batch_indices(self, indices: np.ndarray):
        """``(steps, B)`` example indices, each process placing only its devices' slices of every batch."""
        return self.place(np.asarray(indices, np.int32), self.batch_sharded)

    # -- state ---------------------------------------------------------------------------------------

    def init_state(self) -> TrainState:
        spec = self.spec
        params, model_state, _ = spec.build().init(jax.random.fold_in(self.root_key, 0), (1, 28, 28, 1))
        return self.place(TrainState(params, model_state, self.tx.init(params)))

    # -- one chunk of training steps -----------------------------------------------------------------

    def _run_steps(self, ts: TrainState, images, targets, batch_indices, first_step):
        """``batch_indices (steps, B)`` -> (new state, per-step losses, correct counts, gradient-check errors).

        ``images`` (uint8) and ``targets`` are the whole device-resident training set, passed as arguments
        (not closed over) so that they are not baked into the compiled program as constants.
        """
        cfg, spec, dtype = self.config, self.spec, self.dtype
        grad_fn = value_and_grad(self.model, spec.loss, cfg.grad)
        # --check-every compares this step's gradient with jax.grad of the same network, both in float32 at
        # the step's (float32) parameters and inputs. In a bfloat16 run the step's own gradient cannot be
        # the one checked: bfloat16 moves ReLU and max-pool switches, and its gradients differ from any
        # float32 reference by several percent (up to 12% on lenet5), which would hide a wrong backward.
        # So there the check recomputes the step's gradient in float32, testing the same backward code on
        # the same batch.
        if cfg.check_every:
            check_net = spec.build()
            check_fn = value_and_grad(check_net, spec.loss, "autodiff")
            mine_fn = None if dtype == jnp.float32 else value_and_grad(check_net, spec.loss, cfg.grad)
        else:
            check_fn = None
        dropout_root = jax.random.fold_in(self.root_key, 1)
        augment_root = jax.random.fold_in(self.root_key, 2)

        def cast(tree):
            return jax.tree_util.tree_map(lambda a: a.astype(dtype), tree)

        def step(carry, inputs):
            ts, t = carry
            idx = inputs
            target = targets[idx]
            key = jax.random.fold_in(dropout_root, t)
            x32 = random_shift(jax.random.fold_in(augment_root, t), _to_inputs(images[idx], self.mean, self.std,
                                                                                jnp.float32), cfg.augment)
            x = x32.astype(dtype)
            params_c = cast(ts.params)
            (loss, (pred, model_state)), grads = grad_fn(params_c, ts.model_state, x, target, train=True, key=key)
            grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, ts.params)
            if check_fn is None:
                errors = jnp.zeros((0,), jnp.float32)
            else:
                n_leaves = len(jax.tree_util.tree_leaves(ts.params))

                def compare(_):
                    (_, _), auto = check_fn(ts.params, ts.model_state, x32, target, train=True, key=key)
                    mine = grads if mine_fn is None else mine_fn(ts.params, ts.model_state, x32, target,
                                                                 train=True, key=key)[1]
                    return _max_relative_errors(mine, auto).astype(jnp.float32)

                errors = jax.lax.cond(t % cfg.check_every == 0, compare,
                                      lambda _: jnp.full((n_leaves,), -1.0, jnp.float32), None)
            updates, opt_state = self.tx.update(grads, ts.opt_state, ts.params)
            params = optax.apply_updates(ts.params, updates)
            labels = target[:, 0].astype(jnp.int32) if spec.binary else target
            correct = jnp.sum(spec.predictions(pred.astype(jnp.float32)) == labels)
            return (TrainState(params, model_state, opt_state), t + 1), (loss.astype(jnp.float32), correct, errors)

        (ts, _), (losses, correct, errors) = jax.lax.scan(step, (ts, first_step), batch_indices)
        return ts, losses, correct, errors

    # -- evaluation ----------------------------------------------------------------------------------

    def _evaluate(self, params, model_state, images, labels):
        """Mean loss and accuracy over ``images``, in batches of ``eval_batch_size`` (the last one masked)."""
        spec, dtype, bs = self.spec, self.dtype, self.config.eval_batch_size
        n = images.shape[0]
        batches = -(-n // bs)
        pad = batches * bs - n
        images = jnp.pad(images, ((0, pad), (0, 0), (0, 0))).reshape(batches, bs, *images.shape[1:])
        labels = jnp.pad(labels, (0, pad)).reshape(batches, bs)
        mask = (jnp.arange(batches * bs) < n).reshape(batches, bs)
        if bs % self.num_devices == 0:  # evaluate each batch data-parallel too
            images, labels, mask = (jax.lax.with_sharding_constraint(a, self.batch_sharded) for a in (images, labels, mask))
        params_c = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)

        def body(totals, batch):
            x_u8, y, m = batch
            pred, _, _ = self.model.forward(params_c, model_state, _to_inputs(x_u8, self.mean, self.std, dtype), train=False)
            pred = pred.astype(jnp.float32)
            targets = spec.targets(y)
            if spec.binary:
                per_example = 0.5 * jnp.mean(jnp.square(pred - targets), axis=-1)
                labels_used = targets[:, 0].astype(jnp.int32)
            else:
                per_example = -jnp.take_along_axis(jax.nn.log_softmax(pred), targets[:, None], axis=-1)[:, 0]
                labels_used = targets
            hits = spec.predictions(pred) == labels_used
            # Explicit dtypes: with jax_enable_x64 the sums would be int64/float64 and break the scan's carry.
            return (totals[0] + jnp.sum(jnp.where(m, per_example, 0.0), dtype=jnp.float32),
                    totals[1] + jnp.sum(hits & m, dtype=jnp.int32)), None

        (loss_sum, correct), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)), (images, labels, mask))
        return loss_sum / n, correct / n

    def evaluate(self, ts: TrainState) -> tuple[float, float]:
        loss, acc = self.evaluate_fn(ts.params, ts.model_state, self.test_images, self.test_labels)
        return float(_host(loss)), float(_host(acc))

    # -- schedule of one epoch -----------------------------------------------------------------------

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """``(steps_per_epoch, batch_size)`` example indices of ``epoch`` (seeded, deterministic)."""
        order = jdata.epoch_permutation(self.config.seed, epoch, len(self.dataset.train_labels))
        used = self.steps_per_epoch * self.config.batch_size
        return np.asarray(order[:used], np.int32).reshape(self.steps_per_epoch, self.config.batch_size)


# ---------------------------------------------------------------------------------------------------
# Checkpoints


CHECKPOINT = "checkpoint.npz"


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Writes via a temporary file in the same directory, fsyncs it, renames it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(workdir: Path, ts: TrainState, *, epoch: int, step: int, config: TrainConfig,
                    partial_epoch: dict | None = None) -> Path:
    """Saves every array of ``ts`` plus the position ``(epoch, step)`` (the next step to run) and, mid-epoch,
    ``partial_epoch``: the epoch's statistics so far, so that a resumed run reports the same epoch metrics."""
    leaves = jax.tree_util.tree_leaves(ts)
    arrays = {f"leaf_{i:05d}": _host(x) for i, x in enumerate(leaves)}
    meta = {"epoch": epoch, "step": step, "config": dataclasses.asdict(config), "leaves": len(leaves)}
    if partial_epoch is not None:
        meta["partial_epoch"] = partial_epoch
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    path = workdir / CHECKPOINT
    _atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


# Settings that determine the trajectory: resuming under different ones would silently train something else.
RESUME_SETTINGS = ("model", "dataset", "epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "schedule",
                   "seed", "train_limit", "precision", "normalize", "augment")


def load_checkpoint(workdir: Path, template: TrainState, config: TrainConfig | None = None) -> tuple[TrainState, dict]:
    """Restores a checkpoint into the structure of ``template``; :class:`ConfigError` if it does not fit, or if
    ``config`` differs from the checkpoint's in a setting of :data:`RESUME_SETTINGS`."""
    path = workdir / CHECKPOINT
    if not path.exists():
        raise ConfigError(f"--resume: no checkpoint at {path}; start without --resume")
    with np.load(path) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        if config is not None:
            saved, now = meta["config"], dataclasses.asdict(config)
            changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in RESUME_SETTINGS if k in saved and saved[k] != now[k]]
            if changed:
                raise ConfigError(f"--resume: {path} was written with other settings ({', '.join(changed)}); "
                                  "resume with the same settings, or choose another --out")
        leaves, treedef = jax.tree_util.tree_flatten(template)
        if meta["leaves"] != len(leaves):
            raise ConfigError(f"--resume: {path} holds {meta['leaves']} arrays but this model and optimiser have {len(leaves)}; "
                             "was it written with another --model or --optimizer?")
        restored = []
        for i, ref in enumerate(leaves):
            arr = z[f"leaf_{i:05d}"]
            if arr.shape != np.shape(ref) or arr.dtype != ref.dtype:
                raise ConfigError(f"--resume: array {i} in {path} is {arr.dtype}{list(arr.shape)} but the model expects "
                                  f"{ref.dtype}{list(np.shape(ref))}")
            restored.append(arr)
    return treedef.unflatten(restored), meta


# ---------------------------------------------------------------------------------------------------
# The job


class _Interrupt:
    """Turns SIGINT/SIGTERM into a flag checked between chunks; restores the previous handlers on exit."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class Interrupted(Exception):
    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)


def train_and_evaluate(
    config: TrainConfig,
    workdir: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    dataset: jdata.Dataset | None = None,
    log: Callable[[str], None] = print,
    progress: bool | None = None,
) -> list[dict]:
    """Trains ``config.model`` and evaluates it after every epoch; returns the per-epoch metrics.

    With ``workdir``: writes ``config.json``, appends one JSON object per epoch to ``metrics.jsonl`` and
    saves ``checkpoint.npz`` atomically after every epoch. ``resume=True`` continues from that checkpoint
    (also from one saved on SIGINT/SIGTERM mid-epoch) and reproduces the uninterrupted trajectory.
    Raises :class:`Interrupted` after saving on SIGINT/SIGTERM and :class:`TrainingStopped` on a
    non-finite loss (keeping the last good checkpoint) or a failed ``check_every`` comparison.
    """
    config.validate()
    if dataset is None:
        dataset = jdata.load_dataset(config.dataset, data_dir=config.data_dir, download=config.download,
                                     train_limit=config.train_limit, log=log)
    elif config.train_limit is not None:
        dataset = dataset._replace(train_images=dataset.train_images[: config.train_limit],
                                   train_labels=dataset.train_labels[: config.train_limit])
    trainer = Trainer(config, dataset)
    workdir = Path(workdir) if workdir is not None else None
    # With several processes (multi-host), process 0 alone logs and writes; every process reads --resume.
    writer = jax.process_index() == 0
    if not writer:
        log = lambda message: None  # noqa: E731
    progress = sys.stderr.isatty() if progress is None else progress
    ts = trainer.init_state()
    start_epoch, start_step, history, partial = 0, 0, [], None
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        if resume:
            ts, meta = load_checkpoint(workdir, ts, config)
            ts = trainer.place(ts)
            start_epoch, start_step, partial = meta["epoch"], meta["step"], meta.get("partial_epoch")
            history = _read_metrics(workdir / "metrics.jsonl", upto_epoch=start_epoch)
            log(f"resuming from {workdir / CHECKPOINT} at epoch {start_epoch + 1}, step {start_step}")
        elif (workdir / CHECKPOINT).exists():
            raise ConfigError(f"{workdir} already holds a checkpoint; pass --resume to continue it or choose another --out")
        if writer:
            _atomic_write(workdir / "config.json", lambda f: f.write(json.dumps(dataclasses.asdict(config), indent=2).encode()))
            _atomic_write(workdir / "metrics.jsonl", lambda f: f.write("".join(json.dumps(h) + "\n" for h in history).encode()))

    spe, chunk = trainer.steps_per_epoch, config.chunk_steps
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(ts.params))
    log(f"{config.model} ({n_params:,} parameters, {config.grad} gradients, {config.precision}) on {dataset.source}: "
        f"{len(dataset.train_labels):,} train / {len(dataset.test_labels):,} test images, {spe} steps of {config.batch_size} per epoch")
    wall_start = time.perf_counter() - (partial["wall_s"] if partial else history[-1]["wall_s"] if history else 0.0)
    leaf_names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(ts.params)[0]]

    with _Interrupt() as interrupt:
        for epoch in range(start_epoch, config.epochs):
            batches = trainer.epoch_batches(epoch)
            first = start_step if epoch == start_epoch else 0
            losses, correct, seen, train_time, checked = [], 0, 0, 0.0, []
            if first and partial:  # resuming mid-epoch: the statistics of the steps before ``first``
                losses = [np.asarray(partial["losses"], np.float32)]
                correct, seen, train_time = partial["correct"], partial["seen"], partial["train_time"]
                checked = [np.asarray(partial["checked"], np.float32).reshape(-1, len(leaf_names))]
            bar = _progress(spe, f"epoch {epoch + 1}/{config.epochs}", progress)
            if bar is not None:
                bar.update(first)
            for begin in range(first, spe, chunk):  # ``first`` is chunk-aligned unless chunk_steps changed
                t0 = time.perf_counter()
                global_step = epoch * spe + begin
                ts, chunk_losses, chunk_correct, errors = trainer.run_steps(
                    ts, trainer.train_images, trainer.train_targets,
                    trainer.batch_indices(batches[begin: begin + chunk]), trainer.place(np.int32(global_step)))
                chunk_losses = _host(chunk_losses)
                train_time += time.perf_counter() - t0
                bad = np.flatnonzero(~np.isfinite(chunk_losses))
                if bad.size:
                    where = begin + int(bad[0])
                    kept = f"; the last good checkpoint is {workdir / CHECKPOINT}" if workdir and (workdir / CHECKPOINT).exists() else ""
                    raise TrainingStopped(f"loss became {chunk_losses[bad[0]]} at step {where} of epoch {epoch + 1} "
                                          f"(global step {epoch * spe + where}); try a lower --lr{kept}")
                checked.append(_check_gradient_errors(_host(errors), leaf_names, config, epoch, begin))
                losses.append(chunk_losses)
                correct += int(_host(chunk_correct).sum())
                seen += chunk_losses.size * config.batch_size
                if bar is not None:
                    bar.update(chunk_losses.size)
                    bar.set_postfix(loss=f"{chunk_losses.mean():.4f}")
                if interrupt.signal is not None and begin + chunk < spe:
                    if bar is not None:
                        bar.close()
                    _save_interrupted(interrupt.signal, workdir, ts, epoch, begin + chunk, config, partial_epoch={
                        "losses": np.concatenate(losses).tolist(), "correct": correct, "seen": seen,
                        "train_time": train_time, "checked": np.concatenate(checked).tolist(),
                        "wall_s": time.perf_counter() - wall_start})
            if bar is not None:
                bar.close()
            test_loss, test_acc = trainer.evaluate(ts)
            record = {
                "epoch": epoch + 1,
                "train_loss": float(np.concatenate(losses).mean()),
                "train_accuracy": correct / max(seen, 1),
                "test_loss": test_loss,
                "test_accuracy": test_acc,
                "images_per_s": seen / train_time if train_time > 0 else float("nan"),
                "wall_s": time.perf_counter() - wall_start,
            }
            if config.check_every:
                rows = np.concatenate(checked)
                # Max relative difference between manual and jax.grad gradients, per parameter array.
                record["grad_check"] = {"steps": len(rows), "max_relative_error": dict(zip(leaf_names, rows.max(axis=0).tolist()))
                                        if len(rows) else {}}
            history.append(record)
            log(f"epoch {record['epoch']:>3}/{config.epochs}  train loss {record['train_loss']:.4f}  "
                f"acc {record['train_accuracy']:.4f}  |  test loss {test_loss:.4f}  acc {test_acc:.4f}  |  "
                f"{record['images_per_s']:,.0f} images/s  {record['wall_s']:.1f} s"
                + (f"  |  grad check: {record['grad_check']['steps']} steps, max rel. diff "
                   f"{max(record['grad_check']['max_relative_error'].values(), default=0.0):.1e}"
                   if config.check_every else ""))
            if workdir is not None and writer:
                # The epoch's record first, then its checkpoint: a crash in between leaves an extra record that
                # --resume drops (it keeps records up to the checkpoint's epoch), never a checkpoint without one.
                with open(workdir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                save_checkpoint(workdir, ts, epoch=epoch + 1, step=0, config=config)
            if interrupt.signal is not None and epoch + 1 < config.epochs:
                _save_interrupted(interrupt.signal, workdir, ts, epoch + 1, 0, config)
    return history


def _save_interrupted(signum, workdir, ts, epoch, step, config, partial_epoch=None):
    name = signal.Signals(signum).name
    if workdir is None or jax.process_index() != 0:
        reason = "no --out" if workdir is None else f"process {jax.process_index()} does not write"
        raise Interrupted(signum, f"{name}: training stopped at epoch {epoch + 1}, step {step} ({reason}, nothing saved)")
    path = save_checkpoint(workdir, ts, epoch=epoch, step=step, config=config, partial_epoch=partial_epoch)
    raise Interrupted(signum, f"{name}: checkpoint saved to {path} at epoch {epoch + 1}, step {step}; "
                              "continue with the same command plus --resume")


def _check_gradient_errors(errors: np.ndarray, leaf_names: list[str], config: TrainConfig, epoch: int, begin: int) -> np.ndarray:
    """Raises :class:`TrainingStopped` if a checked step exceeds the tolerance; returns the checked rows."""
    if errors.size == 0:  # no --check-every: the scan stacked (steps, 0) empty rows
        return errors.reshape(0, len(leaf_names))
    checked = errors[errors[:, 0] >= 0]
    tol = CHECK_TOLERANCE
    for row, errs in enumerate(errors):
        if errs[0] < 0:  # this step was not checked
            continue
        worst = int(np.argmax(errs))
        if not errs[worst] <= tol:
            raise TrainingStopped(
                f"gradient check failed at step {begin + row} of epoch {epoch + 1}: manual and autodiff gradients of "
                f"params{leaf_names[worst]} differ by {errs[worst]:.2e} (relative) > {tol:.0e}")
    return checked


def _read_metrics(path: Path, *, upto_epoch: int) -> list[dict]:
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["epoch"] <= upto_epoch]
