"""Activation memory of the protein Transformer under every remat policy and accumulation count.

For a bidirectional protein MLM Transformer (ESM alphabet, masked-token cross entropy) at
several sequence lengths and depths, this compiles one forward+backward step per remat
policy and reads XLA's compiled memory analysis (per-device temporary and peak bytes),
then times the step (median of ``--repeats`` runs after warm-up) as a ratio to ``"none"``
measured in the same run. It checks the ordering none > selective > full at seq >= 512 and
fits, under ``"full"``, the growth of temporary memory with depth against the analytic
size of one block input (batch * seq * embed * bytes). A second table runs gradient
accumulation 1/2/4/8 at a fixed global batch. A third table compiles the whole no-remat
train step (AdamW, unscanned layers) of a causal Transformer (4 layers, width 256, MLP 1024,
4 heads, seq 512, batch 2) once with ``attention="xla"`` and once with a plain
einsum-softmax-einsum attention written here, and compares their temporaries. It prints
markdown tables and writes JSON and a PNG under ``benchmarks/results/``.

Host offload ("offload:..." policies) is compiled to plain copies on CPU, so its CPU
numbers show no saving; on a GPU run of the same script (the device is printed next to
every table) they do.

    python benchmarks/activation_memory.py                        # CPU, ~10-20 minutes
    python benchmarks/activation_memory.py --seq 256 512 --no-time  # memory only, quicker
    python benchmarks/activation_memory.py --attention-only         # the xla vs plain table only
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sciscale_jax import attention, remat
from sciscale_jax.accumulate import accumulate_gradients
from sciscale_jax.models.transformer import Transformer, TransformerConfig
from sciscale_jax.train.step import init_train_state, make_train_step

VOCAB = 33  # ESM-2 alphabet size
POLICIES = ("none", "selective", "full", "dots", "dots_no_batch", "every_k:2", "offload:qkv,mlp_hidden")
RESULTS = pathlib.Path(__file__).parent / "results"


def mlm_loss(model, batch):
    """Cross entropy over the masked positions only (token-averaged)."""
    logits = model(batch["tokens"])
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    w = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def make_batch(batch: int, seq: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, VOCAB, (batch, seq)).astype(np.int32)
    return {"tokens": jnp.asarray(tokens), "targets": jnp.asarray(tokens),
            "loss_mask": jnp.asarray(rng.random((batch, seq)) < 0.15)}


def make_step(cfg: TransformerConfig, num_microbatches: int = 1):
    """(jitted grad step, params state); the step returns loss and float32 grads."""
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    loss = lambda st, b: mlm_loss(nnx.merge(graphdef, st), b)  # noqa: E731
    if num_microbatches == 1:
        step = jax.value_and_grad(loss)
    else:
        step = lambda st, b: accumulate_gradients(  # noqa: E731
            loss, st, b, num_microbatches, weight_fn=lambda mb: jnp.sum(mb["loss_mask"]))
    return jax.jit(step), state


def measure(step, state, batch, repeats: int, time_it: bool) -> dict:
    compiled = step.lower(state, batch).compile(remat.compiler_options())  # as the train loop compiles
    mem = compiled.memory_analysis()
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes)
    out = {"temp_bytes": int(mem.temp_size_in_bytes), "peak_bytes": int(peak)}
    if time_it:
        jax.block_until_ready(compiled(state, batch))  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(state, batch))
            times.append(time.perf_counter() - t0)
        out["step_s"] = statistics.median(times)
    return out


def run_policies(args) -> list[dict]:
    rows = []
    for depth in args.depths:
        for seq in args.seq:
            batch = make_batch(args.batch, seq)
            for policy in args.policies:
                cfg = TransformerConfig(vocab_size=VOCAB, num_layers=depth, num_heads=args.heads,
                                        embed_dim=args.embed, mlp_dim=4 * args.embed, max_len=max(args.seq),
                                        scan_layers=True, remat=policy)
                step, state = make_step(cfg)
                row = {"depth": depth, "seq": seq, "policy": policy,
                       **measure(step, state, batch, args.repeats, not args.no_time)}
                rows.append(row)
                print(f"  depth={depth} seq={seq} {policy:<24} temp={row['temp_bytes'] / 2**20:8.1f} MiB"
                      + (f"  {row['step_s'] * 1e3:8.1f} ms" if "step_s" in row else ""), flush=True)
    for row in rows:  # ratios to "none" at the same depth and length, measured in this run
        base = next(r for r in rows if r["depth"] == row["depth"] and r["seq"] == row["seq"]
                    and r["policy"] == "none")
        row["peak_vs_none"] = row["peak_bytes"] / base["peak_bytes"]
        if "step_s" in row:
            row["time_vs_none"] = row["step_s"] / base["step_s"]
    return rows


def run_accumulation(args) -> list[dict]:
    seq, rows = args.accum_seq, []
    cfg = TransformerConfig(vocab_size=VOCAB, num_layers=max(args.depths), num_heads=args.heads,
                            embed_dim=args.embed, mlp_dim=4 * args.embed, max_len=seq, scan_layers=True)
    batch = make_batch(args.accum_batch, seq)
    for n in (1, 2, 4, 8):
        step, state = make_step(cfg, n)
        row = {"microbatches": n, "global_batch": args.accum_batch, "seq": seq,
               **measure(step, state, batch, args.repeats, not args.no_time)}
        rows.append(row)
        print(f"  accumulation {n}: temp={row['temp_bytes'] / 2**20:8.1f} MiB", flush=True)
    for row in rows:
        row["peak_vs_1"] = row["peak_bytes"] / rows[0]["peak_bytes"]
        if "step_s" in row:
            row["time_vs_1"] = row["step_s"] / rows[0]["step_s"]
    return rows


def plain_attention(q_bqhd, k_bkhd, v_bkhd, *, bias=None, mask=None, causal=False, scale=None):
    """The textbook baseline: einsum, softmax, einsum, left to autodiff (equal q and kv heads)."""
    q_len, kv_len = q_bqhd.shape[1], k_bkhd.shape[1]
    scale = q_bqhd.shape[-1] ** -0.5 if scale is None else scale
    logits_bhqk = jnp.einsum("bqhd,bkhd->bhqk", q_bqhd, k_bkhd) * scale
    if bias is not None:
        logits_bhqk = logits_bhqk + bias
    valid = jnp.ones((q_len, kv_len), bool) if mask is None else mask
    if causal:
        valid = valid & jnp.tril(jnp.ones((q_len, kv_len), bool), k=kv_len - q_len)
    probs_bhqk = jax.nn.softmax(jnp.where(valid, logits_bhqk, jnp.finfo(logits_bhqk.dtype).min), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs_bhqk, v_bkhd)


def causal_lm_loss(model, batch, key):
    """(sum, count) of next-token cross entropies over real tokens."""
    tokens, real = batch["inputs"], batch["mask"]
    logp = jax.nn.log_softmax(model(tokens, mask_bs=real, dropout_key=key)[:, :-1].astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    w = (real[:, 1:] & real[:, :-1]).astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(w)


def train_step_memory(impl: str, *, layers=4, embed=256, mlp=1024, heads=4, seq=512, batch=2, policy="none",
                      scan=False, keep_barriers=True) -> dict:
    """Compiled memory of the AdamW train step (as the train loop builds and compiles it) for ``impl``.

    ``keep_barriers=False`` compiles with XLA's default CPU options, which drop the remat barriers."""
    cfg = TransformerConfig(vocab_size=VOCAB, num_layers=layers, num_heads=heads, embed_dim=embed, mlp_dim=mlp,
                            max_len=seq, causal=True, remat=policy, scan_layers=scan, attention=impl)
    tx = optax.adamw(1e-3)
    graphdef, state = init_train_state(Transformer(cfg, rngs=nnx.Rngs(0)), tx)
    step = make_train_step(graphdef, tx, loss_fn=causal_lm_loss)
    tokens = np.random.default_rng(0).integers(4, VOCAB, (batch, seq)).astype(np.int32)
    example = {"inputs": jnp.asarray(tokens), "mask": jnp.ones((batch, seq), bool)}
    options = remat.compiler_options() if keep_barriers else {}
    mem = jax.jit(step, donate_argnums=0).lower(state, example).compile(options).memory_analysis()
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    return {"impl": impl, "temp_bytes": int(mem.temp_size_in_bytes), "peak_bytes": int(peak),
            "layers": layers, "embed": embed, "mlp": mlp, "heads": heads, "seq": seq, "batch": batch,
            "policy": policy, "scan": scan, "keep_barriers": keep_barriers}


