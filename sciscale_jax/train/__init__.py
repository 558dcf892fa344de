"""Train step, loop, checkpointing and metrics. Model-agnostic: recipes bring the model and loss."""

from sciscale_jax.train.checkpoint import Checkpointer, check_run_dir
from sciscale_jax.train.estimate import estimate as estimate_memory
from sciscale_jax.train.loop import TrainConfig, build_optimizer, evaluate, train, validation_metrics
from sciscale_jax.train.plan import plan as plan_memory
from sciscale_jax.train.sharding import Placement, pick_strategy, plan_placement
from sciscale_jax.train.step import (TrainState, accumulating_grad_fn, backprop_grad_fn, init_train_state, make_eval_step,
                                     make_train_step, make_zeroth_order_step, split_model)

__all__ = ["Checkpointer", "Placement", "TrainConfig", "TrainState", "accumulating_grad_fn", "backprop_grad_fn",
           "build_optimizer", "check_run_dir", "estimate_memory", "evaluate", "init_train_state", "make_eval_step", "make_train_step",
           "make_zeroth_order_step", "pick_strategy", "plan_memory", "plan_placement", "split_model", "train", "validation_metrics"]
