"""Train the smiles-lm recipe, then sample molecules and score them against an n-gram baseline.

Tiny on CPU by default (the recipe's defaults, a few minutes on 2 cores); every `sciscale train
smiles-lm` flag scales it, e.g. on a GPU:

    python examples/smiles_lm.py --layers 12 --embed-dim 768 --mlp-dim 3072 --heads 12 \
        --batch-size 256 --steps 20000 --precision bf16 --attention flash

Prints the train-step memory, validation perplexity beside the unigram and n-gram baselines,
and validity / uniqueness / novelty (and internal diversity) of --samples sampled SMILES for the
model and for the n-gram model fitted on the same split.
"""

from __future__ import annotations

import datetime
import json
import sys

from sciscale_jax import cli
from sciscale_jax.recipes import get_recipe
from sciscale_jax.recipes.smiles_lm import evaluate_generation, trained_model
from sciscale_jax.train import train


def main(argv=None) -> int:
    recipe = get_recipe("smiles-lm")
    parser = cli.train_parser(recipe)
    parser.prog = "python examples/smiles_lm.py"
    gen = parser.add_argument_group("generation")
    gen.add_argument("--samples", type=int, default=1000, help="SMILES to sample after training")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="0: sample from the whole vocabulary")
    gen.add_argument("--json", help="also write the figures to this JSON file")
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
    data = recipe.build_data(train_cfg, model_cfg)
    model = trained_model(model_cfg, result["state"])
    gen_metrics = evaluate_generation(model, data, args.samples, temperature=args.temperature, top_k=args.top_k,
                                      seed=train_cfg.seed, diversity=True)
    corpus = data.train.corpus
    print(f"\n{args.samples} sampled SMILES (temperature {args.temperature}, top-k {args.top_k or 'off'}); "
          f"training set {len(corpus.train_smiles)} molecules, n-gram n={corpus.ngram.n}")
    print("| sampler | validity | uniqueness | novelty | internal diversity |")
    print("|---|---|---|---|---|")
    for name in ("model", "ngram"):
        m = gen_metrics[name]
        print(f"| {name} | {m['validity']:.3f} | {m['uniqueness']:.3f} | {m['novelty']:.3f} | "
              f"{m['internal_diversity']:.3f} |")
    print("examples: " + "  ".join(gen_metrics["samples"][:5]))
    if args.json:
        figures = {"validation": result["validation"], "baselines": result["baselines"], "seconds": result["seconds"],
                   "model": gen_metrics["model"], "ngram": gen_metrics["ngram"], "samples": args.samples}
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
