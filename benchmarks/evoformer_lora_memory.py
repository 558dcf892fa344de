"""Training memory of AlphaFold 2's Evoformer trunk fine-tuned in full against LoRA (CPU-compiled).

The msa-evoformer recipe at AlphaFold 2's monomer sizes (48 blocks, c_m 256, c_z 128, 8 x 32 MSA
heads, 4 x 32 pair heads, outer product 32, triangle multiplication 128), one crop of N_seq x
N_res, with the memory techniques a fine-tune would use (chunks of 32, the chunked attention,
block remat, bf16, scanned blocks). For each mix ``sciscale_jax.train.estimate`` compiles the
loop's own train step at two depths and reads XLA's compiled memory analysis (nothing runs):
parameters, gradients, AdamW's state and activations per device. LoRA (rank 8) trains the
adapters alone: no gradient or optimizer state for the frozen weights, which are stored in the
compute dtype (bf16).

    python benchmarks/evoformer_lora_memory.py                  # crop 128 x 256
    python benchmarks/evoformer_lora_memory.py --crop 128x384

Writes benchmarks/results/evoformer_lora_memory.{json,md}.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402

from sciscale_jax.recipes import get_recipe  # noqa: E402
from sciscale_jax.train import TrainConfig  # noqa: E402
from sciscale_jax.train.estimate import estimate  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
AF2 = dict(c_m=256, c_z=128, msa_heads=8, msa_head_dim=32, pair_heads=4, pair_head_dim=32, opm_channels=32,
           tri_mul_channels=128, num_blocks=48)
TECHNIQUES = dict(chunk_size=32, attention="chunked", remat="full", precision="bf16", scan_layers=True)
MIXES = {"full fine-tune": {}, "LoRA r=8, attention": dict(lora_rank=8),
         "LoRA r=8, all": dict(lora_rank=8, lora_targets="all")}
GiB = 2 ** 30


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop", default="128x256", help="N_seq x N_res")
    args = parser.parse_args(argv)
    n_seq, n_res = map(int, args.crop.split("x"))
    recipe = get_recipe("msa-evoformer")
    train_cfg = TrainConfig(batch_size=1, seq_len=n_res, optimizer="adamw")
    rows = {}
    for name, mix in MIXES.items():
        cfg = recipe.make_config(**AF2, **TECHNIQUES, num_seq=n_seq, **mix)
        e = estimate(recipe, cfg, train_cfg)
        rows[name] = {"params": e.params_bytes, "grads": e.grads_bytes, "opt_state": e.opt_state_bytes,
                      "activations": e.activation_bytes, "peak": e.peak_bytes}
        print(name, {k: f"{v / GiB:.2f} GiB" for k, v in rows[name].items()}, flush=True)
    lines = [f"msa-evoformer at AlphaFold 2's monomer sizes, crop {n_seq} x {n_res}, batch 1, "
             f"{', '.join(f'{k}={v}' for k, v in TECHNIQUES.items())}, AdamW; XLA's compiled memory analysis "
             "(CPU backend, compile only)", "",
             "| mix | parameters | gradients | optimizer state | activations | peak |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | " + " | ".join(f"{r[k] / GiB:.2f} GiB" for k in
                                          ("params", "grads", "opt_state", "activations", "peak")) + " |"
              for name, r in rows.items()]
    write("evoformer_lora_memory", (n_seq, n_res), rows, lines)
    return 0


def write(name: str, crop, rows: dict, lines: list) -> None:
    """``rows`` as ``results/<name>.json`` (with the crop and techniques) and ``lines`` as ``<name>.md``."""
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / name
    stem.with_suffix(".json").write_text(json.dumps({"crop": list(crop), "techniques": TECHNIQUES, "rows": rows},
                                                    indent=1))
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
