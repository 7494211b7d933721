"""Training runs that survive faults.

Real ``jaxcnn train`` processes are killed with SIGKILL mid-epoch, right after an epoch's checkpoint and in the
middle of a checkpoint write, and their last metrics line is torn; each time ``--resume`` continues, and the run
ends with exactly the metrics and arrays of an uninterrupted one. Then, in this process, each fault a user can
meet is one line and exit status 2, never a traceback: a resume on other data or parameters, a damaged or foreign
checkpoint, a corrupt metrics log, an ``--out`` that cannot be created or written, a full disk (the previous
checkpoint stays intact and resumes). Files get the permissions a plain ``open()`` gives.

Every run trains ``seed_net`` on an IDX directory of 256 training and 200 test images of the bundled subset:
3 epochs of 16 steps of 16 in chunks of 4, with ``--checkpoint-every 8``. The subprocesses share this module's
persistent compilation cache, so only the first one compiles.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import jax

import jaxcnn
from jaxcnn import cli
from jaxcnn.data import write_idx
from jaxcnn.train import CHECKPOINT, ConfigError, TrainConfig
from jaxcnn.train import checkpoint as ckpt
from jaxcnn.train.config import array_settings

REPO = Path(__file__).resolve().parents[1]
TIMING_KEYS = ("images_per_s", "wall_s", "eval_s")
RUN = [
    "--recipe",
    "classic",
    "--model",
    "seed_net",
    "--batch-size",
    "16",
    "--epochs",
    "3",
    "--chunk-steps",
    "4",
    "--checkpoint-every",
    "8",
    "--conv-method",
    "im2col",
    "--progress",
    "off",
]
# The atomic writes of checkpoint.npz in an uninterrupted run: after steps 8 and 16 (the end) of each epoch.
WRITES = [(0, 8), (1, 0), (1, 8), (2, 0), (2, 8), (3, 0)]  # (epoch, step) of the saved position


@pytest.fixture(scope="module", autouse=True)
def _private_compilation_cache(compilation_cache):
    """Every test of this module shares one persistent compilation cache (conftest.py), subprocesses too."""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, offline) -> Path:
    """The four IDX files of 256 training and 200 test images of the bundled subset."""
    directory = tmp_path_factory.mktemp("idx")
    write_split(directory, offline.train_images[:256], offline.train_labels[:256], "train")
    write_split(directory, offline.test_images[:200], offline.test_labels[:200], "t10k")
    return directory


def write_split(directory: Path, images, labels, prefix: str) -> None:
    write_idx(directory / f"{prefix}-images-idx3-ubyte", images)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels)


@pytest.fixture(scope="module")
def env() -> dict:
    """The environment of a ``jaxcnn train`` subprocess: CPU, and this module's compilation cache."""
    environment = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    environment.pop(ckpt.PAUSE_VARIABLE, None)
    return environment


