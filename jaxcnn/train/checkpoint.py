"""Checkpoints and the metrics log: atomic writes, restore with checks, resume bookkeeping.

What a crash (``kill -9``, a power cut, a full disk) can cost, and what it cannot:

* Every file of a run is replaced whole or not at all (:func:`atomic_write`): a crash keeps the previous
  ``checkpoint.npz`` intact and leaves at most one temporary ``.<name>.<random>.tmp``, which the next run in
  the directory removes (:func:`remove_temporaries`). A crash therefore loses at most the steps since the last
  checkpoint: one per epoch, plus one every ``checkpoint_every`` steps when that is set.
* ``metrics.jsonl`` grows by whole, fsynced lines of strict JSON (:func:`append_metrics`). A crash in the middle
  of an append can leave a torn last line; on resume :func:`read_metrics` drops it (the epoch it belonged to is
  trained again, since its checkpoint was never written) and records after the checkpoint's epoch, says so in
  one line, and the loop rewrites the file atomically. A damaged line elsewhere is an error naming the line.
* A checkpoint records what it continues: the run's settings, a fingerprint of the training and test arrays it
  was trained on (:func:`data_fingerprint`: counts, shapes, dtypes and a SHA-256 of the bytes, computed once per
  run), the steps per epoch, the parameter structure (every parameter's path, shape and dtype) and the jaxcnn
  version. :func:`restore_checkpoint` refuses a resume that would silently train something else, in one line
  saying what changed. A checkpoint of another jaxcnn version resumes when its parameter structure matches (the
  arrays fit; only the numbers of the resumed epochs may differ from an uninterrupted run under the old version),
  with one logged line saying so (:func:`resume_notes`); a changed structure is refused.
* Problems a user can fix (an unreadable, truncated or foreign checkpoint, a directory that cannot be written, a
  full disk) raise :class:`~jaxcnn.train.config.ConfigError` with one line naming the file, what is intact and
  what to do.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import jax

from jaxcnn.train.config import ConfigError, TrainConfig
from jaxcnn.train.runtime import host

CHECKPOINT = "checkpoint.npz"  # the file names a run writes into its --out directory
METRICS = "metrics.jsonl"
CONFIG = "config.json"

# Settings that determine the trajectory: resuming under different ones would silently train something else.
RESUME_SETTINGS = (
    "model",
    "conv_method",
    "dataset",
    "epochs",
    "batch_size",
    "lr",
    "optimizer",
    "momentum",
    "weight_decay",
    "schedule",
    "warmup",
    "label_smoothing",
    "seed",
    "grad",
    "train_limit",
    "precision",
    "normalize",
    "augment",
    "rotate",
    "elastic",
    "scale",
    "flip",
    "dp_clip",
    "dp_noise_multiplier",
)
_META_KEYS = {"epoch": int, "step": int, "config": dict, "leaves": int}

# A test-only fault point, inert unless the variable is set: with JAXCNN_TEST_PAUSE_WRITE=NAME:N the N-th
# atomic_write of the file NAME in this process stops just before its rename (the temporary file complete,
# the previous version still in place), or with NAME:N:after just after it, prints one line to stderr and
# sleeps, so that tests/test_faults.py can SIGKILL a real training process at exactly that point.
PAUSE_VARIABLE = "JAXCNN_TEST_PAUSE_WRITE"
_writes_so_far: dict[str, int] = {}


# ---------------------------------------------------------------------------------------------------
# Writing


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Writes ``path`` whole or not at all: ``write(f)`` fills a temporary file in the same directory, which is
    fsynced and renamed over ``path`` (then the directory is fsynced), so a crash at any moment leaves either the
    previous version or the new one. The file gets the mode a plain ``open()`` would give it (``0o666`` less
    the umask), not ``mkstemp``'s private ``0o600``.

    Raises:
      ConfigError: ``path`` cannot be written (no permission, no space left, ...): one line naming it and
      saying that the previous version is intact; the temporary file is removed.
    """
    kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _write_error(path, e, kept) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, _new_file_mode())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _pause_for_tests(path, "before")
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_error(path, e, kept) from None
        raise
    _fsync_directory(path.parent)
    _pause_for_tests(path, "after")


def _fsync_directory(directory: Path) -> None:
    """Makes a rename in ``directory`` durable (without it a power cut can undo the rename)."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _new_file_mode() -> int:
    """``0o666`` less the process umask: the mode ``open()`` gives a new file.

    Linux reports the umask in ``/proc/self/status``; reading it there avoids ``os.umask``'s set-and-restore,
    which is process-wide and could briefly change the mode of files other threads create meanwhile (the
    compilation cache, for one).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _write_error(path: Path, error: OSError, kept: str) -> ConfigError:
    """The one line for a write that failed: the file, the system's reason, what is intact (``kept``), what to do."""
    reason = error.strerror or str(error)
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        todo = "choose an --out directory you can write to"
    else:
        space = "free some space" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "fix the cause"
        todo = (
            f"{space}, then continue with --resume"
            if (path.parent / CHECKPOINT).exists()
            else f"{space}, then run again"
        )
    return ConfigError(f"cannot write {path} ({reason}); {kept}; {todo}")


