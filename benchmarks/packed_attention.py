"""Attention on packed rows: tiles whose segments cannot meet skipped, or computed and masked.

Segment ids are those of protein-mlm's packed training batches (``--pack``: whole proteins of the
2,100 bacterial proteins shipped in pyhmmer, median length 276, end to end), numbered along each
row as the Transformer hands them to attention (``segment_runs``).

1. Attention alone, forward + backward (jitted, fastest of ``--reps`` interleaved calls after a warm-up), at
   each ``--seq-lens`` length with ``--tokens`` tokens per call (so rows = tokens / length), 4 heads
   of 32 (the recipe's default model), float32: ``xla`` with the ids as a [B, 1, Q, K] mask (what
   ``auto`` takes on CPU below 2,048 positions), and ``chunked`` at each of ``--tiles``, computing
   every tile (``_tile_map`` patched to None) and skipping those whose ids cannot meet in any row
   (the library's code). The share of tiles skipped is counted with ``tiles_meeting``, for the
   batch and, for comparison, for each row alone.
   ``--impls`` adds front-door implementations with the ids (``flash`` compares them tile by tile
   and skips too, also timed computing every tile; the others get them as a mask; ``auto`` is
   recorded with what it resolved to). ``--dtype``, ``--heads`` and ``--head-dim`` set the inputs
   (a GPU run: bfloat16 at ESM-2 650M's 20 heads of 64; ``benchmarks/gpu_check.sh``). Each one's
   q/k/v gradients are compared with xla's on float32 copies of the inputs (``grad_err``).
2. ``--steps`` training steps of protein-mlm ``--pack --attention chunked`` (recipe defaults, batch
   8) at ``--train-seq-lens``: the loop's own step time (``metrics.jsonl``, compile excluded), the
   fastest of ``--rounds`` interleaved runs, as the library runs it (on CPU 128 x 128 tiles, skipped)
   and as it ran before tile skipping (every tile of 256 x 512, patched).

Times are ratios to a baseline measured in the same process on the same device.

    python benchmarks/packed_attention.py        # results/packed_attention_<device>.{json,md}
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from sciscale_jax import attention
from sciscale_jax.attention import chunked
from sciscale_jax.models.transformer import segment_runs
from sciscale_jax.recipes import get_recipe
from sciscale_jax.train import TrainConfig

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from packing import _run as step_time  # noqa: E402  (the loop's step time from metrics.jsonl, and peak)

RESULTS = pathlib.Path(__file__).parent / "results"
HEADS, HEAD_DIM = 4, 32


@contextlib.contextmanager
def flash_every_tile():
    """The Pallas flash kernel computing every tile (its per-tile skip on the ids' ranges patched out;
    the ids still mask inside each tile)."""
    from sciscale_jax.kernels import flash_attention as kernel
    saved = kernel._unless_apart
    kernel._unless_apart = lambda cfg, body, *args, **kwargs: body
    try:
        yield
    finally:
        kernel._unless_apart = saved


@contextlib.contextmanager
def every_tile(before: bool = False):
    """Chunked attention computing every tile (``_tile_map`` patched to None: no tile map, no cond);
    ``before``: also at the tiles it used with segment ids before tile skipping (256 x 512)."""
    saved = chunked._tile_map, chunked.SEGMENT_Q_CHUNK, chunked.SEGMENT_KV_CHUNK
    chunked._tile_map = lambda spec, q_seg, kv_seg: None
    if before:
        chunked.SEGMENT_Q_CHUNK, chunked.SEGMENT_KV_CHUNK = chunked.DEFAULT_Q_CHUNK, chunked.DEFAULT_KV_CHUNK
    try:
        yield
    finally:
        chunked._tile_map, chunked.SEGMENT_Q_CHUNK, chunked.SEGMENT_KV_CHUNK = saved


def packed_ids(seq_len: int, rows: int, seed: int = 0) -> tuple[np.ndarray, float]:
    """The attention ids of a packed training batch [rows, seq_len] and its mean proteins per row."""
    recipe = get_recipe("protein-mlm")
    cfg = TrainConfig(**{**recipe.train_defaults, "seq_len": seq_len, "batch_size": rows, "seed": seed})
    data = recipe.build_data(cfg, recipe.make_config(pack=True, max_len=max(1024, seq_len)))
    pieces = data.train.batch(0)["segments"]  # 1, 2, ... per protein; 0 on the padding at a row's end
    return np.asarray(segment_runs(jnp.asarray(pieces))), float(np.mean(pieces.max(axis=1)))


def _times(fns, args, reps):
    """Fastest of ``reps`` calls of each jitted ``fns[name]`` (compiled first, under its patch),
    the calls interleaved across the functions so a slower spell of the host hits them all."""
    for fn, patch in fns.values():
        with patch():
            jax.block_until_ready(fn(*args))
    best = {name: float("inf") for name in fns}
    for _ in range(reps):
        for name, (fn, _) in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: t * 1e3 for name, t in best.items()}


def attention_alone(seq_len, tokens, tiles, reps, impls=(), dtype="float32", heads=HEADS, head_dim=HEAD_DIM):
    rows = max(1, tokens // seq_len)
    ids, pieces = packed_ids(seq_len, rows)
    rng = np.random.default_rng(0)
    q, k, v, cot = (jnp.asarray(rng.normal(size=(rows, seq_len, heads, head_dim)), dtype) for _ in range(4))
    seg = jnp.asarray(ids)

    def fwd_bwd(attend):  # the cotangent and ids are arguments: as closure constants XLA would fold them
        def loss(q, k, v, cot, seg):
            return jnp.sum(attend(q, k, v, seg).astype(jnp.float32) * cot.astype(jnp.float32))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    def with_chunks(qc, kc):
        return lambda q, k, v, seg: attention.chunked_attention(q, k, v, segment_ids=(seg, seg), q_chunk=qc,
                                                                kv_chunk=kc)

    out = {"seq_len": seq_len, "rows": rows, "pieces_per_row": pieces, "skipped": {}}
    xla = lambda q, k, v, seg: attention.dot_product_attention(q, k, v, segment_ids=seg, impl="xla")  # noqa: E731
    fns = {"xla (ids as mask)": (fwd_bwd(xla), contextlib.nullcontext)}
    for qc, kc in tiles:
        qb, kb = min(qc, seq_len), min(kc, seq_len)
        fns[f"{qb}x{kb} every tile"] = (fwd_bwd(with_chunks(qc, kc)), every_tile)
        fns[f"{qb}x{kb} skipped"] = (fwd_bwd(with_chunks(qc, kc)), contextlib.nullcontext)
        out["skipped"][f"{qb}x{kb}"] = float(1 - np.asarray(chunked.tiles_meeting(seg, seg, qb, kb)).mean())
        meets = [np.asarray(chunked.tiles_meeting(seg[r:r + 1], seg[r:r + 1], qb, kb)) for r in range(rows)]
        out["skipped"][f"{qb}x{kb} one row"] = float(np.mean([1 - m.mean() for m in meets]))
    for name in impls:
        def front(q, k, v, seg, name=name):
            return attention.dot_product_attention(q, k, v, segment_ids=seg, impl=name)
        label = name
        if name == "auto":
            label = f"auto ({attention.resolve_impl(q, k, v, impl='auto', segments=True)})"
        try:
            attention.dot_product_attention(q[:1, :128], k[:1, :128], v[:1, :128], segment_ids=seg[:1, :128],
                                            impl=name)  # refused in one line where it cannot run here
        except (ValueError, ImportError) as err:
            out.setdefault("refused", {})[name] = str(err)
            continue
        fns[label] = (fwd_bwd(front), contextlib.nullcontext)
        if name == "flash":
            fns["flash every tile"] = (fwd_bwd(front), flash_every_tile)
    out["ms"] = _times(fns, (q, k, v, cot, seg), reps)
    # Each one's gradients against xla's with the mask on float32 copies of the same inputs: the
    # largest error over dq, dk, dv, relative to the largest reference gradient.
    want = fwd_bwd(xla)(*(x.astype(jnp.float32) for x in (q, k, v, cot)), seg)[1]
    out["grad_err"] = {}
    for name, (fn, patch) in fns.items():
        with patch():
            got = fn(q, k, v, cot, seg)[1]
        out["grad_err"][name] = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)) / jnp.max(jnp.abs(w)))
                                    for g, w in zip(got, want))
    return out


def training(seq_len, steps, rounds):
    recipe = get_recipe("protein-mlm")
    base = TrainConfig(**{**recipe.train_defaults, "steps": steps, "log_every": 5, "batch_size": 8,
                          "seq_len": seq_len, "eval_every": 10 * steps, "save_every": 10 * steps})
    model_cfg = recipe.make_config(pack=True, attention="chunked", max_len=max(1024, seq_len))
    runs = {"skip": [], "no skip": []}
    for round_ in range(rounds):
        for variant in (("skip", "no skip") if round_ % 2 == 0 else ("no skip", "skip")):
            patch = every_tile(before=True) if variant == "no skip" else contextlib.nullcontext()
            with patch, tempfile.TemporaryDirectory() as tmp:
                runs[variant].append(step_time(recipe, model_cfg, base, pathlib.Path(tmp) / "r")["seconds_per_step"])
            print(f"train {seq_len} {variant}: {runs[variant][-1] * 1e3:.0f} ms/step", flush=True)
    return {"seq_len": seq_len, **{v: min(t) * 1e3 for v, t in runs.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--tiles", type=str, nargs="+", default=["256x512", "128x128"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--impls", type=str, default="", help="front-door implementations too, e.g. flash,cudnn,auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--heads", type=int, default=HEADS)
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM)
    parser.add_argument("--train-seq-lens", type=int, nargs="*", default=[1024, 2048])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    device = jax.devices()[0].device_kind
    tiles = [tuple(int(x) for x in t.split("x")) for t in args.tiles]
    impls = [name for name in args.impls.split(",") if name]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = device.lower().replace(" ", "_")
    alone, steps = [], []

    def save():  # after every measurement, so a run cut short keeps what finished
        (out / f"packed_attention_{tag}.json").write_text(json.dumps(
            {"device": device, "jax": jax.__version__, "dtype": args.dtype, "heads": args.heads,
             "head_dim": args.head_dim, "tokens_per_call": args.tokens, "reps": args.reps,
             "attention_alone": alone, "training": {"steps": args.steps, "rounds": args.rounds, "runs": steps}},
            indent=1) + "\n")

    for seq_len in args.seq_lens:
        alone.append(attention_alone(seq_len, args.tokens, tiles, args.reps, impls, args.dtype, args.heads,
                                     args.head_dim))
        print(json.dumps(alone[-1]), flush=True)
        save()
    for seq_len in args.train_seq_lens:
        steps.append(training(seq_len, args.steps, args.rounds))
        save()
    lines = [f"Attention on packed protein rows (`python benchmarks/packed_attention.py`), device {device}: forward + "
             f"backward, {args.tokens} tokens per call, {args.heads} heads x {args.head_dim}, {args.dtype}, fastest of "
             f"{args.reps} interleaved calls; "
             "ms. Skipped: tiles whose ids cannot meet in any row of the batch (in brackets, the share a row "
             "alone would skip):", "",
             "| seq_len | rows | proteins / row | tiles | xla (ids as mask) | every tile | tiles skipped | "
             "share skipped | speed-up |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in alone:
        for tile in dict.fromkeys(name.split()[0] for name in r["ms"] if name[0].isdigit()):
            every, skip = r["ms"][f"{tile} every tile"], r["ms"][f"{tile} skipped"]
            lines.append(f"| {r['seq_len']} | {r['rows']} | {r['pieces_per_row']:.1f} | {tile} | "
                         f"{r['ms']['xla (ids as mask)']:.1f} | {every:.1f} | {skip:.1f} | {r['skipped'][tile]:.0%} "
                         f"({r['skipped'][tile + ' one row']:.0%}) | {every / skip:.2f}x |")
    others = [name for name in dict.fromkeys(n for r in alone for n in r["ms"])
              if not name[0].isdigit() and not name.startswith("xla")]
    if others:
        lines += ["", "Front-door implementations with the same ids (ms; in brackets, time over the fastest "
                      "`chunked`; err: the largest gradient error against xla's in float32, relative to the "
                      "largest gradient):", "", "| seq_len | " + " | ".join(others) + " |",
                  "|---|" + "---:|" * len(others)]
        for r in alone:
            best = min(t for n, t in r["ms"].items() if n[0].isdigit())
            cells = [f"{r['ms'][n]:.1f} ({r['ms'][n] / best:.2f}x)" if n in r["ms"] else "-" for n in others]
            errs = r.get("grad_err", {})
            cells = [c + (f", err {errs[n]:.0e}" if n in errs else "") for c, n in zip(cells, others)]
            lines.append(f"| {r['seq_len']} | " + " | ".join(cells) + " |")
        refused = {n: e for r in alone for n, e in r.get("refused", {}).items()}
        lines += [f"\n{n} refused: {e}" for n, e in refused.items()]
    if steps:
        lines += ["", f"protein-mlm `--pack --attention chunked` training steps (batch 8, recipe defaults, "
                      f"{args.steps} steps, fastest of {args.rounds} interleaved runs):", "",
                  "| seq_len | ms / step, every tile of 256 x 512 (before) | ms / step, 128 x 128, skipped | "
                  "speed-up |", "|---|---:|---:|---:|"]
        for r in steps:
            lines.append(f"| {r['seq_len']} | {r['no skip']:.0f} | {r['skip']:.0f} | {r['no skip'] / r['skip']:.2f}x |")
    (out / f"packed_attention_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
