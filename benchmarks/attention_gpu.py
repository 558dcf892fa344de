"""Attention speed on one GPU: the sciscale Pallas flash kernel against cuDNN and JAX's Pallas op.

Forward and forward+backward TFLOP/s, bfloat16, head_dim 64 and 128, sequence 1k..16k,
causal and not, for
  flash       sciscale_jax.kernels.flash_attention (FlashAttention-2 partitioning, Triton)
  cudnn       jax.nn.dot_product_attention(implementation="cudnn")  (the baseline)
  pallas_gpu  jax.experimental.pallas.ops.gpu.attention.mha, where importable
Tokens per step are fixed (batch = tokens // seq) and heads = model_dim // head_dim, as in
the FlashAttention-2 paper's benchmarks. FLOPs: forward 4*B*H*Q*K*D (halved when causal),
backward 2.5x forward. Time: median of --runs timed calls after a warm-up call. Error:
max |out - ref| (and max over dq, dk, dv for fwd+bwd) against float32 attention on the
same bf16 inputs; the gradient check runs up to --grad-ref-max-seq.

    python benchmarks/attention_gpu.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from sciscale_jax.kernels.flash_attention import flash_attention, reference_attention
from timing import median_seconds  # benchmarks/timing.py (scripts run as python benchmarks/NAME.py)


def _impls(flash_blocks):
    impls = {}
    for bq, bk in flash_blocks:
        name = "flash" if (bq, bk) == (None, None) else f"flash[{bq}x{bk}]"
        impls[name] = lambda q, k, v, c, bq=bq, bk=bk: flash_attention(
            q, k, v, causal=c, block_q=bq, block_k=bk, interpret=False)
    impls["cudnn"] = lambda q, k, v, c: jax.nn.dot_product_attention(
        q, k, v, is_causal=c, implementation="cudnn")
    try:
        from jax.experimental.pallas.ops.gpu import attention as pallas_gpu
        impls["pallas_gpu"] = lambda q, k, v, c: pallas_gpu.mha(
            q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=c)
    except Exception as err:  # noqa: BLE001 - optional comparison
        print(f"pallas_gpu unavailable: {err}", file=sys.stderr)
    return impls


_ref_chunk = jax.jit(lambda q, k, v, mask: reference_attention(q, k, v, mask=mask))


def _ref_forward(q, k, v, causal, chunk=1024):
    """Float32 attention, query-chunked so 16k sequences fit."""
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    seq = q.shape[1]
    outs = []
    for q0 in range(0, seq, chunk):
        qc = q32[:, q0:q0 + chunk]
        mask = None
        if causal:
            rows = q0 + jnp.arange(qc.shape[1])[:, None]
            mask = jnp.arange(k.shape[1])[None, :] <= rows
        outs.append(_ref_chunk(qc, k32, v32, mask))
    return jnp.concatenate(outs, axis=1)


def _max_err(a, b):
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def run(args):
    device = jax.devices()[0]
    device_name = f"{device.device_kind}"
    print(f"device: {device_name} ({jax.default_backend()}), jax {jax.__version__}", file=sys.stderr)
    impls = _impls(args.flash_blocks)
    records, start = [], time.perf_counter()
    # Most informative first (head_dim 128, long sequences), so a time budget cuts the least useful.
    configs = [(d, s, c) for d in sorted(args.head_dims, reverse=True) for s in sorted(args.seqs, reverse=True)
               for c in (False, True)]
    for head_dim, seq, causal in configs:
        if time.perf_counter() - start > args.budget_s:
            print(f"time budget {args.budget_s}s reached; skipping the rest", file=sys.stderr)
            break
        batch, heads = max(1, args.tokens // seq), args.model_dim // head_dim
        r = np.random.default_rng(seq + head_dim)
        q, k, v, do = (jnp.asarray(r.normal(size=(batch, seq, heads, head_dim)), jnp.bfloat16) for _ in range(4))
        fwd_flops = 4 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)
        ref_out = _ref_forward(q, k, v, causal)
        ref_grads = None
        if seq <= args.grad_ref_max_seq:
            ref_fn = lambda q, k, v: reference_attention(q, k, v, causal=causal)  # noqa: E731
            f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
            ref_grads = jax.jit(lambda q, k, v, do: jax.vjp(ref_fn, q, k, v)[1](do))(*f32)
        for name, attn in impls.items():
            fwd = jax.jit(lambda q, k, v, attn=attn: attn(q, k, v, causal))
            fwd_bwd = jax.jit(lambda q, k, v, do, attn=attn: jax.vjp(lambda *a: attn(*a, causal), q, k, v)[1](do))
            for pass_name, fn, fn_args, flops in (("fwd", fwd, (q, k, v), fwd_flops),
                                                  ("fwd+bwd", fwd_bwd, (q, k, v, do), 3.5 * fwd_flops)):
                rec = dict(impl=name, device=device_name, head_dim=head_dim, seq=seq, batch=batch,
                           heads=heads, causal=causal, dtype="bfloat16", pass_=pass_name)
                try:
                    seconds = median_seconds(fn, fn_args, args.runs)
                    out = fn(*fn_args)
                    if pass_name == "fwd":
                        err = _max_err(out, ref_out)
                    else:
                        err = None if ref_grads is None else max(map(_max_err, out, ref_grads))
                    rec.update(ms=seconds * 1e3, tflops=flops / seconds / 1e12, max_err=err)
                except Exception as e:  # noqa: BLE001 - record and go on
                    rec.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    if args.verbose:
                        traceback.print_exc()
                records.append(rec)
                print(json.dumps(rec), file=sys.stderr, flush=True)
    base = {(r["head_dim"], r["seq"], r["causal"], r["pass_"]): r.get("tflops")
            for r in records if r["impl"] == "cudnn"}
    for rec in records:
        b = base.get((rec["head_dim"], rec["seq"], rec["causal"], rec["pass_"]))
        rec["vs_cudnn"] = rec["tflops"] / b if b and rec.get("tflops") else None
        rec["pass"] = rec.pop("pass_")
    return records


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(records):
    lines = ["| device | impl | head_dim | seq | batch x heads | causal | pass | ms | TFLOP/s | x cudnn | max err |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["head_dim"], r["causal"], r["pass"], r["seq"], r["impl"])):
        if "error" in r:
            lines.append(f"| {r['device']} | {r['impl']} | {r['head_dim']} | {r['seq']} | {r['batch']}x{r['heads']} "
                         f"| {r['causal']} | {r['pass']} | error: {r['error'][:80]} | | | |")
            continue
        lines.append(f"| {r['device']} | {r['impl']} | {r['head_dim']} | {r['seq']} | {r['batch']}x{r['heads']} "
                     f"| {r['causal']} | {r['pass']} | {r['ms']:.3f} | {r['tflops']:.1f} "
                     f"| {_fmt(r['vs_cudnn'], '.2f')} | {_fmt(r['max_err'], '.2e')} |")
    return "\n".join(lines)


def _blocks(text):
    out = []
    for item in text.split(","):
        item = item.strip()
        out.append((None, None) if item == "default" else tuple(int(x) for x in item.split("x")))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                   help="folder for attention_gpu.json and attention_gpu.md")
    p.add_argument("--seqs", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--head-dims", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128])
    p.add_argument("--tokens", type=int, default=16384, help="batch * seq per call")
    p.add_argument("--model-dim", type=int, default=2048, help="heads * head_dim")
    p.add_argument("--runs", type=int, default=5, help="timed runs (median) after warm-up; >= 5")
    p.add_argument("--flash-blocks", type=_blocks, default=[(None, None)],
                   help="comma list of BQxBK for the flash kernel, 'default' for its defaults")
    p.add_argument("--grad-ref-max-seq", type=int, default=2048)
    p.add_argument("--budget-s", type=float, default=1e9, help="start no new config after this many seconds")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.runs < 5:
        p.error(f"--runs={args.runs} must be >= 5")
    if jax.default_backend() != "gpu":
        p.error(f"needs a GPU; jax's default backend is {jax.default_backend()!r}")
    records = run(args)
    md = table(records)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "attention_gpu.json"), "w") as f:
        json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, records=records), f, indent=1)
    with open(os.path.join(args.out, "attention_gpu.md"), "w") as f:
        f.write(f"Device: {jax.devices()[0].device_kind}; jax {jax.__version__}\n\n{md}\n")


if __name__ == "__main__":
    main()