def _pause_for_tests(path: Path, when: str) -> None:
    """The fault point of :data:`PAUSE_VARIABLE` (a no-op unless it is set)."""
    spec = os.environ.get(PAUSE_VARIABLE)
    if not spec:
        return
    name, count, *where = spec.split(":")
    if when == "before":
        _writes_so_far[path.name] = _writes_so_far.get(path.name, 0) + 1
    if path.name == name and _writes_so_far.get(name) == int(count) and (where or ["before"])[0] == when:
        print(f"{PAUSE_VARIABLE}: paused {when} replacing {path}", file=sys.stderr, flush=True)
        time.sleep(600)


def remove_temporaries(workdir: Path) -> list[Path]:
    """Deletes the temporary files a crash inside :func:`atomic_write` left in ``workdir`` (``.<name>.*.tmp``
    of this module's own files, nothing else) and returns the paths it deleted. One that cannot be deleted is
    left alone: nothing reads these files, so it costs only its space."""
    removed = []
    for path in sorted(p for name in (CHECKPOINT, METRICS, CONFIG) for p in workdir.glob(f".{name}.*.tmp")):
        try:
            path.unlink()
        except OSError:
            continue
        removed.append(path)
    return removed


# ---------------------------------------------------------------------------------------------------
# What a checkpoint continues


def data_fingerprint(images: np.ndarray, targets: np.ndarray) -> dict:
    """What identifies a training or test set: its count, image and target shapes and dtypes, and a SHA-256
    of the image bytes then the target bytes (about 40 ms for the 47 MB of MNIST's training images), so that
    ``--resume`` on other data is refused even when counts and shapes agree."""
    images, targets = np.ascontiguousarray(images), np.ascontiguousarray(targets)
    digest = hashlib.sha256(images.data.cast("B"))
    digest.update(targets.data.cast("B"))
    return {
        "count": int(images.shape[0]),
        "image_shape": list(images.shape[1:]),
        "image_dtype": str(images.dtype),
        "target_shape": list(targets.shape[1:]),
        "target_dtype": str(targets.dtype),
        "sha256": digest.hexdigest(),
    }


def _describe_data(fingerprint: dict | None) -> str:
    if fingerprint is None:
        return "none"
    return (
        f"{fingerprint['count']:,} {fingerprint['image_dtype']}{fingerprint['image_shape']} images, "
        f"sha256 {fingerprint['sha256'][:12]}"
    )


def param_structure(params) -> list[list]:
    """``[[path, shape, dtype], ...]`` of every parameter array, in tree order (``path`` as
    ``jax.tree_util.keystr``)."""
    return [
        [jax.tree_util.keystr(path), list(np.shape(x)), str(np.dtype(x.dtype))]
        for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
    ]


def _version() -> str:
    from jaxcnn import __version__

    return __version__


# ---------------------------------------------------------------------------------------------------
# Saving and restoring


def _settings(config: TrainConfig | dict) -> dict:
    return config.to_json() if isinstance(config, TrainConfig) else dict(config)


def save_checkpoint(
    workdir: Path,
    state: Any,
    *,
    epoch: int,
    step: int,
    config: TrainConfig | dict,
    partial_epoch: dict | None = None,
    run: dict | None = None,
) -> Path:
    """Saves every array of ``state`` plus the position ``(epoch, step)`` (the next step to run), the run's
    settings (``config``: a :class:`TrainConfig` or the dict written to ``config.json``), the jaxcnn version,
    the structure of ``state.params`` (:func:`param_structure`) and, mid-epoch, ``partial_epoch``: the epoch's
    statistics so far, so that a resumed run reports the same epoch metrics. ``run`` adds what the run trains
    on, which :func:`restore_checkpoint` checks: ``{"data": {"source", "train", "test"}, "steps_per_epoch": n}``
    (``train``/``test``: :func:`data_fingerprint` or ``None``)."""
    leaves = jax.tree_util.tree_leaves(state)
    arrays: dict[str, Any] = {f"leaf_{i:05d}": host(x) for i, x in enumerate(leaves)}
    meta = {"epoch": epoch, "step": step, "config": _settings(config), "leaves": len(leaves), "version": _version()}
    if hasattr(state, "params"):
        meta["params"] = param_structure(state.params)
    meta.update(run or {})
    if partial_epoch is not None:
        meta["partial_epoch"] = partial_epoch
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    path = workdir / CHECKPOINT
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


