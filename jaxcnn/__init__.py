"""jaxcnn: convolutional-network building blocks for JAX with hand-written, verified backward passes.

``jaxcnn.fit(model, loss, (images, targets), test)`` trains any network built from :mod:`jaxcnn.layers`;
``jaxcnn.load_checkpoint(out_dir)`` loads what a run saved, for ``jaxcnn.evaluate`` and ``jaxcnn.predict``
(:mod:`jaxcnn.inference`);
:mod:`jaxcnn.ops` holds the ops and their backward passes, :mod:`jaxcnn.gradients` the gradient routes,
:mod:`jaxcnn.models` the zoo presets, :mod:`jaxcnn.train` the train step and loop.
"""

__version__ = "0.1.0"

from jaxcnn.inference import (
    Checkpoint,
    Evaluation,
    Prediction,
    evaluate,
    from_fit,
    load_checkpoint,
    predict,
)
from jaxcnn.train import FitResult, TrainConfig, fit

__all__ = [
    "Checkpoint",
    "Evaluation",
    "FitResult",
    "Prediction",
    "TrainConfig",
    "__version__",
    "evaluate",
    "fit",
    "from_fit",
    "load_checkpoint",
    "predict",
]
