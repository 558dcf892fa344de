"""EfficientQAT (Chen et al. 2024) on a trained protein MLM: Block-AP, then E2E-QP.

1. Train a small fp32 protein MLM with ``sciscale_jax.train.train`` (or, with ``--resume``,
   load the finished run in ``--run-dir``; a run trained by ``sciscale train protein-mlm
   --out DIR`` works too: its saved configs are read back).
2. Round-to-nearest (RTN) baseline: every kernel of every Transformer block quantised
   uniform asymmetric, ``--bits`` bits, one step size and zero point per ``--group-size``
   input rows (min/max initialisation, nothing trained).
3. Block-AP (``sciscale_jax.quant.block_ap_sequential``): block by block, all parameters and
   the quantisation parameters are trained on calibration batches to reproduce the
   full-precision block's output; the integer weights are then frozen.
4. E2E-QP (``sciscale_jax.quant.e2e_qp``): only the step sizes are trained end to end on
   the masked-LM loss.

The embedding, the final norm and the output head stay in full precision, as in the paper.
Prints the validation loss of fp32, RTN and EfficientQAT (and of Block-AP alone).

    python examples/efficient_qat.py                 # a few minutes on 2 CPU cores
    python examples/efficient_qat.py --resume        # reuse the fp32 model trained before
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from sciscale_jax import quant
from sciscale_jax.models import Transformer, TransformerConfig
from sciscale_jax.recipes.protein_mlm import RECIPE
from sciscale_jax.losses import mlm_loss
from sciscale_jax.train import TrainConfig, evaluate, make_eval_step, split_model, train

# Seeds of the batches drawn from the training split for calibration and E2E-QP: far from
# the training steps' seeds, so they are fresh draws (MLMBatches.batch is a function of step).
CALIB_STEP0, E2E_STEP0 = 1_000_000, 2_000_000


def small_configs(steps: int = 300, seed: int = 0) -> tuple[TransformerConfig, TrainConfig]:
    """The fp32 protein MLM this example (and benchmarks/precision.py) trains on 2 CPU cores."""
    model = TransformerConfig(vocab_size=32, num_layers=2, num_heads=4, embed_dim=64, mlp_dim=256,
                              max_len=64, precision="fp32")
    run = TrainConfig(steps=steps, batch_size=16, seq_len=64, learning_rate=2e-3,
                      warmup_steps=min(30, steps // 5), eval_every=steps, save_every=steps,
                      log_every=max(1, min(10, steps)), seed=seed)
    return model, run


def model_from_state(model_config: TransformerConfig, state) -> nnx.Module:
    """The Transformer holding ``state.params`` / ``state.rest`` (a ``TrainState``)."""
    graphdef, _, _ = split_model(Transformer(model_config, rngs=nnx.Rngs(0)))
    return nnx.merge(graphdef, state.params, state.rest)


def val_loss(model: nnx.Module, eval_batches) -> float:
    graphdef, params, rest = split_model(model)
    return evaluate(jax.jit(make_eval_step(graphdef, mlm_loss)), params, rest, eval_batches)["loss"]


def block_stream(model: Transformer, batch: dict):
    """(x_bse entering block 0, ``apply(block, x_bse)``) for ``batch``: the Transformer's own
    embedding lookup and the positions and padding mask its blocks see."""
    tokens_bs = jnp.asarray(batch["inputs"])
    b, s = tokens_bs.shape
    positions_bs = jnp.broadcast_to(jnp.arange(s), (b, s))
    mask_b11k = jnp.asarray(batch["mask"])[:, None, None, :].astype(bool)
    x_bse = jnp.take(model.embed[...], tokens_bs, axis=0).astype(model.config.dtype)
    return x_bse, lambda block, x: block(x, positions_bs, mask_b11k)


def _in_model(block_index: int, frozen: dict) -> dict:
    """Block-relative keys ("attn/query/kernel") -> model keys ("layers/0/attn/query/kernel")."""
    return {f"layers/{block_index}/{k}": fw for k, fw in frozen.items()}


def round_to_nearest(model: Transformer, *, bits: int, group_size: int) -> dict:
    """Quantise every block kernel with min/max step sizes (no training); returns the frozen weights."""
    frozen = {}
    for i, block in enumerate(model.layers):
        nested = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(block, nnx.Param)))
        flat = {"/".join(map(str, p)): v for p, v in nested.items()}
        block_frozen = {}
        for key, n_in in quant.quantized_kernels(block).items():
            w = flat[key]
            qp = quant.init_group_quant(w, bits, group_size, n_in)
            block_frozen[key] = quant.freeze(w, qp, bits, group_size, n_in)
        quant.load_frozen(block, block_frozen)
        frozen.update(_in_model(i, block_frozen))
    return frozen


def efficient_qat(model: Transformer, calib_batch: dict, e2e_batches, *, bits: int = 4, group_size: int = 64,
                  block_steps: int = 200, block_lr: float = 1e-4, block_qparam_lr: float = 1e-3,
                  e2e_lr: float = 1e-4, after_block_ap=None) -> dict:
    """Block-AP over ``model.layers`` on ``calib_batch``, then E2E-QP over ``e2e_batches``;
    ``model`` ends with the dequantised weights. ``after_block_ap(model)`` is called in between.
    Returns the frozen weights keyed by their path in ``model``."""
    x_bse, apply = block_stream(model, calib_batch)
    per_block = quant.block_ap_sequential(list(model.layers), x_bse, apply=apply, bits=bits,
                                          group_size=group_size, steps=block_steps,
                                          learning_rate=block_lr, qparam_learning_rate=block_qparam_lr)
    frozen = {}
    for i, block_frozen in enumerate(per_block):
        frozen.update(_in_model(i, block_frozen))
    if after_block_ap is not None:
        after_block_ap(model)

    def loss_fn(m, batch):
        total, count = mlm_loss(m, batch, None)
        return total / jnp.maximum(count, 1.0)

    return quant.e2e_qp(model, frozen, loss_fn, e2e_batches, learning_rate=e2e_lr)


def concat_batches(batches) -> dict:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def run(args) -> dict:
    run_dir = pathlib.Path(args.run_dir)
    saved = run_dir / "run_config.json"
    if args.resume and saved.exists():  # the configs the run was trained with
        cfg = json.loads(saved.read_text())
        if cfg["recipe"] != RECIPE.name or cfg["model"]["precision"] != "fp32" or cfg["model"]["quant"] != "none":
            raise ValueError(f"{run_dir} holds a {cfg['recipe']} run with precision={cfg['model']['precision']} "
                             f"quant={cfg['model']['quant']}; EfficientQAT here starts from an fp32 protein-mlm run")
        model_cfg, train_cfg = TransformerConfig(**cfg["model"]), TrainConfig(**cfg["train"])
    else:
        model_cfg, train_cfg = small_configs(args.steps, args.seed)
    print(f"fp32 model: {model_cfg.num_layers} layers, embed {model_cfg.embed_dim}; "
          f"{'loading' if args.resume else 'training'} {run_dir} ({train_cfg.steps} steps)")
    # Configs read back from the run differ from it only in fields added to the dataclasses
    # since it was saved (their defaults): force lets such a run load.
    result = train(RECIPE, model_cfg, train_cfg, run_dir, resume=args.resume, force=args.resume and saved.exists(),
                   progress=not args.quiet, log=print)
    data = RECIPE.build_data(train_cfg)
    calib = concat_batches([data.train.batch(CALIB_STEP0 + i) for i in range(args.calib_batches)])
    e2e = [data.train.batch(E2E_STEP0 + i) for i in range(args.e2e_steps)]
    losses = {"fp32": val_loss(model_from_state(model_cfg, result["state"]), data.eval)}

    rtn_model = model_from_state(model_cfg, result["state"])
    round_to_nearest(rtn_model, bits=args.bits, group_size=args.group_size)
    losses["rtn"] = val_loss(rtn_model, data.eval)

    t0 = time.perf_counter()
    model = model_from_state(model_cfg, result["state"])
    frozen = efficient_qat(model, calib, e2e, bits=args.bits, group_size=args.group_size,
                           block_steps=args.block_steps, block_lr=args.block_lr,
                           block_qparam_lr=args.block_qparam_lr, e2e_lr=args.e2e_lr,
                           after_block_ap=lambda m: losses.__setitem__("block_ap", val_loss(m, data.eval)))
    losses["efficient_qat"] = val_loss(model, data.eval)
    return {"losses": losses, "frozen": frozen, "model": model, "model_config": model_cfg,
            "train_config": train_cfg, "fp32_result": result, "seconds": time.perf_counter() - t0}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/efficient-qat-fp32", help="where the fp32 run is (or goes)")
    p.add_argument("--resume", action="store_true", help="load the finished fp32 run in --run-dir")
    p.add_argument("--steps", type=int, default=300, help="fp32 training steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calib-batches", type=int, default=8, help="batches of 16 sequences for Block-AP")
    p.add_argument("--block-steps", type=int, default=200, help="Adam steps per block (full calibration batch)")
    p.add_argument("--block-lr", type=float, default=1e-4)
    p.add_argument("--block-qparam-lr", type=float, default=1e-3)
    p.add_argument("--e2e-steps", type=int, default=100, help="E2E-QP steps, one training batch each")
    p.add_argument("--e2e-lr", type=float, default=1e-4)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    out = run(args)
    losses = out["losses"]
    name = f"{args.bits}-bit, group {args.group_size}"
    print("\n| model | val loss | vs fp32 |\n|---|---|---|")
    for key, label in (("fp32", "fp32"), ("rtn", f"round-to-nearest {name}"),
                       ("block_ap", f"Block-AP only {name}"), ("efficient_qat", f"EfficientQAT {name}")):
        rel = losses[key] / losses["fp32"] - 1.0
        print(f"| {label} | {losses[key]:.4f} | {rel:+.2%} |")
    print(f"(Block-AP + E2E-QP took {out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
