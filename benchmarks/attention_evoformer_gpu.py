"""The Evoformer's attention calls one by one on a GPU: which implementation is fastest for each.

AlphaFold 2's Evoformer block attends in three shapes, all at head_dim 32 (c = 32); at crop
(N_seq, N_res) they are, as ``sciscale_jax.models.evoformer_modules.row_attention`` hands them
to the front door (the rows folded into the batch, the pair bias shared by the rows):
  msa_row     N_seq rows of N_res keys, 8 heads, pair bias [1, 8, N_res, N_res], key mask [N_seq, 1, 1, N_res]
  msa_column  N_res columns of N_seq keys, 8 heads, key mask [N_res, 1, 1, N_seq], no bias
  triangle    N_res rows of N_res keys, 4 heads, pair bias [1, 4, N_res, N_res], key mask [N_res, 1, 1, N_res]
              (starting and ending node alike: the ending node attends the transposed pair)
Key masks keep a random 75-100% prefix of each row's keys (padding as in a cropped batch).
Each runs through ``dot_product_attention(impl=...)``: forward, and forward+backward (gradients
of q, k, v and the bias). Error: max |x - ref| against float32 XLA attention at full matmul
precision on the same bf16 inputs. FLOPs: forward 4*B*H*Q*K*D, backward 2.5x forward.

``--sm90-sweep`` also times the sm90 kernels directly (``kernels/flash_attention_sm90.py``) at
each shape: the forward at every (block_kv, stages) candidate, with and without the
log-sum-exp output, and the backward kernels alone at each stages candidate, unfused and fused
(dQ from the dK/dV kernel), so a slow pass can be told from a slow configuration. ``--impls``
also takes ``sm90_fused``: the front door's sm90 with the fused backward.

    python benchmarks/attention_evoformer_gpu.py --out benchmarks/results --impls flash,sm90,tokamax,xla --sm90-sweep
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention_gpu import _vjp as _grads  # noqa: E402  (gradients of f(q, k, v, bias) along dO)
from timing import median_seconds  # noqa: E402  (benchmarks/timing.py)

from sciscale_jax.attention import dot_product_attention  # noqa: E402

HEAD_DIM = 32


def shapes(n_seq: int, n_res: int) -> dict:
    """name -> (batch, seq, heads, biased): the Evoformer's attention calls at this crop."""
    return {"msa_row": (n_seq, n_res, 8, True), "msa_column": (n_res, n_seq, 8, False),
            "triangle": (n_res, n_res, 4, True)}


def inputs(batch, seq, heads, biased, seed=0):
    r = np.random.default_rng(seed)
    q, k, v, do = (jnp.asarray(r.normal(size=(batch, seq, heads, HEAD_DIM)), jnp.bfloat16) for _ in range(4))
    bias = jnp.asarray(r.normal(size=(1, heads, seq, seq)), jnp.bfloat16) if biased else None
    lengths = r.integers(int(0.75 * seq), seq + 1, size=batch)
    mask = jnp.asarray(np.arange(seq)[None, :] < lengths[:, None])[:, None, None, :]
    return q, k, v, bias, mask, do


def _attend(impl, mask):
    if impl == "sm90_fused":  # the sm90 kernels with the fused backward (not a front-door name)
        from sciscale_jax.attention.sm90 import sm90_attention
        return lambda q, k, v, b: sm90_attention(q, k, v, bias=b, mask=mask, fused=True)
    return lambda q, k, v, b: dot_product_attention(q, k, v, bias=b, mask=mask, impl=impl)


def _max_err(got, want):
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    return max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))) for a, b in zip(got, want))


def _record(shape, batch, seq, heads, biased, impl, pass_name, seconds, flops, err=None, **extra):
    return dict(shape=shape, impl=impl, device=jax.devices()[0].device_kind, head_dim=HEAD_DIM, seq=seq,
                batch=batch, heads=heads, causal=False, bias="pair+mask" if biased else "mask", dtype="bfloat16",
                pass_=pass_name, ms=seconds * 1e3, tflops=flops / seconds / 1e12, max_err=err, **extra)


