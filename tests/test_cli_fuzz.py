"""Every command fails in one line, never with a traceback: random flag values (strings, negative, zero and
huge integers, odd floats, missing values) fed to ``jaxcnn.cli.main`` in-process, and the failures that a
fuzzer cannot reach cheaply (the device out of memory, ``--json`` into a missing folder) forced directly.

Each fuzzed call keeps flags that make a successful run tiny (``train``: one epoch of seed_net on 32
bundled images; ``bench``: the ``--quick`` peak section; ``gradcheck``: the check itself stubbed, since a
real one takes many seconds) and replaces one or two others.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jax

from jaxcnn import cli
from jaxcnn import data as jdata
from jaxcnn.train import TrainConfig, train_and_evaluate

FUZZ = settings(
    deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)

TRAIN = [
    "train",
    "--model",
    "seed_net",
    "--dataset",
    "mnist-offline",
    "--offline",
    "--epochs",
    "1",
    "--train-limit",
    "32",
    "--batch-size",
    "32",
    "--conv-method",
    "im2col",
    "--progress",
    "off",
]
TRAIN_FLAGS = [
    "--lr",
    "--momentum",
    "--weight-decay",
    "--seed",
    "--batch-size",
    "--augment",
    "--chunk-steps",
    "--eval-batch-size",
    "--check-every",
    "--check-tolerance",
    "--devices",
    "--train-limit",
    "--optimizer",
    "--schedule",
    "--precision",
    "--grad",
    "--loop",
    "--conv-method",
    "--model",
    "--dataset",
    "--data-dir",
    "--out",
    "--num-processes",
    "--process-id",
    "--coordinator",
    "--epochs",
    "--resume",
    "--normalize",
    "--checkpoint-every",
]
# The largest value of a flag that keeps a valid run tiny; other values of these flags are left out.
TRAIN_BOUNDS = {"--epochs": 2, "--train-limit": 256}
PATH_FLAGS = {"--out", "--json", "--data-dir"}  # fuzzed paths stay inside the scratch directory
GRADCHECK_FLAGS = ["--model", "--dtype", "--batch", "--seed", "--json"]
BENCH = ["bench", "--quick", "--models", "seed_net", "--sections", "peak", "--peers", "--options", "default"]
BENCH_FLAGS = ["--rounds", "--batch", "--json", "--device", "--options"]
INFERENCE_FLAGS = ["--out", "--eval-batch-size", "--json", "--dataset", "--data-dir", "--offline", "--plot"]

INTS = st.one_of(st.integers(-3, 3), st.sampled_from([64, 2**31, 2**63, -(2**63), 10**30]))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e-300, 1e300, -0.0]))
WORDS = st.sampled_from(
    [
        "seed_net",
        "resnet_small",
        "mnist-offline",
        "sgd",
        "adam",
        "cosine",
        "bfloat16",
        "autodiff",
        "scan",
        "im2col",
        "cpu",
        "gpu",
        "float32",
        ".",
        "..",
        "/",
        "-",
        "--",
        "x.json",
        "a/b/c.json",
    ]
)
VALUES = st.one_of(INTS.map(str), FLOATS.map(repr), WORDS, st.text(max_size=10))


def fuzzed(flags: list[str]):
    """One or two ``(flag, value)`` pairs; a value of ``None`` leaves the flag without one."""
    pair = st.tuples(st.sampled_from(flags), st.one_of(st.none(), VALUES))
    return st.lists(pair, min_size=1, max_size=2)


def call(argv: list[str]) -> tuple[int, str, str]:
    """``cli.main(argv)`` in-process: ``(exit status, stdout, stderr)``; an exception escaping is a failure."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(argv)
    except SystemExit as e:  # argparse: --help (0) and usage errors (2)
        code = e.code
    except Exception as e:
        pytest.fail(f"jaxcnn {' '.join(map(repr, argv))} raised {type(e).__name__}: {e}")
    return code, out.getvalue(), err.getvalue()


