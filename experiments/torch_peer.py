"""The PyTorch peer of ``jaxcnn train``: the same recipe, the same data, the same files, for time-to-accuracy.

It trains the PyTorch twin of a zoo model (:func:`jaxcnn.bench.peers_torch.build`; any model given a twin
there is picked up here) under exactly the settings a ``jaxcnn train`` run resolves: the same recipe
(:func:`jaxcnn.train.recipes.resolve`, explicit flags overriding it), the same training and test images
(:func:`jaxcnn.data.load_dataset`, the same ``--train-limit`` subset), the same batch order
(:func:`jaxcnn.data.epoch_permutation`), the same loss (label-smoothed softmax cross-entropy), optimiser,
per-step learning-rate schedule, augmentation and evaluation, and writes ``config.json`` and ``metrics.jsonl``
with the keys of ``jaxcnn train``'s::

    python experiments/torch_peer.py --out DIR [--recipe NAME] [--model M] [--dataset D] [--data-dir DIR]
        [--offline] [--epochs N] [--batch-size N] [--lr LR] [--optimizer sgd|nesterov|adam] [--momentum M]
        [--weight-decay W] [--schedule constant|cosine|linear|step] [--warmup FRACTION]
        [--label-smoothing A] [--seed S] [--train-limit N] [--normalize] [--augment PIXELS] [--rotate DEGREES]
        [--scale S] [--flip] [--eval-every N] [--eval-batch-size N]
        [--threads N] [--compile] [--channels-last]

``--threads`` sets ``torch.set_num_threads`` (default 2). ``--compile`` trains through ``torch.compile``: the
compilation happens inside the timed region (it is part of the time to accuracy) and starts from an empty
TorchInductor cache, as jaxcnn's jit starts with no persistent cache (:func:`cold_inductor_cache`; a warm cache
cut small_cnn's compilation from about 19 s to 3 s here); evaluation goes through the compiled module too when
the run evaluates enough images to repay compiling its inference graph (:data:`COMPILED_EVAL_IMAGES`), eagerly
otherwise. ``--channels-last`` keeps the model and its inputs in the NHWC memory format. Settings of a
``jaxcnn train`` run that have no PyTorch meaning (the convolution formulation, the gradient route, the loop
form, the precision, devices, gradient checks, checkpoints) are ignored and listed under ``ignored_settings``
in ``config.json``; DP-SGD is refused.

Timing on a shared machine: with another process busy on the cores, PyTorch's OpenMP threads spin-wait for
each other at every op and a 2-thread run slowed fivefold here (small_cnn: 272 against 1,474 images/s); set
``OMP_WAIT_POLICY=PASSIVE`` (recorded in ``config.json``) or ``--threads 1`` there, and compare on an idle
machine. ``config.json`` records the load average at the start.

What differs from ``jaxcnn train`` by construction: the initial weights (PyTorch's default initialisation,
seeded by ``torch.manual_seed(seed)``; jaxcnn draws its own from its own key: for ``fast_cnn`` kernels from the
same distribution, :func:`jaxcnn.models.fan_in_uniform`, and zero biases where PyTorch draws them uniformly
too) and the random draws of the augmentation (the same distributions from PyTorch's generator). No
checkpoints are written. From the same weights and on the same batches the two compute one trajectory: in
float64 every parameter and running statistic of ``fast_cnn`` agrees after 20 steps of the ``mnist`` recipe's
optimiser (``tests/test_torch_peer.py``).

PyTorch is a benchmark peer, never a dependency of jaxcnn: only this script (and ``jaxcnn bench``'s optional
peer) imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - the peer needs PyTorch, jaxcnn does not
    raise SystemExit(
        "torch_peer: needs PyTorch (pip install torch); it is a benchmark peer, not a dependency of jaxcnn"
    ) from None

from jaxcnn import data as jdata
from jaxcnn.bench import peers_torch
from jaxcnn.data import DataError
from jaxcnn.models import MODELS, get_model
from jaxcnn.train import checkpoint as ckpt
from jaxcnn.train.config import ConfigError, TrainConfig
from jaxcnn.train.inputs import balanced_subset, describe_counts, gaussian_blur_matrix, scaling_for
from jaxcnn.train.loop import epoch_line
from jaxcnn.train.recipes import DEFAULT_RECIPE, RECIPES, resolve

PROG = "python experiments/torch_peer.py"
# The TrainConfig fields this peer takes as flags, with the names, types and help texts of jaxcnn train's.
FLAGS = tuple(
    "model dataset data_dir offline epochs batch_size lr optimizer momentum weight_decay schedule warmup "
    "label_smoothing seed train_limit normalize augment rotate scale flip elastic tta eval_every "
    "eval_batch_size".split()
)
# The TrainConfig fields with no PyTorch meaning: how jaxcnn computes, not what it computes.
IGNORED = tuple(
    "conv_method grad check_every check_tolerance precision devices loop chunk_steps checkpoint_every".split()
)
# With --compile, evaluation runs through the compiled module when the run evaluates at least this many images
# in all (evaluations x test images), eagerly otherwise: on 2 busy cores, small_cnn's inference graph took 6.4 s
# to compile and then evaluated 10,000 images in 2.8 s against 4.7 s eagerly: compiling pays from about 30,000.
COMPILED_EVAL_IMAGES = 30_000
# Accuracy of a one-column output that is not a softmax: thresholded as the zoo spec's loss reads it.
THRESHOLDS = {"mse": 0.5, "binary_cross_entropy_with_logits": 0.0}


# ---------------------------------------------------------------------------------------------------
# The command line


def build_parser() -> argparse.ArgumentParser:
    """``--recipe``, the flags of :data:`FLAGS` as ``jaxcnn train`` defines them, and the peer's own."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.splitlines()[0],
        epilog="flags given explicitly override the recipe's settings; the defaults shown are those of no recipe",
    )
    parser.add_argument(
        "--recipe",
        default=DEFAULT_RECIPE,
        choices=list(RECIPES),
        help=f"named partial configuration of jaxcnn train (default: {DEFAULT_RECIPE})",
    )
    defaults = TrainConfig()
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in FLAGS:
        f = fields[name]
        default = getattr(defaults, name)
        flag = "--" + name.replace("_", "-")
        shown = f"{f.metadata['help']} (default: {'off' if default is None or default is False else default})"
        if isinstance(default, bool):
            parser.add_argument(flag, dest=name, action="store_true", default=argparse.SUPPRESS, help=shown)
            continue
        kwargs = dict(f.metadata["flag"])
        if name == "model":
            kwargs["choices"] = list(MODELS)
        parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=shown, **kwargs)
    parser.add_argument("--out", required=True, help="directory for config.json and metrics.jsonl")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    parser.add_argument("--compile", action="store_true", help="train through torch.compile (default: eager)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last (NHWC) memory format")
    return parser


