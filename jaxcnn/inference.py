"""Using what was trained: :func:`load_checkpoint`, :func:`evaluate` and :func:`predict`.

A checkpoint (``checkpoint.npz`` in the ``--out`` directory of ``jaxcnn train`` or :func:`jaxcnn.fit`)
holds the leaves of the whole train state, ``(params, model_state, opt_state)`` flattened in that order,
and a ``meta`` record with the run's settings. :func:`load_checkpoint` rebuilds the network (a zoo
preset from the recorded ``model`` and ``conv_method``; a network of the user's own must be passed as
``model=``, since only its name is recorded), initialises it on the recorded input shape to get the
structure and shapes of ``params`` and ``model_state``, and takes those two from the first leaves. The
optimiser state is checked (its leaf count, when the recorded optimiser can be rebuilt) and dropped.

Inputs are scaled exactly as training scaled them (:class:`~jaxcnn.train.inputs.Scaling`): uint8 images
are divided by 255, float images are taken as they are, and a run trained with ``normalize`` subtracts
the training set's mean and divides by its standard deviation. The forward is the one the training loop
evaluates with (:func:`jaxcnn.train.step.eval_outputs`: the run's gradient route, precision and test-time
augmentation), in batches of the run's ``eval_batch_size``, so :func:`evaluate` reproduces the loop's test accuracy.
"""

from __future__ import annotations

import functools
import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

import jax
import jax.numpy as jnp
import optax

from jaxcnn import gradients
from jaxcnn.gradients import Loss
from jaxcnn.layers import Layer
from jaxcnn.models import INPUT_SHAPE, MODELS, ModelSpec
from jaxcnn.ops.conv import DEFAULT_METHOD
from jaxcnn.ops.conv import METHODS as CONV_METHODS
from jaxcnn.train.checkpoint import CHECKPOINT
from jaxcnn.train.config import GRAD_ROUTES, OPTIMIZERS, TTA, ConfigError, TrainConfig, array_settings, make_optimizer
from jaxcnn.train.inputs import Scaling, as_images, balanced_subset, classes_of, scaling_for
from jaxcnn.train.loop import FitResult
from jaxcnn.train.step import PRECISIONS, Step, eval_outputs, make_step

__all__ = [
    "LOSSES",
    "Checkpoint",
    "Evaluation",
    "Prediction",
    "as_checkpoint",
    "checkpoint_file",
    "evaluate",
    "from_fit",
    "load_checkpoint",
    "model_inputs",
    "outputs",
    "predict",
    "preset_scaling",
    "read_outputs",
]

LOSSES: dict[str, Loss] = {
    loss.name: loss
    for loss in (gradients.softmax_cross_entropy, gradients.mse, gradients.binary_cross_entropy_with_logits)
}
"""The losses a checkpoint's recorded ``loss`` name is resolved against."""

_NO_UPDATE = optax.identity()  # a fixed optimiser, so that equal steps hash equal (see _compiled_outputs)


class Checkpoint(NamedTuple):
    """A trained network ready to use: what :func:`load_checkpoint` returns.

    ``config`` is the recorded settings (``config.json``); ``params`` and ``state`` the trained parameters
    and model state (BatchNorm statistics); ``model`` and ``loss`` the network and its loss; ``epoch`` and
    ``step`` the position the checkpoint was saved at (the next step to run); ``scaling`` the training
    set's standardisation (``mean``, ``std``; ``scale`` is the one of the training images' dtype, while an
    input is scaled by its own: 1/255 for uint8, 1 for float); ``input_shape`` ``(1, H, W, C)``; ``path``
    the file it came from.
    """

    config: dict
    params: Any
    state: Any
    model: Layer
    loss: Loss
    epoch: int
    step: int
    scaling: Scaling
    input_shape: tuple
    path: Path | None = None

    @property
    def preset(self) -> ModelSpec | None:
        """The zoo preset this run trained (``jaxcnn train``), or ``None`` for a network of the user's own."""
        return _preset(self.config)

    def targets(self, labels) -> np.ndarray:
        """Digit labels ``(N,)`` -> what the loss compares outputs with: the preset's targets (``seed_net``:
        ``(N, 1)`` floats, digit > 4); the labels unchanged for a network of the user's own."""
        spec = self.preset
        return np.asarray(labels) if spec is None else np.asarray(spec.targets(np.asarray(labels)))


