"""Memory, estimated: the per-device bytes of a training run before it runs.

``estimate(recipe, model_config, train_config)`` breaks the peak of one train step per device
into parameters, gradients, optimizer state (the real optimizer's state tree, so Adam, Adafactor,
8-bit Adam, ... each count what they keep, in their own dtypes), the activations and workspace
of the forward and backward passes, and the bytes kept in host memory (``--offload``), listed
apart. Nothing here repeats a model's arithmetic: every shape comes from the model itself.

- Model state: ``jax.eval_shape`` of the recipe's model and of ``optimizer.init``, placed with
  the train loop's own placement (mesh, rule table, ZeRO stage), then the bytes of each leaf's
  shard on one device (``NamedSharding.shard_shape``). Exact for the tensors that are stored.
- Activations, ``method="compile"`` (the default): the loop's own train step (remat policy,
  attention implementation, chunking, precision, mesh, ZeRO, accumulation, all as the run has
  them) is compiled at depth k and 2k (k = 1, or the ``every_k`` group size), and XLA's
  compiled memory analysis of the two is extended linearly to the full depth. A layer stack's
  peak grows by the same bytes per layer (each stored layer adds its residuals, its parameters,
  gradients and optimizer state), so two shallow compiles predict the deep one; the shallow
  programs compile in a fraction of the deep one's time and never allocate anything.
- Activations, ``method="trace"`` (seconds, no compile): the residuals autodiff saves for the
  backward pass under the run's remat policy (``saved_residuals`` of the loss on one device's
  microbatch) at depth k and 2k, extended to the full depth, divided by the tensor x sequence
  devices, plus one layer's recomputation when a policy recomputes. It ignores XLA's fusion and
  scheduling: a screen for the planner, not the figure it prints.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from sciscale_jax.memory.measure import MiB, report_from_analysis

DEPTH_FIELDS = ("num_layers", "num_blocks")  # the config field that sets the layer-stack depth
METHODS = ("compile", "trace")


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Per-device bytes of one train step; ``peak_bytes`` is the device total (host bytes apart)."""

    params_bytes: int
    grads_bytes: int
    opt_state_bytes: int
    activation_bytes: int          # activations, batch and workspace of forward + backward + update
    offloaded_bytes: int           # params / optimizer state kept in host memory (not in the peak)
    num_layers: int
    layer_activation_bytes: float  # the part of activation_bytes each layer adds
    method: str
    mesh: str = ""
    compiled_probes: tuple = ()    # (depth, compiled peak) of the probes (method "compile")

    @property
    def peak_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.opt_state_bytes + self.activation_bytes

    def parts(self) -> dict:
        return {"parameters": self.params_bytes, "gradients": self.grads_bytes,
                "optimizer state": self.opt_state_bytes, "activations": self.activation_bytes}

    def dominant(self) -> str:
        """The largest part of the peak."""
        return max(self.parts().items(), key=lambda kv: kv[1])[0]

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "peak_bytes": self.peak_bytes}

    def format(self, title: str = "estimated memory per device") -> str:
        rows = [*self.parts().items(), ("peak", self.peak_bytes)]
        if self.offloaded_bytes:
            rows.append(("host (offloaded)", self.offloaded_bytes))
        lines = [f"{title} ({self.method}; {self.num_layers} layers, "
                 f"{self.layer_activation_bytes / MiB:.2f} MiB of activations per layer)"]
        lines += [f"  {name:<16}  {value / MiB:10.2f} MiB" for name, value in rows]
        return "\n".join(lines)


def depth_field(model_config) -> str:
    for name in DEPTH_FIELDS:
        if hasattr(model_config, name):
            return name
    raise ValueError(f"{type(model_config).__name__} has none of the depth fields {DEPTH_FIELDS}")


def _shard_bytes(x) -> int:
    sharding = getattr(x, "sharding", None)
    shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
    return int(math.prod(shape)) * np.dtype(x.dtype).itemsize


def _tree_device_bytes(tree) -> int:
    return sum(_shard_bytes(x) for x in jax.tree.leaves(tree))


def state_bytes(run) -> dict:
    """Per-device bytes of params, grads and optimizer state of an ``AbstractRun``."""
    params, opt = run.state.params, run.state.opt_state
    if run.place is not None:
        grads = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), params, run.place.grads)
    else:
        grads = params
    out = {"params": _tree_device_bytes(params), "grads": _tree_device_bytes(grads),
           "opt_state": _tree_device_bytes(opt), "offloaded": 0}
    for name in ("params", "opt_state"):
        if name in run.offload:
            out["offloaded"] += out[name]
            out[name] = 0
    return out


def _at_depth(model_config, depth: int):
    return dataclasses.replace(model_config, **{depth_field(model_config): depth})


def _probe_depths(model_config) -> tuple[int, int]:
    from sciscale_jax import remat

    depth = getattr(model_config, depth_field(model_config))
    k = remat.layer_group_size(model_config.remat, depth)
    return k, 2 * k


