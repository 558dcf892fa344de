"""A model's shared layer stack (``models.stack.stack_layers`` with ``scan_layers=True``) run as a
pipeline (``sciscale_jax.parallel.pipeline``), as a ``grad_fn`` for ``train.step.make_train_step``.

The stacked ``[L, ...]`` layer parameters are cut into S = p x v stages of consecutive layers;
when S does not divide L the first L mod S stages get one layer more, and every stage is padded
to the longest with layers that are skipped (``where`` on a per-layer flag, so their gradient is
zero and they are dropped on the way back). The embedding runs on the first stage and the head
and loss on the last; all non-layer parameters travel to both and their two gradients add up.
The model family supplies four small functions (its recipe owns them, as ``PipelineStages``):
``embed_fn(model, batch) -> h`` (an array, or a tuple such as the Evoformer's (msa, pair)),
``block_args_fn(batch) -> args`` (the extra arguments of ``block(h, *args, key)``),
``head_fn(model, h, batch) -> loss sum`` and ``count_fn(batch) -> token count``.

Dropout: with a step key, microbatch rows get keys ``fold_in(key, row)`` and each stage draws
layer l's key as ``fold_in(key of the microbatch's first row, l)``, so masks are drawn per
microbatch (not the slice of one batch-wide draw as in the unpipelined step).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

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


_KEY_FIELD = "__pipeline_dropout_key"  # per-row key data added to the batch when a step key is given


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    if not path:
        return value
    return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def _default_apply(block, h, *args):
    return block(h, *args)


@dataclasses.dataclass(frozen=True)
class PipelineStages:
    """How a model family runs as a pipeline; a recipe gives one (``Recipe.pipeline``).

    ``layers``: the path of the stacked layer stack in the parameter dict (``("layers",)``);
    ``apply_block(block, h, *args, key) -> h`` calls one block (default ``block(h, *args, key)``;
    the Evoformer unpacks its (msa, pair) carry).
    """

    embed_fn: Callable       # (model, batch) -> h
    block_args_fn: Callable  # batch -> tuple of extra block arguments
    head_fn: Callable        # (model, h, batch) -> loss sum
    count_fn: Callable       # batch -> token count
    layers: tuple = ("layers",)
    apply_block: Callable = _default_apply

    def grad_fn(self, graphdef, **kwargs):
        """``pipeline_grad_fn`` for this model family; ``kwargs``: mesh, schedule, microbatches, ..."""
        return pipeline_grad_fn(graphdef, embed_fn=self.embed_fn, block_args_fn=self.block_args_fn,
                                head_fn=self.head_fn, count_fn=self.count_fn, layers_key=self.layers,
                                apply_block=self.apply_block, **kwargs)


def _spec(s):
    return s.spec if isinstance(s, jax.sharding.NamedSharding) else s


def _stage_specs(shardings, path, data_axes):
    """``{"first", "stages", "last"}`` specs (``pipeline_value_and_grad``'s ``param_specs``) from
    the shardings of the model's parameters: the layer stack's specs without the layer axis (a
    leaf split over a data axis along the layer axis is gathered whole at entry instead), the
    other parameters' as they are; None: all replicated."""
    if shardings is None:
        return None
    shardings = jax.tree.map(_spec, shardings, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
    is_spec = lambda x: isinstance(x, P)  # noqa: E731

    def stage(spec):
        entries = list(tuple(spec)) or [None]
        if set(jax.tree.leaves(entries[:1])) & set(data_axes):
            return P()
        return P(None, *entries[1:])  # [Lmax, ...]: one stage's layers

    layers = jax.tree.map(stage, _get(shardings, path), is_leaf=is_spec)
    others = _set(shardings, path, jax.tree.map(lambda _: P(), _get(shardings, path), is_leaf=is_spec))
    return {"first": others, "last": others, "stages": {"layers": layers, "valid": P(), "index": P()}}


def pipeline_grad_fn(graphdef, *, mesh, embed_fn: Callable, block_args_fn: Callable, head_fn: Callable,
                     count_fn: Callable, schedule: str = "1f1b", microbatches: int, virtual_stages: int = 1,
                     remat_policy: str = "none", layers_key="layers", apply_block: Callable = _default_apply,
                     axis: str = "pipeline", data_axes=("data", "fsdp"), param_shardings=None,
                     grad_shardings=None):
    """``grad_fn(params, rest, batch, key, loss_scale=1.0) -> (loss, (count, rest), grads)``: the
    token-mean loss and its gradients (of ``loss_scale`` x the loss, which seeds the backward, as
    fp16 loss scaling needs), computed by pipeline ``schedule``; the signature of
    ``train.step.backprop_grad_fn``, so ``make_train_step(..., grad_fn=...)`` takes it.

    ``params``/``rest`` are the pure dicts of ``train.step.split_model``; ``params`` at
    ``layers_key`` (a key or a path of keys) is the stacked layer stack. ``key`` None: no
    dropout; else per-microbatch dropout keys (module docstring).

    ``param_shardings`` (NamedShardings or PartitionSpecs shaped like ``params``: how the
    parameters are placed, e.g. ``Placement.state.params``): parameters split over the data axes
    (``fsdp`` rule tables, ZeRO-3) stay split inside the stages and are gathered at each use;
    their gradients come back split the same way. ``grad_shardings`` (``Placement.grads``) may
    split gradients of replicated parameters (ZeRO-2): a reduce-scatter after the loop.
    """
    stages = mesh.shape[axis] * virtual_stages
    path = (layers_key,) if isinstance(layers_key, str) else tuple(layers_key)
    check_pipeline_args(schedule, stages=mesh.shape[axis], microbatches=microbatches, virtual_stages=virtual_stages)
    data = tuple(a for a in data_axes if mesh.shape.get(a, 1) > 1)
    param_specs = _stage_specs(param_shardings, path, data)
    grad_specs = _stage_specs(grad_shardings, path, data) if grad_shardings is not None else param_specs

    def grad_fn(params, rest, batch, key=None, loss_scale=1.0):
        layers = _get(params, path)
        num_layers = jax.tree.leaves(layers)[0].shape[0]
        check_pipeline_args(schedule, num_layers=num_layers, stages=mesh.shape[axis], microbatches=microbatches,
                            virtual_stages=virtual_stages)
        try:
            layer_rest = jax.tree.leaves(_get(rest, path))
        except (KeyError, TypeError):
            layer_rest = []
        if layer_rest:
            raise ValueError("pipeline stages carry only parameters; the layer stack has other state")
        placeholder = jax.tree.map(lambda x: jnp.zeros((0,), x.dtype), layers)
        others = _set(params, path, placeholder)
        model_of = lambda p: nnx.merge(graphdef, p, rest)  # noqa: E731
        block_module = nnx.merge(graphdef, params, rest)
        for k in path:
            block_module = getattr(block_module, k)
        block_graphdef = nnx.split(block_module)[0]
        if key is not None:  # one key per row; a microbatch (on a data shard) uses its first row's
            size = jax.tree.leaves(batch)[0].shape[0]
            rows = jax.vmap(lambda i: jax.random.key_data(jax.random.fold_in(key, i)))(jnp.arange(size))
            batch_in = {**batch, _KEY_FIELD: rows}
        else:
            batch_in = batch

        def first_fn(p, b):
            return embed_fn(model_of(p), b)

        def stage_fn(p, h, b):
            args = block_args_fn(b)
            mb_key = jax.random.wrap_key_data(b[_KEY_FIELD][0]) if _KEY_FIELD in b else None

            def block(layer, x):
                state, ok, index = layer
                k = None if mb_key is None else jax.random.fold_in(mb_key, index.astype(jnp.int32))
                y = apply_block(nnx.merge(block_graphdef, state), x, *args, k)
                return jax.tree.map(lambda a, b: jnp.where(ok > 0.5, a, b), y, x)

            return remat.apply_layers(block, h, (p["layers"], p["valid"], p["index"]), remat_policy, scan=True)

        def last_fn(p, h, b):
            return head_fn(model_of(p), h, b)

        run = pipeline_value_and_grad(first_fn, stage_fn, last_fn, mesh=mesh, schedule=schedule,
                                      microbatches=microbatches, virtual_stages=virtual_stages, axis=axis,
                                      data_axes=data_axes, param_specs=param_specs, grad_specs=grad_specs)
        split = split_stages(layers, stages)
        split["index"] = split_stages(jnp.arange(num_layers, dtype=jnp.float32), stages)["layers"]
        count = count_fn(batch)
        inv = 1.0 / jnp.maximum(count, 1.0)
        # the backward is seeded with loss_scale / count: gradients of the scaled token mean
        total, grads = run({"first": others, "stages": split, "last": others}, batch_in,
                           jnp.asarray(loss_scale, jnp.float32) * inv)
        g_layers = merge_stages(grads["stages"], num_layers)
        grads = _set(jax.tree.map(jnp.add, grads["first"], grads["last"]), path, g_layers)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        return total * inv, (count, rest), grads

    return grad_fn
