"""A ClimaX-style vision transformer for gridded atmospheric fields (Nguyen et al. 2023, "ClimaX").

Input: normalized fields [batch, variables, lat, lon], a lead time in hours per example and,
with ``num_static``, time-invariant fields (orography, land-sea mask) that are inputs only.
Each variable is cut into ``patch_size`` x ``patch_size`` patches and embedded by its own
linear map (ClimaX's per-variable patch embedding), plus a learned variable embedding. At
each patch one learned query attends over the variables' tokens (variable aggregation by
cross-attention), leaving one token per patch; a learned position embedding and a linear
embedding of the lead time (in days) are added. The tokens pass through the library's
Transformer blocks (``models.transformer.Block``, stacked by ``models.stack``, so every remat
policy, attention implementation, precision and QAT scheme applies), then a norm, a GELU
hidden layer and a linear head predict every variable's patch values back on the grid.

With ``residual`` (default) the head predicts the change from the input state and starts at
zero, so an untrained model is the persistence forecast. Rotary positions of the shared
blocks are off (all positions 0): positions enter only through the learned embedding, as in
ClimaX. Variable aggregation attends over a handful of tokens and always uses the XLA
attention; the patch sequence uses the configured implementation.

With ``lora_rank`` the shared blocks carry LoRA adapters (``lora_targets``; ``lora_quant="nf4"``
stores their frozen kernels in 4 bits) and everything else is frozen: the patch and lead
embeddings, variable aggregation and head keep what the pretrained run learned, as in Aurora's
LoRA fine-tuning of its backbone (Bodnar et al. 2024).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from sciscale_jax import attention, remat
from sciscale_jax.models.layers import Dense, RMSNorm, dropout, param
from sciscale_jax.models.stack import Techniques, layer_keys, lora_trains, run_layers, stack_layers, store_frozen
from sciscale_jax.models.transformer import MLP_KINDS, Block, TransformerConfig
from sciscale_jax.parallel import axes as ax
from sciscale_jax.quant.registry import make_matmul


def _positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")


@dataclasses.dataclass(frozen=True)
class ClimaXConfig(Techniques):
    """Grid, patching and Transformer shape; technique switches are inherited from ``Techniques``."""

    num_vars: int = dataclasses.field(default=8, metadata={"help": "input and output channels (variables)"})
    num_static: int = dataclasses.field(default=0, metadata={
        "help": "time-invariant input fields (orography, land-sea mask): inputs only, not forecast"})
    lat: int = dataclasses.field(default=32, metadata={"help": "grid latitudes"})
    lon: int = dataclasses.field(default=64, metadata={"help": "grid longitudes"})
    patch_size: int = dataclasses.field(default=4, metadata={"help": "patch side in grid points"})
    num_layers: int = dataclasses.field(default=4, metadata={"flag": "layers"})
    num_heads: int = dataclasses.field(default=4, metadata={"flag": "heads"})
    embed_dim: int = 128
    mlp_dim: int = 512
    dropout: float = 0.0
    mlp: str = dataclasses.field(default="gelu", metadata={"choices": MLP_KINDS})
    residual: bool = dataclasses.field(default=True, metadata={
        "help": "predict the change from the input (starts at persistence)"})
    linformer_k: int = 256
    performer_features: int = 256
    supports_lora: ClassVar[bool] = True  # adapters on the shared Transformer blocks (Aurora's fine-tuning)

    def __post_init__(self):
        for name in ("num_vars", "lat", "lon", "patch_size", "num_layers", "num_heads", "embed_dim", "mlp_dim",
                     "linformer_k", "performer_features"):
            _positive_int(name, getattr(self, name))
        if not isinstance(self.num_static, int) or isinstance(self.num_static, bool) or self.num_static < 0:
            raise ValueError(f"num_static={self.num_static!r} must be a non-negative integer")
        if self.lat % self.patch_size or self.lon % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide lat={self.lat} and lon={self.lon}")
        if not isinstance(self.residual, bool):
            raise ValueError(f"residual={self.residual!r} must be a bool")
        super().__post_init__()
        self.block_config()  # ValueError for heads/embed/mlp/dropout combinations the blocks refuse

    @property
    def num_patches(self) -> int:
        return (self.lat // self.patch_size) * (self.lon // self.patch_size)

    def block_config(self) -> TransformerConfig:
        """The Transformer-block configuration of this ViT (bidirectional, one position per patch)."""
        techniques = {f.name: getattr(self, f.name) for f in dataclasses.fields(Techniques)}
        return TransformerConfig(vocab_size=1, num_layers=self.num_layers, num_heads=self.num_heads,
                                 embed_dim=self.embed_dim, mlp_dim=self.mlp_dim, max_len=self.num_patches,
                                 causal=False, dropout=self.dropout, mlp=self.mlp,
                                 linformer_k=min(self.linformer_k, self.num_patches),
                                 performer_features=self.performer_features, **techniques)


def patchify(x_bvhw, p: int):
    """[B, V, H, W] -> [B, V, L, p*p] with patches in row-major (lat, lon) order."""
    b, v, h, w = x_bvhw.shape
    x = x_bvhw.reshape(b, v, h // p, p, w // p, p).transpose(0, 1, 2, 4, 3, 5)
    return x.reshape(b, v, (h // p) * (w // p), p * p)


def unpatchify(x_blvq, h: int, w: int, p: int):
    """[B, L, V, p*p] -> [B, V, H, W]; the inverse of :func:`patchify`."""
    b, _, v, _ = x_blvq.shape
    x = x_blvq.reshape(b, h // p, w // p, v, p, p).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, v, h, w)


class VariableAggregation(nnx.Module):
    """One learned query per patch attends over that patch's variable tokens: [B, L, V, E] -> [B, L, E]."""

    def __init__(self, cfg: ClimaXConfig, *, rngs: nnx.Rngs):
        e, h = cfg.embed_dim, cfg.num_heads
        d = e // h
        kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        hook = lambda: make_matmul(cfg.quant, cfg.precision)  # noqa: E731
        self.query_token = param(rngs, jax.nn.initializers.normal(0.02), (e,), (ax.EMBED,), cfg.param_dtype)
        self.query = Dense((e,), (h, d), (ax.EMBED, ax.HEADS, ax.KV), matmul=hook(), **kw)
        self.key = Dense((e,), (h, d), (ax.EMBED, ax.HEADS, ax.KV), matmul=hook(), **kw)
        self.value = Dense((e,), (h, d), (ax.EMBED, ax.HEADS, ax.KV), matmul=hook(), **kw)
        self.out = Dense((h, d), (e,), (ax.HEADS, ax.KV, ax.EMBED), matmul=hook(), **kw)
        self.dtype = cfg.dtype

    def __call__(self, tokens_blve):
        b, l, v, e = tokens_blve.shape
        t_nve = tokens_blve.reshape(b * l, v, e)
        q_1hd = self.query(self.query_token[...].astype(self.dtype)[None])
        q_n1hd = jnp.broadcast_to(q_1hd[None], (b * l, 1, *q_1hd.shape[1:]))
        ctx_n1hd = attention.dot_product_attention(q_n1hd, self.key(t_nve), self.value(t_nve), impl="xla")
        return self.out(ctx_n1hd).reshape(b, l, e)


