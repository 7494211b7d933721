"""Experiment — the formulations of two convolution gradients, and the "auto" rules that pick one.

* **Per-example kernel gradient** (:func:`jaxcnn.per_example.conv2d_per_example_grads`): ``"im2col"`` (the
  channel-major patch matrix, one batched product of ``kh·kw·Cg`` rows per example) against ``"taps"``
  (``kh·kw`` products of ``Cg`` rows). ``method="auto"``: :func:`jaxcnn.per_example.conv2d_grads_method`.
* **Input gradient** (:func:`jaxcnn.ops.conv2d_backward`'s ``dx``): ``"taps"``, ``"im2col"`` (one product and
  a separable ``col2im``) and ``"conv"`` (XLA's convolution), each called on its own and inside an 8-step
  ``lax.scan`` (how the training loop runs it). ``method="auto"``: :func:`jaxcnn.ops.conv.resolve_method`.

For each convolution shape (the zoo's, and others spanning 1 to 48 input channels per group, strides, 1x1,
grouped and depthwise), every formulation is jitted with the training loop's compile options, checked to
agree, and timed alternately; a row is "ok" when the "auto" pick is the fastest or within :data:`WITHIN` of it.

    python experiments/conv_formulations.py [--out DIR] [--smoke]
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

if __package__ in (None, ""):  # run as a script: make ``experiments`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import common

NAME = "conv_formulations"
WITHIN = 1.2  # "auto" may pick a formulation up to this factor slower than the fastest
SCAN_STEPS = 8
INPUT_GRAD_METHODS = ("taps", "im2col", "conv")


class Shape(NamedTuple):
    """One convolution: input ``size x size x channels``, ``outputs`` features, square kernel."""

    label: str
    size: int
    channels: int
    outputs: int
    kernel: int
    padding: int = 0
    stride: int = 1
    groups: int = 1


_SHAPES = {
    s.label: s
    for s in (
        Shape("seed_net conv", 28, 1, 3, 5),
        Shape("lenet5 conv1", 28, 1, 6, 5, padding=2),
        Shape("lenet5 conv2", 14, 6, 16, 5),
        Shape("small_cnn conv1", 28, 1, 32, 3, padding=1),
        Shape("small_cnn conv2", 14, 32, 64, 3, padding=1),
        Shape("fast_cnn conv1", 28, 1, 24, 5, padding=2),
        Shape("fast_cnn conv2", 14, 24, 48, 3, padding=1),
        Shape("fast_cnn conv3", 7, 48, 96, 3, padding=1),
        Shape("resnet_small 32 -> 32", 28, 32, 32, 3, padding=1),
        Shape("resnet_small 32 -> 64, stride 2", 28, 32, 64, 3, padding=1, stride=2),
        Shape("resnet_small 1x1 projection, stride 2", 28, 32, 64, 1, stride=2),
        Shape("1 -> 6, 5x5", 28, 1, 6, 5, padding=2),
        Shape("1 -> 8, 5x5", 28, 1, 8, 5, padding=2),
        Shape("1 -> 12, 3x3", 28, 1, 12, 3, padding=1),
        Shape("1 -> 16, 3x3", 28, 1, 16, 3, padding=1),
        Shape("3 -> 16, 3x3", 28, 3, 16, 3, padding=1),
        Shape("4 -> 4, 3x3", 14, 4, 4, 3, padding=1),
        Shape("6 -> 16, 5x5 SAME", 14, 6, 16, 5, padding=2),
        Shape("6 -> 16, 3x3, stride 2", 14, 6, 16, 3, padding=1, stride=2),
        Shape("8 -> 8, 3x3", 14, 8, 8, 3, padding=1),
        Shape("8 -> 32, 3x3", 14, 8, 32, 3, padding=1),
        Shape("16 -> 4, 3x3", 14, 16, 4, 3, padding=1),
        Shape("16 -> 16, 3x3", 14, 16, 16, 3, padding=1),
        Shape("6 -> 12, 3 groups", 14, 6, 12, 3, padding=1, groups=3),
        Shape("12 -> 12, 4 groups", 14, 12, 12, 3, padding=1, groups=4),
        Shape("16 -> 32, 2 groups", 14, 16, 32, 3, padding=1, groups=2),
        Shape("32 -> 32, 4 groups", 14, 32, 32, 3, padding=1, groups=4),
        Shape("depthwise 32 channels", 14, 32, 32, 3, padding=1, groups=32),
    )
}
PER_EXAMPLE_SHAPES = tuple(
    _SHAPES[label]
    for label in (
        "seed_net conv",
        "lenet5 conv1",
        "lenet5 conv2",
        "small_cnn conv1",
        "small_cnn conv2",
        "fast_cnn conv1",
        "fast_cnn conv2",
        "fast_cnn conv3",
        "1 -> 8, 5x5",
        "1 -> 12, 3x3",
        "1 -> 16, 3x3",
        "3 -> 16, 3x3",
        "8 -> 8, 3x3",
        "16 -> 16, 3x3",
        "resnet_small 32 -> 32",
        "resnet_small 32 -> 64, stride 2",
        "resnet_small 1x1 projection, stride 2",
        "depthwise 32 channels",
    )
)
# Layers whose input gradient a network computes (a first layer's is never needed), and others.
INPUT_GRAD_SHAPES = tuple(
    _SHAPES[label]
    for label in (
        "lenet5 conv2",
        "small_cnn conv2",
        "fast_cnn conv2",
        "fast_cnn conv3",
        "resnet_small 32 -> 32",
        "resnet_small 32 -> 64, stride 2",
        "resnet_small 1x1 projection, stride 2",
        "6 -> 16, 5x5 SAME",
        "6 -> 16, 3x3, stride 2",
        "3 -> 16, 3x3",
        "4 -> 4, 3x3",
        "8 -> 8, 3x3",
        "8 -> 32, 3x3",
        "16 -> 4, 3x3",
        "16 -> 16, 3x3",
        "1 -> 6, 5x5",
        "6 -> 12, 3 groups",
        "12 -> 12, 4 groups",
        "16 -> 32, 2 groups",
        "32 -> 32, 4 groups",
        "depthwise 32 channels",
    )
)
SMOKE_PER_EXAMPLE_SHAPES = (
    Shape("1 -> 3, 3x3", 6, 1, 3, 3),
    Shape("4 -> 4, 3x3, 2 groups", 6, 4, 4, 3, padding=1, groups=2),
)
SMOKE_INPUT_GRAD_SHAPES = (Shape("3 -> 4, 3x3", 6, 3, 4, 3, padding=1), Shape("12 -> 4, 3x3", 6, 12, 4, 3))


def _operands(s: Shape, batch: int):
    import jax
    import jax.numpy as jnp

    out_size = (s.size + 2 * s.padding - s.kernel) // s.stride + 1
    kx, kdy, kw = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (batch, s.size, s.size, s.channels), jnp.float32)
    dy = jax.random.normal(kdy, (batch, out_size, out_size, s.outputs), jnp.float32)
    w = jax.random.normal(kw, (s.kernel, s.kernel, s.channels // s.groups, s.outputs), jnp.float32)
    return out_size, x, dy, w


def _time(compiled: dict, args: tuple, rounds: int, calls: int, per_call: dict | None = None) -> dict:
    """Median ms per call of each compiled function (divided by ``per_call[name]`` units), alternated."""

    def run(fn):
        for _ in range(calls):
            out = fn(*args)
        common.block(out)

    times = common.interleaved_times({m: functools.partial(run, fn) for m, fn in compiled.items()}, rounds)
    per_call = per_call or {}
    return {m: np.asarray(t) * 1e3 / calls / per_call.get(m, 1) for m, t in times.items()}


def _relative_diff(results: dict) -> float:
    values = list(results.values())
    scale = float(np.abs(values[0]).max())
    return max(float(np.abs(v - values[0]).max()) / scale for v in values[1:])


def _verdict(times: dict, auto: str) -> dict:
    """The "auto" pick's median per-round time over the fastest formulation's, and whether it is within WITHIN."""
    medians = {m: float(np.median(t)) for m, t in times.items()}
    fastest = min(medians, key=medians.__getitem__)
    over = float(np.median(times[auto] / times[fastest]))
    return {"median_ms": medians, "fastest": fastest, "auto_over_fastest": over, "ok": over <= WITHIN}


def measure_per_example(shape: Shape, batch: int, rounds: int, calls: int) -> dict:
    """Both per-example kernel gradient formulations at ``shape``."""
    import jax

    from jaxcnn import per_example
    from jaxcnn.train import default_compiler_options

    s = shape
    out_size, x, dy, w = _operands(s, batch)
    hyper = dict(stride=s.stride, padding=s.padding, groups=s.groups)
    compiled = {
        method: jax.jit(functools.partial(per_example.conv2d_per_example_grads, w=w, method=method, **hyper))
        .lower(dy, x)
        .compile(compiler_options=default_compiler_options())
        for method in per_example.GRADS_FORMULATIONS
    }
    diff = _relative_diff({m: np.asarray(fn(dy, x)[0]) for m, fn in compiled.items()})
    auto = per_example.conv2d_grads_method(s.channels, s.outputs)
    times = _time(compiled, (dy, x), rounds, calls)
    return {**s._asdict(), "output": out_size, "auto": auto, "max_rel_diff": diff, **_verdict(times, auto)}


def measure_input_grad(shape: Shape, batch: int, rounds: int, calls: int) -> dict:
    """The three input gradient formulations at ``shape``, alone and inside an 8-step ``lax.scan``."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from jaxcnn import ops
    from jaxcnn.ops import conv as conv_module
    from jaxcnn.train import default_compiler_options

    s = shape
    out_size, x, dy, w = _operands(s, batch)

    def input_grad(method, dy, w):
        return ops.conv2d_backward(dy, x, w, stride=s.stride, padding=s.padding, groups=s.groups, method=method)[0]

    def scanned(method, dy, w):
        def body(carry, _):  # each step's cotangent depends on the last step's result, as in training
            dx = input_grad(method, dy + carry, w)
            return carry + 0 * dx[0, 0, 0, 0], None

        return lax.scan(body, jnp.zeros((), dy.dtype), None, length=SCAN_STEPS)[0]

    def compile_all(fn):
        return {
            m: jax.jit(functools.partial(fn, m)).lower(dy, w).compile(compiler_options=default_compiler_options())
            for m in INPUT_GRAD_METHODS
        }

    alone, in_scan = compile_all(input_grad), compile_all(scanned)
    diff = _relative_diff({m: np.asarray(fn(dy, w)) for m, fn in alone.items()})
    auto = conv_module.resolve_method("input_grad", w.shape, s.groups, strided=s.stride != 1)
    steps = dict.fromkeys(INPUT_GRAD_METHODS, SCAN_STEPS)
    return {
        **s._asdict(),
        "output": out_size,
        "auto": auto,
        "max_rel_diff": diff,
        "alone": _verdict(_time(alone, (dy, w), rounds, calls), auto),
        "scan": _verdict(_time(in_scan, (dy, w), rounds, 1, steps), auto),
    }