def run_path_rows() -> list[dict]:
    """Remat on both layer paths (scanned and unscanned) at the size of issue 11's item 11, with the
    train loop's XLA options and, on CPU, with XLA's defaults (which expand the remat barriers)."""
    variants = (True, False) if jax.default_backend() == "cpu" else (True,)
    rows = []
    for keep in variants:
        for scan in (False, True):
            for policy in ("none", "selective", "full"):
                row = train_step_memory("xla", policy=policy, scan=scan, keep_barriers=keep)
                rows.append(row)
    for row in rows:
        base = next(r for r in rows if (r["scan"], r["keep_barriers"], r["policy"]) ==
                    (row["scan"], row["keep_barriers"], "none"))
        row["temp_vs_none"] = row["temp_bytes"] / base["temp_bytes"]
        print(f"  scan={row['scan']!s:<5} barriers kept={row['keep_barriers']!s:<5} {row['policy']:<9} "
              f"temp={row['temp_bytes'] / 2**20:8.1f} MiB ({row['temp_vs_none']:.2f}x none)", flush=True)
    return rows


def paths_markdown(rows, device) -> str:
    r = rows[0]
    lines = [f"AdamW train step, causal Transformer {r['layers']} layers, embed {r['embed']}, mlp {r['mlp']}, "
             f"{r['heads']} heads, seq {r['seq']}, batch {r['batch']}, xla attention, device: {device}", "",
             "| layers | XLA options | policy | temp MiB | temp / none |", "|---|---|---|---|---|"]
    for r in rows:
        opts = "train loop's (barriers kept)" if r["keep_barriers"] else "XLA defaults"
        lines.append(f"| {'scanned' if r['scan'] else 'unscanned'} | {opts} | {r['policy']} | "
                     f"{r['temp_bytes'] / 2**20:.1f} | {r['temp_vs_none']:.2f} |")
    return "\n".join(lines)


