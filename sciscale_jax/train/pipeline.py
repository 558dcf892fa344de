"""Training on a mesh with a ``pipeline`` axis: the run's checks, made before anything compiles,
and the step's ``grad_fn`` from the recipe's ``PipelineStages`` (``parallel.pipeline_model``).

``TrainConfig.pipeline_schedule`` names the schedule (gpipe, 1f1b, interleaved, zbh1),
``microbatches`` the microbatches per step (0: as many as pipeline stages) and
``virtual_stages`` the model chunks per device (interleaved). Without a pipeline axis they are
ignored, so a checkpoint written by a pipelined run resumes on any mesh.
"""

from __future__ import annotations

import jax

from sciscale_jax import _validate, optim, parallel
from sciscale_jax.parallel.pipeline import check_pipeline_args
from sciscale_jax.parallel.pipeline_schedule import SCHEDULES
from sciscale_jax.parallel.axes import LAYERS

# mesh axes a pipeline runs with: microbatch rows split over data and fsdp (parameters split over
# them too with fsdp rule tables or ZeRO-3), tensor parallel by GSPMD inside the stages; sequence
# parallel attention and DAP run shard_maps of their own, which do not nest in the pipeline's
COMPOSABLE_AXES = ("pipeline", "data", "fsdp", "tensor")


def check_config(cfg) -> None:
    """The pipeline fields of a ``TrainConfig`` on their own (ValueError, one line)."""
    if not isinstance(cfg.pipeline_schedule, str) or cfg.pipeline_schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {cfg.pipeline_schedule!r}; known: {', '.join(SCHEDULES)}")
    _validate.integer(cfg.microbatches, "microbatches", minimum=0)  # 0: as many as pipeline stages
    _validate.integer(cfg.virtual_stages, "virtual_stages", minimum=1)
    if cfg.virtual_stages > 1 and cfg.pipeline_schedule != "interleaved":
        raise ValueError(f"virtual_stages={cfg.virtual_stages} needs pipeline_schedule 'interleaved'; "
                         f"got {cfg.pipeline_schedule!r}")


def pipeline_size(cfg) -> int:
    """Devices on the run's pipeline axis (1 without one)."""
    if not cfg.mesh:
        return 1
    return parallel.ParallelConfig.parse(cfg.mesh).resolve(jax.device_count()).pipeline


def microbatches(cfg) -> int:
    return cfg.microbatches or pipeline_size(cfg)


def check_run(recipe, model_config, cfg) -> None:
    """A pipelined run's settings, before data or model are built (ValueError, one line)."""
    p = pipeline_size(cfg)
    if p == 1:
        return
    if recipe.pipeline is None:
        raise ValueError(f"recipe {recipe.name!r} gives no pipeline stages (Recipe.pipeline); run it on a mesh "
                         f"without a pipeline axis (mesh={cfg.mesh!r})")
    if not getattr(model_config, "scan_layers", False):
        raise ValueError(f"mesh pipeline={p} splits the stacked layer stack into stages: add --scan-layers")
    if optim.is_zeroth_order(cfg.optimizer):
        raise ValueError(f"the zeroth-order optimizer {cfg.optimizer!r} takes no gradient; a pipeline axis "
                         f"(pipeline={p}) computes gradients")
    if cfg.grad_accum > 1:
        raise ValueError(f"grad_accum={cfg.grad_accum} with pipeline={p}: the pipeline already accumulates over "
                         f"its microbatches; use --microbatches")
    if getattr(model_config, "precision", "fp32") == "fp8":
        raise ValueError(f"precision 'fp8' updates its scales once per step outside the pipeline; not supported "
                         f"with pipeline={p}")
    if getattr(model_config, "lora_rank", 0):
        raise ValueError(f"lora_rank={model_config.lora_rank} with pipeline={p}: the pipeline differentiates "
                         "every parameter; run LoRA on data, fsdp and tensor axes")
    data = parallel.ParallelConfig.parse(cfg.mesh).resolve(jax.device_count())
    others = {a: n for a, n in data.sizes().items() if n > 1 and a not in COMPOSABLE_AXES}
    if others:
        raise ValueError(f"mesh pipeline={p} with {others}: the pipeline composes only with the axes "
                         f"{', '.join(a for a in COMPOSABLE_AXES if a != 'pipeline')}")
    check_pipeline_args(cfg.pipeline_schedule, stages=p, microbatches=microbatches(cfg),
                        virtual_stages=cfg.virtual_stages, batch_size=cfg.batch_size, data_size=data.data * data.fsdp)


def num_layers(recipe, params) -> int:
    """Layers in the recipe's stacked layer stack."""
    layers = params
    for key in recipe.pipeline.layers:
        layers = layers[key]
    return jax.tree.leaves(layers)[0].shape[0]


def check_layers(recipe, cfg, params) -> None:
    """Layers >= stages x virtual stages (ValueError, one line); needs the built model's parameters."""
    p = pipeline_size(cfg)
    if p > 1:
        check_pipeline_args(cfg.pipeline_schedule, num_layers=num_layers(recipe, params), stages=p,
                            microbatches=microbatches(cfg), virtual_stages=cfg.virtual_stages)


def rule_overrides(recipe, cfg, params) -> dict:
    """Rule-table overrides for the run: the stacked layer axis stays replicated when the
    pipeline axis does not divide the layer count (the rule tables split it over ``pipeline``)."""
    p = pipeline_size(cfg)
    if p > 1 and num_layers(recipe, params) % p:
        return {LAYERS: None}
    return {}


def grad_fn(recipe, model_config, cfg, graphdef, place):
    """The step's ``grad_fn`` on ``place`` (a ``train.sharding.Placement``, or None): the recipe's
    layer stack run by ``cfg.pipeline_schedule``; None when the mesh has no pipeline axis.
    Parameters the placement splits over data axes (fsdp rule tables, ZeRO-3) stay split inside
    the stages; gradients come back with the placement's gradient sharding (ZeRO-2/3)."""
    mesh = place.mesh if place is not None else None
    if mesh is None or mesh.shape.get("pipeline", 1) == 1:
        return None
    return recipe.pipeline.grad_fn(graphdef, mesh=mesh, schedule=cfg.pipeline_schedule,
                                   microbatches=microbatches(cfg), virtual_stages=cfg.virtual_stages,
                                   remat_policy=getattr(model_config, "remat", "none"),
                                   param_shardings=place.state.params, grad_shardings=place.grads)