class ClimaX(nnx.Module):
    """fields [B, V, lat, lon] and lead hours [B] -> forecast [B, V, lat, lon] (float32, float64 under a float64 dtype)."""

    def __init__(self, config: ClimaXConfig, *, rngs: nnx.Rngs):
        cfg = self.config = config
        v, e, q = cfg.num_vars, cfg.embed_dim, cfg.patch_size ** 2
        n = v + cfg.num_static  # input fields: the forecast variables, then the static ones
        dt = cfg.param_dtype
        self.patch_kernel = param(rngs, jax.nn.initializers.normal(q ** -0.5), (n, q, e), (None, None, ax.EMBED), dt)
        self.patch_bias = param(rngs, jax.nn.initializers.zeros, (n, e), (None, ax.EMBED), dt)
        self.var_embed = param(rngs, jax.nn.initializers.normal(0.02), (n, e), (None, ax.EMBED), dt)
        self.aggregate = VariableAggregation(cfg, rngs=rngs)
        self.pos_embed = param(rngs, jax.nn.initializers.normal(0.02), (cfg.num_patches, e), (None, ax.EMBED), dt)
        kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=dt)
        self.lead_embed = Dense((1,), (e,), (None, ax.EMBED), use_bias=True, **kw)
        block_cfg = cfg.block_config()
        self.layers = stack_layers(lambda r: Block(block_cfg, rngs=r), cfg.num_layers, cfg, rngs=rngs)
        self.final_norm = RMSNorm(e, **kw)
        self.head_hidden = Dense((e,), (e,), (ax.EMBED, ax.MLP), use_bias=True, **kw)
        self.head = Dense((e,), (v * q,), (ax.MLP, None), use_bias=True, **kw)
        if cfg.residual:  # start at persistence: the predicted change is zero
            self.head.kernel[...] = jnp.zeros_like(self.head.kernel[...])
        if cfg.lora_rank:  # everything but the blocks' adapters is frozen: kept in the compute dtype
            store_frozen(self, cfg.dtype, lora_trains(cfg))

    def __call__(self, x_bvhw, lead_hours_b, static_shw=None, *, dropout_key=None):
        """``static_shw``: the ``num_static`` time-invariant fields, [S, lat, lon] or [B, S, lat, lon]."""
        cfg = self.config
        b, v, h, w = x_bvhw.shape
        if (v, h, w) != (cfg.num_vars, cfg.lat, cfg.lon):
            raise ValueError(f"fields of shape {x_bvhw.shape} do not match the model's "
                             f"(batch, num_vars={cfg.num_vars}, lat={cfg.lat}, lon={cfg.lon})")
        inputs = x_bvhw.astype(cfg.dtype)
        if cfg.num_static or static_shw is not None:
            want = (cfg.num_static, h, w)
            if static_shw is None or tuple(static_shw.shape[-3:]) != want or static_shw.ndim not in (3, 4):
                raise ValueError(f"the model takes {cfg.num_static} static fields of shape {want} (or with the "
                                 f"batch first), not {None if static_shw is None else tuple(static_shw.shape)}")
            static = jnp.broadcast_to(static_shw.astype(cfg.dtype), (b, *want))
            inputs = jnp.concatenate([inputs, static], axis=1)
        p = cfg.patch_size
        patches_bvlq = patchify(inputs, p)
        tokens_bvle = jnp.einsum("bvlq,vqe->bvle", patches_bvlq, self.patch_kernel[...].astype(cfg.dtype))
        tokens_bvle = tokens_bvle + (self.patch_bias[...] + self.var_embed[...]).astype(cfg.dtype)[None, :, None]
        x_ble = self.aggregate(tokens_bvle.transpose(0, 2, 1, 3))
        lead_be = self.lead_embed((lead_hours_b.astype(jnp.float32) / 24.0)[:, None])
        x_ble = x_ble + self.pos_embed[...].astype(cfg.dtype)[None] + lead_be[:, None, :].astype(cfg.dtype)
        k_in, k_layers = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
        x_ble = dropout(x_ble, cfg.dropout, k_in)
        positions_bl = jnp.zeros((b, x_ble.shape[1]), jnp.int32)
        keys = layer_keys(k_layers, cfg.num_layers, cfg.dropout > 0.0)
        x_ble = run_layers(self.layers, x_ble, positions_bl, None, None, policy=cfg.remat, keys=keys)
        hidden_ble = jax.nn.gelu(self.head_hidden(self.final_norm(x_ble)))
        out_dtype = jnp.promote_types(cfg.dtype, jnp.float32)  # float32 unless computing in float64
        out_blq = self.head(hidden_ble).astype(out_dtype).reshape(b, -1, v, p * p)
        out_bvhw = unpatchify(out_blq, h, w, p)
        if cfg.residual:
            out_bvhw = x_bvhw.astype(out_dtype) + out_bvhw
        return checkpoint_name(out_bvhw, remat.LOGITS)
