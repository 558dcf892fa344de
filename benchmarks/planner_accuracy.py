"""How well ``sciscale_jax.train.estimate`` predicts the compiled train step's peak per device.

For each configuration (four recipes: protein-mlm and smiles-lm Transformers, msa-evoformer,
weather-vit; remat none/selective/full, attention xla/chunked, fp32/bf16, ZeRO 0-3,
data/fsdp/tensor/dap/pipeline meshes on 8 CPU devices, gradient accumulation, optimizer-state
offload, optimizers, the Evoformer's sub-module remat and chunking) the run's train step is built
and compiled as ``sciscale train`` would (``train.abstract.abstract_run``: the loop's own step
builder, placement and jit shardings) and XLA's compiled memory analysis gives the true peak
per device. The estimate's two methods are set beside it: "compile" (two shallow compiled
probes extended in depth, the figure ``sciscale plan`` prints) and "trace" (saved residuals,
the planner's screen).

    python benchmarks/planner_accuracy.py            # all configurations
    python benchmarks/planner_accuracy.py --only 3   # one (its index in the table)
    python benchmarks/planner_accuracy.py --merge a.json b.json   # combine partial runs

Prints a markdown table; writes benchmarks/results/planner_accuracy.json and .md.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import time  # noqa: E402

MiB = 2.0 ** 20
PROTEIN = dict(num_layers=6, embed_dim=128, num_heads=4, mlp_dim=512)
SMILES = dict(num_layers=6, embed_dim=128, num_heads=4, mlp_dim=384)
EVO = dict(num_blocks=4)
WEATHER = dict(num_layers=6, embed_dim=128, num_heads=4, mlp_dim=512)

# (recipe, model overrides, train overrides)
CONFIGS = [
    ("protein-mlm", {}, dict(batch_size=16, seq_len=128, mesh="data=8")),
    ("protein-mlm", dict(remat="selective"), dict(batch_size=16, seq_len=128, mesh="data=8")),
    ("protein-mlm", dict(remat="full"), dict(batch_size=16, seq_len=128, mesh="data=8")),
    ("protein-mlm", dict(attention="chunked"), dict(batch_size=16, seq_len=256, mesh="data=8")),
    ("protein-mlm", dict(precision="bf16"), dict(batch_size=16, seq_len=128, mesh="data=8")),
    ("protein-mlm", {}, dict(batch_size=16, seq_len=128, mesh="data=8", zero=1)),
    ("protein-mlm", {}, dict(batch_size=16, seq_len=128, mesh="data=8", zero=2)),
    ("protein-mlm", {}, dict(batch_size=16, seq_len=128, mesh="data=8", zero=3)),
    ("protein-mlm", {}, dict(batch_size=16, seq_len=128, mesh="fsdp=8")),
    ("protein-mlm", {}, dict(batch_size=8, seq_len=128, mesh="data=2,tensor=4")),
    ("protein-mlm", dict(remat="full", precision="bf16"), dict(batch_size=16, seq_len=128, mesh="data=4,tensor=2")),
    ("protein-mlm", {}, dict(batch_size=32, seq_len=128, mesh="data=8", grad_accum=2)),
    ("protein-mlm", dict(remat="selective", attention="chunked"), dict(batch_size=16, seq_len=256, mesh="fsdp=4,tensor=2")),
    ("protein-mlm", {}, dict(batch_size=16, seq_len=128, mesh="data=8", zero=1, optimizer="adafactor")),
    ("protein-mlm", {}, dict(batch_size=4, seq_len=128, mesh="")),
    ("smiles-lm", {}, dict(batch_size=32, seq_len=64, mesh="data=8")),
    ("smiles-lm", dict(remat="full", attention="chunked"), dict(batch_size=32, seq_len=128, mesh="data=8", zero=3)),
    ("smiles-lm", dict(precision="bf16"), dict(batch_size=32, seq_len=64, mesh="data=4,tensor=2", zero=2)),
    ("msa-evoformer", {}, dict(batch_size=8, seq_len=32, mesh="data=8")),
    ("msa-evoformer", dict(remat="full"), dict(batch_size=8, seq_len=32, mesh="data=8")),
    ("msa-evoformer", dict(remat="selective", precision="bf16"), dict(batch_size=8, seq_len=32, mesh="data=8")),
    ("msa-evoformer", {}, dict(batch_size=8, seq_len=32, mesh="data=8", zero=3)),
    ("msa-evoformer", {}, dict(batch_size=16, seq_len=32, mesh="data=8", grad_accum=2)),
    ("msa-evoformer", dict(remat="full"), dict(batch_size=2, seq_len=48, mesh="")),
    ("weather-vit", {}, dict(batch_size=16, mesh="data=8")),
    ("weather-vit", dict(remat="full", precision="bf16"), dict(batch_size=16, mesh="data=8", zero=3)),
    ("weather-vit", dict(attention="chunked", remat="selective"), dict(batch_size=16, mesh="data=4,tensor=2", zero=1)),
    ("weather-vit", {}, dict(batch_size=32, mesh="fsdp=8", grad_accum=2)),
    ("msa-evoformer", {}, dict(batch_size=2, seq_len=32, mesh="data=2,dap=4")),
    ("msa-evoformer", dict(remat="full"), dict(batch_size=1, seq_len=32, mesh="dap=8")),
    ("protein-mlm", {}, dict(batch_size=16, seq_len=128, mesh="data=8", zero=1, offload="opt_state")),
    ("protein-mlm", dict(scan_layers=True, num_layers=8), dict(batch_size=16, seq_len=128, mesh="pipeline=2,data=4")),
    ("smiles-lm", dict(scan_layers=True, remat="full", num_layers=8),
     dict(batch_size=16, seq_len=64, mesh="pipeline=2,data=4", pipeline_schedule="gpipe", microbatches=4)),
    ("msa-evoformer", dict(remat_modules=True), dict(batch_size=8, seq_len=32, mesh="data=8")),
    ("msa-evoformer", dict(chunk_size=8), dict(batch_size=2, seq_len=48, mesh="")),
]


def model_overrides(recipe: str, extra: dict) -> dict:
    base = {"protein-mlm": PROTEIN, "smiles-lm": SMILES, "msa-evoformer": EVO, "weather-vit": WEATHER}[recipe]
    return {**base, **extra}


def measure(index: int) -> dict:
    import jax

    from sciscale_jax.memory import report_from_analysis
    from sciscale_jax.recipes import get_recipe
    from sciscale_jax.train import TrainConfig
    from sciscale_jax.train.abstract import abstract_run
    from sciscale_jax.train.estimate import estimate

    name, model_kw, train_kw = CONFIGS[index]
    recipe = get_recipe(name)
    model_cfg = recipe.make_config(**model_overrides(name, model_kw))
    train_cfg = TrainConfig(**{**recipe.train_defaults, **train_kw})
    t0 = time.perf_counter()
    est = estimate(recipe, model_cfg, train_cfg, method="compile")
    t1 = time.perf_counter()
    screen = estimate(recipe, model_cfg, train_cfg, method="trace")
    t2 = time.perf_counter()
    compiled = report_from_analysis(abstract_run(recipe, model_cfg, train_cfg).compile().memory_analysis())
    t3 = time.perf_counter()
    # With offload the estimate's peak leaves the host-resident bytes out (as a GPU/TPU does);
    # the CPU backend compiles offload away and counts them on device: add them back to compare.
    host = est.offloaded_bytes if jax.default_backend() == "cpu" else 0
    predicted = est.peak_bytes + host
    label = ", ".join([f"{k}={v}" for k, v in model_kw.items()] + [f"{k}={v}" for k, v in train_kw.items() if v != ""])
    return {"index": index, "recipe": name, "config": label or "defaults", "model": model_overrides(name, model_kw),
            "train": train_kw, "compiled_peak": compiled.peak_bytes, "estimate": est.as_dict(),
            "predicted_peak": predicted, "trace_peak": screen.peak_bytes + host, "host_added": host,
            "error": predicted / compiled.peak_bytes - 1, "trace_error": (screen.peak_bytes + host) / compiled.peak_bytes - 1,
            "seconds_estimate": t1 - t0, "seconds_trace": t2 - t1, "seconds_compile": t3 - t2}


def table(rows) -> str:
    lines = ["| # | recipe | configuration (8 CPU devices) | probe depths | compiled MiB | predicted MiB | error | "
             "trace MiB | trace error | dominant |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dom = max(("parameters", r["estimate"]["params_bytes"]), ("gradients", r["estimate"]["grads_bytes"]),
                  ("optimizer state", r["estimate"]["opt_state_bytes"]),
                  ("activations", r["estimate"]["activation_bytes"]), key=lambda kv: kv[1])[0]
        probes = "/".join(str(d) for d, _ in r["estimate"]["compiled_probes"])
        depth = r["estimate"]["num_layers"]
        lines.append(f"| {r['index']} | {r['recipe']} | {r['config']} | {probes} of {depth} | "
                     f"{r['compiled_peak'] / MiB:.2f} | "
                     f"{r['predicted_peak'] / MiB:.2f} | {100 * r['error']:+.1f}% | {r['trace_peak'] / MiB:.2f} | "
                     f"{100 * r['trace_error']:+.1f}% | {dom} |")
    worst = max(rows, key=lambda r: abs(r["error"]))
    worst_t = max(rows, key=lambda r: abs(r["trace_error"]))
    lines.append("")
    carried = [str(r["index"]) for r in rows if r.get("carried")]
    if carried:
        lines.append(f"Rows #{', #'.join(carried)} come from an earlier run of this script (before the probe depths "
                     "under remat and pipelines changed; these rows use neither, so their estimate is computed the "
                     "same way now).")
    if any(r.get("host_added") for r in rows):
        lines.append("Offload rows: the CPU backend compiles host offload away and counts the offloaded bytes on "
                     "device, so they are added back to the prediction here (on GPU/TPU the estimate's peak leaves "
                     "them out).")
    lines.append(f"worst predicted error {100 * worst['error']:+.1f}% (#{worst['index']}, {worst['recipe']}, "
                 f"{worst['config']}); worst trace-screen error {100 * worst_t['trace_error']:+.1f}% "
                 f"(#{worst_t['index']}); {len(rows)} configurations")
    return "\n".join(lines)


def main():
    import indexed_rows

    indexed_rows.main(__doc__.splitlines()[0], "benchmarks/results/planner_accuracy", len(CONFIGS), measure, table,
                      "8 simulated CPU devices (XLA host platform)",
                      progress=lambda row: f"#{row['index']} {row['recipe']} {row['config']}: compiled "
                      f"{row['compiled_peak'] / MiB:.2f} MiB, predicted {row['predicted_peak'] / MiB:.2f} "
                      f"({100 * row['error']:+.1f}%), trace {100 * row['trace_error']:+.1f}%")


if __name__ == "__main__":
    main()
