"""``jaxcnn bench``: how fast the hand-written backward passes are, against ``jax.grad`` and optional peers.

Everything runs in one process (the scaling section's simulated devices aside), and every contender
times the functions training runs. Sections (``--sections``):

* ``peak``: the float32 peak programs of :mod:`jaxcnn.bench.peak` on their own (an FMA-throughput
  microbenchmark, and a large matmul in XLA under each compile-option set, in NumPy and in PyTorch). The
  same programs also run in every round of the ``steps`` benchmarks, and a step's fraction of peak is taken
  against their best round by round, so that machine load cancels out.
* ``ops``: each op of the zoo models at its real shape: conv forward, conv ``dx`` and ``dw`` in every
  formulation of :mod:`jaxcnn.ops.conv` against ``jax.vjp``, pooling and dense backward against
  ``jax.vjp``; standalone and inside ``lax.scan``.
* ``steps``: :func:`jaxcnn.train.step.train_step` per model for each gradient route, jitted and called per
  step from Python (``loop``) and as :func:`jaxcnn.train.loop.run_steps`, the ``lax.scan`` training runs
  (``scan``), under every compile-option set (each record's ``training_options`` says whether its set is the
  training loop's). Contender families: ``manual`` (the hand-written backward),
  ``autodiff`` (``jax.grad`` of the lax forward an autodiff user writes; what ``--grad autodiff`` trains),
  ``autodiff_same_forward`` (``jax.grad`` of the manual route's own forward), and the peers ``flax``,
  ``torch`` and ``torch.compile`` when installed. The headline ratio ``manual/best_autodiff`` compares the
  best manual contender with the fastest of ``autodiff``, ``autodiff_same_forward`` and ``flax``; the
  per-family ratios stand beside it, and ``manual[scan]/...`` and ``manual[loop]/...`` give the step as
  training configures it, in each structure, against the best of each. Records carry the achieved GFLOP/s
  (FLOPs counted analytically), the fraction of the measured peak and XLA's compiled memory analysis of the
  program.
* ``epoch``: images/s of :meth:`jaxcnn.train.Trainer.train_chunk` over one epoch, chunk by chunk as
  :func:`jaxcnn.fit` runs it, for the ``manual`` and ``autodiff`` routes in each loop form of
  ``jaxcnn train --loop`` (``scan``: a ``lax.scan`` per chunk; ``step``: a compiled call per step), and
  :func:`jaxcnn.fit` itself with the same settings, alternating epoch by epoch with the benchmark's.
* ``scaling``: images/s of that epoch with the batch sharded over meshes of 1, 2, 4 and 8 devices
  (simulated CPU devices in a child process on the CPU; the real devices on a GPU machine).

``--json FILE`` writes every figure: ``results`` (one record per benchmark and contender, with
``benchmark``, ``contender``, ``family``, ``status``, ``median_ms``...), ``ratios`` (benchmark ->
``{"manual/best_autodiff": ..., "manual/autodiff": ..., "manual/torch": ..., "memory manual/best_autodiff":
...}``), ``targets``, ``peak_gflops``, ``flops_per_image``, the machine (CPU model and vector extensions
included, see :mod:`jaxcnn.provenance`) and the versions.

Modules: :mod:`~jaxcnn.bench.config` (settings), :mod:`~jaxcnn.bench.harness` (timing and ratios),
:mod:`~jaxcnn.bench.flops`, :mod:`~jaxcnn.bench.peak`, :mod:`~jaxcnn.bench.per_op` and
:mod:`~jaxcnn.bench.sections` (what is timed),
:mod:`~jaxcnn.bench.peers` and :mod:`~jaxcnn.bench.peers_torch` (Flax and PyTorch),
:mod:`~jaxcnn.bench.report` (targets, markdown), :mod:`~jaxcnn.bench.suite` (one run),
:mod:`~jaxcnn.bench.cli` (the command).
"""

from jaxcnn.bench.cli import add_parser, run
from jaxcnn.bench.config import (
    BASELINES,
    BATCH,
    CPU_EXTRA_OPTION_SETS,
    CPU_OPTION_SETS,
    FAMILIES,
    LR,
    MODELS,
    PEERS,
    ROUTES,
    SCALING_DEVICES,
    SCHEMA_VERSION,
    SECTIONS,
    BenchConfig,
    BenchError,
)
from jaxcnn.bench.flops import layer_flops, model_flops
from jaxcnn.bench.harness import (
    Contender,
    best_of,
    family_ratios,
    headline_ratios,
    measure,
    memory_ratios,
    option_sets,
    round_ratio,
    training_ratios,
)
from jaxcnn.bench.peak import add_peak_fractions
from jaxcnn.bench.report import evaluate_targets, format_markdown, to_json
from jaxcnn.bench.suite import run_benchmarks

__all__ = [
    "BASELINES",
    "BATCH",
    "CPU_EXTRA_OPTION_SETS",
    "CPU_OPTION_SETS",
    "FAMILIES",
    "LR",
    "MODELS",
    "PEERS",
    "ROUTES",
    "SCALING_DEVICES",
    "SCHEMA_VERSION",
    "SECTIONS",
    "BenchConfig",
    "BenchError",
    "Contender",
    "add_parser",
    "add_peak_fractions",
    "best_of",
    "evaluate_targets",
    "family_ratios",
    "format_markdown",
    "headline_ratios",
    "layer_flops",
    "measure",
    "memory_ratios",
    "model_flops",
    "option_sets",
    "round_ratio",
    "run",
    "run_benchmarks",
    "to_json",
    "training_ratios",
]