class Prediction(NamedTuple):
    """What :func:`predict` returns for ``N`` images.

    ``classes`` ``(N,)`` int64; ``probabilities`` ``(N, K)`` float32; ``outputs`` the network's raw outputs
    ``(N, ...)`` float32. How outputs become classes and probabilities depends on the loss:

    * softmax cross-entropy: ``softmax(logits)``, the class of the largest logit;
    * one output (``seed_net``'s sigmoid trained on MSE; a logit for binary cross-entropy): ``p`` is the
      output clipped to [0, 1] (the sigmoid of the logit), ``probabilities = [1 - p, p]`` and the class is 1
      when the output exceeds 0.5 (the logit exceeds 0), the threshold the loss's accuracy uses;
    * several outputs under MSE or binary cross-entropy: per-output scores (outputs clipped to [0, 1], or
      sigmoids of logits; they need not sum to 1), the class of the largest output.
    """

    classes: np.ndarray
    probabilities: np.ndarray
    outputs: np.ndarray


class Evaluation(NamedTuple):
    """What :func:`evaluate` returns: the mean per-example ``loss``, ``accuracy`` (the loss's own notion of
    a correct prediction, as the training loop reports it), ``per_class_accuracy`` ``(K,)`` (the accuracy
    over the examples of each true class; NaN for a class without examples), ``confusion`` ``(K, K)``
    counts (row: true class, column: predicted class) and ``examples``, how many were evaluated."""

    loss: float
    accuracy: float
    per_class_accuracy: np.ndarray
    confusion: np.ndarray
    examples: int


# ---------------------------------------------------------------------------------------------------
# Loading


def checkpoint_file(path: str | os.PathLike) -> Path:
    """``path`` itself when it is a file, ``path/checkpoint.npz`` when it is a directory; :class:`ConfigError`
    naming the place when there is no checkpoint."""
    path = Path(path)
    file = path / CHECKPOINT if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(
            f"no checkpoint at {file}; train one with jaxcnn train --out DIR "
            "(or jaxcnn.fit(..., out=DIR)) and pass that DIR"
        )
    return file