def run_attention_rows() -> list[dict]:
    """Train-step temporaries of attention="xla" against the plain baseline (issue: within 1.1x)."""
    attention.register("plain", plain_attention)
    rows = [train_step_memory(impl) for impl in ("plain", "xla")]
    for row in rows:
        row["temp_vs_plain"] = row["temp_bytes"] / rows[0]["temp_bytes"]
        print(f"  train step, attention={row['impl']:<6} temp={row['temp_bytes'] / 2**20:8.1f} MiB "
              f"({row['temp_vs_plain']:.3f}x plain)", flush=True)
    return rows


def attention_markdown(rows, device) -> str:
    r = rows[0]
    lines = [f"No-remat AdamW train step, causal Transformer {r['layers']} layers, embed {r['embed']}, "
             f"mlp {r['mlp']}, {r['heads']} heads, seq {r['seq']}, batch {r['batch']}, device: {device}", "",
             "| attention | temp MiB | peak MiB | temp / plain |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['impl']} | {r['temp_bytes'] / 2**20:.1f} | {r['peak_bytes'] / 2**20:.1f} | "
                     f"{r['temp_vs_plain']:.3f} |")
    return "\n".join(lines)


def checks(rows, args) -> dict:
    """Ordering none > selective > full at seq >= 512; per-layer temp slope under "full"."""
    out = {"ordering_none_gt_selective_gt_full": {}, "full_slope": {}}
    get = lambda d, s, p: next((r for r in rows if (r["depth"], r["seq"], r["policy"]) == (d, s, p)), None)  # noqa: E731
    for d in args.depths:
        for s in args.seq:
            trio = [get(d, s, p) for p in ("none", "selective", "full")]
            if s >= 512 and all(trio):
                peaks = [r["peak_bytes"] for r in trio]
                out["ordering_none_gt_selective_gt_full"][f"depth={d},seq={s}"] = peaks[0] > peaks[1] > peaks[2]
    d0, d1 = min(args.depths), max(args.depths)
    for s in args.seq:
        a, b = get(d0, s, "full"), get(d1, s, "full")
        if a and b and d1 > d0:
            slope = (b["temp_bytes"] - a["temp_bytes"]) / (d1 - d0)
            block_input = args.batch * s * args.embed * 4  # float32 residual stream
            out["full_slope"][f"seq={s}"] = {"temp_bytes_per_layer": slope, "block_input_bytes": block_input,
                                             "ratio": slope / block_input}
    return out


