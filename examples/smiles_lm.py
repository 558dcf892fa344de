"""Train the smiles-lm recipe, then sample molecules and score them against an n-gram baseline.

Tiny on CPU by default (the recipe's defaults); every `sciscale train smiles-lm` flag scales it,
e.g. on a GPU:

    python examples/smiles_lm.py --layers 12 --embed-dim 768 --mlp-dim 3072 --heads 12 \
        --batch-size 256 --steps 20000 --precision bf16 --attention flash

Prints the train-step memory, validation perplexity beside the unigram and n-gram baselines,
and validity / uniqueness / novelty / internal diversity of --samples sampled SMILES (at
--temperature and --top-k, and at temperature 1.0) for the model and for the n-gram model
fitted on the same split.
"""

from __future__ import annotations

import datetime
import json
import sys

from sciscale_jax import cli
from sciscale_jax.recipes import get_recipe
from sciscale_jax.recipes.smiles_lm import format_figures, generation_figures
from sciscale_jax.train import train


def main(argv=None) -> int:
    recipe = get_recipe("smiles-lm")
    parser = cli.train_parser(recipe)
    parser.prog = "python examples/smiles_lm.py"
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    recipe, model_cfg, train_cfg = cli.build_configs(args, recipe)
    out = args.out or f"runs/smiles-lm-example-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    result = train(recipe, model_cfg, train_cfg, out, resume=args.resume, force=args.force,
                   progress=not args.no_progress)
    print(result["memory"].format("train step memory per device"))
    print(f"trained {result['steps']} steps in {result['seconds']:.0f} s; final train loss {result['train_loss']:.4f}")
    print("validation " + ", ".join(f"{k[4:]} {v:.4f}" for k, v in result["validation"].items()))
    for name, value in result["baselines"].items():
        print(f"baseline {name}: {value:.4f}")
    if not model_cfg.samples:
        return 0
    figures = generation_figures(model_cfg, train_cfg, result["state"])
    print("\n".join(format_figures(figures)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"validation": result["validation"], "baselines": result["baselines"],
                       "seconds": result["seconds"], **figures}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
