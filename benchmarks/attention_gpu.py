"""Attention speed on one GPU: the sciscale Pallas flash kernel against cuDNN, JAX's Pallas op and tokamax.

Forward and forward+backward TFLOP/s, bfloat16, head_dim 64 and 128 (32 at the Evoformer's
shapes with --tokens 32768 --model-dim 256 --seqs 256: 128 MSA rows of 256 residues, 8 heads), sequence 1k..16k,
causal and not, without a bias and with an Evoformer-style pair bias (one [1, heads, seq,
seq] bias broadcast over the batch, as MSA row attention broadcasts the pair
representation over the rows; its gradient is part of fwd+bwd), for
  flash       sciscale_jax.kernels.flash_attention (FlashAttention-2 partitioning, Triton)
  cudnn       jax.nn.dot_product_attention(implementation="cudnn")  (the baseline)
  pallas_gpu  jax.experimental.pallas.ops.gpu.attention.mha, where importable (no bias)
  tokamax     the front door's impl="tokamax" (tokamax.dot_product_attention, which picks its
              Pallas Mosaic GPU kernel where it takes the inputs), where tokamax imports
              (skipped with a note otherwise)
  sm90        sciscale_jax.attention.sm90 (Pallas Mosaic GPU forward and backward kernels,
              through the front door's custom VJP; where it imports and the GPU is sm90)
  sm90_fused  the same with the fused backward (dQ and dbias reduce-added from the dK/dV
              kernel); only when named
  sm90_persistent  the same with the persistent forward grid; only when named
  xla         the front door's impl="xla" (plain attention, [B, H, Q, K] probabilities kept; what
              AlphaFold's own code does); only when named in --impls / --pair-impls
Tokens per step are fixed (batch = tokens // seq) and heads = model_dim // head_dim, as in
the FlashAttention-2 paper's benchmarks. FLOPs: forward 4*B*H*Q*K*D (halved when causal),
backward 2.5x forward; the bias add is not counted. Time: median of --runs timed calls
after a warm-up call. Error: max |out - ref| (and max over dq, dk, dv, dbias for fwd+bwd)
against float32 attention on the same bf16 inputs; the gradient check runs up to
--grad-ref-max-seq.

    python benchmarks/attention_gpu.py --out benchmarks/results --biases none,pair

The front door's ``impl="auto"`` ranks implementations by these measurements: after a GPU run,
rewrite its table (``sciscale_jax/attention/measured_attention.json``) from every result file
that should count, oldest first, and commit it:

    python benchmarks/attention_gpu.py --table-from benchmarks/results/attention_gpu.json [newer.json ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sciscale_jax.kernels.flash_attention import flash_attention, reference_attention
from timing import median_seconds  # benchmarks/timing.py (scripts run as python benchmarks/NAME.py)


class _Impl(NamedTuple):
    fn: Callable          # fn(q, k, v, causal, bias)
    bias: bool = True     # takes an additive bias (and returns its gradient)
    backward: bool = True  # differentiable


def _impls(flash_blocks, notes):
    impls = {}
    for bq, bk in flash_blocks:
        name = "flash" if (bq, bk) == (None, None) else f"flash[{bq}x{bk}]"
        impls[name] = _Impl(lambda q, k, v, c, b, bq=bq, bk=bk: flash_attention(
            q, k, v, bias=b, causal=c, block_q=bq, block_k=bk, interpret=False))
    impls["cudnn"] = _Impl(lambda q, k, v, c, b: jax.nn.dot_product_attention(
        q, k, v, bias=b, is_causal=c, implementation="cudnn"))
    try:
        from jax.experimental.pallas.ops.gpu import attention as pallas_gpu
        impls["pallas_gpu"] = _Impl(lambda q, k, v, c, b: pallas_gpu.mha(
            q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=c), bias=False)
    except Exception as err:  # noqa: BLE001 - optional comparison
        notes.append(f"pallas_gpu skipped: {type(err).__name__}: {err}")
    try:
        from sciscale_jax.attention.tokamax_backend import _tokamax, tokamax_attention
        tokamax = _tokamax()  # its profiler import stubbed where absent
        impls["tokamax"] = _Impl(lambda q, k, v, c, b: tokamax_attention(q, k, v, bias=b, causal=c))
        notes.append(f"tokamax {getattr(tokamax, '__version__', '?')}: through the front door's impl='tokamax' "
                     f"(tokamax picks its kernel: Mosaic GPU where it takes the inputs)")
    except Exception as err:  # noqa: BLE001 - optional peer
        notes.append(f"tokamax skipped (not importable): {type(err).__name__}: {str(err)[:200]}")
    try:
        from sciscale_jax.attention.sm90 import sm90_attention
        from sciscale_jax.kernels.flash_attention_sm90 import sm90_supported
        if not sm90_supported():
            raise ImportError("needs an sm90+ GPU and Pallas Mosaic GPU")
        impls["sm90"] = _Impl(lambda q, k, v, c, b: sm90_attention(q, k, v, bias=b, causal=c))
        # The fused backward (dQ reduce-added from the dK/dV kernel); only where named, as auto
        # does not pick it until it has passed the GPU tests.
        impls["sm90_fused"] = _Impl(lambda q, k, v, c, b: sm90_attention(q, k, v, bias=b, causal=c, fused=True))
        # The persistent forward grid (one CTA per SM looping over query tiles), likewise.
        impls["sm90_persistent"] = _Impl(lambda q, k, v, c, b: sm90_attention(q, k, v, bias=b, causal=c,
                                                                             persistent=True))
    except Exception as err:  # noqa: BLE001 - optional kernel
        notes.append(f"sm90 skipped: {type(err).__name__}: {str(err)[:200]}")
    from sciscale_jax.attention import dot_product_attention
    impls["xla"] = _Impl(lambda q, k, v, c, b: dot_product_attention(q, k, v, bias=b, causal=c, impl="xla"))
    return impls


_ref_chunk = jax.jit(lambda q, k, v, bias, mask: reference_attention(q, k, v, bias=bias, mask=mask))


def _ref_forward(q, k, v, causal, bias=None, chunk=1024):
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
        bias_c = None if bias is None else bias[:, :, q0:q0 + chunk].astype(jnp.float32)
        outs.append(_ref_chunk(qc, k32, v32, bias_c, mask))
    return jnp.concatenate(outs, axis=1)


def _max_err(a, b):
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def run(args, notes, flush=lambda records: None):
    """Benchmark records; ``flush(records)`` runs after each measurement, so a run cut short
    (a time limit, a hung kernel) still leaves the finished configurations on disk."""
    device = jax.devices()[0]
    device_name = f"{device.device_kind}"
    print(f"device: {device_name} ({jax.default_backend()}), jax {jax.__version__}", file=sys.stderr)
    impls = _impls(args.flash_blocks, notes)
    named = set(args.impls or ()) | set(args.pair_impls or ())
    if args.impls:  # (with --pair-impls, the union: each config filters below)
        impls = {name: impl for name, impl in impls.items() if name in named}
    for only_named in ("xla", "sm90_fused", "sm90_persistent"):  # xla keeps [B, H, Q, K]: only where named
        if only_named not in named:
            impls.pop(only_named, None)
    for note in notes:
        print(note, file=sys.stderr)
    records, start = [], time.perf_counter()
    # Most informative first (head_dim 128, long sequences), so a time budget cuts the least useful.
    pair_seqs = args.seqs if args.pair_seqs is None else args.pair_seqs
    configs = [(d, s, b, c) for d in sorted(args.head_dims, reverse=True)
               for s in sorted(set(args.seqs) | set(pair_seqs if "pair" in args.biases else ()), reverse=True)
               for b in args.biases for c in args.causal
               if s in (pair_seqs if b == "pair" else args.seqs)]
    for head_dim, seq, bias_kind, causal in configs:
        if time.perf_counter() - start > args.budget_s:
            notes.append(f"time budget {args.budget_s}s reached before head_dim {head_dim}, seq {seq}, "
                         f"bias {bias_kind}, causal {causal}; the rest skipped")
            print(notes[-1], file=sys.stderr)
            break
        batch, heads = max(1, args.tokens // seq), args.model_dim // head_dim
        r = np.random.default_rng(seq + head_dim)
        q, k, v, do = (jnp.asarray(r.normal(size=(batch, seq, heads, head_dim)), jnp.bfloat16) for _ in range(4))
        bias = None
        if bias_kind == "pair":  # one pair bias per head, broadcast over the batch (MSA rows)
            bias = jnp.asarray(r.normal(size=(1, heads, seq, seq)), jnp.bfloat16)
        fwd_flops = 4 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)
        ref_out = _ref_forward(q, k, v, causal, bias)
        ref_grads = None
        if seq <= args.grad_ref_max_seq:
            f32 = [None if x is None else x.astype(jnp.float32) for x in (q, k, v, do, bias)]
            ref_grads = jax.jit(lambda q, k, v, do, b: _vjp(
                lambda q, k, v, b: reference_attention(q, k, v, bias=b, causal=causal), q, k, v, b, do))(*f32)
        for name, impl in impls.items():
            if bias is not None and not impl.bias:
                continue
            chosen = args.pair_impls if bias is not None and args.pair_impls is not None else args.impls
            if chosen is not None and name not in chosen:
                continue
            fwd = jax.jit(lambda q, k, v, b, impl=impl: impl.fn(q, k, v, causal, b))
            fwd_bwd = jax.jit(lambda q, k, v, b, do, impl=impl: _vjp(
                lambda q, k, v, b: impl.fn(q, k, v, causal, b), q, k, v, b, do))
            passes = [("fwd", fwd, (q, k, v, bias), fwd_flops)]
            if impl.backward:
                passes.append(("fwd+bwd", fwd_bwd, (q, k, v, bias, do), 3.5 * fwd_flops))
            for pass_name, fn, fn_args, flops in passes:
                rec = dict(impl=name, device=device_name, head_dim=head_dim, seq=seq, batch=batch,
                           heads=heads, causal=causal, bias=bias_kind, dtype="bfloat16", pass_=pass_name)
                try:
                    seconds = median_seconds(fn, fn_args, args.runs)
                    out = fn(*fn_args)
                    if pass_name == "fwd":
                        err = _max_err(out, ref_out)
                    else:
                        err = None if ref_grads is None else max(
                            _max_err(a, b) for a, b in zip(out, ref_grads) if b is not None)
                    rec.update(ms=seconds * 1e3, tflops=flops / seconds / 1e12, max_err=err)
                except Exception as e:  # noqa: BLE001 - record and go on
                    rec.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                    if args.verbose:
                        traceback.print_exc()
                records.append(rec)
                print(json.dumps(rec), file=sys.stderr, flush=True)
                flush(records)
    return records


def with_ratios(records):
    """Copies of the records with x cudnn and x flash ratios (same head_dim, seq, bias, causal, pass)."""
    records = [dict(r) for r in records]
    for base_impl in ("cudnn", "flash"):
        base = {(r["head_dim"], r["seq"], r["bias"], r["causal"], r["pass_"]): r.get("tflops")
                for r in records if r["impl"] == base_impl}
        for rec in records:
            b = base.get((rec["head_dim"], rec["seq"], rec["bias"], rec["causal"], rec["pass_"]))
            rec[f"vs_{base_impl}"] = rec["tflops"] / b if b and rec.get("tflops") else None
    for rec in records:
        rec["pass"] = rec.pop("pass_")
    return records


def _vjp(f, q, k, v, bias, do):
    """Gradients of f(q, k, v, bias) along do: (dq, dk, dv) or (dq, dk, dv, dbias)."""
    if bias is None:
        return jax.vjp(lambda q, k, v: f(q, k, v, None), q, k, v)[1](do)
    return jax.vjp(f, q, k, v, bias)[1](do)


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(records):
    lines = ["| device | impl | head_dim | seq | batch x heads | bias | causal | pass | ms | TFLOP/s | x cudnn "
             "| x flash | max err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["head_dim"], r["bias"], r["causal"], r["pass"], r["seq"], r["impl"])):
        head = (f"| {r['device']} | {r['impl']} | {r['head_dim']} | {r['seq']} | {r['batch']}x{r['heads']} "
                f"| {r['bias']} | {r['causal']} | {r['pass']} ")
        if "error" in r:
            lines.append(head + f"| error: {r['error'][:100]} | | | | |")
            continue
        lines.append(head + f"| {r['ms']:.3f} | {r['tflops']:.1f} | {_fmt(r['vs_cudnn'], '.2f')} "
                     f"| {_fmt(r['vs_flash'], '.2f')} | {_fmt(r['max_err'], '.2e')} |")
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
    p.add_argument("--biases", type=lambda s: s.split(","), default=["none"],
                   help="comma list of 'none' and 'pair' ([1, heads, seq, seq] bias broadcast over the batch)")
    p.add_argument("--causal", type=lambda s: [{"0": False, "1": True}[x] for x in s.split(",")],
                   default=[False, True], help="comma list of 0 (non-causal) and 1 (causal)")
    p.add_argument("--grad-ref-max-seq", type=int, default=2048)
    p.add_argument("--budget-s", type=float, default=1e9, help="start no new config after this many seconds")
    p.add_argument("--impls", type=lambda s: s.split(","), default=None,
                   help="comma list of implementations to run (default: every one available)")
    p.add_argument("--pair-impls", type=lambda s: s.split(","), default=None,
                   help="comma list of implementations run with the pair bias (default: those of --impls)")
    p.add_argument("--pair-seqs", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="sequence lengths measured with the pair bias (default: --seqs)")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--table-from", nargs="+", metavar="JSON", default=None,
                   help="measure nothing: write the front door's measured table (what impl='auto' ranks by) from "
                        "these attention_gpu JSON files, later files winning where they measured the same point")
    p.add_argument("--table", default=os.path.normpath(os.path.join(
                       os.path.dirname(__file__), "..", "sciscale_jax", "attention", "measured_attention.json")),
                   help="where --table-from writes the table")
    args = p.parse_args(argv)
    if args.table_from:
        from sciscale_jax.attention.measured import table_from_records
        record_lists = []
        for path in args.table_from:
            with open(path) as f:
                record_lists.append(json.load(f)["records"])
        measured = table_from_records(record_lists)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        measured["sources"] = [os.path.relpath(os.path.abspath(path), root) for path in args.table_from]
        with open(args.table, "w") as f:
            json.dump(measured, f, indent=1)
            f.write("\n")
        print(f"{args.table}: " + ", ".join(f"{kind} {len(rows)} points" for kind, rows in measured["devices"].items()))
        return
    if args.runs < 5:
        p.error(f"--runs={args.runs} must be >= 5")
    if jax.default_backend() != "gpu":
        p.error(f"needs a GPU; jax's default backend is {jax.default_backend()!r}")
    if set(args.biases) - {"none", "pair"}:
        p.error(f"--biases={','.join(args.biases)}: each must be 'none' or 'pair'")
    notes = []
    os.makedirs(args.out, exist_ok=True)
    device = jax.devices()[0].device_kind

    def write(records, final=False):
        records = with_ratios(records)
        md = table(records)
        if notes:
            md += "\n\n" + "\n".join(f"- {n}" for n in notes)
        with open(os.path.join(args.out, f"attention_gpu{args.tag}.json"), "w") as f:
            json.dump(dict(device=device, jax=jax.__version__, complete=final, notes=notes, records=records), f,
                      indent=1)
        with open(os.path.join(args.out, f"attention_gpu{args.tag}.md"), "w") as f:
            f.write(f"Device: {device}; jax {jax.__version__}\n\n{md}\n")
        return md

    records = run(args, notes, flush=write)
    print(write(records, final=True))


if __name__ == "__main__":
    main()
