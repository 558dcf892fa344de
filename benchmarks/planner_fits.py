"""What fits on one 80 GB GPU: ``sciscale plan`` for realistic model sizes (the README's table).

Each row runs ``sciscale plan <recipe> --devices 1 --memory 80GB [model flags]`` in its own
process (CPU; the planner simulates the device and never allocates the model) and keeps the
plans it prints: the top plan's mix and its peak predicted from compiled probes, the screened
alternatives, and the command's wall time. These are estimates for a GPU with 80e9 bytes, not
runs on one.

    python benchmarks/planner_fits.py                 # every row
    python benchmarks/planner_fits.py --only 3 4      # some rows (indices)
    python benchmarks/planner_fits.py --merge a.json b.json   # combine partial runs

Writes benchmarks/results/planner_fits.json and .md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

EVOFORMER = ("--c-m 256 --c-z 128 --msa-heads 8 --msa-head-dim 32 --pair-heads 4 --pair-head-dim 32 "
             "--opm-channels 32 --tri-mul-channels 128 --num-blocks 48 --num-seq 128 --batch-size 1")
ROWS = [
    ("ESM-2 650M (33 layers, width 1280, 20 heads, MLP 5120)", "1,024 tokens", "8 sequences", "protein-mlm",
     "--layers 33 --embed-dim 1280 --heads 20 --mlp-dim 5120 --mlp gelu --max-len 1024 --seq-len 1024 --batch-size 8"),
    ("3B-class protein LM (36 layers, width 2560, 40 heads, MLP 10240; 2.8B parameters)", "1,024 tokens",
     "8 sequences", "protein-mlm",
     "--layers 36 --embed-dim 2560 --heads 40 --mlp-dim 10240 --mlp gelu --max-len 1024 --seq-len 1024 "
     "--batch-size 8"),
    ("ClimaX-size ViT (8 layers, width 1024, 16 heads, MLP 4096, 5.625 deg grid 32 x 64, patch 2: 512 tokens; "
     "8 channels of the simulated data, not ClimaX's 48)", "512 patches", "16 states", "weather-vit",
     "--layers 8 --embed-dim 1024 --heads 16 --mlp-dim 4096 --patch-size 2 --batch-size 16"),
    ("AlphaFold 2 Evoformer (48 blocks, c_m 256, c_z 128, 128 MSA rows)", "crop 256", "1", "msa-evoformer",
     EVOFORMER + " --seq-len 256"),
    ("AlphaFold 2 Evoformer (48 blocks, c_m 256, c_z 128, 128 MSA rows)", "crop 384", "1", "msa-evoformer",
     EVOFORMER + " --seq-len 384"),
]
BUDGET = "80GB"
_PLAN = re.compile(r"^(\d+)\. peak ([\d.]+) (GiB|MiB) per device \[([^\]]+)\].*step ~([\d.]+) ms")
_MIX = ("remat", "attention", "precision", "grad-accum", "mesh", "zero", "offload", "chunk-size", "remat-modules")


def _mix(command: str) -> str:
    words, flags = command.split(), {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else None
            flags[word[2:]] = value
    return ", ".join(k if flags[k] is None else f"{k} {flags[k]}" for k in _MIX if k in flags)


def measure(index: int) -> dict:
    model, size, batch, recipe, flags = ROWS[index]
    argv = ["sciscale", "plan", recipe, "--devices", "1", "--memory", BUDGET, *flags.split()]
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sciscale_jax.cli", *argv[1:]], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    seconds = time.perf_counter() - t0
    lines = done.stdout.splitlines()
    plans = []
    for i, line in enumerate(lines):
        m = _PLAN.match(line)
        if m:
            gib = float(m.group(2)) / (1 if m.group(3) == "GiB" else 1024)
            plans.append({"rank": int(m.group(1)), "peak_gib": gib, "how": m.group(4),
                          "step_ms": float(m.group(5)), "command": lines[i + 1].strip()})
    return {"index": index, "model": model, "size": size, "batch": batch, "recipe": recipe,
            "plan_command": " ".join(argv), "returncode": done.returncode, "seconds": seconds, "plans": plans,
            "stdout": done.stdout, "stderr_tail": done.stderr.splitlines()[-5:]}


def table(rows) -> str:
    out = [f"Budget {BUDGET} (80e9 bytes = 74.5 GiB) per device, one device; `sciscale plan` on CPU.", "",
           "| model | size | batch | top plan (mix) | predicted peak | next screened plans | wall time | command |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["returncode"] != 0 or not r["plans"]:
            out.append(f"| {r['model']} | {r['size']} | {r['batch']} | failed: {' '.join(r['stderr_tail'])[:200]} "
                       f"| - | - | {r['seconds']:.0f} s | `{r['plan_command']}` |")
            continue
        top, rest = r["plans"][0], r["plans"][1:]
        others = "; ".join(f"{_mix(p['command'])}: {p['peak_gib']:.1f} GiB ({p['how']})" for p in rest)
        out.append(f"| {r['model']} | {r['size']} | {r['batch']} | {_mix(top['command'])} | {top['peak_gib']:.1f} GiB "
                   f"({top['how']}) | {others} | {r['seconds']:.0f} s | `{r['plan_command']}` |")
    return "\n".join(out)


def main():
    import indexed_rows

    indexed_rows.main(__doc__.splitlines()[0], "benchmarks/results/planner_fits", len(ROWS), measure, table,
                      "planner on CPU (no device used)",
                      progress=lambda r: f"#{r['index']} {r['model']} {r['size']}: {r['seconds']:.0f} s")


if __name__ == "__main__":
    main()
