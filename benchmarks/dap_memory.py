"""Per-device memory of AlphaFold 2's Evoformer under Dynamic Axial Parallelism (FastFold).

For an Evoformer block (or stack) at monomer sizes (c_m 256, c_z 128) and a crop N_seq x N_res,
this compiles the forward + backward pass (gradients of the parameters) on a mesh with a
``dap`` axis of 1, 2, 4 and 8 devices, with and without block remat, and reads XLA's compiled
memory analysis per device: temporaries (activations) and the peak, next to the ideal
single-device activations / N. From the compiled HLO it counts the all-to-all and all-gather
ops of one step and their bytes, and whether XLA made them asynchronous (start/done pairs).
Nothing runs (compile only). Writes a markdown table, JSON and a PNG under benchmarks/results/.

    nice -n 10 python benchmarks/dap_memory.py                          # 8 simulated CPU devices
    nice -n 10 python benchmarks/dap_memory.py --crops 128x256 --degrees 1 8 --blocks 1
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from sciscale_jax.memory.measure import MiB, report_from_analysis  # noqa: E402
from sciscale_jax.models.evoformer import EvoformerConfig, EvoformerStack  # noqa: E402
from sciscale_jax.parallel import ParallelConfig, make_mesh  # noqa: E402
from sciscale_jax.remat import compiler_options  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "s32": 4, "u32": 4, "pred": 1}
_SHAPE = re.compile(r"(f32|bf16|f16|f64|s32|u32|pred)\[([0-9,]*)\]")


def collectives(hlo: str) -> dict:
    """Count and result bytes of all-to-all and all-gather ops in compiled HLO text, and how many
    of them are asynchronous (``*-start`` / ``*-done`` pairs)."""
    out = {}
    for op in ("all-to-all", "all-gather", "reduce-scatter"):
        count, nbytes, async_starts = 0, 0, 0
        for line in hlo.splitlines():
            if "=" not in line:
                continue
            rhs = line.split("=", 1)[1]
            if re.search(rf"\s{op}-start\(", rhs) or re.search(rf"async-start\(.*{op}", rhs):
                async_starts += 1
            if not re.search(rf"\s{op}(-start)?\(", rhs):
                continue
            count += 1
            result = rhs[:re.search(rf"\s{op}(-start)?\(", rhs).start()]  # a tuple on CPU: one piece per device
            for dtype, dims in _SHAPE.findall(result):
                nbytes += int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64)) * _BYTES[dtype]
        out[op] = dict(count=count, bytes=nbytes, async_starts=async_starts)
    return out


def compile_step(cfg: EvoformerConfig, n_seq: int, n_res: int, degree: int):
    """(memory report, HLO text) of forward + backward of ``EvoformerStack(cfg)`` at batch 1 on dap=degree."""
    mesh = make_mesh(ParallelConfig(dap=degree))
    abstract = nnx.eval_shape(lambda: EvoformerStack(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    f32 = jnp.float32
    m = jax.ShapeDtypeStruct((1, n_seq, n_res, cfg.c_m), f32)
    z = jax.ShapeDtypeStruct((1, n_res, n_res, cfg.c_z), f32)
    msa_mask = jax.ShapeDtypeStruct((1, n_seq, n_res), f32)
    pair_mask = jax.ShapeDtypeStruct((1, n_res, n_res), f32)

    def grads(params, m, z, msa_mask, pair_mask):
        def loss(params):
            m_out, z_out = nnx.merge(graphdef, params)(m, z, msa_mask, pair_mask)
            w_m = jax.random.normal(jax.random.key(0), m_out.shape[-1:], f32)
            w_z = jax.random.normal(jax.random.key(1), z_out.shape[-1:], f32)
            return jnp.mean(m_out @ w_m) + jnp.mean(z_out @ w_z)
        return jax.grad(loss)(params)

    split = NamedSharding(mesh, P(None, "dap") if degree > 1 else P())
    rep = NamedSharding(mesh, P())
    with jax.set_mesh(mesh):
        step = jax.jit(grads, in_shardings=(jax.tree.map(lambda _: rep, params), split, split, rep, rep))
        compiled = step.lower(params, m, z, msa_mask, pair_mask).compile(compiler_options())
    return report_from_analysis(compiled.memory_analysis()), compiled.as_text()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", nargs="+", default=["128x256"], help="N_seq x N_res")
    parser.add_argument("--blocks", nargs="+", type=int, default=[1])
    parser.add_argument("--degrees", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--remat", nargs="+", default=["none", "full"])
    parser.add_argument("--out", default="dap_memory")
    args = parser.parse_args()
    rows = []
    for crop in args.crops:
        n_seq, n_res = (int(x) for x in crop.split("x"))
        for blocks in args.blocks:
            for policy in args.remat:
                cfg = EvoformerConfig(num_blocks=blocks, remat=policy)
                for degree in args.degrees:
                    report, hlo = compile_step(cfg, n_seq, n_res, degree)
                    row = dict(crop=crop, blocks=blocks, remat=policy, dap=degree, temp_bytes=report.temp_bytes,
                               peak_bytes=report.peak_bytes, collectives=collectives(hlo))
                    rows.append(row)
                    c = row["collectives"]
                    print(f"{crop} blocks={blocks} remat={policy} dap={degree}: temp {report.temp_bytes / MiB:.1f} "
                          f"MiB peak {report.peak_bytes / MiB:.1f} MiB all-to-all {c['all-to-all']} "
                          f"all-gather {c['all-gather']}", flush=True)
                    RESULTS.mkdir(exist_ok=True)
                    (RESULTS / f"{args.out}.json").write_text(json.dumps(dict(rows=rows), indent=1))
    lines = ["Evoformer forward + backward per device under DAP (XLA compiled memory analysis, 8 simulated "
             "CPU devices, batch 1, monomer sizes); activations = temporaries; ideal = DAP-1 activations / N", "",
             "| crop | blocks | remat | dap | activations | ideal | ratio | peak | all-to-all (count, MiB) | "
             "all-gather (count, MiB) | async starts |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next((b for b in rows if b["crop"] == r["crop"] and b["blocks"] == r["blocks"]
                     and b["remat"] == r["remat"] and b["dap"] == 1), None)
        ideal = base["temp_bytes"] / r["dap"] if base else float("nan")
        r["ideal_temp_bytes"], r["ratio_to_ideal"] = ideal, r["temp_bytes"] / ideal
        a2a, ag = r["collectives"]["all-to-all"], r["collectives"]["all-gather"]
        lines.append(f"| {r['crop']} | {r['blocks']} | {r['remat']} | {r['dap']} | {r['temp_bytes'] / MiB:.0f} MiB | "
                     f"{ideal / MiB:.0f} MiB | {r['ratio_to_ideal']:.2f} | {r['peak_bytes'] / MiB:.0f} MiB | "
                     f"{a2a['count']}, {a2a['bytes'] / MiB:.1f} | {ag['count']}, {ag['bytes'] / MiB:.1f} | "
                     f"{a2a['async_starts'] + ag['async_starts']} |")
    table = "\n".join(lines)
    print(table)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(dict(rows=rows), indent=1))
    (RESULTS / f"{args.out}.md").write_text(table + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for crop in args.crops:
        for policy in args.remat:
            sel = [r for r in rows if r["crop"] == crop and r["remat"] == policy and r["blocks"] == args.blocks[0]]
            if not sel:
                continue
            ax.plot([r["dap"] for r in sel], [r["temp_bytes"] / MiB for r in sel], "o-", label=f"{crop} remat={policy}")
            ax.plot([r["dap"] for r in sel], [r["ideal_temp_bytes"] / MiB for r in sel], "k:", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("DAP degree")
    ax.set_ylabel("activations per device (MiB)")
    ax.set_title("Evoformer under DAP (dotted: ideal 1/N)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.out}.png", dpi=120)


if __name__ == "__main__":
    main()
