"""jaxcnn: convolutional-network building blocks for JAX with hand-written, verified backward passes.

``jaxcnn.fit(model, loss, (images, targets), test)`` trains any network built from :mod:`jaxcnn.layers`;
:mod:`jaxcnn.ops` holds the ops and their backward passes, :mod:`jaxcnn.gradients` the gradient routes,
:mod:`jaxcnn.models` the zoo presets, :mod:`jaxcnn.train` the train step and loop.
"""

__version__ = "0.1.0"

from jaxcnn.train import FitResult, TrainConfig, fit  # noqa: E402

__all__ = ["FitResult", "TrainConfig", "__version__", "fit"]
