"""Memory-efficient optimizers on the smiles-lm recipe: state bytes, step memory, validation loss.

One small causal SMILES language model (the ``smiles-lm`` recipe with the explicit overrides
of ``benchmarks/precision.py``'s ``TASKS``: 2 layers, embed 128, MLP 384, seq 64, batch 32;
``--task protein-mlm`` runs the earlier protein MLM) is trained by every optimizer in
``sciscale_jax.optim.OPTIMIZERS`` through ``sciscale_jax.train.train``, the same steps, seed,
initialisation and batches for every row (warm-up + cosine schedule, weight decay 0.01 on
weight matrices, clipping for first-order methods). For each:

- optimizer-state bytes per parameter (``tree_bytes(opt_state) / number of parameters``);
- the compiled train-step peak (XLA's memory analysis of the loop's jitted step, state
  donated, compiled with ``remat.compiler_options()``), beside a forward-only evaluation of
  the same batch as the floor;
- the validation loss (nats per token, held-out molecules), its gap to AdamW, and how far it
  lies below the recipe's baselines on the same tokens: unigram (the context-free predictor of
  a causal LM) and the best add-k n-gram (the short-context one).

Learning rates: by default each optimizer's rate is the one a sweep picked on the earlier
protein MLM (``LR``); ``--sweep`` tries ``SWEEP``'s rates on this task and keeps the best
validation loss (that picks on the validation split: read it as a tuned upper bound).
Negative control: AdamW at ``--control-lr`` (1e-6, 3,000x below its rate), which must stay
near the loss at initialisation, above the unigram; the zeroth-order rows (MeZO, ZO-AdaMU)
are expected to do poorly in a first-order budget of steps. DeepZero estimates the gradient
coordinate by coordinate (1 + 5% of the parameters loss evaluations per step, ~18k here), so
by default only its step memory is measured (``--deepzero-steps N`` trains it, forced).

    python benchmarks/optimizers.py                # CPU, smiles-lm: ~7 min per row on 2 busy cores
    python benchmarks/optimizers.py --task protein-mlm --steps 60
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import tempfile
import time

import jax
from flax import nnx

from sciscale_jax import optim
from sciscale_jax.memory import compiled_memory, tree_bytes
from sciscale_jax.train.loop import build_optimizer, evaluate, train
from sciscale_jax.train.step import init_train_state, make_eval_step, make_train_step, make_zeroth_order_step
from precision import TASKS, baseline_losses, task_configs  # benchmarks/precision.py

RESULTS = pathlib.Path(__file__).parent / "results"
MiB = 2.0 ** 20

# The rates a sweep over SWEEP picked on the protein MLM (2 layers, width 64, 60 steps).
LR = {"adamw": 3e-3, "adafactor": 3e-2, "sm3": 3e-2, "came": 1e-3, "lion": 3e-4, "adam_mini": 3e-3,
      "adamw_8bit": 3e-3, "mezo": 1e-3, "zo_adamu": 1e-3, "deepzero": 1e-2}
SWEEP = {
    "adamw": (1e-3, 3e-3), "adafactor": (1e-2, 3e-2), "sm3": (3e-2, 1e-1), "came": (1e-3, 3e-3),
    "lion": (1e-4, 3e-4), "adam_mini": (1e-3, 3e-3), "adamw_8bit": (1e-3, 3e-3),
    "mezo": (1e-5, 1e-4, 1e-3), "zo_adamu": (1e-5, 1e-4, 1e-3), "deepzero": (1e-3, 1e-2),
}


def configs(args, optimizer: str, lr: float, steps: int):
    recipe, model_cfg, run = task_configs(args.task, steps, args.seed)
    return recipe, model_cfg, run.__class__(**{**run.to_dict(), "optimizer": optimizer, "learning_rate": lr})


def run(args, optimizer: str, lr: float, steps: int) -> dict:
    recipe, model_cfg, train_cfg = configs(args, optimizer, lr, steps)
    with tempfile.TemporaryDirectory() as out:
        r = train(recipe, model_cfg, train_cfg, out, progress=False, log=lambda *a: None, force=True)
    n = sum(x.size for x in jax.tree.leaves(r["state"].params))
    return {"lr": lr, "steps": steps, "val_loss": r["val_loss"], "train_loss": r["train_loss"],
            "params": int(n), "state_bytes": r["opt_state_bytes"], "state_bytes_per_param": r["opt_state_bytes"] / n,
            "step_peak_bytes": r["memory"].peak_bytes, "step_temp_bytes": r["memory"].temp_bytes,
            "seconds": r["seconds"], "baselines": baseline_losses(r["baselines"])}


def step_memory(args, optimizer: str, lr: float, example) -> dict:
    """Compiled peak of the train step (state donated) and state bytes, without training."""
    recipe, model_cfg, train_cfg = configs(args, optimizer, lr, 100)
    tx = build_optimizer(train_cfg)
    graphdef, state = init_train_state(recipe.build_model(model_cfg, nnx.Rngs(train_cfg.seed)), tx)
    make = make_zeroth_order_step if optim.is_zeroth_order(optimizer) else make_train_step
    report = compiled_memory(jax.jit(make(graphdef, tx, loss_fn=recipe.loss_fn), donate_argnums=0), state, example)
    n = sum(x.size for x in jax.tree.leaves(state.params))
    return {"lr": lr, "params": int(n), "state_bytes": tree_bytes(state.opt_state),
            "state_bytes_per_param": tree_bytes(state.opt_state) / n, "step_peak_bytes": report.peak_bytes,
            "step_temp_bytes": report.temp_bytes}


def forward_and_initial(args, data) -> tuple[int, float]:
    """Forward-only evaluation peak on one training batch, and the validation loss at initialisation."""
    recipe, model_cfg, train_cfg = configs(args, "adamw", 1e-3, 100)
    model = recipe.build_model(model_cfg, nnx.Rngs(train_cfg.seed))  # train() builds the same model
    graphdef, state = init_train_state(model, optim.adamw(1e-3))
    eval_step = make_eval_step(graphdef, recipe.loss_fn)
    peak = compiled_memory(eval_step, state.params, state.rest, data.train.batch(0)).peak_bytes
    return peak, evaluate(jax.jit(eval_step), state.params, state.rest, data.eval)["loss"]


# Run order: AdamW and the control first, so an interrupted run still has the reference and the
# control; DeepZero's compile (no training) last. Tables list OPTIMIZERS' order, the control last.
RUN_FIRST = ("adamw", "control", "mezo", "adam_mini", "adamw_8bit", "lion", "adafactor", "sm3", "came", "zo_adamu")


def derive(out: dict) -> None:
    """Gaps to AdamW and nats below each baseline, in place."""
    ref = out["optimizers"].get("adamw", {}).get("val_loss", math.nan)
    for r in out["optimizers"].values():
        if "val_loss" in r:
            r["vs_adamw"] = r["val_loss"] - ref
            for k, b in out["baselines"].items():
                r[f"gain_{k}"] = b - r["val_loss"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=sorted(TASKS), default="smiles-lm")
    ap.add_argument("--steps", type=int, default=200, help="training budget of every run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deepzero-steps", type=int, default=0, help="0: DeepZero's step memory only")
    ap.add_argument("--sweep", action="store_true", help="pick each rate from SWEEP on this task")
    ap.add_argument("--control-lr", type=float, default=1e-6, help="AdamW rate of the negative control")
    ap.add_argument("--optimizers", nargs="*", default=list(optim.OPTIMIZERS))
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--from-json", action="store_true", help="only redraw table and plot from --out's JSON")
    args = ap.parse_args()
    dest = pathlib.Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        out = json.loads((dest / "optimizers.json").read_text())
        derive(out)
    else:
        out = measure(args, dest)
    md = table(out)
    print(md)
    (dest / "optimizers.md").write_text(f"`{out['command'].strip()}`\n\n{md}\n")
    plot(out, dest / "optimizers.png")
    print(f"\nwrote {dest / 'optimizers.json'}, optimizers.md and optimizers.png")


def measure(args, dest: pathlib.Path) -> dict:
    t_start = time.perf_counter()
    recipe, model_cfg, train_cfg = configs(args, "adamw", 1e-3, args.steps)
    data = recipe.build_data(train_cfg, model_cfg)
    forward_peak, initial = forward_and_initial(args, data)
    out = {"device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})", "jax": jax.__version__,
           "task": args.task, "recipe": recipe.name, "model": model_cfg.to_dict(), "train": train_cfg.to_dict(),
           "steps": args.steps, "deepzero_steps": args.deepzero_steps, "sweep": {}, "forward_peak_bytes": forward_peak,
           "initial_val_loss": initial, "command": "python benchmarks/optimizers.py " + " ".join(sys.argv[1:]),
           "baselines": {}, "optimizers": {}}
    print(f"forward peak {forward_peak / MiB:.2f} MiB, val loss at init {initial:.4f}", flush=True)
    control_name = f"control: adamw lr={args.control_lr:g}"
    names = [n for n in RUN_FIRST if n == "control" or n in args.optimizers]
    names += [n for n in args.optimizers if n not in names]
    table_order = [n for n in optim.OPTIMIZERS if n in args.optimizers] + [control_name]
    for name in names:
        if name == "control":
            row = {**run(args, "adamw", args.control_lr, args.steps), "control": True}
            name = control_name
        elif name == "deepzero" and args.deepzero_steps == 0:
            row = step_memory(args, name, LR[name], data.train.batch(0))
        else:
            steps = args.deepzero_steps if name == "deepzero" else args.steps
            tried = {lr: run(args, name, lr, steps) for lr in (SWEEP[name] if args.sweep else (LR[name],))}
            out["sweep"][name] = {f"{lr:g}": r["val_loss"] for lr, r in tried.items()}
            row = min(tried.values(), key=lambda r: r["val_loss"] if math.isfinite(r["val_loss"]) else math.inf)
        out["baselines"] = row.pop("baselines", out["baselines"])
        print(f"{name}: {json.dumps(row)}", flush=True)
        out["optimizers"][name] = row
        out["optimizers"] = {n: out["optimizers"][n] for n in table_order if n in out["optimizers"]}
        derive(out)
        out["seconds"] = time.perf_counter() - t_start
        (dest / "optimizers.json").write_text(json.dumps(out, indent=1))
        (dest / "optimizers.md").write_text(f"`{out['command'].strip()}`\n\n{table(out)}\n")
    return out


def table(out: dict) -> str:
    m, t, base = out["model"], out["train"], out["baselines"]
    fwd = out["forward_peak_bytes"]
    params = next(iter(out["optimizers"].values()))["params"] if out["optimizers"] else 0
    lines = [f"{out['recipe']}, {m['num_layers']} layers, embed {m['embed_dim']}, mlp {m['mlp_dim']}, "
             f"batch {t['batch_size']} x {t['seq_len']}, {params:,} parameters, {out['steps']} steps, seed "
             f"{t['seed']}; device: {out['device']}. Validation loss in nats per token on held-out molecules, "
             f"{out['initial_val_loss']:.4f} at initialisation; baselines on the same tokens: "
             + ", ".join(f"{k} {v:.4f}" for k, v in base.items())
             + f". Step peak: compiled train step per device; a forward-only evaluation peaks at {fwd / MiB:.2f} MiB.",
             "", "| optimizer | lr | state bytes / param | step peak MiB | peak / forward | val loss | vs AdamW | "
             + " | ".join(f"below {k}" for k in base) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(base)]
    for name, r in out["optimizers"].items():
        if "val_loss" in r:
            steps = out["deepzero_steps"] if name == "deepzero" else out["steps"]
            val = f"{r['val_loss']:.4f}" + (f" ({steps} steps)" if steps != out["steps"] else "")
            rest = f"{r['vs_adamw']:+.4f} | " + " | ".join(f"{r[f'gain_{k}']:+.3f}" for k in base)
        else:
            val, rest = "not trained (step memory only)", " | ".join(["—"] * (1 + len(base)))
        lines.append(f"| {name} | {r['lr']:g} | {r['state_bytes_per_param']:.3f} | {r['step_peak_bytes'] / MiB:.2f} "
                     f"| {r['step_peak_bytes'] / fwd:.2f} | {val} | {rest} |")
    rows = out["optimizers"]
    if "mezo" in rows and "adamw" in rows:
        mz, a = rows["mezo"]["step_peak_bytes"], rows["adamw"]["step_peak_bytes"]
        lines += ["", f"MeZO step / forward = {mz / fwd:.3f}; AdamW step / MeZO step = {a / mz:.2f}"]
    if out["sweep"] and any(len(v) > 1 for v in out["sweep"].values()):
        lines += ["", "| optimizer | lr -> val loss |", "|---|---|"]
        lines += [f"| {n} | " + ", ".join(f"{lr}: {v:.4f}" for lr, v in s.items()) + " |" for n, s in out["sweep"].items()]
    return "\n".join(lines)


def plot(out: dict, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = out["optimizers"]
    names = list(rows)
    colors = ["C3" if r.get("control") else "C0" for r in rows.values()]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    xs = range(len(names))
    axes[0].bar(xs, [r["state_bytes_per_param"] for r in rows.values()], color=colors)
    axes[1].bar(xs, [r["step_peak_bytes"] / MiB for r in rows.values()], color=colors)
    axes[1].axhline(out["forward_peak_bytes"] / MiB, color="k", ls="--", lw=1, label="forward only")
    axes[2].bar(xs, [r.get("val_loss", math.nan) for r in rows.values()], color=colors)
    axes[2].axhline(out["initial_val_loss"], color="k", ls=":", lw=1, label="at initialisation")
    for i, (k, v) in enumerate(out["baselines"].items()):
        axes[2].axhline(v, color=f"C{i + 1}", ls="--", lw=1, label=k)
    titles = ("optimizer state, bytes per parameter", "train-step peak (MiB, log)",
              f"validation loss after {out['steps']} steps (nats/token)")
    for ax, title in zip(axes, titles):
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    vals = [r["val_loss"] for r in rows.values() if "val_loss" in r] + list(out["baselines"].values())
    axes[2].set_ylim(min(vals) - 0.2, max(vals + [out["initial_val_loss"]]) + 0.2)
    fig.suptitle(f"{out['recipe']} optimizers on {out['device']} (compiled memory analysis; red: negative control)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
