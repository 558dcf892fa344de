"""Fine-tuning the published ESM-2 models: compiled train-step memory per device for each technique mix.

For each ESM-2 size (Lin et al. 2023: 8M to 15B parameters) this writes the model's Hugging
Face ``config.json`` (the sizes it publishes; no weights are needed: ``--init-from`` takes the
shape from the config, and nothing here runs) and compiles the step ``sciscale train
protein-mlm --init-from <that folder>`` would run (``train.abstract.abstract_run``: the loop's
own step with abstract state and batch, ESM-2's layers, its tied head and token dropout), then
reads XLA's compiled memory analysis. Every row is 8 sequences of 1,024 tokens, AdamW:

- fp32: float32 everywhere, no remat (the reference);
- bf16 + remat: bfloat16 compute, every layer rematerialised (``--remat full``);
- + 8-bit Adam: the same with block-wise 8-bit moments (``--optimizer adamw_8bit``);
- ZeRO-3 over 8: bf16 + remat with AdamW, then with 8-bit Adam, sharded over ``--mesh fsdp=8 --zero 3``
  (8 simulated CPU devices), per device (FSDP is data parallel too: each device holds one of the 8
  sequences);
- LoRA r=8: bf16 + remat with rank-8 adapters on the attention projections (``--lora-rank 8``),
  every other weight frozen in bfloat16 (no gradient, no optimizer state), on one device and
  sharded as above;
- QLoRA r=8: the same with the blocks' frozen dense weights in 4-bit NormalFloat (``--lora-quant
  nf4``; embeddings, norms and the head stay bfloat16);
- QLoRA-DQ r=8: QLoRA with the scales double-quantised (``--lora-quant nf4-dq``: int8 per scale
  plus a bf16 mean and step per row, where a row holds at least 8 blocks).

Figures are per device of the program compiled for the CPU backend; the same step compiled for a
GPU is still to be measured.

    python benchmarks/esm2_memory.py                  # every size (15B takes minutes to compile)
    python benchmarks/esm2_memory.py --sizes 8M 650M  # some
    python benchmarks/esm2_memory.py --mixes "QLoRA r=8"  # some mixes, merged into the saved results

Writes benchmarks/results/esm2_memory.json and .md.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

# name: (layers, width, heads) as published; the MLP is 4x the width
SIZES = {"8M": (6, 320, 20), "35M": (12, 480, 20), "150M": (30, 640, 20), "650M": (33, 1280, 20),
         "3B": (36, 2560, 40), "15B": (48, 5120, 40)}
MIXES = {
    "fp32": (dict(precision="fp32", remat="none"), dict(optimizer="adamw")),
    "bf16 + remat": (dict(precision="bf16", remat="full"), dict(optimizer="adamw")),
    "+ 8-bit Adam": (dict(precision="bf16", remat="full"), dict(optimizer="adamw_8bit")),
    "bf16 + remat, ZeRO-3 over 8": (dict(precision="bf16", remat="full"), dict(optimizer="adamw", mesh="fsdp=8", zero=3)),
    "+ 8-bit Adam, ZeRO-3 over 8": (dict(precision="bf16", remat="full"),
                                    dict(optimizer="adamw_8bit", mesh="fsdp=8", zero=3)),
    "LoRA r=8": (dict(precision="bf16", remat="full", lora_rank=8), dict(optimizer="adamw")),
    "LoRA r=8, ZeRO-3 over 8": (dict(precision="bf16", remat="full", lora_rank=8),
                                dict(optimizer="adamw", mesh="fsdp=8", zero=3)),
    "QLoRA r=8": (dict(precision="bf16", remat="full", lora_rank=8, lora_quant="nf4"), dict(optimizer="adamw")),
    "QLoRA r=8, ZeRO-3 over 8": (dict(precision="bf16", remat="full", lora_rank=8, lora_quant="nf4"),
                                 dict(optimizer="adamw", mesh="fsdp=8", zero=3)),
    "QLoRA-DQ r=8": (dict(precision="bf16", remat="full", lora_rank=8, lora_quant="nf4-dq"),
                     dict(optimizer="adamw")),
}
GiB = 2.0 ** 30
RESULTS = pathlib.Path(__file__).parent / "results"


def esm2_config(folder: pathlib.Path, layers: int, width: int, heads: int) -> None:
    """The fields of a published ESM-2 ``config.json`` that set its shape (facebook/esm2_*)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "esm", "architectures": ["EsmForMaskedLM"], "num_hidden_layers": layers, "hidden_size": width,
        "num_attention_heads": heads, "intermediate_size": 4 * width, "vocab_size": 33, "hidden_act": "gelu",
        "position_embedding_type": "rotary", "token_dropout": True, "emb_layer_norm_before": False,
        "layer_norm_eps": 1e-5, "max_position_embeddings": 1026, "mask_token_id": 32, "pad_token_id": 1}))


