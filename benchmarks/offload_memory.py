"""Device memory saved by ZeRO-Offload placement of optimizer state and master parameters.

For the protein MLM Transformer trained with AdamW, this builds the train step of
``sciscale_jax.parallel.offload.make_offloaded_step`` for each placement ("opt_state",
"params", both, and "opt_state" with the update run on the host) and the same step with
everything on the device, then reports:

- the compiled step's memory analysis: device argument bytes, host argument bytes, device
  temporary bytes and device peak (arguments + outputs + temporaries - aliased);
- the bytes the device holds between steps for this run's state (``device.memory_stats()["bytes_in_use"]`` after
  placing the state; accelerators only, CPU reports none);
- the memory kind of every state leaf after a step (must stay where it was asked);
- the median step time as a ratio to the on-device step measured in the same run;
- the largest difference of the parameters from the on-device run after ``--steps`` steps
  (offload moves bytes, it must not change the result).

On CPU host and device are the same RAM and XLA compiles the transfers to copies, so only
the placement checks mean anything there; the bytes come from a GPU run.

    python benchmarks/offload_memory.py --quick                 # CPU, under a minute
    python benchmarks/offload_memory.py --out $OUT/offload_memory  # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sciscale_jax.models.transformer import Transformer, TransformerConfig
from sciscale_jax.parallel import offload

# benchmarks/ is on sys.path when run as python benchmarks/offload_memory.py
from activation_memory import VOCAB, make_batch, mlm_loss
from timing import median_seconds

RESULTS = pathlib.Path(__file__).parent / "results"
VARIANTS = (("device", frozenset(), False), ("device, again", frozenset(), False),
            ("opt_state", {"opt_state"}, False),
            ("params", {"params"}, False), ("opt_state,params", {"opt_state", "params"}, False),
            ("opt_state on host", {"opt_state"}, True))


def device_bytes_in_use():
    stats = jax.devices()[0].memory_stats()
    return None if not stats else int(stats.get("bytes_in_use", 0))


def on_device_step(loss_fn, tx, params, compute_dtype):
    """The reference: everything on the device, same arithmetic as the offloaded step."""
    opt_state = jax.jit(tx.init)(params)

    def step(params, opt_state, batch):
        p_compute = params if compute_dtype is None else jax.tree.map(
            lambda p: p.astype(compute_dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
        loss, grads = jax.value_and_grad(loss_fn)(p_compute, batch)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return params, opt_state, jax.jit(step, donate_argnums=(0, 1))


def kinds(tree) -> list[str]:
    return sorted({leaf.sharding.memory_kind for leaf in jax.tree.leaves(tree)})


def run(args) -> dict:
    cfg = TransformerConfig(vocab_size=VOCAB, num_layers=args.depth, num_heads=args.heads,
                            embed_dim=args.embed, mlp_dim=4 * args.embed, max_len=args.seq,
                            scan_layers=True, remat=args.remat)
    graphdef, init_state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    loss_fn = lambda st, b: mlm_loss(nnx.merge(graphdef, st), b)  # noqa: E731
    tx = optax.adamw(1e-4)
    batches = [make_batch(args.batch, args.seq, seed=s) for s in range(args.steps)]
    compute_dtype = jnp.bfloat16 if args.bf16 else None
    n_params = sum(x.size for x in jax.tree.leaves(init_state))
    rows, reference = [], None
    for name, targets, on_host in VARIANTS:
        if not name.startswith("device") and not args.host_ok:
            continue
        before = device_bytes_in_use()  # nothing of an earlier variant is alive here
        fresh = jax.tree.map(jnp.copy, init_state)
        try:
            if targets:
                params, opt_state, step = offload.make_offloaded_step(
                    loss_fn, tx, fresh, offload=targets, on_host=on_host, compute_dtype=compute_dtype)
            else:
                params, opt_state, step = on_device_step(loss_fn, tx, fresh, compute_dtype)
            del fresh
            jax.block_until_ready((params, opt_state))
            resident = device_bytes_in_use()
            mem = step.lower(params, opt_state, batches[0]).compile().memory_analysis()
            for b in batches:
                params, opt_state, loss = step(params, opt_state, b)
            jax.block_until_ready(params)
            row = {"variant": name, "device_arg_bytes": int(mem.argument_size_in_bytes),
                   "host_arg_bytes": int(mem.host_argument_size_in_bytes),
                   "device_temp_bytes": int(mem.temp_size_in_bytes),
                   "device_peak_bytes": int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                            + mem.temp_size_in_bytes - mem.alias_size_in_bytes),
                   "resident_device_bytes": None if resident is None or before is None else resident - before,
                   "params_kinds": kinds(params), "opt_state_kinds": kinds(opt_state),
                   "final_loss": float(loss)}
            final = jax.device_get(params)  # after --steps steps, before the timed ones
            if reference is None:
                reference = final
            row["max_param_diff_vs_device"] = float(max(
                np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
                for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(reference))))
            if args.time:
                holder = {"p": params, "s": opt_state}

                def one():
                    holder["p"], holder["s"], out = step(holder["p"], holder["s"], batches[0])
                    return out
                row["step_s"] = median_seconds(one, (), args.repeats)
                params, opt_state = holder.pop("p"), holder.pop("s")
                del one
        except Exception as e:  # noqa: BLE001 -- record what the backend refused and go on
            row = {"variant": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        params = opt_state = step = None
    base = rows[0]
    for r in rows:
        if "step_s" in r and "step_s" in base:
            r["time_vs_device"] = r["step_s"] / base["step_s"]
    return {"device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
            "params": int(n_params), "args": vars(args), "rows": rows,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "note": "timed steps after --steps training steps; params diff measured before timing; "
                    "'device, again' repeats the on-device run: its diff is the run-to-run noise floor"}


def markdown(result) -> str:
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
    lines = [f"ZeRO-Offload placement, AdamW, {result['params'] / 1e6:.1f}M parameters, "
             f"device: {result['device']}", "",
             "| kept on host | device args MiB | host args MiB | device temp MiB | device peak MiB | "
             "resident device MiB | time / device | max param diff |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | error: {r['error']} |||||||")
            continue
        t = f"{r['time_vs_device']:.2f}" if "time_vs_device" in r else "n/a"
        lines.append(f"| {r['variant']} | {mib(r['device_arg_bytes'])} | {mib(r['host_arg_bytes'])} | "
                     f"{mib(r['device_temp_bytes'])} | {mib(r['device_peak_bytes'])} | "
                     f"{mib(r['resident_device_bytes'])} | {t} | {r['max_param_diff_vs_device']:.1e} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--embed", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--remat", default="full")
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute copy of float32 master params")
    p.add_argument("--no-time", dest="time", action="store_false")
    p.add_argument("--quick", action="store_true", help="tiny model (CPU check of the script)")
    p.add_argument("--out", default=str(RESULTS / "offload_memory"))
    args = p.parse_args()
    if args.quick:
        args.depth, args.embed, args.heads, args.seq, args.batch, args.repeats = 2, 64, 4, 64, 2, 3
    try:
        offload.check_host_memory()
        args.host_ok = True
    except ValueError as e:
        print(e)
        args.host_ok = False
    result = run(args)
    print(markdown(result))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
