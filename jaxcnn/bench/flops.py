"""FLOPs of a train step, counted analytically from a model's parameter and activation shapes."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # jax is imported when a benchmark runs, not with the module
    from jaxcnn.layers import Layer


def layers_with_shapes(model: Layer, in_shape: Sequence[int]) -> Iterator[tuple[int, Layer, Any, Any, tuple, tuple]]:
    """``(index, layer, params, state, in_shape, out_shape)`` for each layer of a serial ``model`` (the model
    itself when it has no children) on inputs of ``in_shape``; ``params`` and ``state`` are the shapes
    (``jax.ShapeDtypeStruct``) of the layer's initial values, found without computing them."""
    import jax

    shape = tuple(in_shape)
    for i, layer in enumerate(model.children or (model,)):
        out: dict[str, tuple] = {}

        def init(key, layer=layer, shape=shape, out=out):
            params, state, out["shape"] = layer.init(key, shape)
            return params, state

        params, state = jax.eval_shape(init, jax.random.PRNGKey(i))
        yield i, layer, params, state, shape, tuple(out["shape"])
        shape = tuple(out["shape"])


def kernel_of(params):
    """The kernel of a conv (4-D ``"w"``) or dense (2-D ``"w"``) layer's params, else ``None``."""
    w = params.get("w") if isinstance(params, dict) else None
    return w if w is not None and getattr(w, "ndim", 0) in (2, 4) else None


def layer_flops(model: Layer, in_shape: Sequence[int]) -> list[dict]:
    """Multiply-add FLOPs (x2) per image of every conv and dense layer of a serial ``model``.

    ``fwd`` is the layer's forward product, ``dw`` its kernel gradient and ``dx`` its input gradient, each
    as many FLOPs as the forward; the first layer's ``dx`` is not counted (nothing needs it). Layers are
    recognised by their kernel's rank (4: convolution, ``(kh, kw, C / groups, F)``; 2: dense ``(in, out)``).
    """
    rows: list[dict] = []
    for i, layer, params, _, shape, out_shape in layers_with_shapes(model, (1, *tuple(in_shape)[1:])):
        w = kernel_of(params)
        if w is None:
            continue
        per_out = math.prod(w.shape[:-1]) if w.ndim == 4 else w.shape[0]
        fwd = 2 * per_out * math.prod(out_shape[1:])
        rows.append(
            {
                "layer": i,
                "name": layer.name,
                "in_shape": shape[1:],
                "out_shape": out_shape[1:],
                "w_shape": tuple(w.shape),
                "fwd": fwd,
                "dw": fwd,
                "dx": fwd if rows else 0,
            }
        )
    return rows


def model_flops(model: Layer, in_shape: Sequence[int]) -> int:
    """FLOPs per image of one train step (forward + backward) of ``model`` for inputs of ``in_shape``
    (``(1, H, W, C)``, e.g. the zoo spec's ``input_shape``)."""
    return sum(r["fwd"] + r["dw"] + r["dx"] for r in layer_flops(model, in_shape))
