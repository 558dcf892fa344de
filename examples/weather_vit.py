"""Train the weather-vit recipe, then score it against persistence and climatology and roll it out.

Small on CPU by default (the recipe's defaults: a T21 Held-Suarez atmosphere simulated by
dinosaur on first use and cached, a 32 x 64 grid, 4 x 4 patches); every `sciscale train
weather-vit` flag scales it, e.g. ClimaX's 5.625-degree grid with 2 x 2 patches (512 tokens)
and a larger model on a GPU (a sketch: this configuration has not been run):

    python examples/weather_vit.py --truncation 42 --dt-minutes 20 --lat 32 --lon 64 --patch-size 2 \
        --layers 8 --embed-dim 512 --mlp-dim 2048 --heads 8 --batch-size 64 --steps 20000 \
        --train-trajectories 16 --trajectory-days 100 --precision bf16 --attention flash --remat full

Prints the train-step memory, the latitude-weighted RMSE and ACC per channel at the trained
lead beside persistence and climatology, and the RMSE of autoregressive rollouts against lead
time; the rollout curves are plotted to --plot (PNG, needs matplotlib). A model trained on
several leads (--max-lead-steps) is also scored by direct forecasts at each of them.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import sys

from sciscale_jax import cli
from sciscale_jax.recipes import get_recipe
from sciscale_jax.recipes.weather_vit import rollout, trained_model
from sciscale_jax.train import train


def plot_rollout(curves: dict, path: str) -> None:
    """One panel per channel: RMSE against lead time for the model, persistence and climatology."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(curves["model"])
    cols = 4
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for who, style in (("model", "-o"), ("persistence", "--"), ("climatology", ":")):
            ax.plot(curves["lead_hours"], curves[who][name], style, label=who, markersize=3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("lead (h)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"weather-vit rollout RMSE on held-out trajectories ({curves['starts']} starts)", fontsize=10)
    fig.tight_layout()
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    recipe = get_recipe("weather-vit")
    parser = cli.train_parser(recipe)
    parser.prog = "python examples/weather_vit.py"
    group = parser.add_argument_group("rollout")
    group.add_argument("--rollout-steps", type=int, default=12, help="autoregressive steps of the trained lead")
    group.add_argument("--rollout-every", type=int, default=4, help="start a rollout at every N-th held-out state")
    group.add_argument("--plot", help="PNG of rollout RMSE vs lead time (default: <out>/rollout.png)")
    group.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    recipe, model_cfg, train_cfg = cli.build_configs(args, recipe)
    out = args.out or f"runs/weather-vit-example-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    result = train(recipe, model_cfg, train_cfg, out, resume=args.resume, force=args.force,
                   progress=not args.no_progress)
    print(result["memory"].format("train step memory per device"))
    print(f"run at step {result['steps']} after {result['seconds']:.0f} s of training in this call; "
          f"final train loss {result['train_loss']:.4f} (nan: no step ran)")
    val, base = result["validation"], result["baselines"]
    hours = model_cfg.lead_steps * model_cfg.interval_hours
    print(f"\nheld-out trajectories, lead {hours} h: lat-weighted RMSE (ACC)")
    print("| channel | model | persistence | climatology |")
    print("|---|---|---|---|")
    for name in model_cfg.variables:
        print(f"| {name} | {val[f'val_rmse_{name}']:.4g} ({val[f'val_acc_{name}']:.3f}) | "
              f"{base[f'persistence_rmse_{name}']:.4g} ({base[f'persistence_acc_{name}']:.3f}) | "
              f"{base[f'climatology_rmse_{name}']:.4g} |")
    print(f"| all (normalized MSE) | {val['val_loss']:.4g} | {base['persistence_loss']:.4g} | "
          f"{base['climatology_loss']:.4g} |")

    prep = recipe.build_data(train_cfg, model_cfg).train.prepared  # read back from the cache
    model = trained_model(model_cfg, result["state"])
    leads = model_cfg.max_lead_steps // model_cfg.lead_steps  # trained leads that are multiples of the first
    room = max(args.rollout_steps, leads)  # direct and chained forecasts from the same starts
    curves = rollout(model, prep, model_cfg.lead_steps, args.rollout_steps, every=args.rollout_every, room=room)
    print(f"\nrollout RMSE vs lead time ({curves['starts']} starts): model / persistence / climatology")
    for name in model_cfg.variables:
        cells = [f"{h} h {m:.3g}/{p:.3g}/{c:.3g}" for h, m, p, c in zip(
            curves["lead_hours"], curves["model"][name], curves["persistence"][name], curves["climatology"][name])]
        shown = sorted({0, len(cells) // 4, len(cells) // 2, 3 * len(cells) // 4, len(cells) - 1})
        print(f"{name}: " + ", ".join(cells[i] for i in shown))
    direct = None
    if leads > 1:  # trained on several leads: one application each
        direct = rollout(model, prep, model_cfg.lead_steps, leads, every=args.rollout_every, direct=True, room=room)
        print(f"\ndirect forecasts at each trained lead ({direct['starts']} starts): model direct / model rollout / "
              "persistence")
        for name in model_cfg.variables:
            print(f"{name}: " + ", ".join(f"{h} h {d:.3g}/{r:.3g}/{p:.3g}" for h, d, r, p in zip(
                direct["lead_hours"], direct["model"][name], curves["model"][name], direct["persistence"][name])))
    plot = args.plot or f"{out}/rollout.png"
    plot_rollout(curves, plot)
    print(f"rollout plot: {plot}")
    if args.json:
        figures = {"validation": val, "baselines": base, "seconds": result["seconds"], "rollout": curves,
                   "direct": direct, "memory": result["memory"].as_dict()}
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
