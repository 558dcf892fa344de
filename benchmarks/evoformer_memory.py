"""Peak training memory of AlphaFold 2's Evoformer, naive and with each memory technique.

For one Evoformer block and a stack of blocks at monomer sizes (c_m 256, c_z 128) and the
crops given (N_seq x N_res), this compiles one training step (forward, backward and an Adam
update of the parameters) and reads XLA's compiled memory analysis, per device: nothing
runs, so the figures are deterministic on CPU. The step loss is a fixed random projection of
the block's outputs. Variants, each a switch of ``EvoformerConfig``:

- naive: no chunking, plain XLA attention (logits [rows, H, N, N] materialised), fp32, no remat
- +chunking: every sub-module in chunks of ``--chunk`` along its non-reduced axis, each chunk
  recomputed in the backward pass (``chunk_remat``)
- +attention: the attention front door's chunked implementation (O(N) memory), with chunking
- +block remat: the stack checkpointed per block ("full"), with the above
- +module remat: each sub-module update checkpointed inside the block (``remat_modules``)
- +bf16: bfloat16 compute (float32 parameters), with the above = all
- bf16 only, remat only: each technique alone

``--scan-layers`` scans the block stack in every variant. Unrolled, the compiled program does
not reuse the buffers of one block's chunked loops (``lax.map``) for the next block's, so block
remat saves far less with chunking than without; scanned, the loops are compiled once
(``benchmarks/results/evoformer_memory_384_scan.md``).

It prints markdown tables, fits the growth of peak memory with N_res (naive and all), and
writes JSON and a PNG under ``benchmarks/results/``.

    python benchmarks/evoformer_memory.py                     # CPU, compile only
    python benchmarks/evoformer_memory.py --crops 128x256 --blocks 1
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sciscale_jax.memory.measure import MiB, compiled_memory
from sciscale_jax.models.evoformer import EvoformerConfig, EvoformerStack
from sciscale_jax.train.abstract import eval_shape_module

RESULTS = pathlib.Path(__file__).parent / "results"


def variants(chunk: int) -> dict[str, dict]:
    return {
        "naive": dict(),
        "bf16 only": dict(precision="bf16"),
        "remat only": dict(remat="full"),
        "+chunking": dict(chunk_size=chunk),
        "+attention (chunked)": dict(chunk_size=chunk, attention="chunked"),
        "+block remat": dict(chunk_size=chunk, attention="chunked", remat="full"),
        "+module remat": dict(chunk_size=chunk, attention="chunked", remat="full", remat_modules=True),
        "+bf16 (all)": dict(chunk_size=chunk, attention="chunked", remat="full", remat_modules=True,
                            precision="bf16"),
    }


def step_memory(cfg: EvoformerConfig, n_seq: int, n_res: int) -> int:
    """Peak bytes of one compiled training step of ``EvoformerStack(cfg)`` (batch 1)."""
    abstract = eval_shape_module(lambda: EvoformerStack(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    opt = optax.adam(1e-3)
    opt_state = jax.eval_shape(opt.init, params)
    f32 = jnp.float32
    m = jax.ShapeDtypeStruct((1, n_seq, n_res, cfg.c_m), f32)
    z = jax.ShapeDtypeStruct((1, n_res, n_res, cfg.c_z), f32)
    msa_mask = jax.ShapeDtypeStruct((1, n_seq, n_res), f32)
    pair_mask = jax.ShapeDtypeStruct((1, n_res, n_res), f32)

    def train_step(params, opt_state, m, z, msa_mask, pair_mask):
        def loss(params):
            m_out, z_out = nnx.merge(graphdef, params)(m, z, msa_mask, pair_mask)
            w_m = jax.random.normal(jax.random.key(0), m_out.shape[-1:], f32)
            w_z = jax.random.normal(jax.random.key(1), z_out.shape[-1:], f32)
            return jnp.mean(m_out.astype(f32) @ w_m) + jnp.mean(z_out.astype(f32) @ w_z)
        grads = jax.grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    step = jax.jit(train_step, donate_argnums=(0, 1))
    return compiled_memory(step, params, opt_state, m, z, msa_mask, pair_mask).peak_bytes


def largest_crop(cfg: EvoformerConfig, budget: float, n_seq: int = 128, step: int = 32) -> tuple[int, int]:
    """Largest N_res (a multiple of ``step``) whose training step peaks within ``budget`` bytes,
    by doubling then bisection (peak memory grows monotonically with N_res)."""
    fits = lambda n: step_memory(cfg, n_seq, n)
    lo, lo_peak = 0, 0
    hi = step * 4
    while (peak := fits(hi)) <= budget:
        lo, lo_peak, hi = hi, peak, hi * 2
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if (peak := fits(mid)) <= budget:
            lo, lo_peak = mid, peak
        else:
            hi = mid
    return lo, lo_peak


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", nargs="+", default=["128x256", "128x384"], help="N_seq x N_res")
    parser.add_argument("--blocks", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--scaling", nargs="*", type=int, default=[64, 128, 192, 256],
                        help="N_res values (N_seq 128, one block) for the growth fit; empty to skip")
    parser.add_argument("--variants", nargs="*", default=None, help="a subset of the variant names")
    parser.add_argument("--budget-gib", type=float, default=None,
                        help="find the largest N_res (N_seq 128, one block, multiple of 32) whose step fits "
                             "this many GiB, naive and all")
    parser.add_argument("--scan-layers", action="store_true",
                        help="scan the block stack (one compiled block body) in every variant")
    parser.add_argument("--out", default="evoformer_memory")
    args = parser.parse_args()
    scan = dict(scan_layers=True) if args.scan_layers else {}
    device = jax.devices()[0].device_kind
    rows = []
    for crop in args.crops:
        n_seq, n_res = (int(x) for x in crop.split("x"))
        for blocks in args.blocks:
            for name, overrides in variants(args.chunk).items():
                if args.variants and name not in args.variants and name not in ("naive", "+bf16 (all)"):
                    continue
                cfg = EvoformerConfig(num_blocks=blocks, **overrides, **scan)
                peak = step_memory(cfg, n_seq, n_res)
                rows.append(dict(crop=crop, n_seq=n_seq, n_res=n_res, blocks=blocks, variant=name, peak_bytes=peak))
                print(f"{crop} blocks={blocks} {name:<22} {peak / MiB:10.1f} MiB", flush=True)
    lines = [f"Evoformer training-step peak memory (forward + backward + Adam), XLA compiled memory "
             f"analysis, device: {device}, chunk {args.chunk}"
             + (", block stack scanned (--scan-layers)" if args.scan_layers else ", block stack unrolled"), "",
             "| crop | blocks | " + " | ".join(variants(args.chunk)) + " | naive / all |",
             "|---|---|" + "---|" * (len(variants(args.chunk)) + 1)]
    for crop in args.crops:
        for blocks in args.blocks:
            sel = {r["variant"]: r["peak_bytes"] for r in rows if r["crop"] == crop and r["blocks"] == blocks}
            cells = " | ".join(f"{sel[v] / MiB:.0f} MiB" if v in sel else "-" for v in variants(args.chunk))
            ratio = f"{sel['naive'] / sel['+bf16 (all)']:.1f}x" if {"naive", "+bf16 (all)"} <= set(sel) else "-"
            lines.append(f"| {crop} | {blocks} | {cells} | {ratio} |")
    scaling = []
    for n_res in args.scaling:
        for name in ("naive", "+bf16 (all)"):
            cfg = EvoformerConfig(num_blocks=1, **variants(args.chunk)[name], **scan)
            scaling.append(dict(n_res=n_res, variant=name, peak_bytes=step_memory(cfg, 128, n_res)))
            print(f"scaling N_res={n_res} {name:<12} {scaling[-1]['peak_bytes'] / MiB:10.1f} MiB", flush=True)
    fits = {}
    if len(args.scaling) >= 2:
        lines += ["", "| variant | peak ~ N_res^p (N_seq 128, one block) |", "|---|---|"]
        for name in ("naive", "+bf16 (all)"):
            pts = [(r["n_res"], r["peak_bytes"]) for r in scaling if r["variant"] == name]
            p = float(np.polyfit(np.log([a for a, _ in pts]), np.log([b for _, b in pts]), 1)[0])
            fits[name] = p
            lines.append(f"| {name} | p = {p:.2f} |")
    largest = {}
    if args.budget_gib:
        budget = args.budget_gib * 1024**3
        for name in ("naive", "+bf16 (all)"):
            cfg = EvoformerConfig(num_blocks=1, **variants(args.chunk)[name], **scan)
            largest[name] = largest_crop(cfg, budget)
            print(f"largest N_res under {args.budget_gib:g} GiB, {name}: {largest[name]}", flush=True)
        lines += ["", f"| variant | largest N_res (multiple of 32, N_seq 128, one block) within {args.budget_gib:g} GiB |",
                  "|---|---|"] + [f"| {k} | {v[0]} ({v[1] / MiB:,.0f} MiB) |" for k, v in largest.items()]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(
        dict(device=device, chunk=args.chunk, rows=rows, scaling=scaling, fits=fits,
             budget_gib=args.budget_gib, largest=largest), indent=1))
    (RESULTS / f"{args.out}.md").write_text(table + "\n")
    if not scaling:  # the plot shows memory against N_res only
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("naive", "+bf16 (all)"):
        pts = [(r["n_res"], r["peak_bytes"] / MiB) for r in scaling if r["variant"] == name]
        if pts:
            ax.loglog(*zip(*pts), "o-", label=f"{name} (p={fits.get(name, float('nan')):.2f})")
    ax.set_xlabel("N_res (N_seq 128)")
    ax.set_ylabel("peak training-step memory (MiB)")
    ax.set_title(f"Evoformer block, {device}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.out}.png", dpi=120)


if __name__ == "__main__":
    main()
