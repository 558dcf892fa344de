"""Training memory of AlphaFold 2's Evoformer trunk with recycling (CPU-compiled, nothing runs).

msa-evoformer at AlphaFold 2's monomer sizes (48 blocks, c_m 256, c_z 128, 8 x 32 MSA heads,
4 x 32 pair heads), one crop of N_seq x N_res, with the memory techniques of a real run (chunks
of 32, the chunked attention, block remat, bf16, scanned blocks), with and without AlphaFold's
recycling (``--num-recycle``: up to N gradient-free passes in a ``while_loop`` before the
differentiated one). The loop's own train step is compiled at full depth and XLA's compiled
memory analysis read: recycling should cost the carried first MSA row and pair and no stored
activations.

    python benchmarks/evoformer_recycling_memory.py              # crop 128 x 256, N = 0, 1, 3

Writes benchmarks/results/evoformer_recycling_memory.{json,md}.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import sys  # noqa: E402

from sciscale_jax.memory.measure import report_from_analysis  # noqa: E402
from sciscale_jax.recipes import get_recipe  # noqa: E402
from sciscale_jax.train import TrainConfig  # noqa: E402
from sciscale_jax.train.abstract import abstract_run  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evoformer_lora_memory import AF2, TECHNIQUES, GiB, write  # noqa: E402  (the same sizes and techniques)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop", default="128x256", help="N_seq x N_res")
    parser.add_argument("--recycles", type=int, nargs="+", default=[0, 1, 3])
    args = parser.parse_args(argv)
    n_seq, n_res = map(int, args.crop.split("x"))
    recipe = get_recipe("msa-evoformer")
    train_cfg = TrainConfig(batch_size=1, seq_len=n_res, optimizer="adamw")
    rows = {}
    for n in args.recycles:
        cfg = recipe.make_config(**AF2, **TECHNIQUES, num_seq=n_seq, num_recycle=n)
        report = report_from_analysis(abstract_run(recipe, cfg, train_cfg).compile().memory_analysis())
        rows[n] = {"arguments": report.argument_bytes, "temporaries": report.temp_bytes, "peak": report.peak_bytes}
        print(n, {k: f"{v / GiB:.3f} GiB" for k, v in rows[n].items()}, flush=True)
    base = rows[min(rows)]["peak"]
    lines = [f"msa-evoformer at AlphaFold 2's monomer sizes, crop {n_seq} x {n_res}, batch 1, "
             f"{', '.join(f'{k}={v}' for k, v in TECHNIQUES.items())}, AdamW; the train step compiled at full "
             "depth, XLA's compiled memory analysis (CPU backend, compile only)", "",
             "| num_recycle | arguments | temporaries | peak | peak / no recycling |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {n} | {r['arguments'] / GiB:.3f} GiB | {r['temporaries'] / GiB:.3f} GiB | {r['peak'] / GiB:.3f} GiB "
              f"| {r['peak'] / base:.3f} |" for n, r in rows.items()]
    write("evoformer_recycling_memory", (n_seq, n_res), rows, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
