"""The memory estimate of a ``sciscale train`` run, before it runs (``memory.Estimate``).

``estimate(recipe, model_config, train_config)`` reads every shape from the model itself, never
from a second copy of its arithmetic:

- Model state: ``jax.eval_shape`` of the recipe's model and of ``optimizer.init``, placed with
  the train loop's own placement (mesh, rule table, ZeRO stage; ``train.abstract``), then the
  bytes of each leaf's shard on one device. Exact for the tensors that are stored.
- Activations, ``method="compile"`` (the default): the loop's own train step (remat policy,
  attention implementation, chunking, precision, mesh with data / tensor / DAP / pipeline axes,
  ZeRO, accumulation, offload, all as the run has them) is compiled at depth k and 2k and XLA's
  compiled memory analysis of the two is extended linearly to the full depth
  (``memory.estimate.extend``). The shallow programs compile in a fraction of the deep one's
  time and never allocate anything.
- Activations, ``method="trace"`` (seconds, no compile): the residuals autodiff saves for the
  backward pass under the run's remat policy on one device's microbatch at depth k and 2k,
  extended to the full depth, divided by the tensor x sequence x DAP devices, plus one layer's
  recomputation when a policy recomputes. It ignores XLA's fusion and scheduling: a screen for
  the planner, not the figure it prints.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from sciscale_jax.memory import estimate as mem
from sciscale_jax.memory.measure import report_from_analysis
from sciscale_jax.pure import combine, partition
from sciscale_jax.train.abstract import abstract_batch, abstract_model, abstract_run


def estimate(recipe, model_config, train_config, *, method: str = "compile") -> mem.Estimate:
    """Per-device memory of ``sciscale train`` for this recipe, model and train config.

    The mesh, ZeRO stage, accumulation and offload come from ``train_config`` as the loop reads
    them (``train_config.mesh`` on ``jax.device_count()`` devices). ``method`` is "compile"
    (shallow compiled probes, extended in depth) or "trace" (saved residuals, no compile);
    see the module docstring.
    """
    if method not in mem.METHODS:
        raise ValueError(f"method={method!r} is not one of {mem.METHODS}")
    depth = mem.depth_of(model_config)
    run = abstract_run(recipe, model_config, train_config)
    state = mem.state_bytes(run)
    fixed = state["params"] + state["grads"] + state["opt_state"]
    k1, k2 = mem.probe_depths(model_config, train_config)
    probes = ()
    if method == "compile":
        if depth <= k1:
            probes = ((depth, _compiled_peak(run)),)
            total, per_layer_total = probes[0][1], 0.0
        else:
            runs = [abstract_run(recipe, mem.at_depth(model_config, k), train_config) for k in (k1, k2)]
            probes = tuple((k, _compiled_peak(r)) for k, r in zip((k1, k2), runs))
            total, per_layer_total = mem.extend(probes, depth)
            s1, s2 = (mem.state_bytes(r) for r in runs)
            per_layer_total -= sum(s2[k] - s1[k] for k in ("params", "grads", "opt_state")) / (k2 - k1)
        activations = int(round(total)) - fixed - mem.host_counted_on_device(state["offloaded"])
        layer_act = per_layer_total
    else:
        stored = {k: _saved_bytes(recipe, mem.at_depth(model_config, k), train_config) for k in (k1, k2)}
        _, layer_act = mem.extend(tuple(stored.items()), depth)
        base = stored[k1] - layer_act * k1
        recompute = 0.0
        if model_config.remat != "none":  # the backward pass rebuilds one layer group at a time
            plain = dataclasses.replace(model_config, remat="none")
            s1, s2 = (_saved_bytes(recipe, mem.at_depth(plain, k), train_config) for k in (k1, k2))
            recompute = s2 - s1
        sizes = mem.mesh_sizes(train_config.mesh)
        divide = sizes["tp"] * sizes["dap"]
        activations = int(round((base + layer_act * depth + recompute) / divide))
        layer_act /= divide
    return mem.Estimate(state["params"], state["grads"], state["opt_state"], activations, state["offloaded"],
                        depth, float(layer_act), method, train_config.mesh, probes)


def _compiled_peak(run) -> int:
    return report_from_analysis(run.compile(analysis_only=True).memory_analysis()).peak_bytes


def _saved_bytes(recipe, model_config, train_config) -> int:
    """Bytes autodiff saves for the backward pass of the loss on one device's microbatch."""
    tc = dataclasses.replace(train_config, batch_size=mem.microbatch(train_config), grad_accum=1, mesh="", zero=0,
                             offload="")
    return loss_profile(recipe, model_config, tc)[0]


def loss_profile(recipe, model_config, train_config) -> tuple[int, float]:
    """(saved-residual bytes, matrix-product FLOPs of forward + backward) of the loss on one
    device at ``train_config.batch_size`` (``memory.estimate.gradient_profile``: one trace),
    differentiated with respect to what the run trains (LoRA: the adapters; no gradient matmuls
    of the frozen weights are counted)."""
    from sciscale_jax.train.loop import trainable

    cfg = dataclasses.replace(model_config, sharding=None)
    graphdef, params, rest, _, _ = abstract_model(recipe, cfg)
    batch = abstract_batch(recipe, cfg, train_config)
    key = jax.random.key(0)
    frozen = {}
    if trainable(cfg) is not None:
        params, frozen = partition(params, trainable(cfg))

    def loss(p, f, b):
        total, count = recipe.loss_fn(nnx.merge(graphdef, combine(p, f), rest), b, key)
        return total / count

    return mem.gradient_profile(loss, params, frozen, batch)
