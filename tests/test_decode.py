"""KV-cache decoding (models.decode) against the full causal forward pass of the same model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sciscale_jax.models import Transformer, TransformerConfig, decode


@pytest.mark.parametrize("scan_layers,quant", [(False, "none"), (True, "llm_qat_w4a8kv4")])
def test_cached_logits_match_the_full_forward_at_every_position(scan_layers, quant):
    cfg = TransformerConfig(vocab_size=23, num_layers=3, num_heads=2, embed_dim=12, mlp_dim=20, max_len=16,
                            causal=True, scan_layers=scan_layers, quant=quant)
    model = Transformer(cfg, rngs=nnx.Rngs(3))
    tokens = np.random.default_rng(0).integers(0, 23, (3, 11)).astype(np.int32)
    full = np.asarray(model(jnp.asarray(tokens)), np.float64)
    step = jax.jit(lambda m, c, tok, t: decode.decode_step(m, c, tok, t))
    cache = decode.init_cache(model, 3, 13)
    for t in range(tokens.shape[1]):
        logits, cache = step(model, cache, jnp.asarray(tokens[:, t]), t)
        np.testing.assert_allclose(np.asarray(logits, np.float64), full[:, t], rtol=2e-4, atol=2e-5)


def test_decoding_refuses_what_it_cannot_reproduce():
    base = dict(vocab_size=11, num_layers=1, num_heads=2, embed_dim=8, mlp_dim=8, max_len=8)
    with pytest.raises(ValueError, match="causal"):
        decode.init_cache(Transformer(TransformerConfig(**base), rngs=nnx.Rngs(0)), 2, 4)
    perf = Transformer(TransformerConfig(**base, causal=True, attention="performer"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="performer"):
        decode.init_cache(perf, 2, 4)
    with pytest.raises(ValueError, match="max_len=8"):
        decode.init_cache(Transformer(TransformerConfig(**base, causal=True), rngs=nnx.Rngs(0)), 2, 9)
