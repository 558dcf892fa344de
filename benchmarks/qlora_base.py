"""QLoRA's frozen base: how much of a pretrained model survives 4-bit NormalFloat storage.

LoRA trains adapters on a frozen base; QLoRA stores that base in 4 bits (``--lora-quant nf4``).
What the base keeps is measured where the base matters, on the held-out data it was pretrained on,
for two recipes: smiles-lm (a chemistry language model, far ahead of its n-gram baseline) and
protein-mlm (barely ahead of its unigram baseline at this size, so it says less). Each base is
scored by ``sciscale eval`` (the recipe's own validation split and baselines):

- as trained (float32);
- NF4 as QLoRA stores it: a QLoRA run from the pretrained run, one step at the warm-up's learning
  rate of 0 (its adapters checked to be still zero), so the model is exactly the stored base;
- NF3 and NF2 round trips of the blocks' dense kernels (``round_trip_copy``), NF2 the negative
  control that must visibly lose what 4 bits keep.

"Gain kept" is (best baseline's loss - the base's loss) / (best baseline's loss - the float base's).

    python benchmarks/qlora_base.py --smiles-lm runs/smiles --protein-mlm runs/pm   # pretrained runs
    python benchmarks/qlora_base.py               # pretrains both here, 1,500 steps each (~30 min CPU)

Writes benchmarks/results/qlora_base.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil
import tempfile

import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from sciscale_jax import cli
from sciscale_jax.quant import nf4
from sciscale_jax.recipes import get_recipe
from sciscale_jax.train import TrainConfig, train
from sciscale_jax.train.checkpoint import Checkpointer
from sciscale_jax.train import rundir

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def round_trip_copy(run: pathlib.Path, dest: pathlib.Path, bits: int) -> pathlib.Path:
    """A copy of ``run`` whose newest checkpoint holds the blocks' dense kernels after a
    NormalFloat-``bits`` round trip (``sciscale_jax.quant.nf4``); everything else as saved."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoints", "*.lock"))
    source = Checkpointer(run)
    step = source.latest_step()
    saved = source.manager.restore(step, args=ocp.args.StandardRestore())
    levels = nf4.normal_float_levels(bits)
    flat = traverse_util.flatten_dict(saved["params"])
    for path, w in flat.items():
        if path[0] == "layers" and path[-1] == "kernel":
            flat[path] = np.asarray(nf4.dequantize(*nf4.quantize(w, levels=levels), w.dtype, levels))
    saved["params"] = traverse_util.unflatten_dict(flat)
    copy = Checkpointer(dest)
    copy.manager.save(step, args=ocp.args.StandardSave(saved), force=True)
    copy.manager.wait_until_finished()
    return dest


def stored_base(recipe, pretrained: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    """A QLoRA run whose model is exactly the NF4 base QLoRA stores from ``pretrained``."""
    model = recipe.config_class(**rundir.saved_config(pretrained)["model"])
    qlora = recipe.make_config(**{**model.to_dict(), "lora_rank": 8, "lora_targets": "all", "lora_quant": "nf4"})
    result = train(recipe, qlora, TrainConfig(**{**recipe.train_defaults, "steps": 1, "schedule_steps": 1000,
                                                 "eval_every": 1, "init_from": str(pretrained)}),
                   dest, progress=False, log=lambda *_: None)
    adapters = [v for k, v in traverse_util.flatten_dict(result["state"].params).items() if k[-1] == "lora_b"]
    if not adapters or any(np.abs(np.asarray(v)).max() > 0 for v in adapters):
        raise SystemExit("the one-step QLoRA run moved its adapters: it is not the stored base")
    return dest


def evaluate(run: pathlib.Path, out: pathlib.Path) -> dict:
    if cli.main(["eval", str(run), "--json", str(out)]) != 0:
        raise SystemExit(f"sciscale eval {run} failed")
    return json.loads(out.read_text())


def baseline_losses(figures: dict) -> dict:
    """The recipe's baselines as losses in nats (smiles-lm reports perplexities)."""
    out = {}
    for name, value in figures["baselines"].items():
        if name.endswith("_loss") and "_loss_" not in name:
            out[name[:-5]] = float(value)
        elif name.endswith("_ppl") and "_ppl_" not in name:
            out[name[:-4]] = math.log(float(value))
    return out


def measure(name: str, pretrained: pathlib.Path, root: pathlib.Path) -> list[dict]:
    recipe = get_recipe(name)
    runs = {"as trained (float32)": pretrained,
            "NF4, as QLoRA stores it": stored_base(recipe, pretrained, root / f"{name}-nf4"),
            "NF3 round trip": round_trip_copy(pretrained, root / f"{name}-nf3", 3),
            "NF2 round trip (control)": round_trip_copy(pretrained, root / f"{name}-nf2", 2)}
    rows = []
    for i, (base, run) in enumerate(runs.items()):
        figures = evaluate(run, root / f"{name}-{i}.json")
        rows.append({"recipe": name, "base": base, "val_loss": float(figures["validation"]["val_loss"]),
                     "baselines": baseline_losses(figures)})
    best = min(rows[0]["baselines"].values())
    for row in rows:
        row["gain_kept"] = (best - row["val_loss"]) / (best - rows[0]["val_loss"])
    return rows


def table(rows: list[dict]) -> str:
    lines = ["The frozen base of a QLoRA run on its own held-out data (`sciscale eval`: the recipe's validation "
             "split; loss in nats per predicted token). Gain kept: of the float base's lead over the best "
             "baseline. CPU.", "", "| recipe | base | held-out loss | gain kept |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['recipe']} | {row['base']} | {row['val_loss']:.4f} | {row['gain_kept']:.1%} |")
    for name in dict.fromkeys(r["recipe"] for r in rows):
        first = next(r for r in rows if r["recipe"] == name)
        for base, loss in first["baselines"].items():
            lines.append(f"| {name} | baseline: {base} | {loss:.4f} | - |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smiles-lm", help="a pretrained smiles-lm run (default: train one, 1,500 steps)")
    p.add_argument("--protein-mlm", help="a pretrained protein-mlm run (default: train one, 1,500 steps)")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        for name, given in (("smiles-lm", args.smiles_lm), ("protein-mlm", args.protein_mlm)):
            pretrained = pathlib.Path(given) if given else root / f"{name}-pretrained"
            if not given:
                recipe = get_recipe(name)
                train(recipe, recipe.make_config(**({"samples": 0} if name == "smiles-lm" else {})),
                      TrainConfig(**{**recipe.train_defaults, "steps": 1500, "eval_every": 1500}), pretrained,
                      progress=False)
            rows += measure(name, pretrained, root)
    text = table(rows)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "qlora_base.json").write_text(json.dumps({"rows": rows, "device": "CPU"}, indent=1))
    (RESULTS / "qlora_base.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
