"""Adapt a 6-hour weather forecaster to 24 hours: LoRA, and multi-step fine-tuning (as Aurora does).

A weather-vit model (the recipe's defaults: a ClimaX-style ViT on the T21 Held-Suarez
atmosphere that dinosaur simulates and caches) is pretrained to forecast 6 hours ahead (or
taken from ``--pretrained``), then fine-tuned for 24-hour forecasts two ways:

- in one step (``--lead-steps 4``): ``full`` (every weight, AdamW); ``lora`` (rank-8 adapters on
  the shared blocks' attention projections, everything else frozen: patch and lead embeddings,
  variable aggregation, head); ``lora-all`` (adapters on the attention and MLP projections);
  ``qlora-all`` (as ``lora-all``, the blocks' frozen dense weights in 4-bit NormalFloat);
- by its own four-step rollout at 6 hours (``--train-rollout 4``, the loss averaged over the 6,
  12, 18 and 24-hour forecasts; GraphCast's and Aurora's multi-step fine-tuning, Aurora's with
  LoRA): ``rollout full``, ``rollout lora-all``, and ``rollout lora-all, pushforward``
  (``--train-rollout-grad last``: only the last step's loss, backpropagated through it alone), and
  ``rollout full, step remat`` (``--train-rollout-remat``: each step checkpointed, recomputed in
  the backward pass);
- ``lora-all`` with the lead-time embedding (and the head) trained beside the adapters
  (``--lora-train lead_embed[,head]``, PEFT's modules_to_save): the frozen lead embedding has
  never seen a 24-hour lead.

Each is scored on the held-out trajectories at 24 hours (one application at 24 hours, or four at
6 hours for the rollout-trained models): latitude-weighted RMSE per channel in physical units,
summarised as the mean over channels of RMSE / persistence's RMSE (1 is persistence, lower is
better), beside persistence, climatology, the pretrained model asked for 24 hours as it is (not
adapted: the control every one-step variant must beat) and the pretrained model rolled out four
times at 6 hours (what one has without fine-tuning: the control the rollout variants must beat),
all on the same starts. Prints and writes ``benchmarks/results/weather_lora.{json,md}`` with each
variant's trainable parameters and the per-device bytes of its compiled train step (arguments:
state and batch; peak).

    python examples/weather_lora.py                        # about 45 minutes on 2 CPU cores
    python examples/weather_lora.py --pretrained runs/wx   # start from a weather-vit run you have
    python examples/weather_lora.py --only "lora-all + lead embedding"   # those rows again, the rest kept
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import numpy as np
from flax import traverse_util

from sciscale_jax.models.stack import lora_trains
from sciscale_jax.recipes import get_recipe, load_run
from sciscale_jax.recipes.weather_vit import prepare, rollout
from sciscale_jax.train import TrainConfig, train

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "results"
LEAD = 4  # recorded intervals (6 hours each): 24 hours
ALL = {"lora_rank": 8, "lora_targets": "all"}
DIRECT, ROLLOUT = {"lead_steps": LEAD}, {"lead_steps": 1, "train_rollout": LEAD}
VARIANTS = {  # name: (model settings, learning rate)
    "full": (DIRECT, 1e-3), "lora": ({**DIRECT, "lora_rank": 8}, 3e-3), "lora-all": ({**DIRECT, **ALL}, 3e-3),
    "qlora-all": ({**DIRECT, **ALL, "lora_quant": "nf4"}, 3e-3),
    "rollout full": (ROLLOUT, 1e-3), "rollout lora-all": ({**ROLLOUT, **ALL}, 3e-3),
    "rollout lora-all, pushforward": ({**ROLLOUT, **ALL, "train_rollout_grad": "last"}, 3e-3),
    "rollout full, step remat": ({**ROLLOUT, "train_rollout_remat": True}, 1e-3),
    "lora-all + lead embedding": ({**DIRECT, **ALL, "lora_train": "lead_embed"}, 3e-3),
    "lora-all + lead embedding, head": ({**DIRECT, **ALL, "lora_train": "lead_embed,head"}, 3e-3)}


def score(model, prep, *, rolled: bool) -> dict:
    """RMSE per channel at 24 hours (and persistence's, climatology's) on every held-out start:
    one application at 24 hours, or four at the trained 6 hours (``rolled``)."""
    out = rollout(model, prep, lead_steps=1, max_steps=LEAD, every=1, direct=not rolled)
    return {who: {ch: v[LEAD - 1] for ch, v in out[who].items()} for who in ("model", "persistence", "climatology")} | {
        "starts": out["starts"]}


def skill(rmse: dict, persistence: dict) -> float:
    """Mean over channels of RMSE / persistence's RMSE."""
    return float(np.mean([rmse[ch] / persistence[ch] for ch in rmse]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrained", help="a weather-vit run at 6 hours to start from (default: pretrain one here)")
    p.add_argument("--pretrain-steps", type=int, default=500)
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps per variant")
    p.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    p.add_argument("--only", nargs="+", choices=tuple(VARIANTS), default=None,
                   help="fine-tune these variants alone; the other rows are kept from the results file")
    args = p.parse_args(argv)
    kept = json.loads((RESULTS / "weather_lora.json").read_text()) if args.only else {"rows": {}, "state": {}}
    recipe = get_recipe("weather-vit")
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(args.out or tmp)
        root.mkdir(parents=True, exist_ok=True)
        model = recipe.make_config()
        pretrained = pathlib.Path(args.pretrained) if args.pretrained else root / "pretrained"
        if not args.pretrained:
            t0 = time.perf_counter()
            train(recipe, model, TrainConfig(**{**recipe.train_defaults, "steps": args.pretrain_steps,
                                                "eval_every": args.pretrain_steps}), pretrained, progress=False)
            print(f"pretrained {args.pretrain_steps} steps at 6 hours in {time.perf_counter() - t0:.0f} s")
        base = load_run(pretrained, log=lambda *_: None)
        if base.model_config.lead_steps != 1 or base.model_config.max_lead_steps:
            raise SystemExit(f"--pretrained {pretrained}: a run trained at one lead of 6 hours is wanted")
        prep = prepare(base.model_config, log=lambda *_: None)
        rows = {"pretrained, not adapted": score(base.model, prep, rolled=False),
                "pretrained, rolled out 4 x 6 h": score(base.model, prep, rolled=True)}
        state = {}
        for name, (extra, lr) in VARIANTS.items():
            if args.only and name not in args.only:
                if name in kept["rows"]:
                    rows[name], state[name] = kept["rows"][name], kept["state"][name]
                continue
            cfg = recipe.make_config(**{**base.model_config.to_dict(), **extra})
            run = root / name.replace(" ", "_").replace(",", "")
            t0 = time.perf_counter()
            result = train(recipe, cfg, TrainConfig(**{**recipe.train_defaults, "steps": args.steps,
                                                       "eval_every": args.steps, "warmup_steps": 20,
                                                       "init_from": str(pretrained), "learning_rate": lr}),
                           run, progress=False)
            flat = traverse_util.flatten_dict(result["state"].params)
            weights = {"kernel_nf4": 2, "kernel_absmax": 0}  # QLoRA: two weights per byte of codes; scales apart
            trains = lora_trains(cfg)
            state[name] = {"trainable": sum(int(v.size) for k, v in flat.items() if trains is None or trains(k)),
                           "parameters": sum(weights.get(k[-1], 1) * int(v.size) for k, v in flat.items()),
                           "seconds": time.perf_counter() - t0, "val_loss": result["val_loss"],
                           "state_bytes": result["memory"].argument_bytes, "peak_bytes": result["memory"].peak_bytes}
            rows[name] = score(load_run(run, log=lambda *_: None).model, prep, rolled=cfg.train_rollout > 1)
    for name in ("pretrained, not adapted", "pretrained, rolled out 4 x 6 h"):
        if name in kept["rows"] and kept["rows"][name] != rows[name]:
            print(f"note: {name!r} differs from the kept results: the other rows came from another pretrained model")
    first = next(iter(rows.values()))
    persistence, climatology = first["persistence"], first["climatology"]
    lines = [f"weather-vit pretrained {base.step} steps at 6 hours, fine-tuned {args.steps} steps for 24 hours "
             f"(in one step, or by a 4 x 6 h rollout); held-out trajectories, {first['starts']} starts. Skill: "
             "mean over channels of RMSE / persistence's RMSE at 24 h (lower is better). CPU.", "",
             "| model | trainable parameters | skill | RMSE z438 (m^2/s^2) | RMSE t812 (K) | "
             "step arguments / peak (MB) |", "|---|---|---|---|---|---|"]
    for name, figures in [*rows.items(), ("baseline: persistence", {"model": persistence}),
                          ("baseline: climatology", {"model": climatology})]:
        r, s = figures["model"], state.get(name)
        lines.append(f"| {name} | " + (f"{s['trainable']:,} of {s['parameters']:,} | " if s else "- | ")
                     + f"{skill(r, persistence):.3f} | {r['z438']:.1f} | {r['t812']:.3f} | "
                     + (f"{s['state_bytes'] / 1e6:.1f} / {s['peak_bytes'] / 1e6:.1f} |" if s else "- |"))
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "weather_lora.json").write_text(json.dumps({"rows": rows, "state": state, "device": "CPU"}, indent=1))
    (RESULTS / "weather_lora.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
