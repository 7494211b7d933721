"""What ``jaxcnn bench`` runs: the models, sections, contender families and compile options, and
:class:`BenchConfig`, one run's settings."""

from __future__ import annotations

import dataclasses

SCHEMA_VERSION = 2  # of the --json report; 2: autodiff and autodiff_same_forward families, best-baseline ratios
MODELS = ("seed_net", "lenet5", "small_cnn")  # the zoo models benchmarked by default
BATCH = {"seed_net": 200, "lenet5": 128, "small_cnn": 128}  # the batch sizes of the reference measurements
SECTIONS = ("peak", "ops", "steps", "epoch", "scaling", "per_example")  # what --sections chooses from, in run order
SCALING_DEVICES = (1, 2, 4, 8)  # data-parallel mesh sizes of the scaling section
PEERS = ("torch", "torch.compile", "flax")  # optional peers, timed when installed
# The gradient routes of jaxcnn.gradients timed in the steps section, each its own contender family:
# "autodiff" is jax.grad of the lax forward an autodiff user writes (what `--grad autodiff` trains),
# "autodiff_same_forward" jax.grad of the very forward the manual route runs.
ROUTES = ("manual", "autodiff", "autodiff_same_forward")
# The families the hand-written backward is measured against; the headline ratio takes the fastest of them.
BASELINES = ("autodiff", "autodiff_same_forward", "flax")
# Every contender family a step benchmark can report.
FAMILIES = (*ROUTES, "flax", "torch", "torch.compile")
LR = 0.05  # SGD with momentum 0.9, the training default; the same for every contender and peer

# Compile-option sets tried on CPU. Each is checked against this jaxlib before use (unknown option names
# are rejected by XLA), so a set that this version lacks is skipped with a note, never silently ignored.
CPU_OPTION_SETS = {
    "default": {},
    "no-ynn": {"xla_cpu_experimental_ynn_fusion_type": ""},
}
_NO_YNN = CPU_OPTION_SETS["no-ynn"]
_DOT_AND_CONV = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
# Sets timed only when --options names them: XLA:CPU's other kernel libraries for its dots and
# convolutions (oneDNN, XNNPACK), each on top of "no-ynn", the training loop's options.
CPU_EXTRA_OPTION_SETS = {
    "no-ynn+onednn": {**_NO_YNN, "xla_cpu_experimental_onednn_fusion_type": _DOT_AND_CONV},
    "no-ynn+xnn": {**_NO_YNN, "xla_cpu_experimental_xnn_fusion_type": _DOT_AND_CONV},
}


class BenchError(ValueError):
    """A benchmark setting that cannot work (e.g. ``--device gpu`` without a GPU)."""


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to run. ``None`` fields take their full-run default, or the smaller ``quick`` value."""

    device: str = "cpu"
    quick: bool = False
    models: tuple[str, ...] = MODELS
    sections: tuple[str, ...] = SECTIONS
    peers: tuple[str, ...] = PEERS
    option_sets: tuple[str, ...] | None = None  # from CPU_(EXTRA_)OPTION_SETS; None: CPU_OPTION_SETS
    rounds: int | None = None  # timed rounds per benchmark (full 9, quick 2)
    sample_s: float | None = None  # target length of one timed sample (full 0.25 s, quick 0.01 s)
    batch: int | None = None  # overrides every model's batch (quick: 16)
    scan_steps: int | None = None  # steps per call of the scan and loop step contenders (full 8, quick 2)
    epoch_examples: int | None = None  # training examples in the epoch benchmark (full: all 4,000)
    prune: float = 3.0  # drop a contender after warm-up when this many times slower than its family's best
    torch_threads: int = 2

    def resolved(self) -> BenchConfig:
        q = self.quick
        return dataclasses.replace(
            self,
            rounds=self.rounds or (2 if q else 9),
            sample_s=self.sample_s or (0.01 if q else 0.25),
            scan_steps=self.scan_steps or (2 if q else 8),
            epoch_examples=self.epoch_examples or (64 if q else None),
            batch=self.batch or (16 if q else None),
            option_sets=self.option_sets or (("default",) if q else None),
        )

    def batch_of(self, model: str) -> int:
        return self.batch or BATCH.get(model, 128)
