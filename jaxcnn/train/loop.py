"""The training loop: :func:`fit` trains any network on any arrays through the one :func:`train_step`.

The training set lives on the device (uint8 images stay uint8); each call of the compiled
:func:`run_steps` gathers, scales, augments and trains on ``chunk_steps`` batches inside one ``lax.scan``,
so no Python runs between steps. Chunks are aligned to the epoch start, which makes an
interrupted-and-resumed run compute exactly what an uninterrupted one computes. The benchmark times this
same function (``jaxcnn bench``, section ``epoch``).

Faults: with ``out``, a checkpoint is saved (atomically, :mod:`~jaxcnn.train.checkpoint`) after every epoch,
after the chunk that reaches each multiple of ``checkpoint_every`` steps, and on SIGINT/SIGTERM, so a
``kill -9`` loses at most the steps since the last one and never the checkpoint itself. ``resume`` checks that
the checkpoint continues this run (settings, data fingerprint, steps per epoch, parameter structure), removes
temporary files a killed write left behind and repairs a torn last line of ``metrics.jsonl``.

Determinism: parameters are initialised from ``fold_in(PRNGKey(seed), 0)``, the batch order of epoch
``e`` is :func:`jaxcnn.data.epoch_permutation` ``(seed, e, n)``, the dropout key of global step ``t`` is
``fold_in(fold_in(PRNGKey(seed), 1), t)`` and its augmentation key ``fold_in(fold_in(PRNGKey(seed), 2), t)``.
The last partial batch of an epoch is dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

import jax
import jax.numpy as jnp

from jaxcnn import data as jdata
from jaxcnn.gradients import Loss
from jaxcnn.layers import Layer
from jaxcnn.train import checkpoint as ckpt
from jaxcnn.train import privacy, recipes
from jaxcnn.train.config import ConfigError, TrainConfig, array_settings, make_optimizer
from jaxcnn.train.inputs import (
    Augmentation,
    Scaling,
    as_augmentation,
    as_images,
    balanced_subset,
    classes_of,
    describe_counts,
    scaling_for,
)
from jaxcnn.train.runtime import Interrupt, Placement, default_compiler_options, host, progress_bar
from jaxcnn.train.step import Step, TrainState, eval_step, make_step, train_step


class TrainingStopped(Exception):
    """Training ended early for a reason the user must see (non-finite loss, gradient check failure)."""


class Interrupted(Exception):
    """SIGINT/SIGTERM stopped training; the message says where the checkpoint is (if any)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class FitResult(NamedTuple):
    """What :func:`fit` returns: the trained ``params``, the model's ``state`` (e.g. BatchNorm statistics),
    the optimiser state and ``history``, one dict per epoch with the keys of ``metrics.jsonl``."""

    params: Any
    state: Any
    opt_state: Any
    history: list[dict]


# ---------------------------------------------------------------------------------------------------
# The compiled functions


def run_step(
    step: Step,
    scaling: Scaling,
    augment: Augmentation | int,
    root_key: jax.Array,
    state: TrainState,
    images: jax.Array,
    targets: jax.Array,
    idx: jax.Array,
    t: int | jax.Array,
) -> tuple[TrainState, dict]:
    """One :func:`train_step` on the examples ``idx (B,)`` of the device-resident ``images``/``targets``, at
    global step ``t``: gathers the batch, scales it, augments it (``augment``, an
    :class:`~jaxcnn.train.inputs.Augmentation` or a number of pixels to shift by) with the key of step ``t`` and
    trains with the dropout key of step ``t``. Returns the new state and the step's metrics."""
    dropout_root, augment_root = jax.random.fold_in(root_key, 1), jax.random.fold_in(root_key, 2)
    x = as_augmentation(augment)(jax.random.fold_in(augment_root, t), scaling(images[idx]))
    return train_step(step, state, x, targets[idx], jax.random.fold_in(dropout_root, t), t)