def measure(name: str, folder: pathlib.Path, mixes) -> list[dict]:
    import jax

    from sciscale_jax import cli
    from sciscale_jax.memory import report_from_analysis
    from sciscale_jax.recipes import get_recipe
    from sciscale_jax.train import TrainConfig
    from sciscale_jax.train.abstract import abstract_model, abstract_run

    recipe = get_recipe("protein-mlm")
    rows = []
    for mix in mixes:
        model_kw, train_kw = MIXES[mix]
        train_cfg = TrainConfig(**{**recipe.train_defaults, "batch_size": 8, "seq_len": 1024,
                                   "init_from": str(folder), **train_kw})
        model_cfg = recipe.make_config(**cli.model_settings(recipe, {"scan_layers": True, **model_kw},
                                                            train_cfg.init_from))
        t0 = time.perf_counter()
        report = report_from_analysis(abstract_run(recipe, model_cfg, train_cfg).compile(
            analysis_only=True).memory_analysis())
        params = sum(int(x.size) for x in jax.tree.leaves(abstract_model(recipe, model_cfg, 0)[1]))
        rows.append({"size": name, "mix": mix, "parameters": params, "peak_bytes": report.peak_bytes,
                     "argument_bytes": report.argument_bytes, "temp_bytes": report.temp_bytes,
                     "compile_s": time.perf_counter() - t0, "model": {**model_kw}, "train": {**train_kw}})
        print(f"{name:>5} {mix:<16} {report.peak_bytes / GiB:8.2f} GiB per device  "
              f"({rows[-1]['compile_s']:.0f} s to compile)", flush=True)
    return rows


def table(rows) -> str:
    mixes = list(MIXES)
    lines = ["Compiled train-step peak per device (GiB), `sciscale train protein-mlm --init-from <ESM-2>`, "
             "8 x 1,024 tokens, AdamW or 8-bit AdamW (LoRA: AdamW on the rank-8 adapters of the attention "
             "projections, the rest frozen in bf16; QLoRA: the blocks' frozen dense weights in 4-bit NF4; "
             "QLoRA-DQ: their scales double-quantised); "
             "CPU backend, 8 simulated devices for the ZeRO-3 columns.", "",
             "| ESM-2 | parameters | " + " | ".join(mixes) + " |", "|---|---|" + "---|" * len(mixes)]
    for size in dict.fromkeys(r["size"] for r in rows):
        got = {r["mix"]: r for r in rows if r["size"] == size}
        params = next(iter(got.values()))["parameters"]
        lines.append(f"| {size} | {params / 1e6:,.0f}M | "
                     + " | ".join(f"{got[m]['peak_bytes'] / GiB:.1f}" if m in got else "" for m in mixes) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    p.add_argument("--mixes", nargs="+", choices=list(MIXES), default=list(MIXES))
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sizes:
            folder = pathlib.Path(tmp) / f"esm2_{name}"
            esm2_config(folder, *SIZES[name])
            rows += measure(name, folder, args.mixes)
    import jax
    saved = RESULTS / "esm2_memory.json"
    if saved.exists():  # rows of sizes and mixes not measured now are kept
        done = {(r["size"], r["mix"]) for r in rows}
        kept = [r for r in json.loads(saved.read_text())["rows"] if (r["size"], r["mix"]) not in done]
        order = {(s, m): i for i, (s, m) in enumerate((s, m) for s in SIZES for m in MIXES)}
        rows = sorted(kept + rows, key=lambda r: order.get((r["size"], r["mix"]), len(order)))
    out = {"device": f"CPU backend ({jax.device_count()} simulated devices), compiled memory analysis",
           "jax": jax.__version__, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "esm2_memory.json").write_text(json.dumps(out, indent=1))
    (RESULTS / "esm2_memory.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
