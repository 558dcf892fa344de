"""Checkpoint-name vocabulary and rematerialisation policies.

Every model tags its activations with ``jax.ad_checkpoint.checkpoint_name`` using the
names below, so one policy (a function of a name) decides what is kept, recomputed or
offloaded across all models. Policies follow Chen et al. 2016 (full recomputation) and
Korthikanti et al. 2022 (selective recomputation of the attention core).
"""

from __future__ import annotations

# Names of tagged activations, shared by every model in sciscale_jax.models.
LAYER_INPUT = "layer_input"    # the residual stream entering a block
ATTN_NORM = "attn_norm"        # pre-attention normalisation output
QKV = "qkv"                    # query/key/value projections
ATTN_LOGITS = "attn_logits"    # q.k^T (+ bias), before softmax
ATTN_PROBS = "attn_probs"      # softmax output (after dropout)
ATTN_CONTEXT = "attn_context"  # probs @ v, before the output projection
ATTN_OUT = "attn_out"          # attention block output (after out projection)
MLP_NORM = "mlp_norm"          # pre-MLP normalisation output
MLP_HIDDEN = "mlp_hidden"      # MLP hidden activation (after the gate / nonlinearity)
MLP_OUT = "mlp_out"            # MLP block output
LOGITS = "logits"              # final vocabulary logits

CHECKPOINT_NAMES = (
    LAYER_INPUT, ATTN_NORM, QKV, ATTN_LOGITS, ATTN_PROBS, ATTN_CONTEXT,
    ATTN_OUT, MLP_NORM, MLP_HIDDEN, MLP_OUT, LOGITS,
)

REMAT_POLICIES = ("none",)


def validate_remat(name: str) -> str:
    """Return ``name`` if it is a known remat policy, else raise a ValueError naming it."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; known: {', '.join(REMAT_POLICIES)}")
    return name
