"""Experiment — DP-SGD with the hand-written per-example rules: accuracy against the privacy spent.

``lenet5`` (no BatchNorm, so every example's gradient is its own) is trained on the full Fashion-MNIST
(60,000 training images, the official 10,000 test images) by the library's training loop with DP-SGD:
each example's gradient clipped to L2 norm ``C`` by the hand-written per-example norms
(:func:`jaxcnn.gradients.value_and_clipped_grad_sum`), Gaussian noise of std ``sigma * C`` added to the
sum, and the epsilon spent at ``delta = 1e-5`` computed after every epoch by the RDP accountant of
``dp-accounting`` (Poisson subsampling at rate batch/N assumed; :mod:`jaxcnn.train.privacy`).

The recipe is not tuned on the test set: it is TensorFlow Privacy's MNIST tutorial recipe (clip 1, noise
multiplier 1.1, plain SGD) with a larger batch (512) and SGD momentum, fixed before the run, and the test
set is evaluated once per epoch for the curve. 30 epochs at these settings spend epsilon about 2.7.

It is the same run as

    jaxcnn train --model lenet5 --dataset fashion-mnist --batch-size 512 --epochs 30 --lr 0.1 \\
        --dp-clip 1 --dp-noise-multiplier 1.1 --dp-delta 1e-5

Writes ``dp_sgd.json`` (per-epoch accuracy, loss and epsilon, the config, the provenance), ``dp_sgd.md``
and ``dp_sgd.png`` (test accuracy against epsilon and against wall time).

    python experiments/dp_sgd.py [--out DIR] [--smoke] [--epochs N]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``experiments`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import common
from jaxcnn.train import TrainConfig, train_and_evaluate

NAME = "dp_sgd"
RECIPE = dict(
    model="lenet5",
    dataset="fashion-mnist",
    batch_size=512,
    epochs=30,
    lr=0.1,
    dp_clip=1.0,
    dp_noise_multiplier=1.1,
    dp_delta=1e-5,
)
SMOKE = dict(dataset="mnist-offline", train_limit=256, epochs=1, batch_size=64)


def command(settings: dict) -> str:
    """The ``jaxcnn train`` command that runs ``settings``."""
    flags = [
        f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"
        for k, v in settings.items()
    ]
    return "jaxcnn train " + " ".join(flags)


def run(out_dir, *, smoke: bool = False, command_line: str | None = None, log=None, **overrides) -> dict:
    log = log or common.logger(NAME)
    settings = {**RECIPE, **(SMOKE if smoke else {}), **overrides}
    config = TrainConfig(**settings)
    out = common.out_dir(out_dir)
    env = common.environment(command_line or f"dp_sgd.run(smoke={smoke}, {overrides})")
    history = train_and_evaluate(config, log=log, progress=False).history
    summary = {
        "experiment": NAME,
        "environment": env,
        "config": config.to_json(),
        "jaxcnn_train": command(settings),
        "accountant": "RDP (dp-accounting), Poisson subsampling at rate batch/N",
        "history": history,
    }
    common.write_json(out / f"{NAME}.json", summary)
    (out / f"{NAME}.md").write_text(report(summary))
    plot(summary, out, log)
    return summary


def report(s: dict) -> str:
    final = s["history"][-1]
    rows = [
        (
            h["epoch"],
            f"{h['dp_epsilon']:.2f}",
            f"{h['test_accuracy']:.4f}",
            f"{h['train_loss']:.4f}",
            f"{h['wall_s']:.0f}",
        )
        for h in s["history"]
    ]
    return (
        f"# DP-SGD on {s['config']['dataset']} ({s['config']['model']})\n\n"
        f"Final test accuracy **{final['test_accuracy']:.4f}** at epsilon **{final['dp_epsilon']:.2f}** "
        f"(delta {final['dp_delta']:g}; {s['accountant']}), {final['wall_s']:.0f} s.\n\n"
        f"Command: `{s['jaxcnn_train']}`\n\n"
        + common.markdown_table(["epoch", "epsilon", "test accuracy", "train loss", "wall s"], rows, "rrrrr")
        + f"\nMachine: {s['environment']['cpu']} ({s['environment']['cpu_count']} cores), "
        f"jax {s['environment']['jax']}.\n"
    )


def plot(s: dict, out: Path, log) -> None:
    plt = common.pyplot(log)
    if plt is None:
        return
    h = s["history"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot([r["dp_epsilon"] for r in h], [r["test_accuracy"] for r in h], "o-", color=common.COLORS["manual"])
    a.set_xlabel(f"epsilon (delta {h[-1]['dp_delta']:g})")
    a.set_ylabel("test accuracy")
    a.set_title(f"DP-SGD, {s['config']['model']} on {s['config']['dataset']}")
    b.plot([r["wall_s"] for r in h], [r["test_accuracy"] for r in h], "o-", color=common.COLORS["manual"])
    b.set_xlabel("wall time (s)")
    b.set_title(
        f"clip {s['config']['dp_clip']:g}, noise {s['config']['dp_noise_multiplier']:g}, "
        f"batch {s['config']['batch_size']}"
    )
    common.save_figure(fig, out / f"{NAME}.png", log)


def main(argv=None) -> int:
    parser = common.base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    args = parser.parse_args(argv)
    overrides = {"seed": args.seed} | ({"epochs": args.epochs} if args.epochs else {})
    run(args.out, smoke=args.smoke, command_line=common.command_line(NAME, argv), **overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
