"""Evotuning with LoRA and QLoRA: adapt a pretrained protein language model to one family.

A protein-mlm model is pretrained on the 2,100 proteins of one bacterial genome shipped in
pyhmmer (or taken from ``--pretrained``), then fine-tuned on the unaligned sequences of the
hemopexin family shipped in pyfamsa (4,188 sequences; a fifth held out by sequence hash), with:

- ``full``: every weight trained (AdamW);
- ``lora``: rank-8 LoRA adapters on the attention projections, everything else frozen;
- ``lora-all``: rank-8 adapters on the attention and MLP projections;
- ``qlora-all``: as ``lora-all`` with the blocks' frozen dense weights stored in 4-bit NormalFloat
  (``--lora-quant nf4``);
- ``control: lora-all on a 2-bit base``: as ``lora-all`` from a copy of the pretrained model whose
  blocks' dense weights went through a 2-bit NormalFloat round trip (the negative control: a base
  quantised too coarsely must visibly lose what 4 bits keep).

Each is scored on the held-out family members at the positions replaced by the mask token,
beside the pretrained model as it is (no adaptation: the control every variant must beat), the
family's residue frequencies (unigram) and the context-free table. Prints and writes
``benchmarks/results/lora_evotune.{json,md}`` with the trainable parameters and the per-device
bytes of each variant's compiled train step (its arguments: the train state and a batch; its peak).

    python examples/lora_evotune.py                       # about 45 minutes on 2 CPU cores
    python examples/lora_evotune.py --pretrained runs/pm  # start from a protein-mlm run you have
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np
from flax import traverse_util

from sciscale_jax import cli
from sciscale_jax.data import msa
from sciscale_jax.models.stack import is_lora
from sciscale_jax.recipes import get_recipe
from sciscale_jax.train import TrainConfig, train

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
from qlora_base import round_trip_copy  # noqa: E402  (the control's 2-bit base)

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "results"
ALL = {"lora_rank": 8, "lora_targets": "all"}
CONTROL = "control: lora-all on a 2-bit base"
VARIANTS = {"full": {}, "lora": {"lora_rank": 8}, "lora-all": ALL, "qlora-all": {**ALL, "lora_quant": "nf4"},
            CONTROL: ALL}
LEARNING_RATES = {"full": 1e-3, "lora": 3e-3, "lora-all": 3e-3, "qlora-all": 3e-3, CONTROL: 3e-3}


def family_fasta(path: pathlib.Path, family: str = "hemopexin") -> int:
    """The family's shipped alignment written as unaligned sequences (gaps removed); their count."""
    rows = msa.load_alignments()[family]
    letters = np.array(list(msa.AMINO + "X"))  # ids 0-19, then unknown (20); gaps (21) dropped
    with path.open("w") as f:
        for i, row in enumerate(rows):
            seq = "".join(letters[row[row != msa.GAP_ID]])
            if seq:
                f.write(f">{family}_{i}\n{seq}\n")
    return len(rows)


def evaluate(run: pathlib.Path, fasta: pathlib.Path, val_fraction: float, out: pathlib.Path) -> dict:
    """``sciscale eval`` of ``run`` on the family's held-out split: the validation figures and baselines."""
    code = cli.main(["eval", str(run), "--data", str(fasta), "--val-fraction", str(val_fraction),
                     "--json", str(out)])
    if code != 0:
        raise SystemExit(f"sciscale eval {run} failed ({code})")
    return json.loads(out.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrained", help="a protein-mlm run to start from (default: pretrain one here)")
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps per variant")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    args = p.parse_args(argv)
    recipe = get_recipe("protein-mlm")
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(args.out or tmp)
        root.mkdir(parents=True, exist_ok=True)
        fasta = root / "hemopexin.fasta"
        n = family_fasta(fasta)
        model = recipe.make_config()
        pretrained = pathlib.Path(args.pretrained) if args.pretrained else root / "pretrained"
        if not args.pretrained:
            t0 = time.perf_counter()
            train(recipe, model, TrainConfig(**{**recipe.train_defaults, "steps": args.pretrain_steps,
                                                "eval_every": args.pretrain_steps}), pretrained, progress=False)
            print(f"pretrained {args.pretrain_steps} steps on the genome in {time.perf_counter() - t0:.0f} s")
        rows = {"pretrained, not adapted": evaluate(pretrained, fasta, args.val_fraction, root / "eval0.json")}
        degraded = round_trip_copy(pretrained, root / "pretrained-nf2", bits=2)
        state = {}
        for name, extra in VARIANTS.items():
            cfg = recipe.make_config(**{**model.to_dict(), "data": str(fasta), "val_fraction": args.val_fraction,
                                        **extra})
            t0 = time.perf_counter()
            result = train(recipe, cfg, TrainConfig(**{**recipe.train_defaults, "steps": args.steps,
                                                       "eval_every": args.steps,
                                                       "init_from": str(degraded if name == CONTROL else pretrained),
                                                       "learning_rate": LEARNING_RATES[name]}),
                           root / name, progress=False)
            flat = traverse_util.flatten_dict(result["state"].params)
            trainable = sum(int(v.size) for k, v in flat.items() if not extra or is_lora(k))
            weights = {"kernel_nf4": 2, "kernel_absmax": 0}  # QLoRA: two weights per byte of codes; scales apart
            state[name] = {"trainable": trainable,
                           "parameters": sum(weights.get(k[-1], 1) * int(v.size) for k, v in flat.items()),
                           "seconds": time.perf_counter() - t0,
                           "state_bytes": result["memory"].argument_bytes, "peak_bytes": result["memory"].peak_bytes}
            rows[name] = evaluate(root / name, fasta, args.val_fraction, root / f"eval_{name}.json")
    first = next(iter(rows.values()))
    lines = [f"Evotuning on hemopexin ({n} sequences, {args.val_fraction:.0%} held out by hash): masked-position "
             f"loss (nats) on the held-out members; {args.steps} fine-tuning steps from a protein-mlm model "
             f"pretrained on one genome. CPU.", "",
             "| model | trainable parameters | held-out loss | accuracy | step arguments / peak (MB) |",
             "|---|---|---|---|---|"]
    for name, figures in rows.items():
        v = figures["validation"]
        s = state.get(name)
        lines.append(f"| {name} | {s['trainable']:,} of {s['parameters']:,} | " if s else f"| {name} | - | ")
        lines[-1] += f"{v['val_loss']:.3f} | {v['val_accuracy']:.3f} | "
        lines[-1] += f"{s['state_bytes'] / 1e6:.1f} / {s['peak_bytes'] / 1e6:.1f} |" if s else "- |"
    baselines = first["baselines"]
    for name in ("unigram", "context_free"):
        lines.append(f"| baseline: {name.replace('_', '-')} | - | {baselines[name + '_loss']:.3f} | "
                     f"{baselines[name + '_accuracy']:.3f} | - |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lora_evotune.json").write_text(json.dumps({"rows": rows, "state": state, "device": "CPU"}, indent=1))
    (RESULTS / "lora_evotune.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
