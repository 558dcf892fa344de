"""ESM-2's contact maps: compiled memory of ``sciscale embed --contacts`` against keeping every map.

``models.esm.contacts`` reduces each layer's attention maps (symmetrise, APC, the regression's
weights) into one [batch, L, L] sum before the next layer's maps are formed; Hugging Face's
``predict_contacts`` stacks every layer's and head's maps first ([batch, layers, heads, L, L],
then the head). Both are compiled here for the published ESM-2 shapes (``esm2_memory.SIZES``,
abstract weights: nothing is read or run) at one protein of L tokens, float32, and XLA's compiled
memory analysis read: ``per layer`` is ours, ``all maps`` the same computation with the maps of
every layer stacked before the head. ``maps`` is the float32 size of every layer's maps. CPU
backend; on a GPU still to be measured.

    python benchmarks/esm_contacts_memory.py                   # 8M, 150M, 650M at L = 512, 1024
    python benchmarks/esm_contacts_memory.py --sizes 3B --lengths 1024

Writes benchmarks/results/esm_contacts_memory.{json,md}.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from esm2_memory import SIZES, esm2_config  # noqa: E402

from sciscale_jax.data import ProteinTokenizer  # noqa: E402
from sciscale_jax.memory import report_from_analysis  # noqa: E402
from sciscale_jax.models import attention_maps, esm  # noqa: E402
from sciscale_jax.recipes import get_recipe  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
MiB = 2.0 ** 20


def all_maps(model, tokens, mask, head, eos_id):
    """Hugging Face's order: every map stacked [batch, layers, heads, L, L], then the head."""
    weight, bias = head
    seq = tokens.shape[1]
    keep = mask & (jnp.arange(seq) > 0)[None] & (tokens != eos_id)
    both = (keep[:, :, None] & keep[:, None, :])[:, None, None].astype(jnp.float32)
    a = jnp.stack(attention_maps(model, tokens, mask_bs=mask), axis=1) * both
    a = a + jnp.swapaxes(a, -1, -2)
    a = a - a.sum(-1, keepdims=True) * a.sum(-2, keepdims=True) / a.sum((-1, -2), keepdims=True)
    return jax.nn.sigmoid(jnp.einsum("blhqk,lh->bqk", a, jnp.asarray(weight, jnp.float32)) + bias)


def measure(name: str, length: int) -> dict:
    layers, width, heads = SIZES[name]
    tok = ProteinTokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp) / name
        esm2_config(folder, layers, width, heads)
        cfg = get_recipe("protein-mlm").make_config(**esm.settings(folder, tok.tokens), max_len=max(1026, length))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: get_recipe("protein-mlm").build_model(cfg, nnx.Rngs(0))))
    head = (np.zeros((layers, heads), np.float32), 0.0)
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, length), jnp.bool_)
    out = {"size": name, "layers": layers, "heads": heads, "length": length,
           "maps_mib": layers * heads * length * length * 4 / MiB}
    for key, fn in (("per_layer", lambda m, t, k: esm.contacts(m, t, k, head, eos_id=tok.eos_id)),
                    ("all_maps", lambda m, t, k: all_maps(m, t, k, head, tok.eos_id))):
        run = jax.jit(lambda s, t, k, fn=fn: fn(nnx.merge(graphdef, s), t, k))
        report = report_from_analysis(run.lower(state, tokens, mask).compile().memory_analysis())
        out[f"{key}_mib"] = report.peak_bytes / MiB
        out[f"{key}_weights_mib"] = report.argument_bytes / MiB
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["8M", "150M", "650M"])
    p.add_argument("--lengths", nargs="+", type=int, default=[512, 1024])
    args = p.parse_args()
    rows = []
    for name in args.sizes:
        for length in args.lengths:
            rows.append(measure(name, length))
            r = rows[-1]
            print(f"{name} L={length}: per layer {r['per_layer_mib']:.1f} MiB, all maps {r['all_maps_mib']:.1f} MiB "
                  f"(weights {r['per_layer_weights_mib']:.1f}, every map {r['maps_mib']:.1f})", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "esm_contacts_memory.json").write_text(json.dumps(
        {"device": f"CPU backend ({jax.devices()[0].platform}), compiled memory analysis", "rows": rows}, indent=1))
    lines = ["| ESM-2 | L | every layer's maps (float32) | compiled peak, all maps kept | compiled peak, per layer "
             "(ours) | of which weights |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['length']} | {r['maps_mib']:,.0f} MiB | {r['all_maps_mib']:,.0f} MiB | "
                     f"{r['per_layer_mib']:,.0f} MiB | {r['per_layer_weights_mib']:,.0f} MiB |")
    (RESULTS / "esm_contacts_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
