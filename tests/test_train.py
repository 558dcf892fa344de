"""Train step, run-directory guard, checkpoints (including a SIGKILL + resume), and the CLI."""

import json
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sciscale_jax import cli
from sciscale_jax.models import Transformer, TransformerConfig
from sciscale_jax.losses import mlm_loss, token_cross_entropy
from sciscale_jax.train import Checkpointer, TrainConfig, build_optimizer, check_run_dir, init_train_state, make_train_step
from sciscale_jax.train.checkpoint import CheckpointError

CFG = TransformerConfig(vocab_size=32, num_layers=2, num_heads=2, embed_dim=16, mlp_dim=32, max_len=32)


def _batch(seed=0, b=3, s=10):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(4, 29, (b, s)).astype(np.int32)
    return {"inputs": inputs, "targets": rng.integers(4, 29, (b, s)).astype(np.int32),
            "weights": (rng.random((b, s)) < 0.4).astype(np.float32), "mask": np.ones((b, s), bool)}


def test_token_cross_entropy_matches_float64():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (2, 5))
    weights = rng.random((2, 5)).astype(np.float32)
    total, count = token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    l64 = logits.astype(np.float64)
    logp = l64 - np.log(np.exp(l64 - l64.max(-1, keepdims=True)).sum(-1, keepdims=True)) - l64.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    assert float(total) == pytest.approx((nll * weights).sum(), rel=1e-5)
    assert float(count) == pytest.approx(weights.sum(), rel=1e-6)


def test_train_step_matches_a_plain_adam_update_and_learns():
    tx = optax.adam(1e-2)
    graphdef, state = init_train_state(Transformer(CFG, rngs=nnx.Rngs(0)), tx)
    batch = _batch()

    def plain_loss(params):  # the objective written directly against the model
        model = nnx.merge(graphdef, params, state.rest)
        logits = model(batch["inputs"], mask_bs=batch["mask"])
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
        return (nll * batch["weights"]).sum() / batch["weights"].sum()

    grads = jax.grad(plain_loss)(state.params)
    expected = optax.apply_updates(state.params, tx.update(grads, tx.init(state.params), state.params)[0])
    step = jax.jit(make_train_step(graphdef, tx, loss_fn=mlm_loss))
    new_state, metrics = step(state, batch)
    assert int(new_state.step) == 1
    assert float(metrics["loss"]) == pytest.approx(float(plain_loss(state.params)), rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new_state.params, expected)
    losses = [float(metrics["loss"])]
    for _ in range(15):
        new_state, metrics = step(new_state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0]


def test_run_dir_guard(tmp_path):
    run = tmp_path / "run"
    config = {"recipe": "x", "model": {"a": 1}, "train": {"steps": 5, "lr": 0.1}}
    check_run_dir(run, config, resume=False)
    check_run_dir(run, {**config, "train": {"steps": 50, "lr": 0.1}}, resume=True)  # more steps: same run
    with pytest.raises(ValueError, match=r"holds a different run; differing settings: train.lr: saved 0.1, now 0.2"):
        check_run_dir(run, {**config, "train": {"steps": 50, "lr": 0.2}}, resume=True)
    saved = json.loads((run / "run_config.json").read_text())
    assert saved["train"]["lr"] == 0.1  # the refused call wrote nothing
    # A field added after the run was saved matches when left at its default, and only then.
    check_run_dir(run, {**config, "train": {"steps": 5, "lr": 0.1, "offload": ""}}, resume=True,
                  defaults={"train": {"offload": ""}})
    (run / "run_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="train.offload: saved '', now 'params'"):
        check_run_dir(run, {**config, "train": {"steps": 5, "lr": 0.1, "offload": "params"}}, resume=True,
                      defaults={"train": {"offload": ""}})
    (run / "checkpoints" / "3").mkdir(parents=True)
    with pytest.raises(ValueError, match="already holds checkpoints; pass --resume"):
        check_run_dir(run, {**config, "train": {"steps": 50, "lr": 0.1}}, resume=False)


def test_checkpoint_round_trip_and_corrupt_checkpoint(tmp_path):
    tx = build_optimizer(TrainConfig(steps=10))
    graphdef, state = init_train_state(Transformer(CFG, rngs=nnx.Rngs(0)), tx)
    state = jax.jit(make_train_step(graphdef, tx, loss_fn=mlm_loss))(state, _batch())[0]
    ckpt = Checkpointer(tmp_path, save_every=1)
    assert ckpt.save(state)
    restored = ckpt.restore(init_train_state(Transformer(CFG, rngs=nnx.Rngs(5)), tx)[1])
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    # Corrupt every data file of the saved step: restoring must fail clearly, and move the files aside, intact.
    step_dir = tmp_path / "checkpoints" / "1"
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.stat().st_size > 0]
    for p in files:
        p.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"no readable checkpoint .* moved aside: 1\.damaged-"):
        ckpt.restore(state)
    aside = next((tmp_path / "checkpoints").glob("1.damaged-*"))
    assert all((aside / p.relative_to(step_dir)).read_bytes() == b"\x00garbage" for p in files)


TINY = ["--layers", "1", "--heads", "2", "--embed-dim", "16", "--mlp-dim", "32", "--seq-len", "24",
        "--batch-size", "4", "--eval-every", "1000", "--log-every", "10", "--no-progress", "--keep", "2"]