def load_checkpoint(
    path: str | os.PathLike,
    model: Layer | None = None,
    *,
    loss: Loss | None = None,
    input_shape: tuple | None = None,
    scaling: Scaling | None = None,
) -> Checkpoint:
    """Loads a trained network from ``path`` (an ``--out`` directory or its ``checkpoint.npz``).

    Args:
      path: the directory ``jaxcnn train --out`` / ``jaxcnn.fit(out=)`` wrote, or the checkpoint file.
      model: the network, for a run of :func:`jaxcnn.fit` (required there: only its name is recorded);
        by default a ``jaxcnn train`` run's zoo preset, built with its recorded ``conv_method``.
      loss: the loss; by default the preset's, or the one whose name the run recorded.
      input_shape: ``(1, H, W, C)`` (or ``(H, W, C)``) of the training images; by default the one the checkpoint
        records (its training set's fingerprint), else the preset's, else MNIST's ``(1, 28, 28, 1)``.
      scaling: the training set's :class:`~jaxcnn.train.inputs.Scaling`; needed only for a ``jaxcnn.fit``
        run trained with ``normalize=True`` whose checkpoint does not record it (pass
        ``scaling_for(train_images, True)``). A ``jaxcnn train`` run's statistics are recomputed from its
        recorded dataset, ``train_limit`` and ``seed`` when not recorded.

    Returns:
      A :class:`Checkpoint`; the optimiser state is dropped.

    Raises:
      ConfigError: no checkpoint there, an unreadable or corrupt file, a run of ``jaxcnn.fit`` without
        ``model=``, or a checkpoint that does not fit the model (its array count or shapes); one line that
        names the file.
    """
    file = checkpoint_file(path)
    try:
        with np.load(file, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            config, epoch, step = dict(meta["config"]), int(meta["epoch"]), int(meta["step"])
            count = int(meta["leaves"])
            model, loss, spec, input_shape = _network(file, config, model, loss, input_shape, meta)
            shape_known = "model" in config or bool(_recorded_train(meta))
            params, state = _restore(file, z, count, config, model, input_shape, shape_known)
    except ConfigError:
        raise
    except (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile, zlib.error) as error:
        raise ConfigError(
            f"{file} is not a readable jaxcnn checkpoint ({type(error).__name__}: {error}); "
            "train again or point to another --out"
        ) from None
    scaling = _training_scaling(file, meta, config, spec, scaling)
    return Checkpoint(config, params, state, model, loss, epoch, step, scaling, input_shape, file)


def from_fit(
    model: Layer,
    loss: Loss,
    result: FitResult,
    *,
    scaling: Scaling | None = None,
    input_shape: tuple = INPUT_SHAPE,
    config: dict | None = None,
) -> Checkpoint:
    """A :class:`Checkpoint` of a :class:`~jaxcnn.FitResult` in memory, for :func:`evaluate` and
    :func:`predict` without a file. ``scaling``: the training set's (needed only with ``normalize``);
    ``input_shape``: the training images' ``(1, H, W, C)``; ``config``: the settings of ``fit`` that change the
    forward (``grad``, ``precision``, ``eval_batch_size``)."""
    history = getattr(result, "history", [])
    return Checkpoint(
        dict(config or {}),
        result.params,
        result.state,
        model,
        loss,
        len(history),
        0,
        scaling or Scaling(),
        _input_shape(input_shape),
        None,
    )


def _preset(config: dict) -> ModelSpec | None:
    return MODELS.get(str(config.get("model"))) if "network" not in config else None


def _input_shape(shape) -> tuple:
    shape = tuple(int(d) for d in shape)
    return (1, *shape) if len(shape) == 3 else (1, *shape[1:])


def _network(file: Path, config: dict, model, loss, input_shape, meta: dict):
    """``(model, loss, preset, input_shape)`` of a checkpoint, from the arguments or the recorded settings."""
    spec = _preset(config)
    if model is None:
        if spec is None:
            if "network" in config:
                raise ConfigError(
                    f"{file} holds a network of your own ({config['network']!r}, trained by jaxcnn.fit); "
                    "load it in Python with jaxcnn.load_checkpoint(path, model=<that network>)"
                )
            raise ConfigError(f"{file} records no zoo model (model {config.get('model')!r}); pass model=")
        method = config.get("conv_method", DEFAULT_METHOD)
        model = spec.build(conv_method=method if method in CONV_METHODS else DEFAULT_METHOD)
    if not isinstance(model, Layer):
        raise ConfigError(
            f"load_checkpoint: model must be a jaxcnn Layer (a zoo model or serial(...)), got {type(model).__name__}"
        )
    if loss is None:
        loss = spec.loss if spec is not None else LOSSES.get(str(config.get("loss")))
        if loss is None:
            raise ConfigError(
                f"{file} was trained with the loss {config.get('loss')!r}, which is not one of "
                f"{', '.join(LOSSES)}; pass loss="
            )
    default = spec.input_shape if spec is not None else INPUT_SHAPE
    shape = input_shape or _recorded_train(meta).get("image_shape") or default
    try:
        shape = _input_shape(shape)
    except (TypeError, ValueError):
        raise ConfigError(f"load_checkpoint: input_shape must be (1, H, W, C) or (H, W, C), got {shape!r}") from None
    if len(shape) != 4:
        raise ConfigError(f"load_checkpoint: input_shape must be (1, H, W, C) or (H, W, C), got {shape!r}")
    return model, loss, spec, shape


def _recorded_train(meta: dict) -> dict:
    """The checkpoint's fingerprint of its training set (``image_shape`` ``[H, W, C]``, ``image_dtype``, ...),
    or ``{}`` when it records none."""
    data = meta.get("data")
    train = data.get("train") if isinstance(data, dict) else None
    return train if isinstance(train, dict) else {}


def _optimizer(config: dict) -> optax.GradientTransformation | None:
    """The recorded run's optimiser, when it is a named one (a custom optax transformation is not recorded)."""
    if config.get("optimizer") not in OPTIMIZERS:
        return None
    try:
        settings = TrainConfig(**{k: config[k] for k in array_settings() if k in config}).validate()
    except (ConfigError, TypeError):
        return None
    return make_optimizer(settings, 1)


def _describe(a) -> str:
    return f"{np.dtype(a.dtype).name}{list(np.shape(a))}"


def _restore(file: Path, z, count: int, config: dict, model: Layer, input_shape: tuple, shape_known: bool):
    """The ``params`` and ``model_state`` of the checkpoint open as ``z``, checked against ``model``'s init."""
    try:  # shapes only (traced, not computed): the values come from the checkpoint
        params, state = jax.eval_shape(lambda key: model.init(key, input_shape)[:2], jax.random.PRNGKey(0))
    except (ValueError, TypeError) as error:
        raise ConfigError(
            f"{file}: the model cannot be initialised on inputs of shape {input_shape} ({error}); pass input_shape="
        ) from None
    named = [("params" + jax.tree_util.keystr(p), a) for p, a in jax.tree_util.tree_flatten_with_path(params)[0]]
    named += [("state" + jax.tree_util.keystr(p), a) for p, a in jax.tree_util.tree_flatten_with_path(state)[0]]
    tx = _optimizer(config)
    opt_count = len(jax.tree_util.tree_leaves(jax.eval_shape(tx.init, params))) if tx is not None else None
    hint = "; pass the network it was trained with" + (
        "" if shape_known else f" (and input_shape= if its images were not {input_shape[1:]})"
    )
    if count < len(named) or (opt_count is not None and count != len(named) + opt_count):
        optimiser = f" + {opt_count} optimiser arrays" if opt_count is not None else " or more"
        wanted = f"{len(named)} model arrays{optimiser}"
        raise ConfigError(f"{file} does not fit this model: it holds {count} arrays, the model needs {wanted}{hint}")
    leaves = []
    for i, (name, ref) in enumerate(named):
        arr = z[f"leaf_{i:05d}"]
        if arr.shape != np.shape(ref) or arr.dtype.kind != np.dtype(ref.dtype).kind:
            raise ConfigError(
                f"{file} does not fit this model: array {i} is {_describe(arr)} but the model's {name} "
                f"is {_describe(ref)}{hint}"
            )
        leaves.append(jnp.asarray(arr))
    n_params = len(jax.tree_util.tree_leaves(params))
    params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), leaves[:n_params])
    state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state), leaves[n_params:])
    return params, state


