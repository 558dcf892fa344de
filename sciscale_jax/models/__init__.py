"""Flax NNX models."""

from sciscale_jax.models.climax import ClimaX, ClimaXConfig
from sciscale_jax.models.evoformer import (DistogramHead, Evoformer, EvoformerBlock, EvoformerConfig, EvoformerStack,
                                           InputEmbedder, MaskedMsaHead)
from sciscale_jax.models.evoformer_params import export_alphafold_evoformer, load_alphafold_evoformer
from sciscale_jax.models.transformer import Transformer, TransformerConfig, attention_maps, hidden_states

__all__ = ["ClimaX", "ClimaXConfig", "DistogramHead", "Evoformer", "EvoformerBlock", "EvoformerConfig", "EvoformerStack", "InputEmbedder",
           "MaskedMsaHead", "Transformer", "TransformerConfig", "export_alphafold_evoformer",
           "hidden_states", "attention_maps", "load_alphafold_evoformer"]
