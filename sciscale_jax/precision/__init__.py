"""sciscale_jax.precision: dtype policies, dynamic loss scaling, fp8 matmuls."""

from sciscale_jax.precision.fp8 import (PARAMS_AND_FP8, Fp8Config, Fp8Linear, Fp8Matmul, Fp8Meta,
                                        apply_fp8_meta, fp8_grad_fn, fp8_matmul, fp8_paths)
from sciscale_jax.precision.loss_scale import (DynamicLossScale, LossScaleState, SkipNonFiniteState,
                                               all_finite, dynamic_loss_scaling, loss_scale_metrics,
                                               loss_scale_of, skip_nonfinite)
from sciscale_jax.precision.policy import POLICIES, Policy, get_policy

__all__ = [
    "PARAMS_AND_FP8", "Fp8Config", "Fp8Linear", "Fp8Matmul", "Fp8Meta", "apply_fp8_meta",
    "fp8_grad_fn", "fp8_matmul", "fp8_paths",
    "DynamicLossScale", "LossScaleState", "SkipNonFiniteState", "all_finite", "dynamic_loss_scaling",
    "loss_scale_metrics", "loss_scale_of", "skip_nonfinite",
    "POLICIES", "Policy", "get_policy",
]
