"""Tests for jaxcnn.data on generated files: IDX format, dataset lookup and checks, downloads, preprocessing.

Downloads run for real against an HTTP server on 127.0.0.1 that serves good, wrong, truncated,
HTML and error responses. Nothing here touches the network or the user's cache: every test runs
with its own cache directory, no system dataset directories, and mirrors on a closed local port.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxcnn.data import (
    OFFLINE_NAME,
    DataError,
    Dataset,
    catalog,
    download,
    epoch_permutation,
    files,
    load_dataset,
    pixel_statistics,
    preprocess,
    read_idx,
    seed_task,
    write_idx,
)
from jaxcnn.data.catalog import FileSpec
from jaxcnn.data.download import Downloader
from jaxcnn.data.idx import IDX_TYPES

STEMS = catalog.STANDARD_STEMS
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def closed_port_url() -> str:
    """A URL on 127.0.0.1 whose port has no listener (connection refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Own cache, no $JAXCNN_DATA, no system directories, mirrors that refuse connections."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("JAXCNN_DATA", raising=False)
    monkeypatch.delenv("JAXCNN_OFFLINE", raising=False)
    monkeypatch.setenv("JAXCNN_MIRRORS", closed_port_url())
    monkeypatch.setattr(files, "SYSTEM_DATASET_DIRS", (tmp_path / "system",))


def random_split(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    labels = (np.arange(count) % 10).astype(np.uint8)
    return images, labels


def write_dataset(directory: Path, *, train: int = 30, test: int = 10, seed: int = 0, compress: bool = True) -> dict:
    """Writes the four standard IDX files; returns the arrays by role."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train_images, train_labels = random_split(rng, train)
    test_images, test_labels = random_split(rng, test)
    arrays = {
        "train_images": train_images,
        "train_labels": train_labels,
        "test_images": test_images,
        "test_labels": test_labels,
    }
    for role, array in arrays.items():
        write_idx(directory / (STEMS[role] + (".gz" if compress else "")), array, compress=compress)
    return arrays


def register(monkeypatch, spec: catalog.DatasetSpec, directory: Path, *, with_sha256: bool = True) -> None:
    """Makes the .gz files in ``directory`` the published files of ``spec`` for this test."""
    for role in catalog.ROLES:
        compressed = (directory / f"{STEMS[role]}.gz").read_bytes()
        sha256 = hashlib.sha256(gzip.decompress(compressed)).hexdigest() if with_sha256 else None
        file_spec = FileSpec(role, f"{STEMS[role]}.gz", hashlib.md5(compressed).hexdigest(), sha256)
        monkeypatch.setitem(spec.files, role, file_spec)


@pytest.fixture
def published(tmp_path, monkeypatch) -> tuple[Path, dict]:
    """A synthetic 'published' MNIST in tmp_path/published whose checksums are registered."""
    directory = tmp_path / "published"
    arrays = write_dataset(directory, seed=1)
    register(monkeypatch, catalog.MNIST, directory)
    register(monkeypatch, catalog.FASHION_MNIST, directory)
    return directory, arrays


class Log(list):
    """A ``log`` callable that keeps the lines."""

    def __call__(self, line: str) -> None:
        assert "\n" not in line
        self.append(line)


# ---------------------------------------------------------------- IDX format


IDX_DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]


@FUZZ
@given(
    array=hnp.arrays(
        dtype=st.sampled_from(IDX_DTYPES).flatmap(lambda d: st.sampled_from([np.dtype(d), np.dtype(d).newbyteorder()])),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5),
    ),
    compress=st.booleans(),
)
def test_idx_round_trip(tmp_path, array, compress):
    path = tmp_path / f"round-trip{'.gz' if compress else ''}"
    write_idx(path, array)
    result = read_idx(path)
    assert result.dtype == array.dtype.newbyteorder("=")
    assert result.dtype.isnative and result.shape == array.shape
    np.testing.assert_array_equal(result, array)
    assert result.flags.writeable


def test_idx_byte_layout(tmp_path):
    path = tmp_path / "layout"
    write_idx(path, np.array([[1, 2, 3], [4, 5, -6]], dtype=np.int16))
    assert path.read_bytes() == bytes([0, 0, 0x0B, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + struct.pack(">6h", 1, 2, 3, 4, 5, -6)


def test_idx_compression_is_recognised_by_content(tmp_path):
    plain_named_gz = tmp_path / "plain.gz"
    gzip_named_plain = tmp_path / "compressed"
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_idx(plain_named_gz, array, compress=False)
    write_idx(gzip_named_plain, array, compress=True)
    np.testing.assert_array_equal(read_idx(plain_named_gz), array)
    np.testing.assert_array_equal(read_idx(gzip_named_plain), array)


@pytest.mark.parametrize("array", [np.zeros((), np.uint8), np.zeros(3, bool), np.zeros(3, np.uint64)])
def test_write_idx_rejects_unrepresentable_arrays(tmp_path, array):
    with pytest.raises(ValueError, match="write_idx"):
        write_idx(tmp_path / "x", array)


def idx_header(code: int, dims: tuple[int, ...]) -> bytes:
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


def write_bytes(path: Path, data: bytes, compress: bool) -> Path:
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        (
            idx_header(0x08, (4, 5)) + bytes(19),
            [
                "file length does not match",
                "32 bytes (12 header + uint8 data of shape (4, 5))",
                "found 31",
                "truncated",
            ],
        ),
        (
            idx_header(0x08, (4, 5)) + bytes(21),
            ["file length does not match", "32 bytes", "found 33", "trailing bytes"],
        ),
        (idx_header(0x0C, (3,)) + bytes(5), ["int32 data of shape (3,)", "truncated"]),
        (b"\x1f\x00\x08\x01" + bytes(8), ["not an IDX file", "0x1F000801", "magic number"]),
        (b"<!DOCTYPE html><html>404</html>", ["not an IDX file", "HTML"]),
        (b"\n  <html><body>Error</body></html>", ["HTML"]),
        (idx_header(0x0A, (2,)) + bytes(2), ["unknown IDX element type", "0x0A", "0x08 (uint8)"]),
        (bytes([0, 0, 8, 0]), ["invalid IDX rank", "rank 0"]),
        (bytes([0, 0, 8]), ["truncated IDX header", "expected 4 bytes (the magic number)", "found 3 bytes"]),
        (
            bytes([0, 0, 8, 3, 0, 0, 0, 1]),
            ["truncated IDX header", "16 bytes (the magic number and 3 dimensions)", "found 8 bytes"],
        ),
        (b"", ["truncated IDX header", "found 0 bytes"]),
    ],
    ids=[
        "short",
        "long",
        "short-int32",
        "magic",
        "html",
        "html-whitespace",
        "type",
        "rank-0",
        "header-3",
        "dims",
        "empty",
    ],
)
def test_idx_corruption_messages(tmp_path, data, fragments, compress):
    path = write_bytes(tmp_path / "broken-idx3-ubyte", data, compress)
    with pytest.raises(DataError) as raised:
        read_idx(path)
    message = str(raised.value)
    assert message.startswith(str(path))
    for fragment in fragments:
        assert fragment in message
    assert "replace it with an intact copy" in message


def test_idx_huge_declared_size_is_rejected_without_allocating(tmp_path):
    path = write_bytes(tmp_path / "huge.gz", idx_header(0x0E, (2**32 - 1, 2**32 - 1, 2**32 - 1)) + bytes(64), True)
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_idx_corrupt_and_truncated_gzip(tmp_path):
    path = tmp_path / "images.gz"
    write_idx(path, np.random.default_rng(0).integers(0, 256, (50, 28, 28), dtype=np.uint8))
    compressed = path.read_bytes()
    truncated = write_bytes(tmp_path / "truncated.gz", compressed[: len(compressed) // 2], False)
    with pytest.raises(DataError, match=r"truncated|corrupt gzip"):
        read_idx(truncated)
    flipped = bytearray(compressed)
    flipped[len(flipped) // 2] ^= 0xFF
    corrupt = write_bytes(tmp_path / "corrupt.gz", bytes(flipped), False)
    with pytest.raises(DataError, match=r"corrupt gzip|file length"):
        read_idx(corrupt)
    bad_crc = bytearray(compressed)
    bad_crc[-8] ^= 0xFF
    with pytest.raises(DataError, match=r"corrupt gzip data.*CRC"):
        read_idx(write_bytes(tmp_path / "crc.gz", bytes(bad_crc), False))


def test_idx_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_idx(tmp_path / "absent")
    with pytest.raises(DataError, match="cannot read the file"):
        read_idx(tmp_path)


@FUZZ
@given(
    code=st.sampled_from(sorted(IDX_TYPES)) | st.integers(0, 255),
    dims=st.lists(st.integers(0, 6) | st.sampled_from([2**31, 2**32 - 1]), min_size=0, max_size=4),
    length_change=st.integers(-3, 3) | st.just(0),
    compress=st.booleans(),
    zero_prefix=st.booleans() | st.just(True),
)
def test_idx_fuzzed_headers_and_lengths(tmp_path, code, dims, length_change, compress, zero_prefix):
    header = bytes([0 if zero_prefix else 1, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    itemsize = IDX_TYPES[code].itemsize if code in IDX_TYPES else 1
    declared = int(np.prod(dims, dtype=object)) * itemsize if dims else 0
    payload = bytes(max(0, min(declared, 4096) + length_change))
    path = write_bytes(tmp_path / f"fuzz{'.gz' if compress else ''}", header + payload, compress)
    # NumPy refuses shapes whose nonzero dimensions multiply past its limit, even when one dimension is 0.
    representable = int(np.prod([d for d in dims if d], dtype=object)) * itemsize < 2**63 if dims else False
    valid = zero_prefix and code in IDX_TYPES and dims and len(payload) == declared and representable
    if valid:
        assert read_idx(path).shape == tuple(dims)
    else:
        with pytest.raises(DataError) as raised:
            read_idx(path)
        assert str(path) in str(raised.value)


@FUZZ
@given(data=st.binary(max_size=80), compress=st.booleans())
def test_idx_arbitrary_bytes_never_crash(tmp_path, data, compress):
    path = write_bytes(tmp_path / "noise", data, compress)
    try:
        array = read_idx(path)
    except DataError as error:
        assert str(path) in str(error)
    else:
        assert array.ndim >= 1


# ---------------------------------------------------------------- directory datasets and checks


@pytest.mark.parametrize("compress", [True, False])
def test_directory_dataset(tmp_path, compress):
    arrays = write_dataset(tmp_path / "kmnist", compress=compress)
    dataset = load_dataset(str(tmp_path / "kmnist"))
    assert isinstance(dataset, Dataset)
    assert dataset.name == str(tmp_path / "kmnist")
    for role, array in arrays.items():
        np.testing.assert_array_equal(getattr(dataset, role), array)
    assert "no checksums" in dataset.source and "30 train / 10 test" in dataset.source


def test_directory_dataset_accepts_dotted_names(tmp_path):
    directory = tmp_path / "kaggle"
    arrays = write_dataset(directory, compress=False)
    for stem in STEMS.values():
        (directory / stem).rename(directory / stem.replace("-idx", ".idx"))
    np.testing.assert_array_equal(load_dataset(str(directory)).test_labels, arrays["test_labels"])


def test_directory_dataset_missing_file(tmp_path):
    write_dataset(tmp_path / "partial")
    (tmp_path / "partial" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as raised:
        load_dataset(str(tmp_path / "partial"))
    message = str(raised.value)
    assert str(tmp_path / "partial") in message and "found none for t10k-labels-idx1-ubyte" in message
    assert "Place the missing files" in message


@pytest.mark.parametrize(
    ("role", "array", "fragments"),
    [
        (
            "test_labels",
            np.zeros(9, np.uint8),
            ["t10k-labels-idx1-ubyte.gz", "label count does not match", "10 labels", "found 9"],
        ),
        (
            "train_labels",
            np.where(np.arange(30) == 7, 12, 3).astype(np.uint8),
            ["train-labels-idx1-ubyte.gz", "labels outside 0-9", "the first 12 at index 7"],
        ),
        (
            "train_images",
            np.zeros((30, 28, 28), np.int32),
            ["train-images-idx3-ubyte.gz", "not MNIST-format images", "int32 array"],
        ),
        ("test_images", np.zeros((10, 27, 28), np.uint8), ["not MNIST-format images", "shape (10, 27, 28)"]),
        ("test_labels", np.zeros((10, 1), np.uint8), ["not MNIST-format labels", "shape (10, 1)"]),
    ],
)
def test_directory_dataset_bad_contents(tmp_path, role, array, fragments):
    directory = tmp_path / "bad"
    write_dataset(directory)
    write_idx(directory / f"{STEMS[role]}.gz", array)
    with pytest.raises(DataError) as raised:
        load_dataset(str(directory))
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(DataError, match=r"unknown dataset.*mnist, fashion-mnist, mnist-offline"):
        load_dataset("cifar-10")


# ---------------------------------------------------------------- named datasets: lookup and verification


def test_named_dataset_from_data_dir(published):
    directory, arrays = published
    log = Log()
    dataset = load_dataset("mnist", data_dir=directory, download=False, log=log)
    assert dataset.name == "mnist" and log == []
    np.testing.assert_array_equal(dataset.train_images, arrays["train_images"])
    assert dataset.source == f"MNIST (30 train / 10 test) from {directory}"


@pytest.mark.parametrize("where", ["data_dir/name", "JAXCNN_DATA", "cache", "system"])
def test_named_dataset_lookup_locations(tmp_path, monkeypatch, published, where):
    root = tmp_path / "root"
    target = {
        "data_dir/name": root / "mnist",
        "JAXCNN_DATA": root / "mnist",
        "cache": tmp_path / "cache" / "jaxcnn" / "mnist",
        "system": tmp_path / "system" / "mnist",
    }[where]
    write_dataset(target, seed=1)
    if where == "JAXCNN_DATA":
        monkeypatch.setenv("JAXCNN_DATA", str(root))
    dataset = load_dataset("mnist", data_dir=root if where == "data_dir/name" else None, download=False)
    assert dataset.name == "mnist" and str(target) in dataset.source


def test_lookup_order_and_per_file_resolution(tmp_path, monkeypatch, published):
    source, _ = published
    cache = tmp_path / "cache" / "jaxcnn" / "mnist"
    write_dataset(cache, seed=1)
    (cache / "t10k-images-idx3-ubyte.gz").write_bytes(b"garbage that would fail verification")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "t10k-images-idx3-ubyte.gz").write_bytes((source / "t10k-images-idx3-ubyte.gz").read_bytes())
    dataset = load_dataset("mnist", data_dir=mine, download=False)
    assert f"test images from {mine}" in dataset.source
    assert f"train images, train labels, test labels from {cache}" in dataset.source


def test_recompressed_and_uncompressed_copies_verify_by_content(tmp_path, published):
    source, arrays = published
    copy = tmp_path / "debian-style"
    copy.mkdir()
    for role in catalog.ROLES:
        data = gzip.decompress((source / f"{STEMS[role]}.gz").read_bytes())
        if role == "train_labels":
            (copy / STEMS[role]).write_bytes(data)
        else:
            (copy / f"{STEMS[role]}.gz").write_bytes(gzip.compress(data, compresslevel=1, mtime=12345))
    assert (copy / "t10k-images-idx3-ubyte.gz").read_bytes() != (source / "t10k-images-idx3-ubyte.gz").read_bytes()
    dataset = load_dataset("fashion-mnist", data_dir=copy, download=False)
    np.testing.assert_array_equal(dataset.train_labels, arrays["train_labels"])


def test_checksum_mismatch_is_reported_and_the_file_kept(tmp_path, monkeypatch, published):
    other = tmp_path / "other"
    write_dataset(other, seed=2)
    with pytest.raises(DataError) as raised:
        load_dataset("mnist", data_dir=other, download=False)
    message = str(raised.value)
    expected_md5 = catalog.MNIST.files["train_images"].gzip_md5
    found_md5 = hashlib.md5((other / "train-images-idx3-ubyte.gz").read_bytes()).hexdigest()
    assert message.startswith(str(other / "train-images-idx3-ubyte.gz"))
    assert "checksum mismatch for MNIST train-images-idx3-ubyte.gz" in message
    assert expected_md5 in message and found_md5 in message
    assert "Delete the file so that it is downloaded again" in message
    assert (other / "train-images-idx3-ubyte.gz").exists()


def test_only_the_original_gzip_verifies_without_published_sha256(tmp_path, monkeypatch, published):
    source, _ = published
    register(monkeypatch, catalog.MNIST, source, with_sha256=False)
    copy = tmp_path / "uncompressed"
    write_dataset(copy, seed=1, compress=False)
    with pytest.raises(DataError, match=r"only the original \.gz verifies"):
        load_dataset("mnist", data_dir=copy, download=False)


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match="does not exist or is not a directory"):
        load_dataset("mnist", data_dir=tmp_path / "nowhere")


def test_fashion_mnist_missing_files_say_where_to_put_them(tmp_path):
    with pytest.raises(DataError) as raised:
        load_dataset("fashion-mnist", download=False)
    message = str(raised.value)
    destination = tmp_path / "cache" / "jaxcnn" / "fashion-mnist"
    assert "downloading is disabled" in message
    for role in catalog.ROLES:
        file_spec = catalog.FASHION_MNIST.files[role]
        assert f"{file_spec.filename} (MD5 {file_spec.gzip_md5})" in message
    assert f"in {destination}, or in a directory passed as data_dir= / --data-dir" in message


# ---------------------------------------------------------------- the bundled subset and the MNIST fallback


def test_offline_subset_split():
    dataset = load_dataset(OFFLINE_NAME)
    assert dataset.name == OFFLINE_NAME
    assert dataset.train_images.shape == (4000, 28, 28) and dataset.test_images.shape == (1000, 28, 28)
    assert dataset.train_images.dtype == np.uint8 and dataset.train_labels.dtype == np.uint8
    assert np.bincount(dataset.train_labels).tolist() == [400] * 10
    assert np.bincount(dataset.test_labels).tolist() == [100] * 10
    assert "4,000 train / 1,000 held-out test" in dataset.source
    train_keys = {image.tobytes() for image in dataset.train_images}
    assert not any(image.tobytes() in train_keys for image in dataset.test_images)


def test_mnist_falls_back_to_the_bundled_split_in_one_line(monkeypatch):
    monkeypatch.setenv("JAXCNN_OFFLINE", "1")
    log = Log()
    dataset = load_dataset("mnist", log=log)
    assert dataset.name == OFFLINE_NAME and len(dataset.train_labels) == 4000 and len(dataset.test_labels) == 1000
    assert len(log) == 1
    assert log[0].startswith("MNIST unavailable (") and "not found, downloads disabled" in log[0]
    assert "4,000 train / 1,000 held-out test" in log[0]


def test_mnist_fallback_tests_on_the_official_test_set_when_present(tmp_path, published):
    source, arrays = published
    partial = tmp_path / "partial"
    partial.mkdir()
    for role in ("test_images", "test_labels", "train_labels"):
        name = f"{STEMS[role]}.gz"
        (partial / name).write_bytes((source / name).read_bytes())
    log = Log()
    dataset = load_dataset("mnist", data_dir=partial, download=False, log=log)
    assert dataset.name == OFFLINE_NAME
    assert dataset.train_images.shape == (5000, 28, 28)
    np.testing.assert_array_equal(dataset.test_images, arrays["test_images"])
    assert len(log) == 1 and "train-images-idx3-ubyte.gz not found, downloads disabled" in log[0]
    assert f"official MNIST test set (10 images) from {partial}" in log[0]


def test_mnist_falls_back_quickly_when_no_mirror_answers():
    log = Log()
    start = time.monotonic()
    dataset = load_dataset("mnist", log=log)
    assert time.monotonic() - start < 5
    assert dataset.name == OFFLINE_NAME
    assert len(log) == 1 and "download failed: no mirror reachable" in log[0]


@pytest.mark.parametrize("limit", [1, 7, 4000, 10**6])
def test_train_limit_keeps_a_prefix(limit):
    full = load_dataset(OFFLINE_NAME)
    limited = load_dataset(OFFLINE_NAME, train_limit=limit)
    kept = min(limit, 4000)
    np.testing.assert_array_equal(limited.train_images, full.train_images[:kept])
    np.testing.assert_array_equal(limited.train_labels, full.train_labels[:kept])
    np.testing.assert_array_equal(limited.test_labels, full.test_labels)
    assert (f"first {kept:,} of 4,000" in limited.source) == (kept < 4000)


@pytest.mark.parametrize("limit", [0, -3])
def test_train_limit_must_be_positive(limit):
    with pytest.raises(DataError, match=f"train_limit must be at least 1, got {limit}"):
        load_dataset(OFFLINE_NAME, train_limit=limit)


def test_seed_task_stand_in_is_balanced_and_says_so(monkeypatch):
    monkeypatch.setenv("JAXCNN_OFFLINE", "yes")
    log = Log()
    images, labels, source = seed_task(log=log)
    assert images.shape == (200, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.float32 and set(np.unique(labels)) == {0.0, 1.0}
    assert int(labels.sum()) == 100
    assert source.startswith("stand-in") and len(log) == 1 and source in log[0]
    subset = load_dataset(OFFLINE_NAME)
    np.testing.assert_array_equal(images, subset.train_images[:200])


def test_seed_task_uses_the_first_200_training_images(tmp_path, monkeypatch):
    directory = tmp_path / "big"
    directory.mkdir()
    rng = np.random.default_rng(5)
    images, labels = random_split(rng, 250)
    labels = rng.integers(0, 10, 250).astype(np.uint8)
    write_idx(directory / "train-images-idx3-ubyte.gz", images)
    write_idx(directory / "train-labels-idx1-ubyte.gz", labels)
    for role in ("train_images", "train_labels"):
        compressed = (directory / f"{STEMS[role]}.gz").read_bytes()
        monkeypatch.setitem(
            catalog.MNIST.files,
            role,
            FileSpec(role, f"{STEMS[role]}.gz", hashlib.md5(compressed).hexdigest(), None),
        )
    log = Log()
    task_images, task_labels, source = seed_task(data_dir=directory, download=False, log=log)
    np.testing.assert_array_equal(task_images, images[:200])
    np.testing.assert_array_equal(task_labels, (labels[:200] > 4).astype(np.float32))
    assert source == f"the first 200 MNIST training images, from {directory}" and log == []


# ---------------------------------------------------------------- downloads against a local HTTP server


class MirrorServer:
    """An HTTP server on 127.0.0.1 serving the files of one directory in several ways, by URL prefix.

    /good/NAME the file; /wrong/NAME a valid IDX file with other contents; /short/NAME the first half,
    complete as far as HTTP goes; /cut/NAME the first half with a Content-Length of the whole;
    /html/NAME a 200 text/html page; /html-octet/NAME an HTML page sent as octet-stream; /missing/NAME
    404; /error/NAME 500; /flaky/NAME 503 for the first two requests of each file, then the file.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self.requests: list[str] = []
        self.flaky_counts: dict[str, int] = {}
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                with server.lock:
                    server.requests.append(self.path)
                server.respond(self)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def respond(self, handler):
        _, kind, name = handler.path.split("/", 2)
        path = self.directory / name
        if kind == "missing" or not path.is_file():
            return self.send(handler, 404, b"not found", "text/plain")
        data = path.read_bytes()
        if kind == "good":
            return self.send(handler, 200, data)
        if kind == "wrong":
            other = gzip.compress(gzip.decompress(data)[:-1] + b"\x07", mtime=0)
            return self.send(handler, 200, other)
        if kind == "short":
            return self.send(handler, 200, data[: len(data) // 2])
        if kind == "cut":
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data[: len(data) // 2])
            handler.close_connection = True
            return None
        if kind == "html":
            return self.send(handler, 200, b"<!DOCTYPE html><title>Oops</title>", "text/html; charset=utf-8")
        if kind == "html-octet":
            return self.send(handler, 200, b"<html><body>Access denied</body></html>")
        if kind == "error":
            return self.send(handler, 500, b"internal error", "text/plain")
        if kind == "flaky":
            with self.lock:
                count = self.flaky_counts[name] = self.flaky_counts.get(name, 0) + 1
            if count <= 2:
                return self.send(handler, 503, b"try later", "text/plain")
            return self.send(handler, 200, data)
        return self.send(handler, 400, b"bad kind", "text/plain")

    @staticmethod
    def send(handler, status, body, content_type="application/octet-stream"):
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def mirror(self, kind: str) -> str:
        return f"{self.url}/{kind}/"


@pytest.fixture
def server(published):
    mirror_server = MirrorServer(published[0])
    mirror_server.thread.start()
    try:
        yield mirror_server
    finally:
        mirror_server.httpd.shutdown()
        mirror_server.httpd.server_close()
        mirror_server.thread.join(timeout=5)


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """Records the downloader's backoff pauses instead of sleeping through them."""
    recorded: list[float] = []
    monkeypatch.setattr(download.time, "sleep", recorded.append)
    return recorded


def cache_listing(tmp_path: Path, name: str = "fashion-mnist") -> list[str]:
    directory = tmp_path / "cache" / "jaxcnn" / name
    return sorted(os.listdir(directory)) if directory.exists() else []


def test_download_verifies_and_places_files(tmp_path, server, published):
    log = Log()
    dataset = load_dataset("fashion-mnist", mirrors=[server.mirror("good")], log=log)
    np.testing.assert_array_equal(dataset.train_images, published[1]["train_images"])
    destination = tmp_path / "cache" / "jaxcnn" / "fashion-mnist"
    assert cache_listing(tmp_path) == sorted(f"{stem}.gz" for stem in STEMS.values())
    assert len(log) == 4 and all(line.startswith("downloaded ") and str(destination) in line for line in log)
    server.requests.clear()
    again = load_dataset("fashion-mnist", mirrors=[server.mirror("good")], log=log)
    assert server.requests == [] and f"from {destination}" in again.source


def test_download_mirror_fallback_in_order(tmp_path, server):
    kinds = ["missing", "html", "html-octet", "wrong", "short", "good"]
    dataset = load_dataset("fashion-mnist", mirrors=[server.mirror(kind) for kind in kinds], log=Log())
    assert dataset.name == "fashion-mnist"
    first_file = [request for request in server.requests if request.endswith("train-images-idx3-ubyte.gz")]
    assert [request.split("/")[1] for request in first_file] == kinds


def test_download_failures_are_all_reported_and_nothing_is_left(tmp_path, server, sleeps):
    kinds = ["missing", "html", "html-octet", "wrong", "short", "cut"]
    with pytest.raises(DataError) as raised:
        load_dataset("fashion-mnist", mirrors=[server.mirror(kind) for kind in kinds])
    message = str(raised.value)
    for fragment in [
        "/missing/train-images-idx3-ubyte.gz: HTTP 404",
        "/html/train-images-idx3-ubyte.gz: served an HTML page (Content-Type text/html)",
        "/html-octet/train-images-idx3-ubyte.gz: served an HTML page",
        "/wrong/train-images-idx3-ubyte.gz: checksum mismatch for Fashion-MNIST",
        "/short/train-images-idx3-ubyte.gz: corrupt gzip data",
        "/cut/train-images-idx3-ubyte.gz: transfer",
        "(after 3 attempts)",
        "Check the network connection and try again, or place train-images-idx3-ubyte.gz (MD5",
    ]:
        assert fragment in message
    assert cache_listing(tmp_path) == []


def test_download_retries_transient_errors(tmp_path, server, sleeps):
    dataset = load_dataset("fashion-mnist", mirrors=[server.mirror("flaky")], log=Log())
    assert dataset.name == "fashion-mnist"
    assert server.requests.count("/flaky/train-images-idx3-ubyte.gz") == 3
    assert sleeps == [0.25, 0.5] * 4


def test_download_retry_backoff_really_waits(tmp_path, server):
    start = time.monotonic()
    labels = Downloader([server.mirror("flaky")], log=Log()).fetch(
        "t10k-labels-idx1-ubyte.gz", tmp_path / "slow", lambda path, url: read_idx(path)
    )
    assert len(labels) == 10 and 0.7 < time.monotonic() - start < 3


def test_download_gives_up_after_retries_then_tries_the_next_mirror(tmp_path, server, sleeps):
    load_dataset("fashion-mnist", mirrors=[server.mirror("error"), server.mirror("good")], log=Log())
    assert server.requests.count("/error/t10k-labels-idx1-ubyte.gz") == 3
    assert server.requests.count("/good/t10k-labels-idx1-ubyte.gz") == 1
    assert server.requests.count("/cut/t10k-labels-idx1-ubyte.gz") == 0


def test_download_retries_a_dropped_connection(tmp_path, server, sleeps):
    with pytest.raises(DataError, match=r"transfer ended after .* bytes \(after 3 attempts\)"):
        load_dataset("fashion-mnist", mirrors=[server.mirror("cut")])
    assert server.requests.count("/cut/train-images-idx3-ubyte.gz") == 3


def test_unreachable_mirror_fails_fast_and_is_skipped_afterwards(tmp_path, server):
    dead = closed_port_url()
    start = time.monotonic()
    dataset = load_dataset("fashion-mnist", mirrors=[dead, server.mirror("good")], log=Log())
    assert time.monotonic() - start < 5 and dataset.name == "fashion-mnist"
    downloader = Downloader([dead], log=Log())
    start = time.monotonic()
    with pytest.raises(DataError, match="unreachable \\(Connection refused\\)"):
        downloader.fetch("first.gz", tmp_path / "x", lambda path, url: None)
    with pytest.raises(DataError, match=r"skipped, 127\.0\.0\.1:[0-9]+ was unreachable a moment ago"):
        downloader.fetch("second.gz", tmp_path / "x", lambda path, url: None)
    assert time.monotonic() - start < 2
    assert os.listdir(tmp_path / "x") == []


def test_all_mirrors_unreachable_message(tmp_path):
    dead = closed_port_url()
    with pytest.raises(DataError) as raised:
        load_dataset("fashion-mnist", mirrors=[dead])
    message = str(raised.value)
    assert f"{dead}train-images-idx3-ubyte.gz: unreachable" in message
    assert (
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz: "
        "not found, download failed: no mirror reachable, likewise." in message
    )
    assert "or place train-images-idx3-ubyte.gz (MD5" in message and "t10k-labels-idx1-ubyte.gz (MD5" in message


def test_offline_mode_never_touches_the_network(monkeypatch, server):
    monkeypatch.setenv("JAXCNN_OFFLINE", "1")
    dataset = load_dataset("mnist", mirrors=[server.mirror("good")], log=Log())
    assert dataset.name == OFFLINE_NAME
    seed_task(mirrors=[server.mirror("good")], log=Log())
    load_dataset("mnist", mirrors=[server.mirror("good")], download=True, log=Log())
    assert server.requests == []
    monkeypatch.delenv("JAXCNN_OFFLINE")
    load_dataset("mnist", mirrors=[server.mirror("good")], download=False, log=Log())
    assert server.requests == []


def test_mirrors_from_the_environment(monkeypatch, server):
    monkeypatch.setenv("JAXCNN_MIRRORS", f"{server.url}/missing/{{dataset}}, {server.url}/good/")
    assert load_dataset("fashion-mnist", log=Log()).name == "fashion-mnist"
    assert "/missing/fashion-mnist/train-images-idx3-ubyte.gz" in server.requests


def test_a_malformed_mirror_url_is_reported(monkeypatch):
    monkeypatch.setenv("JAXCNN_MIRRORS", "not-a-url")
    with pytest.raises(DataError, match=r"not-a-url/train-images-idx3-ubyte\.gz: not a usable URL"):
        load_dataset("fashion-mnist")


def test_download_into_jaxcnn_data(tmp_path, monkeypatch, server):
    monkeypatch.setenv("JAXCNN_DATA", str(tmp_path / "datasets"))
    load_dataset("fashion-mnist", mirrors=[server.mirror("good")], log=Log())
    assert len(os.listdir(tmp_path / "datasets" / "fashion-mnist")) == 4


def test_unwritable_download_directory(tmp_path, monkeypatch, server):
    (tmp_path / "a-file").write_text("not a directory")
    monkeypatch.setenv("JAXCNN_DATA", str(tmp_path / "a-file" / "datasets"))
    with pytest.raises(DataError) as raised:
        load_dataset("fashion-mnist", mirrors=[server.mirror("good")])
    message = str(raised.value)
    assert "cannot write to the download directory" in message and "Set JAXCNN_DATA to a writable directory" in message
    assert server.requests == []
    log = Log()
    assert load_dataset("mnist", mirrors=[server.mirror("good")], log=log).name == OFFLINE_NAME
    assert "download failed: cannot write to" in log[0]


def test_mnist_fallback_with_downloaded_official_test_set(tmp_path, server, published):
    source, arrays = published
    (source / "train-images-idx3-ubyte.gz").rename(tmp_path / "elsewhere.gz")
    log = Log()
    dataset = load_dataset("mnist", mirrors=[server.mirror("good")], log=log)
    assert dataset.name == OFFLINE_NAME and len(dataset.train_labels) == 5000
    np.testing.assert_array_equal(dataset.test_labels, arrays["test_labels"])
    assert sum(line.startswith("downloaded ") for line in log) == 3
    assert "train-images-idx3-ubyte.gz not found, download failed: no mirror gave a valid file" in log[-1]


def test_download_is_placed_only_after_verification(tmp_path, server):
    destination = tmp_path / "placed"
    seen = []

    def verify(temporary: Path, url: str):
        assert temporary.parent == destination and temporary.name.endswith(".part")
        assert not (destination / "t10k-labels-idx1-ubyte.gz").exists()
        seen.append((url, temporary.stat().st_size))
        return read_idx(temporary)

    labels = Downloader([server.mirror("good")], log=Log()).fetch("t10k-labels-idx1-ubyte.gz", destination, verify)
    assert len(labels) == 10 and len(seen) == 1
    assert os.listdir(destination) == ["t10k-labels-idx1-ubyte.gz"]


# ---------------------------------------------------------------- preprocessing and shuffling


def test_preprocess_scales_to_unit_interval_nhwc():
    images = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    result = preprocess(images)
    assert result.dtype == np.float32 and result.shape == (1, 2, 2, 1)
    np.testing.assert_array_equal(result[0, :, :, 0], np.array([[0, 1], [0.2, 0.4]], np.float32))


def test_preprocess_normalisation():
    images = load_dataset(OFFLINE_NAME).train_images[:500]
    standardised = preprocess(images, normalize=True)
    assert abs(float(standardised.mean())) < 1e-4 and abs(float(standardised.std()) - 1) < 1e-4
    mean, std = pixel_statistics(images)
    reference = images.astype(np.float64) / 255
    assert mean == pytest.approx(reference.mean()) and std == pytest.approx(reference.std())
    np.testing.assert_allclose(
        preprocess(images, normalize=True, mean=0.1307, std=0.3081),
        ((images / 255 - 0.1307) / 0.3081)[..., None],
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize(
    ("images", "kwargs", "match"),
    [
        (np.zeros((2, 28, 28), np.float32), {}, "expected uint8 images"),
        (np.zeros((28, 28), np.uint8), {}, "expected uint8 images"),
        (np.zeros((2, 28, 28), np.uint8), {"mean": 0.5}, "only used with normalize=True"),
        (np.zeros((2, 28, 28), np.uint8), {"normalize": True}, "std must be positive"),
    ],
)
def test_preprocess_rejects_bad_arguments(images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        preprocess(images, **kwargs)


def test_epoch_permutation_is_deterministic_per_seed_and_epoch():
    first = epoch_permutation(0, 0, 1000)
    assert sorted(first.tolist()) == list(range(1000))
    np.testing.assert_array_equal(first, epoch_permutation(0, 0, 1000))
    assert not np.array_equal(first, epoch_permutation(0, 1, 1000))
    assert not np.array_equal(first, epoch_permutation(1, 0, 1000))
    assert epoch_permutation(3, 2, 0).shape == (0,)
    with pytest.raises(ValueError, match="non-negative"):
        epoch_permutation(-1, 0, 10)