def run_steps(
    step: Step,
    scaling: Scaling,
    augment: Augmentation | int,
    root_key: jax.Array,
    state: TrainState,
    images: jax.Array,
    targets: jax.Array,
    batch_indices: jax.Array,
    first_step: int | jax.Array,
) -> tuple[TrainState, dict]:
    """:func:`run_step` on each row of ``batch_indices (steps, B)`` inside one ``lax.scan``, starting at
    global step ``first_step``.

    ``images`` and ``targets`` are the whole training set, passed as arguments (not closed over) so that
    they are not baked into the compiled program as constants. Returns the new state and the per-step
    metrics of :func:`train_step`, stacked.
    """

    def body(carry, idx):
        state, t = carry
        state, metrics = run_step(step, scaling, augment, root_key, state, images, targets, idx, t)
        return (state, t + 1), metrics

    (state, _), metrics = jax.lax.scan(body, (state, first_step), batch_indices)
    return state, metrics


def evaluate(step: Step, scaling: Scaling, batch_size: int, batch_sharding, params, model_state, images, targets):
    """Mean per-example loss and accuracy over ``images``, in batches of ``batch_size`` (the last one masked)."""
    n = images.shape[0]
    batches = -(-n // batch_size)
    pad = batches * batch_size - n

    def split(a):
        return jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)).reshape(batches, batch_size, *a.shape[1:])

    images, targets = split(images), split(targets)
    mask = (jnp.arange(batches * batch_size) < n).reshape(batches, batch_size)
    if batch_sharding is not None:  # evaluate each batch data-parallel too
        images, targets, mask = (jax.lax.with_sharding_constraint(a, batch_sharding) for a in (images, targets, mask))

    def body(totals, batch):
        x, t, m = batch
        sums = eval_step(step, params, model_state, scaling(x), t, m)
        return (totals[0] + sums["loss_sum"], totals[1] + sums["correct"]), None

    (loss_sum, correct), _ = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)), (images, targets, mask)
    )
    return loss_sum / n, correct / n


