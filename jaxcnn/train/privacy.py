"""The privacy of a DP-SGD run: the epsilon its steps have spent at a given delta.

DP-SGD (Abadi et al. 2016) clips each example's gradient to L2 norm ``C`` (``dp_clip``), sums the clipped
gradients, adds Gaussian noise of standard deviation ``sigma * C`` (``sigma`` = ``dp_noise_multiplier``) and
divides by the batch size; :func:`jaxcnn.train.step.train_step` does this with the hand-written per-example
rules (:func:`jaxcnn.gradients.value_and_clipped_grad_sum`).

Accounting: the Rényi-DP accountant of Google's ``dp-accounting`` library (the one TensorFlow Privacy and
the JAX DP-SGD examples use), for a Poisson-subsampled Gaussian mechanism at sampling rate ``q = B / N``,
composed once per step. The training loop draws fixed-size batches from a fresh shuffle every epoch, not
Poisson samples; like TensorFlow Privacy's MNIST tutorial, the epsilon reported here is the one the Poisson
analysis gives for that rate, the customary estimate for shuffled batches rather than a proof for them.
"""

from __future__ import annotations

import math

from jaxcnn.train.config import ConfigError

ACCOUNTANT = "RDP (dp-accounting), Poisson subsampling at rate batch/N"


def epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """The epsilon spent by ``steps`` DP-SGD steps at ``delta`` (``inf`` without noise, 0 before any step).

    Args:
      noise_multiplier: ``sigma``, the noise's standard deviation in units of the clipping norm.
      sample_rate: ``q = batch_size / N``, in ``(0, 1]``.
      steps: the number of noisy steps taken.
      delta: the ``delta`` of ``(epsilon, delta)``-DP, in ``(0, 1)``.
    """
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    try:
        import dp_accounting
        from dp_accounting import rdp
    except ImportError:
        raise ConfigError(
            "privacy accounting of --dp-noise-multiplier needs the dp-accounting package: pip install 'jaxcnn[dp]'"
        ) from None
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), steps
    )
    accountant = rdp.RdpAccountant()
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))
