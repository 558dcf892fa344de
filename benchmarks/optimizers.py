"""Memory-efficient optimizers on the protein MLM: state bytes, step memory, validation loss.

For the protein-mlm recipe (ESM-style masked LM on the proteins shipped in pyhmmer) at two
model sizes, and for every optimizer in ``sciscale_jax.optim.OPTIMIZERS``:

- optimizer-state bytes per parameter (``tree_bytes(opt_state) / number of parameters``);
- the compiled train-step peak memory (XLA's compiled memory analysis, state donated as in
  ``sciscale_jax.train``), next to a forward-only evaluation of the same batch as the floor;
  the ratios MeZO / forward and AdamW / MeZO are the acceptance figures of issue 4;
- the validation loss after a fixed budget of steps from the same initialisation (seed 0),
  run through ``sciscale_jax.train.train`` (warm-up + cosine schedule, clipping for
  first-order methods), with each optimizer's learning rate picked by a small sweep on the
  small size (the sweep is reported too); the medium size reuses the picked rates.

DeepZero estimates the gradient coordinate by coordinate (1 + 5% of the parameters loss
evaluations per step), so it trains for ``--deepzero-steps`` steps at the small size only.

It prints markdown tables and writes ``benchmarks/results/optimizers.json`` and
``optimizers.png``. Memory is from the CPU compiled memory analysis.

    python benchmarks/optimizers.py            # CPU, ~10 minutes on 2 cores
    python benchmarks/optimizers.py --quick    # fewer steps and no sweep, ~3 minutes
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import tempfile
import time

import jax
from flax import nnx

from sciscale_jax import optim
from sciscale_jax.memory import compiled_memory, tree_bytes
from sciscale_jax.models import Transformer, TransformerConfig
from sciscale_jax.recipes.protein_mlm import RECIPE
from sciscale_jax.train.loop import TrainConfig, build_optimizer, evaluate, train
from sciscale_jax.train.step import init_train_state, make_eval_step, make_train_step, make_zeroth_order_step

RESULTS = pathlib.Path(__file__).parent / "results"
MiB = 2.0 ** 20

# (model, batch, seq); "medium" is the recipe's default model and batch.
SIZES = {
    "small": (dict(num_layers=2, num_heads=4, embed_dim=64, mlp_dim=256), 8, 64),
    "medium": (dict(num_layers=4, num_heads=4, embed_dim=128, mlp_dim=512), 16, 128),
}
# Learning rates tried at the small size (zeroth-order methods need far smaller ones).
SWEEP = {
    "adamw": (1e-3, 3e-3), "adafactor": (1e-2, 3e-2), "sm3": (3e-2, 1e-1), "came": (1e-3, 3e-3),
    "lion": (1e-4, 3e-4), "adam_mini": (1e-3, 3e-3), "adamw_8bit": (1e-3, 3e-3),
    "mezo": (1e-5, 1e-4, 1e-3), "zo_adamu": (1e-5, 1e-4, 1e-3), "deepzero": (1e-3, 1e-2),
}


def model_config(size: str) -> TransformerConfig:
    return TransformerConfig(vocab_size=32, max_len=1024, **SIZES[size][0])


def train_config(size: str, optimizer: str, lr: float, steps: int) -> TrainConfig:
    _, batch, seq = SIZES[size]
    return TrainConfig(steps=steps, batch_size=batch, seq_len=seq, learning_rate=lr, optimizer=optimizer,
                       warmup_steps=max(1, steps // 10), eval_every=10 ** 6, save_every=10 ** 6,
                       log_every=10 ** 6)


def step_memory(size: str, optimizer: str, lr: float, example) -> dict:
    """Compiled peak of the train step (state donated) and state bytes; nothing runs."""
    cfg = train_config(size, optimizer, lr, steps=100)
    tx = build_optimizer(cfg)
    graphdef, state = init_train_state(Transformer(model_config(size), rngs=nnx.Rngs(0)), tx)
    make = make_zeroth_order_step if optim.is_zeroth_order(optimizer) else make_train_step
    report = compiled_memory(jax.jit(make(graphdef, tx, loss_fn=RECIPE.loss_fn), donate_argnums=0), state, example)
    n = sum(x.size for x in jax.tree.leaves(state.params))
    return {"params": int(n), "state_bytes": tree_bytes(state.opt_state), "state_bytes_per_param":
            tree_bytes(state.opt_state) / n, "step_peak_bytes": report.peak_bytes}


def forward_memory(size: str, example) -> int:
    graphdef, state = init_train_state(Transformer(model_config(size), rngs=nnx.Rngs(0)), optim.adamw(1e-3))
    return compiled_memory(make_eval_step(graphdef, RECIPE.loss_fn), state.params, state.rest, example).peak_bytes


def initial_val_loss(size: str, data) -> float:
    model = Transformer(model_config(size), rngs=nnx.Rngs(0))   # train() builds the same model from seed 0
    graphdef, state = init_train_state(model, optim.adamw(1e-3))
    return evaluate(jax.jit(make_eval_step(graphdef, RECIPE.loss_fn)), state.params, state.rest, data.eval)["loss"]


def run(size: str, optimizer: str, lr: float, steps: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        summary = train(RECIPE, model_config(size), train_config(size, optimizer, lr, steps), out,
                        progress=False, log=lambda *a: None)
    return summary["val_loss"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100, help="training budget per run (both sizes)")
    ap.add_argument("--deepzero-steps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="40 steps, first rate of each sweep only")
    ap.add_argument("--optimizers", nargs="*", default=list(optim.OPTIMIZERS))
    args = ap.parse_args()
    steps = 40 if args.quick else args.steps
    t_start = time.perf_counter()
    out = {"device": jax.devices()[0].device_kind, "steps": steps, "deepzero_steps": args.deepzero_steps,
           "sizes": {}, "sweep": {}}

    sweep = {}
    for name in args.optimizers:   # the learning-rate sweep, small size
        budget = args.deepzero_steps if name == "deepzero" else steps
        lrs = SWEEP[name][:1] if args.quick else SWEEP[name]
        sweep[name] = {lr: run("small", name, lr, budget) for lr in lrs}
        print(f"sweep {name}: " + ", ".join(f"lr={lr:g} -> {v:.4f}" for lr, v in sweep[name].items()), flush=True)
    best = {name: min(losses, key=lambda lr: losses[lr] if math.isfinite(losses[lr]) else math.inf)
            for name, losses in sweep.items()}
    out["sweep"] = {name: {f"{lr:g}": v for lr, v in losses.items()} for name, losses in sweep.items()}

    for size in SIZES:
        _, batch, seq = SIZES[size]
        data = RECIPE.build_data(train_config(size, "adamw", 1e-3, 1))
        example = data.train.batch(0)
        rows = {}
        for name in args.optimizers:
            row = step_memory(size, name, best[name], example)
            row["lr"] = best[name]
            if size == "small":
                row["val_loss"] = sweep[name][best[name]]
            elif name != "deepzero":
                row["val_loss"] = run(size, name, best[name], steps)
            rows[name] = row
            print(f"{size} {name}: {row}", flush=True)
        out["sizes"][size] = {"model": SIZES[size][0], "batch": batch, "seq": seq,
                              "params": next(iter(rows.values()))["params"],
                              "forward_peak_bytes": forward_memory(size, example),
                              "initial_val_loss": initial_val_loss(size, data), "optimizers": rows}
    out["seconds"] = time.perf_counter() - t_start
    print_tables(out)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "optimizers.json").write_text(json.dumps(out, indent=1))
    plot(out, RESULTS / "optimizers.png")
    print(f"\nwrote {RESULTS / 'optimizers.json'} and optimizers.png in {out['seconds']:.0f} s")


def print_tables(out: dict):
    for size, res in out["sizes"].items():
        fwd = res["forward_peak_bytes"]
        print(f"\n### protein MLM, {size}: {res['model']}, batch {res['batch']} x {res['seq']}, "
              f"{res['params']:,} params ({out['device']}, compiled memory analysis)\n")
        print(f"forward-only evaluation peak: {fwd / MiB:.2f} MiB; validation loss at initialisation "
              f"{res['initial_val_loss']:.4f}\n")
        print("| optimizer | lr | state bytes / param | step peak (MiB) | peak / forward | val loss |")
        print("|---|---|---|---|---|---|")
        for name, r in res["optimizers"].items():
            val = f"{r['val_loss']:.4f}" if "val_loss" in r else "not run"
            steps = out["deepzero_steps"] if name == "deepzero" else out["steps"]
            print(f"| {name} | {r['lr']:g} | {r['state_bytes_per_param']:.3f} | {r['step_peak_bytes'] / MiB:.2f} "
                  f"| {r['step_peak_bytes'] / fwd:.2f} | {val} ({steps} steps) |")
        rows = res["optimizers"]
        if "mezo" in rows and "adamw" in rows:
            m, a = rows["mezo"]["step_peak_bytes"], rows["adamw"]["step_peak_bytes"]
            print(f"\nMeZO step / forward = {m / fwd:.3f} (bound 1.2); AdamW step / MeZO step = {a / m:.2f} (bound 3)")
    print("\n### learning-rate sweep (small size, validation loss)\n")
    print("| optimizer | " + " | ".join(["lr -> val loss"]) + " |")
    print("|---|---|")
    for name, losses in out["sweep"].items():
        print(f"| {name} | " + ", ".join(f"{lr}: {v:.4f}" for lr, v in losses.items()) + " |")


def plot(out: dict, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    sizes = list(out["sizes"])
    names = list(next(iter(out["sizes"].values()))["optimizers"])
    width = 0.8 / len(sizes)
    for k, size in enumerate(sizes):
        res = out["sizes"][size]
        xs = [i + k * width for i in range(len(names))]
        axes[0].bar(xs, [res["optimizers"][n]["state_bytes_per_param"] for n in names], width, label=size)
        axes[1].bar(xs, [res["optimizers"][n]["step_peak_bytes"] / MiB for n in names], width, label=size)
        axes[1].axhline(res["forward_peak_bytes"] / MiB, color=f"C{k}", ls="--", lw=1, label=f"{size}: forward only")
        axes[2].bar(xs, [res["optimizers"][n].get("val_loss", math.nan) for n in names], width, label=size)
        axes[2].axhline(res["initial_val_loss"], color=f"C{k}", ls="--", lw=1, label=f"{size}: at init")
    titles = ("optimizer state, bytes per parameter", "train-step peak (MiB, log)",
              f"validation loss after {out['steps']} steps")
    for ax, title in zip(axes, titles):
        ax.set_xticks([i + width * (len(sizes) - 1) / 2 for i in range(len(names))])
        ax.set_xticklabels(names, rotation=45, ha="right")
        ax.set_title(title)
        ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    lows = [r["val_loss"] for res in out["sizes"].values() for r in res["optimizers"].values() if "val_loss" in r]
    axes[2].set_ylim(min(lows) - 0.1, max(lows) + 0.1)
    fig.suptitle(f"protein MLM on {out['device']} (compiled memory analysis); DeepZero: {out['deepzero_steps']} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
