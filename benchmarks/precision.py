"""Compression on the protein MLM: train-step memory, validation loss and deployable weight bytes.

CPU mode (default). One small fp32 protein MLM configuration (examples/efficient_qat.py's
``small_configs``: 2 layers, embed 64, seq 64, batch 16) is trained with
``sciscale_jax.train.train`` for the same steps and seed under each precision policy
(fp32, bf16, fp16 with dynamic loss scaling, fp8) and each QAT scheme (LLM-QAT W4A8KV4,
BitNet, BitNet b1.58); EfficientQAT (4-bit, group 64: Block-AP then E2E-QP) and its
round-to-nearest baseline are applied to the trained fp32 model. For each:

- the compiled per-device train-step memory (XLA memory analysis of the jitted step);
- the validation loss after the budget, relative to fp32, and the share of fp32's gain
  over the unigram baseline that it loses;
- the bytes of the deployable weights: kernels packed as the scheme deploys them
  (``sciscale_jax.quant.packed_weight_bytes``; fp8: one byte per weight and one float32
  scale per kernel), everything else in 16-bit floats (fp32: 32-bit). For the QAT schemes
  this is an inference figure: training keeps full-precision latent weights.

GPU mode (``--gpu``): a [N, N] x [N, N] matmul (N = 8192) through
``sciscale_jax.precision.fp8_matmul`` (e4m3 operands, per-tensor scales, float32
accumulation) and as a plain fp8 dot of pre-quantised operands, against a bfloat16
``jnp.dot``: median of ``--runs`` (>= 5) timed calls after warm-up, TFLOP/s and the ratio to
bf16, with the device named on every number; and the compiled HLO is searched for the
fp8 GEMM (a dot on f8 operands or cuBLASLt's fp8 custom call).

    python benchmarks/precision.py                   # CPU, about 8 minutes on 2 cores
    python benchmarks/precision.py --gpu --out DIR   # one GPU (benchmarks/gpu_check.sh runs it)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from sciscale_jax import precision, quant
from sciscale_jax.models.layers import Dense
from timing import median_seconds  # benchmarks/timing.py (scripts run as python benchmarks/NAME.py)

ROOT = pathlib.Path(__file__).resolve().parent.parent

MiB, KiB = 2.0 ** 20, 2.0 ** 10
# (row name, precision policy, quant scheme) trained from scratch.
TRAINED = [("fp32", "fp32", "none"), ("bf16", "bf16", "none"), ("fp16", "fp16", "none"),
           ("fp8", "fp8", "none"), ("llm_qat_w4a8kv4", "fp32", "llm_qat_w4a8kv4"),
           ("bitnet", "fp32", "bitnet"), ("bitnet158", "fp32", "bitnet158")]


# --- Deployable bytes ------------------------------------------------------------------------

def deployable_bytes(model: nnx.Module, kernel_bytes, float_bytes: int = 2) -> int:
    """Bytes of ``model``'s parameters as deployed: ``kernel_bytes(key, dense, (in, out))``
    gives a dense kernel's packed size (``None``: stored as floats); every other parameter
    takes ``float_bytes`` per element."""
    packed, total = set(), 0
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Dense):
            key = "/".join(map(str, tuple(path) + ("kernel",)))
            n = kernel_bytes(key, node, (math.prod(node.in_shape), math.prod(node.out_shape)))
            if n is not None:
                packed.add(key)
                total += n
    for path, value in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items():
        if "/".join(map(str, path)) not in packed:
            total += int(np.size(value)) * float_bytes
    return total


def scheme_bytes(model: nnx.Module, name: str, *, frozen=None, bits: int = 4, group_size: int = 64) -> int:
    """Deployable bytes of ``model`` under the benchmark row ``name``."""
    if name == "fp32":
        return deployable_bytes(model, lambda *a: None, float_bytes=4)
    if name in ("bf16", "fp16"):
        return deployable_bytes(model, lambda *a: None)
    if name == "fp8":  # e4m3 weights, one float32 scale per kernel
        return deployable_bytes(model, lambda k, d, shape: math.prod(shape) + 4
                                if isinstance(d.matmul, precision.Fp8Matmul) else None)
    if frozen is not None:  # EfficientQAT / round-to-nearest: the frozen kernels
        return deployable_bytes(model, lambda k, d, shape: quant.packed_weight_bytes(
            "efficient_qat", shape, bits=bits, group_size=group_size) if k in frozen else None)
    qat = (quant.QATMatmul, quant.BitMatmul)
    return deployable_bytes(model, lambda k, d, shape: quant.packed_weight_bytes(name, shape)
                            if isinstance(d.matmul, qat) else None)


# --- CPU mode --------------------------------------------------------------------------------

def _cpu_imports():
    """The training stack, imported only in CPU mode (the --gpu check needs none of it)."""
    from sciscale_jax.recipes.protein_mlm import RECIPE
    from sciscale_jax.train import train
    sys.path.insert(0, str(ROOT / "examples"))
    import efficient_qat as eqat_example  # examples/efficient_qat.py
    return RECIPE, train, eqat_example


def run_cpu(args) -> dict:
    RECIPE, train, eqat_example = _cpu_imports()
    base_model, base_train = eqat_example.small_configs(args.steps, args.seed)
    records, fp32_state = [], None
    data = RECIPE.build_data(base_train)
    for name, prec, scheme in TRAINED:
        if args.only and name not in args.only:
            continue
        model_cfg = dataclasses.replace(base_model, precision=prec, quant=scheme)
        with tempfile.TemporaryDirectory() as run_dir:
            r = train(RECIPE, model_cfg, base_train, run_dir, progress=False, log=lambda *a: None)
        model = eqat_example.model_from_state(model_cfg, r["state"])
        scale = {k: float(v) for k, v in precision.loss_scale_metrics(r["state"].opt_state).items()}
        rec = dict(name=name, precision=prec, quant=scheme, val_loss=r["val_loss"], train_loss=r["train_loss"],
                   memory=r["memory"].as_dict(), param_bytes=r["param_bytes"], opt_state_bytes=r["opt_state_bytes"],
                   deploy_bytes=scheme_bytes(model, name), train_seconds=r["seconds"],
                   loss_scale=scale["loss_scale"], skipped_steps=int(scale["skipped_steps"]))
        records.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "memory"}), file=sys.stderr, flush=True)
        if name == "fp32":
            fp32_state, unigram_ppl = r["state"], r["baselines"]["unigram_ppl"]
    if fp32_state is None:
        raise SystemExit("--only must include fp32: every row is compared with it")

    # EfficientQAT and round-to-nearest on the trained fp32 model.
    bits, g = args.bits, args.group_size
    rtn = eqat_example.model_from_state(base_model, fp32_state)
    frozen = eqat_example.round_to_nearest(rtn, bits=bits, group_size=g)
    records.append(dict(name=f"rtn_w{bits}g{g}", precision="fp32", quant="round-to-nearest (post-training)",
                        val_loss=eqat_example.val_loss(rtn, data.eval), memory=None,
                        deploy_bytes=scheme_bytes(rtn, "rtn", frozen=frozen, bits=bits, group_size=g)))
    t0 = time.perf_counter()
    model = eqat_example.model_from_state(base_model, fp32_state)
    calib = eqat_example.concat_batches([data.train.batch(eqat_example.CALIB_STEP0 + i)
                                         for i in range(args.calib_batches)])
    e2e = [data.train.batch(eqat_example.E2E_STEP0 + i) for i in range(args.e2e_steps)]
    frozen = eqat_example.efficient_qat(model, calib, e2e, bits=bits, group_size=g, block_steps=args.block_steps)
    records.append(dict(name=f"efficient_qat_w{bits}g{g}", precision="fp32", quant="EfficientQAT (Block-AP + E2E-QP)",
                        val_loss=eqat_example.val_loss(model, data.eval), memory=None,
                        deploy_bytes=scheme_bytes(model, "efficient_qat", frozen=frozen, bits=bits, group_size=g),
                        train_seconds=time.perf_counter() - t0))
    fp32 = records[0]
    unigram_loss = math.log(unigram_ppl)
    for rec in records:
        rec["vs_fp32"] = rec["val_loss"] / fp32["val_loss"] - 1.0
        rec["gain_lost"] = (rec["val_loss"] - fp32["val_loss"]) / (unigram_loss - fp32["val_loss"])
        rec["deploy_vs_fp32"] = rec["deploy_bytes"] / fp32["deploy_bytes"]
    return dict(device=f"{jax.devices()[0].device_kind} ({jax.default_backend()})", jax=jax.__version__,
                model=base_model.to_dict(), train=base_train.to_dict(), unigram_loss=unigram_loss,
                efficient_qat=dict(bits=bits, group_size=g, calib_batches=args.calib_batches,
                                   block_steps=args.block_steps, e2e_steps=args.e2e_steps),
                records=records)


def cpu_table(result: dict) -> str:
    m, t = result["model"], result["train"]
    lines = [
        f"Protein MLM, {m['num_layers']} layers, embed {m['embed_dim']}, seq {t['seq_len']}, batch {t['batch_size']}, "
        f"{t['steps']} steps, seed {t['seed']}; device: {result['device']}. On CPU, bf16/fp16/fp8 arithmetic is "
        "emulated by XLA (no low-precision units): memory shows storage, not speed. Memory: compiled train step, "
        "per device. Deployable weights: QAT figures are inference figures (training keeps full-precision "
        f"latent weights). Unigram baseline loss {result['unigram_loss']:.4f}.",
        "",
        "| scheme | train-step peak MiB | temp MiB | val loss | vs fp32 | share of fp32's gain lost "
        "| deployable weights KiB | x fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["records"]:
        mem = r["memory"]
        peak = "n/a (post-training)" if mem is None else f"{mem['peak_bytes'] / MiB:.2f}"
        temp = "n/a" if mem is None else f"{mem['temp_bytes'] / MiB:.2f}"
        lines.append(f"| {r['name']} | {peak} | {temp} | {r['val_loss']:.4f} | {r['vs_fp32']:+.2%} "
                     f"| {r['gain_lost']:+.1%} | {r['deploy_bytes'] / KiB:.1f} | {r['deploy_vs_fp32']:.3f} |")
    return "\n".join(lines)


def cpu_plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = result["records"]
    names = [r["name"] for r in recs]
    y = np.arange(len(recs))
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.45 * len(recs) + 1.8), sharey=True)
    panels = [
        ("compiled train-step peak (MiB)", [np.nan if r["memory"] is None else r["memory"]["peak_bytes"] / MiB
                                            for r in recs]),
        ("val loss vs fp32 (%)", [100 * r["vs_fp32"] for r in recs]),
        ("deployable weights (KiB)", [r["deploy_bytes"] / KiB for r in recs]),
    ]
    for ax, (title, values) in zip(axes, panels):
        ax.barh(y, np.nan_to_num(values), color="C0")
        for yi, v in zip(y, values):
            if math.isnan(v):
                ax.text(0, yi, " n/a (post-training)", va="center", fontsize=8, color="#666")
        ax.set_title(title, fontsize=10)
        ax.axvline(0, color="k", lw=0.5)
        ax.grid(axis="x", alpha=0.3)
        ax.locator_params(axis="x", nbins=5)
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    t = result["train"]
    fig.suptitle(f"Protein MLM compression, {t['steps']} steps, {result['device']} "
                 "(low precision emulated on CPU; QAT bytes are inference figures)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- GPU mode --------------------------------------------------------------------------------

_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*([a-z0-9]+)\[")
_CALL = re.compile(r"\b(?:dot|custom-call)\((.*?)\)")


def fp8_gemm_lines(hlo_text: str) -> list[str]:
    """Lines of HLO text that run a GEMM on fp8 operands: cuBLASLt's fp8 matmul custom call,
    or a dot / custom call with an f8 operand (operand types are looked up from their
    definitions in the same computation: compiled HLO prints operands by name only)."""
    out, types = [], {}
    for line in hlo_text.splitlines():
        s = line.strip()
        if s.endswith("{"):  # a new computation: names are local to it
            types = {}
        if "__cublas$lt$matmul$f8" in s:
            out.append(s)
            continue
        m = _DEF.match(line)
        if m:
            types[m.group(1)] = m.group(2)
        call = _CALL.search(s)
        if call is None:
            continue
        operands = call.group(1)
        named = [types.get(name, "") for name in re.findall(r"%?([A-Za-z_][\w.\-]*)", operands)]
        if any(t.startswith("f8") for t in named) or re.search(r"(^|[\s,(])f8e", operands):
            out.append(s)
    return out


def run_gpu(args) -> dict:
    device = jax.devices()[0]
    dev = device.device_kind
    n = args.matmul_size
    r = np.random.default_rng(0)
    x_nk = jnp.asarray(r.normal(size=(n, n)), jnp.bfloat16)
    w_km = jnp.asarray(r.normal(size=(n, n)) / math.sqrt(n), jnp.bfloat16)
    cfg = precision.Fp8Config()  # delayed scaling, e4m3 forward
    meta = precision.Fp8Matmul()  # fresh scales (1.0) and histories
    meta = tuple(getattr(meta, f"{role}_{k}")[...] for role in "xwg" for k in ("scale", "amax_history"))
    fmax = float(jnp.finfo(jnp.float8_e4m3fn).max)
    sx, sw = (jnp.max(jnp.abs(t.astype(jnp.float32))) / fmax for t in (x_nk, w_km))
    xq_nk = (x_nk.astype(jnp.float32) / sx).astype(jnp.float8_e4m3fn)
    wq_km = (w_km.astype(jnp.float32) / sw).astype(jnp.float8_e4m3fn)

    impls = {
        "bf16 jnp.dot": (jax.jit(lambda x, w: jnp.dot(x, w)), (x_nk, w_km)),
        "fp8_matmul (quantise + fp8 dot + scale)": (
            jax.jit(lambda x, w, m: precision.fp8_matmul(cfg, x, w, m)), (x_nk, w_km, meta)),
        "fp8 dot of pre-quantised e4m3": (
            jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                                                     preferred_element_type=jnp.bfloat16)), (xq_nk, wq_km)),
    }
    flops = 2.0 * n ** 3
    ref = jnp.dot(x_nk.astype(jnp.float32), w_km.astype(jnp.float32), precision="highest")
    records = []
    for name, (fn, fn_args) in impls.items():
        hlo = fn.lower(*fn_args).compile().as_text()
        gemm = fp8_gemm_lines(hlo)
        print(f"{name}: compiled; fp8 GEMM lines: {[g[:160] for g in gemm[:2]]}", file=sys.stderr, flush=True)
        seconds = median_seconds(fn, fn_args, args.runs)
        out = fn(*fn_args).astype(jnp.float32)
        if name.startswith("fp8 dot"):
            out = out * (sx * sw)
        rel_err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        records.append(dict(impl=name, device=dev, n=n, ms=seconds * 1e3, tflops=flops / seconds / 1e12,
                            rel_err_vs_fp32=rel_err, fp8_gemm_in_hlo=bool(gemm),
                            cublaslt_fp8=any("__cublas$lt$matmul$f8" in s for s in gemm),
                            fp8_gemm_hlo=[s[:300] for s in gemm[:3]]))
        print(json.dumps(records[-1]), file=sys.stderr, flush=True)
    base = records[0]["tflops"]
    for rec in records:
        rec["vs_bf16"] = rec["tflops"] / base
    fp8_ok = all(rec["fp8_gemm_in_hlo"] for rec in records[1:])
    return dict(device=dev, platform=device.platform, jax=jax.__version__, runs=args.runs,
                fp8_runs_in_fp8=fp8_ok, records=records)


def gpu_table(result: dict) -> str:
    lines = [f"[{result['runs']} timed runs, median, after warm-up] fp8 path compiled to an fp8 GEMM: "
             f"{result['fp8_runs_in_fp8']}",
             "", "| device | impl | N | ms | TFLOP/s | x bf16 | rel err vs fp32 | fp8 GEMM in HLO | cuBLASLt fp8 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["records"]:
        lines.append(f"| {r['device']} | {r['impl']} | {r['n']} | {r['ms']:.3f} | {r['tflops']:.1f} "
                     f"| {r['vs_bf16']:.2f} | {r['rel_err_vs_fp32']:.2e} | {r['fp8_gemm_in_hlo']} "
                     f"| {r['cublaslt_fp8']} |")
    return "\n".join(lines)


# --- Main ------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                   help="folder for precision.{json,md,png} (CPU) or precision_gpu.{json,md} (--gpu)")
    p.add_argument("--gpu", action="store_true", help="fp8 vs bf16 matmul throughput on one GPU")
    p.add_argument("--steps", type=int, default=300, help="training steps of every trained row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", type=lambda s: s.split(","), default=None,
                   help="comma list of trained rows to run (fp32 always needed)")
    p.add_argument("--bits", type=int, default=4, help="EfficientQAT / round-to-nearest bits")
    p.add_argument("--group-size", type=int, default=64, help="EfficientQAT / round-to-nearest group size")
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--block-steps", type=int, default=200)
    p.add_argument("--e2e-steps", type=int, default=100)
    p.add_argument("--matmul-size", type=int, default=8192, help="--gpu: N of the [N, N] x [N, N] matmul")
    p.add_argument("--runs", type=int, default=10, help="--gpu: timed runs (median) after warm-up; >= 5")
    args = p.parse_args(argv)
    if args.runs < 5:
        p.error(f"--runs={args.runs} must be >= 5")
    if args.steps < 1:
        p.error(f"--steps={args.steps} must be positive")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/precision.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.gpu:
        if jax.default_backend() != "gpu":
            p.error(f"--gpu needs a GPU; jax's default backend is {jax.default_backend()!r}")
        result, stem = run_gpu(args), "precision_gpu"
        md = gpu_table(result)
    else:
        result, stem = run_cpu(args), "precision"
        md = cpu_table(result)
        cpu_plot(result, out / f"{stem}.png")
    result["command"] = command.strip()
    print(md)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(f"`{result['command']}`\n\n{md}\n")


if __name__ == "__main__":
    main()
