"""Approximate attention on the real task: Linformer and Performer vs exact attention on the protein MLM.

Trains the same protein MLM (same seed, data, steps) with ``attention="xla"`` (exact),
``"linformer"``, ``"performer"`` and a negative control, ``"none"``: attention replaced by
the identity (each position returns its own value vector), a model that cannot see context.
Each is scored on the mask-replaced validation positions (>= 20k targets over several
corruptions of held-out proteins) next to the context-free baseline P(target | input
token). What matters is the context gain, context-free loss minus the model's: the control
must show none, and "/ exact gain" says how much of exact attention's gain an approximation
keeps. Prints a markdown table and writes ``benchmarks/results/attention_mlm.json``.

    python benchmarks/attention_mlm.py                  # the recipe's default run, four times
    python benchmarks/attention_mlm.py --impls xla none # the control alone
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import jax
from flax import nnx

from sciscale_jax import attention
from sciscale_jax.models import Transformer, TransformerConfig
from sciscale_jax.recipes import get_recipe
from sciscale_jax.recipes.protein_mlm import evaluate_metrics
from sciscale_jax.train import TrainConfig, split_model, train

RESULTS = pathlib.Path(__file__).parent / "results"


def no_context_attention(q, k, v, *, bias=None, mask=None, causal=False, scale=None):
    """The negative control: every position attends to itself only (output = its own value)."""
    del q, k, bias, mask, causal, scale
    return v


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    p.add_argument("--seq-len", type=int, default=None, help="default: the recipe's")
    p.add_argument("--impls", nargs="+", default=["xla", "none", "linformer", "performer"])
    p.add_argument("--linformer-k", type=int, default=32, help="projected length (below seq-len: compression)")
    p.add_argument("--performer-features", type=int, default=128)
    args = p.parse_args(argv)
    attention.register("none", no_context_attention)
    recipe = get_recipe("protein-mlm")
    over = {k: v for k, v in (("steps", args.steps), ("seq_len", args.seq_len)) if v is not None}
    train_cfg = TrainConfig(**{**recipe.train_defaults, **over})
    train_cfg = TrainConfig(**{**train_cfg.to_dict(), "eval_every": train_cfg.steps, "save_every": train_cfg.steps})
    data = recipe.build_data(train_cfg)
    base = data.baselines
    rows = []
    for impl in args.impls:
        model_cfg = TransformerConfig(**{**recipe.model_defaults, "attention": impl, "max_len": train_cfg.seq_len,
                                         "linformer_k": args.linformer_k,
                                         "performer_features": args.performer_features})
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            r = train(recipe, model_cfg, train_cfg, out, progress=False, log=lambda *_: None)
        seconds = time.perf_counter() - t0
        graphdef, _, _ = split_model(Transformer(model_cfg, rngs=nnx.Rngs(0)))
        m = evaluate_metrics(graphdef, r["state"].params, r["state"].rest, data.eval)
        rows.append({"attention": impl, "masked_loss": m["loss"], "masked_accuracy": m["accuracy"],
                     "kept_loss": m["loss_kept"], "selected_loss": m["loss_selected"],
                     "context_gain": base["context_free_loss"] - m["loss"],
                     "temp_mib": r["memory"].temp_bytes / 2**20, "seconds": seconds})
        print(f"{impl}: masked loss {m['loss']:.4f} (context-free {base['context_free_loss']:.4f}), "
              f"{seconds:.0f} s", flush=True)
        _write(train_cfg, args, data, rows)   # after every row: a cut-short run keeps what it measured
    exact = next((r for r in rows if r["attention"] == "xla"), None)
    device = jax.devices()[0].device_kind
    masked = sum(int((b["corruption"] == 1).sum()) for b in data.eval)
    print(f"\nprotein MLM, recipe defaults, {train_cfg.steps} steps, seq {train_cfg.seq_len}, Linformer "
          f"k={args.linformer_k}, Performer {args.performer_features} features; {masked} masked validation "
          f"targets; context-free {base['context_free_loss']:.4f}, unigram {base['unigram_loss']:.4f}; "
          f"device: {device}\n")
    print("| attention | masked loss | context gain (nats) | / exact gain | masked acc | all-chosen loss "
          "| step temp MiB |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        r["gain_ratio_to_exact"] = r["context_gain"] / exact["context_gain"] if exact else None
        ratio = f"{r['gain_ratio_to_exact']:.2f}" if exact else "-"
        print(f"| {r['attention']} | {r['masked_loss']:.4f} | {r['context_gain']:+.4f} | {ratio} "
              f"| {r['masked_accuracy']:.4f} | {r['selected_loss']:.4f} | {r['temp_mib']:.1f} |")
    _write(train_cfg, args, data, rows)


def _write(train_cfg, args, data, rows):
    RESULTS.mkdir(exist_ok=True)
    masked = sum(int((b["corruption"] == 1).sum()) for b in data.eval)
    (RESULTS / "attention_mlm.json").write_text(json.dumps(
        {"device": jax.devices()[0].device_kind, "steps": train_cfg.steps, "seq_len": train_cfg.seq_len,
         "linformer_k": args.linformer_k, "performer_features": args.performer_features,
         "masked_targets": masked, "baselines": data.baselines, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
