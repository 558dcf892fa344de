"""Training time with checkpoints written in the background (``--async-checkpoint``).

protein-mlm at width 1024 (MLP 4096), whose train state (parameters and AdamW's two moments,
float32) is about 150 MB per layer (``--layers``), trained for ``--steps`` steps saving every ``--save-every``, with
each checkpoint written before the next step (the default) and written in the background while
the next steps run (Orbax's asynchronous checkpointing). Time is the whole loop's (the last
logged ``time`` of ``metrics.jsonl``, compile excluded), the fastest of ``--rounds`` interleaved
runs; both runs must end in the same state (the checkpoints are the same), which is checked.

    python benchmarks/async_checkpoint.py        # results/async_checkpoint_<device>.{json,md}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import tempfile

import jax
import numpy as np

from sciscale_jax.recipes import get_recipe
from sciscale_jax.train import TrainConfig, train

RESULTS = pathlib.Path(__file__).parent / "results"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--save-every", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    recipe = get_recipe("protein-mlm")
    model = recipe.make_config(num_layers=args.layers, embed_dim=1024, num_heads=8, mlp_dim=4096, max_len=128)
    base = TrainConfig(**{**recipe.train_defaults, "steps": args.steps, "batch_size": 4, "seq_len": 64,
                          "save_every": args.save_every, "keep": 2, "log_every": args.steps,
                          "eval_every": 10 * args.steps})
    seconds, finals, state_bytes = {}, {}, 0
    for round_ in range(args.rounds):
        for label, background in ((("written before the next step", False), ("in the background", True))
                                  [::1 if round_ % 2 == 0 else -1]):
            with tempfile.TemporaryDirectory(dir=args.out) as tmp:
                out = train(recipe, model, dataclasses.replace(base, async_checkpoint=background),
                            pathlib.Path(tmp) / "run", progress=False, log=lambda *_: None)
                lines = [json.loads(line) for line in (pathlib.Path(tmp) / "run" / "metrics.jsonl").read_text()
                         .splitlines()]
            took = max(m["time"] for m in lines if "time" in m)
            seconds[label] = min(seconds.get(label, float("inf")), took)
            finals[label] = jax.tree.leaves(out["state"].params)
            state_bytes = out["param_bytes"] + out["opt_state_bytes"]
            print(label, f"{took:.2f} s", flush=True)
    same = all(np.array_equal(a, b) for a, b in zip(*finals.values()))
    device = jax.devices()[0].device_kind
    tag = device.lower().replace(" ", "_")
    out_dir = pathlib.Path(args.out)
    sync, background = seconds["written before the next step"], seconds["in the background"]
    (out_dir / f"async_checkpoint_{tag}.json").write_text(json.dumps(
        {"device": device, "steps": args.steps, "save_every": args.save_every, "state_bytes": state_bytes,
         "seconds": seconds, "same_final_state": same}, indent=1) + "\n")
    lines = [f"protein-mlm, {args.layers} layers of width 1024, train state {state_bytes / 2**20:,.0f} MiB, "
             f"{args.steps} steps, a checkpoint every {args.save_every} (`python benchmarks/async_checkpoint.py`, the "
             f"fastest of {args.rounds} interleaved runs), device {device}", "",
             "| checkpoints | loop time | speed-up |", "|---|---:|---:|",
             f"| written before the next step | {sync:.2f} s | 1.00x |",
             f"| in the background (`--async-checkpoint`) | {background:.2f} s | {sync / background:.2f}x |"]
    (out_dir / f"async_checkpoint_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not same:
        print("the final states differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
