"""The optional peers of the ``steps`` section: Flax and PyTorch (eager and ``torch.compile``).

Neither is a dependency: each peer is used when its package is installed and otherwise skipped with one
note in the report saying how to install it. The peers train a twin of each zoo model (the same layers,
written with ``flax.linen`` or ``torch.nn``) on the same batch with the same loss and optimiser.
"""

from __future__ import annotations

import importlib.util

from jaxcnn.bench.config import LR, BenchConfig
from jaxcnn.bench.harness import Contender, loop_and_scan


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def torch_peer(cfg: BenchConfig, notes: list):
    """``make(model_name, batch, steps) -> [Contender]`` for the wanted PyTorch peers, or ``None`` (with a
    note) when none can run."""
    wanted = [p for p in ("torch", "torch.compile") if p in cfg.peers]
    if not wanted:
        return None
    if cfg.device != "cpu":
        notes.append("PyTorch peer skipped: it runs on the CPU only")
        return None
    if not installed("torch"):
        notes.append("PyTorch peer skipped: torch is not installed (pip install torch; it is never a dependency)")
        return None
    from jaxcnn.bench import peers_torch

    if cfg.quick and "torch.compile" in wanted:
        wanted.remove("torch.compile")
        notes.append("torch.compile skipped in --quick (its compilation takes minutes on a small machine)")

    def make(model_name, batch, steps):
        out = []
        for peer in wanted:
            for layout in peers_torch.LAYOUTS:
                name = peer if layout == "NCHW" else f"{peer}[{layout}]"
                try:
                    fn, info = peers_torch.make_step(
                        model_name,
                        batch,
                        steps,
                        compiled=peer == "torch.compile",
                        layout=layout,
                        lr=LR,
                        threads=cfg.torch_threads,
                    )
                except Exception as e:
                    notes.append(f"{name} {model_name}: could not build the step ({type(e).__name__}: {str(e)[:160]})")
                    continue
                out.append(Contender(name, peer, fn, steps, {"batch": batch, "structure": "loop", **info}))
        return out

    return make


def flax_peer(cfg: BenchConfig, notes: list):
    """``make(model_name, batch, steps, opts) -> [Contender]`` for the Flax peer, or ``None`` (with a note)
    when flax is not installed or not wanted."""
    if "flax" not in cfg.peers:
        return None
    if not installed("flax"):
        notes.append("Flax peer skipped: flax is not installed (pip install flax; it is never a dependency)")
        return None

    def make(model_name, batch, steps, opts):
        import flax

        try:
            one_step, scan_steps, state, x, target = flax_step(model_name, batch)
        except KeyError:
            notes.append(f"Flax peer: no Flax version of {model_name}")
            return []
        # --quick: the loop only (Flax's usual best setting: jax.grad of a convolution is slowest in lax.scan
        # on XLA:CPU); a full run compiles the scan too.
        structures = ("loop",) if cfg.quick else ("loop", "scan")
        return loop_and_scan(
            one_step,
            scan_steps,
            state,
            x,
            target,
            steps,
            opts,
            "flax",
            "flax",
            {"batch": batch, "flax": flax.__version__},
            structures,
        )

    return make


def _flax_body(model_name: str):
    """The zoo model ``model_name`` with ``flax.linen`` layers (NHWC), as a Flax user writes it."""
    import flax.linen as nn

    def seed_net(x):
        x = nn.sigmoid(nn.Conv(3, (5, 5), padding="VALID")(x))
        return nn.sigmoid(nn.Dense(1)(x.reshape(x.shape[0], -1)))

    def lenet5(x):
        x = nn.max_pool(nn.relu(nn.Conv(6, (5, 5), padding="SAME")(x)), (2, 2), (2, 2))
        x = nn.max_pool(nn.relu(nn.Conv(16, (5, 5), padding="VALID")(x)), (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(84)(nn.relu(nn.Dense(120)(x))))
        return nn.Dense(10)(x)

    def small_cnn(x):
        x = nn.avg_pool(nn.relu(nn.Conv(32, (3, 3), padding="SAME")(x)), (2, 2), (2, 2))
        x = nn.avg_pool(nn.relu(nn.Conv(64, (3, 3), padding="SAME")(x)), (2, 2), (2, 2))
        x = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)

    return {"seed_net": seed_net, "lenet5": lenet5, "small_cnn": small_cnn}[model_name]


def flax_step(model_name: str, batch: int):
    """``(one_step, scan_steps, state, x, target)`` of the Flax twin of a zoo model, trained with
    ``jax.value_and_grad`` of the zoo's own loss and the same optax optimiser, in the signatures of
    :func:`jaxcnn.bench.harness.loop_and_scan` (the scan gathers each batch from device-resident data,
    as :func:`jaxcnn.train.loop.run_steps` does)."""
    import flax.linen as nn

    import jax
    import optax

    from jaxcnn.bench.sections import step_inputs
    from jaxcnn.models import get_model
    from jaxcnn.train import TrainConfig, TrainState, make_optimizer

    body = _flax_body(model_name)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return body(x)

    spec = get_model(model_name)
    net = Net()
    x, target = step_inputs(spec, batch)
    params = net.init(jax.random.PRNGKey(0), x[:1])
    tx = make_optimizer(TrainConfig(lr=LR, schedule="constant"), 1)

    def one_step(state, x, target, key=None):
        def objective(p):
            return spec.loss.value(net.apply(p, x), target)

        loss, grads = jax.value_and_grad(objective)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), state.model_state, opt_state), {"loss": loss}

    def scan_steps(state, images, targets, batch_indices, first_step):
        def body(state, idx):
            return one_step(state, images[idx], targets[idx])

        return jax.lax.scan(body, state, batch_indices)

    return one_step, scan_steps, TrainState(params, {}, tx.init(params)), x, target