def _sciscale(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "sciscale_jax.cli", "train", "protein-mlm", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _final_params(run_dir, args):
    recipe, model_cfg, train_cfg = cli.build_configs(["protein-mlm", *args])
    tx = build_optimizer(train_cfg)
    _, target = init_train_state(Transformer(model_cfg, rngs=nnx.Rngs(123)), tx)
    ckpt = Checkpointer(run_dir)
    return ckpt.latest_step(), ckpt.restore(target)


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    args = TINY + ["--steps", "400", "--save-every", "50", "--seed", "3"]
    full = _sciscale("--out", str(tmp_path / "full"), *args)
    killed = _sciscale("--out", str(tmp_path / "killed"), *args)
    first_ckpt = tmp_path / "killed" / "checkpoints" / "50"
    deadline = time.time() + 300
    while not first_ckpt.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, killed.stdout.read()
    interrupted_at, _ = _final_params(tmp_path / "killed", args)
    assert 50 <= interrupted_at < 400
    resumed = _sciscale("--out", str(tmp_path / "killed"), "--resume", *args)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert f"resumed from step {interrupted_at}" in out
    out_full, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out_full
    assert "validation loss" in out_full and "baseline unigram_ppl" in out_full and "peak" in out_full
    step_a, a = _final_params(tmp_path / "full", args)
    step_b, b = _final_params(tmp_path / "killed", args)
    assert step_a == step_b == 400
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a.params, b.params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a.opt_state, b.opt_state)
    # Reusing the directory without --resume is refused, and the checkpoints survive.
    again = _sciscale("--out", str(tmp_path / "killed"), *args)
    out_again, _ = again.communicate(timeout=300)
    assert again.returncode == 2 and "already holds checkpoints" in out_again
    assert _final_params(tmp_path / "killed", args)[0] == 400


def test_cli_help_and_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    assert "train" in capsys.readouterr().out
    assert cli.main(["train", "no-such-recipe"]) == 2
    assert "unknown recipe 'no-such-recipe'" in capsys.readouterr().err
    assert cli.main(["train", "protein-mlm", "--seq-len", "2000", "--max-len", "1024"]) == 2
    assert "seq_len=2000 exceeds the model's max_len=1024" in capsys.readouterr().err
    assert cli.main(["train", "protein-mlm", "--embed-dim", "30"]) == 2
    assert "embed_dim=30 is not divisible by num_heads=4" in capsys.readouterr().err


def test_grad_accumulation_equals_full_batch_with_uneven_tokens():
    tx = optax.sgd(0.1)
    graphdef, state = init_train_state(Transformer(CFG, rngs=nnx.Rngs(2)), tx)
    batch = _batch(seed=4, b=8, s=12)
    batch["weights"][0::4] = 0.0                 # microbatch 0 of 4 has no predicted token at all
    batch["weights"][1::4, :3] = 0.0             # the others hold different numbers of real tokens
    grad_full = make_train_step(graphdef, tx, loss_fn=mlm_loss)
    from sciscale_jax.train import accumulating_grad_fn
    grad_accum = make_train_step(graphdef, tx, loss_fn=mlm_loss, grad_fn=accumulating_grad_fn(graphdef, mlm_loss, 4))
    (a, ma), (b, mb) = jax.jit(grad_full)(state, batch), jax.jit(grad_accum)(state, batch)
    assert float(mb["loss"]) == pytest.approx(float(ma["loss"]), rel=1e-5)   # accumulation reorders sums
    assert float(mb["tokens"]) == float(ma["tokens"])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), b.params, a.params)
    with pytest.raises(ValueError, match="grad_accum=3 must be >= 1 and divide batch_size=16"):
        TrainConfig(batch_size=16, grad_accum=3)


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_train_loop_decays_weight_matrices_only(decay_embeddings):
    """With zero gradients one AdamW step only decays: weight matrices shrink by lr * wd, norm scales
    and biases never move, embeddings only with decay_embeddings."""
    cfg = TrainConfig(steps=10, warmup_steps=0, learning_rate=0.1, weight_decay=0.5, grad_clip=0.0,
                      decay_embeddings=decay_embeddings)
    tx = build_optimizer(cfg)
    params = nnx.to_pure_dict(nnx.state(Transformer(CFG, rngs=nnx.Rngs(0)), nnx.Param))
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    shrink = 1.0 - 0.1 * 0.5  # the schedule's first value is the peak lr (no warm-up)
    np.testing.assert_allclose(new["layers"][0]["mlp"]["wi"]["kernel"], params["layers"][0]["mlp"]["wi"]["kernel"] * shrink,
                               rtol=1e-6)
    np.testing.assert_array_equal(new["layers"][0]["attn_norm"]["scale"], params["layers"][0]["attn_norm"]["scale"])
    np.testing.assert_array_equal(new["final_norm"]["scale"], params["final_norm"]["scale"])
    embed_expected = params["embed"] * shrink if decay_embeddings else params["embed"]
    np.testing.assert_allclose(new["embed"], embed_expected, rtol=1e-6)


def test_zeroth_order_step_reports_every_loss_evaluation():
    """The progress hook of a zeroth-order step fires once per loss evaluation: DeepZero's count
    (1 + the kept coordinates, zo_budget) plus the loss the step reports."""
    from sciscale_jax import optim
    from sciscale_jax.train import make_zeroth_order_step
    from sciscale_jax.train.zo_budget import evaluations_per_step

    tiny = TransformerConfig(vocab_size=32, num_layers=1, num_heads=2, embed_dim=8, mlp_dim=16, max_len=16)
    tx = optim.get_optimizer("deepzero", 1e-3, density=0.05, chunk_size=16)
    graphdef, state = init_train_state(Transformer(tiny, rngs=nnx.Rngs(0)), tx)
    calls = []
    step = jax.jit(make_zeroth_order_step(graphdef, tx, loss_fn=mlm_loss, on_evaluation=lambda: calls.append(1)))
    jax.block_until_ready(step(state, _batch(s=8)))
    assert len(calls) == evaluations_per_step("deepzero", state.params, {"density": 0.05}) + 1