def markdown(rows, accum, device) -> str:
    timed = "time_vs_none" in rows[0]
    head = "| depth | seq | policy | temp MiB | peak MiB | peak / none |" + (" time / none |" if timed else "")
    lines = [f"Remat policies, device: {device}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (f"| {r['depth']} | {r['seq']} | {r['policy']} | {r['temp_bytes'] / 2**20:.1f} | "
                f"{r['peak_bytes'] / 2**20:.1f} | {r['peak_vs_none']:.3f} |")
        lines.append(line + (f" {r['time_vs_none']:.2f} |" if timed else ""))
    if accum:
        lines += ["", f"Gradient accumulation at global batch {accum[0]['global_batch']}, "
                      f"seq {accum[0]['seq']}, device: {device}", "",
                  "| microbatches | temp MiB | peak MiB | peak / 1 |" + (" time / 1 |" if timed else ""),
                  "|---|---|---|---|" + ("---|" if timed else "")]
        for r in accum:
            lines.append(f"| {r['microbatches']} | {r['temp_bytes'] / 2**20:.1f} | {r['peak_bytes'] / 2**20:.1f} | "
                         f"{r['peak_vs_1']:.3f} |" + (f" {r['time_vs_1']:.2f} |" if timed else ""))
    return "\n".join(lines)


def plot(rows, args, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(args.depths), figsize=(5 * len(args.depths), 4), squeeze=False)
    for ax, depth in zip(axes[0], args.depths):
        for policy in args.policies:
            pts = [(r["seq"], r["peak_bytes"] / 2**20) for r in rows if r["depth"] == depth and r["policy"] == policy]
            ax.plot(*zip(*pts), marker="o", label=policy)
        ax.set(title=f"depth {depth}", xlabel="sequence length", ylabel="compiled peak MiB", xscale="log")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"activation memory per remat policy ({jax.devices()[0].device_kind})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--depths", type=int, nargs="+", default=[2, 4])
    p.add_argument("--policies", nargs="+", default=list(POLICIES))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--embed", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--accum-batch", type=int, default=8)
    p.add_argument("--accum-seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-time", action="store_true", help="memory only")
    p.add_argument("--no-accum", action="store_true")
    p.add_argument("--no-attention", action="store_true", help="skip the xla vs plain attention table")
    p.add_argument("--attention-only", action="store_true", help="only the xla vs plain attention table")
    p.add_argument("--paths-only", action="store_true", help="only remat on scanned and unscanned layers")
    p.add_argument("--out", default=str(RESULTS / "activation_memory"))
    args = p.parse_args()
    if "none" not in args.policies:
        args.policies.insert(0, "none")
    device = f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}"
    if args.paths_only:
        rows = run_path_rows()
        print(paths_markdown(rows, device))
        out = pathlib.Path(args.out + "_paths.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"device": device, "remat_paths": rows}, indent=1))
        print(f"wrote {out}")
        return
    attn = [] if args.no_attention else run_attention_rows()
    if args.attention_only:
        print(attention_markdown(attn, device))
        out = pathlib.Path(args.out + "_attention.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"device": device, "train_step_attention": attn}, indent=1))
        print(f"wrote {out}")
        return
    rows = run_policies(args)
    accum = [] if args.no_accum else run_accumulation(args)
    result = {"device": device, "args": vars(args), "policies": rows, "accumulation": accum,
              "train_step_attention": attn,
              "checks": checks(rows, args),
              "note": "CPU compiles host offload to copies: offload rows save nothing on CPU."}
    print(markdown(rows, accum, device))
    if attn:
        print(attention_markdown(attn, device))
    print(json.dumps(result["checks"], indent=1))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    try:
        plot(rows, args, out.with_suffix(".png"))
    except ImportError:
        print("matplotlib missing: no plot")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
