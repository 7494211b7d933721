"""Three-way gradient checks of a zoo model: each of its layers alone, then the whole model with its loss.

Each layer is checked on a random input of the shape it receives in the model, drawn from a normal
distribution, so that values are distinct (no max-pool ties) and rarely near a ReLU kink; finite
differences skip any direction whose step crosses a kink anyway (see ``skip_kinks`` in
:func:`jaxcnn.gradcheck.gradcheck`). Layers run in training mode (batch statistics, a fixed dropout key).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcnn.gradcheck import GradCheckResult
from jaxcnn.gradients import gradcheck_layer
from jaxcnn.models import get_model


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda a: a.astype(dtype), tree)


def check_model(
    name: str, *, dtype: str = "float64", batch: int = 2, seed: int = 0, **gradcheck_kwargs
) -> list[GradCheckResult]:
    """Returns one :class:`GradCheckResult` per top-level layer of model ``name``, then one for the whole
    model and its loss (last). Never raises on a failed check: inspect ``result.ok``."""
    spec = get_model(name)
    model = spec.build()
    kwargs = dict(raise_on_failure=False, skip_kinks=True, **gradcheck_kwargs)
    with jax.enable_x64(dtype == "float64"):
        key = jax.random.PRNGKey(seed)
        shape = (batch, *spec.input_shape[1:])
        params, state, _ = model.init(key, shape)
        params, state = _cast(params, dtype), _cast(state, dtype)
        results = []
        layers = model.children or (model,)
        for i, (layer, p, s) in enumerate(zip(layers, params, state, strict=True)):
            x = jax.random.normal(jax.random.fold_in(key, 100 + i), shape, dtype)
            results.append(
                gradcheck_layer(
                    layer,
                    p,
                    s,
                    x,
                    train=True,
                    key=jax.random.fold_in(key, 200 + i),
                    name=f"{name}[{i}] {layer.name}",
                    **kwargs,
                )
            )
            _, _, shape = layer.init(key, shape)
        images = jax.random.uniform(jax.random.fold_in(key, 1), (batch, *spec.input_shape[1:]), dtype)
        labels = jax.random.randint(jax.random.fold_in(key, 2), (batch,), 0, 10)
        target = spec.targets(labels)
        if jnp.issubdtype(target.dtype, jnp.floating):
            target = target.astype(dtype)
        results.append(
            gradcheck_layer(
                model,
                params,
                state,
                images,
                train=True,
                key=jax.random.fold_in(key, 3),
                loss=spec.loss,
                target=target,
                name=f"{name} + {spec.loss.name}",
                **kwargs,
            )
        )
    return results