class Trainer:
    """The compiled functions and device-resident data of one run of ``model`` on ``loss``.

    ``train`` and ``test`` are ``(images, targets)`` pairs: images NHWC (or ``(N, H, W)``) of any size,
    uint8 (scaled to [0, 1]) or float; targets whatever ``loss`` compares predictions with (integer labels
    for softmax cross-entropy, float arrays for MSE). ``test`` may be ``None``. ``classes`` (one per training
    example) is what ``train_limit`` balances its subset over; by default each target's class
    (:func:`~jaxcnn.train.inputs.classes_of`).
    """

    def __init__(
        self,
        model: Layer,
        loss: Loss,
        train,
        test,
        config: TrainConfig,
        *,
        compiler_options: dict | None = None,
        log: Callable[[str], None] = print,
        classes=None,
    ):
        self.config = config.validate()
        self.model, self.loss = model, loss
        train_loss = _training_loss(loss, config.label_smoothing)
        images, targets = _pair(train, "train")
        if config.train_limit is not None and config.train_limit < len(images):
            keep, counts = balanced_subset(
                classes_of(targets) if classes is None else classes, config.train_limit, config.seed
            )
            images, targets = images[keep], targets[keep]
            log(
                f"train_limit {config.train_limit}: a class-balanced subset (seed {config.seed}): "
                f"{describe_counts(counts)}"
            )
        self.train_count, self.input_shape = len(images), (1, *images.shape[1:])
        self.compiler_options = dict(default_compiler_options() if compiler_options is None else compiler_options)
        self.placement = p = Placement(config.devices)
        if config.batch_size % p.size:
            raise ConfigError(
                f"--batch-size {config.batch_size} does not divide evenly over {p.size} devices; "
                f"use a multiple of {p.size} or pass --devices"
            )
        if self.train_count < config.batch_size:
            raise ConfigError(
                f"--batch-size {config.batch_size} exceeds the {self.train_count} training examples; lower it"
            )
        self.steps_per_epoch = self.train_count // config.batch_size
        self.tx = make_optimizer(config, self.steps_per_epoch)
        self.step = make_step(
            model,
            train_loss,
            self.tx,
            grad=config.grad,
            precision=config.precision,
            check_every=config.check_every,
            dp_clip=config.dp_clip,
            dp_noise_multiplier=config.dp_noise_multiplier,
            tta=config.tta,
        )
        if config.dp_clip is not None:
            _check_per_example(model, loss, self.input_shape, targets[:2])
        self.scaling = scaling_for(images, config.normalize)
        # What a checkpoint of this run was trained on (checked by --resume): hashed once, on the host.
        self.fingerprints = {"train": ckpt.data_fingerprint(images, targets), "test": None}
        self.root_key = jax.random.PRNGKey(config.seed)
        self.train_images, self.train_targets = p.put(images), p.put(targets)
        self.test_count = 0
        if test is not None:
            test_images, test_targets = _pair(test, "test")
            if test_images.shape[1:] != images.shape[1:]:
                raise ConfigError(
                    f"test images {test_images.shape[1:]} and train images {images.shape[1:]} differ in shape"
                )
            self.test_count = len(test_images)
            self.fingerprints["test"] = ckpt.data_fingerprint(test_images, test_targets)
            self.test_images, self.test_targets = p.put(test_images), p.put(test_targets)
        rep = p.replicated
        self.augmentation = Augmentation(config.augment, config.rotate, config.scale, config.flip, config.elastic)
        fixed = (self.step, self.scaling, self.augmentation, self.root_key)
        self.loop = loop_form(config)
        self.run_steps = jax.jit(
            functools.partial(run_steps, *fixed),
            donate_argnums=(0,),
            in_shardings=(rep, rep, rep, p.batch_sharded, rep),
            out_shardings=rep,
            compiler_options=self.compiler_options,
        )
        self.run_step = jax.jit(
            functools.partial(run_step, *fixed),
            donate_argnums=(0,),
            in_shardings=(rep, rep, rep, p.rows_sharded, rep),
            out_shardings=rep,
            compiler_options=self.compiler_options,
        )
        eval_batch = min(config.eval_batch_size, max(self.test_count, 1))  # a larger batch would only pad the test set
        eval_sharding = p.batch_sharded if eval_batch % p.size == 0 else None
        self.evaluate_fn = jax.jit(
            # The test loss is ``loss`` itself, also when training minimises its label-smoothed form.
            functools.partial(evaluate, self.step._replace(loss=loss), self.scaling, eval_batch, eval_sharding),
            in_shardings=rep,
            out_shardings=rep,
        )

    def init_state(self) -> TrainState:
        """The initial parameters, model state and optimiser state, replicated on the mesh.

        Computed by one program, compiled at XLA's optimisation level 1: run op by op, every initializer's random
        draw would compile its own (4.0 s for fast_cnn on a 2-core CPU); compiled at the default level 3, the
        program takes 2.2-2.8 s to compile, at level 1 about 0.9 s, and runs in 3 ms either way. The values
        are those of ``model.init`` run op by op, bit for bit (level 0 compiles faster still but moves normal
        draws by a unit in the last place)."""

        def initial(key):
            params, model_state, _ = self.model.init(key, self.input_shape)
            return TrainState(params, model_state, self.tx.init(params))

        compiled = jax.jit(initial, compiler_options={"xla_backend_optimization_level": 1})
        return self.placement.put(compiled(jax.random.fold_in(self.root_key, 0)))

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """``(steps_per_epoch, batch_size)`` example indices of ``epoch`` (seeded, deterministic)."""
        order = jdata.epoch_permutation(self.config.seed, epoch, self.train_count)
        used = self.steps_per_epoch * self.config.batch_size
        return np.asarray(order[:used], np.int32).reshape(self.steps_per_epoch, self.config.batch_size)

    def train_chunk(self, state: TrainState, batch_indices: np.ndarray, first_step: int):
        """Trains on the batches ``batch_indices (steps, B)`` from global step ``first_step``: one call of
        the scanned :func:`run_steps` (loop form ``"scan"``) or one call of :func:`run_step` per batch
        (``"step"``). Returns the new state and the per-step metrics, stacked."""
        p = self.placement
        batch_indices = np.asarray(batch_indices, np.int32)
        if self.loop == "scan":
            return self.run_steps(
                state,
                self.train_images,
                self.train_targets,
                p.put(batch_indices, p.batch_sharded),
                p.put(np.int32(first_step)),
            )
        rows = []
        for i, idx in enumerate(batch_indices):
            state, metrics = self.run_step(
                state,
                self.train_images,
                self.train_targets,
                p.put(idx, p.rows_sharded),
                p.put(np.int32(first_step + i)),
            )
            rows.append(metrics)
        return state, jax.tree_util.tree_map(lambda *m: np.stack([host(a) for a in m]), *rows)

    def evaluate(self, state: TrainState) -> tuple[float, float]:
        """``(mean loss, accuracy)`` on the test set."""
        loss, acc = self.evaluate_fn(state.params, state.model_state, self.test_images, self.test_targets)
        return float(host(loss)), float(host(acc))


