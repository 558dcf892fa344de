"""Per-device memory and collectives of each parallel strategy on 8 CPU devices.

For every strategy this compiles one Adam train step of a small attention + MLP block
(nothing runs) and reads XLA's compiled memory analysis: arguments, temporaries and peak
per device, plus the collective operations in the compiled HLO.

For ZeRO stages 0-3 it compiles the train loop's own step (``init_train_state``,
``plan_placement``, ``make_train_step`` with the placement's gradient shardings, jit with
in/out shardings, as ``sciscale_jax.train`` builds it) for a Transformer with AdamW on the
meshes data=8, data=4,fsdp=2 and data=2,fsdp=2,tensor=2, and reports per device: arguments,
temporaries, peak, and the gradient bytes that leave reduce-scatters and all-reduces in the
compiled HLO (ZeRO-2 must reduce-scatter 1/N of the gradients). Separately, as a check of
the stage rule against the paper's 16Ψ, 4Ψ+12Ψ/N, 2Ψ+14Ψ/N and 16Ψ/N, it lists the argument
bytes of a mixed-precision Adam update jitted with the stage's shardings (these equal the
formula by construction: they show the rule, not a measured step). Memory on CPU comes from
the compiled analysis, so it is deterministic.

    python benchmarks/parallel_memory.py            # tables + benchmarks/results/parallel_memory.json
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from sciscale_jax.attention import dot_product_attention  # noqa: E402
from sciscale_jax.parallel import (ParallelConfig, batch_sharding, make_mesh, model_state_bytes,  # noqa: E402
                                   reduce_scatter_value_and_grad, rules_for, stage_sharding,
                                   train_shardings, tree_shardings, with_logical_constraint)

B, S, E, H, D, F = 8, 128, 128, 8, 16, 512
AXES = {"norm1": ("embed",), "wq": ("embed", "heads", "kv"), "wk": ("embed", "heads", "kv"),
        "wv": ("embed", "heads", "kv"), "wo": ("heads", "kv", "embed"), "norm2": ("embed",),
        "w1": ("embed", "mlp"), "w2": ("mlp", "embed")}
SHAPES = {"norm1": (E,), "wq": (E, H, D), "wk": (E, H, D), "wv": (E, H, D), "wo": (H, D, E),
          "norm2": (E,), "w1": (E, F), "w2": (F, E)}
ACT = ("batch", "seq", "embed")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

# name: (mesh sizes, rule table, zero stage, attention)
STRATEGIES = {
    "zero0 (dp=8)": (dict(data=8), "dp", 0, "xla"),
    "zero1 (dp=8)": (dict(data=8), "dp", 1, "xla"),
    "zero2 (dp=8, psum_scatter)": (dict(data=8), "dp", 2, "xla"),
    "zero3 (dp=8)": (dict(data=8), "dp", 3, "xla"),
    "tp=8": (dict(tensor=8), "tp", 0, "xla"),
    "tp=2 + sp, dp=4": (dict(data=4, tensor=2), "tp_sp", 0, "xla"),
    "2d tp 2x4": (dict(tensor2=2, tensor=4), "tp2d", 0, "xla"),
    "fsdp=4 x tp=2": (dict(fsdp=4, tensor=2), "fsdp_tp", 0, "xla"),
    "ulysses=8": (dict(sequence=8), "dp", 0, "ulysses"),
    "ring=8 (causal, zigzag)": (dict(sequence=8), "dp", 0, "ring"),
}


def loss_fn(params, batch, rules=None, attention="xla"):
    x, y = batch
    c = lambda t, axes: with_logical_constraint(t, axes, rules)
    rms = lambda t, w: t * jax.lax.rsqrt(jnp.mean(t * t, -1, keepdims=True) + 1e-6) * w
    h = c(rms(c(x, ACT), params["norm1"]), ACT)
    q, k, v = (c(jnp.einsum("bse,ehd->bshd", h, params[w]), ("batch", "seq", "heads", "kv")) for w in ("wq", "wk", "wv"))
    a = c(dot_product_attention(q, k, v, causal=True, impl=attention), ("batch", "seq", "heads", "kv"))
    x = c(x + jnp.einsum("bshd,hde->bse", a, params["wo"]), ACT)
    m = c(jax.nn.gelu(jnp.einsum("bse,ef->bsf", c(rms(x, params["norm2"]), ACT), params["w1"])), ("batch", "seq", "mlp"))
    x = c(x + jnp.einsum("bsf,fe->bse", m, params["w2"]), ACT)
    return jnp.mean((x - y) ** 2)


def count_collectives(hlo: str) -> dict:
    return {op: len(re.findall(rf"\b{op}(?:-start)?\(", hlo)) for op in COLLECTIVES}


def train_step_memory(sizes, strategy, zero, attention):
    mesh, rules = make_mesh(ParallelConfig(**sizes)), rules_for(strategy)
    params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in SHAPES.items()}
    batch = (jax.ShapeDtypeStruct((B, S, E), jnp.float32),) * 2
    tx = optax.adam(1e-3)
    sh = train_shardings(params, AXES, rules, mesh, zero, tx)
    batch_sh = tuple(batch_sharding(x.shape, ACT, rules, mesh) for x in batch)
    if zero == 2:
        grad_fn = reduce_scatter_value_and_grad(loss_fn, mesh, sh.grads)
    else:
        def grad_fn(p, b):
            loss, g = jax.value_and_grad(lambda p, b: loss_fn(p, b, rules, attention))(p, b)
            return loss, jax.lax.with_sharding_constraint(g, sh.grads)

    def step(p, o, b):
        loss, g = grad_fn(p, b)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), o, loss

    opt = jax.eval_shape(tx.init, params)
    with jax.set_mesh(mesh):
        compiled = jax.jit(step, in_shardings=(sh.params, sh.opt_state, batch_sh),
                           out_shardings=(sh.params, sh.opt_state, None),
                           donate_argnums=(0, 1)).lower(params, opt, batch).compile()
    mem = compiled.memory_analysis()
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes)  # live at once: inputs, outputs (less donated) and temporaries
    return {"argument_bytes": mem.argument_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
            "peak_bytes": peak, "collectives": count_collectives(compiled.as_text())}


def zero_model_state(stage, n=8):
    """Per-device argument bytes of a mixed-precision Adam update at ``stage``, and the formula."""
    mesh = make_mesh(ParallelConfig(data=n))
    f32 = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in SHAPES.items()}
    bf16 = {k: jax.ShapeDtypeStruct(s, jnp.bfloat16) for k, s in SHAPES.items()}
    model = tree_shardings(f32, {k: (None,) * len(s) for k, s in SHAPES.items()}, rules_for("dp"), mesh)
    sh = {kind: jax.tree.map(lambda s, x: stage_sharding(s, x.shape, stage, kind), model, f32)
          for kind in ("params", "grads", "opt_state")}

    def update(p16, g16, master, mu, nu):
        g = jax.tree.map(lambda x: x.astype(jnp.float32), g16)
        mu = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, mu, g)
        nu = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, nu, g)
        master = jax.tree.map(lambda w, m, v: w - 1e-3 * m / (jnp.sqrt(v) + 1e-8), master, mu, nu)
        return jax.tree.map(lambda w: w.astype(jnp.bfloat16), master), master, mu, nu

    in_sh = (sh["params"], sh["grads"], sh["opt_state"], sh["opt_state"], sh["opt_state"])
    compiled = jax.jit(update, in_shardings=in_sh, out_shardings=(in_sh[0], *in_sh[2:]), donate_argnums=(0, 2, 3, 4),
                       keep_unused=True).lower(bf16, bf16, f32, f32, f32).compile()
    psi = sum(int(np.prod(s)) for s in SHAPES.values())
    return compiled.memory_analysis().argument_size_in_bytes, model_state_bytes(psi, stage, n)


LOOP_MESHES = ("data=8", "data=4,fsdp=2", "data=2,fsdp=2,tensor=2")
LOOP_MODEL = dict(vocab_size=40, num_layers=2, num_heads=8, embed_dim=256, mlp_dim=1024, max_len=128)
LOOP_BATCH = 16
_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1}


def hlo_result_bytes(hlo: str, op: str) -> int:
    """Per-device bytes of the results of every ``op`` in compiled HLO (tuple results summed)."""
    total = 0
    for line in hlo.splitlines():
        m = re.match(rf"\s*(?:ROOT )?%\S+ = (.*?) {op}(?:-start)?\(", line)
        if m:
            for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
                total += _BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
    return total


def loop_step_memory(mesh_spec: str, zero: int) -> dict:
    """Compiled memory of the train loop's step at ZeRO ``zero`` on ``mesh_spec`` (8 devices)."""
    from flax import nnx

    from sciscale_jax import parallel
    from sciscale_jax.models.transformer import Transformer, TransformerConfig
    from sciscale_jax.train.sharding import compile_train_step, plan_placement
    from sciscale_jax.train.step import init_train_state, make_train_step

    cfg = TransformerConfig(**LOOP_MODEL)

    def loss(model, batch, key):
        logits = model(batch["inputs"], mask_bs=batch["mask"], dropout_key=key).astype(jnp.float32)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return jnp.sum(nll), jnp.float32(nll.size)

    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tx = optax.adamw(1e-3)
    axes = parallel.param_axes(model)
    graphdef, state = init_train_state(model, tx)
    tokens = jnp.zeros((LOOP_BATCH, cfg.max_len), jnp.int32)
    batch = {"inputs": tokens, "targets": tokens, "mask": jnp.ones(tokens.shape, bool)}
    place = plan_placement(mesh_spec, "auto", zero, state, axes, tx, batch)
    step = make_train_step(graphdef, tx, loss_fn=loss, grad_shardings=place.grads,
                           reduce_scatter=place.reduce_scatter)
    compiled = compile_train_step(step, place, state, batch)
    mem, hlo = compiled.memory_analysis(), compiled.as_text()
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params))
    return {"mesh": mesh_spec, "zero": zero, "psum_scatter": place.reduce_scatter, "param_bytes": params,
            "argument_bytes": mem.argument_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes, "peak_bytes": peak,
            "reduce_scatter_bytes": hlo_result_bytes(hlo, "reduce-scatter"),
            "all_reduce_bytes": hlo_result_bytes(hlo, "all-reduce"), "collectives": count_collectives(hlo)}