def run(out_dir, *, smoke: bool = False, command_line: str | None = None, log=None) -> dict:
    log = log or common.logger(NAME)
    if smoke:
        shapes, batch, rounds, calls = (SMOKE_PER_EXAMPLE_SHAPES, SMOKE_INPUT_GRAD_SHAPES), 4, 2, 1
    else:
        shapes, batch, rounds, calls = (PER_EXAMPLE_SHAPES, INPUT_GRAD_SHAPES), 128, 9, 3
    out = common.out_dir(out_dir)
    per_example_rows, input_grad_rows = [], []
    for shape in shapes[0]:
        row = measure_per_example(shape, batch, rounds, calls)
        log(f"per-example kernel gradient, {shape.label}: {_ms(row)}, auto {row['auto']}")
        per_example_rows.append(row)
    for shape in shapes[1]:
        row = measure_input_grad(shape, batch, rounds, calls)
        log(f"input gradient, {shape.label}: {_ms(row['alone'])}; in scan {_ms(row['scan'])}; auto {row['auto']}")
        input_grad_rows.append(row)
    summary = {
        "experiment": NAME,
        "environment": common.environment(command_line or f"conv_formulations.run(smoke={smoke})"),
        "batch": batch,
        "rounds": rounds,
        "calls_per_sample": calls,
        "scan_steps": SCAN_STEPS,
        "within": WITHIN,
        "per_example": per_example_rows,
        "input_grad": input_grad_rows,
    }
    common.write_json(out / f"{NAME}.json", summary)
    (out / f"{NAME}.md").write_text(report(summary))
    return summary