def train_argv(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", *RUN, "--dataset", str(data_dir), "--out", str(out), *extra]


def start(env: dict, argv: list[str], pause: str | None = None) -> subprocess.Popen:
    env = dict(env, **({ckpt.PAUSE_VARIABLE: pause} if pause else {}))
    return subprocess.Popen(
        [sys.executable, "-m", "jaxcnn.cli", *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def kill_at(env: dict, argv: list[str], pause: str) -> list[str]:
    """Runs ``jaxcnn train`` until it reaches the fault point ``pause`` (see ``checkpoint.PAUSE_VARIABLE``),
    SIGKILLs it there and returns its output lines."""
    proc = start(env, argv, pause)
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith(ckpt.PAUSE_VARIABLE):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, lines
    return lines


def run_to_end(env: dict, argv: list[str]) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-m", "jaxcnn.cli", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == "", result.stderr
    return result.stdout.splitlines()


@pytest.fixture(scope="module")
def reference(env, data_dir, tmp_path_factory) -> dict:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    stdout = run_to_end(env, train_argv(data_dir, out))
    return dict(out=out, stdout=stdout, metrics=metrics(out))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def meta(out: Path) -> dict:
    with np.load(out / CHECKPOINT) as z:
        return json.loads(bytes(z["meta"]).decode())


def position(out: Path) -> tuple[int, int]:
    m = meta(out)
    return m["epoch"], m["step"]


def temporaries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp"))


def arrays(out: Path) -> dict:
    with np.load(out / CHECKPOINT) as z:
        return {k: z[k] for k in z.files if k != "meta"}


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    return lines[0]


def train_here(capsys, argv: list[str]) -> tuple[int, list[str], str]:
    """``jaxcnn train`` in this process: (exit status, stdout lines, stderr)."""
    status = cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out.splitlines(), captured.err


# ---------------------------------------------------------------------------------------------------
# kill -9 and torn lines, in real processes


def test_the_reference_run_records_its_data_and_checkpoints_every_8_steps(reference, data_dir):
    assert [r["epoch"] for r in reference["metrics"]] == [1, 2, 3]
    m = meta(reference["out"])
    assert position(reference["out"]) == (3, 0) and m["steps_per_epoch"] == 16
    assert m["version"] == jaxcnn.__version__
    assert m["params"] == [
        ["[0]['b']", [3], "float32"],
        ["[0]['w']", [5, 5, 1, 3], "float32"],
        ["[3]['b']", [1], "float32"],
        ["[3]['w']", [1728, 1], "float32"],
    ]
    # The data actually used, in the checkpoint and in config.json.
    source = f"IDX files in {data_dir} (256 train / 200 test; no checksums to verify)"
    recorded = json.loads((reference["out"] / "config.json").read_text())["data"]
    assert recorded == m["data"] and recorded["source"] == source
    assert (recorded["train"]["count"], recorded["test"]["count"]) == (256, 200)
    assert len(recorded["train"]["sha256"]) == 64
    assert not temporaries(reference["out"])


def test_kill_9_anywhere_loses_only_the_steps_since_the_last_checkpoint(reference, env, data_dir, tmp_path):
    out = tmp_path / "run"
    argv = train_argv(data_dir, out)
    # 1. Mid-epoch 2, inside the write of its step-8 checkpoint (the run's third): the temporary file is
    #    complete but not renamed; checkpoint.npz still holds the end of epoch 1.
    kill_at(env, argv, "checkpoint.npz:3")
    assert position(out) == WRITES[1] and [r["epoch"] for r in metrics(out)] == [1]
    assert len(temporaries(out)) == 1 and temporaries(out)[0].startswith(".checkpoint.npz.")
    # 2. Resumed (the temporary file removed), killed right after epoch 2's checkpoint, its second write.
    lines = kill_at(env, [*argv, "--resume"], "checkpoint.npz:2:after")
    assert any(
        line.startswith("removed 1 temporary file(s) of an interrupted write: .checkpoint.npz.") for line in lines
    )
    assert any("resuming from" in line and "at epoch 2, step 0" in line for line in lines), lines
    assert position(out) == WRITES[3] and [r["epoch"] for r in metrics(out)] == [1, 2] and not temporaries(out)
    # 3. Resumed, killed in the write of epoch 3's end: checkpoint.npz holds --checkpoint-every's mid-epoch
    #    checkpoint (epoch 3, step 8) and metrics.jsonl already holds epoch 3's record.
    kill_at(env, [*argv, "--resume"], "checkpoint.npz:2")
    assert position(out) == WRITES[4] and len(meta(out)["partial_epoch"]["losses"]) == 8
    assert [r["epoch"] for r in metrics(out)] == [1, 2, 3] and len(temporaries(out)) == 1
    # 4. A crash in the middle of appending that record: its line torn.
    text = (out / "metrics.jsonl").read_bytes()
    torn = text[: text.rindex(b"\n", 0, len(text) - 1) + 1 + 40]
    (out / "metrics.jsonl").write_bytes(torn)
    # 5. Resumed to the end: exactly the uninterrupted run's records and arrays.
    lines = run_to_end(env, [*argv, "--resume"])
    assert "metrics.jsonl: dropped a torn last line (40 bytes) written after the checkpoint" in lines
    assert any("resuming from" in line and "at epoch 3, step 8" in line for line in lines), lines
    assert without_timing(metrics(out)) == without_timing(reference["metrics"])
    expected = arrays(reference["out"])
    got = arrays(out)
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert position(out) == (3, 0) and not temporaries(out)
    assert all(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())


# ---------------------------------------------------------------------------------------------------
# --resume refuses, in one line, what it cannot continue


@pytest.fixture
def finished(reference, tmp_path) -> Path:
    """A copy of the reference run (resuming it trains nothing)."""
    return Path(shutil.copytree(reference["out"], tmp_path / "run"))


def rewrite_checkpoint(path: Path, *, drop: tuple[str, ...] = (), **meta_changes) -> None:
    with np.load(path) as z:
        contents = {k: z[k] for k in z.files if k not in drop}
    if "meta" in contents and meta_changes:
        record = json.loads(bytes(contents["meta"]).decode())
        for key, value in meta_changes.items():
            if value is None:
                record.pop(key, None)
            else:
                record[key] = value
        contents["meta"] = np.frombuffer(json.dumps(record).encode(), np.uint8)
    np.savez(path, **contents)


def test_resuming_a_finished_run_trains_nothing_and_succeeds(finished, data_dir, capsys):
    status, lines, err = train_here(capsys, train_argv(data_dir, finished, "--resume"))
    assert status == 0, err
    assert any("resuming from" in line and "at epoch 4, step 0" in line for line in lines), lines
    assert lines[-1].startswith("final test accuracy")


def test_other_data_under_the_same_settings_is_refused(finished, data_dir, offline, capsys):
    """The files of ``--dataset`` changed (or ``--dataset mnist`` fell back to the bundled subset in one run and
    not in the other): the same settings, other data."""
    saved = {p.name: p.read_bytes() for p in data_dir.iterdir()}
    before = (finished / CHECKPOINT).read_bytes()
    try:
        write_split(data_dir, offline.train_images[256:512], offline.train_labels[256:512], "train")
        status, _, err = train_here(capsys, train_argv(data_dir, finished, "--resume"))
    finally:
        for name, content in saved.items():
            (data_dir / name).write_bytes(content)
    assert status == 2
    line = one_line_error(err)
    pattern = (
        r"jaxcnn train: --resume: .*checkpoint\.npz was trained on other data \(train: 256 uint8\[28, 28, 1\] "
        r"images, sha256 [0-9a-f]{12} -> 256 uint8\[28, 28, 1\] images, sha256 [0-9a-f]{12}\); resume on the "
        r"same data \(the same --dataset and --data-dir, or the same arrays\), or choose another --out$"
    )
    assert re.match(pattern, line), line
    assert (finished / CHECKPOINT).read_bytes() == before


@pytest.mark.skipif(
    any(Path(root, "mnist").exists() for root in ("/usr/share/datasets", "/usr/local/share/datasets")),
    reason="MNIST is installed system-wide, so --dataset mnist does not fall back",
)
def test_a_resume_after_mnist_fell_back_to_the_bundled_subset_is_refused_on_other_data(
    shared_data, tmp_path, capsys, monkeypatch
):
    """``--dataset mnist`` without the MNIST files trains on the bundled subset (recorded in config.json); the same
    command with a --data-dir holding the official files trains on other data, which --resume refuses."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("JAXCNN_DATA", raising=False)
    (tmp_path / "empty").mkdir()
    out = tmp_path / "run"
    argv = ["train", *RUN, "--dataset", "mnist", "--offline", "--train-limit", "256", "--out", str(out)]
    status, lines, err = train_here(capsys, [*argv, "--data-dir", str(tmp_path / "empty")])
    assert status == 0, err
    assert lines[0].startswith("MNIST unavailable (") and "using the bundled MNIST subset" in lines[0]
    source = json.loads((out / "config.json").read_text())["data"]["source"]
    assert source.startswith("the bundled MNIST subset") and meta(out)["data"]["source"] == source
    status, _, err = train_here(capsys, [*argv, "--data-dir", str(shared_data / "mnist"), "--resume"])
    assert status == 2
    assert re.match(
        r"jaxcnn train: --resume: .*checkpoint\.npz was trained on other data \(train: 256 .* -> 256 .*; "
        r"test: 1,000 uint8\[28, 28, 1\] images, sha256 \w+ -> 10,000 uint8\[28, 28, 1\] images, "
        r"sha256 \w+\); resume on the same data",
        one_line_error(err),
    )


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            dict(steps_per_epoch=99),
            r"checkpoint\.npz was saved at 99 steps per epoch but this run has 16; resume with "
            r"the same data and --batch-size, or choose another --out$",
        ),
        # Arrays of the same shapes under other names (a layer renamed by another jaxcnn version).
        (
            dict(
                params=[
                    ["[0]['b']", [3], "float32"],
                    ["[0]['kernel']", [5, 5, 1, 3], "float32"],
                    ["[3]['b']", [1], "float32"],
                    ["[3]['w']", [1728, 1], "float32"],
                ],
                version="0.0.1",
            ),
            r"checkpoint\.npz holds other parameters than this model "
            r"\(params\[0\]\['kernel'\] float32\[5, 5, 1, 3\] -> absent\) \(it was written by jaxcnn 0\.0\.1, "
            r"this is .+\); resume with the model and jaxcnn version that wrote it, or choose another --out$",
        ),
    ],
)
def test_another_run_shape_is_refused(finished, data_dir, capsys, changes, message):
    rewrite_checkpoint(finished / CHECKPOINT, **changes)
    status, _, err = train_here(capsys, train_argv(data_dir, finished, "--resume"))
    assert status == 2
    line = one_line_error(err)
    assert line.startswith("jaxcnn train: --resume: ") and re.search(message, line), line


def test_another_version_with_the_same_parameters_resumes_with_a_note(finished, data_dir, capsys):
    rewrite_checkpoint(finished / CHECKPOINT, version="0.0.1")
    status, lines, err = train_here(capsys, train_argv(data_dir, finished, "--resume"))
    assert status == 0, err
    assert (
        f"checkpoint.npz was written by jaxcnn 0.0.1, this is {jaxcnn.__version__}: its parameter structure "
        "matches, so training continues, but the resumed epochs may differ slightly from a run under 0.0.1"
    ) in lines
    # A checkpoint older than these records: resumed, saying what could not be checked.
    rewrite_checkpoint(finished / CHECKPOINT, version=None, data=None, params=None, steps_per_epoch=None)
    status, lines, err = train_here(capsys, train_argv(data_dir, finished, "--resume"))
    assert status == 0, err
    assert any("recorded neither its data nor its parameter structure" in line for line in lines), lines


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "not a zip archive": (lambda p: p.write_bytes(b"this is not a checkpoint\n"), r"\(not a zip archive\)"),
    "empty": (lambda p: p.write_bytes(b""), r"\(an empty file\)"),
    "truncated": (_truncate, r"\(not a zip archive\)"),
    "a .npy array": (lambda p: p.write_bytes(_npy_bytes()), r"\(a single \.npy array, not an archive of arrays\)"),
    "foreign archive": (lambda p: np.savez(p, weights=np.zeros(3)), r"\(it has no 'meta' record\)"),
    "meta not JSON": (
        lambda p: np.savez(p, meta=np.frombuffer(b"{epoch: 1", np.uint8)),
        r"\(its 'meta' record is damaged or not JSON: .+\)",
    ),
    "meta without a step": (lambda p: rewrite_checkpoint(p, step=None), r"\(its 'meta' record has no int 'step'\)"),
    "a missing array": (
        lambda p: rewrite_checkpoint(p, drop=("leaf_00002",)),
        r"\(array leaf_00002 of \d+ is missing\)",
    ),
}


def _npy_bytes() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3))
    return buffer.getvalue()


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_or_foreign_checkpoint_is_one_line(finished, data_dir, capsys, damage):
    spoil, detail = DAMAGES[damage]
    path = finished / CHECKPOINT
    spoil(path)
    spoiled = path.read_bytes()
    status, _, err = train_here(capsys, train_argv(data_dir, finished, "--resume"))
    assert status == 2
    line = one_line_error(err)
    assert re.fullmatch(
        rf"jaxcnn train: --resume: {re.escape(str(path))} is not a usable checkpoint {detail}; "
        r"restore an intact copy, or start afresh with another --out",
        line,
    ), line
    assert path.read_bytes() == spoiled  # left as it was, for the user to inspect


# ---------------------------------------------------------------------------------------------------
# The metrics log


def test_read_metrics_drops_a_torn_last_line_and_names_a_corrupt_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "train_loss": 0.4}]
    whole = "".join(map(ckpt.metrics_line, records))
    log = []
    path.write_text(whole + '{"epoch": 3, "train_lo')
    assert ckpt.read_metrics(path, upto_epoch=2, log=log.append) == records
    assert log == ["metrics.jsonl: dropped a torn last line (22 bytes) written after the checkpoint"]
    log.clear()
    path.write_text(whole + ckpt.metrics_line({"epoch": 3}))
    assert ckpt.read_metrics(path, upto_epoch=2, log=log.append) == records
    assert log == ["metrics.jsonl: dropped the records of epochs 3, written after the checkpoint (epoch 2)"]
    log.clear()
    path.write_text(ckpt.metrics_line(records[1]) + '{"epoch": 3, "train_lo')  # the record of epoch 1 lost
    assert ckpt.read_metrics(path, upto_epoch=2, log=log.append) == records[1:]
    assert log == [
        "metrics.jsonl: dropped a torn last line (22 bytes)",
        "metrics.jsonl: the records of epochs 1 are missing; the history lacks them",
    ]
    path.write_text(ckpt.metrics_line(records[0]) + '{"epoch": 2, "tr\n' + ckpt.metrics_line({"epoch": 3}))
    with pytest.raises(
        ConfigError,
        match=r"^--resume: .*metrics\.jsonl, line 2, is not a metrics record \(.+\); "
        r"repair or remove that line, or choose another --out$",
    ):
        ckpt.read_metrics(path, upto_epoch=2)
    path.write_text(ckpt.metrics_line(records[0]) + "[1, 2]\n" + ckpt.metrics_line(records[1]))
    with pytest.raises(ConfigError, match=r"line 2, is not a metrics record \(not a record with an integer 'epoch'\)"):
        ckpt.read_metrics(path, upto_epoch=2)


def test_a_corrupt_metrics_line_stops_the_resume_in_one_line(finished, data_dir, capsys):
    lines = (finished / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = lines[1][:10] + "\x00\x00" + lines[1][10:]
    (finished / "metrics.jsonl").write_text("".join(lines))
    status, _, err = train_here(capsys, train_argv(data_dir, finished, "--resume"))
    assert status == 2
    line = one_line_error(err)
    assert line.startswith(f"jaxcnn train: --resume: {finished / 'metrics.jsonl'}, line 2, is not a metrics record")
    assert (finished / "metrics.jsonl").read_text() == "".join(lines)  # untouched


def test_metrics_lines_are_strict_json():
    line = ckpt.metrics_line({"epoch": 1, "images_per_s": float("nan"), "grad_check": {"a": float("inf")}})
    assert json.loads(line, parse_constant=lambda name: pytest.fail(f"non-standard JSON {name}")) == {
        "epoch": 1,
        "images_per_s": None,
        "grad_check": {"a": None},
    }
    assert line.endswith("\n") and line.count("\n") == 1


# ---------------------------------------------------------------------------------------------------
# --out that cannot be written, a full disk


def test_out_that_is_a_file_or_below_a_file_is_one_line(data_dir, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    status, _, err = train_here(capsys, train_argv(data_dir, a_file))
    assert status == 2 and one_line_error(err) == f"jaxcnn train: --out {a_file} is a file, not a directory"
    status, _, err = train_here(capsys, train_argv(data_dir, a_file / "run"))
    assert status == 2
    assert one_line_error(err) == (
        f"jaxcnn train: --out {a_file / 'run'}: cannot create the directory (Not a directory); choose another --out"
    )


def test_out_without_write_permission_is_one_line(data_dir, tmp_path, capsys, monkeypatch):
    """Simulated (a root user writes anywhere): creating the temporary file is refused with EACCES."""

    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(dir))

    monkeypatch.setattr(ckpt.tempfile, "mkstemp", refuse)
    out = tmp_path / "run"
    status, _, err = train_here(capsys, train_argv(data_dir, out))
    assert status == 2
    assert one_line_error(err) == (
        f"jaxcnn train: cannot write {out / 'config.json'} (Permission denied); no "
        "config.json was written; choose an --out directory you can write to"
    )


@pytest.mark.skipif(
    os.name != "posix" or os.geteuid() == 0,
    reason="needs POSIX permissions that apply: the root user may write into a read-only directory",
)
def test_out_in_a_read_only_directory_is_one_line(data_dir, tmp_path, capsys):
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        status, _, err = train_here(capsys, train_argv(data_dir, parent / "run"))
        assert status == 2
        assert one_line_error(err).startswith(
            f"jaxcnn train: --out {parent / 'run'}: cannot create the directory (Permission denied)"
        )
        parent.chmod(0o755)
        (parent / "run").mkdir()
        parent.chmod(0o555)
        (parent / "run").chmod(0o555)
        status, _, err = train_here(capsys, train_argv(data_dir, parent / "run"))
        assert status == 2 and "(Permission denied)" in one_line_error(err)
    finally:
        parent.chmod(0o755)
        if (parent / "run").exists():
            (parent / "run").chmod(0o755)


def test_a_full_disk_keeps_the_previous_checkpoint_which_then_resumes(data_dir, tmp_path, capsys, monkeypatch):
    """The third checkpoint write (epoch 2, step 8) runs out of space half-way: one line naming the file; the
    checkpoint of epoch 1 stays intact, no temporary file is left, and --resume finishes the run from it."""
    real_savez, calls, intact = np.savez, [0], {}
    out = tmp_path / "run"

    def savez(file, **arrays):
        calls[0] += 1
        if calls[0] == 3:
            intact["bytes"] = (out / CHECKPOINT).read_bytes()
            file.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_savez(file, **arrays)

    monkeypatch.setattr(ckpt.np, "savez", savez)
    status, _, err = train_here(capsys, train_argv(data_dir, out))
    monkeypatch.undo()
    assert status == 2
    assert one_line_error(err) == (
        f"jaxcnn train: cannot write {out / CHECKPOINT} (No space left on device); the "
        "previous checkpoint.npz is intact; free some space, then continue with --resume"
    )
    assert (out / CHECKPOINT).read_bytes() == intact["bytes"] and not temporaries(out)
    assert position(out) == WRITES[1] and [r["epoch"] for r in metrics(out)] == [1]
    status, _lines, err = train_here(capsys, train_argv(data_dir, out, "--resume"))
    assert status == 0, err
    assert [r["epoch"] for r in metrics(out)] == [1, 2, 3] and position(out) == (3, 0)


def test_a_full_disk_while_appending_a_metrics_line_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt.os, "fsync", full)
    with pytest.raises(
        ConfigError,
        match=rf"^cannot write {path} \(No space left on device\); at most its last line "
        r"is torn, which --resume repairs; free some space, then run again$",
    ):
        ckpt.append_metrics(path, {"epoch": 1})


# ---------------------------------------------------------------------------------------------------
# Permissions, temporaries, --checkpoint-every


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_write_gives_the_mode_of_a_plain_open(tmp_path, umask):
    previous = os.umask(umask)
    try:
        ckpt.atomic_write(tmp_path / "written", lambda f: f.write(b"x"))
        with open(tmp_path / "opened", "wb") as f:
            f.write(b"x")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "written").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "opened").stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opened", "written"]


def test_a_run_writes_files_with_ordinary_permissions(reference):
    umask = os.umask(0)
    os.umask(umask)
    for name in ("checkpoint.npz", "config.json", "metrics.jsonl"):
        assert stat.S_IMODE((reference["out"] / name).stat().st_mode) == 0o666 & ~umask, name


def test_remove_temporaries_removes_only_those_of_atomic_write(tmp_path):
    names = [
        ".checkpoint.npz.a1b2.tmp",
        ".config.json.x.tmp",
        ".metrics.jsonl.y.tmp",
        ".other.npz.z.tmp",
        "checkpoint.npz",
        "notes.tmp",
    ]
    for name in names:
        (tmp_path / name).write_text("")
    removed = ckpt.remove_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(names[:3])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[3:])


@pytest.mark.parametrize("value", [0, -8, True, 2.5, "8"])
def test_checkpoint_every_must_be_a_positive_number_of_steps(value):
    with pytest.raises(ConfigError, match=rf"^--checkpoint-every must be a positive number of steps, got {value}$"):
        TrainConfig(checkpoint_every=value).validate()


def test_checkpoint_every_is_a_setting_of_fit_and_a_flag():
    assert "checkpoint_every" in array_settings()
    assert TrainConfig(checkpoint_every=8).validate().checkpoint_every == 8
    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "--checkpoint-every STEPS" in help_text.getvalue()
