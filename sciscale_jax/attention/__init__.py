"""Attention: one front door, implementations behind it."""

from sciscale_jax.attention.chunked import chunked_attention
from sciscale_jax.attention.core import (AUTO_CHUNKED_MIN_LEN, IMPLS, MODULE_IMPLS, Impl, available, check_dtypes,
                                         check_segments, check_shapes, config_impls, dot_product_attention,
                                         register, resolve_impl, segment_mask, validate_impl)
from sciscale_jax.attention.cudnn import check_cudnn, cudnn_attention
from sciscale_jax.attention.linformer import LinformerAttention, LinformerProjection
from sciscale_jax.attention.performer import FeatureSeed, PerformerAttention, orthogonal_features
from sciscale_jax.attention.xla import xla_attention

__all__ = [
    "AUTO_CHUNKED_MIN_LEN", "IMPLS", "MODULE_IMPLS", "Impl", "FeatureSeed", "LinformerAttention", "LinformerProjection",
    "PerformerAttention", "available", "check_cudnn", "check_dtypes", "check_shapes", "chunked_attention", "config_impls",
    "cudnn_attention", "dot_product_attention", "orthogonal_features", "register", "resolve_impl",
    "check_segments", "segment_mask", "validate_impl", "xla_attention",
]