# The loop form each gradient route trains fastest in, chosen by measurement (``jaxcnn bench``, sections
# steps and epoch; docs/benchmarks.md): the hand-written step runs fastest scanned over a chunk of steps,
# while XLA:CPU runs ``jax.grad``'s convolution gradients many times slower inside ``lax.scan`` than in a
# program of their own, so the autodiff route calls its jitted step once per batch, as Flax's examples do.
DEFAULT_LOOP_FORM = {"manual": "scan", "autodiff": "step"}


def loop_form(config: TrainConfig) -> str:
    """``"scan"`` or ``"step"``: ``config.loop``, or with ``"auto"`` the form of :data:`DEFAULT_LOOP_FORM`."""
    return DEFAULT_LOOP_FORM[config.grad] if config.loop == "auto" else config.loop


def _training_loss(loss: Loss, label_smoothing: float) -> Loss:
    """``loss``, or with ``label_smoothing`` its label-smoothed form (softmax cross-entropy only)."""
    if not label_smoothing:
        return loss
    from jaxcnn import gradients

    if loss is not gradients.softmax_cross_entropy:
        raise ConfigError(
            f"--label-smoothing smooths the labels of softmax cross-entropy; this run's loss is {loss.name}"
        )
    return gradients.label_smoothed_cross_entropy(label_smoothing)


def _check_per_example(model: Layer, loss: Loss, input_shape, targets) -> None:
    """:class:`ConfigError` when DP-SGD cannot clip ``model``'s per-example gradients (a layer that mixes the
    examples of a batch, such as BatchNorm in training mode), found by tracing it on two examples."""
    from jaxcnn.gradients import per_example_grad_norms

    def norms(key):
        params, state, _ = model.init(key, input_shape)
        x = jnp.zeros((len(targets), *input_shape[1:]), jnp.float32)
        return per_example_grad_norms(model, loss, params, state, x, targets, train=True, key=key)

    try:
        jax.eval_shape(norms, jax.random.PRNGKey(0))
    except ValueError as e:
        raise ConfigError(f"--dp-clip: {str(e).splitlines()[0]}") from None


def _pair(data, what: str):
    try:
        images, targets = data
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a pair (images, targets)") from None
    images = as_images(images, what=what)
    targets = np.asarray(targets)
    if targets.dtype == np.float64:
        targets = targets.astype(np.float32)
    elif targets.dtype.kind in "iub" and targets.dtype != np.int32:
        targets = targets.astype(np.int32)
    if len(targets) != len(images):
        raise ConfigError(f"{what}: {len(images)} images but {len(targets)} targets")
    if len(images) == 0:
        raise ConfigError(f"{what}: no examples")
    return images, targets


# ---------------------------------------------------------------------------------------------------
# The job


