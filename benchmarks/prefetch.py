"""Training throughput with batches built ahead in background threads (``--prefetch``).

msa-evoformer with AlphaFold's input features (``--msa-features alphafold``: clustering, deletion
features, cluster profiles, built in NumPy per example) at the recipe's CLI defaults and, as a
control whose batches cost almost nothing, protein-mlm, each trained for ``--steps`` steps in this
process with the batches built when their step starts (``--prefetch 0``), built ahead
(``--prefetch 2``, the default; and 4), and all built before training (the loop then only looks
them up: the most prefetching could give). Time is the loop's own clock (``metrics.jsonl``) from
the first logged step to the last, compile excluded, the fastest of ``--rounds`` interleaved runs;
every run of a recipe must log the same losses (the batches are the same), which the script checks.

    python benchmarks/prefetch.py                     # 80 steps, 3 rounds; results/prefetch_<device>.{json,md}

Speed-ups are ratios to ``--prefetch 0`` in the same process on the same device.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import tempfile

import jax

from sciscale_jax.recipes import get_recipe
from sciscale_jax.train import TrainConfig, train

RESULTS = pathlib.Path(__file__).parent / "results"
RECIPES = {"msa-evoformer": {"msa_features": "alphafold"}, "protein-mlm": {}}


def _prebuilt(recipe, steps: int):
    """``recipe`` whose training batches are all built before the run starts."""
    def build_data(train_cfg, model_cfg):
        data = recipe.build_data(train_cfg, model_cfg)
        batches = [data.train.batch(s) for s in range(steps)]

        class Built:
            def batch(self, step):
                return batches[step]
        return dataclasses.replace(data, train=Built())
    return dataclasses.replace(recipe, build_data=build_data)


def _run(recipe, model_cfg, train_cfg, folder):
    train(recipe, model_cfg, train_cfg, folder, progress=False, log=lambda *_: None)
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in lines if "time" in m]
    first, last = logged[0], logged[-1]
    return {"seconds_per_step": (last["time"] - first["time"]) / (last["step"] - first["step"]),
            "losses": [m["loss"] for m in logged]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each setting, interleaved; the fastest kept")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    device = jax.devices()[0].device_kind
    rows, failed = {}, []
    for name in args.recipes:
        recipe = get_recipe(name)
        model_cfg = recipe.make_config(**RECIPES[name])
        base = TrainConfig(**{**recipe.train_defaults, "steps": args.steps, "log_every": 10,
                              "eval_every": 10 * args.steps, "save_every": 10 * args.steps})
        configs = (("prefetch 0", 0, recipe), ("prefetch 2", 2, recipe), ("prefetch 4", 4, recipe),
                   ("all built first", 0, _prebuilt(recipe, args.steps)))
        runs = {label: [] for label, _, _ in configs}
        for round_ in range(args.rounds):  # interleaved, the order reversed every other round; the fastest kept
            for label, depth, rec in configs[::1 if round_ % 2 == 0 else -1]:
                with tempfile.TemporaryDirectory() as tmp:
                    runs[label].append(_run(rec, model_cfg, dataclasses.replace(base, prefetch=depth),
                                            pathlib.Path(tmp) / "r"))
                print(name, label, f"{runs[label][-1]['seconds_per_step'] * 1e3:.1f} ms/step", flush=True)
        if any(r["losses"] != runs["prefetch 0"][0]["losses"] for done in runs.values() for r in done):
            failed.append(name)
        rows[name] = {k: min(r["seconds_per_step"] for r in done) for k, done in runs.items()}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = device.lower().replace(" ", "_")
    (out / f"prefetch_{tag}.json").write_text(json.dumps({"device": device, "steps": args.steps, "rounds": args.rounds,
                                                          "seconds_per_step": rows}, indent=1) + "\n")
    labels = list(next(iter(rows.values())))
    lines = [f"Training step time with batches built ahead (`python benchmarks/prefetch.py --steps {args.steps} "
             f"--rounds {args.rounds}`: the fastest of the rounds), device {device}, one device used; ms per step "
             "(speed-up over prefetch 0)",
             "", "| recipe | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for name, r in rows.items():
        base = r["prefetch 0"]
        lines.append(f"| {name}{' (alphafold features)' if RECIPES[name] else ''} | "
                     + " | ".join(f"{v * 1e3:.1f} ({base / v:.2f}x)" for v in r.values()) + " |")
    (out / f"prefetch_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if failed:
        print(f"the losses differ between prefetch depths for {failed}: batches are not the same", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
