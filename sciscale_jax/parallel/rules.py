"""Logical-axis rule tables: which mesh axes shard each logical axis, one table per strategy.

A rule table is an ordered tuple of ``(logical_name, mesh_axes)`` pairs, ``mesh_axes`` a
mesh-axis name, a tuple of them, or None. Resolution walks the *rules* in order and gives
each logical dimension the mesh axes of its rule that no earlier dimension has taken (the
same first-come rule as MaxText / flax logical partitioning). Order is therefore priority:
in the Megatron sequence-parallel table ``heads`` and ``mlp`` come before ``seq``, so inside
the tensor-parallel region [batch, seq, heads, kv] shards heads over ``tensor``, while the
residual stream [batch, seq, embed] shards seq over ``tensor`` (Korthikanti et al. 2022).

Strategies (mesh axes of size 1 are no-ops, so one table also serves smaller meshes):

- ``dp``: batch over data (and fsdp); weights replicated. ZeRO stages add data sharding of
  optimizer state / gradients / weights on top (``zero.py``).
- ``fsdp``: as dp, plus weights' embed dimension sharded over fsdp (gathered at use).
- ``tp``: Megatron tensor parallel (Shoeybi et al. 2019): heads, mlp and vocab over tensor,
  so QKV and the first MLP layer are column-parallel and the output projections row-parallel.
- ``tp_sp``: tp plus Megatron sequence parallel: seq over tensor outside the TP region.
- ``tp2d``: 2D weight-stationary tensor parallel (Pope et al. 2022): embed over tensor2 and
  heads/mlp/vocab over tensor, for weights and activations alike.
- ``fsdp_tp``: fsdp x tp.

Every table maps ``seq`` to the ``sequence`` axis too, for Ulysses / ring attention, and the
stacked ``layers`` axis to ``pipeline`` (each pipeline device holds its stages' layers).
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from sciscale_jax.parallel import axes as ax
from sciscale_jax.parallel.mesh import DATA_AXES, axis_size

_BATCH = (ax.BATCH, DATA_AXES)
_SEQ = (ax.SEQ, "sequence")
_LAYERS = (ax.LAYERS, "pipeline")  # the stacked layer axis: consecutive layers per pipeline device
_TP = ((ax.HEADS, "tensor"), (ax.MLP, "tensor"), (ax.VOCAB, "tensor"))

RULES = {
    "dp": (_BATCH, _SEQ, _LAYERS),
    "fsdp": (_BATCH, _SEQ, (ax.EMBED, "fsdp"), _LAYERS),
    "tp": (_BATCH, *_TP, _SEQ, _LAYERS),
    "tp_sp": (_BATCH, *_TP, (ax.SEQ, ("sequence", "tensor")), _LAYERS),
    "tp2d": (_BATCH, *_TP, _SEQ, (ax.EMBED, "tensor2"), _LAYERS),
    "fsdp_tp": (_BATCH, *_TP, _SEQ, (ax.EMBED, "fsdp"), _LAYERS),
}


def splittable(logical) -> bool:
    """Whether some rule table shards the logical axis ``logical`` over a mesh axis (the head
    dimension ``kv``, for one, is never split)."""
    return logical is not None and any(name == logical for table in RULES.values() for name, _ in table)


def rules_for(strategy: str, overrides=None) -> tuple:
    """The rule table of ``strategy``; ``overrides`` (pairs or a dict) replace or add rules, first."""
    if strategy not in RULES:
        raise ValueError(f"unknown parallel strategy {strategy!r}; known: {', '.join(sorted(RULES))}")
    overrides = tuple(dict(overrides).items()) if isinstance(overrides, dict) else tuple(overrides or ())
    replaced = {name for name, _ in overrides}
    return overrides + tuple(r for r in RULES[strategy] if r[0] not in replaced)


def logical_to_mesh(axes, rules, mesh=None) -> P:
    """PartitionSpec for a tuple of logical names (None = replicated) under ``rules``.

    With ``mesh`` given, mesh axes it lacks or of size 1 are dropped.
    """
    axes = tuple(axes)
    out = [None] * len(axes)
    used: set[str] = set()
    for logical, mesh_axes in rules:
        if logical not in axes or mesh_axes is None:
            continue
        dim = axes.index(logical)
        if out[dim] is not None:  # an earlier rule for the same name already placed it
            continue
        names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        if mesh is not None:
            names = tuple(n for n in names if mesh.shape.get(n, 1) > 1)
        names = tuple(n for n in names if n not in used)
        if names:
            used.update(names)
            out[dim] = names[0] if len(names) == 1 else names
    return P(*out)


def check_divisible(shape, spec: P, mesh, what="array") -> None:
    """ValueError naming the sizes if a dimension of ``shape`` does not split evenly under ``spec``."""
    for dim, (size, names) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
        n = axis_size(mesh, names)
        if size % n:
            raise ValueError(f"{what}: dimension {dim} of size {size} is not divisible by "
                             f"{names}={n} (shape {tuple(shape)}, spec {spec})")


def logical_sharding(axes, shape, rules, mesh, what="array") -> NamedSharding:
    """NamedSharding for an array of ``shape`` with logical ``axes``, checked for divisibility."""
    if len(axes) != len(shape):
        raise ValueError(f"{what}: {len(axes)} logical axes {tuple(axes)} for shape {tuple(shape)}")
    spec = logical_to_mesh(axes, rules, mesh)
    check_divisible(shape, spec, mesh, what)
    return NamedSharding(mesh, spec)


def with_logical_constraint(x, axes, rules, mesh=None):
    """``with_sharding_constraint`` by logical names; a no-op when there is no mesh to shard over.

    ``rules`` is a table or a strategy name (``"tp_sp"``), so a model can take it from a config
    string; ``mesh`` defaults to the one set with ``jax.set_mesh``.
    """
    if rules is None:
        return x
    if isinstance(rules, str):
        rules = rules_for(rules)
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return x
    spec = logical_to_mesh(axes, rules, mesh)
    manual = {a for a, t in zip(mesh.axis_names, getattr(mesh, "axis_types", ()))
              if t == jax.sharding.AxisType.Manual}
    if manual:  # inside shard_map those axes are already split by hand: constrain only the others
        keep = lambda e: tuple(n for n in ((e,) if isinstance(e, str) else (e or ())) if n not in manual)  # noqa: E731
        spec = P(*[(k[0] if len(k) == 1 else (k or None)) for k in map(keep, spec)])
        if all(e is None for e in spec):
            return x
    check_divisible(x.shape, spec, mesh, f"activation {tuple(axes)}")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def variable_axes(variable):
    """Logical axes stored on a flax NNX variable (``with_partitioning`` / ``sharding`` metadata)."""
    meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    for key in ("out_sharding", "sharding_names", "sharding"):
        if meta.get(key) is not None:
            return tuple(meta[key])
    return None


def _is_variable(x) -> bool:
    return hasattr(x, "get_metadata") and hasattr(x, "replace")


def tree_axes(state):
    """Pytree of logical-axes tuples from an NNX state: each Variable becomes a copy holding
    its axes (None per dimension where unannotated), so the tree keeps the state's structure."""
    return jax.tree.map(lambda v: v.replace(variable_axes(v) or (None,) * v.get_value().ndim),
                        state, is_leaf=_is_variable)


