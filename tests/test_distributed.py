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
    import json, sys
    import numpy as np
    import jax
    from jaxcnn import data
    from jaxcnn.train import TrainConfig, train_and_evaluate, Interrupted
    import os, signal
    ds = data.load_dataset("mnist-offline", log=lambda s: None)
    ds = ds._replace(train_images=ds.train_images[:256], train_labels=ds.train_labels[:256],
                     test_images=ds.test_images[:100], test_labels=ds.test_labels[:100])
    out = {}
    def leaves(workdir):
        with np.load(os.path.join(workdir, "checkpoint.npz")) as z:
            return [z[k].tolist() for k in sorted(z.files) if k.startswith("leaf_")]
    for spec in json.loads(sys.argv[1]):
        cfg = TrainConfig(model="lenet5", epochs=2, batch_size=32, chunk_steps=4, augment=0, grad=spec["grad"],
                          devices=spec["devices"])
        workdir = spec["workdir"]
        if spec.get("interrupt_after_epoch"):
            def log(line):
                if line.startswith("epoch   1/"):
                    os.kill(os.getpid(), signal.SIGINT)
            try:
                train_and_evaluate(cfg, workdir, dataset=ds, log=log, progress=False)
            except Interrupted:
                pass
            cfg = TrainConfig(**{**cfg.__dict__, "devices": spec["resume_devices"]})
            history = train_and_evaluate(cfg, workdir, dataset=ds, resume=True, log=lambda s: None, progress=False)
        else:
            history = train_and_evaluate(cfg, workdir, dataset=ds, log=lambda s: None, progress=False)
        out[spec["name"]] = {"losses": [h["train_loss"] for h in history], "test": [h["test_loss"] for h in history],
                             "params": leaves(workdir), "devices": len(jax.devices())}
    print("RESULT" + json.dumps(out))
    """
)


def _run(specs, tmp_path, devices=8):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAXCNN_OFFLINE": "1"}
    for spec in specs:
        spec["workdir"] = str(tmp_path / spec["name"])
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(specs)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def _assert_same(a, b, what):
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=RTOL, atol=ATOL, err_msg=f"{what}: train losses")
    np.testing.assert_allclose(a["test"], b["test"], rtol=RTOL, atol=ATOL, err_msg=f"{what}: test losses")
    assert len(a["params"]) == len(b["params"])
    for i, (x, y) in enumerate(zip(a["params"], b["params"])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL, err_msg=f"{what}: array {i}")


def test_device_counts_agree_with_one_device(tmp_path):
    specs = [{"name": f"{grad}-{d}", "grad": grad, "devices": d}
             for grad in ("manual", "autodiff") for d in ((1, 2, 4, 8) if grad == "manual" else (1, 8))]
    specs.append({"name": "resume-8-to-1", "grad": "manual", "devices": 8, "interrupt_after_epoch": True,
                  "resume_devices": 1})
    out = _run(specs, tmp_path)
    assert out["manual-1"]["devices"] == 8
    for d in (2, 4, 8):
        _assert_same(out[f"manual-{d}"], out["manual-1"], f"manual, {d} devices")
    _assert_same(out["autodiff-8"], out["autodiff-1"], "autodiff, 8 devices")
    _assert_same(out["manual-1"], out["autodiff-1"], "manual vs autodiff")
    # A checkpoint written mid-run on 8 devices resumes on 1 and ends where the uninterrupted run ends.
    _assert_same(out["resume-8-to-1"], out["manual-8"], "resumed 8 -> 1 device")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one(tmp_path):
    common = ["--model", "lenet5", "--dataset", "mnist-offline", "--train-limit", "256", "--epochs", "2",
              "--batch-size", "32", "--augment", "0", "--progress", "off", "--offline"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    single = subprocess.run([sys.executable, "-m", "jaxcnn.cli", "train", *common, "--out", str(tmp_path / "single")],
                            capture_output=True, text=True, env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
                            timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "jaxcnn.cli", "train", *common, "--out", str(tmp_path / "multi"),
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
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
    proc = subprocess.run([sys.executable, "-m", "jaxcnn.cli", "train", "--dataset", "mnist-offline", "--batch-size", "30",
                           "--epochs", "1", "--offline"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "--batch-size 30 does not divide evenly over 4 devices" in proc.stderr
    assert "Traceback" not in proc.stderr