def _training_scaling(file: Path, meta: dict, config: dict, spec: ModelSpec | None, scaling) -> Scaling:
    """The training set's :class:`Scaling`: given, recorded, plain (no ``normalize``), or recomputed from a
    ``jaxcnn train`` run's recorded dataset and subset."""
    if scaling is not None:
        return scaling if isinstance(scaling, Scaling) else Scaling(*scaling)
    recorded = meta.get("scaling") or config.get("scaling")
    if recorded:
        return Scaling(**{k: float(recorded[k]) for k in Scaling._fields if k in recorded})
    if not config.get("normalize"):
        dtype = _recorded_train(meta).get("image_dtype", "uint8" if spec is not None else None)
        return Scaling(1.0 / 255.0 if dtype == "uint8" else 1.0)
    if spec is None:
        raise ConfigError(
            f"{file} was trained with normalize=True but records no mean and std of its training set; "
            "pass scaling=jaxcnn.train.inputs.scaling_for(train_images, True)"
        )
    return preset_scaling(config)


def preset_scaling(config: dict) -> Scaling:
    """The :class:`Scaling` a ``jaxcnn train`` run with these settings computed: its dataset's training images
    (``dataset``, ``data_dir``, ``offline``), reduced to the class-balanced ``train_limit`` subset of ``seed``
    as :class:`~jaxcnn.train.Trainer` reduces them, then :func:`~jaxcnn.train.inputs.scaling_for`.

    Raises:
      DataError: the dataset cannot be loaded (any more).
    """
    from jaxcnn import data as jdata

    dataset = jdata.load_dataset(
        config.get("dataset", "mnist"),
        data_dir=config.get("data_dir"),
        download=not config.get("offline", False),
        log=lambda line: None,
    )
    images, limit = dataset.train_images, config.get("train_limit")
    if limit is not None and limit < len(images):
        keep, _ = balanced_subset(dataset.train_labels, limit, config.get("seed", 0))
        images = images[keep]
    return scaling_for(as_images(images, what="train"), bool(config.get("normalize")))