def restore_checkpoint(
    workdir: Path, template: Any, config: TrainConfig | dict | None = None, run: dict | None = None
) -> tuple[Any, dict]:
    """Restores a checkpoint into the structure of ``template`` and returns it with the checkpoint's meta record.

    Raises :class:`ConfigError` (one line naming the file) if the file is not a readable checkpoint (not a zip
    archive, truncated, no or no JSON ``meta`` record, a missing array), if ``config`` differs from the
    checkpoint's in a setting of :data:`RESUME_SETTINGS`, if ``run`` (as in :func:`save_checkpoint`) names other
    data or another number of steps per epoch, or if the arrays or the parameter structure do not fit
    ``template``. Checkpoints written before these records existed are checked for what they hold.
    """
    path = workdir / CHECKPOINT
    if not path.exists():
        raise ConfigError(f"--resume: no checkpoint at {path}; start without --resume")
    with _open_checkpoint(path) as z:
        meta = _read_meta(path, z)
        if config is not None:
            _check_settings(path, meta, _settings(config))
        if run is not None:
            _check_run(path, meta, run)
        restored = _read_leaves(path, z, meta, template)
    _check_params(path, meta, template)
    return restored, meta


def _unusable(path: Path, detail: str) -> ConfigError:
    return ConfigError(
        f"--resume: {path} is not a usable checkpoint ({detail}); restore an intact copy, "
        "or start afresh with another --out"
    )


def _open_checkpoint(path: Path):
    try:
        z = np.load(path, allow_pickle=False)
    except OSError as e:
        raise ConfigError(f"--resume: cannot read {path} ({e.strerror or e})") from None
    except (ValueError, EOFError, zipfile.BadZipFile):
        raise _unusable(path, "an empty file" if path.stat().st_size == 0 else "not a zip archive") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise _unusable(path, "a single .npy array, not an archive of arrays")
    return z


def _read_meta(path: Path, z) -> dict:
    if "meta" not in z.files:
        raise _unusable(path, "it has no 'meta' record")
    try:
        meta = json.loads(bytes(z["meta"]).decode())
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:  # JSONDecodeError and UnicodeError are ValueErrors
        raise _unusable(path, f"its 'meta' record is damaged or not JSON: {e}") from None
    if not isinstance(meta, dict):
        raise _unusable(path, "its 'meta' record is not a JSON object")
    for key, kind in _META_KEYS.items():
        if not isinstance(meta.get(key), kind):
            raise _unusable(path, f"its 'meta' record has no {kind.__name__} {key!r}")
    return meta


def _check_settings(path: Path, meta: dict, now: dict) -> None:
    saved = meta["config"]
    changed = [
        f"{k} {saved[k]!r} -> {now[k]!r}"
        for k in (*RESUME_SETTINGS, "network", "loss")
        if k in saved and k in now and saved[k] != now[k]
    ]
    if changed:
        raise ConfigError(
            f"--resume: {path} was written with other settings ({', '.join(changed)}); "
            "resume with the same settings, or choose another --out"
        )


def _check_run(path: Path, meta: dict, run: dict) -> None:
    saved, now = meta.get("data"), run.get("data")
    if isinstance(saved, dict) and now is not None:
        changed = [
            f"{part}: {_describe_data(saved.get(part))} -> {_describe_data(now.get(part))}"
            for part in ("train", "test")
            if saved.get(part) != now.get(part)
        ]
        if changed:
            raise ConfigError(
                f"--resume: {path} was trained on other data ({'; '.join(changed)}); resume on the "
                "same data (the same --dataset and --data-dir, or the same arrays), or choose another --out"
            )
    saved_spe, spe = meta.get("steps_per_epoch"), run.get("steps_per_epoch")
    if saved_spe is not None and spe is not None and saved_spe != spe:
        raise ConfigError(
            f"--resume: {path} was saved at {saved_spe} steps per epoch but this run has {spe}; "
            "resume with the same data and --batch-size, or choose another --out"
        )


def _version_clause(meta: dict) -> str:
    saved = meta.get("version")
    return f" (it was written by jaxcnn {saved}, this is {_version()})" if saved and saved != _version() else ""


def _read_leaves(path: Path, z, meta: dict, template) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(template)
    if meta["leaves"] != len(leaves):
        raise ConfigError(
            f"--resume: {path} holds {meta['leaves']} arrays but this model and optimiser have {len(leaves)}; "
            f"was it written with another model or optimizer?{_version_clause(meta)}"
        )
    restored = []
    for i, ref in enumerate(leaves):
        name = f"leaf_{i:05d}"
        try:
            arr = z[name]
        except KeyError:
            raise _unusable(path, f"array {name} of {meta['leaves']} is missing") from None
        except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:
            raise _unusable(path, f"array {name} is damaged: {e}") from None
        if arr.shape != np.shape(ref) or arr.dtype != ref.dtype:
            raise ConfigError(
                f"--resume: array {i} in {path} is {arr.dtype}{list(arr.shape)} but the model expects "
                f"{ref.dtype}{list(np.shape(ref))}{_version_clause(meta)}"
            )
        restored.append(arr)
    return jax.tree_util.tree_unflatten(treedef, restored)