def fit(
    model: Layer,
    loss: Loss,
    /,
    train: tuple[npt.ArrayLike, npt.ArrayLike],
    test: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
    *,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    progress: bool | None = None,
    recipe: str | None = None,
    **settings: Any,
) -> FitResult:
    """Trains ``model`` (any :class:`~jaxcnn.layers.Layer`: a zoo model or one built with ``serial``) on
    ``loss`` and returns the trained parameters, state and per-epoch history.

    Args:
      model: the network; it is initialised from ``settings["seed"]`` for the shape of one training image.
      loss: a :class:`jaxcnn.gradients.Loss` (e.g. ``gradients.softmax_cross_entropy``).
      train: ``(images, targets)``: images NHWC ``(N, H, W, C)`` (or ``(N, H, W)``) of any size, uint8
        (scaled to [0, 1]) or float; targets as ``loss`` takes them (integer labels of any number of
        classes for cross-entropy, float arrays for MSE).
      test: an optional ``(images, targets)`` pair evaluated after every epoch.
      out: a directory for ``config.json`` (the settings, plus under ``data`` where the data came from and its
        fingerprint), ``metrics.jsonl`` (one strict-JSON line per epoch) and ``checkpoint.npz``, saved atomically
        after every epoch, every ``checkpoint_every`` steps when set, and on SIGINT/SIGTERM. A crash (even
        ``kill -9``) loses at most the steps since the last checkpoint.
      resume: continue from the checkpoint in ``out`` (also one saved mid-epoch); the resumed run computes
        exactly what the uninterrupted one would. It is refused, in one line saying what changed, when the
        checkpoint was written with other settings, other data (counts, shapes, dtypes or SHA-256 of the
        arrays), another number of steps per epoch or another parameter structure; a checkpoint of another
        jaxcnn version with the same parameter structure resumes with a logged note. Temporary files of a
        killed write are removed and a torn last line of ``metrics.jsonl`` is dropped (logged).
      log: called with one line per epoch (and a few more).
      progress: a progress bar per epoch (default: when stderr is a terminal).
      recipe: a named partial configuration of :mod:`jaxcnn.train.recipes` (e.g. ``"mnist"``) whose settings,
        other than ``model``, apply where ``settings`` does not say otherwise (default: none).
      **settings: fields of :class:`jaxcnn.train.TrainConfig` that apply to arrays: ``epochs``,
        ``batch_size``, ``lr``, ``optimizer`` (a name or an optax ``GradientTransformation``), ``schedule``,
        ``seed``, ``grad``, ``check_every``, ``augment``, ``precision``, ``train_limit``, ``devices``,
        ``checkpoint_every``, ...

    Returns:
      A :class:`FitResult` ``(params, state, opt_state, history)``; each ``history`` entry has ``epoch``,
      ``train_loss``, ``train_accuracy``, ``test_loss``, ``test_accuracy`` and ``eval_s`` (the seconds the
      evaluation took; on the epochs evaluated, see ``eval_every``), ``images_per_s`` (training only) and
      ``wall_s`` (since the start, evaluation included).

    Raises:
      ConfigError: a setting that cannot work, a checkpoint that is damaged or does not continue this run,
        an ``out`` that cannot be created or written, a full disk (one line naming the file; the previous
        checkpoint stays intact).
      Interrupted: SIGINT/SIGTERM stopped training, after saving a checkpoint into ``out``.
      TrainingStopped: a non-finite loss (the last good checkpoint is kept) or a failed gradient check.

    Examples:
      One epoch of a linear classifier on 64 random 8x8 images, in four steps of 16:

      >>> import numpy as np
      >>> import jaxcnn
      >>> from jaxcnn.gradients import softmax_cross_entropy
      >>> from jaxcnn.layers import Dense, Flatten, serial
      >>> rng = np.random.default_rng(0)
      >>> images = rng.random((64, 8, 8, 1), dtype=np.float32)
      >>> labels = rng.integers(0, 10, 64)
      >>> model = serial(Flatten(), Dense(10))
      >>> result = jaxcnn.fit(model, softmax_cross_entropy, (images, labels), epochs=1, batch_size=16,
      ...                     log=lambda line: None, progress=False)
      >>> result.params[1]["w"].shape
      (64, 10)
      >>> [record["epoch"] for record in result.history], sorted(result.history[0])
      ([1], ['epoch', 'images_per_s', 'train_accuracy', 'train_loss', 'wall_s'])
    """
    allowed = array_settings()
    for name in settings:
        if name not in allowed:
            hint = (
                "it chooses what jaxcnn train builds and loads; pass the network and the arrays instead"
                if name in {f.name for f in dataclasses.fields(TrainConfig)}
                else f"settings are {', '.join(allowed)}"
            )
            raise ConfigError(f"fit: unknown setting {name!r}; {hint}")
    config = recipes.resolve(recipe, settings, fields=allowed, loss=loss)
    return train_arrays(
        model,
        loss,
        train,
        test,
        config,
        out=out,
        resume=resume,
        log=log,
        progress=progress,
        source="the given arrays",
        presets=False,
        recipe=recipe,
    )


