"""Placing a training run on a device mesh: parameters, optimizer state and batches.

The mesh comes from ``--mesh data=2,fsdp=2,tensor=2``; the rule table from the mesh's shape
(or ``--sharding``); the ZeRO stage decides what else is split over the data axes. The step
is then jitted with these shardings, and GSPMD inserts the collectives. The step constrains
its gradients to ``Placement.grads`` (``make_train_step(..., **place.step_kwargs())``); for
ZeRO-2 on a data-parallel mesh it reduce-scatters them itself (``psum_scatter``).
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from sciscale_jax import parallel
from sciscale_jax.parallel import axes as ax
from sciscale_jax.train.step import TrainState


def pick_strategy(config: parallel.ParallelConfig) -> str:
    """The rule table that fits a mesh: 2-D TP, FSDP x TP, TP, FSDP, else data parallel."""
    if config.tensor2 > 1:
        return "tp2d"
    if config.tensor > 1:
        return "fsdp_tp" if config.fsdp > 1 else "tp"
    return "fsdp" if config.fsdp > 1 else "dp"


def resolve_strategy(mesh_spec, strategy: str | None = "auto") -> str:
    """``strategy``, or for "auto"/None the one :func:`pick_strategy` gives the mesh ``mesh_spec``."""
    if strategy not in (None, "auto"):
        parallel.rules_for(strategy)
        return strategy
    return pick_strategy(_parallel_config(mesh_spec))


def _parallel_config(mesh_spec) -> parallel.ParallelConfig:
    """A ``ParallelConfig`` from itself or from a mesh string (parsed here, at the boundary)."""
    if isinstance(mesh_spec, parallel.ParallelConfig):
        return mesh_spec.resolve(jax.device_count())
    return parallel.ParallelConfig.parse(mesh_spec).resolve(jax.device_count())


@dataclasses.dataclass(frozen=True)
class Placement:
    mesh: jax.sharding.Mesh
    rules: tuple
    state: TrainState      # shardings of the train state
    batch: dict            # shardings of one batch
    grads: object          # shardings gradients are constrained to (ZeRO-2/3 split them)
    reduce_scatter: bool = False  # ZeRO-2 on a data-parallel mesh: gradients by psum_scatter

    def step_kwargs(self) -> dict:
        """The ``make_train_step`` arguments that apply this placement's gradient sharding."""
        return {"grad_shardings": self.grads, "reduce_scatter": self.reduce_scatter}


def _data_parallel_only(mesh) -> bool:
    return all(n == 1 for a, n in mesh.shape.items() if a not in parallel.DATA_AXES)


def plan_placement(mesh_spec, strategy: str | None, zero: int, state: TrainState, param_axes, tx,
                   batch_example: dict, *, model_sharding: str | None, batch_axes=None,
                   rule_overrides=None) -> Placement:
    """Shardings for a run on the mesh ``mesh_spec`` (a string or a ``ParallelConfig``).

    ``strategy`` names the rule table (None or "auto": picked from the mesh). The model's
    activation constraints must follow the same table: pass the model config's ``sharding`` as
    ``model_sharding`` and a model built without it (or with another table) is refused, since
    its activations would then be left to GSPMD (under FSDP, several times the temporaries).
    ``batch_axes(field, ndim)`` gives each batch field's logical axes (default: batch, seq).
    ``rule_overrides`` replace rules of the table (``parallel.rules_for``). ValueErrors name
    sizes that do not divide.
    """
    config = _parallel_config(mesh_spec)
    name = resolve_strategy(config, strategy)
    if model_sharding != name:
        raise ValueError(f"the model constrains its activations with sharding={model_sharding!r} but the "
                         f"parameters are placed with {name!r}: build the model config with sharding={name!r}")
    mesh = parallel.make_mesh(config)
    rules = parallel.rules_for(name, rule_overrides)
    shard = parallel.train_shardings(state.params, param_axes, rules, mesh, zero, tx)
    replicated = NamedSharding(mesh, P())
    state_sh = TrainState(replicated, shard.params, jax.tree.map(lambda _: replicated, state.rest), shard.opt_state)
    axes_of = batch_axes or (lambda field, ndim: (ax.BATCH, ax.SEQ)[:ndim])
    batch_sh = {k: parallel.batch_sharding(v.shape, axes_of(k, v.ndim), rules, mesh)
                for k, v in batch_example.items()}
    # ZeRO-2 with replicated parameters on a data-parallel mesh: reduce-scatter by hand (XLA on
    # CPU never turns GSPMD's all-reduce + slice into a reduce-scatter).
    reduce_scatter = (zero == 2 and _data_parallel_only(mesh)
                      and all(s.is_fully_replicated for s in jax.tree.leaves(shard.params))
                      and not all(s.is_fully_replicated for s in jax.tree.leaves(shard.grads)))
    return Placement(mesh, rules, state_sh, batch_sh, shard.grads, reduce_scatter)


def compile_train_step(step, place: Placement, state: TrainState, batch_example: dict, *, donate: bool = True):
    """``step`` jitted with ``place``'s shardings (as the train loop jits it), lowered and compiled."""
    with jax.set_mesh(place.mesh):
        jitted = jax.jit(step, in_shardings=(place.state, place.batch), out_shardings=(place.state, None),
                         donate_argnums=0 if donate else ())
        return jitted.lower(state, batch_example).compile()
