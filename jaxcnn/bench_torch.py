"""The PyTorch peer of ``jaxcnn bench``: the zoo models written with ``torch.nn``, trained with the same batch,
loss and optimiser (SGD, momentum 0.9), eagerly or through ``torch.compile``.

PyTorch is never a dependency: :func:`available` says whether it is installed and nothing else here is
imported by jaxcnn unless it is.
"""

from __future__ import annotations

import importlib.util


def available() -> bool:
    return importlib.util.find_spec("torch") is not None


def build(model_name: str):
    """``(module, loss_fn, binary)``: the PyTorch twin of a zoo model (NCHW, PyTorch's native layout)."""
    import torch
    from torch import nn

    if model_name == "seed_net":
        net = nn.Sequential(nn.Conv2d(1, 3, 5), nn.Sigmoid(), nn.Flatten(), nn.Linear(3 * 24 * 24, 1), nn.Sigmoid())

        def loss(pred, target):
            return 0.5 * torch.mean(torch.square(pred - target))

        return net, loss, True
    if model_name == "lenet5":
        net = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
        )
        return net, nn.functional.cross_entropy, False
    if model_name == "small_cnn":
        net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
            nn.Linear(64 * 7 * 7, 256), nn.ReLU(), nn.Linear(256, 10),
        )
        return net, nn.functional.cross_entropy, False
    raise KeyError(model_name)


def make_step(model_name: str, batch: int, steps: int, *, compiled: bool = False, lr: float = 0.05, threads: int = 2):
    """``(fn, info)``: ``fn()`` runs ``steps`` train steps (zero_grad, forward, loss, backward, SGD step) on one
    fixed batch; ``compiled`` wraps the module in ``torch.compile`` and runs it once to compile."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net, loss_fn, binary = build(model_name)
    x = torch.rand(batch, 1, 28, 28)
    labels = torch.randint(0, 10, (batch,))
    target = (labels > 4).float()[:, None] if binary else labels
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
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

    return fn, {"torch": torch.__version__, "threads": torch.get_num_threads(), "layout": "NCHW"}
