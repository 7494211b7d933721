"""Every setting of a training run, defined once: its default, its help text, its check.

:class:`TrainConfig` is the configuration of :func:`jaxcnn.fit` and ``jaxcnn train``; the command's
flags are generated from its fields (:func:`add_flags`), so a setting, its ``--flag`` and its help text
cannot drift apart. Fields marked ``preset`` (model, conv method, dataset) choose what ``jaxcnn train``
builds and loads; :func:`jaxcnn.fit` takes the network and the arrays themselves instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any

import optax

from jaxcnn.gradients import ROUTES
from jaxcnn.ops.conv import DEFAULT_METHOD
from jaxcnn.ops.conv import METHODS as CONV_METHODS

OPTIMIZERS = ("sgd", "nesterov", "adam")  # the choices of --optimizer
SCHEDULES = ("constant", "cosine", "linear", "step")  # the choices of --schedule
PRECISIONS = ("float32", "bfloat16")  # the choices of --precision
LOOP_FORMS = ("auto", "scan", "step")
TTA = ("none", "flip")  # the choices of --tta
GRAD_ROUTES = ("manual", "autodiff")  # the training routes; "autodiff_same_forward" is the check's witness
assert set(GRAD_ROUTES) <= set(ROUTES)
# --check-every: the largest max-relative difference per parameter array accepted between the hand-written
# and the jax.grad gradient of the same forward pass, both in float32. From the committed measurement
# experiments/results/check_tolerance (300 training steps per zoo model, against a float64 reference too):
# correct gradients differ by at most 1.3e-6 (seed_net, lenet5, small_cnn) and 5.7e-5 (resnet_small, whose
# BatchNorm amplifies float32 rounding), while an array 0.1% wrong differs by 1e-3. 3e-4 stays 5x above the
# first and 3x below the second; tests/test_check_tolerance.py holds the constant to the committed result.
CHECK_TOLERANCE = 3e-4


class ConfigError(ValueError):
    """A setting, a ``--resume`` or an output file that cannot work (a damaged checkpoint, a directory that cannot
    be written, a full disk); the message is one line saying which, why and what to do."""


def _setting(default, help: str, *, preset: bool = False, **flag) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, "preset": preset, "flag": flag})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; ``jaxcnn train --help`` shows each as ``--name-with-dashes``."""

    # What jaxcnn train builds and loads (jaxcnn.fit takes a network and arrays instead).
    model: str = _setting("small_cnn", "zoo preset to train", preset=True)
    conv_method: str = _setting(
        DEFAULT_METHOD,
        "formulation of every convolution, forward and backward (auto: the fastest verified per shape)",
        preset=True,
        choices=CONV_METHODS,
    )
    dataset: str = _setting(
        "mnist",
        "mnist, fashion-mnist, mnist-offline (bundled 5,000-image subset) or a directory of the four IDX files",
        preset=True,
    )
    data_dir: str | None = _setting(None, "directory searched first for the dataset's files", preset=True)
    offline: bool = _setting(False, "never download (also: JAXCNN_OFFLINE=1)", preset=True)
    # How the arrays are trained.
    epochs: int = _setting(10, "passes over the training set", type=int)
    batch_size: int = _setting(128, "examples per step (the last partial batch is dropped)", type=int)
    lr: float = _setting(0.05, "peak learning rate", type=float)
    optimizer: Any = _setting(
        "sgd",
        "sgd (momentum), nesterov or adam; jaxcnn.fit also takes an optax GradientTransformation",
        choices=OPTIMIZERS,
    )
    momentum: float = _setting(0.9, "momentum of sgd/nesterov", type=float)
    weight_decay: float = _setting(
        0.0,
        "weight decay: added to the gradient (L2) for sgd and nesterov, decoupled (AdamW) for adam (0: off)",
        type=float,
    )
    schedule: str = _setting(
        "cosine",
        "learning-rate schedule: constant, cosine decay to 0, linear decay to 0, or step (x0.1 at 50%% and 75%%)",
        choices=SCHEDULES,
    )
    warmup: float = _setting(
        0.0,
        "fraction of the steps over which the learning rate first rises linearly from 0 to --lr, before "
        "--schedule takes over for the rest (0: none; --schedule linear --warmup 0.25 is a one-cycle triangle)",
        type=float,
        metavar="FRACTION",
    )
    label_smoothing: float = _setting(
        0.0,
        "softmax cross-entropy against (1 - A) onehot + A / classes; the test loss stays the plain "
        "cross-entropy (0: off)",
        type=float,
        metavar="A",
    )
    seed: int = _setting(
        0, "seeds initialisation, shuffling, augmentation, dropout and --train-limit's subset", type=int
    )
    grad: str = _setting(
        "manual",
        "manual: the hand-written backward passes; autodiff: jax.grad of the forward "
        "pass an autodiff user writes (lax convolutions, as in Flax)",
        choices=GRAD_ROUTES,
    )
    check_every: int = _setting(
        0,
        "every N steps compare the hand-written gradient with jax.grad of the same "
        "forward pass on the current batch, both in float32, and stop if they differ by "
        "more than --check-tolerance (0: never)",
        type=int,
        metavar="N",
    )
    check_tolerance: float = _setting(
        CHECK_TOLERANCE, "largest max-relative difference per parameter array that --check-every accepts", type=float
    )
    dp_clip: float | None = _setting(
        None,
        "DP-SGD: clip each example's gradient to this L2 norm (per-example rules of "
        "the hand-written backward), sum, add noise, average",
        type=float,
        metavar="C",
    )
    dp_noise_multiplier: float = _setting(
        0.0,
        "DP-SGD: Gaussian noise of std SIGMA * C added to the sum of clipped "
        "gradients; the epsilon spent is logged every epoch (needs --dp-clip)",
        type=float,
        metavar="SIGMA",
    )
    dp_delta: float = _setting(1e-5, "DP-SGD: the delta at which the epsilon spent is reported", type=float)
    train_limit: int | None = _setting(
        None, "train on a seeded, class-balanced subset of N training examples", type=int, metavar="N"
    )
    precision: str = _setting(
        "float32", "compute dtype; bfloat16 keeps float32 parameters, loss and updates", choices=PRECISIONS
    )
    normalize: bool = _setting(False, "standardise pixels by the training set's mean and std")
    augment: int = _setting(
        2,
        "shift each training image by a random offset of up to this many pixels, filling "
        "with the image's background (0: off)",
        type=int,
        metavar="PIXELS",
    )
    rotate: float = _setting(
        0.0, "rotate each training image by a random angle of up to this many degrees (0: off)", type=float
    )
    scale: float = _setting(
        0.0, "zoom each training image by a random factor in [1 - S, 1 + S] (0: off)", type=float, metavar="S"
    )
    flip: bool = _setting(False, "mirror each training image left to right with probability 1/2 (not for digits)")
    elastic: float = _setting(
        0.0,
        "elastic distortion of each training image: a random displacement field, uniform noise smoothed by a "
        "Gaussian of 4 pixels, times ALPHA (0: off)",
        type=float,
        metavar="ALPHA",
    )
    tta: str = _setting(
        "none",
        "test-time augmentation of evaluation and prediction: flip averages the network's outputs for each image "
        "and its mirror image (not for digits)",
        choices=TTA,
    )
    devices: int | None = _setting(
        None,
        "data-parallel over the first N devices (default: all; 1: a single "
        "device); the batch size must be a multiple of N",
        type=int,
        metavar="N",
    )
    loop: str = _setting(
        "auto",
        "scan: each chunk of steps is one compiled lax.scan; step: one compiled call per "
        "step; auto: the form measured fastest for --grad (scan for manual, step for autodiff)",
        choices=LOOP_FORMS,
    )
    chunk_steps: int = _setting(
        50, "steps per compiled lax.scan call (between progress updates and interrupt checks)", type=int, metavar="N"
    )
    eval_batch_size: int = _setting(1000, "examples per evaluation batch", type=int, metavar="N")
    eval_every: int = _setting(
        1,
        "evaluate the test set every N epochs and after the last one (0: after the last one only)",
        type=int,
        metavar="N",
    )
    checkpoint_every: int | None = _setting(
        None,
        "also save a checkpoint mid-epoch every STEPS training steps: at "
        "the end of the chunk of --chunk-steps (counted from the epoch's start) "
        "that reaches each multiple of STEPS; every epoch's end is saved anyway",
        type=int,
        metavar="STEPS",
    )

    def validate(self) -> TrainConfig:
        """Returns ``self``; raises :class:`ConfigError` naming the first setting that cannot work."""
        from jaxcnn.models import MODELS

        custom_tx = not isinstance(self.optimizer, str)
        checks = [
            (self.model in MODELS, f"--model must be one of {', '.join(MODELS)}, got {self.model!r}"),
            (
                self.conv_method in CONV_METHODS,
                f"--conv-method must be one of {', '.join(CONV_METHODS)}, got {self.conv_method!r}",
            ),
            (_is_int(self.epochs) and self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (_is_int(self.batch_size) and self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (_is_number(self.lr) and self.lr > 0, f"--lr must be a positive number, got {self.lr}"),
            (
                self.optimizer in OPTIMIZERS
                if not custom_tx
                else isinstance(self.optimizer, optax.GradientTransformation),
                f"--optimizer must be one of {', '.join(OPTIMIZERS)} or an optax GradientTransformation, "
                f"got {self.optimizer!r}",
            ),
            (
                _is_number(self.momentum) and 0 <= self.momentum < 1,
                f"--momentum must be in [0, 1), got {self.momentum}",
            ),
            (
                _is_number(self.weight_decay) and self.weight_decay >= 0,
                f"--weight-decay must be >= 0, got {self.weight_decay}",
            ),
            (
                _is_number(self.warmup) and 0 <= self.warmup < 1,
                f"--warmup must be a fraction in [0, 1), got {self.warmup}",
            ),
            (
                _is_number(self.label_smoothing) and 0 <= self.label_smoothing < 1,
                f"--label-smoothing must be in [0, 1), got {self.label_smoothing}",
            ),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"),
            (
                _is_int(self.seed) and 0 <= self.seed < 2**63,
                f"--seed must be an integer in 0..2**63-1, got {self.seed}",
            ),
            (self.grad in GRAD_ROUTES, f"--grad must be manual or autodiff, got {self.grad!r}"),
            (
                _is_int(self.check_every) and self.check_every >= 0,
                f"--check-every must be >= 0, got {self.check_every}",
            ),
            (
                not _is_int(self.check_every) or self.check_every < 2**31,
                f"--check-every must be below 2**31 (the int32 step counter), got {self.check_every}",
            ),
            (
                self.check_every == 0 or self.grad == "manual",
                "--check-every compares hand-written with autodiff gradients; it needs --grad manual",
            ),
            (
                _is_number(self.check_tolerance) and self.check_tolerance > 0,
                f"--check-tolerance must be a positive number, got {self.check_tolerance}",
            ),
            (
                self.dp_clip is None or (_is_number(self.dp_clip) and self.dp_clip > 0),
                f"--dp-clip must be a positive number, got {self.dp_clip}",
            ),
            (
                _is_number(self.dp_noise_multiplier) and self.dp_noise_multiplier >= 0,
                f"--dp-noise-multiplier must be >= 0, got {self.dp_noise_multiplier}",
            ),
            (
                self.dp_noise_multiplier == 0 or self.dp_clip is not None,
                "--dp-noise-multiplier scales the noise by the clipping norm; it needs --dp-clip",
            ),
            (_is_number(self.dp_delta) and 0 < self.dp_delta < 1, f"--dp-delta must be in (0, 1), got {self.dp_delta}"),
            (
                self.dp_clip is None or self.grad == "manual",
                "--dp-clip clips per-example gradients with the hand-written per-example rules; it needs --grad manual",
            ),
            (
                self.dp_clip is None or self.check_every == 0,
                "--check-every compares batch gradients, but with --dp-clip the step's gradient is clipped and noised; "
                "check the per-example rules with jaxcnn.gradients instead",
            ),
            (
                self.train_limit is None or (_is_int(self.train_limit) and self.train_limit >= 1),
                f"--train-limit must be >= 1, got {self.train_limit}",
            ),
            (
                self.precision in PRECISIONS,
                f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
            ),
            (
                self.devices is None or (_is_int(self.devices) and self.devices >= 1),
                f"--devices must be >= 1, got {self.devices}",
            ),
            (
                _is_int(self.augment) and 0 <= self.augment <= 8,
                f"--augment must be between 0 and 8 pixels, got {self.augment}",
            ),
            (
                _is_number(self.rotate) and 0 <= self.rotate <= 180,
                f"--rotate must be between 0 and 180 degrees, got {self.rotate}",
            ),
            (_is_number(self.scale) and 0 <= self.scale < 1, f"--scale must be in [0, 1), got {self.scale}"),
            (isinstance(self.flip, bool), f"--flip must be true or false, got {self.flip!r}"),
            (
                _is_number(self.elastic) and 0 <= self.elastic <= 100,
                f"--elastic must be between 0 and 100, got {self.elastic}",
            ),
            (self.tta in TTA, f"--tta must be one of {', '.join(TTA)}, got {self.tta!r}"),
            (
                _is_int(self.eval_every) and self.eval_every >= 0,
                f"--eval-every must be >= 0, got {self.eval_every}",
            ),
            (self.loop in LOOP_FORMS, f"--loop must be one of {', '.join(LOOP_FORMS)}, got {self.loop!r}"),
            (
                _is_int(self.chunk_steps) and self.chunk_steps >= 1,
                f"--chunk-steps must be >= 1, got {self.chunk_steps}",
            ),
            (
                _is_int(self.eval_batch_size) and self.eval_batch_size >= 1,
                f"--eval-batch-size must be >= 1, got {self.eval_batch_size}",
            ),
            (
                self.checkpoint_every is None or (_is_int(self.checkpoint_every) and self.checkpoint_every >= 1),
                f"--checkpoint-every must be a positive number of steps, got {self.checkpoint_every}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    def to_json(self) -> dict:
        """The settings as JSON values (a custom optimiser is recorded by its type, not its functions)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if not isinstance(self.optimizer, str):
            out["optimizer"] = f"custom {type(self.optimizer).__name__}"
        return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def array_settings() -> tuple[str, ...]:
    """The names of the settings :func:`jaxcnn.fit` takes (every field not marked ``preset``)."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if not f.metadata["preset"])


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """``config.optimizer`` itself when it is an optax transformation; otherwise SGD with momentum
    (default), Nesterov or Adam, with optional weight decay (L2 for SGD, decoupled for Adam) and ``config.schedule``."""
    if not isinstance(config.optimizer, str):
        return config.optimizer
    total = max(config.epochs * steps_per_epoch, 1)
    warmup = int(config.warmup * total)
    rest = total - warmup
    if config.schedule == "cosine":
        lr = optax.cosine_decay_schedule(config.lr, rest)
    elif config.schedule == "linear":
        lr = optax.linear_schedule(config.lr, 0.0, rest)
    elif config.schedule == "step":
        lr = optax.piecewise_constant_schedule(config.lr, {int(rest * 0.5): 0.1, int(rest * 0.75): 0.1})
    else:
        lr = optax.constant_schedule(config.lr)
    if warmup:
        lr = optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup), lr], [warmup])
    if config.optimizer == "adam":
        return optax.adamw(lr, weight_decay=config.weight_decay) if config.weight_decay else optax.adam(lr)
    sgd = optax.sgd(lr, momentum=config.momentum, nesterov=config.optimizer == "nesterov")
    return optax.chain(optax.add_decayed_weights(config.weight_decay), sgd) if config.weight_decay else sgd


def add_flags(parser: argparse.ArgumentParser, *, choices: dict | None = None) -> None:
    """Adds one ``--flag`` per :class:`TrainConfig` field, with its help text and default.

    A flag not given is absent from the parsed namespace (``argparse.SUPPRESS``), so that :func:`from_flags`
    can tell the settings a user chose from a recipe's; the help text shows each field's default.
    ``choices`` adds choices known only at run time (e.g. the zoo's names for ``model``).
    """
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        kwargs = dict(f.metadata["flag"])
        shown = f"{f.metadata['help']} (default: {'off' if default is None or default is False else default})"
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action="store_true", default=argparse.SUPPRESS, help=shown)
            continue
        if choices and f.name in choices:
            kwargs["choices"] = list(choices[f.name])
        parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=shown, **kwargs)


def explicit_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`TrainConfig` fields given as flags (see :func:`add_flags`)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}


def from_flags(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed flags alone: every field not given at its default (see
    :func:`jaxcnn.train.recipes.resolve` for flags over a recipe)."""
    return TrainConfig(**explicit_settings(args))
