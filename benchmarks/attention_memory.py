"""Compiled forward+backward attention memory against sequence length, for every implementation.

For each implementation and sequence length this compiles d(sum of outputs)/d(q, k, v) of
one attention call (nothing runs) and reads XLA's compiled memory analysis: temporary
bytes (what the attention itself needs beyond its inputs and outputs) and peak bytes. It
fits the scaling exponent of temp bytes against length (log-log least squares over
2k..16k) and prints a markdown table; it writes JSON and a log-log PNG under
``benchmarks/results/``. Memory on CPU comes from the compiled analysis, so it is
deterministic. Implementations: xla (reference), chunked (Rabe & Staats), flash (the
Pallas kernel, interpreted on CPU; skipped beyond ``--flash-max``), Linformer (proj_len
256) and Performer (256 features).

    python benchmarks/attention_memory.py                  # 1k..32k, a few minutes on CPU
    python benchmarks/attention_memory.py --max-len 8192   # quicker
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from sciscale_jax.attention import (LinformerAttention, PerformerAttention, chunked_attention,  # noqa: E402
                                    xla_attention)

BATCH, HEADS, HEAD_DIM = 1, 4, 64
PROJ_LEN, NUM_FEATURES = 256, 256
FIT_RANGE = (2048, 16384)


def _flash():
    try:
        from sciscale_jax.kernels.flash_attention import flash_attention
    except ImportError:
        return None
    return flash_attention


def implementations(seq_len: int, causal: bool) -> dict:
    """name -> (fn(params, q, k, v), params); modules' parameters are jit arguments, not constants."""
    impls = {
        "xla": (lambda _, q, k, v: xla_attention(q, k, v, causal=causal), None),
        "chunked": (lambda _, q, k, v: chunked_attention(q, k, v, causal=causal), None),
    }
    flash = _flash()
    if flash is not None:
        impls["flash (interpret)"] = (lambda _, q, k, v: flash(q, k, v, causal=causal, interpret=True), None)
    modules = {"performer": PerformerAttention(HEAD_DIM, NUM_FEATURES, rngs=nnx.Rngs(0))}
    if not causal:  # Linformer cannot honour causal attention
        modules = {"linformer": LinformerAttention(seq_len, PROJ_LEN, rngs=nnx.Rngs(0)), **modules}
    for name, module in modules.items():
        graphdef, state = nnx.split(module)
        impls[name] = (lambda st, q, k, v, g=graphdef: nnx.merge(g, st)(q, k, v, causal=causal), state)
    return impls


def fwd_bwd_memory(fn, params, seq_len: int, dtype=jnp.float32) -> dict:
    """Compiled memory of d(sum out)/d(q, k, v) (and d/d params for Linformer's projections)."""
    spec = jax.ShapeDtypeStruct((BATCH, seq_len, HEADS, HEAD_DIM), dtype)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    trainable = (0, 1, 2, 3) if params is not None and any(
        jnp.issubdtype(x.dtype, jnp.floating) for x in jax.tree.leaves(params)) else (1, 2, 3)
    step = jax.jit(jax.grad(lambda p, q, k, v: fn(p, q, k, v).astype(jnp.float32).sum(), trainable))
    start = time.perf_counter()
    mem = step.lower(params, spec, spec, spec).compile().memory_analysis()
    return {"temp_bytes": int(mem.temp_size_in_bytes), "peak_bytes": int(mem.peak_memory_in_bytes),
            "argument_bytes": int(mem.argument_size_in_bytes), "compile_s": round(time.perf_counter() - start, 2)}


def fitted_exponent(lengths, values, lo=FIT_RANGE[0], hi=FIT_RANGE[1]):
    points = [(n, v) for n, v in zip(lengths, values) if lo <= n <= hi and v > 0]
    if len(points) < 2:
        return None
    n, v = np.array(points, float).T
    return float(np.polyfit(np.log(n), np.log(v), 1)[0])


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, rows in results["impls"].items():
        ns = [r["seq_len"] for r in rows]
        ax.loglog(ns, [r["temp_bytes"] / 2**20 for r in rows], "o-", label=name, base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("fwd+bwd temp memory (MiB)")
    ax.set_title(f"Attention memory, B={BATCH} H={HEADS} D={HEAD_DIM} float32, {results['device']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--min-len", type=int, default=1024)
    parser.add_argument("--max-len", type=int, default=32768)
    parser.add_argument("--flash-max", type=int, default=32768, help="longest length for interpreted flash")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = parser.parse_args()
    lengths = [n for n in (1024, 2048, 4096, 8192, 16384, 32768) if args.min_len <= n <= args.max_len]
    device = f"{jax.devices()[0].platform.upper()} ({jax.devices()[0].device_kind}), compiled memory analysis"
    results = {"device": device, "batch": BATCH, "heads": HEADS, "head_dim": HEAD_DIM, "dtype": "float32",
               "causal": args.causal, "proj_len": PROJ_LEN, "num_features": NUM_FEATURES, "impls": {}}
    for seq_len in lengths:
        for name, (fn, params) in implementations(seq_len, args.causal).items():
            if name.startswith("flash") and seq_len > args.flash_max:
                continue
            row = {"seq_len": seq_len, **fwd_bwd_memory(fn, params, seq_len)}
            results["impls"].setdefault(name, []).append(row)
            print(f"  {name:18s} {seq_len:6d}  temp {row['temp_bytes'] / 2**20:10.1f} MiB  "
                  f"(compile {row['compile_s']} s)", flush=True)
    for name, rows in results["impls"].items():
        results.setdefault("exponents", {})[name] = fitted_exponent(
            [r["seq_len"] for r in rows], [r["temp_bytes"] for r in rows])

    mib = lambda b: f"{b / 2**20:,.1f}"  # noqa: E731
    print(f"\nForward+backward temp memory (MiB), B={BATCH} H={HEADS} D={HEAD_DIM} float32, "
          f"causal={args.causal}; {device}\n")
    print("| impl | " + " | ".join(f"{n // 1024}k" for n in lengths) +
          f" | exponent {FIT_RANGE[0] // 1024}k-{FIT_RANGE[1] // 1024}k |")
    print("|---|" + "---:|" * (len(lengths) + 1))
    for name, rows in results["impls"].items():
        by_len = {r["seq_len"]: r["temp_bytes"] for r in rows}
        cells = " | ".join(mib(by_len[n]) if n in by_len else "-" for n in lengths)
        exponent = results["exponents"][name]
        print(f"| {name} | {cells} | {'-' if exponent is None else f'{exponent:.2f}'} |")
    xla16 = {r["seq_len"]: r["temp_bytes"] for r in results["impls"]["xla"]}.get(16384)
    chunk16 = {r["seq_len"]: r["temp_bytes"] for r in results["impls"]["chunked"]}.get(16384)
    if xla16 and chunk16:
        results["chunked_over_xla_at_16k"] = chunk16 / xla16
        print(f"\nchunked / xla temp memory at 16k: {chunk16 / xla16:.4f}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "attention_memory" + ("_causal" if args.causal else "")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    plot(results, out / f"{stem}.png")
    print(f"\nwrote {out / f'{stem}.json'} and {out / f'{stem}.png'}")


if __name__ == "__main__":
    main()
