"""Host memory and time of msa-evoformer's data preparation on a large collection of alignments (CPU).

Writes ``--families`` aligned FASTA files of ``--rows`` rows each (rows of the shipped hemopexin
alignment, 10% of residues substituted per family, so no two families are alike), then runs
``build_data`` of `sciscale train msa-evoformer --alignments folder/` in a fresh process: first
with an empty cache (the alignments are packed), then again (read from the pack). Reports each
one's peak resident set size (``ru_maxrss``; the operating system's file cache is not counted),
wall time and the time to draw one training batch (mean of 50). ``--before PYTHON`` runs the same
child with another interpreter, whose environment has another version of sciscale_jax installed,
e.g. the commit before packing, which held every alignment in memory. RSS, not XLA's memory
analysis: this is host-side work, no compiled step.

    git worktree add /tmp/before a06a617
    python -m venv /tmp/vb && /tmp/vb/bin/pip install -e "/tmp/before[science]"
    python benchmarks/alignment_collection_memory.py --families 3000 --before /tmp/vb/bin/python \\
        --json benchmarks/results/alignment_collection_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

_CHILD = """
import json, resource, sys, time
from sciscale_jax import cli
recipe, model_cfg, train_cfg = cli.build_configs(["msa-evoformer", "--alignments", sys.argv[1]])
t0 = time.perf_counter()
data = recipe.build_data(train_cfg, model_cfg)
seconds = time.perf_counter() - t0
t0 = time.perf_counter()
for step in range(50):
    data.train.batch(step)
batch_seconds = (time.perf_counter() - t0) / 50
print(json.dumps({"seconds": seconds, "batch_seconds": batch_seconds, "summary": data.summary[:200],
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def write_collection(folder: pathlib.Path, families: int, rows: int) -> tuple[int, int]:
    """The aligned FASTA files; returns (bytes on disk, alignment cells)."""
    import numpy as np

    from sciscale_jax.data import msa

    source = msa.load_alignments()["hemopexin"]
    letters = np.frombuffer((msa.AMINO + "X-").encode(), np.uint8)
    rng = np.random.default_rng(0)
    folder.mkdir()
    cells = 0
    for f in range(families):
        a = source[rng.choice(len(source), rows, replace=False)].copy()
        hit = (rng.random(a.shape) < 0.1) & (a != msa.GAP_ID)
        a[hit] = rng.integers(0, 20, int(hit.sum()))
        text = letters[a]
        lines = b"".join(b">s%d\n%s\n" % (i, row.tobytes()) for i, row in enumerate(text))
        (folder / f"FAM{f:05d}.afa").write_bytes(lines)
        cells += a.size
    return sum(p.stat().st_size for p in folder.iterdir()), cells


def _child(folder, cache, python=sys.executable) -> dict:
    env = {**os.environ, "SCISCALE_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
    # Run outside the repository, so ``python -c`` imports the sciscale_jax installed for ``python``.
    out = subprocess.run([python, "-c", _CHILD, str(folder)], env=env, check=True, capture_output=True,
                         cwd=cache.parent, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--before", help="a Python interpreter with another sciscale_jax installed, measured beside")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        folder = tmp / "alignments"
        size, cells = write_collection(folder, args.families, args.rows)
        rows = {"pack (first run)": _child(folder, tmp / "cache"), "cached (later runs)": _child(folder, tmp / "cache")}
        if args.before:
            rows["before (in memory)"] = _child(folder, tmp / "cache-before", args.before)
    result = {"families": args.families, "rows": args.rows, "cells": cells, "file_bytes": size, "runs": rows}
    print(f"{args.families} families x {args.rows} rows, {cells / 1e6:.0f}M cells, files {size / 2**30:.2f} GiB")
    for name, r in rows.items():
        print(f"  {name:20s} peak RSS {r['peak_rss_bytes'] / 2**30:5.2f} GiB   build_data {r['seconds']:6.1f} s   "
              f"batch {r['batch_seconds'] * 1e3:6.2f} ms")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
