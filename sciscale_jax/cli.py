"""The ``sciscale`` command: ``sciscale train <recipe> [flags]`` and ``sciscale recipes``."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys

# Model flags: CLI name -> TransformerConfig field. Train flags: CLI name -> TrainConfig field.
MODEL_FLAGS = {"layers": "num_layers", "heads": "num_heads", "embed_dim": "embed_dim", "mlp_dim": "mlp_dim",
               "max_len": "max_len", "dropout": "dropout", "scan_layers": "scan_layers", "remat": "remat",
               "attention": "attention", "mlp": "mlp", "precision": "precision", "quant": "quant"}
TRAIN_FLAGS = {"steps": "steps", "batch_size": "batch_size", "seq_len": "seq_len", "lr": "learning_rate",
               "warmup_steps": "warmup_steps", "weight_decay": "weight_decay", "grad_clip": "grad_clip",
               "optimizer": "optimizer", "seed": "seed", "eval_every": "eval_every", "save_every": "save_every",
               "keep": "keep", "log_every": "log_every",
               "mesh": "mesh", "zero": "zero", "sharding": "sharding", "grad_accum": "grad_accum", "offload": "offload",
               "schedule_steps": "schedule_steps"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sciscale", description="Memory-efficient training of transformers for science.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("recipes", help="list the training recipes")
    t = sub.add_parser("train", help="train a recipe", description="Train a recipe; unset flags take the recipe's defaults.")
    t.add_argument("recipe", help="recipe name (see `sciscale recipes`)")
    t.add_argument("--out", help="run directory (default: runs/<recipe>-<time>)")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    t.add_argument("--force", action="store_true", help="reuse --out even if its saved config differs")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    g = t.add_argument_group("run")
    for flag, typ in (("steps", int), ("batch-size", int), ("seq-len", int), ("lr", float), ("warmup-steps", int),
                      ("weight-decay", float), ("grad-clip", float), ("optimizer", str), ("seed", int),
                      ("eval-every", int), ("save-every", int), ("keep", int), ("log-every", int), ("grad-accum", int),
                      ("schedule-steps", int)):
        g.add_argument(f"--{flag}", type=typ)
    d = t.add_argument_group("distribution")
    d.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=2,tensor=2 (axes: data fsdp sequence tensor2 "
                                  "tensor pipeline; one may be -1)")
    d.add_argument("--zero", type=int, help="ZeRO stage 0-3 over the data axes")
    d.add_argument("--offload", help="keep opt_state, params or opt_state,params in pinned host memory")
    d.add_argument("--sharding", help="rule table (dp fsdp tp tp_sp tp2d fsdp_tp); default picked from the mesh")
    m = t.add_argument_group("model")
    for flag, typ in (("layers", int), ("heads", int), ("embed-dim", int), ("mlp-dim", int), ("max-len", int),
                      ("dropout", float), ("remat", str), ("attention", str), ("mlp", str),
                      ("precision", str), ("quant", str)):
        m.add_argument(f"--{flag}", type=typ)
    m.add_argument("--scan-layers", action="store_true", default=None, help="stack layers and run them with scan")
    return p


def _pick(args, flags: dict, defaults: dict) -> dict:
    out = dict(defaults)
    for flag, field in flags.items():
        value = getattr(args, flag, None)
        if value is not None:
            out[field] = value
    return out


def build_configs(args):
    """(recipe, TransformerConfig, TrainConfig) from parsed flags over the recipe's defaults."""
    from sciscale_jax.models import TransformerConfig
    from sciscale_jax.recipes import get_recipe
    from sciscale_jax.train import TrainConfig

    recipe = get_recipe(args.recipe)
    train_cfg = TrainConfig(**_pick(args, TRAIN_FLAGS, recipe.train_defaults))
    model_cfg = TransformerConfig(**_pick(args, MODEL_FLAGS, recipe.model_defaults))
    return recipe, model_cfg, train_cfg


def _train(args) -> int:
    from sciscale_jax.train import train

    recipe, model_cfg, train_cfg = build_configs(args)
    out = args.out or f"runs/{recipe.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    print(f"recipe {recipe.name}: {recipe.description}")
    print("model  " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(model_cfg).items()))
    print("train  " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(train_cfg).items()))
    result = train(recipe, model_cfg, train_cfg, out, resume=args.resume, force=args.force,
                   progress=not args.no_progress)
    mib = 2.0 ** 20
    print(result["memory"].format("train step memory per device"))
    print(f"parameters {result['param_bytes'] / mib:.2f} MiB, optimizer state {result['opt_state_bytes'] / mib:.2f} MiB")
    print(f"final train loss {result['train_loss']:.4f}")
    print(f"validation loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.3f}")
    for name, value in result["baselines"].items():
        print(f"baseline {name}: {value:.3f}")
    print(f"checkpoints in {result['checkpoint_dir']} (step {result['steps']}); metrics in {out}/metrics.jsonl")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "recipes":
            from sciscale_jax.recipes import RECIPES
            for r in RECIPES.values():
                print(f"{r.name:16s} {r.description}")
            return 0
        return _train(args)
    except BaseException as err:  # [h3] one line on stderr for every failure; the traceback only with --debug
        if getattr(args, "debug", False) or isinstance(err, SystemExit):
            raise
        code, line = error_line(err)
        print(f"sciscale: {line}", file=sys.stderr)
        return code


def error_line(err: BaseException) -> tuple[int, str]:
    """(exit status, one line) for an exception that ends a command."""
    from sciscale_jax.errors import describe
    return describe(err)


if __name__ == "__main__":
    sys.exit(main())
