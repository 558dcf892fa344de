"""sciscale_jax.quant: fake quantisation with straight-through gradients and QAT methods."""

from sciscale_jax.quant.bitnet import (BitLinear, BitMatmul, absmax_quant_tokens, binarize_weight,
                                       ternarize_weight)
from sciscale_jax.quant.efficient_qat import (FrozenWeight, GroupQuant, block_ap, block_ap_sequential,
                                              e2e_qp, fake_quant_group, freeze, init_group_quant,
                                              load_frozen, quantized_kernels)
from sciscale_jax.quant.fake_quant import fake_quant, quant_params, ste
from sciscale_jax.quant.llm_qat import QATMatmul, distillation_loss, quantize_kv, sample_from_teacher
from sciscale_jax.quant.registry import (QUANT_SCHEMES, Linear, QuantScheme, get_quant_scheme,
                                         kv_quantizer, make_linear, make_matmul, packed_weight_bytes)

__all__ = [
    "BitLinear", "BitMatmul", "absmax_quant_tokens", "binarize_weight", "ternarize_weight",
    "FrozenWeight", "GroupQuant", "block_ap", "block_ap_sequential", "e2e_qp", "fake_quant_group",
    "freeze", "init_group_quant", "load_frozen", "quantized_kernels", "fake_quant", "quant_params", "ste", "QATMatmul",
    "distillation_loss", "quantize_kv", "sample_from_teacher", "QUANT_SCHEMES", "Linear",
    "QuantScheme", "get_quant_scheme", "kv_quantizer", "make_linear", "make_matmul",
    "packed_weight_bytes",
]
