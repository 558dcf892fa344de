"""Per-device memory of AlphaFold 2's Evoformer under Dynamic Axial Parallelism (FastFold).

For an Evoformer block or stack at monomer sizes (c_m 256, c_z 128) and a crop N_seq x N_res,
this compiles the forward + backward pass (gradients of the parameters, batch 1, no dropout key)
on a mesh with a ``dap`` axis of 1, 2, 4 and 8 devices and reads XLA's compiled memory analysis
per device: temporaries (activations) and the peak, next to the ideal DAP-1 activations / N.
Remat variants: ``none``; ``modules`` (each sub-module update checkpointed inside the block,
``remat_modules``); ``block`` (each block checkpointed, ``remat="full"``). By default a single
block runs ``none`` and ``modules``, a stack ``none`` and ``block``. From the compiled HLO it
counts the all-to-all, all-gather and reduce-scatter ops of one step (per block) with their
per-device result bytes, and the asynchronous collectives (``*-start`` / ``async-start`` ops).
Nothing runs (compile only).

Rows merge into ``results/<out>.json`` by (crop, blocks, remat, dap) as each one finishes, so
subsets can run separately; ``--isolate SECONDS`` compiles every row in a child process under a
wall-clock limit (a row past it is recorded as such), ``--report`` only rebuilds the markdown
table and PNG from the JSON.

    nice -n 10 python benchmarks/dap_memory.py --isolate 1500          # everything, 8 simulated CPU devices
    nice -n 10 python benchmarks/dap_memory.py --crops 128x256 --blocks 4 --remat block --degrees 1 8
    python benchmarks/dap_memory.py --report
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
MiB = 2**20
VARIANTS = {"none": dict(remat="none"), "modules": dict(remat="none", remat_modules=True),
            "block": dict(remat="full")}
DEFAULT_REMAT = {1: ("none", "modules")}  # a single block; stacks: ("none", "block")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "s32": 4, "u32": 4, "pred": 1}
_SHAPE = re.compile(r"(f32|bf16|f16|f64|s32|u32|pred)\[([0-9,]*)\]")
_OPS = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")


def collectives(hlo: str) -> dict:
    """Per collective op in compiled HLO text: count, per-device result bytes (all pieces of CPU's
    tuple-shaped all-to-all), and how many are asynchronous (``<op>-start`` or ``async-start``
    wrapping it). Also ``async_lines``: every op of the module whose name says async."""
    out = {}
    lines = [line.split("=", 1)[1] for line in hlo.splitlines() if "=" in line]
    for op in _OPS:
        call = re.compile(rf"\s{op}(-start)?\(")
        count, nbytes, starts = 0, 0, 0
        for rhs in lines:
            found = call.search(rhs)
            if re.search(r"\sasync-start\(", rhs) and op in rhs:
                starts += 1
            if not found:
                continue
            count += 1
            starts += bool(found.group(1))
            for dtype, dims in _SHAPE.findall(rhs[:found.start()]):
                nbytes += int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64)) * _BYTES[dtype]
        out[op] = dict(count=count, bytes=nbytes, async_starts=starts)
    out["async_lines"] = sum(bool(re.search(r"-start\(|async-start|async-done|-done\(", rhs)) for rhs in lines)
    return out


def compile_step(cfg, n_seq: int, n_res: int, degree: int):
    """(memory report, HLO text) of forward + backward of ``EvoformerStack(cfg)`` at batch 1 on dap=degree."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sciscale_jax.memory.measure import report_from_analysis
    from sciscale_jax.models.evoformer import EvoformerStack
    from sciscale_jax.parallel import ParallelConfig, make_mesh
    from sciscale_jax.remat import compiler_options

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


def key(row) -> tuple:
    return row["crop"], row["blocks"], row["remat"], row["dap"]


def load(path: pathlib.Path) -> list:
    return json.loads(path.read_text())["rows"] if path.exists() else []


