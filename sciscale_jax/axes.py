"""The one vocabulary of logical axis names used by every model's variables and activations.

Rule tables in ``sciscale_jax.parallel`` map these names to mesh axes; a model never names
a mesh axis itself. It is a leaf module (no imports), so every technique may use it.
"""

BATCH = "batch"
SEQ = "seq"
EMBED = "embed"
HEADS = "heads"
KV = "kv"            # per-head feature dimension (head_dim)
MLP = "mlp"
VOCAB = "vocab"
LAYERS = "layers"    # the stacked-layer axis under scan_layers
MSA_SEQ = "msa_seq"  # Evoformer: sequences of the MSA
RES = "res"          # Evoformer: residues
PAIR = "pair"        # Evoformer: pair-representation channels

__all__ = ["BATCH", "SEQ", "EMBED", "HEADS", "KV", "MLP", "VOCAB", "LAYERS", "MSA_SEQ", "RES", "PAIR",
           "LOGICAL_AXES"]

LOGICAL_AXES = (BATCH, SEQ, EMBED, HEADS, KV, MLP, VOCAB, LAYERS, MSA_SEQ, RES, PAIR)