def train_arrays(
    model: Layer,
    loss: Loss,
    train: tuple[npt.ArrayLike, npt.ArrayLike],
    test: tuple[npt.ArrayLike, npt.ArrayLike] | None,
    config: TrainConfig,
    *,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    progress: bool | None = None,
    source: str = "the given arrays",
    presets: bool = True,
    classes: npt.ArrayLike | None = None,
    recipe: str | None = None,
) -> FitResult:
    """:func:`fit` with a whole :class:`TrainConfig` (``presets``: whether its preset fields describe this run,
    as in ``jaxcnn train``; they are left out of ``config.json`` otherwise; ``classes``: see :class:`Trainer`;
    ``recipe``: the name of the recipe ``config`` was resolved from, recorded in ``config.json``)."""
    config.validate()
    # With several processes (multi-host), process 0 alone logs and writes; every process reads --resume.
    writer = jax.process_index() == 0
    if not writer:
        log = lambda message: None  # noqa: E731  (rebinds the parameter; a def would redefine it)
    trainer = Trainer(model, loss, train, test, config, log=log, classes=classes)
    workdir = Path(out) if out is not None else None
    recorded = config.to_json() if presets else {k: v for k, v in config.to_json().items() if k in array_settings()}
    if not presets:
        recorded = {"network": model.name, "loss": loss.name, **recorded}
    recorded["recipe"] = recipe
    progress = sys.stderr.isatty() if progress is None else progress
    # What the checkpoints of this run continue: checked by --resume, recorded in config.json too.
    # ``scaling`` and ``input_shape`` are what jaxcnn.load_checkpoint needs to feed new images as training did.
    run = {
        "data": {"source": source, **trainer.fingerprints},
        "steps_per_epoch": trainer.steps_per_epoch,
        "scaling": {k: float(v) for k, v in trainer.scaling._asdict().items()},
        "input_shape": list(trainer.input_shape),
    }
    state = trainer.init_state()
    start_epoch, start_step, history, partial = 0, 0, [], None
    if workdir is not None:
        _make_out(workdir)
        if resume:
            state, meta = ckpt.restore_checkpoint(workdir, state, recorded, run)
            state = trainer.placement.put(state)
            start_epoch, start_step, partial = meta["epoch"], meta["step"], meta.get("partial_epoch")
            for note in ckpt.resume_notes(meta):
                log(note)
            history = ckpt.read_metrics(workdir / ckpt.METRICS, upto_epoch=start_epoch, log=log)
            log(f"resuming from {workdir / ckpt.CHECKPOINT} at epoch {start_epoch + 1}, step {start_step}")
        elif (workdir / ckpt.CHECKPOINT).exists():
            raise ConfigError(
                f"{workdir} already holds a checkpoint; pass --resume to continue it or choose another --out"
            )
        if writer:
            left = ckpt.remove_temporaries(workdir)
            if left:
                log(f"removed {len(left)} temporary file(s) of an interrupted write: {', '.join(p.name for p in left)}")
            ckpt.atomic_write(
                workdir / ckpt.CONFIG,
                lambda f: f.write(json.dumps({**recorded, "data": run["data"]}, indent=2).encode()),
            )
            ckpt.atomic_write(
                workdir / ckpt.METRICS, lambda f: f.write("".join(map(ckpt.metrics_line, history)).encode())
            )
    elif resume:
        raise ConfigError("--resume needs --out DIR (the directory holding the checkpoint)")

    spe, chunk, every = trainer.steps_per_epoch, config.chunk_steps, config.checkpoint_every
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    log(
        f"{model.name} ({n_params:,} parameters, {config.grad} gradients, {config.precision}) on {source}: "
        f"{trainer.train_count:,} train / {trainer.test_count:,} test images, "
        f"{spe} steps of {config.batch_size} per epoch"
    )
    if config.dp_clip is not None:
        privacy.epsilon(
            noise_multiplier=config.dp_noise_multiplier,
            sample_rate=config.batch_size / trainer.train_count,
            steps=1,
            delta=config.dp_delta,
        )  # fails now, not after an epoch, without dp-accounting
        log(
            f"DP-SGD: each example's gradient clipped to norm {config.dp_clip:g}, noise multiplier "
            f"{config.dp_noise_multiplier:g}, batch {config.batch_size} of {trainer.train_count:,} "
            f"(q = {config.batch_size / trainer.train_count:.4g}); epsilon at delta {config.dp_delta:g} by "
            f"{privacy.ACCOUNTANT}"
        )
    wall_start = time.perf_counter() - (partial["wall_s"] if partial else history[-1]["wall_s"] if history else 0.0)
    leaf_names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]]

    with Interrupt() as interrupt:
        for epoch in range(start_epoch, config.epochs):
            batches = trainer.epoch_batches(epoch)
            first = start_step if epoch == start_epoch else 0
            losses, correct, seen, train_time, checked = [], 0, 0, 0.0, []
            if first and partial:  # resuming mid-epoch: the statistics of the steps before ``first``
                losses = [np.asarray(partial["losses"], np.float32)]
                correct, seen, train_time = partial["correct"], partial["seen"], partial["train_time"]
                checked = [np.asarray(partial["checked"], np.float32).reshape(-1, len(leaf_names))]
            bar = progress_bar(spe, f"epoch {epoch + 1}/{config.epochs}", progress)
            if bar is not None:
                bar.update(first)
            for begin in range(first, spe, chunk):  # ``first`` is chunk-aligned unless chunk_steps changed
                t0 = time.perf_counter()
                state, metrics = trainer.train_chunk(state, batches[begin : begin + chunk], epoch * spe + begin)
                chunk_losses = host(metrics["loss"])
                train_time += time.perf_counter() - t0
                bad = np.flatnonzero(~np.isfinite(chunk_losses))
                if bad.size:
                    where = begin + int(bad[0])
                    kept = (
                        f"; the last good checkpoint is {workdir / ckpt.CHECKPOINT}"
                        if workdir and (workdir / ckpt.CHECKPOINT).exists()
                        else ""
                    )
                    raise TrainingStopped(
                        f"loss became {chunk_losses[bad[0]]} at step {where} of epoch {epoch + 1} "
                        f"(global step {epoch * spe + where}); try a lower --lr{kept}"
                    )
                checked.append(_check_gradient_errors(host(metrics["grad_errors"]), leaf_names, config, epoch, begin))
                losses.append(chunk_losses)
                correct += int(host(metrics["correct"]).sum())
                seen += chunk_losses.size * config.batch_size
                if bar is not None:
                    bar.update(chunk_losses.size)
                    bar.set_postfix(loss=f"{chunk_losses.mean():.4f}")
                end = begin + chunk_losses.size
                if end == spe:  # the epoch's end: its checkpoint is saved after its record, below
                    continue
                if interrupt.signal is not None:
                    if bar is not None:
                        bar.close()
                    _save_interrupted(
                        interrupt.signal,
                        workdir,
                        state,
                        epoch,
                        end,
                        recorded,
                        run,
                        _partial_epoch(losses, correct, seen, train_time, checked, wall_start),
                    )
                # --checkpoint-every: this chunk reached a multiple of ``every`` global steps.
                if (
                    every
                    and workdir is not None
                    and writer
                    and (epoch * spe + end) // every > (epoch * spe + begin) // every
                ):
                    ckpt.save_checkpoint(
                        workdir,
                        state,
                        epoch=epoch,
                        step=end,
                        config=recorded,
                        run=run,
                        partial_epoch=_partial_epoch(losses, correct, seen, train_time, checked, wall_start),
                    )
            if bar is not None:
                bar.close()
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "train_loss": float(np.concatenate(losses).mean()),
                "train_accuracy": correct / max(seen, 1),
            }
            if test is not None and (
                epoch + 1 == config.epochs or (config.eval_every and (epoch + 1) % config.eval_every == 0)
            ):
                t0 = time.perf_counter()
                record["test_loss"], record["test_accuracy"] = trainer.evaluate(state)
                record["eval_s"] = time.perf_counter() - t0
            if config.dp_clip is not None:
                record["dp_epsilon"] = privacy.epsilon(
                    noise_multiplier=config.dp_noise_multiplier,
                    sample_rate=config.batch_size / trainer.train_count,
                    steps=(epoch + 1) * spe,
                    delta=config.dp_delta,
                )
                record["dp_delta"] = config.dp_delta
            record["images_per_s"] = seen / train_time if train_time > 0 else float("nan")
            record["wall_s"] = time.perf_counter() - wall_start
            if config.check_every:
                rows = np.concatenate(checked)
                # Max relative difference between manual and jax.grad gradients, per parameter array.
                record["grad_check"] = {
                    "steps": len(rows),
                    "max_relative_error": dict(zip(leaf_names, rows.max(axis=0).tolist(), strict=True))
                    if len(rows)
                    else {},
                }
            history.append(record)
            log(epoch_line(record, config.epochs))
            if workdir is not None and writer:
                # The epoch's record first, then its checkpoint: a crash in between leaves an extra record that
                # --resume drops (it keeps records up to the checkpoint's epoch), never a checkpoint without one.
                ckpt.append_metrics(workdir / ckpt.METRICS, record)
                ckpt.save_checkpoint(workdir, state, epoch=epoch + 1, step=0, config=recorded, run=run)
            if interrupt.signal is not None and epoch + 1 < config.epochs:
                _save_interrupted(interrupt.signal, workdir, state, epoch + 1, 0, recorded, run)
    return FitResult(state.params, state.model_state, state.opt_state, history)