def explicit_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`TrainConfig` fields the user gave as flags."""
    return {name: getattr(args, name) for name in FLAGS if hasattr(args, name)}


# ---------------------------------------------------------------------------------------------------
# The learning rate, the optimiser


def learning_rate(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """``lr(step)``: the learning rate of global step ``step`` (counted from 0), as the optax schedule of
    :func:`jaxcnn.train.config.make_optimizer` gives it at count ``step``: a linear warm-up from 0 over
    ``int(warmup * total)`` steps, then ``config.schedule`` over the rest."""
    total = max(config.epochs * steps_per_epoch, 1)
    warmup = int(config.warmup * total)
    rest = total - warmup  # >= 1, since warmup < 1
    peak = config.lr
    # A dict, as make_optimizer builds it: two equal boundaries (a very short run) collapse into one drop.
    drops = sorted({int(rest * 0.5): 0.1, int(rest * 0.75): 0.1}.items())

    def after_warmup(k: int) -> float:
        if config.schedule == "cosine":
            return 0.5 * peak * (1.0 + math.cos(math.pi * min(k, rest) / rest))
        if config.schedule == "linear":
            return peak * (1.0 - min(k, rest) / rest)
        if config.schedule == "step":
            return peak * math.prod(scale for boundary, scale in drops if k >= boundary)
        return peak

    def lr(step: int) -> float:
        return peak * step / warmup if step < warmup else after_warmup(step - warmup)

    return lr


def make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    """The PyTorch form of :func:`jaxcnn.train.config.make_optimizer` (the learning rate is set per step):
    SGD with momentum (``add_decayed_weights`` before ``optax.sgd`` is SGD's ``weight_decay``), Nesterov, Adam
    (AdamW with decoupled weight decay, as ``optax.adamw``)."""
    if config.optimizer == "adam":
        if config.weight_decay:
            return torch.optim.AdamW(params, lr=0.0, eps=1e-8, weight_decay=config.weight_decay)
        return torch.optim.Adam(params, lr=0.0, eps=1e-8)
    return torch.optim.SGD(
        params,
        lr=0.0,
        momentum=config.momentum,
        # Nesterov without momentum is plain SGD in optax; PyTorch refuses the combination.
        nesterov=config.optimizer == "nesterov" and config.momentum > 0,
        weight_decay=config.weight_decay,
    )


def set_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
    """Sets the learning rate of the next ``optimizer.step()``."""
    for group in optimizer.param_groups:
        group["lr"] = value


# ---------------------------------------------------------------------------------------------------
# Augmentation (NCHW), as jaxcnn.train.inputs.Augmentation


def background(x: torch.Tensor) -> torch.Tensor:
    """Per image and channel, the mean of the outermost ring of pixels: ``(B, C, H, W) -> (B, C, 1, 1)``."""
    h, w = x.shape[-2:]
    ring = torch.cat([x[..., 0, :], x[..., h - 1, :], x[..., 1 : h - 1, 0], x[..., 1 : h - 1, w - 1]], dim=-1)
    return ring.mean(dim=-1, keepdim=True).unsqueeze(-1)


def flip(x: torch.Tensor, mirrored: torch.Tensor) -> torch.Tensor:
    """The images of ``x (B, C, H, W)`` where ``mirrored (B,)`` is true mirrored left to right."""
    return torch.where(mirrored.view(-1, 1, 1, 1), x.flip(-1), x)


def rotate_and_zoom(
    x: torch.Tensor, angle: torch.Tensor, zoom: torch.Tensor, displacement: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`jaxcnn.train.inputs.rotate_and_zoom` in NCHW: each image of ``x (B, C, H, W)`` rotated
    counter-clockwise by ``angle (B,)`` radians about its centre and magnified by ``zoom (B,)``, sampled
    bilinearly; pixels from outside the image take its :func:`background` value. Output pixel ``p`` reads the
    input at ``centre + R(-angle) (p - centre) / zoom``, plus ``displacement (B, H, W, 2)`` (rows, columns)."""
    b, c, h, w = x.shape
    fill = background(x)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # affine_grid's coordinates are (column, row), normalised to [-1, 1] across the corner pixels' centres
    # (align_corners=True); the aspect ratio turns jaxcnn's pixel-space rotation into normalised coordinates.
    ratio = max(h - 1, 1) / max(w - 1, 1)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin * ratio, zero], -1), torch.stack([sin / ratio, cos, zero], -1)], 1)
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=True)
    if displacement is not None:  # pixels to normalised coordinates, (rows, columns) to (x, y)
        grid = grid + displacement.flip(-1) * torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)])
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=True) + fill


