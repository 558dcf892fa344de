"""Compression on the smiles-lm recipe: train-step memory, validation loss and deployable weight bytes.

CPU mode (default). A small causal SMILES language model (the ``smiles-lm`` recipe with
explicit overrides: 2 layers, embed 128, MLP 384, seq 64, batch 32; ``--task protein-mlm``
runs the earlier protein MLM instead) is trained with ``sciscale_jax.train.train`` for the
same steps, seed and batches under each precision policy (fp32, bf16, fp16 with dynamic loss
scaling, fp8) and each QAT scheme (LLM-QAT W4A8KV4, BitNet, BitNet b1.58). EfficientQAT
(4-bit, group 64: Block-AP then E2E-QP on the recipe's loss) and its round-to-nearest
baseline are applied to the trained fp32 model, and so are two negative controls that must
visibly fail: 2-bit round-to-nearest with one group per output column over 128 inputs, and
every block kernel replaced by random signs times its mean magnitude. For each row:

- the compiled per-device train-step memory (XLA memory analysis of the loop's jitted step,
  compiled with ``remat.compiler_options()``);
- the validation loss (nats per token, held-out molecules), its gap to fp32, and the
  context gain: how far it lies below the recipe's baselines on the same tokens (unigram,
  the context-free predictor of a causal LM; the best add-k n-gram, the short-context one),
  and the share of fp32's gain below the n-gram that the row keeps;
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

    python benchmarks/precision.py                   # CPU, smiles-lm: ~7 min per trained row on 2 busy cores
    python benchmarks/precision.py --gpu --out DIR   # one GPU (benchmarks/gpu_check.sh runs it)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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
    if name == "random_sign":  # block kernels stored as sign bits and one scale, as BitNet's
        return deployable_bytes(model, lambda k, d, shape: quant.packed_weight_bytes("bitnet", shape)
                                if k.startswith("layers/") else None)
    if frozen is not None:  # EfficientQAT / round-to-nearest: the frozen kernels
        return deployable_bytes(model, lambda k, d, shape: quant.packed_weight_bytes(
            "efficient_qat", shape, bits=bits, group_size=group_size) if k in frozen else None)
    qat = (quant.QATMatmul, quant.BitMatmul)
    return deployable_bytes(model, lambda k, d, shape: quant.packed_weight_bytes(name, shape)
                            if isinstance(d.matmul, qat) else None)


# --- CPU mode --------------------------------------------------------------------------------

# Tasks the CPU mode can train on: recipe name, model overrides, train overrides. Every row of
# one run uses the same configs, seed and batches.
TASKS = {
    # Causal SMILES LM: the context-free predictor is the unigram, the n-gram the short-context
    # baseline; at this budget the fp32 model ends well below both (see README).
    "smiles-lm": ("smiles-lm",
                  dict(vocab_size=104, num_layers=2, num_heads=4, embed_dim=128, mlp_dim=384, max_len=64,
                       causal=True, smiles_form="aromatic"),
                  dict(batch_size=32, seq_len=64, learning_rate=3e-3)),
    # The protein MLM of the earlier table (its figures sat on a context-free floor; kept for comparison).
    "protein-mlm": ("protein-mlm",
                    dict(vocab_size=32, num_layers=2, num_heads=4, embed_dim=64, mlp_dim=256, max_len=64),
                    dict(batch_size=16, seq_len=64, learning_rate=2e-3)),
}


def task_configs(task: str, steps: int, seed: int):
    """(recipe, model config, train config) of ``task`` with every setting explicit."""
    from sciscale_jax.recipes import get_recipe
    from sciscale_jax.train import TrainConfig
    name, model_over, train_over = TASKS[task]
    recipe = _cached_data(get_recipe(name))
    model = recipe.make_config(**model_over, precision="fp32", quant="none")
    run = TrainConfig(steps=steps, warmup_steps=max(1, steps // 10), eval_every=10 ** 6, save_every=10 ** 6,
                      log_every=10 ** 6, seed=seed, **train_over)
    return recipe, model, run


_DATA: dict = {}


def _cached_data(recipe):
    """``recipe`` whose ``build_data`` is built once per batch size, sequence length, seed and
    data-relevant model settings: every row trains on the very same data object."""
    build = recipe.build_data

    def build_data(train_cfg, model_cfg):
        key = (recipe.name, train_cfg.batch_size, train_cfg.seq_len, train_cfg.seed,
               repr(dataclasses.replace(model_cfg, precision="fp32", quant="none")))
        if key not in _DATA:
            _DATA[key] = build(train_cfg, model_cfg)
        return _DATA[key]

    return dataclasses.replace(recipe, build_data=build_data)


def baseline_losses(baselines: dict) -> dict:
    """Recipe baselines given as perplexities (``unigram_ppl``, ``ngram5_ppl``) or losses, in nats."""
    out = {}
    for k, v in baselines.items():
        if k.endswith("_ppl"):
            out[k[:-4]] = math.log(v)
        elif k.endswith("_loss"):
            out[k[:-5]] = float(v)
    return out


def val_loss(recipe, model: nnx.Module, eval_batches) -> float:
    from sciscale_jax.train import evaluate, make_eval_step
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return evaluate(jax.jit(make_eval_step(graphdef, recipe.loss_fn)), params, rest, eval_batches)["loss"]


def block_kernels(model: nnx.Module) -> dict:
    """Flat ``"layers/i/.../kernel"`` keys of every kernel inside the Transformer blocks."""
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return {"/".join(map(str, p)): p for p in flat if p[0] == "layers" and p[-1] == "kernel"}


def random_sign_weights(model: nnx.Module, seed: int) -> None:
    """Negative control: every block kernel replaced by random signs times its mean |w| (the
    scale of a 1-bit kernel, the information gone); embedding, norms and head kept."""
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    flat = traverse_util.flatten_dict(pure)
    rng = np.random.default_rng(seed)
    for path in block_kernels(model).values():
        w = np.asarray(flat[path])
        flat[path] = jnp.asarray(np.where(rng.random(w.shape) < 0.5, -1.0, 1.0) * np.abs(w).mean(), w.dtype)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
    nnx.update(model, state)


def efficient_qat(recipe, model, calib_batch, e2e_batches, *, bits, group_size, block_steps, eqat_example):
    """EfficientQAT (Block-AP, then E2E-QP on the recipe's own loss) of the trained ``model``."""
    x_bse, apply = eqat_example.block_stream(model, calib_batch)
    per_block = quant.block_ap_sequential(list(model.layers), x_bse, apply=apply, bits=bits, group_size=group_size,
                                          steps=block_steps, learning_rate=1e-4, qparam_learning_rate=1e-3)
    frozen = {f"layers/{i}/{k}": fw for i, blk in enumerate(per_block) for k, fw in blk.items()}

    def loss_fn(m, batch):
        total, count = recipe.loss_fn(m, batch, None)
        return total / jnp.maximum(count, 1.0)

    return quant.e2e_qp(model, frozen, loss_fn, e2e_batches, learning_rate=1e-4)


def _cpu_imports():
    """The training stack, imported only in CPU mode (the --gpu check needs none of it)."""
    from sciscale_jax.train import train
    sys.path.insert(0, str(ROOT / "examples"))
    import efficient_qat as eqat_example  # examples/efficient_qat.py: block_stream, round_to_nearest
    return train, eqat_example


def run_cpu(args, write) -> dict:
    """Train and measure every row; ``write(result)`` is called after each row (partial results)."""
    train, eqat_example = _cpu_imports()
    recipe, base_model, base_train = task_configs(args.task, args.steps, args.seed)
    data = recipe.build_data(base_train, base_model)
    bits, g = args.bits, args.group_size
    cg = base_model.embed_dim  # control: one 2-bit group per output column over embedding-sized inputs
    result = dict(device=f"{jax.devices()[0].device_kind} ({jax.default_backend()})", jax=jax.__version__,
                  task=args.task, recipe=recipe.name, model=base_model.to_dict(), train=base_train.to_dict(),
                  eval_batches=len(data.eval),
                  efficient_qat=dict(bits=bits, group_size=g, calib_batches=args.calib_batches,
                                     block_steps=args.block_steps, e2e_steps=args.e2e_steps),
                  records=[])
    records, fp32 = result["records"], {}

    def trained(name, prec, scheme):
        model_cfg = dataclasses.replace(base_model, precision=prec, quant=scheme)
        with tempfile.TemporaryDirectory() as run_dir:
            r = train(recipe, model_cfg, base_train, run_dir, progress=False, log=lambda *a: None)
        model = eqat_example.model_from_state(model_cfg, r["state"])
        scale = {k: float(v) for k, v in precision.loss_scale_metrics(r["state"].opt_state).items()}
        if name == "fp32":
            fp32.update(state=r["state"])
            result["baselines"] = baseline_losses(r["baselines"])
        return dict(name=name, precision=prec, quant=scheme, val_loss=r["val_loss"], train_loss=r["train_loss"],
                    memory=r["memory"].as_dict(), param_bytes=r["param_bytes"], opt_state_bytes=r["opt_state_bytes"],
                    deploy_bytes=scheme_bytes(model, name), train_seconds=r["seconds"],
                    loss_scale=scale["loss_scale"], skipped_steps=int(scale["skipped_steps"]))

    def post(name, quant_name, model, frozen=None, bits=4, group_size=64, bytes_name="rtn", **extra):
        deploy = scheme_bytes(model, bytes_name, frozen=frozen, bits=bits, group_size=group_size)
        return dict(name=name, precision="fp32", quant=quant_name, val_loss=val_loss(recipe, model, data.eval),
                    memory=None, deploy_bytes=deploy, **extra)

    def fp32_model():
        return eqat_example.model_from_state(base_model, fp32["state"])

    def rtn(name, quant_name, bits_, group, **extra):
        model = fp32_model()
        frozen = eqat_example.round_to_nearest(model, bits=bits_, group_size=group)
        return post(name, quant_name, model, frozen, bits_, group, **extra)

    def random_sign():
        model = fp32_model()
        random_sign_weights(model, args.seed)
        return post("control_random_sign", "negative control: block kernels = random signs x mean |w|", model,
                    bytes_name="random_sign", control=True)

    def eqat():
        t0 = time.perf_counter()
        model = fp32_model()
        calib = eqat_example.concat_batches([data.train.batch(eqat_example.CALIB_STEP0 + i)
                                             for i in range(args.calib_batches)])
        e2e = [data.train.batch(eqat_example.E2E_STEP0 + i) for i in range(args.e2e_steps)]
        frozen = efficient_qat(recipe, model, calib, e2e, bits=bits, group_size=g, block_steps=args.block_steps,
                               eqat_example=eqat_example)
        return post(f"efficient_qat_w{bits}g{g}", "EfficientQAT (Block-AP + E2E-QP)", model, frozen, bits, g,
                    bytes_name="efficient_qat", train_seconds=time.perf_counter() - t0)

    # Cheapest and most telling rows first, so an interrupted run still has fp32 and the controls.
    trained_rows = {name: (prec, scheme) for name, prec, scheme in TRAINED}
    plan = [("fp32", lambda: trained("fp32", "fp32", "none")),
            ("control_random_sign", random_sign),
            (f"control_rtn_w2g{cg}", lambda: rtn(f"control_rtn_w2g{cg}", "negative control: 2-bit round-to-nearest "
                                                 "(post-training)", 2, cg, control=True)),
            (f"rtn_w{bits}g{g}", lambda: rtn(f"rtn_w{bits}g{g}", "round-to-nearest (post-training)", bits, g))]
    plan += [(name, functools.partial(trained, name, *trained_rows[name]))
             for name in ("bf16", "llm_qat_w4a8kv4", "bitnet158", "fp8", "fp16", "bitnet")
             if not args.only or name in args.only]
    plan.append((f"efficient_qat_w{bits}g{g}", eqat))
    # Table order: trained rows, post-training rows, then the negative controls.
    order = [n for n, _, _ in TRAINED] + [f"rtn_w{bits}g{g}", f"efficient_qat_w{bits}g{g}",
                                          f"control_rtn_w2g{cg}", "control_random_sign"]
    for name, make in plan:
        records.append(make())
        records.sort(key=lambda r: order.index(r["name"]))
        rec = next(r for r in records if r["name"] == name)
        print(json.dumps({k: v for k, v in rec.items() if k != "memory"}), file=sys.stderr, flush=True)
        derive(result)
        write(result)
    return result


def derive(result: dict) -> None:
    """Gaps to fp32 and context gains below each baseline, in place."""
    ref = next(r for r in result["records"] if r["name"] == "fp32")["val_loss"]
    ref_bytes = next(r for r in result["records"] if r["name"] == "fp32")["deploy_bytes"]
    for rec in result["records"]:
        rec["vs_fp32"] = rec["val_loss"] - ref  # nats
        rec["vs_fp32_rel"] = rec["val_loss"] / ref - 1.0
        for k, b in result["baselines"].items():  # context gain: nats below each baseline, and its share of fp32's
            rec[f"gain_{k}"] = b - rec["val_loss"]
            rec[f"gain_{k}_kept"] = (b - rec["val_loss"]) / (b - ref)
        rec["deploy_vs_fp32"] = rec["deploy_bytes"] / ref_bytes


def cpu_table(result: dict) -> str:
    m, t, base = result["model"], result["train"], result["baselines"]
    names = list(base)
    ref = next(k for k in names if k.startswith("ngram")) if any(k.startswith("ngram") for k in names) else names[-1]
    lines = [
        f"{result['recipe']}, {m['num_layers']} layers, embed {m['embed_dim']}, mlp {m['mlp_dim']}, "
        f"seq {t['seq_len']}, batch {t['batch_size']}, {t['steps']} steps, lr {t['learning_rate']:g}, "
        f"seed {t['seed']}; device: {result['device']}. Validation loss in nats per token on the held-out "
        f"split; baselines on the same tokens: " + ", ".join(f"{k} {v:.4f}" for k, v in base.items()) + ". "
        "On CPU, bf16/fp16/fp8 arithmetic is emulated by XLA: memory shows storage, not speed. Memory: compiled "
        "train step (the loop's XLA options), per device. Deployable weights: QAT figures are inference figures. "
        f"Context gain: nats below {ref}; 'kept' is its share of fp32's.",
        "",
        "| scheme | train-step peak MiB | temp MiB | val loss | vs fp32 (nats) | "
        + " | ".join(f"below {k}" for k in names) + f" | {ref} gain kept | deployable weights KiB | x fp32 |",
        "|---|---|---|---|---|" + "---|" * len(names) + "---|---|---|",
    ]
    for r in result["records"]:
        mem = r["memory"]
        peak = "post-training" if mem is None else f"{mem['peak_bytes'] / MiB:.2f}"
        temp = "n/a" if mem is None else f"{mem['temp_bytes'] / MiB:.2f}"
        gains = " | ".join(f"{r[f'gain_{k}']:+.3f}" for k in names)
        lines.append(f"| {r['name']} | {peak} | {temp} | {r['val_loss']:.4f} | {r['vs_fp32']:+.4f} | {gains} "
                     f"| {r[f'gain_{ref}_kept']:.1%} | {r['deploy_bytes'] / KiB:.1f} | {r['deploy_vs_fp32']:.3f} |")
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
        ("validation loss (nats/token)", [r["val_loss"] for r in recs]),
        ("deployable weights (KiB)", [r["deploy_bytes"] / KiB for r in recs]),
    ]
    for ax, (title, values) in zip(axes, panels):
        ax.barh(y, np.nan_to_num(values), color=["C3" if r.get("control") else "C0" for r in recs])
        for yi, v in zip(y, values):
            if math.isnan(v):
                ax.text(0, yi, " n/a (post-training)", va="center", fontsize=8, color="#666")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.locator_params(axis="x", nbins=5)
    for i, (k, v) in enumerate(result["baselines"].items()):
        axes[1].axvline(v, color=f"C{i + 1}", ls="--", lw=1, label=f"{k} {v:.3f}")
    axes[1].legend(fontsize=7, loc="lower right")
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    t = result["train"]
    fig.suptitle(f"{result['recipe']} compression, {t['steps']} steps, {result['device']} "
                 "(low precision emulated on CPU; QAT bytes are inference figures; red: negative controls)",
                 fontsize=10)
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
    p.add_argument("--task", choices=sorted(TASKS), default="smiles-lm", help="CPU mode: the recipe trained")
    p.add_argument("--steps", type=int, default=200, help="training steps of every trained row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", type=lambda s: s.split(","), default=None,
                   help="comma list of trained rows to run (fp32 always runs)")
    p.add_argument("--from-json", action="store_true", help="CPU mode: only redraw table and plot from --out's JSON")
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
        stem = "precision"

        def write(partial):
            partial["command"] = command.strip()
            (out / f"{stem}.json").write_text(json.dumps(partial, indent=1))
            (out / f"{stem}.md").write_text(f"`{partial['command']}`\n\n{cpu_table(partial)}\n")

        if args.from_json:  # re-render the table and plot of a finished (or partial) run
            result = json.loads((out / f"{stem}.json").read_text())
        else:
            result = run_cpu(args, write)
        md = cpu_table(result)
        cpu_plot(result, out / f"{stem}.png")
    result["command"] = result.get("command", command.strip())
    print(md)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(f"`{result['command']}`\n\n{md}\n")


if __name__ == "__main__":
    main()
