"""AlphaFold parameter files onto the NNX Evoformer and back. The names and shapes below are
written out from DeepMind's alphafold/model/modules.py and common_modules.py (Haiku scopes,
``scope//param``, layer stacks on a leading axis), not taken from the loader."""

import numpy as np
import pytest
from flax import nnx

from sciscale_jax.models.evoformer import Evoformer
from sciscale_jax.models.evoformer_params import export_alphafold_evoformer, load_alphafold_evoformer
from test_evoformer import small_config

E = "alphafold/alphafold_iteration/evoformer"


def _ln(scope, c, n):
    return {f"{scope}//scale": (n, c), f"{scope}//offset": (n, c)}


def _linear(scope, c_in, c_out, n=None):
    lead = () if n is None else (n,)
    return {f"{scope}//weights": lead + (c_in, c_out), f"{scope}//bias": lead + (c_out,)}


def _attention(scope, c, h, d, n, global_=False):
    kv = (n, c, d) if global_ else (n, c, h, d)
    return {f"{scope}//query_w": (n, c, h, d), f"{scope}//key_w": kv, f"{scope}//value_w": kv,
            f"{scope}//gating_w": (n, c, h, d), f"{scope}//gating_b": (n, h, d),
            f"{scope}//output_w": (n, h, d, c), f"{scope}//output_b": (n, c)}


def _stack(scope, n, c, h, d, cfg, extra):
    s, cz = {}, cfg.c_z
    row = f"{scope}/msa_row_attention_with_pair_bias"
    s.update(_ln(f"{row}/query_norm", c, n) | _ln(f"{row}/feat_2d_norm", cz, n))
    s[f"{row}//feat_2d_weights"] = (n, cz, h)
    s.update(_attention(f"{row}/attention", c, h, d, n))
    col = f"{scope}/msa_column_global_attention" if extra else f"{scope}/msa_column_attention"
    s.update(_ln(f"{col}/query_norm", c, n) | _attention(f"{col}/attention", c, h, d, n, global_=extra))
    for name, ch in (("msa_transition", c), ("pair_transition", cz)):
        s.update(_ln(f"{scope}/{name}/input_layer_norm", ch, n))
        s.update(_linear(f"{scope}/{name}/transition1", ch, 4 * ch, n) | _linear(f"{scope}/{name}/transition2",
                                                                                  4 * ch, ch, n))
    opm, o = f"{scope}/outer_product_mean", cfg.opm_channels
    s.update(_ln(f"{opm}/layer_norm_input", c, n) | _linear(f"{opm}/left_projection", c, o, n)
             | _linear(f"{opm}/right_projection", c, o, n))
    s.update({f"{opm}//output_w": (n, o, o, cz), f"{opm}//output_b": (n, cz)})
    t = cfg.tri_mul_channels
    for edge in ("outgoing", "incoming"):
        tri = f"{scope}/triangle_multiplication_{edge}"
        s.update(_ln(f"{tri}/layer_norm_input", cz, n) | _ln(f"{tri}/center_layer_norm", t, n))
        for lin in ("left_projection", "right_projection", "left_gate", "right_gate"):
            s.update(_linear(f"{tri}/{lin}", cz, t, n))
        s.update(_linear(f"{tri}/output_projection", t, cz, n) | _linear(f"{tri}/gating_linear", cz, cz, n))
    for node in ("starting", "ending"):
        tri = f"{scope}/triangle_attention_{node}_node"
        s.update(_ln(f"{tri}/query_norm", cz, n) | _attention(f"{tri}/attention", cz, cfg.pair_heads,
                                                               cfg.pair_head_dim, n))
        s[f"{tri}//feat_2d_weights"] = (n, cz, cfg.pair_heads)
    return s


def alphafold_shapes(cfg):
    s = {}
    s.update(_linear(f"{E}/preprocess_1d", 22, cfg.c_m) | _linear(f"{E}/preprocess_msa", 49, cfg.c_m))
    s.update(_linear(f"{E}/left_single", 22, cfg.c_z) | _linear(f"{E}/right_single", 22, cfg.c_z))
    s.update(_linear(f"{E}/pair_activiations", 65, cfg.c_z) | _linear(f"{E}/extra_msa_activations", 25, cfg.c_e))
    s.update(_stack(f"{E}/evoformer_iteration", cfg.num_blocks, cfg.c_m, cfg.msa_heads, cfg.msa_head_dim, cfg, False))
    s.update(_stack(f"{E}/extra_msa_stack", cfg.num_extra_blocks, cfg.c_e, cfg.extra_msa_heads,
                    cfg.extra_msa_head_dim, cfg, True))
    s.update(_linear("alphafold/alphafold_iteration/masked_msa_head/logits", cfg.c_m, 23))
    s.update(_linear("alphafold/alphafold_iteration/distogram_head/half_logits", cfg.c_z, 64))
    return s


CFG = small_config(num_blocks=2, num_extra_blocks=1)
IGNORED = {f"{E}/prev_pair_norm//scale": (CFG.c_z,), f"{E}/single_activations//weights": (CFG.c_m, 7),
           "alphafold/alphafold_iteration/structure_module//foo": (3,)}


