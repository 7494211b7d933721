"""The ``jaxcnn`` command: ``train``, ``gradcheck`` and ``bench``.

Problems a user can fix (missing data, a bad flag value, an existing checkpoint) print one line to
stderr and exit with status 2; a stopped run (non-finite loss, failed gradient check) exits with 1;
SIGINT/SIGTERM save a checkpoint and exit with 130/143.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from jaxcnn.bench import BenchError
from jaxcnn.bench import add_parser as add_bench_parser
from jaxcnn.bench import run as run_bench


def _train_parser(sub) -> None:
    from jaxcnn.models import MODELS
    from jaxcnn.train.config import add_flags

    p = sub.add_parser(
        "train", help="train a zoo preset on MNIST-format data",
        description="Train a zoo preset with hand-written (or autodiff) gradients and an optax optimiser, through "
                    "jaxcnn.fit. Without arguments: small_cnn on MNIST, the full set when it is cached or "
                    "downloadable, otherwise the bundled offline subset of real MNIST.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_flags(p, choices={"model": MODELS})
    p.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"), metavar="HOST:PORT",
                   help="multi-process run: address of process 0's coordinator (env JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"), metavar="N",
                   help="multi-process run: number of processes (env JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"), metavar="I",
                   help="multi-process run: this process's index, 0..N-1 (env JAX_PROCESS_ID); only process 0 writes")
    p.add_argument("--out", default=None, help="directory for config.json, metrics.jsonl and checkpoint.npz")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--progress", default="auto", choices=("auto", "on", "off"),
                   help="progress bar (auto: only when stderr is a terminal)")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def _init_distributed(args) -> None:
    """Joins a multi-process run (``jax.distributed.initialize``) when a coordinator is given."""
    from jaxcnn.train import ConfigError

    if args.coordinator is None:
        if args.num_processes not in (None, 1) or args.process_id not in (None, 0):
            raise ConfigError("--num-processes/--process-id need --coordinator HOST:PORT (or JAX_COORDINATOR_ADDRESS)")
        return
    if args.num_processes is None or args.process_id is None:
        raise ConfigError("--coordinator needs --num-processes and --process-id (or JAX_NUM_PROCESSES and JAX_PROCESS_ID)")
    if not 0 <= args.process_id < args.num_processes:
        raise ConfigError(f"--process-id must be in 0..{args.num_processes - 1}, got {args.process_id}")
    import jax

    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)


def _run_train(args) -> int:
    import signal

    from jaxcnn.train import ConfigError, Interrupted, TrainingStopped, train_and_evaluate
    from jaxcnn.train.config import from_flags

    _init_distributed(args)
    if args.resume and not args.out:
        raise ConfigError("--resume needs --out DIR (the directory holding the checkpoint)")
    config = from_flags(args)
    progress = {"auto": None, "on": True, "off": False}[args.progress]
    try:
        history = train_and_evaluate(config, args.out, resume=args.resume, progress=progress,
                                     log=lambda s: print(s, flush=True)).history
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return 128 + e.signum if e.signum in (signal.SIGINT, signal.SIGTERM) else 1
    except TrainingStopped as e:
        print(f"jaxcnn train: {e}", file=sys.stderr)
        return 1
    import jax

    final = history[-1] if history else None
    if final and jax.process_index() == 0:
        epochs = f"{final['epoch']} epoch" + ("s" if final["epoch"] != 1 else "")
        print(f"final test accuracy {final['test_accuracy']:.4f} after {epochs} ({final['wall_s']:.1f} s)")
    return 0


def _gradcheck_parser(sub) -> None:
    from jaxcnn.models import MODELS

    p = sub.add_parser(
        "gradcheck", help="three-way gradient check of a zoo model, layer by layer",
        description="For every layer of a zoo model and for the whole model with its loss, compare the "
                    "hand-written backward with jax.vjp and with central finite differences (float64), and "
                    "check the adjoint identity. Exits 1 on a disagreement beyond the dtype's tolerance.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="small_cnn", choices=list(MODELS))
    p.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    p.add_argument("--batch", type=int, default=2, help="examples in the random test batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def _run_gradcheck(args) -> int:
    from jaxcnn.modelcheck import check_model

    results = check_model(args.model, dtype=args.dtype, batch=args.batch, seed=args.seed)
    for r in results:
        print(r.table())
        print()
    failed = [r.name for r in results if not r.ok]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if args.json:
        Path(args.json).write_text(json.dumps([
            {"name": r.name, "dtype": r.dtype, "ok": r.ok, "adjoint": r.adjoint,
             "rows": [row._asdict() for row in r.rows]} for r in results], indent=2))
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jaxcnn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _gradcheck_parser(sub)
    add_bench_parser(sub)
    args = parser.parse_args(argv)

    from jaxcnn.data import DataError
    from jaxcnn.train import ConfigError

    try:
        if args.command == "train":
            return _run_train(args)
        if args.command == "bench":
            return run_bench(args)
        return _run_gradcheck(args)
    except (DataError, ConfigError, BenchError) as e:
        print(f"jaxcnn {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxcnn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
