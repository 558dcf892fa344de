"""A model's shared layer stack (``models.stack.stack_layers`` with ``scan_layers=True``) run as a
pipeline (``sciscale_jax.parallel.pipeline``), as a ``grad_fn`` for ``train.step.make_train_step``.

The stacked ``[L, ...]`` layer parameters are cut into S = p x v stages of consecutive layers;
when S does not divide L the first L mod S stages get one layer more, and every stage is padded
to the longest with layers that are skipped (``where`` on a per-layer flag, so their gradient is
zero and they are dropped on the way back). The embedding runs on the first stage and the head
and loss on the last; all non-layer parameters travel to both and their two gradients add up.
The model family supplies four small functions (its recipe owns them): ``embed_fn(model,
batch) -> h``, ``block_args_fn(batch) -> args`` (the extra arguments of ``block(h, *args,
key)``), ``head_fn(model, h, batch) -> loss sum`` and ``count_fn(batch) -> token count``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sciscale_jax import remat
from sciscale_jax.parallel.pipeline import check_pipeline_args, pipeline_value_and_grad


def stage_layer_counts(num_layers: int, num_stages: int) -> list[int]:
    """Layers per stage: as even as possible, the extra ones on the first stages."""
    if num_layers < num_stages:
        raise ValueError(f"num_layers={num_layers} is fewer than pipeline stages x virtual stages = {num_stages}")
    return [num_layers // num_stages + (s < num_layers % num_stages) for s in range(num_stages)]


def split_stages(layers, num_stages: int):
    """``[L, ...]`` leaves -> ``{"layers": [S, Lmax, ...], "valid": [S, Lmax]}``; a padding slot repeats
    its stage's last layer and has valid 0.0 (float, so the tree can be differentiated)."""
    num_layers = jax.tree.leaves(layers)[0].shape[0]
    counts = stage_layer_counts(num_layers, num_stages)
    width, starts = max(counts), np.cumsum([0] + counts[:-1])
    if num_layers % num_stages == 0:  # a reshape: layers split over the pipeline axis stay in place
        return {"layers": jax.tree.map(lambda x: x.reshape((num_stages, width) + x.shape[1:]), layers),
                "valid": jnp.ones((num_stages, width), jnp.float32)}
    index = np.array([[min(start + j, start + n - 1) for j in range(width)] for start, n in zip(starts, counts)])
    valid = np.array([[float(j < n) for j in range(width)] for n in counts], np.float32)
    return {"layers": jax.tree.map(lambda x: x[index], layers), "valid": jnp.asarray(valid)}


def merge_stages(stages, num_layers: int):
    """The inverse of ``split_stages`` (for gradients): the real layers back as ``[L, ...]``."""
    counts = stage_layer_counts(num_layers, stages["valid"].shape[0])
    if len(set(counts)) == 1:
        return jax.tree.map(lambda x: x.reshape((num_layers,) + x.shape[2:]), stages["layers"])
    rows = np.array([s for s, n in enumerate(counts) for _ in range(n)])
    cols = np.array([j for n in counts for j in range(n)])
    return jax.tree.map(lambda x: x[rows, cols], stages["layers"])


def pipeline_grad_fn(graphdef, *, mesh, embed_fn: Callable, block_args_fn: Callable, head_fn: Callable,
                     count_fn: Callable, schedule: str = "1f1b", microbatches: int, virtual_stages: int = 1,
                     remat_policy: str = "none", layers_key: str = "layers", axis: str = "pipeline",
                     data_axes=("data", "fsdp")):
    """``grad_fn(params, rest, batch, key, loss_scale=1.0) -> (loss, (count, rest), grads)``: the
    token-mean loss and its gradients, computed by pipeline ``schedule``; the signature of
    ``train.step.backprop_grad_fn``, so ``make_train_step(..., grad_fn=...)`` takes it.

    ``params``/``rest`` are the pure dicts of ``train.step.split_model``; ``params[layers_key]``
    is the stacked layer stack. Dropout keys are not threaded through the pipeline (``key`` is
    unused: build the model with dropout 0).
    """
    stages = mesh.shape[axis] * virtual_stages
    check_pipeline_args(schedule, stages=mesh.shape[axis], microbatches=microbatches, virtual_stages=virtual_stages)

    def grad_fn(params, rest, batch, key=None, loss_scale=1.0):
        del key
        layers = params[layers_key]
        num_layers = jax.tree.leaves(layers)[0].shape[0]
        check_pipeline_args(schedule, num_layers=num_layers, stages=mesh.shape[axis], microbatches=microbatches,
                            virtual_stages=virtual_stages)
        if jax.tree.leaves(rest.get(layers_key, {})):
            raise ValueError("pipeline stages carry only parameters; the layer stack has other state")
        others = {k: v for k, v in params.items() if k != layers_key}
        placeholder = jax.tree.map(lambda x: jnp.zeros((0,), x.dtype), layers)
        model_of = lambda p: nnx.merge(graphdef, {**p, layers_key: placeholder}, rest)  # noqa: E731
        block_graphdef = nnx.split(getattr(nnx.merge(graphdef, params, rest), layers_key))[0]

        def first_fn(p, b):
            return embed_fn(model_of(p), b)

        def stage_fn(p, h, b):
            args = block_args_fn(b)

            def block(layer_valid, x):
                state, ok = layer_valid
                return jnp.where(ok > 0.5, nnx.merge(block_graphdef, state)(x, *args, None), x)

            return remat.apply_layers(block, h, (p["layers"], p["valid"]), remat_policy, scan=True)

        def last_fn(p, h, b):
            return head_fn(model_of(p), h, b)

        run = pipeline_value_and_grad(first_fn, stage_fn, last_fn, mesh=mesh, schedule=schedule,
                                      microbatches=microbatches, virtual_stages=virtual_stages, axis=axis,
                                      data_axes=data_axes)
        total, grads = run({"first": others, "stages": split_stages(layers, stages), "last": others}, batch)
        count = count_fn(batch)
        inv = 1.0 / jnp.maximum(count, 1.0)
        g_layers = merge_stages(grads["stages"], num_layers)
        grads = {k: jax.tree.map(lambda a, b: a + b, grads["first"][k], grads["last"][k]) for k in others}
        grads[layers_key] = g_layers
        grads = jax.tree.map(lambda g, p: (g * inv * loss_scale).astype(p.dtype), grads, params)
        return total * inv, (count, rest), grads

    return grad_fn