def assert_clean(argv: list[str]) -> int:
    code, _, err = call(argv)
    assert code in (0, 1, 2), (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code:
        lines = [line for line in err.split("\n") if line.strip()]  # not splitlines(): a fuzzed "\x1e" is no newline
        assert lines and lines[-1].startswith("jaxcnn"), (argv, err)
    return code


def with_values(base: list[str], pairs) -> list[str]:
    argv = list(base)
    for flag, value in pairs:
        if value is not None and flag in PATH_FLAGS:
            value = "scratch" + value  # "/" -> "scratch/", ".." -> "scratch..": never outside the sandbox
        argv += [flag] if value is None else [flag, value]
    return argv


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A scratch working directory (fuzzed paths land there), no downloads, no multi-process environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JAXCNN_OFFLINE", "1")
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A trained seed_net run (one step) for evaluate and predict, with an image file to predict."""
    out = tmp_path_factory.mktemp("run")
    config = TrainConfig(
        model="seed_net",
        dataset=jdata.OFFLINE_NAME,
        offline=True,
        epochs=1,
        train_limit=32,
        batch_size=32,
        conv_method="im2col",
    )
    train_and_evaluate(config, out, log=lambda line: None)
    images = jdata.load_dataset(jdata.OFFLINE_NAME, log=lambda line: None).test_images[:4]
    np.save(out / "images.npy", images)
    return out


@pytest.fixture(scope="module", autouse=True)
def _private_compilation_cache(compilation_cache):
    """Every test of this module shares one persistent compilation cache (conftest.py)."""


# ---------------------------------------------------------------------------------------------------
# Fuzzing


@settings(FUZZ, max_examples=40)
@given(pairs=fuzzed(TRAIN_FLAGS))
def test_train_flags(sandbox, pairs):
    pairs = [(f, v) for f, v in pairs if v is None or _tiny(f, v)]
    assert_clean(with_values(TRAIN, pairs))


def _tiny(flag: str, value: str) -> bool:
    """Whether ``flag value`` keeps a valid training run tiny (or is refused anyway)."""
    from jaxcnn.models import MODELS

    if flag == "--model":
        return value not in MODELS or value == "seed_net"
    if flag not in TRAIN_BOUNDS:
        return True
    try:
        return int(value) <= TRAIN_BOUNDS[flag]
    except ValueError:
        return True  # not an int: argparse refuses it


@settings(FUZZ, max_examples=20)
@given(pairs=fuzzed(INFERENCE_FLAGS))
def test_evaluate_flags(sandbox, run_dir, pairs):
    assert_clean(with_values(["evaluate", "--out", str(run_dir)], pairs))


@settings(FUZZ, max_examples=20)
@given(pairs=fuzzed(["--out", "--eval-batch-size", "--json"]), files=st.lists(VALUES, max_size=2))
def test_predict_flags_and_files(sandbox, run_dir, pairs, files):
    assert_clean(with_values(["predict", "--out", str(run_dir), str(run_dir / "images.npy"), *files], pairs))


@settings(FUZZ, max_examples=30)
@given(pairs=fuzzed(GRADCHECK_FLAGS))
def test_gradcheck_flags(sandbox, monkeypatch, pairs):
    import jaxcnn.modelcheck

    def check_model(name, *, dtype, batch, seed):  # the real check takes ~15 s per model
        assert 1 <= batch <= cli.GRADCHECK_MAX_BATCH and 0 <= seed < 2**63, (batch, seed)
        return []

    monkeypatch.setattr(jaxcnn.modelcheck, "check_model", check_model)
    assert_clean(with_values(["gradcheck", "--model", "seed_net"], pairs))


@settings(FUZZ, max_examples=15)
@given(pairs=fuzzed(BENCH_FLAGS))
def test_bench_flags(sandbox, pairs):
    pairs = [(f, v) for f, v in pairs if f != "--rounds" or v is None or not v.isdigit() or int(v) <= 3]
    assert_clean(with_values(BENCH, pairs))


# ---------------------------------------------------------------------------------------------------
# Failures a fuzzer does not reach cheaply


def out_of_memory(*args, **kwargs):
    raise jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 73014444032 bytes.\nBufferAssignment OOM Debugging."
    )


@pytest.mark.parametrize(
    "argv, target, hint",
    [
        (
            [*TRAIN, "--batch-size", "16", "--eval-batch-size", "500"],
            "jaxcnn.train.train_and_evaluate",
            "(--batch-size 16, --eval-batch-size 500)",
        ),
        (
            ["evaluate", "--out", "RUN", "--eval-batch-size", "700"],
            "jaxcnn.inference_cli.evaluate",
            "(--eval-batch-size 700)",
        ),
        (["predict", "--out", "RUN", "RUN/images.npy"], "jaxcnn.inference_cli.predict", "(default batch sizes)"),
    ],
)
def test_out_of_memory_is_one_line_naming_the_batch_size(sandbox, run_dir, monkeypatch, argv, target, hint):
    monkeypatch.setattr(target, out_of_memory)
    argv = [a.replace("RUN", str(run_dir)) for a in argv]
    code, _, err = call(argv)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert f"out of memory {hint}: RESOURCE_EXHAUSTED" in lines[0] and "lower --" in lines[0]
    assert "--eval-batch-size" in lines[0].split("lower ")[1]


def test_gradcheck_json_creates_missing_folders(sandbox, monkeypatch):
    import jaxcnn.modelcheck

    monkeypatch.setattr(jaxcnn.modelcheck, "check_model", lambda name, **kwargs: [])
    code, _, err = call(["gradcheck", "--model", "seed_net", "--json", "new/dir/checks.json"])
    assert code == 0, err
    assert json.loads((sandbox / "new" / "dir" / "checks.json").read_text()) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["gradcheck", "--batch", "0"], "--batch must be between 1 and 256, got 0"),
        (["gradcheck", "--batch", "-3"], "--batch must be between 1 and 256, got -3"),
        (["gradcheck", "--seed", "-1"], "--seed must be an integer in 0..2**63-1"),
        (["train", "--seed", str(2**63)], "--seed must be an integer in 0..2**63-1"),
        (["train", "--check-every", str(2**31)], "--check-every must be below 2**31"),
        (["bench", "--rounds", "1000000"], "--rounds must be at most 1000"),
        (["train", "--model", "seed_net", "--out", "\0"], "arguments cannot contain NUL characters"),
        (
            ["train", "--coordinator", "host", "--num-processes", "1", "--process-id", "0"],
            "--coordinator must be HOST:PORT",
        ),
    ],
)
def test_out_of_range_values_are_one_line(sandbox, argv, message):
    code, _, err = call(argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err


def test_an_unwritable_out_is_one_line(sandbox):
    (sandbox / "file").write_text("")
    code, _, err = call([*TRAIN, "--out", "file/run"])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("jaxcnn train: ") and "file" in lines[0], err
