"""The PyTorch peer of ``jaxcnn bench``: the zoo models written with ``torch.nn``, trained with the same batch,
loss and optimiser (SGD, momentum 0.9), eagerly or through ``torch.compile``.

PyTorch is never a dependency: this module is imported only when it is installed
(:func:`jaxcnn.bench.peers.torch_peer` checks).
"""

from __future__ import annotations

import numpy as np


def build(model_name: str, channels: int):
    """``(module, loss_fn)``: the PyTorch twin of a zoo model for inputs of ``channels`` channels (NCHW,
    PyTorch's native layout; the first dense layer infers its input size)."""
    import torch
    from torch import nn

    if model_name == "seed_net":
        net = nn.Sequential(nn.Conv2d(channels, 3, 5), nn.Sigmoid(), nn.Flatten(), nn.LazyLinear(1), nn.Sigmoid())

        def loss(pred, target):
            return 0.5 * torch.mean(torch.square(pred - target))

        return net, loss
    if model_name == "lenet5":
        net = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.LazyLinear(120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, 10),
        )
        return net, nn.functional.cross_entropy
    if model_name == "small_cnn":
        net = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.LazyLinear(256),
            nn.ReLU(),
            nn.Linear(256, 10),
        )
        return net, nn.functional.cross_entropy
    if model_name == "fast_cnn":

        def block(c_in: int, c_out: int, size: int) -> list:
            return [nn.Conv2d(c_in, c_out, size, padding=size // 2), nn.ReLU(), nn.MaxPool2d(2), nn.BatchNorm2d(c_out)]

        net = nn.Sequential(
            *block(channels, 24, 5), *block(24, 48, 3), *block(48, 96, 3), nn.Flatten(), nn.LazyLinear(10)
        )
        return net, nn.functional.cross_entropy
    raise KeyError(model_name)


def _training_setup(model_name: str, batch: int, *, lr: float, threads: int):
    """``(net, loss_fn, x, target, optimizer)``: the PyTorch twin of a zoo model (lazy layers sized), one fixed
    random batch of the zoo spec's input shape and targets, and SGD with momentum 0.9."""
    import torch

    from jaxcnn.models import get_model

    spec = get_model(model_name)
    _, h, w, c = spec.input_shape
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net, loss_fn = build(model_name, c)
    x = torch.rand(batch, c, h, w)
    labels = np.random.default_rng(2).integers(0, 10, batch)
    target = torch.from_numpy(np.array(spec.targets(labels)))
    if not target.is_floating_point():
        target = target.long()  # class indices, as cross_entropy takes them
    with torch.no_grad():
        net(x)  # sizes the lazy layers before the optimiser sees the parameters
    return net, loss_fn, x, target, torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)


LAYOUTS = ("NCHW", "channels_last")  # PyTorch's memory formats for images; which is faster depends on the CPU


def make_step(
    model_name: str,
    batch: int,
    steps: int,
    *,
    compiled: bool = False,
    layout: str = "NCHW",
    lr: float = 0.05,
    threads: int = 2,
):
    """``(fn, info)``: ``fn()`` runs ``steps`` train steps (zero_grad, forward, loss, backward, SGD step) on one
    fixed batch of the zoo spec's input shape and targets; ``compiled`` wraps the module in ``torch.compile``
    and runs it once to compile; ``layout`` is the memory format of the batch and the parameters (one of
    :data:`LAYOUTS`)."""
    import torch

    net, loss_fn, x, target, opt = _training_setup(model_name, batch, lr=lr, threads=threads)
    if layout == "channels_last":
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout != "NCHW":
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    model = torch.compile(net) if compiled else net

    def one():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), target)
        loss.backward()
        opt.step()
        return loss

    if compiled:
        one()  # compiles here, so that a failure is reported while building, not while timing

    def fn():
        for _ in range(steps):
            one()

    return fn, {"torch": torch.__version__, "threads": torch.get_num_threads(), "layout": layout}


# Opacus's ways of getting per-example gradients: hooks that form each example's gradient (its default), and
# ghost clipping, which clips from per-example norms without forming them (a second backward pass).
OPACUS_MODES = ("hooks", "ghost")


def make_dp_step(
    model_name: str,
    batch: int,
    steps: int,
    *,
    mode: str = "hooks",
    clip: float = 1.0,
    noise: float = 1.1,
    lr: float = 0.05,
    threads: int = 2,
):
    """``(fn, info)``: ``fn()`` runs ``steps`` DP-SGD steps of Opacus (``PrivacyEngine.make_private`` with
    clipping norm ``clip``, noise multiplier ``noise``, SGD with momentum 0.9) on one fixed batch of the zoo
    spec's inputs; ``mode`` is Opacus's ``grad_sample_mode``, ``"hooks"`` or ``"ghost"``."""
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    net, loss_fn, x, target, opt = _training_setup(model_name, batch, lr=lr, threads=threads)
    loader = DataLoader(TensorDataset(x, target), batch_size=batch)
    criterion = torch.nn.CrossEntropyLoss() if loss_fn is torch.nn.functional.cross_entropy else _Module(loss_fn)
    engine = PrivacyEngine(accountant="rdp")
    made = engine.make_private(
        module=net,
        optimizer=opt,
        criterion=criterion,
        data_loader=loader,
        noise_multiplier=noise,
        max_grad_norm=clip,
        poisson_sampling=False,
        grad_sample_mode=mode,
    )
    model, opt = made[0], made[1]
    criterion = made[2] if mode == "ghost" else criterion

    def fn():
        for _ in range(steps):
            opt.zero_grad()
            criterion(model(x), target).backward()
            opt.step()

    return fn, {"peer": "opacus", "grad_sample_mode": mode, "threads": threads}


class _Module:
    """A loss function as the callable module Opacus's ``criterion`` expects (``reduction="mean"``)."""

    def __init__(self, fn):
        self.fn, self.reduction = fn, "mean"

    def __call__(self, pred, target):
        return self.fn(pred, target)
