"""The ``jaxcnn`` command: ``train``, ``evaluate``, ``predict``, ``gradcheck`` and ``bench``.

``train`` writes a run (``config.json``, ``metrics.jsonl``, ``checkpoint.npz``) to ``--out``; ``evaluate``
scores that checkpoint on a test set and ``predict`` classifies PNG, ``.npy`` and IDX image files with it
(:mod:`jaxcnn.inference_cli`). ``jaxcnn --version`` prints the version.

Every failure a user can cause prints one line to stderr, never a traceback: a problem the user can fix
(missing data, a bad flag value, an existing or unreadable checkpoint, an unreadable file) exits with
status 2, as do argparse's usage errors; a stopped run (non-finite loss, failed gradient check, the device
out of memory) exits with 1; SIGINT/SIGTERM save a checkpoint and exit with 130/143.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from jaxcnn import __version__
from jaxcnn.bench import BenchError
from jaxcnn.bench import add_parser as add_bench_parser
from jaxcnn.bench import run as run_bench

GRADCHECK_MAX_BATCH = 256  # finite differences in float64 over every parameter: a larger batch adds only time


def _train_parser(sub) -> None:
    from jaxcnn.models import MODELS
    from jaxcnn.train.config import add_flags
    from jaxcnn.train.recipes import DEFAULT_RECIPE, RECIPES, describe

    p = sub.add_parser(
        "train",
        help="train a zoo preset on MNIST-format data",
        description="Train a zoo preset with hand-written (or autodiff) gradients and an optax optimiser, through "
        f"jaxcnn.fit. Without arguments: the recipe {DEFAULT_RECIPE} on MNIST, the full set when it is cached or "
        "downloadable, otherwise the bundled offline subset of real MNIST.",
        epilog="recipes (flags given explicitly override a recipe's settings; the other defaults shown are "
        "those of no recipe): " + "; ".join(describe(r) for r in RECIPES.values()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--recipe",
        default=DEFAULT_RECIPE,
        choices=list(RECIPES),
        help="named partial configuration (listed below); explicit flags override it",
    )
    add_flags(p, choices={"model": MODELS})
    p.add_argument(
        "--coordinator",
        default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
        metavar="HOST:PORT",
        help="multi-process run: address of process 0's coordinator (env JAX_COORDINATOR_ADDRESS)",
    )
    p.add_argument(
        "--num-processes",
        type=int,
        default=_env_int("JAX_NUM_PROCESSES"),
        metavar="N",
        help="multi-process run: number of processes (env JAX_NUM_PROCESSES)",
    )
    p.add_argument(
        "--process-id",
        type=int,
        default=_env_int("JAX_PROCESS_ID"),
        metavar="I",
        help="multi-process run: this process's index, 0..N-1 (env JAX_PROCESS_ID); only process 0 writes",
    )
    p.add_argument("--out", default=None, help="directory for config.json, metrics.jsonl and checkpoint.npz")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument(
        "--progress",
        default="auto",
        choices=("auto", "on", "off"),
        help="progress bar (auto: only when stderr is a terminal)",
    )


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
        raise ConfigError(
            "--coordinator needs --num-processes and --process-id (or JAX_NUM_PROCESSES and JAX_PROCESS_ID)"
        )
    if not 0 <= args.process_id < args.num_processes:
        raise ConfigError(f"--process-id must be in 0..{args.num_processes - 1}, got {args.process_id}")
    host, _, port = args.coordinator.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"--coordinator must be HOST:PORT with a port in 1..65535, got {args.coordinator!r}")
    import jax

    try:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    except (RuntimeError, ValueError) as e:  # XLA's errors are RuntimeErrors
        raise ConfigError(
            f"--coordinator {args.coordinator}: cannot join the run "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None


def _run_train(args) -> int:
    import signal

    from jaxcnn.train import ConfigError, Interrupted, TrainingStopped, train_and_evaluate
    from jaxcnn.train.config import explicit_settings
    from jaxcnn.train.recipes import resolve

    _init_distributed(args)
    if args.resume and not args.out:
        raise ConfigError("--resume needs --out DIR (the directory holding the checkpoint)")
    config = resolve(args.recipe, explicit_settings(args))
    progress = {"auto": None, "on": True, "off": False}[args.progress]
    try:
        history = train_and_evaluate(
            config,
            args.out,
            resume=args.resume,
            progress=progress,
            log=lambda s: print(s, flush=True),
            recipe=args.recipe,
        ).history
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
        "gradcheck",
        help="three-way gradient check of a zoo model, layer by layer",
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
    from jaxcnn.train import ConfigError

    if not 1 <= args.batch <= GRADCHECK_MAX_BATCH:
        raise ConfigError(f"--batch must be between 1 and {GRADCHECK_MAX_BATCH}, got {args.batch}")
    if not 0 <= args.seed < 2**63:
        raise ConfigError(f"--seed must be an integer in 0..2**63-1, got {args.seed}")
    results = check_model(args.model, dtype=args.dtype, batch=args.batch, seed=args.seed)
    for r in results:
        print(r.table())
        print()
    failed = [r.name for r in results if not r.ok]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                [
                    {
                        "name": r.name,
                        "dtype": r.dtype,
                        "ok": r.ok,
                        "adjoint": r.adjoint,
                        "rows": [row._asdict() for row in r.rows],
                    }
                    for r in results
                ],
                indent=2,
            )
        )
    return 1 if failed else 0


def _out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the device (or host) running out of memory: XLA's ``RESOURCE_EXHAUSTED``."""
    if isinstance(error, MemoryError):
        return True
    message = str(error)
    return "RESOURCE_EXHAUSTED" in message or "Out of memory" in message or "out of memory" in message


