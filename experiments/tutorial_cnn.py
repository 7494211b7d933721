"""Experiment 1 — the tutorial CNN (seed 003), trained three ways.

The network of seed 003 (``seed_net``: conv 3 filters 5x5 VALID, sigmoid, flatten, dense 1, sigmoid,
MSE) learns the tutorial's binary task (200 MNIST images, label "digit > 4") by plain full-batch gradient
descent, as the tutorial does, along two trajectories from the same initialisation:

* **manual**: jit-compiled forward and the library's hand-written backward passes;
* **autodiff**: jit-compiled ``jax.value_and_grad`` of the very same forward pass (route
  ``"autodiff_same_forward"``: same formulation, same rounding), the correctness witness.

At every step of the manual trajectory the autodiff gradient is also taken at the *same* parameters, so
the per-parameter gradient difference is measured without the two trajectories' rounding drift; so is a
second witness, the ``"autodiff"`` route: ``jax.grad`` of the forward pass an autodiff user writes
(``lax`` convolutions), which computes the same function in another formulation.

Beside them runs a NumPy version written the way the tutorial writes it — its patch list, its
image/filter/patch loops and its tap/image loops for the filter gradient — with the tutorial's slips
mended (see :class:`TutorialNumpyCNN`). It starts from the same parameters; its gradient is compared
with the jitted one at the same point (float64) and its first steps with the jitted trajectory. Then the
jitted steps (manual in float32 and float64, and ``jax.grad`` of each forward pass) are timed per training
step, in one process, in alternation, and the medians compared; the ``lax``-forward ``jax.grad`` step is
the fair baseline, the one an autodiff user would write.

Writes ``tutorial_cnn.md`` (summary tables), ``tutorial_cnn.json`` (everything, with provenance),
``tutorial_cnn_steps.csv`` (per-step losses, accuracies and gradient differences) and three figures.

    python experiments/tutorial_cnn.py [--out DIR] [--smoke] [--steps N] [--lr LR]
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``experiments`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

import jax
import jax.numpy as jnp

from experiments import common
from jaxcnn import data as jdata
from jaxcnn.gradients import value_and_grad
from jaxcnn.models import get_model

NAME = "tutorial_cnn"
# The two jax.grad steps timed: of the lax forward pass (what an autodiff user writes), and of the very forward
# pass the manual step runs.
AUTODIFF_LAX = "jitted autodiff, lax forward (float32)"
AUTODIFF_SAME = "jitted autodiff, same forward (float32)"


@dataclasses.dataclass(frozen=True)
class Config:
    steps: int = 1000  # full-batch gradient-descent steps of each jitted trajectory
    lr: float = 0.05  # plain gradient descent; larger rates oscillate (all 1,728 dense inputs are positive)
    n_images: int = 200  # the tutorial's 200 images
    numpy_steps: int = 5  # steps of the NumPy version compared with the jitted trajectory
    timing_rounds: int = 30  # alternating rounds of the jitted contenders
    numpy_timing_rounds: int = 5  # rounds that include the (slow) NumPy contender
    test_set: bool = True  # also report accuracy on the official test set's "digit > 4" task
    offline: bool = False  # never download MNIST files the loader does not find
    seed: int = 0


SMOKE = dict(steps=6, n_images=16, numpy_steps=2, timing_rounds=3, numpy_timing_rounds=1, test_set=False)


def make_config(smoke: bool = False, **overrides) -> Config:
    return Config(**{**(SMOKE if smoke else {}), **overrides})


# ---------------------------------------------------------------------------------------------------
# The tutorial's NumPy network, mended


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _derivatives_sigmoid(x):  # the tutorial's name: the derivative written in terms of the output
    return x * (1 - x)


class TutorialNumpyCNN:
    """Seed 003's NumPy CNN, in its own style (patch list, explicit loops), with its slips mended.

    Kept from the tutorial: the patch list ``new_image`` of shape ``(N, 576, 5, 5)`` built once by
    image/row/column loops; the forward loop over images, filters and patches; the ``(N, 3, 576)``
    filter outputs flattened filter-major into ``(1728, N)``; ``Z2 = woᵀ · A1``; the sigmoid derivative
    written from the output (``x (1 - x)``); the filter gradient as a loop over filters, taps and images
    correlating ``X`` with the error; plain gradient descent ``p = p - lr * dE/dp``.

    Mended (these slips are why the tutorial's code does not compute the gradient of its own loss):

    * the filter gradient correlates each image ``X_l`` with *that image's* error ``δ_l`` of filter ``i``
      (the tutorial indexes the error's filter axis with the image index ``l`` and averages the error
      over images before correlating);
    * the error reaching the filter outputs is multiplied by the sigmoid derivative ``A1 (1 - A1)``
      (computed but never used in the tutorial) and reshaped per image as ``(N, 3, 24, 24)``, the layout
      the forward pass produced (``np.resize`` to ``(24, 24, 3)`` mixes filters and positions);
    * the loss is the mean ``½ mean((O - y)²)`` (the library's ``mse``), so every gradient carries one
      ``1/N`` and the filter gradient is not divided by ``N`` a second time.

    Made to compute exactly ``jaxcnn.models.seed_net``: biases on the filters and the output neuron (the
    tutorial leaves the bias as an exercise); no standardisation of ``Z2`` over the batch (the tutorial's
    forward does it, but its backward never differentiates through it); each image is used as stored
    (``X[:, :, k]`` is image ``k``; the tutorial's ``X = x_train.T`` also transposes every image).
    """

    def __init__(self, f, b_conv, wo, b_out):
        self.f = np.array(f, np.float64)  # (5, 5, 3): the tutorial's filter layout
        self.b_conv = np.array(b_conv, np.float64)  # (3,)
        self.wo = np.array(wo, np.float64)  # (1728, 1), rows filter-major: k * 576 + patch
        self.b_out = np.array(b_out, np.float64).reshape(1, 1)

    # Conversions from/to the library's seed_net params ((conv {w (5,5,1,3), b}), ..., (dense {w (1728,1), b})).
    @classmethod
    def from_params(cls, params) -> TutorialNumpyCNN:
        conv, dense = params[0], params[3]
        w = np.asarray(conv["w"], np.float64)[:, :, 0, :]
        n_filters = w.shape[2]
        # seed_net flattens (24, 24, 3) position-major (p * 3 + k); the tutorial filter-major (k * 576 + p).
        wo = np.asarray(dense["w"], np.float64).reshape(-1, n_filters).T.reshape(-1, 1)
        return cls(w, np.asarray(conv["b"]), wo, np.asarray(dense["b"]))

    def grads_as_params(self, grads):
        """The NumPy gradients in the layout of seed_net's params (for comparison with JAX)."""
        d_f, d_b_conv, d_wo, d_b_out = grads
        n_filters = d_f.shape[2]
        return (
            {"b": d_b_conv, "w": d_f[:, :, None, :]},
            {},
            {},
            {"b": d_b_out.reshape(1), "w": d_wo.reshape(n_filters, -1).T.reshape(-1, 1)},
            {},
        )

    @staticmethod
    def patches(X, fh: int, fw: int):
        """``X (28, 28, N)`` -> ``new_image (N, 576, fh, fw)``: the tutorial's create_patches loop."""
        new_image = []
        for k in range(X.shape[2]):  # for number of images
            for i in range(X.shape[0] - fh + 1):  # sliding down
                for j in range(X.shape[1] - fw + 1):  # sliding across
                    new_image.append(X[:, :, k][i : i + fh, j : j + fw])
        new_image = np.array(new_image)
        return new_image.reshape(X.shape[2], -1, fh, fw)

    def forward(self, new_image):
        f = self.f
        filter_output = []
        for i in range(len(new_image)):  # for each image
            for k in range(f.shape[2]):  # apply each filter
                for j in range(new_image.shape[1]):  # to each patch
                    filter_output.append((new_image[i][j] * f[:, :, k]).sum() + self.b_conv[k])
        filter_output = np.array(filter_output).reshape(len(new_image), f.shape[2], new_image.shape[1])
        filter_output_sigmoid = _sigmoid(filter_output)  # A1: (N, 3, 576)
        a1 = filter_output_sigmoid.reshape(len(new_image), -1).T  # (1728, N), filter-major
        output_layer_input = np.dot(self.wo.T, a1) + self.b_out  # Z2: (1, N)
        output = _sigmoid(output_layer_input)  # O: (1, N)
        return filter_output_sigmoid, a1, output

    def loss_and_grads(self, new_image, X, y):
        """``E = ½ mean((y - O)²)`` and ``(dE/df, dE/db_conv, dE/dwo, dE/db_out)``; ``y`` is ``(1, N)``."""
        f = self.f
        n = len(new_image)
        s_row, s_col = X.shape[0] - f.shape[0] + 1, X.shape[1] - f.shape[1] + 1
        filter_output_sigmoid, a1, output = self.forward(new_image)
        error = np.square(y - output) / 2
        # fully connected layer
        error_wrt_output = -(y - output) / n  # mean over the batch
        output_wrt_output_layer_input = _derivatives_sigmoid(output)
        delta = error_wrt_output * output_wrt_output_layer_input  # dE/dZ2: (1, N)
        delta_error_fcp = np.dot(a1, delta.T)  # dE/dwo: (1728, N) @ (N, 1), summed over the batch
        d_b_out = delta.sum()
        # convolution layer
        error_wrt_filter_output_sigmoid = np.dot(self.wo, delta)  # dE/dA1: (1728, N)
        error_wrt_filter_output = (
            error_wrt_filter_output_sigmoid.T.reshape(filter_output_sigmoid.shape)
            * _derivatives_sigmoid(filter_output_sigmoid)
        ).reshape(n, f.shape[2], s_row, s_col)  # dE/dZ1: (N, 3, 24, 24)
        filter_update = np.zeros_like(f)
        for i in range(f.shape[2]):  # for each filter
            for j in range(f.shape[0]):  # for each tap row
                for k in range(f.shape[1]):  # and column
                    temp = 0.0
                    for l in range(X.shape[2]):  # for each image
                        temp = temp + (X[j : j + s_row, k : k + s_col, l] * error_wrt_filter_output[l, i]).sum()
                    filter_update[j, k, i] = temp
        d_b_conv = error_wrt_filter_output.sum(axis=(0, 2, 3))
        return float(error.mean()), (filter_update, d_b_conv, delta_error_fcp, d_b_out), output

    def step(self, new_image, X, y, lr: float):
        """One gradient-descent step; returns the loss and the outputs before the update."""
        loss, (d_f, d_b_conv, d_wo, d_b_out), output = self.loss_and_grads(new_image, X, y)
        self.f = self.f - lr * d_f
        self.b_conv = self.b_conv - lr * d_b_conv
        self.wo = self.wo - lr * d_wo
        self.b_out = self.b_out - lr * d_b_out
        return loss, output


# ---------------------------------------------------------------------------------------------------
# The jitted contenders


def _leaf_names(model, params) -> list[str]:
    names = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        layer = model.children[path[0].idx]
        names.append(f"{layer.name.split('(')[0].lower()}.{path[1].key}")
    return names


def _max_rel(a, b) -> float:
    """``max|a - b| / max|b|`` in float64 NumPy."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _state(params):
    return tuple({} for _ in params)  # seed_net's layers keep no state


class Contenders:
    """The jit-compiled functions of one dtype: a step of each gradient path, both steps at once, the loss.

    ``autodiff`` is the correctness witness (``jax.grad`` of the same forward pass); ``autodiff_lax`` the
    route an autodiff user writes (``jax.grad`` of the ``lax`` forward pass)."""

    def __init__(self, model, spec, x, y, lr: float):
        manual = value_and_grad(model, spec.loss, "manual")
        autodiff = value_and_grad(model, spec.loss, "autodiff_same_forward")
        autodiff_lax = value_and_grad(model, spec.loss, "autodiff")

        def accuracy(pred):
            return jnp.mean(spec.loss.correct(pred, y))

        def descend(p, g):
            return jax.tree_util.tree_map(lambda a, b: a - lr * b, p, g)

        def step_of(vg):
            def step(p):
                (loss, _), g = vg(p, _state(p), x, y)
                return descend(p, g), loss

            return jax.jit(step)

        def both(pm, pa):
            """A step of each trajectory, and both autodiff gradients at the manual trajectory's point."""
            (loss_m, (pred_m, _)), gm = manual(pm, _state(pm), x, y)
            (_, _), ga_same = autodiff(pm, _state(pm), x, y)
            (_, _), ga_lax = autodiff_lax(pm, _state(pm), x, y)
            (loss_a, (pred_a, _)), ga = autodiff(pa, _state(pa), x, y)
            return (
                descend(pm, gm),
                descend(pa, ga),
                loss_m,
                loss_a,
                accuracy(pred_m),
                accuracy(pred_a),
                gm,
                ga_same,
                ga_lax,
            )

        def evaluate(p):
            (loss, (pred, _)), _ = manual(p, _state(p), x, y)
            return loss, accuracy(pred)

        self.manual_step, self.autodiff_step = step_of(manual), step_of(autodiff)
        self.autodiff_lax_step = step_of(autodiff_lax)
        self.both = jax.jit(both)
        self.evaluate = jax.jit(evaluate)
        self.autodiff_grad = jax.jit(lambda p: autodiff(p, _state(p), x, y)[1])
        self.manual_grad = jax.jit(lambda p: manual(p, _state(p), x, y)[1])


def _as(tree, dtype):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), tree)


# ---------------------------------------------------------------------------------------------------


def run(out_dir, *, smoke: bool = False, command: str | None = None, log=None, **overrides) -> dict:
    """Runs the experiment, writes its files into ``out_dir`` and returns the summary dict."""
    config = make_config(smoke, **overrides)
    log = log or common.logger(NAME)
    out = common.out_dir(out_dir)
    env = common.environment(command or f"tutorial_cnn.run(smoke={smoke}, {overrides})")
    spec = get_model("seed_net")
    model = spec.build()

    data_dir = common.shared_mnist_dir()
    images, labels, source = jdata.seed_task(data_dir=data_dir, download=not config.offline, log=log)
    images, labels = images[: config.n_images], labels[: config.n_images]
    log(f"data: {len(labels)} images ({int(labels.sum())} digits > 4), {source}")
    pixels = np.asarray(images, np.float64)[..., None] / 255.0  # (N, 28, 28, 1), the tutorial's X / 255
    x32, y32 = jnp.asarray(pixels, jnp.float32), jnp.asarray(labels, jnp.float32)[:, None]
    params0, _, _ = model.init(jax.random.PRNGKey(config.seed), spec.input_shape)
    params0 = _as(params0, jnp.float32)
    names = _leaf_names(model, params0)
    n_params = sum(a.size for a in jax.tree_util.tree_leaves(params0))
    log(
        f"seed_net: {n_params:,} parameters ("
        + ", ".join(f"{n} {tuple(a.shape)}" for n, a in zip(names, jax.tree_util.tree_leaves(params0), strict=True))
        + ")"
    )
    f32 = Contenders(model, spec, x32, y32, config.lr)
    with jax.enable_x64(True):
        x64, y64 = jnp.asarray(pixels, jnp.float64), jnp.asarray(labels, jnp.float64)[:, None]
        f64 = Contenders(model, spec, x64, y64, config.lr)

    def reference_grads(p):
        """jax.grad in float64 at the (float32) point ``p``: the yardstick for both float32 paths."""
        with jax.enable_x64(True):
            return jax.tree_util.tree_leaves(f64.autodiff_grad(_as(p, jnp.float64)))

    # -- 1. the two jitted trajectories ------------------------------------------------------------
    pm = pa = params0
    rows = []
    t0 = time.perf_counter()
    every = max(config.steps // 10, 1)
    for step in range(config.steps):
        exact = reference_grads(pm)
        pm_next, pa, loss_m, loss_a, acc_m, acc_a, gm, ga, gl = f32.both(pm, pa)
        row = {
            "step": step,
            "loss_manual": float(loss_m),
            "loss_autodiff": float(loss_a),
            "accuracy_manual": float(acc_m),
            "accuracy_autodiff": float(acc_a),
        }
        leaves = (jax.tree_util.tree_leaves(g) for g in (gm, ga, gl))
        for name, m, a, lax_g, e in zip(names, *leaves, exact, strict=True):
            m, a, lax_g, e = (np.asarray(v, np.float64) for v in (m, a, lax_g, e))
            row[f"max_abs_diff[{name}]"] = float(np.max(np.abs(m - a)))
            row[f"max_abs_diff_lax[{name}]"] = float(np.max(np.abs(m - lax_g)))
            row[f"manual_vs_float64[{name}]"] = float(np.max(np.abs(m - e)))
            row[f"autodiff_vs_float64[{name}]"] = float(np.max(np.abs(a - e)))
            row[f"max_abs_grad[{name}]"] = float(np.max(np.abs(e)))
        rows.append(row)
        pm = pm_next
        if step % every == 0 or step == config.steps - 1:
            log(
                f"step {step:>5}/{config.steps}  loss manual {row['loss_manual']:.6f} "
                f"autodiff {row['loss_autodiff']:.6f}  "
                f"acc {row['accuracy_manual']:.3f}/{row['accuracy_autodiff']:.3f}  max |manual - autodiff| "
                f"{max(row[f'max_abs_diff[{n}]'] for n in names):.1e} (lax forward "
                f"{max(row[f'max_abs_diff_lax[{n}]'] for n in names):.1e})  ({time.perf_counter() - t0:.1f} s)"
            )
    # Loss and accuracy after the last update (each row holds the values before its update).
    (loss_m, acc_m), (loss_a, acc_a) = f32.evaluate(pm), f32.evaluate(pa)
    final = {
        "train_loss": {"manual": float(loss_m), "autodiff": float(loss_a)},
        "train_accuracy": {"manual": float(acc_m), "autodiff": float(acc_a)},
        "max_param_diff_between_trajectories": float(
            max(
                jnp.max(jnp.abs(a - b))
                for a, b in zip(jax.tree_util.tree_leaves(pm), jax.tree_util.tree_leaves(pa), strict=True)
            )
        ),
    }
    if config.test_set:
        test = jdata.load_dataset("mnist", data_dir=data_dir, download=not config.offline, log=log)
        xt = jnp.asarray(test.test_images, jnp.float32)[..., None] / 255.0
        yt = spec.targets(test.test_labels)  # (N, 1): digit > 4
        accuracy = jax.jit(lambda p: jnp.mean(spec.loss.correct(model.forward(p, _state(p), xt)[0], yt)))
        final["test_accuracy"] = {"manual": float(accuracy(pm)), "autodiff": float(accuracy(pa))}
        final["test_set"] = f"{len(yt):,} test images ({int(yt.sum()):,} digits > 4): {test.source}"
        log(
            f"test accuracy (digit > 4) manual {final['test_accuracy']['manual']:.4f} "
            f"autodiff {final['test_accuracy']['autodiff']:.4f} on {len(yt):,} test images"
        )
    log(
        f"final train loss manual {final['train_loss']['manual']:.6f} autodiff {final['train_loss']['autodiff']:.6f}; "
        f"accuracy {final['train_accuracy']['manual']:.3f} / {final['train_accuracy']['autodiff']:.3f}"
    )

    # -- 2. the NumPy version: same gradient at the same point, same first steps ---------------------
    X = np.moveaxis(pixels[..., 0], 0, -1)  # (28, 28, N): the tutorial's X
    y_row = np.asarray(labels, np.float64)[None, :]  # (1, N): the tutorial's y
    net = TutorialNumpyCNN.from_params(params0)
    t = time.perf_counter()
    new_image = TutorialNumpyCNN.patches(X, *net.f.shape[:2])
    patch_s = time.perf_counter() - t
    log(f"NumPy: patches {new_image.shape} built in {patch_s:.2f} s")
    _, np_grads, _ = net.loss_and_grads(new_image, X, y_row)
    with jax.enable_x64(True):
        p64 = _as(params0, jnp.float64)
        g64 = jax.tree_util.tree_leaves(f64.manual_grad(p64))
        q, losses64 = p64, []
        for _ in range(config.numpy_steps):
            q, loss = f64.manual_step(q)
            losses64.append(float(loss))
    grad_check = {
        name: _max_rel(a, b)
        for name, a, b in zip(names, jax.tree_util.tree_leaves(net.grads_as_params(np_grads)), g64, strict=True)
    }
    log(
        "NumPy vs jitted manual gradient at the initial point (float64, max relative difference): "
        + ", ".join(f"{k} {v:.1e}" for k, v in grad_check.items())
    )
    numpy_losses = []
    for s in range(config.numpy_steps):
        t = time.perf_counter()
        loss, _ = net.step(new_image, X, y_row, config.lr)
        numpy_losses.append(loss)
        log(
            f"NumPy step {s}: loss {loss:.10f} (jitted float64 {losses64[s]:.10f}, "
            f"float32 {rows[s]['loss_manual']:.10f}) "
            f"in {time.perf_counter() - t:.2f} s"
        )
    numpy_check = {
        "gradient_rel_diff_vs_jitted_float64": grad_check,
        "losses_numpy": numpy_losses,
        "losses_jitted_float64": losses64,
        "losses_jitted_float32": [rows[s]["loss_manual"] for s in range(config.numpy_steps)],
        "max_rel_loss_diff_vs_float64": float(
            max(abs(a - b) / abs(b) for a, b in zip(numpy_losses, losses64, strict=True))
        ),
        "max_rel_loss_diff_vs_float32": float(
            max(abs(a - rows[s]["loss_manual"]) / abs(a) for s, a in enumerate(numpy_losses))
        ),
        "patch_seconds": patch_s,
    }

    # -- 3. time per step, alternating --------------------------------------------------------------
    log(f"timing: {config.timing_rounds} alternating rounds ({config.numpy_timing_rounds} with NumPy)")
    state = {"m": params0, "a": params0, "l": params0, "m64": p64}

    def run_manual():
        state["m"], loss = f32.manual_step(state["m"])
        common.block(loss)

    def run_autodiff():
        state["a"], loss = f32.autodiff_step(state["a"])
        common.block(loss)

    def run_autodiff_lax():
        state["l"], loss = f32.autodiff_lax_step(state["l"])
        common.block(loss)

    def run_manual64():
        with jax.enable_x64(True):
            state["m64"], loss = f64.manual_step(state["m64"])
            common.block(loss)

    timing_net = TutorialNumpyCNN.from_params(params0)

    def run_numpy():
        timing_net.step(new_image, X, y_row, config.lr)

    contenders = {
        "NumPy loops (float64)": run_numpy,
        "jitted manual (float64)": run_manual64,
        "jitted manual (float32)": run_manual,
        AUTODIFF_LAX: run_autodiff_lax,
        AUTODIFF_SAME: run_autodiff,
    }
    for fn in (run_manual, run_autodiff, run_autodiff_lax, run_manual64):
        fn()  # compile outside the timed rounds
    times = common.interleaved_times(
        contenders, config.timing_rounds, {"NumPy loops (float64)": config.numpy_timing_rounds}
    )
    timing = {name: common.summarize_times(ts) for name, ts in times.items()}
    numpy_ms = timing["NumPy loops (float64)"]["median_ms"]
    for name, t in timing.items():
        t["speedup_vs_numpy"] = numpy_ms / t["median_ms"]
        log(
            f"{name:<40} median {t['median_ms']:9.3f} ms/step over {t['n']} steps  "
            f"({t['speedup_vs_numpy']:,.0f}x NumPy)"
        )

    # -- write -------------------------------------------------------------------------------------
    def worst(key):
        return {name: max(r[f"{key}[{name}]"] for r in rows) for name in names}

    scale = {name: float(np.median([r[f"max_abs_grad[{name}]"] for r in rows])) for name in names}
    summary = {
        "experiment": NAME,
        "environment": env,
        "config": dataclasses.asdict(config),
        "data": {"source": source, "n_images": len(labels), "digits_gt_4": int(labels.sum())},
        "parameters": {name: list(a.shape) for name, a in zip(names, jax.tree_util.tree_leaves(params0), strict=True)},
        "final": final,
        "max_gradient_difference_over_all_steps": {
            "manual_vs_autodiff": worst("max_abs_diff"),
            "manual_vs_autodiff_lax": worst("max_abs_diff_lax"),
            "manual_vs_float64": worst("manual_vs_float64"),
            "autodiff_vs_float64": worst("autodiff_vs_float64"),
            "gradient_scale": scale,
            "manual_vs_autodiff_relative_to_scale": {n: worst("max_abs_diff")[n] / scale[n] for n in names},
            "manual_vs_autodiff_lax_relative_to_scale": {n: worst("max_abs_diff_lax")[n] / scale[n] for n in names},
        },
        "numpy_check": numpy_check,
        "time_per_step": timing,
        "steps_csv": f"{NAME}_steps.csv",  # the per-step numbers, one row per step
    }
    common.write_json(out / f"{NAME}.json", summary)
    common.write_csv(out / f"{NAME}_steps.csv", rows)
    (out / f"{NAME}.md").write_text(_markdown(summary, names))
    log(f"wrote {NAME}.md, {NAME}.json, {NAME}_steps.csv")
    plt = common.pyplot(log)
    if plt is not None:
        _figures(plt, out, rows, names, numpy_check, timing, config, log)
    return summary


def _markdown(s: dict, names: list[str]) -> str:
    c, f, t = s["config"], s["final"], s["time_per_step"]
    lines = [
        "# The tutorial CNN (seed 003): manual vs autodiff vs the tutorial's NumPy loops\n",
        f"`seed_net` (conv 3 filters 5x5, sigmoid, dense 1, sigmoid, MSE) on {s['data']['n_images']} images "
        f"({s['data']['digits_gt_4']} digits > 4; {s['data']['source']}), full-batch gradient descent, "
        f"lr {c['lr']}, {c['steps']} steps, float32. Command: `{s['environment']['command']}` "
        f"({s['environment']['date_utc']}, jax {s['environment']['jax']}, {s['environment']['cpu_count']} CPUs).\n",
        "## Final accuracy\n",
    ]
    rows = [
        ["train loss (½·mean squared error)", f"{f['train_loss']['manual']:.6f}", f"{f['train_loss']['autodiff']:.6f}"],
        ["train accuracy", f"{f['train_accuracy']['manual']:.3f}", f"{f['train_accuracy']['autodiff']:.3f}"],
    ]
    if "test_accuracy" in f:
        rows.append(
            ["test accuracy, digit > 4", f"{f['test_accuracy']['manual']:.4f}", f"{f['test_accuracy']['autodiff']:.4f}"]
        )
    lines.append(common.markdown_table(["", "manual", "autodiff"], rows, "lrr"))
    if "test_set" in f:
        lines.append(f"\nTest set: {f['test_set']}.\n")
    lines.append(
        f"\nLargest parameter difference between the two trajectories after {c['steps']} steps: "
        f"{common.sci(f['max_param_diff_between_trajectories'])}.\n"
    )
    lines.append("\n## Gradient difference, manual vs autodiff at the same parameters (all steps)\n")
    g = s["max_gradient_difference_over_all_steps"]
    lines.append(
        common.markdown_table(
            [
                "parameter",
                "shape",
                "gradient scale",
                "manual vs autodiff",
                "relative to scale",
                "manual vs autodiff (lax)",
                "relative to scale (lax)",
                "manual vs float64",
                "autodiff vs float64",
            ],
            [
                [
                    n,
                    "x".join(map(str, s["parameters"][n])),
                    common.sci(g["gradient_scale"][n]),
                    common.sci(g["manual_vs_autodiff"][n]),
                    common.sci(g["manual_vs_autodiff_relative_to_scale"][n]),
                    common.sci(g["manual_vs_autodiff_lax"][n]),
                    common.sci(g["manual_vs_autodiff_lax_relative_to_scale"][n]),
                    common.sci(g["manual_vs_float64"][n]),
                    common.sci(g["autodiff_vs_float64"][n]),
                ]
                for n in names
            ],
            "llrrrrrrr",
        )
    )
    lines.append(
        "\nDifferences are the largest `max |g − g_ref|` over the array and over all steps. **autodiff** is "
        "`jax.grad` of the very forward pass the manual step runs (same formulation); **autodiff (lax)** is "
        "`jax.grad` of the forward pass an autodiff user writes (`lax` convolution), a second witness computing "
        "the same function in another formulation. The float64 reference is `jax.grad` of the same forward in "
        "float64 at the same parameters. Gradient scale: the median over steps of `max |g|` of the array. Both "
        "float32 paths sit at the same distance from the float64 gradient: they differ from each other by "
        "float32 rounding (2⁻²⁴ ≈ 6e-8 relative), nothing more.\n"
    )
    nc = s["numpy_check"]
    lines.append("\n## The NumPy loop version computes the same thing\n")
    lines.append(
        "Gradient at the initial parameters, NumPy loops (float64) vs jitted manual (float64), max relative "
        "difference: "
        + ", ".join(f"{k} {common.sci(v)}" for k, v in nc["gradient_rel_diff_vs_jitted_float64"].items())
        + f". Losses of its first {len(nc['losses_numpy'])} steps vs the jitted float64 trajectory: max relative "
        f"difference {common.sci(nc['max_rel_loss_diff_vs_float64'])} "
        f"(vs float32: {common.sci(nc['max_rel_loss_diff_vs_float32'])}).\n"
    )
    lines.append("\n## Time per training step (forward, backward, update; medians of alternating rounds)\n")
    lines.append(
        common.markdown_table(
            ["contender", "median ms/step", "IQR ms", "steps timed", "speed-up vs NumPy"],
            [
                [
                    k,
                    f"{v['median_ms']:.3f}",
                    f"{v['q25_ms']:.3f}–{v['q75_ms']:.3f}",
                    v["n"],
                    f"{v['speedup_vs_numpy']:,.0f}x",
                ]
                for k, v in t.items()
            ],
            "lrrrr",
        )
    )
    manual_ms = t["jitted manual (float32)"]["median_ms"]
    lines.append(
        f"\nThe jitted manual step (float32) takes {manual_ms / t[AUTODIFF_LAX]['median_ms']:.2f}x "
        "the time of `jax.grad`'s step over the `lax` forward pass, the step an autodiff user writes, and "
        f"{manual_ms / t[AUTODIFF_SAME]['median_ms']:.2f}x that of `jax.grad` "
        "over the manual step's own forward pass (`seed_net`'s convolution in its default formulation, `auto`).\n"
    )
    lines.append(
        f"\nThe NumPy version builds its patch list once before training ({nc['patch_seconds']:.2f} s, not "
        "counted), as the tutorial does. Load average at start: "
        f"{s['environment']['load_average_1_5_15_min']} on {s['environment']['cpu_count']} CPUs.\n"
    )
    return "\n".join(lines)


def _figures(plt, out: Path, rows, names, numpy_check, timing, config: Config, log) -> None:
    steps = np.array([r["step"] for r in rows])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(
        steps, [r["loss_manual"] for r in rows], color=common.COLORS["manual"], lw=2.5, label="manual backward (jit)"
    )
    ax1.plot(
        steps,
        [r["loss_autodiff"] for r in rows],
        color=common.COLORS["autodiff"],
        lw=1.2,
        ls="--",
        label="jax.value_and_grad (jit)",
    )
    k = len(numpy_check["losses_numpy"])
    ax1.plot(
        steps[:k],
        numpy_check["losses_numpy"],
        "o",
        color=common.COLORS["numpy"],
        ms=5,
        label=f"NumPy loops, first {k} steps",
    )
    ax1.set(
        xlabel="gradient-descent step",
        ylabel="training loss  ½·mean((O − y)²)",
        title="Loss: the manual and autodiff curves coincide",
    )
    ax1.legend()
    if k:  # zoom on the first steps, where the NumPy version ran
        inset = ax1.inset_axes([0.1, 0.1, 0.42, 0.38])
        first = slice(0, min(len(steps), 2 * k + 1))
        inset.plot(steps[first], [r["loss_manual"] for r in rows[first]], color=common.COLORS["manual"], lw=2.5)
        inset.plot(
            steps[first], [r["loss_autodiff"] for r in rows[first]], color=common.COLORS["autodiff"], lw=1.2, ls="--"
        )
        inset.plot(steps[:k], numpy_check["losses_numpy"], "o", color=common.COLORS["numpy"], ms=5)
        inset.set_title(f"first {first.stop} steps", fontsize=8)
        inset.tick_params(labelsize=7)
    ax2.plot(steps, [r["accuracy_manual"] for r in rows], color=common.COLORS["manual"], lw=2.5, label="manual")
    ax2.plot(
        steps,
        [r["accuracy_autodiff"] for r in rows],
        color=common.COLORS["autodiff"],
        lw=1.2,
        ls="--",
        label="autodiff",
    )
    ax2.set(
        xlabel="gradient-descent step",
        ylabel="training accuracy (digit > 4)",
        title=f"Accuracy on the {config.n_images} training images",
    )
    ax2.legend(loc="lower right")
    fig.tight_layout()
    common.save_figure(fig, out / f"{NAME}_loss.png", log)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for i, name in enumerate(names):
        color = f"C{i + 2}"
        scale = [r[f"max_abs_grad[{name}]"] for r in rows]
        ax1.semilogy(steps, [max(r[f"max_abs_diff[{name}]"], 1e-14) for r in rows], lw=1.0, color=color, label=name)
        ax1.semilogy(steps, scale, lw=2.5, color=color, alpha=0.25)
        ax2.semilogy(
            steps, [max(r[f"manual_vs_float64[{name}]"], 1e-14) for r in rows], lw=1.6, color=color, label=name
        )
        ax2.semilogy(
            steps,
            [max(r[f"autodiff_vs_float64[{name}]"], 1e-14) for r in rows],
            lw=1.0,
            ls="--",
            color=color,
            alpha=0.8,
        )
    for ax in (ax1, ax2):
        ax.set_xlabel("gradient-descent step")
    ax1.set(
        ylabel="max |g − g_ref| over the array",
        ylim=(1e-12, 1),
        title="|manual − autodiff| (float32, same parameters)\nfaint thick lines: gradient scale max |g|",
    )
    ax2.set(title="distance to jax.grad in float64\n(solid: manual, dashed: autodiff)")
    ax1.legend(loc="center right", fontsize=8)
    ax2.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, out / f"{NAME}_grad_diff.png", log)

    fig, ax = plt.subplots(figsize=(7, 3.2))
    labels = list(timing)
    med = [timing[k]["median_ms"] for k in labels]
    colors = [common.COLORS["numpy" if "NumPy" in k else "autodiff" if "autodiff" in k else "manual"] for k in labels]
    bars = ax.barh(labels, med, color=colors)
    for bar, k in zip(bars, labels, strict=True):
        hatch = "//" if "float64" in k and "jitted" in k else ".." if k == AUTODIFF_SAME else None
        if hatch:
            bar.set_hatch(hatch)
        ms = timing[k]["median_ms"]
        ax.text(
            bar.get_width() * 1.15,
            bar.get_y() + bar.get_height() / 2,
            f"{ms:,.0f} ms" if ms >= 100 else f"{ms:.3g} ms",
            va="center",
            fontsize=9,
        )
        if "NumPy" not in k:
            ax.text(
                bar.get_width() * 1.15,
                bar.get_y() + bar.get_height() / 2 + 0.3,
                f"{timing[k]['speedup_vs_numpy']:,.0f}x faster",
                va="center",
                fontsize=8,
                color="0.3",
            )
    ax.set_xscale("log")
    common.plain_log_axis(ax, "x")
    ax.set_xlim(min(med) / 3, max(med) * 20)
    ax.invert_yaxis()
    ax.set(
        xlabel="milliseconds per training step (median, log scale)",
        title=f"Time per step on {config.n_images} images (speed-up vs the NumPy loops)",
    )
    fig.tight_layout()
    common.save_figure(fig, out / f"{NAME}_step_time.png", log)


def main(argv=None) -> int:
    parser = common.base_parser(NAME, __doc__.splitlines()[0])
    d = Config()
    parser.add_argument(
        "--steps", type=int, default=None, help=f"gradient-descent steps (default {d.steps}; smoke {SMOKE['steps']})"
    )
    parser.add_argument("--lr", type=float, default=d.lr, help="learning rate")
    parser.add_argument("--offline", action="store_true", help="never download MNIST files")
    args = parser.parse_args(argv)
    overrides = {"seed": args.seed, "lr": args.lr, "offline": args.offline}
    if args.steps is not None:
        overrides["steps"] = args.steps
    run(args.out, smoke=args.smoke, command=common.command_line(NAME, argv), **overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
