"""fp8 through the real Transformer and train step: every Dense gets an Fp8Matmul hook,
the train step's grad_fn returns the new scales in `rest`, the optimizer never sees them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

from sciscale_jax.data.mlm import RepeatedSymbolTask
from sciscale_jax.models.layers import Dense
from sciscale_jax.models.transformer import Transformer, TransformerConfig
from sciscale_jax.precision.fp8 import E4M3, Fp8Matmul, fp8_grad_fn, fp8_paths, split_pure
from sciscale_jax.losses import mlm_loss
from sciscale_jax.train.step import init_train_state, make_train_step

CFG = TransformerConfig(vocab_size=11, num_layers=2, num_heads=2, embed_dim=16, mlp_dim=24, max_len=16)


def _batch(rng):
    tokens = rng.integers(0, 11, size=(2, 7))
    return {"inputs": jnp.asarray(tokens, jnp.int32), "targets": jnp.asarray(rng.integers(0, 11, size=(2, 7)), jnp.int32),
            "mask": jnp.ones((2, 7), bool), "weights": jnp.asarray(rng.random((2, 7)) < 0.5, jnp.float32)}


def _fp8_model():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    dense = [m for _, m in nnx.iter_graph(model) if isinstance(m, Dense)]
    for m in dense:
        if m is not model.lm_head:  # the head stays in full precision
            m.matmul = nnx.data(Fp8Matmul(scaling="delayed", history_len=4))
    return model, dense


def test_train_step_updates_fp8_meta_and_not_the_optimizer():
    rng = np.random.default_rng(0)
    model, dense = _fp8_model()
    paths = fp8_paths(model)
    assert len(paths) == 6 * (len(dense) - 1)  # 3 scales + 3 histories per fp8 layer
    kernels = {tuple(p[:-1]): np.asarray(v, np.float64)  # every Dense kernel, by module path
               for p, v in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()
               if p[-1] == "kernel"}
    tx = optax.adam(1e-2)
    graphdef, state = init_train_state(model, tx)
    step = jax.jit(make_train_step(graphdef, tx, loss_fn=mlm_loss, grad_fn=fp8_grad_fn(graphdef, mlm_loss, paths)))
    batch = _batch(rng)
    new_state, metrics = step(state, batch)
    # Optimizer saw parameters only.
    assert not any(p in paths for p in traverse_util.flatten_dict(new_state.params))
    fp8_new, _ = split_pure(new_state.rest, paths)
    flat = traverse_util.flatten_dict(fp8_new)
    for p, v in flat.items():
        mod = p[:-2]
        if p[-1] == "w_amax_history":  # the weight amax: that of the kernel it quantised
            np.testing.assert_allclose(v[0], np.abs(kernels[mod]).max(), rtol=1e-6)
            np.testing.assert_allclose(flat[mod + ("matmul", "w_scale")], np.abs(kernels[mod]).max() / 448, rtol=1e-6)
        if p[-1].endswith("amax_history"):
            assert v[0] > 0 and np.all(np.asarray(v[1:]) == 0)  # one step recorded
    # The fp8 loss is the fp32 loss up to fp8 rounding; training proceeds.
    ref_model = Transformer(CFG, rngs=nnx.Rngs(0))
    ref_total, ref_count = mlm_loss(ref_model, batch, None)
    assert abs(float(metrics["loss"]) - float(ref_total / ref_count)) < 0.05 * float(ref_total / ref_count)
    s = new_state
    for _ in range(5):
        s, m = step(s, batch)
    hist = traverse_util.flatten_dict(split_pure(s.rest, paths)[0])
    assert all(np.all(np.asarray(v) > 0) for p, v in hist.items() if p[-1].endswith("amax_history"))
    assert np.dtype(E4M3).itemsize == 1


def test_fp8_transformer_learns_context_beyond_the_floor():
    """On the repeated-symbol task every masked target is visible elsewhere in its sequence and
    no context-free predictor beats log(8) nats; the fp8 model, trained through the fp8 train
    step, must end well below that floor on held-out batches (evaluated with its fp8 matmuls)."""
    task = RepeatedSymbolTask(num_symbols=8, batch_size=8, seq_len=12, mask_id=1, first_symbol=3)
    assert task.vocab_size == CFG.vocab_size
    model, _ = _fp8_model()
    paths = fp8_paths(model)
    tx = optax.adam(1e-2)
    graphdef, state = init_train_state(model, tx)
    step = jax.jit(make_train_step(graphdef, tx, loss_fn=mlm_loss, grad_fn=fp8_grad_fn(graphdef, mlm_loss, paths)))
    for i in range(60):
        state, _ = step(state, task.batch(i))
    held_out = RepeatedSymbolTask(num_symbols=8, batch_size=64, seq_len=12, mask_id=1, first_symbol=3, seed=1)
    total, count = 0.0, 0.0
    for b in held_out.eval_batches(2):
        t, n = mlm_loss(nnx.merge(graphdef, state.params, state.rest), b, None)
        total, count = total + float(t), count + float(n)
    assert count > 100
    assert total / count < task.floor - 0.5, (total / count, task.floor)


@pytest.mark.slow
def test_quant_hooks_train_inside_the_transformer():
    from sciscale_jax.quant.registry import make_matmul

    rng = np.random.default_rng(1)
    batch = _batch(rng)
    cfg = TransformerConfig(vocab_size=11, num_layers=1, num_heads=2, embed_dim=16, mlp_dim=24, max_len=16)
    for scheme in ("llm_qat_w4a8kv4", "bitnet", "bitnet158"):
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        for _, m in nnx.iter_graph(model):
            if isinstance(m, Dense) and m is not model.lm_head:
                m.matmul = nnx.data(make_matmul(scheme))
        total, grads = nnx.jit(nnx.value_and_grad(lambda mdl: mlm_loss(mdl, batch, None)[0]))(model)
        flat = traverse_util.flatten_dict(nnx.to_pure_dict(grads))
        kernel_grads = [v for p, v in flat.items() if p[-1] == "kernel"]
        assert np.isfinite(float(total)) and len(kernel_grads) == 7 + 1
        # Straight-through: every quantised kernel receives a non-zero gradient.
        assert all(float(jnp.abs(g).max()) > 0 for g in kernel_grads), scheme


@pytest.mark.slow
def test_fp8_under_scan_layers_and_remat(monkeypatch):
    """The Transformer builds Dense(..., matmul=make_matmul(quant, precision)): with fp8 hooks
    (a short history, float32 compute so amaxes compare exactly) each layer keeps its own
    stacked Fp8Meta under nnx.vmap/nnx.scan, remat on."""
    import sciscale_jax.models.transformer as transformer

    monkeypatch.setattr(transformer, "make_matmul", lambda quant, precision: Fp8Matmul(history_len=3))
    cfg = TransformerConfig(vocab_size=11, num_layers=3, num_heads=2, embed_dim=16, mlp_dim=24,
                            max_len=16, scan_layers=True, remat="full")
    model = transformer.Transformer(cfg, rngs=nnx.Rngs(0))
    paths = fp8_paths(model)
    tx = optax.adam(1e-2)
    graphdef, state = init_train_state(model, tx)
    step = jax.jit(make_train_step(graphdef, tx, loss_fn=mlm_loss, grad_fn=fp8_grad_fn(graphdef, mlm_loss, paths)))
    new_state, _ = step(state, _batch(np.random.default_rng(2)))
    meta = traverse_util.flatten_dict(split_pure(new_state.rest, paths)[0])
    params = traverse_util.flatten_dict(state.params)
    for name in ("wi", "wo", "query"):
        mod = next(p[:-1] for p in params if p[-1] == "kernel" and name in p)
        per_layer = np.abs(np.asarray(params[mod + ("kernel",)])).reshape(3, -1).max(axis=1)
        hist = np.asarray(meta[mod + ("matmul", "w_amax_history")])
        assert hist.shape == (3, 3)
        np.testing.assert_allclose(hist[:, 0], per_layer, rtol=1e-6)  # each layer its own amax
        np.testing.assert_allclose(meta[mod + ("matmul", "w_scale")], per_layer / 448, rtol=1e-6)
