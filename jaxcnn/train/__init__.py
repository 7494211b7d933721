"""Training: one pure train step, one loop, any network and any data.

* :mod:`~jaxcnn.train.config`: :class:`TrainConfig`, every setting defined once (and ``jaxcnn train``'s flags);
* :mod:`~jaxcnn.train.step`: :func:`train_step` and :func:`eval_step`, pure module-level functions;
* :mod:`~jaxcnn.train.loop`: :func:`fit`, the epoch loop over :func:`run_steps` (``lax.scan`` of the step);
* :mod:`~jaxcnn.train.inputs`: image scaling, augmentation, class-balanced subsets;
* :mod:`~jaxcnn.train.checkpoint`: atomic checkpoints, resume, the metrics log;
* :mod:`~jaxcnn.train.privacy`: the epsilon a DP-SGD run has spent (``dp_clip``, ``dp_noise_multiplier``);
* :mod:`~jaxcnn.train.runtime`: the device mesh, XLA options, signals, progress;
* :mod:`~jaxcnn.train.zoo`: ``jaxcnn train``'s presets on named datasets.
"""

from jaxcnn.train import privacy
from jaxcnn.train.checkpoint import CHECKPOINT, RESUME_SETTINGS, restore_checkpoint, save_checkpoint
from jaxcnn.train.config import (
    CHECK_TOLERANCE,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
    ConfigError,
    TrainConfig,
    make_optimizer,
)
from jaxcnn.train.inputs import balanced_subset, random_shift
from jaxcnn.train.loop import FitResult, Interrupted, Trainer, TrainingStopped, fit, run_step, run_steps, train_arrays
from jaxcnn.train.runtime import CPU_COMPILER_OPTIONS, Placement, default_compiler_options
from jaxcnn.train.step import Step, TrainState, eval_step, make_step, train_step
from jaxcnn.train.zoo import train_and_evaluate

__all__ = [
    "CHECKPOINT",
    "CHECK_TOLERANCE",
    "CPU_COMPILER_OPTIONS",
    "OPTIMIZERS",
    "PRECISIONS",
    "RESUME_SETTINGS",
    "SCHEDULES",
    "ConfigError",
    "FitResult",
    "Interrupted",
    "Placement",
    "Step",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "TrainingStopped",
    "balanced_subset",
    "default_compiler_options",
    "eval_step",
    "fit",
    "make_optimizer",
    "make_step",
    "privacy",
    "random_shift",
    "restore_checkpoint",
    "run_step",
    "run_steps",
    "save_checkpoint",
    "train_and_evaluate",
    "train_arrays",
    "train_step",
]
