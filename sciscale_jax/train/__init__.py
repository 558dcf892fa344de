"""Train step, loop, checkpointing and metrics."""

from sciscale_jax.train.checkpoint import Checkpointer, check_run_dir
from sciscale_jax.train.loop import TrainConfig, build_optimizer, evaluate, train
from sciscale_jax.train.step import (TrainState, accumulating_grad_fn, backprop_grad_fn, causal_lm_loss, init_train_state, make_eval_step,
                                     make_train_step, make_zeroth_order_step, mlm_loss, split_model, token_cross_entropy)

__all__ = ["Checkpointer", "accumulating_grad_fn", "TrainConfig", "TrainState", "backprop_grad_fn", "build_optimizer", "causal_lm_loss",
           "check_run_dir", "evaluate", "init_train_state", "make_eval_step", "make_train_step", "make_zeroth_order_step", "mlm_loss",
           "split_model", "token_cross_entropy", "train"]