def elastic_displacement(b: int, h: int, w: int, alpha: float) -> torch.Tensor:
    """:func:`jaxcnn.train.inputs.elastic_displacement`: uniform noise in [-1, 1] ``(B, H, W, 2)`` smoothed by the
    same normalised Gaussian, times ``alpha``."""
    blur_h, blur_w = (torch.from_numpy(gaussian_blur_matrix(n)).float() for n in (h, w))
    noise = 2.0 * torch.rand(b, h, w, 2) - 1.0
    return alpha * torch.einsum("ij,bjkc,lk->bilc", blur_h, noise, blur_w)


def shift(x: torch.Tensor, offsets: torch.Tensor, max_shift: int) -> torch.Tensor:
    """:func:`jaxcnn.train.inputs.random_shift` with given ``offsets (B, 2)`` in ``[0, 2 max_shift]``: image
    ``i`` is cropped at ``offsets[i]`` from itself padded by ``max_shift`` pixels of its :func:`background`."""
    b, c, h, w = x.shape
    fill = background(x)
    padded = F.pad(x - fill, (max_shift, max_shift, max_shift, max_shift))
    rows = (offsets[:, 0:1] + torch.arange(h)).view(b, 1, h, 1)
    cols = (offsets[:, 1:2] + torch.arange(w)).view(b, 1, 1, w)
    batch, channel = torch.arange(b).view(b, 1, 1, 1), torch.arange(c).view(1, c, 1, 1)
    return padded[batch, channel, rows, cols] + fill