def estimate(recipe, model_config, train_config, *, method: str = "compile") -> Estimate:
    """Per-device memory of ``sciscale train`` for this recipe, model and train config.

    The mesh, ZeRO stage, accumulation and offload come from ``train_config`` as the loop reads
    them (``train_config.mesh`` on ``jax.device_count()`` devices). ``method`` is "compile"
    (shallow compiled probes, extended in depth) or "trace" (saved residuals, no compile);
    see the module docstring.
    """
    from sciscale_jax.train.abstract import abstract_run

    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    depth = getattr(model_config, depth_field(model_config))
    run = abstract_run(recipe, model_config, train_config)
    state = state_bytes(run)
    fixed = state["params"] + state["grads"] + state["opt_state"]
    k1, k2 = _probe_depths(model_config)
    probes = ()
    if method == "compile":
        if depth <= k1:
            probes = ((depth, report_from_analysis(run.compile().memory_analysis()).peak_bytes),)
            total, per_layer_total = probes[0][1], 0.0
        else:
            probes = tuple((k, report_from_analysis(abstract_run(recipe, _at_depth(model_config, k), train_config)
                                                    .compile().memory_analysis()).peak_bytes) for k in (k1, k2))
            per_layer_total = (probes[1][1] - probes[0][1]) / (k2 - k1)
            total = probes[0][1] + per_layer_total * (depth - k1)
        activations = int(round(total)) - fixed
        per_layer_state = _per_layer_state(recipe, model_config, train_config, depth, fixed)
        layer_act = per_layer_total - per_layer_state
    else:
        stored = {k: _saved_bytes(recipe, _at_depth(model_config, k), train_config) for k in (k1, k2)}
        layer_act = (stored[k2] - stored[k1]) / (k2 - k1)
        base = stored[k1] - layer_act * k1
        recompute = 0.0
        if model_config.remat != "none":  # the backward pass rebuilds one layer group at a time
            plain = dataclasses.replace(model_config, remat="none")
            s1, s2 = (_saved_bytes(recipe, _at_depth(plain, k), train_config) for k in (k1, k2))
            recompute = (s2 - s1)
        divide = _model_parallel(train_config)
        layer_act /= divide
        activations = int(round((base + layer_act * divide * depth + recompute) / divide))
    return Estimate(state["params"], state["grads"], state["opt_state"], activations, state["offloaded"],
                    depth, float(layer_act), method, train_config.mesh, probes)


def _per_layer_state(recipe, model_config, train_config, depth, fixed) -> float:
    """Bytes of params + grads + optimizer state each layer adds (from two abstract runs, no compile)."""
    from sciscale_jax.train.abstract import abstract_run

    k1, k2 = _probe_depths(model_config)
    if depth <= k1:
        return 0.0
    s = [state_bytes(abstract_run(recipe, _at_depth(model_config, k), train_config)) for k in (k1, k2)]
    tot = [x["params"] + x["grads"] + x["opt_state"] for x in s]
    return (tot[1] - tot[0]) / (k2 - k1)


def _model_parallel(train_config) -> int:
    from sciscale_jax import parallel

    if not train_config.mesh:
        return 1
    c = parallel.ParallelConfig.parse(train_config.mesh).resolve(jax.device_count())
    return c.tensor * c.tensor2 * c.sequence


def _microbatch(train_config) -> int:
    from sciscale_jax import parallel

    dp = 1
    if train_config.mesh:
        c = parallel.ParallelConfig.parse(train_config.mesh).resolve(jax.device_count())
        dp = c.data * c.fsdp
    return max(1, train_config.batch_size // (dp * train_config.grad_accum))


def _saved_bytes(recipe, model_config, train_config) -> int:
    """Bytes autodiff saves for the backward pass of the loss on one device's microbatch."""
    tc = dataclasses.replace(train_config, batch_size=_microbatch(train_config), grad_accum=1, mesh="", zero=0,
                             offload="")
    return _loss_program(recipe, model_config, tc)


def _itemsize(dtype) -> int:
    """Bytes per element; a PRNG key array counts its key data (two uint32 for threefry)."""
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return 8
    return np.dtype(dtype).itemsize


def _loss_program(recipe, model_config, train_config, *, flops: bool = False):
    """Saved-residual bytes of the loss on one device at ``train_config.batch_size`` (and with
    ``flops``, the FLOPs of its gradient program from XLA's cost analysis of the lowering)."""
    from flax import nnx
    from jax._src.ad_checkpoint import saved_residuals  # the list behind jax.ad_checkpoint.print_saved_residuals

    from sciscale_jax.train.abstract import abstract_batch, abstract_model

    cfg = dataclasses.replace(model_config, sharding=None)
    graphdef, params, rest, _, _ = abstract_model(recipe, cfg)
    batch = abstract_batch(recipe, cfg, train_config)
    key = jax.random.key(0)

    def loss(p, b):
        total, count = recipe.loss_fn(nnx.merge(graphdef, p, rest), b, key)
        return total / count

    residuals = saved_residuals(loss, params, batch)
    saved = sum(int(math.prod(a.shape)) * _itemsize(a.dtype) for a, why in residuals
                if not why.startswith("from the argument"))
    if not flops:
        return saved
    cost = jax.jit(jax.grad(loss)).lower(params, batch).cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return saved, float(cost.get("flops", 0.0))
