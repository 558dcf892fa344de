"""Packed rows (``--pack``) against padded ones: residues per step, step time, compiled memory.

protein-mlm on the 2,100 bacterial proteins shipped in pyhmmer (median length 276): one cropped
protein per row leaves the rest of a long row padding, which costs the same compute and memory as
residues. With ``--pack`` whole proteins follow one another, each attending only to itself.

1. The share of each row's positions that are real tokens (residues, cls, eos), counted on 50
   training batches of 8 rows at each ``--shares`` length.
2. ``--steps`` training steps of the recipe's default model (4 layers, width 128) at each
   ``--seq-lens`` length and each ``--attention`` implementation, padded and packed: the loop's own
   step time (``metrics.jsonl``, compile excluded, the fastest of ``--rounds`` interleaved runs),
   the compiled step's peak memory (XLA's memory analysis of the real step) and the real tokens per
   step of the batches those steps drew. Residues per second are their ratio; speed-ups are ratios
   to the padded run in the same process on the same device.
3. With ``--quality-steps N``: what packing does to held-out loss at equal compute. Padded and
   packed runs of N steps each (the same model, batch, learning-rate schedule and steps, so the
   same FLOPs but for the padding) at ``--quality-seq-len``, for each of ``--quality-seeds``; the
   validation split is one protein per row for both (the recipe's own evaluation: loss at
   mask-replaced positions), beside the recipe's unigram and context-free baselines.

    python benchmarks/packing.py          # results/packing_<device>.{json,md}
    python benchmarks/packing.py --quality-steps 600 --quality-seeds 0 1 2 3   # results/packing_quality_*
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

import jax
import numpy as np

from sciscale_jax.recipes import get_recipe
from sciscale_jax.train import TrainConfig, train

RESULTS = pathlib.Path(__file__).parent / "results"


def _shares(recipe, lengths, batches=50):
    out = {}
    for seq_len in lengths:
        cfg = TrainConfig(**{**recipe.train_defaults, "seq_len": seq_len, "batch_size": 8})
        row = {}
        for pack in (False, True):
            data = recipe.build_data(cfg, recipe.make_config(pack=pack, max_len=max(1024, seq_len)))
            row["packed" if pack else "padded"] = float(np.mean([data.train.batch(s)["mask"].mean()
                                                                 for s in range(batches)]))
        out[seq_len] = row
    return out


def _run(recipe, model_cfg, train_cfg, folder):
    summary = train(recipe, model_cfg, train_cfg, folder, progress=False, log=lambda *_: None)
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in lines if "time" in m]
    first, last = logged[0], logged[-1]
    return {"seconds_per_step": (last["time"] - first["time"]) / (last["step"] - first["step"]),
            "peak_mib": summary["memory"].peak_bytes / 2**20}


def quality(recipe, seq_len, steps, seeds):
    """Held-out loss of padded and packed runs of ``steps`` steps at ``seq_len``, per seed."""
    runs = []
    for seed in seeds:
        for pack in (False, True):
            cfg = TrainConfig(**{**recipe.train_defaults, "steps": steps, "batch_size": 8, "seq_len": seq_len,
                                 "seed": seed, "log_every": steps, "eval_every": steps, "save_every": 10 * steps})
            model_cfg = recipe.make_config(pack=pack, attention="chunked", max_len=max(1024, seq_len))
            data = recipe.build_data(cfg, model_cfg)
            drawn = range(0, steps, max(1, steps // 50))
            tokens = float(np.mean([data.train.batch(s)["mask"].sum() for s in drawn]))
            with tempfile.TemporaryDirectory() as tmp:
                summary = train(recipe, model_cfg, cfg, pathlib.Path(tmp) / "r", progress=False, log=lambda *_: None)
            runs.append({"seed": seed, "packed": pack, "real_tokens_per_step": tokens,
                         "val_loss": summary["val_loss"], "train_loss": summary["train_loss"],
                         "baselines": {k: summary["baselines"][f"{k}_loss"] for k in ("unigram", "context_free")}})
            print(json.dumps(runs[-1]), flush=True)
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--attention", nargs="+", default=["xla", "chunked"])
    parser.add_argument("--shares", type=int, nargs="*", default=[128, 256, 512, 1024])
    parser.add_argument("--quality-steps", type=int, default=0)
    parser.add_argument("--quality-seq-len", type=int, default=512)
    parser.add_argument("--quality-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    device = jax.devices()[0].device_kind
    recipe = get_recipe("protein-mlm")
    if args.quality_steps:
        return _write_quality(args, device, quality(recipe, args.quality_seq_len, args.quality_steps,
                                                    args.quality_seeds))
    shares = _shares(recipe, args.shares)
    for seq_len, row in shares.items():
        print(f"seq_len {seq_len}: real tokens {row['padded']:.1%} padded, {row['packed']:.1%} packed", flush=True)
    rows = []
    for seq_len in args.seq_lens:
        for impl in args.attention:
            base = TrainConfig(**{**recipe.train_defaults, "steps": args.steps, "log_every": 5, "batch_size": 8,
                                  "seq_len": seq_len, "eval_every": 10 * args.steps, "save_every": 10 * args.steps})
            runs = {False: [], True: []}
            tokens = {}
            for round_ in range(args.rounds):
                for pack in ((False, True) if round_ % 2 == 0 else (True, False)):
                    model_cfg = recipe.make_config(pack=pack, attention=impl, max_len=max(1024, seq_len))
                    if pack not in tokens:
                        data = recipe.build_data(base, model_cfg)
                        tokens[pack] = float(np.mean([data.train.batch(s)["mask"].sum() for s in range(args.steps)]))
                    with tempfile.TemporaryDirectory() as tmp:
                        runs[pack].append(_run(recipe, model_cfg, base, pathlib.Path(tmp) / "r"))
                    print(seq_len, impl, "packed" if pack else "padded",
                          f"{runs[pack][-1]['seconds_per_step'] * 1e3:.1f} ms/step", flush=True)
            best = {pack: min(done, key=lambda r: r["seconds_per_step"]) for pack, done in runs.items()}
            row = {"seq_len": seq_len, "attention": impl}
            for pack in (False, True):
                row["packed" if pack else "padded"] = {
                    **best[pack], "tokens_per_step": tokens[pack],
                    "tokens_per_second": tokens[pack] / best[pack]["seconds_per_step"]}
            rows.append(row)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = device.lower().replace(" ", "_")
    (out / f"packing_{tag}.json").write_text(json.dumps(
        {"device": device, "steps": args.steps, "rounds": args.rounds, "batch_size": 8,
         "real_token_share": {str(k): v for k, v in shares.items()}, "runs": rows}, indent=1) + "\n")
    lines = [f"protein-mlm with packed rows (`python benchmarks/packing.py`), device {device}, batch 8, recipe "
             f"default model; real-token share of a row over 50 batches:", "",
             "| seq_len | " + " | ".join(str(k) for k in shares) + " |", "|---|" + "---:|" * len(shares),
             "| padded | " + " | ".join(f"{r['padded']:.1%}" for r in shares.values()) + " |",
             "| packed | " + " | ".join(f"{r['packed']:.1%}" for r in shares.values()) + " |", "",
             f"Training steps ({args.steps} steps, fastest of {args.rounds} interleaved runs):", "",
             "| seq_len | attention | real tokens / step padded -> packed | ms / step padded -> packed | "
             "peak MiB padded -> packed | real tokens / s packed / padded |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        a, b = r["padded"], r["packed"]
        lines.append(f"| {r['seq_len']} | {r['attention']} | "
                     f"{a['tokens_per_step']:.0f} -> {b['tokens_per_step']:.0f} | "
                     f"{a['seconds_per_step'] * 1e3:.0f} -> {b['seconds_per_step'] * 1e3:.0f} | "
                     f"{a['peak_mib']:.1f} -> {b['peak_mib']:.1f} | "
                     f"{b['tokens_per_second'] / a['tokens_per_second']:.2f}x |")
    (out / f"packing_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _write_quality(args, device, runs) -> int:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = device.lower().replace(" ", "_")
    (out / f"packing_quality_{tag}.json").write_text(json.dumps(
        {"device": device, "steps": args.quality_steps, "seq_len": args.quality_seq_len, "batch_size": 8,
         "runs": runs}, indent=1) + "\n")
    lines = [f"protein-mlm padded and packed at equal compute (`python benchmarks/packing.py --quality-steps "
             f"{args.quality_steps} --quality-seeds {' '.join(map(str, args.quality_seeds))}`), device {device}: "
             f"{args.quality_steps} steps of batch 8 at seq_len "
             f"{args.quality_seq_len}, recipe default model and schedule, `chunked` attention; held-out loss "
             "(nats, mask-replaced positions, one protein per row):", "",
             "| seed | padded: real tokens / step | padded: held-out loss | packed: real tokens / step | "
             "packed: held-out loss | packed - padded | unigram baseline |", "|---|---:|---:|---:|---:|---:|---:|"]
    gains = []
    for seed in args.quality_seeds:
        a, b = (next(r for r in runs if r["seed"] == seed and r["packed"] == p) for p in (False, True))
        gains.append(b["val_loss"] - a["val_loss"])
        lines.append(f"| {seed} | {a['real_tokens_per_step']:.0f} | {a['val_loss']:.4f} | "
                     f"{b['real_tokens_per_step']:.0f} | {b['val_loss']:.4f} | {gains[-1]:+.4f} | "
                     f"{a['baselines']['unigram']:.4f} |")
    spread = f" (standard deviation {np.std(gains, ddof=1):.4f})" if len(gains) > 1 else ""
    apart = max(abs(r["baselines"]["unigram"] - r["baselines"]["context_free"]) for r in runs)
    lines += ["", f"Mean packed - padded over {len(gains)} seeds: {np.mean(gains):+.4f} nats{spread}. The "
              "held-out positions depend on the seed, so each row has its own unigram baseline (the "
              f"context-free one is within {apart:.4f} of it in every run)."]
    (out / f"packing_quality_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