def merge(path: pathlib.Path, row: dict) -> None:
    """Put ``row`` into the JSON at ``path``, replacing the row with the same key."""
    rows = [r for r in load(path) if key(r) != key(row)] + [row]
    rows.sort(key=lambda r: (r["crop"], r["blocks"], r["remat"], r["dap"]))
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(dict(rows=rows), indent=1))


def measure(crop: str, blocks: int, variant: str, degree: int) -> dict:
    from sciscale_jax.models.evoformer import EvoformerConfig
    n_seq, n_res = (int(x) for x in crop.split("x"))
    cfg = EvoformerConfig(num_blocks=blocks, **VARIANTS[variant])
    t0, c0 = time.perf_counter(), time.process_time()
    report, hlo = compile_step(cfg, n_seq, n_res, degree)
    return dict(crop=crop, blocks=blocks, remat=variant, dap=degree, status="ok", temp_bytes=report.temp_bytes,
                peak_bytes=report.peak_bytes, argument_bytes=report.argument_bytes,
                compile_wall_s=round(time.perf_counter() - t0, 1), compile_cpu_s=round(time.process_time() - c0, 1),
                collectives=collectives(hlo))


def run_isolated(crop, blocks, variant, degree, limit_s, out) -> dict:
    """Compile one row in a child process under a wall-clock limit; a row past it is recorded."""
    cmd = [sys.executable, __file__, "--crops", crop, "--blocks", str(blocks), "--remat", variant,
           "--degrees", str(degree), "--out", out, "--no-report"]
    t0 = time.perf_counter()
    try:
        subprocess.run(cmd, check=True, timeout=limit_s, stdout=subprocess.DEVNULL)  # the parent prints the row
        return next(r for r in load(RESULTS / f"{out}.json") if key(r) == (crop, blocks, variant, degree))
    except subprocess.TimeoutExpired:
        status = f"not compiled: over the {limit_s} s limit (wall clock, shared 2-core host)"
    except subprocess.CalledProcessError as err:
        status = f"failed: exit {err.returncode}"
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    row = dict(crop=crop, blocks=blocks, remat=variant, dap=degree, status=status,
               compile_wall_s=round(time.perf_counter() - t0, 1), children_cpu_s_so_far=round(cpu, 1))
    merge(RESULTS / f"{out}.json", row)
    return row


