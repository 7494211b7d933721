"""``jaxcnn train``: a zoo preset on a named dataset, trained through :func:`jaxcnn.fit`."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from jaxcnn import data as jdata
from jaxcnn.models import get_model
from jaxcnn.train.config import ConfigError, TrainConfig
from jaxcnn.train.loop import FitResult, train_arrays


def train_and_evaluate(
    config: TrainConfig,
    workdir: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    dataset: jdata.Dataset | None = None,
    log: Callable[[str], None] = print,
    progress: bool | None = None,
    recipe: str | None = None,
) -> FitResult:
    """Trains the zoo preset ``config.model`` (built with ``config.conv_method``) on ``config.dataset``
    (or on ``dataset`` when given) and evaluates it every ``config.eval_every`` epochs; see :func:`jaxcnn.fit`.
    ``recipe`` names the recipe ``config`` was resolved from (:mod:`jaxcnn.train.recipes`), for ``config.json``.

    ``train_limit`` balances its subset over the digit labels, not the preset's targets (so ``seed_net``'s
    binary task still sees every digit).
    """
    config.validate()
    try:
        spec = get_model(config.model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if dataset is None:
        dataset = jdata.load_dataset(config.dataset, data_dir=config.data_dir, download=not config.offline, log=log)
    train = (dataset.train_images, np.asarray(spec.targets(dataset.train_labels)))
    test = (dataset.test_images, np.asarray(spec.targets(dataset.test_labels)))
    return train_arrays(
        spec.build(conv_method=config.conv_method),
        spec.loss,
        train,
        test,
        config,
        out=workdir,
        resume=resume,
        log=log,
        progress=progress,
        source=dataset.source,
        classes=dataset.train_labels,
        recipe=recipe,
    )
