"""smiles-lm with packed molecules kept apart (``--isolate-molecules``) against the default packing.

smiles-lm packs whole molecules into each training row (bos ... eos bos ... eos). By default a
molecule also attends to those before it in its row, its positions count from the row's start and
a row's next-token targets run across the boundaries; but validation scores each molecule alone
from position 0, and sampling starts from bos alone. ``--isolate-molecules`` trains as the model
is used. Both runs: the recipe's defaults (1,500 steps, the same seed, the same rows), then the
recipe's own validation (per molecule, unpacked; beside the unigram and 5-gram baselines) and
``--samples`` sampled SMILES scored by RDKit at temperature 0.7.

    python benchmarks/smiles_isolation.py            # results/smiles_isolation_<device>.{json,md}
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

import jax

from sciscale_jax.recipes import get_recipe
from sciscale_jax.recipes.smiles_lm import generation_figures
from sciscale_jax.train import TrainConfig, train

RESULTS = pathlib.Path(__file__).parent / "results"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=0, help="0: the recipe's default")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    device = jax.devices()[0].device_kind
    recipe = get_recipe("smiles-lm")
    train_cfg = TrainConfig(**{**recipe.train_defaults, **({"steps": args.steps} if args.steps else {})})
    runs = {}
    for isolate in (False, True):
        model_cfg = recipe.make_config(isolate_molecules=isolate, samples=args.samples)
        with tempfile.TemporaryDirectory() as tmp:
            result = train(recipe, model_cfg, train_cfg, pathlib.Path(tmp) / "r", progress=False,
                           log=lambda *_: None)
        row = {"validation": result["validation"], "baselines": result["baselines"],
               "train_loss": result["train_loss"], "seconds": result["seconds"]}
        if args.samples:
            fig = generation_figures(model_cfg, train_cfg, result["state"])
            row["generation"] = {k: fig[k] for k in ("model", "ngram", "temperature") if k in fig}
        runs["isolated" if isolate else "default"] = row
        print("isolated" if isolate else "default", json.dumps(row["validation"]), flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = device.lower().replace(" ", "_")
    (out / f"smiles_isolation_{tag}.json").write_text(json.dumps(
        {"device": device, "steps": train_cfg.steps, "samples": args.samples, "runs": runs}, indent=1) + "\n")
    base = runs["default"]["baselines"]
    lines = [f"smiles-lm, packed rows with and without `--isolate-molecules` "
             f"(`python benchmarks/smiles_isolation.py`), "
             f"device {device}, {train_cfg.steps} steps, recipe defaults; validation per molecule (nats per token); "
             f"baselines: unigram ppl {base.get('unigram_ppl', float('nan')):.3f}, "
             f"5-gram ppl {base.get('ngram5_ppl', float('nan')):.3f}", "",
             "| packing | validation loss | ppl | validity | uniqueness | novelty |", "|---|---:|---:|---:|---:|---:|"]
    for name, row in runs.items():
        val, gen = row["validation"], row.get("generation", {}).get("model", {})
        cells = [f"{gen[k]:.3f}" if k in gen else "-" for k in ("validity", "uniqueness", "novelty")]
        lines.append(f"| {name} | {val['val_loss']:.4f} | {val['val_ppl']:.3f} | " + " | ".join(cells) + " |")
    (out / f"smiles_isolation_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
