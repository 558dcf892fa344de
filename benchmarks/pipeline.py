"""Pipeline schedules on 8 CPU devices: bubble, per-device memory and step time.

For GPipe, 1F1B, interleaved 1F1B (v = 2) and ZB-H1, with p = 2, 4, 8 stages and m = 4, 8,
16 microbatches of a fixed size, on a residual tanh-MLP stack (one layer of width 256 per
stage, the input projection on the first stage, a squared-error head on the last):

- bubble: idle device-ticks of the executed table against the textbook formula;
- memory: XLA's compiled memory analysis per device (deterministic): temporaries and peak
  (arguments + outputs + temporaries); stage parameters are split over the pipeline axis (in
  device order, ``to_device_layout``), the batch is replicated and counted in the peak;
- time: median of 5 runs after a warm-up, as a ratio to the same model's gradient on one
  device without a pipeline, measured in the same process. The 8 "devices" share the host's
  CPU cores, so the ratio shows the executor's overhead, not a pipeline speed-up, and is
  noisy when the machine is shared.

    python benchmarks/pipeline.py          # table + results/pipeline.{json,md,png}
    python benchmarks/pipeline.py --quick  # p = 2, 4 and m = 4, 16 only
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sciscale_jax.memory import report_from_analysis  # noqa: E402
from sciscale_jax.parallel import ParallelConfig, make_mesh  # noqa: E402
from sciscale_jax.parallel.pipeline import from_device_layout, pipeline_value_and_grad, to_device_layout  # noqa: E402
from sciscale_jax.parallel.pipeline_schedule import analytic_bubble, make_schedule  # noqa: E402

D_IN, D, D_OUT, ROWS = 8, 256, 8, 64  # ROWS: rows per microbatch
SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zbh1", 1))
RESULTS = pathlib.Path(__file__).parent / "results"


def first_fn(w, b):
    return jnp.tanh(b["x"] @ w)


def stage_fn(w, h, b=None):
    return h + jnp.tanh(h @ w["w"] + w["b"])


def last_fn(w, h, b):
    return jnp.sum((h @ w - b["y"]) ** 2)


def reference(params, batch):
    h = first_fn(params["first"], batch)
    for s in range(params["stages"]["w"].shape[0]):
        h = stage_fn(jax.tree.map(lambda x: x[s], params["stages"]), h)
    return last_fn(params["last"], h, batch)


def problem(stages, batch_size):
    rng = np.random.default_rng(0)
    def normal(*shape):  # fan-in scaled
        return jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[-2] if len(shape) > 1 else 1), jnp.float32)

    params = {"first": normal(D_IN, D), "stages": {"w": normal(stages, D, D), "b": normal(stages, D) * 0.1},
              "last": normal(D, D_OUT)}
    return params, {"x": normal(batch_size, D_IN), "y": normal(batch_size, D_OUT)}


def median_time(fn, *args, runs=5):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure(name, v, p, m):
    mesh = make_mesh(ParallelConfig(pipeline=p), jax.devices()[:p])
    params, batch = problem(p * v, m * ROWS)
    # stage parameters stored in device order and split over the pipeline axis, as in training
    params["stages"] = to_device_layout(params["stages"], p, v)
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("pipeline"))
    params["stages"] = jax.device_put(params["stages"], shard)
    fn = jax.jit(pipeline_value_and_grad(first_fn, stage_fn, last_fn, mesh=mesh, schedule=name,
                                         microbatches=m, virtual_stages=v, stage_layout="device"))
    compiled = fn.lower(params, batch).compile()
    mem = report_from_analysis(compiled.memory_analysis())
    base = jax.jit(jax.value_and_grad(reference))
    ref_params = {**params, "stages": from_device_layout(jax.device_get(params["stages"]), p, v)}
    loss, _ = compiled(params, batch)
    ref_loss, _ = base(ref_params, batch)
    t_pipe, t_base = median_time(compiled, params, batch), median_time(base, ref_params, batch)
    table = make_schedule(name, p, m, v)
    return {"schedule": name, "virtual_stages": v, "stages": p, "microbatches": m, "ticks": table.num_ticks,
            "bubble": table.bubble_fraction(), "bubble_analytic": analytic_bubble(name, p, m, v),
            "stash_slots": table.stash()[2], "temp_bytes": mem.temp_bytes, "peak_bytes": mem.peak_bytes,
            "time_s": t_pipe, "baseline_time_s": t_base, "time_ratio": t_pipe / t_base,
            "loss_rel_err": abs(float(loss) - float(ref_loss)) / abs(float(ref_loss))}


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ps = sorted({r["stages"] for r in rows})
    fig, axes = plt.subplots(2, len(ps), figsize=(4 * len(ps), 7), squeeze=False)
    for j, p in enumerate(ps):
        for name, v in SCHEDULES:
            sel = sorted((r for r in rows if r["schedule"] == name and r["stages"] == p),
                         key=lambda r: r["microbatches"])
            if not sel:
                continue
            ms = [r["microbatches"] for r in sel]
            line, = axes[0][j].plot(ms, [r["bubble"] for r in sel], "o-", label=name)
            axes[0][j].plot(ms, [r["bubble_analytic"] for r in sel], "x--", color=line.get_color())
            axes[1][j].plot(ms, [r["peak_bytes"] / 2 ** 20 for r in sel], "o-", label=name)
        axes[0][j].set_title(f"p = {p}: bubble (o executed, x formula)")
        axes[1][j].set_title(f"p = {p}: peak memory per device")
        axes[1][j].set_ylabel("MiB")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xlabel("microbatches m")
            ax.set_xscale("log", base=2)
            ax.legend(fontsize=8)
    fig.suptitle(f"pipeline schedules, 8 CPU devices, MLP width {D}, {ROWS} rows per microbatch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="p = 2, 4 and m = 4, 16 only")
    args = parser.parse_args()
    ps, ms = ((2, 4), (4, 16)) if args.quick else ((2, 4, 8), (4, 8, 16))
    rows = []
    header = ("| schedule | p | m | ticks | bubble | formula | stash | temp MiB | peak MiB | time / no pipeline |\n"
              "|---|---|---|---|---|---|---|---|---|---|")
    print(header)
    lines = [header]
    for name, v in SCHEDULES:
        for p in ps:
            for m in ms:
                if name == "interleaved" and m % p:
                    continue
                r = measure(name, v, p, m)
                rows.append(r)
                label = name if v == 1 else f"{name} v={v}"
                line = (f"| {label} | {p} | {m} | {r['ticks']} | {r['bubble']:.3f} | {r['bubble_analytic']:.3f} | "
                        f"{r['stash_slots']} | {r['temp_bytes'] / 2 ** 20:.2f} | {r['peak_bytes'] / 2 ** 20:.2f} | "
                        f"{r['time_ratio']:.2f} |")
                print(line, flush=True)
                lines.append(line)
    notes = []
    for name in ("1f1b", "zbh1", "gpipe"):
        for p in ps:
            sel = {r["microbatches"]: r for r in rows if r["schedule"] == name and r["stages"] == p}
            if min(ms) in sel and max(ms) in sel:
                ratio = sel[max(ms)]["peak_bytes"] / sel[min(ms)]["peak_bytes"]
                notes.append(f"{name} p={p}: peak at m={max(ms)} / m={min(ms)} = {ratio:.2f}")
    print("\n".join(notes))
    out = "pipeline_quick" if args.quick else "pipeline"
    RESULTS.mkdir(exist_ok=True)
    meta = {"device": f"{len(jax.devices())} simulated CPU devices ({jax.devices()[0].device_kind})",
            "width": D, "rows_per_microbatch": ROWS, "time": "median of 5 after warm-up; shared CPU, noisy"}
    (RESULTS / f"{out}.json").write_text(json.dumps({"meta": meta, "rows": rows, "notes": notes}, indent=1))
    (RESULTS / f"{out}.md").write_text("\n".join(lines + [""] + notes) + "\n")
    plot(rows, RESULTS / f"{out}.png")


if __name__ == "__main__":
    main()