def report(path: pathlib.Path) -> str:
    """Markdown table (and PNG) from the rows in ``path``."""
    rows = load(path)
    ok = {key(r): r for r in rows if r["status"] == "ok"}
    lines = ["Evoformer forward + backward per device under DAP (XLA compiled memory analysis, 8 simulated "
             "CPU devices, batch 1, monomer sizes c_m 256 / c_z 128, no dropout key). activations = temporaries; "
             "ideal = DAP-1 activations / N; collectives are per block (one training step's forward + backward "
             "divided by the number of blocks), bytes = result bytes per device.", "",
             "| crop | blocks | remat | DAP | activations | ideal | ratio | peak | all-to-all / block (count, MiB) | "
             "all-gather / block (count, MiB) | async collectives | compile (CPU s) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['crop']} | {r['blocks']} | {r['remat']} | {r['dap']} | {r['status']} "
                         "| | | | | | | |")
            continue
        base = ok.get((r["crop"], r["blocks"], r["remat"], 1))
        ideal = base["temp_bytes"] / r["dap"] if base else float("nan")
        r["ideal_temp_bytes"], r["ratio_to_ideal"] = ideal, r["temp_bytes"] / ideal
        c, n = r["collectives"], r["blocks"]
        a2a, ag = c["all-to-all"], c["all-gather"]
        asyncs = sum(c[op]["async_starts"] for op in _OPS)
        lines.append(f"| {r['crop']} | {n} | {r['remat']} | {r['dap']} | {r['temp_bytes'] / MiB:,.0f} MiB | "
                     f"{ideal / MiB:,.0f} MiB | {r['ratio_to_ideal']:.2f} | {r['peak_bytes'] / MiB:,.0f} MiB | "
                     f"{a2a['count'] / n:g}, {a2a['bytes'] / n / MiB:.1f} | {ag['count'] / n:g}, "
                     f"{ag['bytes'] / n / MiB:.1f} | {asyncs} | {r.get('compile_cpu_s', float('nan')):.0f} |")
    table = "\n".join(lines)
    path.with_suffix(".md").write_text(table + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return table
    crops = sorted({r["crop"] for r in ok.values()})
    fig, axes = plt.subplots(1, len(crops), figsize=(5.5 * len(crops), 4), squeeze=False)
    for ax, crop in zip(axes[0], crops):
        for blocks, variant in sorted({(r["blocks"], r["remat"]) for r in ok.values() if r["crop"] == crop}):
            sel = sorted((r for r in ok.values() if (r["crop"], r["blocks"], r["remat"]) == (crop, blocks, variant)),
                         key=lambda r: r["dap"])
            what = "block" if blocks == 1 else f"{blocks}-block stack"
            line, = ax.plot([r["dap"] for r in sel], [r["temp_bytes"] / MiB for r in sel], "o-",
                            label=f"{what}, remat {variant}")
            if sel[0]["dap"] == 1:
                ds = [1, 2, 4, 8]
                ax.plot(ds, [sel[0]["temp_bytes"] / MiB / d for d in ds], ":", color=line.get_color(), lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
        ax.set_xlabel("DAP degree")
        ax.set_ylabel("activations per device (MiB)")
        ax.set_title(f"N_seq x N_res = {crop} (dotted: ideal 1/N)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", nargs="+", default=["128x256", "128x384"], help="N_seq x N_res")
    parser.add_argument("--blocks", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--degrees", nargs="+", type=int, default=[1, 8, 2, 4])
    parser.add_argument("--remat", nargs="+", choices=sorted(VARIANTS), default=None,
                        help="default: none and modules for one block, none and block for a stack")
    parser.add_argument("--out", default="dap_memory")
    parser.add_argument("--isolate", type=int, default=0, metavar="SECONDS",
                        help="compile each row in a child process with this wall-clock limit")
    parser.add_argument("--skip-done", action="store_true", help="skip rows already in the JSON (status ok)")
    parser.add_argument("--report", action="store_true", help="only rebuild the table and plot from the JSON")
    parser.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    path = RESULTS / f"{args.out}.json"
    if not args.report:
        for crop in args.crops:
            for blocks in args.blocks:
                for variant in args.remat or DEFAULT_REMAT.get(blocks, ("none", "block")):
                    for degree in args.degrees:
                        done = {key(r) for r in load(path) if r["status"] == "ok"}
                        if args.skip_done and (crop, blocks, variant, degree) in done:
                            continue
                        if args.isolate:
                            row = run_isolated(crop, blocks, variant, degree, args.isolate, args.out)
                        else:
                            row = measure(crop, blocks, variant, degree)
                            merge(path, row)
                        if row["status"] == "ok":
                            c = row["collectives"]
                            print(f"{crop} blocks={blocks} remat={variant} dap={degree}: temp "
                                  f"{row['temp_bytes'] / MiB:,.1f} MiB peak {row['peak_bytes'] / MiB:,.1f} MiB "
                                  f"all-to-all {c['all-to-all']['count']} all-gather {c['all-gather']['count']} "
                                  f"async {sum(c[op]['async_starts'] for op in _OPS)} "
                                  f"compile {row['compile_cpu_s']} CPU s / {row['compile_wall_s']} s", flush=True)
                        else:
                            print(f"{crop} blocks={blocks} remat={variant} dap={degree}: {row['status']}", flush=True)
    if not args.no_report:
        print(report(path))


if __name__ == "__main__":
    main()
