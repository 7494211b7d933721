"""Experiment — jitted calls with and without the host allocator setting (``jaxcnn.host.keep_freed_memory``).

Two fresh processes, one per setting (the setting is process-wide and must precede the first computation),
each compiling the same functions and calling each one jitted, per call as a user's own loop does:
``small_cnn``'s per-example gradient norms (:func:`jaxcnn.gradients.per_example_grad_norms`) and its train
step (:func:`jaxcnn.train.train_step`, SGD with momentum), batch 128. Per function: the median milliseconds
and minor page faults per call (after warm-up calls), and the compiled temporary buffer's size.

    python experiments/host_allocator.py [--out DIR] [--smoke]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``experiments`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import common

NAME = "host_allocator"
SETTINGS = ("default", "keep")

# Run in a fresh process: argv = [setting, model, batch, warm-up calls, timed calls].
WORKER = """
import functools, json, resource, statistics, sys, time
from jaxcnn import host
setting, model_name, batch, warmup, calls = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
applied = host.keep_freed_memory() if setting == "keep" else False
import jax, optax
from jaxcnn import gradients
from jaxcnn.bench.per_example import _setup
from jaxcnn.train import step as train_step_module
spec, model, x, target, params, state = _setup(model_name, batch)
tx = optax.sgd(0.01, momentum=0.9)
step = train_step_module.make_step(model, spec.loss, tx)
key = jax.random.PRNGKey(0)
functions = {
    "per-example norms": (functools.partial(gradients.per_example_grad_norms, model, spec.loss),
                          (params, state, x, target)),
    "train step": (functools.partial(train_step_module.train_step, step),
                   (train_step_module.TrainState(params, state, tx.init(params)), x, target, key)),
}
out = {"applied": applied}
for name, (fn, args) in functions.items():
    compiled = jax.jit(fn).lower(*args).compile()
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    ms, faults = [], []
    for _ in range(calls):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        jax.block_until_ready(compiled(*args))
        ms.append((time.perf_counter() - t0) * 1e3)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    out[name] = {"median_ms": statistics.median(ms), "median_faults": statistics.median(faults),
                 "temp_mb": compiled.memory_analysis().temp_size_in_bytes / 1e6}
print(json.dumps(out))
"""


def measure(setting: str, model: str, batch: int, warmup: int, calls: int) -> dict:
    args = [sys.executable, "-c", WORKER, setting, model, str(batch), str(warmup), str(calls)]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(out_dir, *, smoke: bool = False, command_line: str | None = None, log=None) -> dict:
    log = log or common.logger(NAME)
    model, batch, warmup, calls = ("seed_net", 16, 2, 3) if smoke else ("small_cnn", 128, 12, 15)
    out = common.out_dir(out_dir)
    results = {}
    for setting in SETTINGS:
        log(f"{setting}: {model}, batch {batch}, {calls} timed calls after {warmup}")
        results[setting] = measure(setting, model, batch, warmup, calls)
    summary = {
        "experiment": NAME,
        "environment": common.environment(command_line or f"host_allocator.run(smoke={smoke})"),
        "model": model,
        "batch": batch,
        "warmup_calls": warmup,
        "timed_calls": calls,
        "results": results,
    }
    common.write_json(out / f"{NAME}.json", summary)
    (out / f"{NAME}.md").write_text(report(summary))
    return summary


def report(s: dict) -> str:
    default, keep = s["results"]["default"], s["results"]["keep"]
    functions = [k for k in default if k != "applied"]
    rows = [
        (
            f,
            f"{default[f]['temp_mb']:.1f}",
            f"{default[f]['median_ms']:.1f}",
            f"{default[f]['median_faults']:.0f}",
            f"{keep[f]['median_ms']:.1f}",
            f"{keep[f]['median_faults']:.0f}",
            f"{keep[f]['median_ms'] / default[f]['median_ms']:.2f}",
        )
        for f in functions
    ]
    env = s["environment"]
    return (
        f"# Jitted calls and the host allocator ({s['model']}, batch {s['batch']})\n\n"
        f"One process per setting; median of {s['timed_calls']} calls after {s['warmup_calls']} warm-up calls. "
        f"`keep`: `jaxcnn.host.keep_freed_memory()` (applied: {keep['applied']}).\n\n"
        + common.markdown_table(
            ["function", "temp MB", "default ms", "default faults/call", "keep ms", "keep faults/call", "keep/default"],
            rows,
            "lrrrrrr",
        )
        + f"\nMachine: {env['cpu']} ({env['cpu_count']} cores), jax {env['jax']}. Command: `{env['command']}`.\n"
    )


def main(argv=None) -> int:
    args = common.base_parser(NAME, __doc__.splitlines()[0]).parse_args(argv)
    run(args.out, smoke=args.smoke, command_line=common.command_line(NAME, argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