_BATCH_HINT = {
    "train": "--batch-size / --eval-batch-size",
    "evaluate": "--eval-batch-size",
    "predict": "--eval-batch-size",
    "gradcheck": "--batch",
    "bench": "--batch",
}


def _batch_flags(args) -> str:
    """The batch-size flags of a command as given (for the out-of-memory line)."""
    flags = [
        f"--{name.replace('_', '-')} {getattr(args, name)}"
        for name in ("batch_size", "eval_batch_size", "batch")
        if getattr(args, name, None) is not None
    ]
    return ", ".join(flags) if flags else "default batch sizes"


def _os_error(error: OSError) -> str:
    where = error.filename if error.filename is not None else ""
    return f"{where}: {error.strerror}" if where and error.strerror else str(error)


def main(argv=None) -> int:
    from jaxcnn.inference_cli import add_parsers as add_inference_parsers
    from jaxcnn.inference_cli import run_evaluate, run_predict

    parser = argparse.ArgumentParser(prog="jaxcnn", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"jaxcnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    add_inference_parsers(sub)
    _gradcheck_parser(sub)
    add_bench_parser(sub)
    if argv is None:  # the jaxcnn command owns its process; main([...]) called from Python leaves the caller's alone
        from jaxcnn import host

        host.configure_command()
    argv = sys.argv[1:] if argv is None else list(argv)
    if any("\0" in str(a) for a in argv):  # only possible from Python: a C argv cannot hold NUL
        print("jaxcnn: arguments cannot contain NUL characters", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)

    from jaxcnn.data import DataError
    from jaxcnn.train import ConfigError

    commands = {
        "train": _run_train,
        "evaluate": run_evaluate,
        "predict": run_predict,
        "gradcheck": _run_gradcheck,
        "bench": run_bench,
    }
    name = f"jaxcnn {args.command}"
    try:
        return commands[args.command](args)
    except (DataError, ConfigError, BenchError) as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{name}: {_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not _out_of_memory(e):
            raise
        print(
            f"{name}: out of memory ({_batch_flags(args)}): {str(e).splitlines()[0][:200]}; "
            f"lower {_BATCH_HINT[args.command]}",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
