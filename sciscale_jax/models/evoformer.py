"""AlphaFold 2's Evoformer in Flax NNX (Jumper et al. 2021, supplementary Algorithms 3-6, 19).

``EvoformerBlock`` is one ``EvoformerIteration`` of DeepMind's ``alphafold/model/modules.py``:
MSA row attention with pair bias, MSA column attention (global column attention in the
extra-MSA stack), MSA transition, outer product mean, triangle multiplication outgoing and
incoming, triangle attention around the starting and ending node, pair transition, each
added to its stream as a residual update in that order. Dropout follows AlphaFold's
``dropout_wrapper``: 0.15 on the MSA row update with one mask shared by all MSA rows, 0.25
on the triangle updates with one mask shared along the first residue axis (columns for the
ending-node attention); no dropout without a key. ``EvoformerStack`` runs N blocks with the
configured remat policy (on a mesh with a ``dap`` axis, sharded by Dynamic Axial Parallelism:
``evoformer_dap``); ``Evoformer`` adds the input embedder (Alg 3-5: target and MSA
features, outer sum, relative positions clipped at 32), the optional extra-MSA stack and two
heads (masked-MSA logits, symmetric distogram logits), and with ``num_recycle`` AlphaFold's
recycling (gradient-free passes feeding the recycling embedder). Parameter names mirror AlphaFold's,
so its parameter files load with ``evoformer_params.load_alphafold_evoformer``.

Sizes default to the AlphaFold monomer model; all are configurable. Shapes carry a leading
batch axis: m [B, S, R, c_m], z [B, R, R, c_z], masks [B, S, R] and [B, R, R].
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from sciscale_jax import attention, parallel, remat
from sciscale_jax.memory.estimate import expected_trips
from sciscale_jax.models.stack import Techniques, layer_keys, lora_trains, run_layers, stack_layers, store_frozen
from sciscale_jax.models.evoformer_modules import (LayerNorm, Linear, MsaColumnAttention, MsaColumnGlobalAttention,
                                                   MsaRowAttentionWithPairBias, OuterProductMean, Transition,
                                                   TriangleAttention, TriangleMultiplication)
from sciscale_jax.models import evoformer_dap
from sciscale_jax.parallel import axes as ax
from sciscale_jax.parallel import dap


@dataclasses.dataclass(frozen=True)
class EvoformerConfig(Techniques):
    """Evoformer sizes and switches; remat, scan_layers, attention, precision, sharding and dtypes
    are the shared technique fields it inherits (``models.stack.Techniques``)."""

    c_m: int = 256                # MSA channels
    c_z: int = 128                # pair channels
    c_e: int = 64                 # extra-MSA channels
    msa_heads: int = 8            # MSA row / column attention heads ...
    msa_head_dim: int = 32        # ... of this size
    pair_heads: int = 4           # triangle attention heads ...
    pair_head_dim: int = 32       # ... of this size
    extra_msa_heads: int = 8      # extra-MSA row and global column attention heads ...
    extra_msa_head_dim: int = 8   # ... of this size
    transition_factor: int = 4
    opm_channels: int = 32
    tri_mul_channels: int = 128
    msa_dropout: float = 0.15     # MSA row attention update, mask shared across MSA rows
    pair_dropout: float = 0.25    # triangle updates, mask shared along rows (columns: ending node)
    num_blocks: int = 48
    num_extra_blocks: int = 0     # AlphaFold runs 4 extra-MSA blocks before the main stack
    target_feat_dim: int = 22
    msa_feat_dim: int = 49
    extra_msa_feat_dim: int = 25
    max_relative_feature: int = 32
    msa_classes: int = 23         # masked-MSA head
    distogram_bins: int = 64
    recycle_first_pass: bool = False  # AlphaFold's recycling embedder on its first pass (previous outputs zero)
    num_recycle: int = dataclasses.field(default=0, metadata={  # AlphaFold's recycling (Evoformer.__call__)
        "help": "AlphaFold's recycling: each training step first runs 0..N passes (drawn uniformly) without "
                "gradient, each feeding its first MSA row and pair to the next pass's recycling embedder; "
                "evaluation runs N (AlphaFold: 3); 0: none"})
    chunk_size: int | None = None  # None: no chunking
    chunk_remat: bool = True      # recompute each chunk in the backward pass (memory O(chunk))
    remat_modules: bool = False   # also checkpoint each sub-module update inside the block
    supports_dap: ClassVar[bool] = True  # runs sharded on a mesh with a dap axis (evoformer_dap)
    supports_lora: ClassVar[bool] = True  # adapters on the blocks' attention projections (all: and Linears)

    def __post_init__(self):
        for name in ("c_m", "c_z", "c_e", "msa_heads", "msa_head_dim", "pair_heads", "pair_head_dim",
                     "extra_msa_heads", "extra_msa_head_dim", "transition_factor", "opm_channels",
                     "tri_mul_channels", "num_blocks", "target_feat_dim", "msa_feat_dim", "extra_msa_feat_dim",
                     "max_relative_feature", "msa_classes", "distogram_bins"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if isinstance(self.num_recycle, bool) or not isinstance(self.num_recycle, int) or self.num_recycle < 0:
            raise ValueError(f"num_recycle={self.num_recycle!r} must be a non-negative integer (0: no recycling)")
        if not isinstance(self.num_extra_blocks, int) or self.num_extra_blocks < 0:
            raise ValueError(f"num_extra_blocks={self.num_extra_blocks!r} must be a non-negative integer")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size <= 0):
            raise ValueError(f"chunk_size={self.chunk_size!r} must be None or a positive integer")
        for name in ("msa_dropout", "pair_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must lie in [0, 1)")
        attention.validate_impl(self.attention)
        if self.attention in attention.MODULE_IMPLS:
            raise ValueError(f"attention={self.attention!r} is approximate; the Evoformer needs an exact "
                             f"front-door implementation")
        remat.validate_remat(self.remat, self.num_blocks)
        if self.num_extra_blocks:  # the extra-MSA stack runs under the same policy
            remat.validate_remat(self.remat, self.num_extra_blocks)
        if self.lora_quant != "none":
            raise ValueError(f"lora_quant={self.lora_quant!r}: the Evoformer's frozen weights are stored in the compute "
                             "dtype (4-bit storage is built for the Transformer's dense layers); use lora_quant none")
        if self.quant != "none" or self.precision == "fp8":
            raise ValueError(f"quant={self.quant!r}, precision={self.precision!r}: the Evoformer has no QAT or fp8 "
                             "matmul hooks; use precision fp32, bf16 or fp16")
        super().__post_init__()
        if self.chunk_size is not None and self.remat != "none" and not self.scan_layers and self.num_blocks > 1:
            warnings.warn(f"chunk_size={self.chunk_size} with remat={self.remat!r} on an unrolled stack of "
                          f"{self.num_blocks} blocks: the compiled step does not reuse one block's chunk-loop buffers "
                          "for the next, so block remat saves little; scan_layers=True (--scan-layers) compiles the "
                          "loops once (benchmarks/results/evoformer_memory_384_scan.md)", stacklevel=3)



RECYCLE_BINS = 15  # AlphaFold's distogram of the previous pass's positions: 15 bins from 3.25 to 20.75 A


def shared_dropout(x, rate: float, key, shared_axis: int):
    """AlphaFold's dropout: one keep-mask broadcast along ``shared_axis``; identity without a key."""
    if key is None or rate == 0.0:
        return x
    shape = list(x.shape)
    shape[shared_axis] = 1
    keep = jax.random.bernoulli(key, 1.0 - rate, tuple(shape))
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class EvoformerBlock(nnx.Module):
    """One Evoformer block (Alg 6 lines 2-10); ``extra=True`` is the extra-MSA stack's block
    (c_e channels, global column attention, Alg 18-19)."""

    def __init__(self, config: EvoformerConfig, *, extra: bool = False, rngs: nnx.Rngs):
        cfg = self.config = config
        c_m = cfg.c_e if extra else cfg.c_m
        heads, head_dim = ((cfg.extra_msa_heads, cfg.extra_msa_head_dim) if extra
                           else (cfg.msa_heads, cfg.msa_head_dim))
        self.extra = extra
        self.msa_row_attention_with_pair_bias = MsaRowAttentionWithPairBias(c_m, cfg.c_z, heads, head_dim, cfg,
                                                                            rngs=rngs)
        if extra:
            self.msa_column_global_attention = MsaColumnGlobalAttention(c_m, heads, head_dim, cfg, rngs=rngs)
        else:
            self.msa_column_attention = MsaColumnAttention(c_m, heads, head_dim, cfg, rngs=rngs)
        self.msa_transition = Transition(c_m, cfg.transition_factor, ax.EMBED, 2, cfg, rngs=rngs)
        self.outer_product_mean = OuterProductMean(c_m, cfg.opm_channels, cfg.c_z, cfg, rngs=rngs)
        tri = dict(cfg=cfg, rngs=rngs)
        self.triangle_multiplication_outgoing = TriangleMultiplication(cfg.c_z, cfg.tri_mul_channels, True, **tri)
        self.triangle_multiplication_incoming = TriangleMultiplication(cfg.c_z, cfg.tri_mul_channels, False, **tri)
        self.triangle_attention_starting_node = TriangleAttention(cfg.c_z, cfg.pair_heads, cfg.pair_head_dim,
                                                                  True, **tri)
        self.triangle_attention_ending_node = TriangleAttention(cfg.c_z, cfg.pair_heads, cfg.pair_head_dim,
                                                                False, **tri)
        self.pair_transition = Transition(cfg.c_z, cfg.transition_factor, ax.PAIR, 1, cfg, rngs=rngs)

    def _update(self, module, *args):
        """module(*args); with ``remat_modules`` its backward recomputes it from its inputs."""
        if not self.config.remat_modules:
            return module(*args)
        return jax.checkpoint(lambda *a: module(*a), policy=jax.checkpoint_policies.nothing_saveable)(*args)

    def _streams(self, m_bsrc, z_brrc):
        """Constrain m and z by the rule table: the batch over the data axes, as the loop places the
        batch. Without it GSPMD may meet a ZeRO-3 weight split over ``data`` by gathering the
        activations over the batch instead of the weight. Without a mesh, a no-op."""
        rules = self.config.sharding
        m_bsrc = parallel.with_logical_constraint(m_bsrc, (ax.BATCH, ax.MSA_SEQ, ax.RES, ax.EMBED), rules)
        return m_bsrc, parallel.with_logical_constraint(z_brrc, (ax.BATCH, ax.RES, None, ax.PAIR), rules)

    def __call__(self, m_bsrc, z_brrc, msa_mask_bsr, pair_mask_brr, key=None):
        """(m, z) -> (m, z) after one block; ``key`` turns dropout on."""
        cfg, up = self.config, self._update
        keys = [None] * 5 if key is None else list(jax.random.split(key, 5))
        m_bsrc, z_brrc = self._streams(m_bsrc, z_brrc)
        m = checkpoint_name(m_bsrc, remat.LAYER_INPUT)
        z = checkpoint_name(z_brrc, remat.LAYER_INPUT)
        row = checkpoint_name(up(self.msa_row_attention_with_pair_bias, m, z, msa_mask_bsr), remat.ATTN_OUT)
        m = m + shared_dropout(row, cfg.msa_dropout, keys[0], 1)
        column = self.msa_column_global_attention if self.extra else self.msa_column_attention
        m = m + checkpoint_name(up(column, m, msa_mask_bsr), remat.ATTN_OUT)
        m = m + checkpoint_name(up(self.msa_transition, m), remat.MLP_OUT)
        z = z + up(self.outer_product_mean, m, msa_mask_bsr)
        z = z + shared_dropout(up(self.triangle_multiplication_outgoing, z, pair_mask_brr), cfg.pair_dropout,
                               keys[1], 1)
        z = z + shared_dropout(up(self.triangle_multiplication_incoming, z, pair_mask_brr), cfg.pair_dropout,
                               keys[2], 1)
        start = checkpoint_name(up(self.triangle_attention_starting_node, z, pair_mask_brr), remat.ATTN_OUT)
        z = z + shared_dropout(start, cfg.pair_dropout, keys[3], 1)
        end = checkpoint_name(up(self.triangle_attention_ending_node, z, pair_mask_brr), remat.ATTN_OUT)
        z = z + shared_dropout(end, cfg.pair_dropout, keys[4], 2)
        z = z + checkpoint_name(up(self.pair_transition, z), remat.MLP_OUT)
        return self._streams(m, z)


