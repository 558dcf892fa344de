"""End-to-end training throughput and model FLOPs utilisation (MFU) of the protein Transformer.

One jitted train step (``sciscale_jax.train.make_train_step``: forward, backward, AdamW
update) of ``sciscale_jax.models.Transformer`` on one device, at about 350M or 1B
parameters, with a technique mix chosen by flags (precision policy, attention, remat,
scan_layers, batch, seq). Reports tokens/s, model TFLOP/s and MFU against a stated peak.

Model FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B; no remat recomputation
counted, so remat lowers MFU):

    6 * N_matmul + 6 * L * S * E * (0.5 if causal else 1)

N_matmul counts the weights that multiply activations (every Dense kernel: q, k, v, out,
the MLP matrices and the output head); the embedding table is a lookup and norms are
elementwise, so neither counts. The attention term is QK^T and AV: 2 matmuls of
2 * S * E FLOPs per token per layer forward, times 3 for forward+backward (PaLM's 12*L*S*E
counts both halves of a causal product; a kernel that skips masked blocks does half).
MFU = model FLOPs per step / step time / peak. The peak defaults to 989 TFLOP/s, NVIDIA's
dense bf16 figure for H100/H200 SXM (``--peak-tflops`` overrides it).

    python benchmarks/mfu_gpu.py --size 1b --out benchmarks/results
    python benchmarks/mfu_gpu.py --tiny          # CPU smoke test of the code path
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
import optax
from flax import nnx

from sciscale_jax.models import Transformer, TransformerConfig
from sciscale_jax.train import init_train_state, make_train_step
from sciscale_jax.losses import token_cross_entropy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import median_seconds  # noqa: E402  (benchmarks/timing.py)

H100_H200_DENSE_BF16_TFLOPS = 989.0
PROTEIN_VOCAB = 33  # ESM-style amino-acid vocabulary

# name: (num_layers, embed_dim, num_heads, mlp_dim); head_dim 128, SwiGLU MLP.
SIZES = {
    "tiny": (2, 64, 2, 192),
    "350m": (28, 1024, 8, 2816),
    "1b": (20, 2048, 16, 5632),
}


def model_config(size: str, *, seq: int, precision: str, attention: str, remat: str, scan_layers: bool,
                 causal: bool) -> TransformerConfig:
    """The benchmark's TransformerConfig; technique switches are gathered here so a change in
    how the config nests them touches this function only."""
    layers, embed, heads, mlp = SIZES[size]
    return TransformerConfig(vocab_size=PROTEIN_VOCAB, num_layers=layers, num_heads=heads, embed_dim=embed,
                             mlp_dim=mlp, max_len=seq, causal=causal, precision=precision,
                             attention=attention, remat=remat, scan_layers=scan_layers)


def matmul_params(num_layers: int, embed: int, mlp: int, vocab: int, swiglu: bool = True) -> int:
    """Weights multiplied by activations: per layer q, k, v, out (4 E^2) and the MLP
    (3 E M for SwiGLU, 2 E M for GELU), plus the output head E V (and its bias is not a matmul)."""
    per_layer = 4 * embed * embed + (3 if swiglu else 2) * embed * mlp
    return num_layers * per_layer + embed * vocab


def flops_per_token(n_matmul: int, num_layers: int, seq: int, embed: int, causal: bool) -> float:
    """Model FLOPs per token of one training step (forward + backward), as in the module docstring."""
    return 6.0 * n_matmul + 6.0 * num_layers * seq * embed * (0.5 if causal else 1.0)


def unmasked_mlm_loss(model, batch, key):
    """MLM loss on full-length sequences: no padding mask, so every attention impl (cuDNN too)
    runs without a materialised mask; the loss is over the positions ``weights`` marks."""
    logits = model(batch["inputs"], dropout_key=key)
    return token_cross_entropy(logits, batch["targets"], batch["weights"])


def make_batch(batch: int, seq: int, seed: int = 0):
    r = np.random.default_rng(seed)
    targets = r.integers(4, 24, size=(batch, seq), dtype=np.int32)
    chosen = r.random((batch, seq)) < 0.15
    inputs = np.where(chosen, 32, targets).astype(np.int32)   # 32: a mask token
    return {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets),
            "weights": jnp.asarray(chosen, jnp.float32)}


def _peak_bytes(device) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - CPU devices may not report
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


def measure(args) -> dict:
    device = jax.devices()[0]
    cfg = model_config(args.size, seq=args.seq, precision=args.precision, attention=args.attention,
                       remat=args.remat, scan_layers=args.scan_layers, causal=args.causal)
    t0 = time.perf_counter()
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tx = optax.adamw(args.lr, weight_decay=0.01)
    graphdef, state = init_train_state(model, tx)
    del model
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    n_matmul = matmul_params(cfg.num_layers, cfg.embed_dim, cfg.mlp_dim, cfg.vocab_size, cfg.mlp == "swiglu")
    step = jax.jit(make_train_step(graphdef, tx, loss_fn=unmasked_mlm_loss), donate_argnums=0)
    batch = make_batch(args.batch, args.seq)
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0

    holder = {"state": state}

    def run_step(b):  # the state is donated: carry it across calls
        holder["state"], metrics = compiled(holder["state"], b)
        return metrics

    seconds = median_seconds(run_step, (batch,), args.steps)  # 2 untimed steps, then the median of `steps`
    loss = float(run_step(batch)["loss"])
    tokens = args.batch * args.seq
    fpt = flops_per_token(n_matmul, cfg.num_layers, args.seq, cfg.embed_dim, cfg.causal)
    model_tflops = fpt * tokens / seconds / 1e12
    return dict(
        device=device.device_kind, backend=jax.default_backend(), jax=jax.__version__, size=args.size,
        params=n_params, matmul_params=n_matmul, num_layers=cfg.num_layers, embed_dim=cfg.embed_dim,
        num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim, batch=args.batch, seq=args.seq, causal=cfg.causal,
        precision=cfg.precision, attention=cfg.attention, remat=cfg.remat, scan_layers=cfg.scan_layers,
        optimizer="adamw", step_ms=seconds * 1e3, tokens_per_s=tokens / seconds,
        flops_per_token=fpt, model_tflops=model_tflops, peak_tflops=args.peak_tflops,
        mfu=model_tflops / args.peak_tflops, compile_s=compile_s, loss=loss,
        peak_bytes=_peak_bytes(device), timed_steps=args.steps,
        flops_formula="6*N_matmul + 6*L*S*E*(0.5 if causal else 1) per token")


def table(rec: dict) -> str:
    mem = "-" if rec["peak_bytes"] is None else f"{rec['peak_bytes'] / 2**30:.1f}"
    return "\n".join([
        "| device | size | params | L x E x H x M | batch x seq | precision | attention | remat | scan "
        "| step ms | tokens/s | model TFLOP/s | MFU | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {rec['device']} | {rec['size']} | {rec['params'] / 1e6:.0f}M | {rec['num_layers']}x{rec['embed_dim']}"
        f"x{rec['num_heads']}x{rec['mlp_dim']} | {rec['batch']}x{rec['seq']} | {rec['precision']} "
        f"| {rec['attention']} | {rec['remat']} | {rec['scan_layers']} | {rec['step_ms']:.1f} "
        f"| {rec['tokens_per_s']:,.0f} | {rec['model_tflops']:.1f} | {100 * rec['mfu']:.1f}% | {mem} |",
    ])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="350m")
    p.add_argument("--tiny", action="store_true", help="tiny model, batch 2 x seq 64: a CPU smoke test")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--attention", default="auto", help="front-door impl; auto picks cuDNN on CUDA")
    p.add_argument("--remat", default="none")
    p.add_argument("--no-scan", dest="scan_layers", action="store_false")
    p.add_argument("--causal", action="store_true", help="decoder (causal) instead of the MLM encoder")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median); >= 5")
    p.add_argument("--peak-tflops", type=float, default=H100_H200_DENSE_BF16_TFLOPS,
                   help="the device's dense peak for MFU (default: H100/H200 SXM bf16)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    if args.tiny:
        args.size, args.batch, args.seq = "tiny", 2, 64
    if args.steps < 5:
        p.error(f"--steps={args.steps} must be >= 5")
    rec = measure(args)
    print(table(rec))
    print(f"MFU = model FLOPs ({rec['flops_formula']}) / step time / {args.peak_tflops:.0f} TFLOP/s peak; "
          f"median of {rec['timed_steps']} timed steps after 2 untimed; compile {rec['compile_s']:.1f} s")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"mfu_gpu_{rec['size']}.json")
    with open(path, "w") as f:
        json.dump(rec, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
