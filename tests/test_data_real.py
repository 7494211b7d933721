"""Tests of jaxcnn.data on real data: the official MNIST files beside the repository, Debian's Fashion-MNIST.

The MNIST files (t10k images and labels, training labels) are read from ``../shared/data/mnist``
next to the repository, or from ``$JAXCNN_SHARED_DATA/mnist``; Fashion-MNIST from Debian's
``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``). Tests skip with a reason
when their files are absent. Nothing here reaches the network.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from jaxcnn.data import OFFLINE_NAME, DataError, catalog, files, load_dataset, read_idx, seed_task

pytestmark = pytest.mark.realdata

SHARED_DATA = Path(os.environ.get("JAXCNN_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
SHARED_MNIST = SHARED_DATA / "mnist"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
MNIST_TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte.gz")

needs_mnist = pytest.mark.skipif(
    not all((SHARED_MNIST / name).is_file() for name in MNIST_TEST_FILES),
    reason=f"the official MNIST files are not in {SHARED_MNIST} (set JAXCNN_SHARED_DATA to the shared data directory)",
)
needs_fashion = pytest.mark.skipif(
    not all((DEBIAN_FASHION / f"{stem}.gz").is_file() for stem in catalog.STANDARD_STEMS.values()),
    reason=f"Fashion-MNIST is not installed in {DEBIAN_FASHION} (apt-get install dataset-fashion-mnist)",
)

FIRST_20_TRAIN_LABELS = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4, 3, 5, 3, 6, 1, 7, 2, 8, 6, 9]
TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Own cache, no $JAXCNN_DATA, no system directories unless asked, mirrors that refuse connections."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("JAXCNN_DATA", raising=False)
    monkeypatch.delenv("JAXCNN_OFFLINE", raising=False)
    monkeypatch.setenv("JAXCNN_MIRRORS", f"http://127.0.0.1:{port}/")
    monkeypatch.setattr(files, "SYSTEM_DATASET_DIRS", (tmp_path / "system",))


class Log(list):
    def __call__(self, line: str) -> None:
        assert "\n" not in line
        self.append(line)


@needs_mnist
def test_mnist_training_label_facts():
    labels = read_idx(SHARED_MNIST / "train-labels-idx1-ubyte.gz")
    assert labels.dtype == np.uint8 and labels.shape == (60_000,)
    assert labels[:20].tolist() == FIRST_20_TRAIN_LABELS
    assert np.bincount(labels).tolist() == TRAIN_LABEL_COUNTS
    first_200 = labels[:200]
    assert int(np.sum(first_200 <= 4)) == 109 and int(np.sum(first_200 > 4)) == 91


@needs_mnist
def test_mnist_files_verify_against_both_checksum_tables():
    for role in ("test_images", "test_labels", "train_labels"):
        file_spec = catalog.MNIST.files[role]
        path = SHARED_MNIST / file_spec.filename
        assert hashlib.md5(path.read_bytes()).hexdigest() == file_spec.gzip_md5
        assert hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest() == file_spec.data_sha256
        files.load_verified(path, catalog.MNIST, file_spec)


@needs_mnist
def test_mnist_falls_back_to_bundled_training_and_the_official_test_set():
    log = Log()
    start = time.perf_counter()
    dataset = load_dataset("mnist", data_dir=SHARED_MNIST, download=False, log=log)
    elapsed = time.perf_counter() - start
    print(f"\nMNIST fallback (bundled 5,000 + official test set) loaded in {elapsed:.3f} s")
    assert dataset.name == OFFLINE_NAME
    assert dataset.train_images.shape == (5000, 28, 28) and dataset.test_images.shape == (10_000, 28, 28)
    assert dataset.test_images.dtype == np.uint8 and dataset.test_labels.dtype == np.uint8
    assert np.bincount(dataset.test_labels).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]
    assert len(log) == 1 and "train-images-idx3-ubyte.gz not found, downloads disabled" in log[0]
    assert f"official MNIST test set (10,000 images) from {SHARED_MNIST}" in dataset.source


@needs_mnist
def test_mnist_fallback_downloads_the_official_test_set_from_a_mirror(tmp_path):
    handler = functools.partial(QuietHandler, directory=str(SHARED_MNIST))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        log = Log()
        dataset = load_dataset("mnist", mirrors=[f"http://127.0.0.1:{httpd.server_address[1]}/"], log=log)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
    cache = tmp_path / "cache" / "jaxcnn" / "mnist"
    assert sorted(os.listdir(cache)) == sorted(MNIST_TEST_FILES)
    for name in MNIST_TEST_FILES:
        assert (cache / name).read_bytes() == (SHARED_MNIST / name).read_bytes()
    assert dataset.name == OFFLINE_NAME and len(dataset.test_labels) == 10_000
    assert "no mirror gave a valid file" in log[-1]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@needs_mnist
def test_seed_task_stand_in_when_training_images_are_missing():
    log = Log()
    images, labels, source = seed_task(data_dir=SHARED_MNIST, download=False, log=log)
    assert images.shape == (200, 28, 28) and labels.shape == (200,)
    assert int(labels.sum()) == 100 and source.startswith("stand-in") and len(log) == 1


@needs_mnist
def test_bundled_subset_is_disjoint_from_the_official_test_set():
    bundled = load_dataset(OFFLINE_NAME)
    test_images = read_idx(SHARED_MNIST / "t10k-images-idx3-ubyte.gz")
    test_keys = {image.tobytes() for image in test_images}
    for images in (bundled.train_images, bundled.test_images):
        assert not any(image.tobytes() in test_keys for image in images)


@needs_mnist
@needs_fashion
def test_a_misplaced_file_is_identified(tmp_path):
    directory = tmp_path / "mixed"
    directory.mkdir()
    (directory / "t10k-labels-idx1-ubyte.gz").write_bytes((DEBIAN_FASHION / "t10k-labels-idx1-ubyte.gz").read_bytes())
    with pytest.raises(DataError, match=r"this is Fashion-MNIST's t10k-labels-idx1-ubyte\.gz"):
        load_dataset("mnist", data_dir=directory, download=False)


@needs_fashion
def test_debian_fashion_mnist_verifies_by_content_and_loads(monkeypatch):
    for file_spec in catalog.FASHION_MNIST.files.values():
        debian_md5 = hashlib.md5((DEBIAN_FASHION / file_spec.filename).read_bytes()).hexdigest()
        assert debian_md5 != file_spec.gzip_md5, "Debian's copies are expected to be re-compressed"
    monkeypatch.setattr(files, "SYSTEM_DATASET_DIRS", (DEBIAN_FASHION.parent,))
    start = time.perf_counter()
    dataset = load_dataset("fashion-mnist", download=False)
    elapsed = time.perf_counter() - start
    print(f"\nFashion-MNIST (60,000 + 10,000) loaded and verified in {elapsed:.3f} s")
    assert dataset.name == "fashion-mnist" and dataset.source.endswith(f"from {DEBIAN_FASHION}")
    assert dataset.train_images.shape == (60_000, 28, 28) and dataset.test_images.shape == (10_000, 28, 28)
    assert dataset.train_images.dtype == np.uint8
    assert np.bincount(dataset.train_labels).tolist() == [6000] * 10
    assert np.bincount(dataset.test_labels).tolist() == [1000] * 10


@needs_fashion
def test_debian_fashion_mnist_as_a_plain_directory():
    dataset = load_dataset(str(DEBIAN_FASHION), train_limit=1000)
    assert dataset.name == str(DEBIAN_FASHION)
    assert dataset.train_images.shape == (1000, 28, 28) and len(dataset.test_labels) == 10_000