def _ms(verdict: dict) -> str:
    return ", ".join(f"{m} {ms:.2f} ms" for m, ms in verdict["median_ms"].items())


def _describe(r: dict) -> tuple[str, str]:
    shape = f"{r['size']}x{r['size']}x{r['channels']} -> {r['output']}x{r['output']}x{r['outputs']}"
    return shape, f"{r['kernel']}x{r['kernel']}, stride {r['stride']}, groups {r['groups']}"


def _ok(v: dict) -> str:
    return f"{v['auto_over_fastest']:.2f}" + ("" if v["ok"] else " **no**")


def report(s: dict) -> str:
    pe_rows = [
        (r["label"], *_describe(r), *(f"{r['median_ms'][m]:.2f}" for m in ("taps", "im2col")), r["auto"], _ok(r))
        for r in s["per_example"]
    ]
    dx_rows = [
        (
            r["label"],
            *_describe(r),
            *(f"{r['alone']['median_ms'][m]:.2f}" for m in INPUT_GRAD_METHODS),
            *(f"{r['scan']['median_ms'][m]:.2f}" for m in INPUT_GRAD_METHODS),
            r["auto"],
            _ok(r["alone"]),
            _ok(r["scan"]),
        )
        for r in s["input_grad"]
    ]
    env = s["environment"]
    within = s["within"]
    return (
        f'# Convolution gradient formulations and the "auto" rules (batch {s["batch"]})\n\n'
        f"Every formulation jitted with the training loop's compile options; {s['rounds']} alternated rounds of "
        f"{s['calls_per_sample']} calls (the scanned input gradient: one call of {s['scan_steps']} steps, per "
        f'step). "auto / fastest": the median per-round ratio of the "auto" pick\'s time to the fastest '
        f"formulation's; **no** above {within}.\n\n"
        "## Per-example kernel gradient (`per_example.conv2d_per_example_grads`)\n\n"
        + common.markdown_table(
            ["convolution", "shape", "kernel", "taps ms", "im2col ms", "auto", "auto / fastest"], pe_rows, "lllrrll"
        )
        + "\n## Input gradient (`ops.conv2d_backward`)\n\n"
        + common.markdown_table(
            [
                "convolution",
                "shape",
                "kernel",
                "taps ms",
                "im2col ms",
                "conv ms",
                "taps ms, scan",
                "im2col ms, scan",
                "conv ms, scan",
                "auto",
                "auto / fastest",
                "auto / fastest, scan",
            ],
            dx_rows,
            "lllrrrrrrlll",
        )
        + f"\nMachine: {env['cpu']} ({env['cpu_count']} cores; {', '.join(env['cpu_vector_extensions'])}), "
        f"jax {env['jax']}. Command: `{env['command']}`.\n"
    )


def main(argv=None) -> int:
    args = common.base_parser(NAME, __doc__.splitlines()[0]).parse_args(argv)
    if not args.smoke:
        from jaxcnn import host

        host.keep_freed_memory()  # as the jaxcnn command runs: large buffers stay mapped between calls
    run(args.out, smoke=args.smoke, command_line=common.command_line(NAME, argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