def main():
    kib = lambda b: f"{b / 1024:,.0f}"
    psi = sum(int(np.prod(s)) for s in SHAPES.values())
    results = {"device": f"{jax.device_count()} x {jax.devices()[0].device_kind} (CPU, simulated)",
               "model": dict(B=B, S=S, E=E, H=H, D=D, F=F, params=psi), "strategies": {}}
    cfg = LOOP_MODEL
    print(f"\nThe train loop's compiled step per ZeRO stage: Transformer {cfg['num_layers']} layers, embed "
          f"{cfg['embed_dim']}, mlp {cfg['mlp_dim']}, {cfg['num_heads']} heads, seq {cfg['max_len']}, batch "
          f"{LOOP_BATCH}, AdamW, per device\n")
    print("| mesh | stage | grads by | args KiB | temp KiB | peak KiB | reduce-scatter KiB | all-reduce KiB |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    results["zero_train_step"] = []
    for mesh_spec in LOOP_MESHES:
        for stage in range(4):
            r = loop_step_memory(mesh_spec, stage)
            results["zero_train_step"].append(r)
            print(f"| {mesh_spec} | {stage} | {'psum_scatter' if r['psum_scatter'] else 'GSPMD'} | "
                  f"{kib(r['argument_bytes'])} | {kib(r['temp_bytes'])} | {kib(r['peak_bytes'])} | "
                  f"{kib(r['reduce_scatter_bytes'])} | {kib(r['all_reduce_bytes'])} |", flush=True)
    print(f"(parameters: {kib(results['zero_train_step'][0]['param_bytes'])} KiB in float32)")
    print(f"\nThe stage rule against the paper: argument bytes of a mixed-precision Adam update jitted with the "
          f"stage's shardings (equal to the formula by construction), Ψ = {psi:,} params, N = 8\n")
    print("| ZeRO stage | formula | formula KiB | update-jit args KiB | ratio |\n|---|---|---:|---:|---:|")
    formulas = ("16Ψ", "4Ψ + 12Ψ/N", "2Ψ + 14Ψ/N", "16Ψ/N")
    results["zero_model_state"] = {}
    for stage in range(4):
        measured, formula = zero_model_state(stage)
        results["zero_model_state"][stage] = {"update_jit_argument_bytes": measured, "formula_bytes": formula}
        print(f"| {stage} | {formulas[stage]} | {kib(formula)} | {kib(measured)} | {measured / formula:.3f} |")
    print(f"\nAdam (fp32) train step of one attention + MLP block, B={B} S={S} E={E} H={H} F={F}, "
          f"per device, from the compiled memory analysis\n")
    print("| strategy | args KiB | temp KiB | peak KiB | " + " | ".join(COLLECTIVES) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(COLLECTIVES))
    for name, (sizes, strategy, zero, attention) in STRATEGIES.items():
        r = train_step_memory(sizes, strategy, zero, attention)
        results["strategies"][name] = r
        counts = " | ".join(str(r["collectives"][op]) for op in COLLECTIVES)
        print(f"| {name} | {kib(r['argument_bytes'])} | {kib(r['temp_bytes'])} | {kib(r['peak_bytes'])} | {counts} |")
    out = pathlib.Path(__file__).parent / "results" / "parallel_memory.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
