"""Time to build one training batch of msa-evoformer with AlphaFold's input features.

The recipe's CLI defaults with ``--msa-features alphafold`` (crop 16 x 64, batch 4; the shipped
alignments, where hemopexin's 4,188 rows make most examples) and with 64 extra rows, on the
host alone (no model). ``--source DIR`` times the sciscale_jax of another checkout instead (an
earlier version, for a before/after figure in one sitting); the batches of both are written to
``--dump`` to check that they are equal.

    python benchmarks/msa_features_time.py                       # this checkout
    python benchmarks/msa_features_time.py --source /tmp/before  # another one
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="", help="a checkout whose sciscale_jax to time")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5, help="the fastest round is kept")
    parser.add_argument("--dump", default="", help="pickle the batches here (to compare two versions)")
    args = parser.parse_args(argv)
    if args.source:
        sys.path.insert(0, os.path.abspath(args.source))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import sciscale_jax
    from sciscale_jax.recipes import get_recipe
    from sciscale_jax.train import TrainConfig

    print("sciscale_jax from", os.path.dirname(sciscale_jax.__file__))
    recipe = get_recipe("msa-evoformer")
    dumped = {}
    for label, kw in (("alphafold features", {}), ("and 64 extra rows", dict(num_extra_blocks=1, num_extra_seq=64))):
        data = recipe.build_data(TrainConfig(**recipe.train_defaults),
                                 recipe.make_config(msa_features="alphafold", **kw))
        source = data.train
        source.batch(0)  # anything built once per run
        best = float("inf")
        for _ in range(args.rounds):
            start = time.perf_counter()
            batches = [source.batch(s) for s in range(args.batches)]
            best = min(best, (time.perf_counter() - start) / args.batches)
        dumped[label] = batches
        print(f"{label}: {best * 1e3:.2f} ms per batch of {len(batches[0]['msa'])} (fastest of {args.rounds} rounds "
              f"of {args.batches})", flush=True)
    if args.dump:
        with open(args.dump, "wb") as f:
            pickle.dump(dumped, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
