"""Host memory and time of protein-mlm's data preparation on a large FASTA corpus (CPU).

Writes a FASTA file of ``--proteins`` proteins (the pyhmmer proteome, each copy with 10% of its
residues substituted, so no two are alike and the split varies), then runs ``build_data`` of
`sciscale train protein-mlm --data corpus.fasta` in a fresh process: first with an empty pack
cache (the corpus is packed), then again (the pack is opened from the cache), then once more
scoring every held-out protein (``--val-sequences`` above their number, as the version before
packing did; the default scores 10,000). Reports each one's peak resident set size
(``ru_maxrss``; the operating system's file cache is not counted), wall time and the time to
draw one training batch (mean of 200). ``--before PYTHON`` runs the same child with another
interpreter, whose environment has another version of sciscale_jax installed, e.g. the commit
before packing, which read the corpus into Python strings and int32 arrays. RSS, not XLA's
memory analysis: this is host-side work, no compiled step.

    git worktree add /tmp/before a06a617
    python -m venv /tmp/vb && /tmp/vb/bin/pip install -e "/tmp/before[science]"
    python benchmarks/protein_corpus_memory.py --proteins 3000000 --before /tmp/vb/bin/python \\
        --json benchmarks/results/protein_corpus_memory.json
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
recipe, model_cfg, train_cfg = cli.build_configs(["protein-mlm", "--data", *sys.argv[1:]])
t0 = time.perf_counter()
data = recipe.build_data(train_cfg, model_cfg)
seconds = time.perf_counter() - t0
t0 = time.perf_counter()
for step in range(200):
    data.train.batch(step)
batch_seconds = (time.perf_counter() - t0) / 200
print(json.dumps({"seconds": seconds, "batch_seconds": batch_seconds, "summary": data.summary,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def write_corpus(path: pathlib.Path, proteins: int) -> tuple[int, int]:
    """The FASTA file (60 residues a line); returns (bytes, residues)."""
    import numpy as np

    from sciscale_jax.data import load_proteins

    source = load_proteins()
    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", np.uint8)
    residues = 0
    with open(path, "wb") as f:
        for i in range(proteins):
            seq = np.frombuffer(source[i % len(source)].encode(), np.uint8).copy()
            hit = rng.random(len(seq)) < 0.1
            seq[hit] = rng.choice(letters, int(hit.sum()))
            residues += len(seq)
            body = b"\n".join(seq[k:k + 60].tobytes() for k in range(0, len(seq), 60))
            f.write(b">protein_%d\n%s\n" % (i, body))
    return path.stat().st_size, residues


def _child(corpus, cache, python=sys.executable, flags=()) -> dict:
    env = {**os.environ, "SCISCALE_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
    # Run outside the repository, so ``python -c`` imports the sciscale_jax installed for ``python``.
    out = subprocess.run([python, "-c", _CHILD, str(corpus), *flags], env=env, check=True, capture_output=True,
                         cwd=cache.parent, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proteins", type=int, default=1_000_000)
    parser.add_argument("--before", help="a Python interpreter with another sciscale_jax installed, measured beside")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        corpus = tmp / "corpus.fasta"
        size, residues = write_corpus(corpus, args.proteins)
        rows = {"pack (first run)": _child(corpus, tmp / "cache"), "cached (later runs)": _child(corpus, tmp / "cache"),
                # as the version before scores them: every held-out protein (the default scores 10,000)
                "cached, all held out": _child(corpus, tmp / "cache", flags=["--val-sequences", "100000000"])}
        if args.before:
            rows["before (in memory)"] = _child(corpus, tmp / "cache-before", args.before)
    result = {"proteins": args.proteins, "residues": residues, "fasta_bytes": size, "runs": rows}
    print(f"{args.proteins} proteins, {residues / 1e6:.0f}M residues, FASTA {size / 2**30:.2f} GiB")
    for name, r in rows.items():
        print(f"  {name:22s} peak RSS {r['peak_rss_bytes'] / 2**30:5.2f} GiB   build_data {r['seconds']:6.1f} s   "
              f"batch {r['batch_seconds'] * 1e3:5.2f} ms")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
