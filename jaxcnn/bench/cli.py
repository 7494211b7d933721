"""``jaxcnn bench``'s command line: the parser and the command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxcnn import provenance
from jaxcnn.bench.config import (
    BATCH,
    CPU_EXTRA_OPTION_SETS,
    CPU_OPTION_SETS,
    MODELS,
    PEERS,
    SECTIONS,
    BenchConfig,
    BenchError,
)
from jaxcnn.bench.report import format_markdown
from jaxcnn.bench.suite import run_benchmarks

MAX_ROUNDS = 1000  # medians settle within tens of rounds; a thousand is already hours for the larger sections


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers ``jaxcnn bench`` on an ``argparse`` subparsers object."""
    p = sub.add_parser(
        "bench",
        help="benchmark hand-written vs autodiff gradients (and PyTorch/Flax when installed)",
        description="Time per-op formulations, whole train steps and whole epochs of the zoo models with "
        "hand-written and jax.grad gradients (the functions training runs), contenders alternated "
        "round by round; print markdown tables of medians and ratios and optionally write every "
        "figure, with the machine's CPU model and vector extensions, as JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"), help="JAX backend to run on")
    p.add_argument("--quick", action="store_true", help="small sizes and two rounds (a smoke test, not a measurement)")
    p.add_argument("--json", default=None, metavar="FILE", help="write every figure to this JSON file")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(BATCH), help="zoo models to benchmark")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS), help="what to run")
    p.add_argument(
        "--peers",
        nargs="*",
        default=list(PEERS),
        choices=list(PEERS),
        help="optional peers, used when installed (none: pass --peers with no value)",
    )
    p.add_argument(
        "--options",
        nargs="+",
        default=None,
        choices=[*CPU_OPTION_SETS, *CPU_EXTRA_OPTION_SETS],
        help=f"compile-option sets to try (default: {', '.join(CPU_OPTION_SETS)}, those this jaxlib supports; "
        f"{', '.join(CPU_EXTRA_OPTION_SETS)} only when named)",
    )
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per benchmark (default 9, --quick 2)")
    p.add_argument("--batch", type=int, default=None, help="one batch size for every model (default: per model)")


def run(args: argparse.Namespace) -> int:
    """Runs ``jaxcnn bench`` from parsed arguments; returns the exit status."""
    if args.rounds is not None and args.rounds < 1:
        raise BenchError(f"--rounds must be >= 1, got {args.rounds}")
    if args.rounds is not None and args.rounds > MAX_ROUNDS:
        raise BenchError(f"--rounds must be at most {MAX_ROUNDS}, got {args.rounds}")
    if args.batch is not None and args.batch < 1:
        raise BenchError(f"--batch must be >= 1, got {args.batch}")
    if args.json:
        parent = Path(args.json).resolve().parent
        if not parent.is_dir():
            raise BenchError(f"--json: directory {parent} does not exist")
    cfg = BenchConfig(
        device=args.device,
        quick=args.quick,
        models=tuple(args.models),
        sections=tuple(args.sections),
        peers=tuple(args.peers),
        option_sets=tuple(args.options) if args.options else None,
        rounds=args.rounds,
        batch=args.batch,
    )
    report = run_benchmarks(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_markdown(report))
    if args.json:
        provenance.write_json(args.json, report, nonfinite="null", indent=1)
    return 0
