"""sciscale_jax.optim: memory-efficient optax transforms (first and zeroth order) and state accounting."""

from sciscale_jax.optim.accounting import format_report, state_bytes, state_report
from sciscale_jax.optim.adam_mini import adam_mini, transformer_partition
from sciscale_jax.optim.adamw_8bit import adamw_8bit
from sciscale_jax.optim.came import came
from sciscale_jax.optim.decay_mask import default_decay_mask
from sciscale_jax.optim.deepzero import deepzero, zo_grasp_densities
from sciscale_jax.optim.mezo import mezo
from sciscale_jax.optim.optax_aliases import adafactor, adamw, lion
from sciscale_jax.optim.registry import OPTIMIZERS, get_optimizer, is_zeroth_order
from sciscale_jax.optim.sm3 import sm3
from sciscale_jax.optim.zo_adamu import zo_adamu

__all__ = [
    "OPTIMIZERS", "adafactor", "adam_mini", "adamw", "adamw_8bit", "came", "deepzero", "default_decay_mask", "format_report",
    "get_optimizer", "is_zeroth_order", "lion", "mezo", "sm3", "state_bytes", "state_report",
    "transformer_partition", "zo_adamu", "zo_grasp_densities",
]
