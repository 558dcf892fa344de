"""Host memory and time of smiles-lm's data preparation on a large SMILES corpus (CPU).

Runs ``build_data`` of ``sciscale train smiles-lm --corpus FILE --molecules N`` in a fresh
process (``host_memory.build_data_child``): with an empty cache and one curation worker, with an
empty cache and ``--workers`` workers (the corpus is curated and packed), then again (the pack is
opened from the cache). Reports each one's peak resident set size (``ru_maxrss``), wall time and
the time to draw one training batch (mean of 200). ``--before PYTHON`` runs the same child with
another interpreter whose sciscale_jax is another version (e.g. the commit before packing, which
curated in one process into a JSON list and held every molecule as a Python string and an int32
array), with an empty cache and then its cached list.

The corpus: MOSES's training set (1.58M molecules from ZINC, ``pip install molsets --no-deps``),
or ``--corpus FILE`` (any SMILES file).

    git worktree add /tmp/before 17a9695
    printf '#!/bin/sh\nPYTHONPATH=/tmp/before exec %s "$@"\n' "$PWD/.venv/bin/python" > /tmp/before.sh
    chmod +x /tmp/before.sh
    python benchmarks/smiles_corpus_memory.py --molecules 200000 --before /tmp/before.sh \\
        --json benchmarks/results/smiles_corpus_memory.json
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", help="a SMILES file (default: MOSES's train.csv.gz from molsets)")
    parser.add_argument("--molecules", type=int, default=200_000, help="the first N distinct molecules (0: all)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--before", help="a Python interpreter with another sciscale_jax, measured beside")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    if args.corpus is None:
        from sciscale_jax.data import smiles

        args.corpus = str(smiles.moses_smiles_files(("train",))[0])
    run = ["smiles-lm", "--corpus", args.corpus, "--molecules", args.molecules, "--samples", 0]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        for workers in sorted({1, args.workers}):
            os.environ["SCISCALE_DATA_WORKERS"] = str(workers)
            rows[f"pack, {workers} worker(s)"] = build_data_child(run, tmp / f"cache{workers}")
        rows["packed (later runs)"] = build_data_child(run, tmp / f"cache{args.workers}")
        if args.before:
            rows["before, first run"] = build_data_child(run, tmp / "cache-before", python=args.before)
            rows["before, cached list"] = build_data_child(run, tmp / "cache-before", python=args.before)
    result = {"corpus": args.corpus, "molecules": args.molecules, "cpus": os.cpu_count(), "runs": rows}
    print(f"{args.corpus}: first {args.molecules} molecules; {os.cpu_count()} CPUs")
    print_rows(rows)
    for name, r in rows.items():
        print(f"  {name}: {r['summary']}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
