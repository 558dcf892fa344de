"""Per-device peak memory of protein-mlm's real train step with a pipeline axis (compile only).

The recipe's default Transformer (4 layers, width 128, sequence 128; stacked layers) on
``pipeline=4, data=2`` (8 simulated CPU devices), built as ``sciscale train`` builds it
(placement, rule tables, AdamW, the pipeline ``grad_fn`` of ``train.pipeline``), for 1F1B and
GPipe at m = 4 and 16 microbatches of a fixed size (8 rows, 4 per data shard), so the batch
grows with m. Memory is XLA's compiled memory analysis per device, compiled with the
loop's XLA options; nothing runs.

    python benchmarks/pipeline_train.py   # table + results/pipeline_train.{json,md}
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import json  # noqa: E402
import pathlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from sciscale_jax import parallel, remat  # noqa: E402
from sciscale_jax.memory import report_from_analysis  # noqa: E402
from sciscale_jax.recipes import get_recipe  # noqa: E402
from sciscale_jax.train import (TrainConfig, build_optimizer, init_train_state, make_train_step,  # noqa: E402
                                plan_placement)
from sciscale_jax.train import pipeline as pipeline_run  # noqa: E402

MESH, ROWS, SEQ = "pipeline=4,data=2", 8, 128
OUT = pathlib.Path(__file__).parent / "results"


def batch_of(size: int, vocab: int) -> dict:
    rng = np.random.default_rng(0)
    return {"inputs": rng.integers(4, vocab, (size, SEQ)).astype(np.int32),
            "targets": rng.integers(4, vocab, (size, SEQ)).astype(np.int32),
            "weights": (rng.random((size, SEQ)) < 0.15).astype(np.float32),
            "corruption": np.zeros((size, SEQ), np.int32), "mask": np.ones((size, SEQ), bool)}


def peak(schedule: str, m: int) -> dict:
    recipe = get_recipe("protein-mlm")
    model_cfg = recipe.make_config(scan_layers=True, sharding="dp")
    cfg = TrainConfig(batch_size=m * ROWS, seq_len=SEQ, mesh=MESH, pipeline_schedule=schedule, microbatches=m)
    pipeline_run.check_run(recipe, model_cfg, cfg)
    model = recipe.build_model(model_cfg, nnx.Rngs(0))
    tx = build_optimizer(cfg)
    axes = parallel.param_axes(model)
    graphdef, state = init_train_state(model, tx)
    batch = batch_of(cfg.batch_size, model_cfg.vocab_size)
    place = plan_placement(cfg.mesh, None, 0, state, axes, tx, batch, model_sharding="dp", batch_axes=recipe.axes_of,
                           rule_overrides=pipeline_run.rule_overrides(recipe, cfg, state.params))
    grad_fn = pipeline_run.grad_fn(recipe, model_cfg, cfg, graphdef, place)
    step = make_train_step(graphdef, tx, loss_fn=recipe.loss_fn, grad_fn=grad_fn, **place.step_kwargs())
    state = jax.device_put(state, place.state)
    with jax.set_mesh(place.mesh):
        compiled = jax.jit(step, in_shardings=(place.state, place.batch), out_shardings=(place.state, None),
                           donate_argnums=0).lower(state, jax.device_put(batch, place.batch)).compile(
                               remat.compiler_options())
    report = report_from_analysis(compiled.memory_analysis())
    return {"schedule": schedule, "m": m, "batch": cfg.batch_size, "temp_mib": report.temp_bytes / 2**20,
            "peak_mib": report.peak_bytes / 2**20}


def main():
    rows = []
    for schedule in ("1f1b", "gpipe"):
        for m in (4, 16):
            rows.append(peak(schedule, m))
            print(rows[-1], flush=True)
    lines = ["| schedule | m | batch | temp MiB | peak MiB |", "|---|---|---|---|---|"]
    lines += [f"| {r['schedule']} | {r['m']} | {r['batch']} | {r['temp_mib']:.2f} | {r['peak_mib']:.2f} |"
              for r in rows]
    by = {(r["schedule"], r["m"]): r["peak_mib"] for r in rows}
    lines += [""] + [f"{s}: peak at m=16 / m=4 = {by[(s, 16)] / by[(s, 4)]:.2f}" for s in ("1f1b", "gpipe")]
    text = "\n".join(lines)
    print(text)
    OUT.mkdir(exist_ok=True)
    (OUT / "pipeline_train.json").write_text(json.dumps({"mesh": MESH, "rows_per_microbatch": ROWS, "seq": SEQ,
                                                         "rows": rows}, indent=2))
    (OUT / "pipeline_train.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
