"""``--check-every``'s tolerance: held to its committed measurement, and a 0.1%-wrong backward is caught.

``experiments/check_tolerance.py`` measured how far correct float32 gradients (hand-written vs ``jax.grad``
of the same forward) drift apart along training for every zoo model, and what a backward 0.1% wrong in
one array looks like. The tolerance must lie between the two. Then real training runs of ``lenet5`` and
``small_cnn`` whose backward is wrong by 0.1% in a single array must stop at the first checked step, and
the same runs with the correct backward must not.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxcnn import data as jdata
from jaxcnn import fit
from jaxcnn.layers import Layer
from jaxcnn.models import MODELS
from jaxcnn.train import TrainingStopped
from jaxcnn.train.config import CHECK_TOLERANCE

RESULT = Path(__file__).resolve().parents[1] / "experiments" / "results" / "check_tolerance" / "check_tolerance.json"
MARGIN = 3.0  # the tolerance keeps at least this factor from both sides


@pytest.fixture(scope="module")
def measured():
    return {m["model"]: m for m in json.loads(RESULT.read_text())["models"]}


def test_every_zoo_model_was_measured_along_training(measured):
    assert set(measured) == set(MODELS)
    for m in measured.values():
        assert m["steps"] >= 200 and len(m["rows"]) >= 10
        assert m["batch"] == 64 and m["every"] == 20  # the script's defaults
        # The recorded maxima are those of the recorded rows.
        assert m["max"]["manual_vs_autodiff"] == max(max(r["manual_vs_autodiff"]) for r in m["rows"])


def test_tolerance_lies_between_correct_and_wrong_gradients(measured):
    worst_correct = max(m["max"]["manual_vs_autodiff"] for m in measured.values())
    assert CHECK_TOLERANCE >= MARGIN * worst_correct
    for name in ("lenet5", "small_cnn"):
        assert CHECK_TOLERANCE * MARGIN <= measured[name]["perturbed_min"]


def perturbed(model: Layer, factor: float) -> Layer:
    """``model`` whose backward returns the first parameter array's gradient times ``factor``."""

    def backward(params, residuals, dy):
        grads, dx = model.backward(params, residuals, dy)
        first = grads[0]
        return (dict(first, w=first["w"] * factor), *grads[1:]), dx

    return model._replace(backward=backward)


@pytest.fixture(scope="module")
def mnist():
    ds = jdata.load_dataset(jdata.OFFLINE_NAME, log=lambda s: None)
    return ds.train_images[:256], ds.train_labels[:256].astype(np.int32)


@pytest.mark.parametrize("name", ["lenet5", "small_cnn"])
def test_a_backward_wrong_by_a_tenth_of_a_percent_stops_training(mnist, name):
    spec = MODELS[name]
    settings = dict(epochs=1, batch_size=32, check_every=1, chunk_steps=2, log=lambda s: None, progress=False)
    with pytest.raises(TrainingStopped, match=r"gradient check failed at step 0 .*params\[0\]\['w'\]"):
        fit(perturbed(spec.build(), 1 + 1e-3), spec.loss, mnist, **settings)
    # The same run with the correct backward passes its checks.
    history = fit(spec.build(), spec.loss, mnist, **settings).history
    errors = history[0]["grad_check"]["max_relative_error"]
    assert history[0]["grad_check"]["steps"] == 8 and max(errors.values()) < CHECK_TOLERANCE / MARGIN
