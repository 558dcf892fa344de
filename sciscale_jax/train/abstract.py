"""The train step of a run, built from shapes alone: for memory estimates and compile-only checks.

``abstract_run(recipe, model_config, train_config)`` builds what ``train.loop.train`` builds
(model config with the mesh's rule table, optimizer, loss scaling, placement, the step from the
loop's own ``_make_step``, the jit shardings and donation) but with every array replaced by a
``jax.ShapeDtypeStruct``: the model comes from ``nnx.eval_shape``, the optimizer state from
``jax.eval_shape(tx.init, ...)``, and the batch from the recipe's ``abstract_batch``, else from its
``batch_axes`` with the field dtypes of one tiny batch of the recipe's data (built once per
recipe and process).
Nothing is allocated or run; ``AbstractRun.compile()`` lowers and compiles the step as the
loop does.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import numpy as np
from flax import nnx

from sciscale_jax import axes as ax
from sciscale_jax import optim, parallel, precision, remat
from sciscale_jax.memory.measure import analysis_options
from sciscale_jax.parallel import offload as host_offload
from sciscale_jax.train.step import TrainState, abstract_train_state, split_model

# Logical batch axes and the run sizes they take (any other axis keeps the tiny batch's size).
_AXIS_SIZE = {ax.BATCH: lambda t, m: t.batch_size, ax.SEQ: lambda t, m: t.seq_len,
              ax.RES: lambda t, m: t.seq_len, ax.MSA_SEQ: lambda t, m: getattr(m, "num_seq", None)}


_FIELDS: dict = {}


def _field_dtypes(recipe) -> dict:
    """{field: (dtype, tiny shape)} of one batch of the recipe's data at batch 2, length 16."""
    from sciscale_jax.train.loop import TrainConfig

    if recipe.name in _FIELDS:
        return _FIELDS[recipe.name]
    cfg = TrainConfig(**{**recipe.train_defaults, "batch_size": 2, "seq_len": 16, "grad_accum": 1})
    batch = recipe.build_data(cfg, recipe.make_config()).train.batch(0)
    _FIELDS[recipe.name] = {k: (np.asarray(v).dtype, np.shape(v)) for k, v in batch.items()}
    return _FIELDS[recipe.name]


def abstract_batch(recipe, model_config, train_config) -> dict:
    """ShapeDtypeStructs of one training batch of this run: the recipe's ``abstract_batch``, else
    sized by the recipe's batch axes."""
    if recipe.abstract_batch is not None:
        return recipe.abstract_batch(model_config, train_config)
    out = {}
    for name, (dtype, tiny) in _field_dtypes(recipe).items():
        shape = []
        for axis, n in zip(recipe.axes_of(name, len(tiny)), tiny):
            size = _AXIS_SIZE.get(axis, lambda t, m: None)(train_config, model_config)
            shape.append(n if size is None else size)
        out[name] = jax.ShapeDtypeStruct(tuple(shape), dtype)
    return out


@dataclasses.dataclass(frozen=True)
class AbstractRun:
    """A run's jitted step with abstract arguments; ``place`` is None on one device."""

    step: object                 # jax.jit-ed step(state, batch)
    state: TrainState            # ShapeDtypeStructs (with shardings when placed)
    batch: dict                  # ShapeDtypeStructs
    place: object                # train.sharding.Placement or None
    model_config: object         # with the sharding table the run uses
    offload: frozenset
    trainable: object = None     # predicate on parameter key paths of what trains (LoRA); None: all

    def compile(self, *, analysis_only: bool = False):
        """The step compiled with the loop's XLA options; ``analysis_only`` adds
        ``memory.measure.analysis_options`` (a program to read, not to run)."""
        options = dict(remat.compiler_options(frozen_weights=self.trainable is not None))
        if analysis_only:
            options.update(analysis_options())
        with jax.set_mesh(self.place.mesh) if self.place is not None else _null():
            return self.step.lower(self.state, self.batch).compile(options)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_MODELS: dict = {}


@contextlib.contextmanager
def _whole_count_updates():
    """Within it, flax's ``RngStream`` replaces its draw count whole (``set_value``) rather than
    through ``count[...] += 1``: the same counts and keys, without the quadratic trace.

    Under a trace ``Variable.__setitem__`` probes the new count's ``.sharding``; on a tracer that
    raises an AttributeError whose message jax (0.10) builds by walking every equation traced
    so far, so building a model abstractly cost O(parameters x equations): 48 Evoformer blocks
    took about 10 minutes, 4.5 s with this (jax-ml/jax PR 40041 removes the walk). Where flax's
    stream does not look as expected, nothing is changed.
    """
    stream = getattr(nnx, "RngStream", None)
    original = getattr(stream, "__call__", None)
    if original is None:
        yield
        return

    def draw(self):
        count = getattr(self, "count", None)
        if not (hasattr(count, "set_value") and hasattr(count, "get_value") and hasattr(self, "key")):
            return original(self)
        if hasattr(count, "_check_can_update"):
            count._check_can_update()
        key = jax.random.fold_in(self.key[...], count[...])
        count.set_value(count.get_value() + 1)
        return key

    stream.__call__ = draw
    try:
        yield
    finally:
        stream.__call__ = original