def run_shape(name, batch, seq, heads, biased, impls, runs):
    q, k, v, bias, mask, do = inputs(batch, seq, heads, biased)
    f32 = [None if x is None else x.astype(jnp.float32) for x in (q, k, v, bias, do)]
    with jax.default_matmul_precision("highest"):
        ref = _attend("xla", mask)
        ref_out = jax.jit(ref)(*f32[:4])
        ref_grads = jax.jit(lambda q, k, v, b, do: _grads(ref, q, k, v, b, do))(*f32)
    fwd_flops = 4 * batch * heads * seq * seq * HEAD_DIM
    records = []
    for impl in impls:
        f = _attend(impl, mask)
        passes = (("fwd", jax.jit(f), (q, k, v, bias), fwd_flops, ref_out),
                  ("fwd+bwd", jax.jit(lambda q, k, v, b, do, f=f: _grads(f, q, k, v, b, do)), (q, k, v, bias, do),
                   3.5 * fwd_flops, ref_grads))
        for pass_name, fn, args, flops, want in passes:
            try:
                seconds = median_seconds(fn, args, runs)
                rec = _record(name, batch, seq, heads, biased, impl, pass_name, seconds, flops,
                              _max_err(fn(*args), want))
            except Exception as e:  # noqa: BLE001 - record and go on
                rec = dict(shape=name, impl=impl, pass_=pass_name, error=f"{type(e).__name__}: {str(e)[:200]}")
            records.append(rec)
            print(json.dumps(rec), flush=True)
    return records


def sm90_sweep(name, batch, seq, heads, biased, runs, interpret=False):
    """The sm90 kernels called directly at each candidate configuration (``interpret``: in jax's
    Mosaic GPU interpreter, a CPU smoke test of this function; the times mean nothing there)."""
    from sciscale_jax.attention.sm90 import _kernel_biases
    from sciscale_jax.kernels import flash_attention_sm90 as sm
    from sciscale_jax.kernels import flash_attention_sm90_bwd as smb

    if not (interpret or sm.sm90_supported()):
        print("sm90 sweep skipped: needs an sm90 GPU", flush=True)
        return []

    q, k, v, bias, mask, do = inputs(batch, seq, heads, biased)
    kernel_bias, key_bias = _kernel_biases(bias, mask)
    fwd_flops = 4 * batch * heads * seq * seq * HEAD_DIM
    records = []

    def note(pass_name, config, fn, args, flops):
        try:
            rec = _record(name, batch, seq, heads, biased, "sm90-kernel", pass_name, median_seconds(fn, args, runs),
                          flops, config=config)
        except Exception as e:  # noqa: BLE001 - a configuration that does not compile
            rec = dict(shape=name, impl="sm90-kernel", pass_=pass_name, config=config,
                       error=f"{type(e).__name__}: {str(e)[:200]}")
        records.append(rec)
        print(json.dumps(rec), flush=True)

    for block_kv, stages in dict.fromkeys(sm.FWD_CANDIDATES[True] + sm.FWD_CANDIDATES[False]):
        for lse in (False, True):
            fn = jax.jit(lambda q, k, v, b, kb, block_kv=block_kv, stages=stages, lse=lse: sm.flash_attention_sm90(
                q, k, v, bias=b, key_bias=kb, block_kv=block_kv, stages=stages, return_lse=lse, interpret=interpret))
            note("fwd" + ("+lse" if lse else ""), [block_kv, stages], fn, (q, k, v, kernel_bias, key_bias), fwd_flops)
    out, lse2 = jax.jit(lambda q, k, v, b, kb: sm.flash_attention_sm90(
        q, k, v, bias=b, key_bias=kb, block_kv=64, stages=2, return_lse=True, interpret=interpret))(
        q, k, v, kernel_bias, key_bias)
    configs = smb.BWD_CANDIDATES[True] + smb.BWD_CANDIDATES[False] + smb.FUSED_CANDIDATES
    for stages, fused in dict.fromkeys(configs):
        fn = jax.jit(lambda q, k, v, o, l2, do, b, kb, stages=stages, fused=fused: smb.flash_attention_sm90_bwd(
            q, k, v, o, l2, do, bias=b, key_bias=kb, stages=stages, bias_grad=b is not None, fused=fused,
            interpret=interpret))
        note("bwd", [stages, "fused" if fused else "unfused"], fn, (q, k, v, out, lse2, do, kernel_bias, key_bias),
             2.5 * fwd_flops)
    return records