def augment(x: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """The augmentation of ``config`` on ``x (B, C, H, W)``, in jaxcnn's order: a mirror image with probability
    1/2 (``flip``), a rotation by a uniform angle in ``[-rotate, rotate]`` degrees and a zoom by a uniform
    factor in ``[1 - scale, 1 + scale]``, a shift by uniform offsets in ``[-augment, augment]`` per axis."""
    b = x.shape[0]
    if config.flip:
        x = flip(x, torch.rand(b) < 0.5)
    if config.rotate or config.scale or config.elastic:
        angle = torch.deg2rad((2.0 * torch.rand(b) - 1.0) * config.rotate)
        zoom = 1.0 + (2.0 * torch.rand(b) - 1.0) * config.scale
        moved = elastic_displacement(b, *x.shape[2:], config.elastic) if config.elastic else None
        x = rotate_and_zoom(x, angle, zoom, moved)
    if config.augment:
        x = shift(x, torch.randint(0, 2 * config.augment + 1, (b, 2)), config.augment)
    return x


# ---------------------------------------------------------------------------------------------------
# The run


class TrainingDiverged(Exception):
    """The training loss became non-finite."""


class _Task:
    """The twin's losses and accuracy: softmax cross-entropy (label-smoothed for training) when the twin's loss
    is ``F.cross_entropy``, otherwise the twin's own loss with the zoo spec's targets (no smoothing)."""

    def __init__(self, model: str, twin_loss, label_smoothing: float):
        spec = get_model(model)
        self.targets = spec.targets
        self.softmax = twin_loss is F.cross_entropy
        if self.softmax:
            self.train_loss = lambda out, t: F.cross_entropy(out, t, label_smoothing=label_smoothing)
            self.loss_sum = lambda out, t: F.cross_entropy(out, t, reduction="sum")
            return
        if label_smoothing:
            raise ConfigError(f"--label-smoothing smooths the labels of softmax cross-entropy; {model}'s loss is not")
        if spec.loss.name not in THRESHOLDS:
            raise ConfigError(f"no accuracy for {model}'s loss {spec.loss.name}")
        self.threshold = THRESHOLDS[spec.loss.name]
        self.train_loss = twin_loss
        self.loss_sum = lambda out, t: twin_loss(out, t) * out.shape[0]  # a per-example mean

    def correct(self, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The number of examples the outputs ``out`` get right (a 0-d tensor)."""
        if self.softmax:
            return (out.argmax(dim=1) == t).sum()
        if out.shape[-1] == 1:
            return ((out[:, 0] > self.threshold) == (t[:, 0] > 0.5)).sum()
        return (out.argmax(dim=-1) == t.argmax(dim=-1)).sum()

    def as_tensor(self, labels: np.ndarray) -> torch.Tensor:
        """The loss targets of digit ``labels``: int64 classes, or the spec's float targets."""
        t = torch.from_numpy(np.array(self.targets(labels)))
        return t.long() if not t.is_floating_point() else t.float()


def _twin(model: str):
    try:
        return peers_torch.build(model, 1)
    except KeyError:
        raise ConfigError(
            f"--model {model}: jaxcnn.bench.peers_torch has no PyTorch twin of it; add one to build()"
        ) from None


@contextlib.contextmanager
def cold_inductor_cache(enabled: bool):
    """With ``enabled`` and no ``$TORCHINDUCTOR_CACHE_DIR`` set, points TorchInductor's on-disk caches at a fresh
    empty directory, removed afterwards, so that ``torch.compile`` compiles from scratch as jaxcnn's jit does
    (jaxcnn keeps no persistent compilation cache); a directory the user set is kept (and may be warm). Yields
    what ``config.json`` records: ``"fresh"``, the user's directory, or ``None`` without ``enabled``."""
    if not enabled:
        yield None
        return
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        yield os.environ["TORCHINDUCTOR_CACHE_DIR"]
        return
    path = tempfile.mkdtemp(prefix="torch_peer_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    try:
        yield "fresh"
    finally:
        del os.environ["TORCHINDUCTOR_CACHE_DIR"]
        shutil.rmtree(path, ignore_errors=True)


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    recipe: str | None = None,
    threads: int = 2,
    compile: bool = False,
    channels_last: bool = False,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Trains the PyTorch twin of ``config.model`` as ``jaxcnn train`` would train the zoo model and returns one
    record per epoch (the lines of ``metrics.jsonl``); writes ``config.json`` and ``metrics.jsonl`` into
    ``out``. :class:`ConfigError` for settings it cannot follow (a model without a twin, DP-SGD). With
    ``compile``, TorchInductor starts from an empty cache (:func:`cold_inductor_cache`)."""
    with cold_inductor_cache(compile) as cache:
        return _train(config, Path(out), recipe, threads, compile, channels_last, log, cache)


def _train(config, workdir, recipe, threads, compile, channels_last, log, inductor_cache) -> list[dict]:
    config.validate()
    if config.dp_clip is not None:
        raise ConfigError("--dp-clip: DP-SGD has no PyTorch peer here (Opacus is jaxcnn bench's DP peer)")
    if threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    task = _Task(config.model, _twin(config.model)[1], config.label_smoothing)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--out {workdir} is a file, not a directory")
    workdir.mkdir(parents=True, exist_ok=True)

    dataset = jdata.load_dataset(config.dataset, data_dir=config.data_dir, download=not config.offline, log=log)
    images, labels = dataset.train_images, dataset.train_labels
    if config.train_limit is not None and config.train_limit < len(images):
        keep, counts = balanced_subset(labels, config.train_limit, config.seed)
        images, labels = images[keep], labels[keep]
        log(
            f"train_limit {config.train_limit}: a class-balanced subset (seed {config.seed}): {describe_counts(counts)}"
        )
    n, m = len(images), len(dataset.test_images)
    if n < config.batch_size:
        raise ConfigError(f"--batch-size {config.batch_size} exceeds the {n} training examples; lower it")
    evaluations = sum(
        e == config.epochs or bool(config.eval_every and e % config.eval_every == 0)
        for e in range(1, config.epochs + 1)
    )
    compiled_eval = compile and evaluations * m >= COMPILED_EVAL_IMAGES
    scaling = scaling_for(images, config.normalize)
    # The whole training and test sets as uint8 NCHW tensors; each batch is gathered, scaled and augmented.
    train_x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
    train_t = task.as_tensor(labels)
    test_x = torch.from_numpy(np.ascontiguousarray(dataset.test_images)).unsqueeze(1)
    test_t = task.as_tensor(dataset.test_labels)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def inputs(batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(torch.float32).mul_(scaling.scale)
        return x.sub_(scaling.mean).div_(scaling.std) if config.normalize else x

    recorded = {
        **config.to_json(),
        "recipe": recipe,
        "peer": "pytorch",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "compile": compile,
        "channels_last": channels_last,
        "compiled_eval": compiled_eval,
        "inductor_cache": inductor_cache,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average": list(os.getloadavg()),
        "ignored_settings": {k: getattr(config, k) for k in IGNORED if getattr(config, k) != getattr(TrainConfig(), k)},
        "data": {"source": dataset.source, "train": n, "test": m},
    }
    (workdir / "config.json").write_text(json.dumps(recorded, indent=2) + "\n")
    metrics_path = workdir / "metrics.jsonl"
    metrics_path.write_text("")

    # The timed region starts here: building, compiling, training and evaluating count towards wall_s.
    wall_start = time.perf_counter()
    torch.manual_seed(config.seed)
    net, _ = _twin(config.model)
    net.eval()  # a dry run in evaluation mode leaves BatchNorm's running statistics untouched
    with torch.no_grad():
        net(torch.zeros(1, *train_x.shape[1:]))  # sizes the lazy layers before the optimiser sees the parameters
    net.train()
    net = net.to(memory_format=memory_format)
    optimizer = make_optimizer(config, net.parameters())
    # torch.compile compiles lazily, on the first training step: inside the first epoch's timed training.
    model = torch.compile(net) if compile else net
    eval_model = model if compiled_eval else net
    spe = n // config.batch_size
    lr_at = learning_rate(config, spe)
    n_params = sum(p.numel() for p in net.parameters())
    mode = ("compiled" if compile else "eager") + (", channels-last" if channels_last else "")
    log(
        f"{config.model} (PyTorch {torch.__version__} {mode}, {torch.get_num_threads()} threads, {n_params:,} "
        f"parameters) on {dataset.source}: {n:,} train / {m:,} test images, {spe} steps of {config.batch_size} "
        "per epoch"
    )

    def evaluate() -> tuple[float, float]:
        # A compiled model compiles a second graph (evaluation mode, no gradients) on its first evaluation.
        net.eval()
        loss_sum, correct = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.int64)
        with torch.inference_mode():
            for start in range(0, m, config.eval_batch_size):
                x = inputs(test_x[start : start + config.eval_batch_size]).contiguous(memory_format=memory_format)
                t = test_t[start : start + config.eval_batch_size]
                pred = eval_model(x)
                if config.tta == "flip":  # the mean output of each image and its mirror image, as jaxcnn's
                    pred = (pred + eval_model(x.flip(-1))) / 2
                loss_sum += task.loss_sum(pred, t)
                correct += task.correct(pred, t)
        net.train()
        return loss_sum.item() / m, correct.item() / m

    history = []
    for epoch in range(config.epochs):
        order = jdata.epoch_permutation(config.seed, epoch, n)[: spe * config.batch_size]
        batches = torch.from_numpy(order.astype(np.int64).reshape(spe, config.batch_size))
        losses = torch.empty(spe)
        correct = torch.zeros((), dtype=torch.int64)
        net.train()
        t0 = time.perf_counter()
        for i in range(spe):
            idx = batches[i]
            x = augment(inputs(train_x.index_select(0, idx)), config).contiguous(memory_format=memory_format)
            t = train_t.index_select(0, idx)
            set_lr(optimizer, lr_at(epoch * spe + i))
            optimizer.zero_grad(set_to_none=True)
            pred = model(x)
            loss = task.train_loss(pred, t)
            loss.backward()
            optimizer.step()
            losses[i] = loss.detach()
            correct += task.correct(pred.detach(), t)
        train_time = time.perf_counter() - t0
        bad = torch.nonzero(~torch.isfinite(losses))
        if len(bad):
            step = int(bad[0, 0])
            raise TrainingDiverged(
                f"loss became {losses[step].item()} at step {step} of epoch {epoch + 1} "
                f"(global step {epoch * spe + step}); try a lower --lr"
            )
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": losses.double().mean().item(),
            "train_accuracy": correct.item() / (spe * config.batch_size),
        }
        eval_s = 0.0
        if epoch + 1 == config.epochs or (config.eval_every and (epoch + 1) % config.eval_every == 0):
            t0 = time.perf_counter()
            record["test_loss"], record["test_accuracy"] = evaluate()
            eval_s = time.perf_counter() - t0
        record["images_per_s"] = spe * config.batch_size / train_time
        record["wall_s"] = time.perf_counter() - wall_start
        record["eval_s"] = eval_s
        history.append(record)
        log(epoch_line(record, config.epochs))
        with metrics_path.open("a") as f:
            f.write(ckpt.metrics_line(record))
    return history


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = resolve(args.recipe, explicit_settings(args))
        history = train(
            config,
            args.out,
            recipe=args.recipe,
            threads=args.threads,
            compile=args.compile,
            channels_last=args.channels_last,
            log=lambda s: print(s, flush=True),
        )
    except (ConfigError, DataError, TrainingDiverged) as e:
        print(f"torch_peer: {e}", file=sys.stderr)
        return 1 if isinstance(e, TrainingDiverged) else 2
    except OSError as e:
        print(f"torch_peer: {e}", file=sys.stderr)
        return 2
    final = history[-1]
    epochs = f"{final['epoch']} epoch" + ("s" if final["epoch"] != 1 else "")
    print(f"final test accuracy {final['test_accuracy']:.4f} after {epochs} ({final['wall_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