def alphafold_dict(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in {**alphafold_shapes(CFG), **IGNORED}.items()}


def _inputs():
    rng = np.random.default_rng(1)
    b, s, r, se = 1, 3, 7, 2
    seq_mask = np.ones((b, r), np.float32)
    seq_mask[:, -1] = 0
    return (rng.normal(size=(b, r, 22)).astype(np.float32), rng.normal(size=(b, s, r, 49)).astype(np.float32),
            np.arange(r)[None], seq_mask[:, None].repeat(s, 1), seq_mask), \
        dict(extra_msa_feat=rng.normal(size=(b, se, r, 25)).astype(np.float32),
             extra_msa_mask=seq_mask[:, None].repeat(se, 1))


@nnx.jit
def _forward(model, args, kwargs):
    return model(*args, **kwargs)


def _set_directly(model, params):
    """Assign each AlphaFold tensor to the attribute its name spells, block by block."""
    for name, value in params.items():
        scope, p = name.split("//")
        parts = scope.split("/")
        if parts[:3] != E.split("/"):
            if parts[2] in ("masked_msa_head", "distogram_head"):
                getattr(getattr(getattr(model, parts[2]), parts[3]), p)[...] = value
            continue
        rest = parts[3:]
        if rest[0] in ("evoformer_iteration", "extra_msa_stack"):
            stack = model.evoformer_stack if rest[0] == "evoformer_iteration" else model.extra_msa_stack
            for i, block in enumerate(stack.blocks):
                mod = block
                for attr in rest[1:]:
                    mod = getattr(mod, attr)
                getattr(mod, p)[...] = value[i]
        elif rest[0] == "extra_msa_activations":
            getattr(model.extra_msa_activations, p)[...] = value
        elif hasattr(model.embedder, rest[0]):
            getattr(getattr(model.embedder, rest[0]), p)[...] = value


def test_load_matches_direct_assignment_and_round_trips():
    params = alphafold_dict()
    model = load_alphafold_evoformer(params, CFG)
    row = model.evoformer_stack.blocks[1].msa_row_attention_with_pair_bias
    np.testing.assert_array_equal(
        row.attention.query_w[...],
        params[f"{E}/evoformer_iteration/msa_row_attention_with_pair_bias/attention//query_w"][1])
    np.testing.assert_array_equal(
        model.extra_msa_stack.blocks[0].msa_column_global_attention.attention.key_w[...],
        params[f"{E}/extra_msa_stack/msa_column_global_attention/attention//key_w"][0])
    direct = Evoformer(CFG, rngs=nnx.Rngs(3))
    _set_directly(direct, params)
    args, kwargs = _inputs()
    out_loaded, out_direct = _forward(model, args, kwargs), _forward(direct, args, kwargs)
    for key in out_direct:
        np.testing.assert_array_equal(np.asarray(out_loaded[key]), np.asarray(out_direct[key]))
    assert np.abs(np.asarray(out_direct["distogram_logits"])).max() > 0   # the heads were filled
    exported = export_alphafold_evoformer(model)
    assert exported.keys() == alphafold_shapes(CFG).keys()
    for key, value in exported.items():
        np.testing.assert_array_equal(value, params[key])


def test_npz_path(tmp_path):
    params = alphafold_dict(2)
    path = tmp_path / "params_model_test.npz"
    np.savez(path, **params)
    model = load_alphafold_evoformer(str(path), CFG)
    key = f"{E}/evoformer_iteration/triangle_multiplication_incoming/left_gate//bias"
    np.testing.assert_array_equal(model.evoformer_stack.blocks[0].triangle_multiplication_incoming.left_gate.bias[...],
                                  params[key][0])


def test_refuses_misfit_files():
    good = alphafold_dict()
    missing = f"{E}/evoformer_iteration/triangle_attention_ending_node//feat_2d_weights"
    with pytest.raises(ValueError, match=f"lack '{missing}'"):
        load_alphafold_evoformer({k: v for k, v in good.items() if k != missing}, CFG)
    bad = dict(good)
    key = f"{E}/evoformer_iteration/msa_transition/transition1//weights"
    bad[key] = np.zeros((48,) + good[key].shape[1:], np.float32)          # 48 blocks, config has 2
    with pytest.raises(ValueError, match=f"'{key}' has shape \\(48, 16, 64\\); the model needs \\(2, 16, 64\\)"):
        load_alphafold_evoformer(bad, CFG)
    fused = dict(good)
    extra = f"{E}/evoformer_iteration/triangle_multiplication_outgoing/projection//weights"
    fused[extra] = np.zeros((2, 8, 12), np.float32)                       # AlphaFold-Multimer v2.3 layout
    with pytest.raises(ValueError, match="no place in this model's evoformer_iteration"):
        load_alphafold_evoformer(fused, CFG)
    with pytest.raises(ValueError, match="config or a model"):
        load_alphafold_evoformer(good)
