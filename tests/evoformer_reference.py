"""A float64 numpy transcription of AlphaFold 2's Evoformer (Jumper et al. 2021, supplementary
Algorithms 6-15 and 19), written from the paper independently of sciscale_jax's model code.
Parameters are read from a model's variables by name; everything else is plain numpy. Each
function takes one example (no batch axis). Masked keys are left out of the softmax; a query
with no key left attends to nothing (zero), the convention of the library's attention.
"""

import numpy as np


def P(x):
    """A parameter (nnx.Param) as a float64 numpy array."""
    return np.asarray(x[...], np.float64)


def layer_norm(x, ln):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * P(ln.scale) + P(ln.offset)


def linear(x, lin):
    return x @ P(lin.weights) + P(lin.bias)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def masked_softmax(logits, valid):
    """Softmax over the last axis among ``valid`` entries; all-invalid rows give zeros."""
    logits = np.where(valid, logits, -np.inf)
    top = logits.max(-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.where(valid, np.exp(logits - top), 0.0)
    total = e.sum(-1, keepdims=True)
    return e / np.where(total > 0, total, 1.0)


def gated_attention(x_nqc, bias_hqk, mask_nk, att):
    """Alg 7 lines 2-7 for each of n rows: q, k, v, gate g, softmax(q.k/sqrt(c) + b), Linear(g * o)."""
    d = P(att.query_w).shape[-1]
    q = np.einsum("nqc,chd->nqhd", x_nqc, P(att.query_w))
    k = np.einsum("nkc,chd->nkhd", x_nqc, P(att.key_w))
    v = np.einsum("nkc,chd->nkhd", x_nqc, P(att.value_w))
    g = sigmoid(np.einsum("nqc,chd->nqhd", x_nqc, P(att.gating_w)) + P(att.gating_b))
    logits = np.einsum("nqhd,nkhd->nhqk", q, k) / np.sqrt(d)
    if bias_hqk is not None:
        logits = logits + bias_hqk[None]
    a = masked_softmax(logits, mask_nk[:, None, None, :] > 0)
    o = g * np.einsum("nhqk,nkhd->nqhd", a, v)
    return np.einsum("nqhd,hdo->nqo", o, P(att.output_w)) + P(att.output_b)


def msa_row_attention(m, z, msa_mask, mod):
    """Alg 7: b_ij^h = LinearNoBias(LN(z_ij)); row-wise gated attention on LN(m)."""
    b_hij = np.einsum("ijc,ch->hij", layer_norm(z, mod.feat_2d_norm), P(mod.feat_2d_weights))
    return gated_attention(layer_norm(m, mod.query_norm), b_hij, msa_mask, mod.attention)


def msa_column_attention(m, msa_mask, mod):
    """Alg 8: gated attention along each column (over sequences s)."""
    x = layer_norm(m, mod.query_norm).transpose(1, 0, 2)
    return gated_attention(x, None, msa_mask.T, mod.attention).transpose(1, 0, 2)


def msa_column_global_attention(m, msa_mask, mod):
    """Alg 19: per column i, one query per head from the mean over real sequences t."""
    att = mod.attention
    x = layer_norm(m, mod.query_norm)                     # [s, i, c]
    d = P(att.key_w).shape[-1]
    w = msa_mask[..., None]
    q_avg = (w * x).sum(0) / (w.sum(0) + 1e-10)           # [i, c]
    q = np.einsum("ic,chd->ihd", q_avg, P(att.query_w)) / np.sqrt(d)
    k = np.einsum("tic,cd->tid", x, P(att.key_w))
    v = np.einsum("tic,cd->tid", x, P(att.value_w))
    g = sigmoid(np.einsum("sic,chd->sihd", x, P(att.gating_w)) + P(att.gating_b))
    a = masked_softmax(np.einsum("ihd,tid->iht", q, k), msa_mask.T[:, None, :] > 0)
    o = g * np.einsum("iht,tid->ihd", a, v)[None]
    return np.einsum("sihd,hdo->sio", o, P(att.output_w)) + P(att.output_b)


def transition(x, mod):
    """Alg 9 / 15: Linear(relu(Linear(LN(x))))."""
    return linear(np.maximum(linear(layer_norm(x, mod.input_layer_norm), mod.transition1), 0.0), mod.transition2)


def outer_product_mean(m, msa_mask, mod):
    """Alg 10 with AlphaFold's normalisation: (sum_s a_si (x) b_sj W + b) / (1e-3 + sum_s mask_si mask_sj)."""
    x = layer_norm(m, mod.layer_norm_input)
    w = msa_mask[..., None]
    a, b = w * linear(x, mod.left_projection), w * linear(x, mod.right_projection)
    outer = np.einsum("sic,sje->ijce", a, b)
    out = np.einsum("ijce,cef->ijf", outer, P(mod.output_w)) + P(mod.output_b)
    return out / (1e-3 + np.einsum("si,sj->ij", msa_mask, msa_mask)[..., None])


def triangle_multiplication(z, pair_mask, mod, outgoing):
    """Alg 11 (sum_k a_ik * b_jk) and Alg 12 (sum_k a_ki * b_kj); AlphaFold's left_projection is
    the supplement's a for outgoing edges and its b for incoming edges."""
    x = layer_norm(z, mod.layer_norm_input)
    w = pair_mask[..., None]
    left = w * sigmoid(linear(x, mod.left_gate)) * linear(x, mod.left_projection)
    right = w * sigmoid(linear(x, mod.right_gate)) * linear(x, mod.right_projection)
    if outgoing:
        a, b = left, right
        t = np.einsum("ikc,jkc->ijc", a, b)
    else:
        a, b = right, left
        t = np.einsum("kic,kjc->ijc", a, b)
    g = sigmoid(linear(x, mod.gating_linear))
    return g * linear(layer_norm(t, mod.center_layer_norm), mod.output_projection)


def triangle_attention(z, pair_mask, mod, starting):
    """Alg 13: a_ijk = softmax_k(q_ij.k_ik/sqrt(c) + b_jk), keys (i,k) real; o_ij = g_ij * sum_k a v_ik.
    Alg 14: a_ijk = softmax_k(q_ij.k_kj/sqrt(c) + b_ki), keys (k,j) real; o_ij = g_ij * sum_k a v_kj."""
    att = mod.attention
    x = layer_norm(z, mod.query_norm)
    d = P(att.query_w).shape[-1]
    q = np.einsum("ijc,chd->ijhd", x, P(att.query_w))
    k = np.einsum("ijc,chd->ijhd", x, P(att.key_w))
    v = np.einsum("ijc,chd->ijhd", x, P(att.value_w))
    b = np.einsum("ijc,ch->hij", x, P(mod.feat_2d_weights))
    g = sigmoid(np.einsum("ijc,chd->ijhd", x, P(att.gating_w)) + P(att.gating_b))
    if starting:
        logits = np.einsum("ijhd,ikhd->ijhk", q, k) / np.sqrt(d) + b.transpose(1, 0, 2)[None]   # b[h,j,k]
        valid = (pair_mask[:, None, None, :] > 0)                                               # [i,1,1,k]
        a = masked_softmax(logits, valid)
        o = g * np.einsum("ijhk,ikhd->ijhd", a, v)
    else:
        logits = np.einsum("ijhd,kjhd->ijhk", q, k) / np.sqrt(d) + b.transpose(2, 0, 1)[:, None]  # b[h,k,i]
        valid = (pair_mask.T[None, :, None, :] > 0)                                              # [1,j,1,k]
        a = masked_softmax(logits, valid)
        o = g * np.einsum("ijhk,kjhd->ijhd", a, v)
    return np.einsum("ijhd,hdo->ijo", o, P(att.output_w)) + P(att.output_b)


def evoformer_block(m, z, msa_mask, pair_mask, block, extra=False):
    """Alg 6 lines 2-10 (AlphaFold's order, no dropout), one example."""
    m = m + msa_row_attention(m, z, msa_mask, block.msa_row_attention_with_pair_bias)
    if extra:
        m = m + msa_column_global_attention(m, msa_mask, block.msa_column_global_attention)
    else:
        m = m + msa_column_attention(m, msa_mask, block.msa_column_attention)
    m = m + transition(m, block.msa_transition)
    z = z + outer_product_mean(m, msa_mask, block.outer_product_mean)
    z = z + triangle_multiplication(z, pair_mask, block.triangle_multiplication_outgoing, True)
    z = z + triangle_multiplication(z, pair_mask, block.triangle_multiplication_incoming, False)
    z = z + triangle_attention(z, pair_mask, block.triangle_attention_starting_node, True)
    z = z + triangle_attention(z, pair_mask, block.triangle_attention_ending_node, False)
    z = z + transition(z, block.pair_transition)
    return m, z
