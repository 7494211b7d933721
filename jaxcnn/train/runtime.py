"""Where a run executes: the device mesh, placing host arrays on it, XLA options, signals, progress."""

from __future__ import annotations

import functools
import signal

import numpy as np

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcnn.train.config import ConfigError

# XLA:CPU options for the training step, chosen by measurement (``jaxcnn bench``, docs/benchmarks.md):
# the experimental YNNPACK fusions slowed every zoo model's step, so they are switched off when this
# jaxlib knows the option (an unknown option name is an error, so it is checked first).
CPU_COMPILER_OPTIONS: dict[str, str | bool] = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def default_compiler_options() -> dict:
    """:data:`CPU_COMPILER_OPTIONS` when the default backend is the CPU and this jaxlib accepts them, else ``{}``."""
    if jax.default_backend() != "cpu":
        return {}
    try:
        jax.jit(lambda a: a + 1).lower(jnp.zeros((2,), jnp.float32)).compile(compiler_options=CPU_COMPILER_OPTIONS)
    except Exception:
        return {}
    return dict(CPU_COMPILER_OPTIONS)


def host(x) -> np.ndarray:
    """The value of a replicated (or single-device) array as NumPy, also when other processes hold copies."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


class Placement:
    """A 1-D mesh with axis ``"data"`` over the first ``devices`` devices (all by default; across processes
    after :func:`jax.distributed.initialize`), and how arrays are laid out on it.

    Data parallelism: every batch is split along its examples over ``"data"`` while parameters, optimiser
    state and the (small) datasets are replicated. The step is the single-device program with sharding
    annotations: XLA partitions it and adds the all-reduces that the batch contractions need (in
    ``dw = patchesᵀ @ dy``, the loss mean, BatchNorm's batch statistics), so a step on ``D`` devices
    computes the same numbers as on one, up to the order of floating-point additions. Chosen over
    ``shard_map`` with an explicit ``lax.pmean`` of the gradients because it keeps the hand-written backward
    unchanged and BatchNorm's statistics global.
    """

    def __init__(self, devices: int | None = None):
        available = jax.devices()
        count = len(available) if devices is None else devices
        if count > len(available):
            raise ConfigError(
                f"--devices {count} but only {len(available)} device(s) are available ({available[0].platform})"
            )
        self.mesh = Mesh(np.array(available[:count]), ("data",))
        self.size = self.mesh.size
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharded = NamedSharding(self.mesh, P(None, "data"))  # (steps, B, ...): B over devices
        self.rows_sharded = NamedSharding(self.mesh, P("data"))  # (B, ...): B over devices

    def put(self, tree, sharding=None):
        """Puts host values (the same on every process) on the mesh, replicated unless ``sharding`` says otherwise."""
        sharding = sharding or self.replicated

        def put(a):
            a = host(a)
            return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

        return jax.tree_util.tree_map(put, tree)


class Interrupt:
    """Turns SIGINT/SIGTERM into a flag checked between chunks; restores the previous handlers on exit."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar of ``total`` steps, or ``None`` when disabled."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)