def table(records) -> str:
    lines = ["| device | shape | batch x seq x heads | bias | impl | config | pass | ms | TFLOP/s | x flash | max err |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    flash = {(r["shape"], r["pass_"]): r["ms"] for r in records if r.get("impl") == "flash" and "ms" in r}
    for r in records:
        if "error" in r:
            lines.append(f"| | {r['shape']} | | | {r['impl']} | {r.get('config', '')} | {r['pass_']} "
                         f"| error: {r['error'][:100]} | | | |")
            continue
        base = flash.get((r["shape"], r["pass_"]))
        ratio = "-" if base is None or r["impl"] == "sm90-kernel" else f"{base / r['ms']:.2f}"
        err = "-" if r["max_err"] is None else f"{r['max_err']:.2e}"
        config = ",".join(map(str, r["config"])) if "config" in r else ""
        lines.append(f"| {r['device']} | {r['shape']} | {r['batch']}x{r['seq']}x{r['heads']} | {r['bias']} "
                     f"| {r['impl']} | {config} | {r['pass_']} | {r['ms']:.3f} | {r['tflops']:.1f} | {ratio} "
                     f"| {err} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-seq", type=int, default=128)
    p.add_argument("--n-res", type=int, default=256)
    p.add_argument("--impls", type=lambda s: s.split(","), default=["flash", "sm90", "tokamax", "xla"])
    p.add_argument("--shapes", type=lambda s: s.split(","), default=["msa_row", "msa_column", "triangle"])
    p.add_argument("--sm90-sweep", action="store_true")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--interpret", action="store_true",
                   help="the sweep's kernels in the Mosaic GPU interpreter (a CPU smoke test; run with "
                        "XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    p.add_argument("--budget-s", type=float, default=1e9, help="start no new shape after this many seconds")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    known = shapes(args.n_seq, args.n_res)
    unknown = sorted(set(args.shapes) - set(known))
    if unknown:
        p.error(f"--shapes: unknown {unknown}; known: {sorted(known)}")
    os.makedirs(args.out, exist_ok=True)
    records, start = [], time.perf_counter()
    device = jax.devices()[0].device_kind

    def write():
        with open(os.path.join(args.out, "attention_evoformer_gpu.json"), "w") as f:
            json.dump(dict(device=device, jax=jax.__version__, n_seq=args.n_seq, n_res=args.n_res,
                           records=records), f, indent=1)
        md = table(records)
        with open(os.path.join(args.out, "attention_evoformer_gpu.md"), "w") as f:
            f.write(f"Device: {device}; jax {jax.__version__}; crop N_seq {args.n_seq}, N_res {args.n_res}\n\n{md}\n")
        return md

    for name in args.shapes:
        if time.perf_counter() - start > args.budget_s:
            print(f"time budget {args.budget_s}s reached before {name}", flush=True)
            break
        records += run_shape(name, *known[name], args.impls, args.runs)
        write()
        if args.sm90_sweep:
            try:
                records += sm90_sweep(name, *known[name], args.runs, args.interpret)
            except Exception as e:  # noqa: BLE001 - the front-door rows already written stand
                print(f"sm90 sweep of {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            write()
    print(write())


if __name__ == "__main__":
    main()