def param_axes(model):
    """Pure dict of logical-axes tuples for ``nnx.Param``s, shaped like
    ``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` (the train state's params)."""
    from flax import nnx  # only this helper needs flax

    return nnx.to_pure_dict(tree_axes(nnx.state(model, nnx.Param)))


def tree_shardings(shapes, axes, rules, mesh):
    """NamedSharding per leaf from a pytree of arrays (or ShapeDtypeStructs) and a matching
    pytree of logical-axes tuples (``tree_axes`` builds it for NNX states)."""
    axes_leaves = jax.tree.leaves(axes, is_leaf=lambda a: isinstance(a, tuple))
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    if len(axes_leaves) != len(paths_leaves):
        raise ValueError(f"{len(axes_leaves)} logical-axes entries for {len(paths_leaves)} arrays")
    out = [logical_sharding(a, x.shape, rules, mesh, jax.tree_util.keystr(path))
           for a, (path, x) in zip(axes_leaves, paths_leaves)]
    return jax.tree.unflatten(treedef, out)


def shard_params(state, rules, mesh, axes=None):
    """Place ``state`` on ``mesh`` by its logical axes (read from NNX metadata unless given)."""
    if axes is None:
        axes = tree_axes(state)
    return jax.device_put(state, tree_shardings(state, axes, rules, mesh))