# ---------------------------------------------------------------------------------------------------
# Running


def as_checkpoint(trained: Checkpoint | str | os.PathLike) -> Checkpoint:
    """``trained`` itself when it is a :class:`Checkpoint`, else :func:`load_checkpoint` of it (a path)."""
    if isinstance(trained, Checkpoint):
        return trained
    if isinstance(trained, (str, os.PathLike)):
        return load_checkpoint(trained)
    raise ConfigError(
        f"expected a Checkpoint (load_checkpoint, from_fit) or the path of one, got {type(trained).__name__}"
    )


def model_inputs(images: npt.ArrayLike, input_shape: tuple, *, what: str = "images") -> np.ndarray:
    """``images`` (NHWC or NHW; uint8 or float) as the NHWC array a network of ``input_shape`` takes:
    uint8 stays uint8, other dtypes become float32. :class:`ConfigError` naming ``what`` when the image
    shape differs from the training images'."""
    x = as_images(images, what=what)
    if x.shape[1:] != tuple(input_shape[1:]):
        h, w, c = input_shape[1:]
        raise ConfigError(
            f"{what}: images of shape {x.shape[1:]} (H, W, C), but the network was trained on "
            f"{h}x{w} images with {c} channel{'s' if c != 1 else ''} {tuple(input_shape[1:])}"
        )
    if len(x) == 0:
        raise ConfigError(f"{what}: no images")
    return x


def _batch_size(batch_size, config: dict, n: int) -> int:
    b = config.get("eval_batch_size", 1000) if batch_size is None else batch_size
    if not isinstance(b, (int, np.integer)) or isinstance(b, bool) or b < 1:
        raise ConfigError(f"batch size must be a positive integer, got {b!r}")
    return int(min(b, n))


def _step(ck: Checkpoint) -> Step:
    grad = ck.config.get("grad", "manual")
    precision = ck.config.get("precision", "float32")
    return make_step(
        ck.model,
        ck.loss,
        _NO_UPDATE,
        grad=grad if grad in GRAD_ROUTES else "manual",
        precision=precision if precision in PRECISIONS else "float32",
        tta=ck.config.get("tta", "none") if ck.config.get("tta") in TTA else "none",
    )


def _outputs(step: Step, scaling: Scaling, params, state, images):
    return eval_outputs(step, params, state, scaling(images))


@functools.lru_cache(maxsize=8)
def _compiled_outputs(step: Step, scaling: Scaling):
    """One jitted forward per network, route, precision and scaling (so repeated calls do not recompile)."""
    return jax.jit(functools.partial(_outputs, step, scaling))


