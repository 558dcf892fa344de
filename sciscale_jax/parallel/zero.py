"""ZeRO stages 0-3 as sharding policies (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations
Toward Training Trillion Parameter Models"; stage 3 is FSDP).

A stage decides which model state is split over the data-parallel axes (``data``, ``fsdp``):

====== ============== ===================== ============== ======================
stage  optimizer state gradients             parameters     per device (mixed Adam)
====== ============== ===================== ============== ======================
0      replicated     replicated (all-reduce) replicated   16 Psi
1      sharded        replicated            replicated     4 Psi + 12 Psi / N
2      sharded        sharded (reduce-scatter) replicated  2 Psi + 14 Psi / N
3      sharded        sharded               sharded, gathered at use  16 Psi / N
====== ============== ===================== ============== ======================

``zero_spec`` adds the free data axes to one dimension of a leaf's model-parallel
PartitionSpec (the largest that divides evenly; leaves with none stay replicated). With
these shardings as jit in/out shardings, GSPMD emits the collectives. ZeRO-2 also has a
hand-written gradient path, ``reduce_scatter_value_and_grad``: ``jax.shard_map`` +
``jax.lax.psum_scatter``, because XLA on CPU never fuses all-reduce + slice into a
reduce-scatter.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from sciscale_jax.parallel.mesh import DATA_AXES, axis_size
from sciscale_jax.parallel.rules import check_divisible, logical_sharding, tree_shardings

ZERO_STAGES = (0, 1, 2, 3)
_FIRST_STAGE = {"opt_state": 1, "grads": 2, "params": 3}


def validate_zero_stage(stage) -> int:
    if stage not in ZERO_STAGES:
        raise ValueError(f"zero stage must be one of {ZERO_STAGES}; got {stage!r}")
    return int(stage)


def zero_spec(spec: P, shape, mesh, data_axes=DATA_AXES) -> P:
    """``spec`` with the unused data axes of ``mesh`` added to its largest evenly divisible dim."""
    entries = [(e,) if isinstance(e, str) else tuple(e or ()) for e in tuple(spec)]
    entries += [()] * (len(shape) - len(entries))
    used = {a for e in entries for a in e}
    free = tuple(a for a in data_axes if mesh.shape.get(a, 1) > 1 and a not in used)
    n = axis_size(mesh, free)
    if n == 1:
        return spec
    local = [size // axis_size(mesh, e) for size, e in zip(shape, entries)]
    dims = [d for d in range(len(shape)) if local[d] % n == 0]
    if not dims:
        return spec
    d = max(dims, key=lambda i: local[i])
    entries[d] = entries[d] + free
    return P(*[None if not e else (e[0] if len(e) == 1 else e) for e in entries])


def stage_sharding(sharding: NamedSharding, shape, stage: int, kind: str) -> NamedSharding:
    """The sharding of a ``kind`` ("params", "grads", "opt_state") leaf at ZeRO ``stage``."""
    if kind not in _FIRST_STAGE:
        raise ValueError(f"kind must be one of {tuple(_FIRST_STAGE)}; got {kind!r}")
    if validate_zero_stage(stage) < _FIRST_STAGE[kind]:
        return sharding
    return NamedSharding(sharding.mesh, zero_spec(sharding.spec, shape, sharding.mesh))


def model_state_bytes(num_params: int, stage: int, n: int) -> float:
    """Per-device bytes of mixed-precision Adam model state (ZeRO paper, section 3): 2 bytes of
    fp16/bf16 params, 2 of grads, 12 of fp32 master copy, momentum and variance per parameter."""
    stage = validate_zero_stage(stage)
    params, grads, opt = 2.0, 2.0, 12.0
    return num_params * (params / (n if stage >= 3 else 1) + grads / (n if stage >= 2 else 1)
                         + opt / (n if stage >= 1 else 1))


class TrainShardings(NamedTuple):
    """NamedShardings a train step jits with: in/out for params and opt_state, grads inside."""
    params: Any
    grads: Any
    opt_state: Any


def train_shardings(params, param_axes, rules, mesh, stage: int, optimizer=None) -> TrainShardings:
    """Shardings of params, grads and optimizer state from logical axes, rules and ZeRO stage.

    ``params`` may hold arrays or ShapeDtypeStructs; ``param_axes`` is the matching pytree of
    logical-axes tuples (``rules.tree_axes`` for NNX states). Optimizer-state leaves shaped like
    params follow their param (``optax.tree_map_params``); other leaves (counts) are replicated.
    """
    stage = validate_zero_stage(stage)
    model = tree_shardings(params, param_axes, rules, mesh)
    per_kind = {k: jax.tree.map(lambda s, x: stage_sharding(s, x.shape, stage, k), model, params)
                for k in _FIRST_STAGE}
    opt = None
    if optimizer is not None:
        opt_shapes = jax.eval_shape(optimizer.init, params)
        replicated = NamedSharding(mesh, P())

        def opt_leaf(x, s):  # a leaf of another rank or size (Adafactor's factored moments and
            # the (1,)-shaped placeholders it keeps for unfactored vectors) has no param layout
            s = s if _splits(x.shape, s) else replicated
            return stage_sharding(s, x.shape, stage, "opt_state")

        try:
            opt = optax.tree_map_params(
                optimizer, opt_leaf, opt_shapes, model,
                transform_non_params=lambda _: replicated,
                is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
        except (ValueError, TypeError):  # per-parameter state not shaped like the params tree (SM3's
            opt = _by_key_path(opt_shapes, model, opt_leaf, replicated)  # per-axis accumulators)
    return TrainShardings(per_kind["params"], per_kind["grads"], opt)


def _by_key_path(state, shardings, leaf_fn, other):
    """Shardings of the optimizer ``state`` matched to the parameters' ``shardings`` by key path: a
    leaf whose path ends with a parameter's path gets ``leaf_fn(leaf, that sharding)``, others
    ``other``."""
    by_path = dict(jax.tree_util.tree_leaves_with_path(shardings, is_leaf=lambda x: isinstance(x, NamedSharding)))

    def one(path, leaf):
        for end in range(len(path), 0, -1):  # a parameter's state, or a part of it (8-bit Adam's codes, absmax)
            for start in range(end):
                if tuple(path[start:end]) in by_path:
                    return leaf_fn(leaf, by_path[tuple(path[start:end])])
        return other

    return jax.tree_util.tree_map_with_path(one, state)


def _splits(shape, sharding: NamedSharding) -> bool:
    """Whether ``sharding``'s spec fits an array of ``shape``: no more entries than dimensions,
    each dimension divisible by its mesh axes."""
    if len(sharding.spec) > len(shape):
        return False
    try:
        check_divisible(shape, sharding.spec, sharding.mesh, "optimizer state")
    except ValueError:
        return False
    return True


def batch_sharding(shape, axes, rules, mesh) -> NamedSharding:
    """Sharding for a batch array with logical ``axes`` (e.g. ("batch", "seq")), size-checked."""
    return logical_sharding(axes, shape, rules, mesh, f"batch {tuple(axes)}")


def reduce_scatter_value_and_grad(loss_fn: Callable, mesh, grad_shardings, data_axes=DATA_AXES):
    """ZeRO-2 gradients: ``fn(params, batch) -> (loss, grads)`` with grads reduce-scattered.

    ``loss_fn(params, batch)`` must return the mean loss over its batch. Each device runs it on
    its slice of the batch (dim 0 split over ``data_axes``) with a full copy of the params, then
    ``psum_scatter`` sums and splits each gradient along the dim its ZeRO-2 sharding names;
    gradients with no data-sharded dim are ``pmean``-ed. Mesh axes outside ``data_axes`` must
    have size 1: tensor/sequence parallelism go through GSPMD (ZeRO stage shardings) instead.
    """
    others = {a: s for a, s in mesh.shape.items() if a not in data_axes and s > 1}
    if others:
        raise ValueError(f"the ZeRO-2 shard_map path shards over {data_axes} only; mesh also has {others}")
    axes = tuple(a for a in data_axes if mesh.shape.get(a, 1) > 1)
    n = axis_size(mesh, axes)
    grad_specs = jax.tree.map(lambda s: s.spec, grad_shardings)

    def scatter(g, spec):
        for dim, entry in enumerate(tuple(spec)):
            if entry is not None:
                return jax.lax.psum_scatter(g, entry, scatter_dimension=dim, tiled=True) / n
        return jax.lax.pmean(g, axes) if axes else g

    def local(params, batch):
        # Mark the replicated params device-varying, so autodiff returns each device's own
        # gradient rather than inserting an all-reduce for us; psum_scatter does the sum.
        params = jax.lax.pcast(params, axes, to="varying") if axes else params
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        loss = jax.lax.pmean(loss, axes) if axes else loss
        return loss, jax.tree.map(scatter, grads, grad_specs)

    def fn(params, batch):
        for x in jax.tree.leaves(batch):
            check_divisible(x.shape[:1], P(axes or None), mesh, "batch")
        batch_specs = jax.tree.map(lambda _: P(axes or None), batch)
        param_specs = jax.tree.map(lambda _: P(), params)
        return jax.shard_map(local, mesh=mesh, in_specs=(param_specs, batch_specs),
                             out_specs=(P(), grad_specs))(params, batch)

    return fn
