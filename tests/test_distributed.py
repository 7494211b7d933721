"""Data-parallel training: 1, 2, 4 and 8 (simulated CPU) devices and two real processes agree with one device.

Each scenario runs in a fresh interpreter because the number of CPU devices
(``--xla_force_host_platform_device_count``) and ``jax.distributed`` must be set before JAX starts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.slow

# Same numbers up to the order of float32 additions in the all-reduces: a few ulps per step, compounded
# over the steps below, stays far below this.
RTOL, ATOL = 1e-5, 1e-6

_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    import numpy as np
    import jax
    import jaxcnn
    from jaxcnn import data, gradients, models
    from jaxcnn.layers import BatchNorm, Conv2D, Dense, Dropout, Flatten, Relu, serial
    from jaxcnn.train import Interrupted

    ds = data.load_dataset("mnist-offline", log=lambda s: None)
    train = (ds.train_images[:256], ds.train_labels[:256])
    test = (ds.test_images[:100], ds.test_labels[:100])

    def network(name):
        if name == "lenet5":
            return models.lenet5()
        # BatchNorm's batch statistics, dropout masks and augmentation shifts over the whole (sharded) batch.
        return serial(Conv2D(4, 3, stride=2, use_bias=False), BatchNorm(), Relu(), Dropout(0.2), Flatten(), Dense(10),
                      name="tiny_bn")

    def leaves(workdir):
        with np.load(os.path.join(workdir, "checkpoint.npz")) as z:
            return [z[k].tolist() for k in sorted(z.files) if k.startswith("leaf_")]

    out = {}
    for spec in json.loads(sys.argv[1]):
        net = network(spec.get("network", "lenet5"))
        settings = dict(epochs=2, batch_size=32, chunk_steps=4, augment=spec.get("augment", 0), grad=spec["grad"],
                        devices=spec["devices"])
        workdir = spec["workdir"]
        quiet = dict(log=lambda s: None, progress=False)
        if spec.get("interrupt_after_epoch"):
            def log(line):
                if line.startswith("epoch   1/"):
                    os.kill(os.getpid(), signal.SIGINT)
            try:
                jaxcnn.fit(net, gradients.softmax_cross_entropy, train, test, out=workdir, log=log, progress=False,
                           **settings)
                raise SystemExit("not interrupted")
            except Interrupted:
                pass
            settings["devices"] = spec["resume_devices"]
            result = jaxcnn.fit(net, gradients.softmax_cross_entropy, train, test, out=workdir, resume=True, **quiet,
                                **settings)
        else:
            result = jaxcnn.fit(net, gradients.softmax_cross_entropy, train, test, out=workdir, **quiet, **settings)
        history = result.history
        out[spec["name"]] = {"losses": [h["train_loss"] for h in history], "test": [h["test_loss"] for h in history],
                             "params": leaves(workdir), "devices": len(jax.devices())}
    print("RESULT" + json.dumps(out))
    """
)


def _run(specs, tmp_path, devices=8):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAXCNN_OFFLINE": "1"}
    for spec in specs:
        spec["workdir"] = str(tmp_path / spec["name"])
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(specs)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def _assert_same(a, b, what, *, array_tolerance=None):
    """Losses to RTOL/ATOL; arrays elementwise to RTOL/ATOL, or with ``array_tolerance`` by their largest
    difference relative to their largest element."""
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=RTOL, atol=ATOL, err_msg=f"{what}: train losses")
    np.testing.assert_allclose(a["test"], b["test"], rtol=RTOL, atol=ATOL, err_msg=f"{what}: test losses")
    assert len(a["params"]) == len(b["params"])
    for i, (x, y) in enumerate(zip(a["params"], b["params"], strict=True)):
        x, y = np.asarray(x), np.asarray(y)
        if array_tolerance is None:
            np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL, err_msg=f"{what}: array {i}")
        else:
            assert np.max(np.abs(x - y)) <= array_tolerance * np.max(np.abs(y)), f"{what}: array {i}"


def test_device_counts_agree_with_one_device(tmp_path):
    specs = [
        {"name": f"{grad}-{d}", "grad": grad, "devices": d}
        for grad in ("manual", "autodiff")
        for d in ((1, 2, 4, 8) if grad == "manual" else (1, 8))
    ]
    specs.append(
        {"name": "resume-8-to-1", "grad": "manual", "devices": 8, "interrupt_after_epoch": True, "resume_devices": 1}
    )
    specs += [{"name": f"bn-{d}", "network": "tiny_bn", "augment": 2, "grad": "manual", "devices": d} for d in (1, 8)]
    out = _run(specs, tmp_path)
    assert out["manual-1"]["devices"] == 8
    for d in (2, 4, 8):
        _assert_same(out[f"manual-{d}"], out["manual-1"], f"manual, {d} devices")
    _assert_same(out["autodiff-8"], out["autodiff-1"], "autodiff, 8 devices")
    _assert_same(out["manual-1"], out["autodiff-1"], "manual vs autodiff")
    # A checkpoint written mid-run on 8 devices resumes on 1 and ends where the uninterrupted run ends.
    _assert_same(out["resume-8-to-1"], out["manual-8"], "resumed 8 -> 1 device")
    # BatchNorm over the whole batch (not per device), dropout and augmentation: the same on 8 devices as on 1.
    # The losses agree to RTOL, which statistics per device (4 examples instead of 32) would break at the
    # first step. The arrays agree to rounding: BatchNorm divides by the batch's standard deviation and its
    # parameter gradients are sums that mostly cancel, which amplifies the different order of the
    # all-reduced sums (measured after 16 steps: <= 4e-5 of an array's largest element, in the momentum
    # of BatchNorm's parameters).
    _assert_same(out["bn-8"], out["bn-1"], "BatchNorm, dropout and augmentation, 8 devices", array_tolerance=2e-4)
    assert len(out["bn-1"]["params"]) == 13  # params, running statistics and optimiser state all compared


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one(tmp_path):
    common = [
        "--recipe",
        "classic",
        "--model",
        "lenet5",
        "--dataset",
        "mnist-offline",
        "--train-limit",
        "256",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--augment",
        "0",
        "--progress",
        "off",
        "--offline",
    ]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    single = subprocess.run(
        [sys.executable, "-m", "jaxcnn.cli", "train", *common, "--out", str(tmp_path / "single")],
        capture_output=True,
        text=True,
        env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jaxcnn.cli",
                "train",
                *common,
                "--out",
                str(tmp_path / "multi"),
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-2000:]
    # Only process 0 logs and writes.
    assert "final test accuracy" in outputs[0][0] and "final test accuracy" not in outputs[1][0]

    def metrics(run):
        return [json.loads(l) for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    a, b = metrics("single"), metrics("multi")
    assert [r["epoch"] for r in b] == [1, 2]
    for key in ("train_loss", "test_loss", "test_accuracy"):
        np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=RTOL, atol=ATOL, err_msg=key)
    with np.load(tmp_path / "single" / "checkpoint.npz") as za, np.load(tmp_path / "multi" / "checkpoint.npz") as zb:
        for k in za.files:
            if k.startswith("leaf_"):
                np.testing.assert_allclose(zb[k], za[k], rtol=RTOL, atol=ATOL, err_msg=k)


def test_batch_must_divide_over_devices(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxcnn.cli",
            "train",
            "--dataset",
            "mnist-offline",
            "--batch-size",
            "30",
            "--epochs",
            "1",
            "--offline",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--batch-size 30 does not divide evenly over 4 devices" in proc.stderr
    assert "Traceback" not in proc.stderr