def outputs(
    trained: Checkpoint | str | os.PathLike, images: npt.ArrayLike, *, batch_size: int | None = None
) -> np.ndarray:
    """The network's raw evaluation-mode outputs for ``images`` ``(N, H, W[, C])``: ``(N, ...)`` float32.

    ``trained`` is a :class:`Checkpoint` or the path of one. Images are scaled as training scaled them
    (module docstring) and run in batches of ``batch_size`` (default: the run's ``eval_batch_size``), the
    last one padded with zeros, as the training loop evaluates."""
    ck = as_checkpoint(trained)
    x = model_inputs(images, ck.input_shape)
    scaling = Scaling(1.0 / 255.0 if x.dtype == np.uint8 else 1.0, ck.scaling.mean, ck.scaling.std)
    run = _compiled_outputs(_step(ck), scaling)
    n = len(x)
    b = _batch_size(batch_size, ck.config, n)
    out = []
    for start in range(0, n, b):
        chunk = x[start : start + b]
        if len(chunk) < b:
            chunk = np.concatenate([chunk, np.zeros((b - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(run(ck.params, ck.state, chunk))[: n - start])
    return np.concatenate(out)


def read_outputs(loss: Loss, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(classes (N,), probabilities (N, K))`` of raw outputs ``(N, ...)`` under ``loss`` (see :class:`Prediction`)."""
    out = np.asarray(out, np.float32).reshape(len(out), -1)
    logits = loss.name == "binary_cross_entropy_with_logits"
    if loss.name == "softmax_cross_entropy":
        e = np.exp(out - out.max(axis=1, keepdims=True))
        return np.argmax(out, axis=1).astype(np.int64), (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    scores = 1.0 / (1.0 + np.exp(-out)) if logits else np.clip(out, 0.0, 1.0)
    if out.shape[1] == 1:
        classes = (out[:, 0] > (0.0 if logits else 0.5)).astype(np.int64)
        return classes, np.concatenate([1.0 - scores, scores], axis=1).astype(np.float32)
    return np.argmax(out, axis=1).astype(np.int64), scores.astype(np.float32)


def predict(
    trained: Checkpoint | str | os.PathLike, images: npt.ArrayLike, *, batch_size: int | None = None
) -> Prediction:
    """Classes and probabilities of ``images`` ``(N, H, W[, C])`` (uint8 or float, scaled as in training)
    under the network of ``trained`` (a :class:`Checkpoint` or the path of one); see :class:`Prediction`."""
    ck = as_checkpoint(trained)
    out = outputs(ck, images, batch_size=batch_size)
    classes, probabilities = read_outputs(ck.loss, out)
    return Prediction(classes, probabilities, out)


def _loss_targets(targets, n: int) -> np.ndarray:
    t = np.asarray(targets)
    if t.dtype.kind in "iub":
        t = t.astype(np.int32)
    elif t.dtype.kind == "f":
        t = t.astype(np.float32)
    else:
        raise ConfigError(f"evaluate: targets must be integer labels or float arrays, got dtype {t.dtype}")
    if len(t) != n:
        raise ConfigError(f"evaluate: {n} images but {len(t)} targets")
    return t


def evaluate(
    trained: Checkpoint | str | os.PathLike,
    images: npt.ArrayLike,
    targets: npt.ArrayLike,
    *,
    batch_size: int | None = None,
) -> Evaluation:
    """Loss, accuracy, per-class accuracy and confusion matrix of ``trained`` (a :class:`Checkpoint` or the
    path of one) on ``images`` ``(N, H, W[, C])`` and ``targets`` as the loss takes them (integer labels for
    softmax cross-entropy; for a zoo preset :meth:`Checkpoint.targets` turns digit labels into them).

    The accuracy is the loss's own (``loss.correct``), the one the training loop reports; per class, the
    true class is the label (or the rounded single target, or the argmax of one-hot targets) and the
    predicted one is :func:`predict`'s."""
    ck = as_checkpoint(trained)
    out = outputs(ck, images, batch_size=batch_size)
    t = _loss_targets(targets, len(out))
    try:
        per_example = np.asarray(jax.jit(ck.loss.per_example)(out, t), np.float64)
        correct = np.asarray(jax.jit(ck.loss.correct)(out, t))
    except (ValueError, TypeError) as error:
        raise ConfigError(
            f"evaluate: the targets {t.dtype}{list(t.shape)} do not fit the network's outputs "
            f"{list(out.shape)} under {ck.loss.name} ({error})"
        ) from None
    predicted, probabilities = read_outputs(ck.loss, out)
    true = classes_of(t)
    if true.min() < 0:
        raise ConfigError(f"evaluate: class labels must be >= 0, got {int(true.min())}")
    k = max(probabilities.shape[1], int(true.max()) + 1, int(predicted.max()) + 1)
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (true, predicted), 1)
    totals = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(totals > 0, np.diag(confusion) / np.maximum(totals, 1), np.nan)
    return Evaluation(float(per_example.mean()), float(correct.mean()), per_class, confusion, len(out))
