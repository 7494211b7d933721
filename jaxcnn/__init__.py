"""jaxcnn: convolutional-network building blocks for JAX with hand-written, verified backward passes."""

__version__ = "0.1.0"