def _check_params(path: Path, meta: dict, template) -> None:
    """Same paths, shapes and dtypes of the parameters (arrays of the same shapes can still belong to differently
    named layers, e.g. after a jaxcnn version renamed one)."""
    saved, params = meta.get("params"), getattr(template, "params", None)
    if saved is None or params is None:
        return
    now = param_structure(params)
    if saved == now:
        return
    old, new = {p: (s, d) for p, s, d in saved}, {p: (s, d) for p, s, d in now}
    for p in list(old) + [p for p in new if p not in old]:
        if old.get(p) != new.get(p):
            before = f"{old[p][1]}{old[p][0]}" if p in old else "absent"
            after = f"{new[p][1]}{new[p][0]}" if p in new else "absent"
            break
    else:  # the same entries in another order
        p, before, after = "the parameter order", "", "changed"
    raise ConfigError(
        f"--resume: {path} holds other parameters than this model (params{p} {before} -> {after})"
        f"{_version_clause(meta)}; resume with the model and jaxcnn version that wrote it, "
        "or choose another --out"
    )


def resume_notes(meta: dict) -> list[str]:
    """Lines to log on resuming ``meta``'s checkpoint: what could not be checked, or that another jaxcnn version
    wrote it (restore has already refused a changed parameter structure, so the arrays fit)."""
    saved = meta.get("version")
    if saved is None:
        return [
            f"{CHECKPOINT} was written by an earlier jaxcnn that recorded neither its data nor its parameter "
            "structure; resuming without checking them"
        ]
    if saved != _version():
        return [
            f"{CHECKPOINT} was written by jaxcnn {saved}, this is {_version()}: its parameter structure matches, "
            f"so training continues, but the resumed epochs may differ slightly from a run under {saved}"
        ]
    return []


# ---------------------------------------------------------------------------------------------------
# The metrics log


def read_metrics(path: Path, *, upto_epoch: int, log: Callable[[str], None] | None = None) -> list[dict]:
    """The records of ``metrics.jsonl`` up to ``upto_epoch`` (those a checkpoint at that epoch covers).

    A torn last line (a crash in the middle of :func:`append_metrics`) and records after ``upto_epoch`` (a crash
    between an epoch's record and its checkpoint) are dropped, each said in one line to ``log``; the caller
    rewrites the file. A line elsewhere that is not a JSON record with an ``epoch`` raises :class:`ConfigError`
    naming the file and the line, since dropping it would lose a finished epoch's record.
    """
    if not path.exists():
        return []
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as e:
        raise ConfigError(f"--resume: cannot read {path} ({e.strerror or e})") from None
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    records, torn = [], 0
    for k, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line.decode())
            if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
                raise ValueError("not a record with an integer 'epoch'")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if k == len(numbered) - 1:
                torn = len(line)
                break
            raise ConfigError(
                f"--resume: {path}, line {number}, is not a metrics record ({e}); repair or remove "
                "that line, or choose another --out"
            ) from None
        records.append(record)
    kept = [r for r in records if r["epoch"] <= upto_epoch]
    say = log or (lambda message: None)
    missing = sorted(set(range(1, upto_epoch + 1)) - {r["epoch"] for r in kept})
    if torn:
        say(
            f"{path.name}: dropped a torn last line ({torn} bytes)"
            + ("" if missing else " written after the checkpoint")
        )
    after = [r["epoch"] for r in records if r["epoch"] > upto_epoch]
    if after:
        say(
            f"{path.name}: dropped the records of epochs {', '.join(map(str, after))}, written after the checkpoint "
            f"(epoch {upto_epoch})"
        )
    if missing:
        say(f"{path.name}: the records of epochs {', '.join(map(str, missing))} are missing; the history lacks them")
    return kept


def metrics_line(record: dict) -> str:
    """``record`` as one line of strict JSON (a non-finite number, which ``json`` would write as the non-standard
    ``NaN``/``Infinity``, becomes ``null``)."""
    return json.dumps(_finite(record), allow_nan=False) + "\n"


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def append_metrics(path: Path, record: dict) -> None:
    """Appends one JSON line in one write and syncs it to disk; a crash can tear only this last line."""
    try:
        with open(path, "a") as f:
            f.write(metrics_line(record))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise _write_error(path, e, "at most its last line is torn, which --resume repairs") from None
