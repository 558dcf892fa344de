"""Training throughput and peak memory of one AlphaFold 2 Evoformer block on one device.

Times forward+backward (gradients of all parameters and of both inputs) of one
``sciscale_jax.models.evoformer.EvoformerBlock`` at AlphaFold's crop (N_seq 128 MSA rows,
N_res 256 residues, c_m 256, c_z 128) in bfloat16 compute with float32 parameters, for each
attention implementation named. FLOPs are XLA's own count of the compiled step
(``cost_analysis``): custom calls (a Pallas or cuDNN attention kernel) are not in it, so
compare TFLOP/s only between rows of the same attention implementation; the time is the measure. Peak memory is
the device's ``memory_stats()`` peak over the process (GPU only), next to the bytes held
before the first block ran. Skips with a message when the Evoformer module is absent.

    python benchmarks/evoformer_gpu.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import median_seconds  # noqa: E402  (benchmarks/timing.py)


def _import_evoformer():
    try:
        from sciscale_jax.models import evoformer
    except ImportError as err:
        return None, f"{type(err).__name__}: {err}"
    if not hasattr(evoformer, "EvoformerBlock") or not hasattr(evoformer, "EvoformerConfig"):
        return None, "sciscale_jax.models.evoformer has no EvoformerBlock / EvoformerConfig"
    return evoformer, None


def block_config(evoformer, *, c_m: int, c_z: int, attention: str, dtype: str):
    """An EvoformerConfig with the benchmark's sizes; fields the config lacks are left out,
    so a change in how the config names its technique switches touches this function only."""
    fields = {f.name for f in dataclasses.fields(evoformer.EvoformerConfig)}
    wanted = dict(c_m=c_m, c_z=c_z, attention=attention, dtype=dtype, param_dtype="float32", num_blocks=1,
                  msa_dropout=0.0, pair_dropout=0.0)
    if "precision" in fields and dtype == "bfloat16":
        wanted["precision"] = "bf16"
    return evoformer.EvoformerConfig(**{k: v for k, v in wanted.items() if k in fields})


def _memory(device):
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - CPU devices may not report
        stats = {}
    return stats.get("bytes_in_use"), stats.get("peak_bytes_in_use")


def measure(evoformer, args, attention: str) -> dict:
    from flax import nnx

    device = jax.devices()[0]
    cfg = block_config(evoformer, c_m=args.c_m, c_z=args.c_z, attention=attention, dtype=args.dtype)
    block = evoformer.EvoformerBlock(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)
    r = np.random.default_rng(0)
    m = jnp.asarray(r.normal(size=(1, args.n_seq, args.n_res, args.c_m)), jnp.float32)
    z = jnp.asarray(r.normal(size=(1, args.n_res, args.n_res, args.c_z)), jnp.float32)
    msa_mask = jnp.ones((1, args.n_seq, args.n_res), jnp.float32)
    pair_mask = jnp.ones((1, args.n_res, args.n_res), jnp.float32)
    dm = jnp.asarray(r.normal(size=m.shape), jnp.float32)
    dz = jnp.asarray(r.normal(size=z.shape), jnp.float32)
    dtype = jnp.dtype(args.dtype)

    def loss(params, m, z):
        out_m, out_z = nnx.merge(graphdef, params, rest)(m.astype(dtype), z.astype(dtype), msa_mask, pair_mask)
        return (jnp.sum(out_m.astype(jnp.float32) * dm) + jnp.sum(out_z.astype(jnp.float32) * dz))

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    in_use_before, _ = _memory(device)
    t0 = time.perf_counter()
    compiled = step.lower(params, m, z).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    seconds = median_seconds(compiled, (params, m, z), args.runs)
    grads = compiled(params, m, z)
    finite = bool(all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads)))
    _, peak = _memory(device)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return dict(device=device.device_kind, backend=jax.default_backend(), jax=jax.__version__, attention=attention,
                n_seq=args.n_seq, n_res=args.n_res, c_m=args.c_m, c_z=args.c_z, dtype=args.dtype, params=n_params,
                ms=seconds * 1e3, xla_flops=flops, tflops=flops / seconds / 1e12 if flops else None,
                compile_s=compile_s, bytes_in_use_before=in_use_before, peak_bytes=peak, grads_finite=finite)


def table(records) -> str:
    lines = ["| device | attention | N_seq x N_res | c_m, c_z | dtype | fwd+bwd ms | XLA TFLOP/s | peak GiB "
             "| compile s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['device']} | {r['attention']} | | | | error: {r['error'][:120]} | | | |")
            continue
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f}"
        tf = "-" if r["tflops"] is None else f"{r['tflops']:.1f}"
        lines.append(f"| {r['device']} | {r['attention']} | {r['n_seq']}x{r['n_res']} | {r['c_m']}, {r['c_z']} "
                     f"| {r['dtype']} | {r['ms']:.2f} | {tf} | {peak} | {r['compile_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-seq", type=int, default=128)
    p.add_argument("--n-res", type=int, default=256)
    p.add_argument("--c-m", type=int, default=256)
    p.add_argument("--c-z", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--attentions", type=lambda s: s.split(","), default=["auto", "xla"],
                   help="comma list of front-door attention impls, one row each (peak memory is the "
                        "process peak so far, so list the leanest first)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="N_seq 4, N_res 16, c_m 32, c_z 16: a CPU smoke test")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    if args.tiny:
        args.n_seq, args.n_res, args.c_m, args.c_z = 4, 16, 32, 16
    evoformer, why = _import_evoformer()
    if evoformer is None:
        print(f"evoformer_gpu skipped: sciscale_jax.models.evoformer is not available ({why})")
        return
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "evoformer_gpu.json")
    records = []
    for attention in args.attentions:
        try:
            records.append(measure(evoformer, args, attention))
        except Exception as err:  # noqa: BLE001 - record and go on
            records.append(dict(device=jax.devices()[0].device_kind, attention=attention,
                                error=f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"))
        print(json.dumps(records[-1]), file=sys.stderr, flush=True)
        with open(path, "w") as f:  # after every row, so a run cut short keeps what finished
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, records=records), f, indent=1)
    print(table(records))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
