"""Tokenizers and loaders of real scientific data."""

from sciscale_jax.data.mlm import MLMBatches, crop_and_pad, mask_tokens, unigram_perplexity
from sciscale_jax.data.protein import ProteinTokenizer, load_proteins, pyhmmer_protein_file, read_fasta, split_by_sequence
from sciscale_jax.data.smiles import CausalLMBatches, NGramModel, SmilesTokenizer, generation_metrics, load_molecules, split_by_hash

__all__ = ["MLMBatches", "ProteinTokenizer", "crop_and_pad", "load_proteins", "mask_tokens",
           "pyhmmer_protein_file", "read_fasta", "split_by_sequence", "unigram_perplexity",
           "CausalLMBatches", "NGramModel", "SmilesTokenizer", "generation_metrics", "load_molecules", "split_by_hash"]