class EvoformerStack(nnx.Module):
    """N Evoformer blocks (``num_blocks``, or ``num_extra_blocks`` with ``extra=True``) on the shared
    layer stack (``models.stack``): scanned with ``scan_layers``, each block (or group of k blocks
    for "every_k:<k>") checkpointed by ``config.remat``."""

    def __init__(self, config: EvoformerConfig, *, extra: bool = False, rngs: nnx.Rngs):
        self.config, self.num = config, config.num_extra_blocks if extra else config.num_blocks
        self.blocks = stack_layers(lambda r: EvoformerBlock(config, extra=extra, rngs=r), self.num, config,
                                   rngs=rngs)

    def __call__(self, m, z, msa_mask, pair_mask, key=None):
        keys = layer_keys(key, self.num, self.num > 0)
        if dap.dap_degree()[1] > 1:  # a mesh with a dap axis: Dynamic Axial Parallelism
            return evoformer_dap.dap_stack(self, m, z, msa_mask, pair_mask, keys)
        return run_layers(self.blocks, (m, z), msa_mask, pair_mask, policy=self.config.remat, keys=keys,
                          apply=lambda block, mz, *args: block(*mz, *args))


class InputEmbedder(nnx.Module):
    """Alg 3-5: m = Linear(msa_feat) + Linear(target_feat); z = left(target) + right(target)^T +
    Linear(one_hot(clip(i - j, -32, 32)))."""

    def __init__(self, config: EvoformerConfig, *, rngs: nnx.Rngs):
        cfg = self.config = config
        kw = dict(rngs=rngs, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        self.preprocess_1d = Linear(cfg.target_feat_dim, cfg.c_m, (None, ax.EMBED), **kw)
        self.preprocess_msa = Linear(cfg.msa_feat_dim, cfg.c_m, (None, ax.EMBED), **kw)
        self.left_single = Linear(cfg.target_feat_dim, cfg.c_z, (None, ax.PAIR), **kw)
        self.right_single = Linear(cfg.target_feat_dim, cfg.c_z, (None, ax.PAIR), **kw)
        self.pair_activiations = Linear(2 * cfg.max_relative_feature + 1, cfg.c_z, (None, ax.PAIR), **kw)  # sic

    def __call__(self, target_feat_brf, msa_feat_bsrf, residue_index_br):
        m = self.preprocess_msa(msa_feat_bsrf) + self.preprocess_1d(target_feat_brf)[:, None]
        z = self.left_single(target_feat_brf)[:, :, None] + self.right_single(target_feat_brf)[:, None, :]
        r = self.config.max_relative_feature
        offset = residue_index_br[:, :, None].astype(jnp.int32) - residue_index_br[:, None, :].astype(jnp.int32)
        relpos = jax.nn.one_hot(jnp.clip(offset + r, 0, 2 * r), 2 * r + 1, dtype=self.config.dtype)
        return m, z + self.pair_activiations(relpos)


class MaskedMsaHead(nnx.Module):
    """Masked-MSA logits: Linear(c_m -> 23), 'final' (zero) init."""

    def __init__(self, config: EvoformerConfig, *, rngs: nnx.Rngs):
        self.logits = Linear(config.c_m, config.msa_classes, (ax.EMBED, None), kind="final", rngs=rngs,
                             param_dtype=config.param_dtype, dtype=config.dtype)

    def __call__(self, m_bsrc):
        return self.logits(m_bsrc).astype(jnp.float32)


class DistogramHead(nnx.Module):
    """Distogram logits: h = Linear(z), logits_ij = h_ij + h_ji (symmetric), 64 bins."""

    def __init__(self, config: EvoformerConfig, *, rngs: nnx.Rngs):
        self.half_logits = Linear(config.c_z, config.distogram_bins, (ax.PAIR, None), kind="final", rngs=rngs,
                                  param_dtype=config.param_dtype, dtype=config.dtype)

    def __call__(self, z_brrc):
        half = self.half_logits(z_brrc).astype(jnp.float32)
        return half + jnp.swapaxes(half, 1, 2)


class Evoformer(nnx.Module):
    """Embedder, optional extra-MSA stack, Evoformer stack and the two heads."""

    def __init__(self, config: EvoformerConfig, *, rngs: nnx.Rngs):
        cfg = self.config = config
        self.embedder = InputEmbedder(cfg, rngs=rngs)
        if cfg.recycle_first_pass or cfg.num_recycle:  # AlphaFold's recycling embedder (modules.py), its names
            kw = dict(rngs=rngs, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
            self.prev_pos_linear = Linear(RECYCLE_BINS, cfg.c_z, (None, ax.PAIR), **kw)
            self.prev_msa_first_row_norm = LayerNorm(cfg.c_m, ax.EMBED, **kw)
            self.prev_pair_norm = LayerNorm(cfg.c_z, ax.PAIR, **kw)
        if cfg.num_extra_blocks:
            self.extra_msa_activations = Linear(cfg.extra_msa_feat_dim, cfg.c_e, (None, ax.EMBED), rngs=rngs,
                                                param_dtype=cfg.param_dtype, dtype=cfg.dtype)
            self.extra_msa_stack = EvoformerStack(cfg, extra=True, rngs=rngs)
        self.evoformer_stack = EvoformerStack(cfg, rngs=rngs)
        self.masked_msa_head = MaskedMsaHead(cfg, rngs=rngs)
        self.distogram_head = DistogramHead(cfg, rngs=rngs)
        if cfg.lora_rank:  # everything but the adapters is frozen: kept in the compute dtype
            store_frozen(self, cfg.dtype, lora_trains(cfg))

    def embed(self, target_feat, msa_feat, residue_index, prev=None):
        """(m, z) of the input embedder, plus what AlphaFold's recycling embedder adds where the
        model has one (``recycle_first_pass`` or ``num_recycle``): the layer norms of the previous
        pass's first MSA row and pair (``prev`` = (m1 [B, R, c_m], z [B, R, R, c_z]); None: the
        first pass, where they are zero and their norms are the offsets) on m's first row and on
        z, and ``prev_pos_linear`` of the distogram of the previous positions. Without a structure
        module the positions stay zero on every pass (no bin holds a distance of 0): its bias."""
        m, z = self.embedder(target_feat, msa_feat, residue_index)
        cfg = self.config
        if not (cfg.recycle_first_pass or cfg.num_recycle):
            return m, z
        if prev is None:  # one norm of a zero vector, broadcast: the same value as norms of zero arrays
            prev_m1, prev_z = jnp.zeros((cfg.c_m,), cfg.dtype), jnp.zeros((cfg.c_z,), cfg.dtype)
        else:
            prev_m1, prev_z = prev
        z = z + (self.prev_pos_linear(jnp.zeros((RECYCLE_BINS,), cfg.dtype))
                 + self.prev_pair_norm(prev_z)).astype(z.dtype)
        m = m.at[:, 0].add(self.prev_msa_first_row_norm(prev_m1).astype(m.dtype))
        return m, z

    def __call__(self, target_feat, msa_feat, residue_index, msa_mask, seq_mask, *, extra_msa_feat=None,
                 extra_msa_mask=None, key=None, num_iter=None):
        """target_feat [B, R, 22], msa_feat [B, S, R, 49], residue_index [B, R], msa_mask [B, S, R],
        seq_mask [B, R] -> dict of msa [B, S, R, c_m], pair [B, R, R, c_z], masked_msa_logits
        [B, S, R, 23] and distogram_logits [B, R, R, 64] (float32).

        With ``num_recycle`` N, AlphaFold's recycling: ``num_iter`` passes (an int or a traced
        scalar; None: N in evaluation, without ``key``, and in training a count drawn uniformly from
        0..N by ``key``, as AlphaFold draws it) run first without gradient (the parameters enter
        them through ``stop_gradient``, in a ``fori_loop``, a ``while_loop`` for a drawn count:
        their activations are never stored), each feeding its first MSA row and pair to the next
        pass's recycling embedder; the last pass is differentiated. Every pass sees the same
        features (AlphaFold samples each recycling iteration's MSA afresh) and draws its own dropout."""
        cfg = self.config
        if msa_feat.ndim != 4 or target_feat.ndim != 3:
            raise ValueError(f"msa_feat must be [B, S, R, f] and target_feat [B, R, f]; got "
                             f"{msa_feat.shape} and {target_feat.shape}")
        if num_iter is not None and not cfg.num_recycle:
            raise ValueError(f"num_iter={num_iter!r} needs num_recycle > 0 (the recycling embedder)")
        if cfg.num_extra_blocks and (extra_msa_feat is None or extra_msa_mask is None):
            raise ValueError(f"num_extra_blocks={cfg.num_extra_blocks} needs extra_msa_feat and extra_msa_mask")
        pair_mask = seq_mask[:, :, None] * seq_mask[:, None, :]
        inputs = (target_feat, msa_feat, residue_index, msa_mask, pair_mask, extra_msa_feat, extra_msa_mask)
        prev = None
        if cfg.num_recycle:
            drawn = num_iter is None and key is not None
            if num_iter is None:
                num_iter = cfg.num_recycle if key is None else recycle_count(key, cfg.num_recycle)
            if not (isinstance(num_iter, int) and num_iter == 0):
                # a drawn count runs N / 2 passes on average: the planner's FLOP count reads it
                with expected_trips(cfg.num_recycle / 2) if drawn else contextlib.nullcontext():
                    prev = self._recycled(inputs, num_iter, key)
        m, z = self._pass(inputs, prev, key)
        return dict(msa=m, pair=z, masked_msa_logits=self.masked_msa_head(m),
                    distogram_logits=self.distogram_head(z))

    def _pass(self, inputs, prev, key):
        """One pass: embedder (with the previous pass's outputs ``prev``), extra-MSA stack, Evoformer stack."""
        target_feat, msa_feat, residue_index, msa_mask, pair_mask, extra_msa_feat, extra_msa_mask = inputs
        m, z = self.embed(target_feat, msa_feat, residue_index, prev)
        k_extra, k_main = (None, None) if key is None else tuple(jax.random.split(key))
        if self.config.num_extra_blocks:
            e = self.extra_msa_activations(extra_msa_feat)
            _, z = self.extra_msa_stack(e, z, extra_msa_mask, pair_mask, k_extra)
        return self.evoformer_stack(m, z, msa_mask, pair_mask, k_main)

    def _recycled(self, inputs, num_iter, key):
        """(first MSA row, pair) after ``num_iter`` gradient-free passes from zeros (``__call__``)."""
        cfg = self.config
        graphdef, state = nnx.split(self)
        frozen = jax.lax.stop_gradient(state)
        b, r = inputs[0].shape[:2]
        dt = jnp.result_type(cfg.dtype)
        zeros = (jnp.zeros((b, r, cfg.c_m), dt), jnp.zeros((b, r, r, cfg.c_z), dt))

        def one(i, prev):
            k = None if key is None else jax.random.fold_in(jax.random.fold_in(key, RECYCLE_SALT), i)
            m, z = nnx.merge(graphdef, frozen)._pass(inputs, prev, k)
            return m[:, 0].astype(dt), z.astype(dt)
        return jax.lax.stop_gradient(jax.lax.fori_loop(0, num_iter, one, zeros))


RECYCLE_SALT = 0x5EC7C1E  # folded into a step's key for its recycling count and its gradient-free passes' dropout


def recycle_count(key, num_recycle: int):
    """The number of gradient-free passes a training step runs: uniform on 0..``num_recycle``
    (AlphaFold's ``num_iter`` draw), from ``key``; a traced int32 scalar."""
    return jax.random.randint(jax.random.fold_in(key, RECYCLE_SALT), (), 0, num_recycle + 1)
