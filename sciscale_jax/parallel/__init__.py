"""Meshes, logical-axis rules and parallel strategies."""

from sciscale_jax.parallel.axes import LOGICAL_AXES
from sciscale_jax.parallel.mesh import DATA_AXES, MESH_AXES, ParallelConfig, axis_size, make_mesh
from sciscale_jax.parallel.pipeline import (check_pipeline_args, from_device_layout, pipeline_value_and_grad,
                                            to_device_layout)
from sciscale_jax.parallel.pipeline_model import (PipelineStages, merge_stages, pipeline_grad_fn, split_stages,
                                                  stage_layer_counts)
from sciscale_jax.parallel.pipeline_schedule import SCHEDULES as PIPELINE_SCHEDULES
from sciscale_jax.parallel.pipeline_schedule import Schedule, analytic_bubble, make_schedule
from sciscale_jax.parallel.ring import ring_attention, zigzag_permutation
from sciscale_jax.parallel.rules import (RULES, logical_sharding, logical_to_mesh, param_axes, rules_for, shard_params,
                                         tree_axes, tree_shardings, with_logical_constraint)
from sciscale_jax.parallel.ulysses import ulysses_attention
from sciscale_jax.parallel.zero import (ZERO_STAGES, TrainShardings, batch_sharding, model_state_bytes,
                                        reduce_scatter_value_and_grad,
                                        stage_sharding, train_shardings, validate_zero_stage, zero_spec)

__all__ = [
    "DATA_AXES", "LOGICAL_AXES", "MESH_AXES", "PIPELINE_SCHEDULES", "RULES", "Schedule", "analytic_bubble",
    "PipelineStages", "check_pipeline_args", "from_device_layout", "make_schedule", "merge_stages", "pipeline_grad_fn",
    "pipeline_value_and_grad", "split_stages", "stage_layer_counts", "to_device_layout", "ZERO_STAGES", "ParallelConfig", "TrainShardings",
    "axis_size", "batch_sharding", "logical_sharding", "logical_to_mesh", "make_mesh", "model_state_bytes", "param_axes",
    "reduce_scatter_value_and_grad", "ring_attention", "rules_for", "shard_params", "stage_sharding",
    "train_shardings", "tree_axes", "tree_shardings", "ulysses_attention", "validate_zero_stage",
    "with_logical_constraint", "zero_spec", "zigzag_permutation",
]
