"""Checkpoints and the metrics log: atomic writes, restore with checks, resume bookkeeping."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

import jax

from jaxcnn.train.config import ConfigError, TrainConfig
from jaxcnn.train.runtime import host

CHECKPOINT = "checkpoint.npz"
METRICS = "metrics.jsonl"
CONFIG = "config.json"

# Settings that determine the trajectory: resuming under different ones would silently train something else.
RESUME_SETTINGS = ("model", "conv_method", "dataset", "epochs", "batch_size", "lr", "optimizer", "momentum",
                   "weight_decay", "schedule", "seed", "grad", "train_limit", "precision", "normalize", "augment")


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
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


def _settings(config: TrainConfig | dict) -> dict:
    return config.to_json() if isinstance(config, TrainConfig) else dict(config)


def save_checkpoint(workdir: Path, state, *, epoch: int, step: int, config: TrainConfig | dict,
                    partial_epoch: dict | None = None) -> Path:
    """Saves every array of ``state`` plus the position ``(epoch, step)`` (the next step to run), the run's
    settings (``config``: a :class:`TrainConfig` or the dict written to ``config.json``) and, mid-epoch,
    ``partial_epoch``: the epoch's statistics so far, so that a resumed run reports the same epoch metrics."""
    leaves = jax.tree_util.tree_leaves(state)
    arrays = {f"leaf_{i:05d}": host(x) for i, x in enumerate(leaves)}
    meta = {"epoch": epoch, "step": step, "config": _settings(config), "leaves": len(leaves)}
    if partial_epoch is not None:
        meta["partial_epoch"] = partial_epoch
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    path = workdir / CHECKPOINT
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


def restore_checkpoint(workdir: Path, template, config: TrainConfig | dict | None = None) -> tuple[Any, dict]:
    """Restores a checkpoint into the structure of ``template``; :class:`ConfigError` if it does not fit, or if
    ``config`` differs from the checkpoint's in a setting of :data:`RESUME_SETTINGS`."""
    path = workdir / CHECKPOINT
    if not path.exists():
        raise ConfigError(f"--resume: no checkpoint at {path}; start without --resume")
    with np.load(path) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        if config is not None:
            saved, now = meta["config"], _settings(config)
            changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in RESUME_SETTINGS + ("network", "loss")
                       if k in saved and k in now and saved[k] != now[k]]
            if changed:
                raise ConfigError(f"--resume: {path} was written with other settings ({', '.join(changed)}); "
                                  "resume with the same settings, or choose another --out")
        leaves, treedef = jax.tree_util.tree_flatten(template)
        if meta["leaves"] != len(leaves):
            raise ConfigError(f"--resume: {path} holds {meta['leaves']} arrays but this model and optimiser have {len(leaves)}; "
                              "was it written with another model or optimizer?")
        restored = []
        for i, ref in enumerate(leaves):
            arr = z[f"leaf_{i:05d}"]
            if arr.shape != np.shape(ref) or arr.dtype != ref.dtype:
                raise ConfigError(f"--resume: array {i} in {path} is {arr.dtype}{list(arr.shape)} but the model expects "
                                  f"{ref.dtype}{list(np.shape(ref))}")
            restored.append(arr)
    return treedef.unflatten(restored), meta


def read_metrics(path: Path, *, upto_epoch: int) -> list[dict]:
    """The records of ``metrics.jsonl`` up to ``upto_epoch`` (those a checkpoint at that epoch covers)."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["epoch"] <= upto_epoch]


def append_metrics(path: Path, record: dict) -> None:
    """Appends one JSON line and syncs it to disk."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
