"""Approximate attention on the real task: Linformer and Performer vs exact attention on the protein MLM.

Trains the same protein MLM (same seed, data, steps) with ``attention="xla"``, ``"linformer"``
and ``"performer"`` through ``sciscale_jax.train.train`` and reports each validation loss and
its ratio to exact attention's; the issue's bar is within 10%. Prints a markdown table and
writes ``benchmarks/results/attention_mlm.json``.

    python benchmarks/attention_mlm.py              # ~5 minutes on 2 CPU cores
    python benchmarks/attention_mlm.py --steps 600  # a longer budget
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

import jax

from sciscale_jax.models import TransformerConfig
from sciscale_jax.recipes import get_recipe
from sciscale_jax.train import TrainConfig, train

RESULTS = pathlib.Path(__file__).parent / "results"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--impls", nargs="+", default=["xla", "linformer", "performer"])
    p.add_argument("--linformer-k", type=int, default=32, help="projected length (below seq-len: compression)")
    p.add_argument("--performer-features", type=int, default=128)
    args = p.parse_args(argv)
    recipe = get_recipe("protein-mlm")
    train_cfg = TrainConfig(**{**recipe.train_defaults, "steps": args.steps, "seq_len": args.seq_len,
                               "eval_every": args.steps, "save_every": args.steps})
    rows = []
    for impl in args.impls:
        model_cfg = TransformerConfig(**{**recipe.model_defaults, "attention": impl, "max_len": args.seq_len,
                                         "linformer_k": args.linformer_k,
                                         "performer_features": args.performer_features})
        with tempfile.TemporaryDirectory() as out:
            r = train(recipe, model_cfg, train_cfg, out, progress=False, log=lambda *_: None)
        rows.append({"attention": impl, "val_loss": r["val_loss"], "val_ppl": r["val_ppl"],
                     "temp_mib": r["memory"].temp_bytes / 2**20, "unigram_ppl": r["baselines"]["unigram_ppl"]})
        print(f"{impl}: val loss {r['val_loss']:.4f}", flush=True)
    exact = next(r["val_loss"] for r in rows if r["attention"] == "xla")
    device = jax.devices()[0].device_kind
    print(f"\nprotein MLM, {args.steps} steps, seq {args.seq_len}, Linformer k={args.linformer_k}, "
          f"Performer {args.performer_features} features, device: {device}\n")
    print("| attention | val loss | / exact | val ppl | step temp MiB |\n|---|---:|---:|---:|---:|")
    for r in rows:
        r["ratio_to_exact"] = r["val_loss"] / exact
        print(f"| {r['attention']} | {r['val_loss']:.4f} | {r['ratio_to_exact']:.3f} | {r['val_ppl']:.3f} "
              f"| {r['temp_mib']:.1f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "attention_mlm.json").write_text(json.dumps(
        {"device": device, "steps": args.steps, "seq_len": args.seq_len, "linformer_k": args.linformer_k,
         "performer_features": args.performer_features, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