def epoch_line(record: dict, epochs: int) -> str:
    """The log line of one ``metrics.jsonl`` record of a run of ``epochs`` epochs (what ``jaxcnn train`` prints)."""
    line = (
        f"epoch {record['epoch']:>3}/{epochs}  train loss {record['train_loss']:.4f}  "
        f"acc {record['train_accuracy']:.4f}"
    )
    if "test_loss" in record:
        line += f"  |  test loss {record['test_loss']:.4f}  acc {record['test_accuracy']:.4f}"
    if "dp_epsilon" in record:
        line += f"  |  epsilon {record['dp_epsilon']:.3g} (delta {record['dp_delta']:g})"
    line += f"  |  {record['images_per_s']:,.0f} images/s  {record['wall_s']:.1f} s"
    if "grad_check" in record:
        worst = max(record["grad_check"]["max_relative_error"].values(), default=0.0)
        line += f"  |  grad check: {record['grad_check']['steps']} steps, max rel. diff {worst:.1e}"
    return line


def _make_out(workdir: Path) -> None:
    """Creates the ``out`` directory; one line naming it when it is a file or cannot be created."""
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--out {workdir} is a file, not a directory")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent that is a file, no permission, a read-only file system, ...
        raise ConfigError(
            f"--out {workdir}: cannot create the directory ({e.strerror or e}); choose another --out"
        ) from None


