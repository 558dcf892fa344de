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
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host_memory import build_data_child, print_rows  # noqa: E402  (benchmarks/host_memory.py)



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
        argv = ["msa-evoformer", "--alignments", folder]
        rows = {"pack (first run)": build_data_child(argv, tmp / "cache", batches=50),
                "cached (later runs)": build_data_child(argv, tmp / "cache", batches=50)}
        if args.before:
            rows["before (in memory)"] = build_data_child(argv, tmp / "cache-before", python=args.before, batches=50)
    result = {"families": args.families, "rows": args.rows, "cells": cells, "file_bytes": size, "runs": rows}
    print(f"{args.families} families x {args.rows} rows, {cells / 1e6:.0f}M cells, files {size / 2**30:.2f} GiB")
    print_rows(rows)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