def eval_shape_module(build):
    """``nnx.eval_shape(build)`` in time linear in the model's size (see ``_whole_count_updates``)."""
    with _whole_count_updates():
        return nnx.eval_shape(build)


def abstract_model(recipe, model_config, seed: int = 0):
    """(graphdef, params, rest, param_axes, fp8 paths) of the recipe's model from ``nnx.eval_shape``
    (kept per recipe, config and seed in this process: the planner asks for the same model often)."""
    key = (recipe.name, model_config, seed)
    if key not in _MODELS:
        if len(_MODELS) > 64:
            _MODELS.clear()
        model = eval_shape_module(lambda: recipe.build_model(model_config, nnx.Rngs(seed)))
        _MODELS[key] = (*split_model(model), parallel.param_axes(model), precision.fp8_paths(model))
    return _MODELS[key]


def abstract_run(recipe, model_config, train_config) -> AbstractRun:
    """The step ``train.loop.train`` would compile for this run, with abstract state and batch."""
    from sciscale_jax.parallel import dap
    from sciscale_jax.train import pipeline as pipeline_run
    from sciscale_jax.train import validate
    from sciscale_jax.models.stack import check_lora_train
    from sciscale_jax.train.loop import _make_step, run_optimizer, trainable
    from sciscale_jax.train.sharding import pick_strategy, plan_placement

    cfg = train_config
    validate.check_run(model_config, cfg)
    pipeline_run.check_run(recipe, model_config, cfg)
    mesh_config = parallel.ParallelConfig.parse(cfg.mesh).resolve(jax.device_count()) if cfg.mesh else None
    if mesh_config is not None:
        dap.check_dap(mesh_config.sizes(), getattr(model_config, "attention", "xla"),
                      getattr(model_config, "supports_dap", False), f"{recipe.name} model")
    if mesh_config is not None and model_config.sharding is None:
        model_config = dataclasses.replace(model_config, sharding=pick_strategy(mesh_config))
    offload = host_offload.parse_offload(cfg.offload) if cfg.offload else frozenset()
    graphdef, params, rest, param_axes, fp8 = abstract_model(recipe, model_config, cfg.seed)
    policy = precision.get_policy(model_config.precision)
    tx = run_optimizer(cfg, model_config)
    state = abstract_train_state(params, rest, tx)
    batch = abstract_batch(recipe, model_config, cfg)
    pipeline_run.check_layers(recipe, cfg, params)
    check_lora_train(model_config, params)
    place = None
    if mesh_config is not None:
        place = plan_placement(mesh_config, model_config.sharding, cfg.zero, state, param_axes, tx, batch,
                               model_sharding=model_config.sharding, batch_axes=recipe.axes_of,
                               rule_overrides=pipeline_run.rule_overrides(recipe, cfg, params))
    kwargs = place.step_kwargs() if place is not None and not optim.is_zeroth_order(cfg.optimizer) else {}
    step = _make_step(cfg, graphdef, tx, recipe.loss_fn, fp8, policy.loss_scaling, offload, kwargs, None,
                      pipeline_run.grad_fn(recipe, model_config, cfg, graphdef, place), trainable(model_config))
    jit_kw = dict(donate_argnums=0)
    state_sh = batch_sh = None
    if place is not None:
        state_sh, batch_sh = place.state, place.batch
    if offload:
        dev = jax.devices()[0]
        def kind_of(tree_name, sh_tree, tree):
            kind = "pinned_host" if tree_name in offload else "device"
            if sh_tree is None:
                s = jax.sharding.SingleDeviceSharding(dev, memory_kind=kind)
                return jax.tree.map(lambda _: s, tree)
            return jax.tree.map(lambda s: s.with_memory_kind(kind), sh_tree)
        if state_sh is None:
            rep = jax.sharding.SingleDeviceSharding(dev)
            state_sh = TrainState(rep, jax.tree.map(lambda _: rep, params), jax.tree.map(lambda _: rep, rest),
                                  jax.tree.map(lambda _: rep, state.opt_state))
        state_sh = state_sh._replace(params=kind_of("params", state_sh.params, params),
                                     opt_state=kind_of("opt_state", state_sh.opt_state, state.opt_state))
    if state_sh is not None:
        jit_kw.update(in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None))
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)
        if batch_sh is not None:
            batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in batch.items()}
    return AbstractRun(jax.jit(step, **jit_kw), state, batch, place, model_config, offload, trainable(model_config))