def _partial_epoch(losses, correct, seen, train_time, checked, wall_start) -> dict:
    """The statistics of an epoch's steps so far, saved with a mid-epoch checkpoint so that the resumed run
    reports the same epoch metrics as an uninterrupted one."""
    return {
        "losses": np.concatenate(losses).tolist(),
        "correct": correct,
        "seen": seen,
        "train_time": train_time,
        "checked": np.concatenate(checked).tolist(),
        "wall_s": time.perf_counter() - wall_start,
    }


def _save_interrupted(signum, workdir, state, epoch, step, config, run, partial_epoch=None):
    name = signal.Signals(signum).name
    if workdir is None or jax.process_index() != 0:
        reason = "no --out" if workdir is None else f"process {jax.process_index()} does not write"
        raise Interrupted(
            signum, f"{name}: training stopped at epoch {epoch + 1}, step {step} ({reason}, nothing saved)"
        )
    path = ckpt.save_checkpoint(
        workdir, state, epoch=epoch, step=step, config=config, partial_epoch=partial_epoch, run=run
    )
    raise Interrupted(
        signum,
        f"{name}: checkpoint saved to {path} at epoch {epoch + 1}, step {step}; "
        "continue with the same command plus --resume",
    )


def _check_gradient_errors(
    errors: np.ndarray, leaf_names: list[str], config: TrainConfig, epoch: int, begin: int
) -> np.ndarray:
    """Raises :class:`TrainingStopped` if a checked step exceeds the tolerance; returns the checked rows."""
    if errors.size == 0:  # no --check-every: the scan stacked (steps, 0) empty rows
        return errors.reshape(0, len(leaf_names))
    tol = config.check_tolerance
    for row, errs in enumerate(errors):
        if errs[0] < 0:  # this step was not checked
            continue
        worst = int(np.argmax(errs))
        if not errs[worst] <= tol:
            raise TrainingStopped(
                f"gradient check failed at step {begin + row} of epoch {epoch + 1}: manual and autodiff gradients of "
                f"params{leaf_names[worst]} differ by {errs[worst]:.2e} (relative) > {tol:.0e}"
            )
    return errors[errors[:, 0] >= 0]
