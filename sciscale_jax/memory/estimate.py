"""Memory, estimated: the arithmetic of a per-device estimate of one train step.

An ``Estimate`` breaks the peak of one train step per device into parameters, gradients,
optimizer state, the activations and workspace of the forward and backward passes, and the
bytes kept in host memory (offload), listed apart. This module holds the arithmetic over
descriptions of a run (abstract state trees with their shardings, compiled peaks of shallow
probes, residual lists); ``sciscale_jax.train.estimate`` builds those descriptions from a
recipe and drives it.

- State: the bytes of each leaf's shard on one device (``NamedSharding.shard_shape``) of the
  abstract parameters, gradients and optimizer state as the train loop places them.
- Depth: a layer stack's peak grows by the same bytes per layer (each stored layer adds its
  residuals, parameters, gradients and optimizer state), so the compiled peaks of two shallow
  probes (``probe_depths``: k and 2k, 2k and 3k under remat) extend linearly to the full depth
  (``extend``). k is one remat group (``every_k``) and, on a pipeline mesh, a whole number of
  layers per stage.
- Residuals: the bytes autodiff saves for the backward pass, the planner's compile-free
  screen; ``gradient_profile`` reads them and the matrix-product FLOPs of the forward and
  backward passes (recomputation included) from one trace.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import numpy as np

from sciscale_jax.memory.measure import MiB

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


def depth_of(model_config) -> int:
    return getattr(model_config, depth_field(model_config))


def at_depth(model_config, depth: int):
    """``model_config`` with ``depth`` layers (blocks)."""
    return dataclasses.replace(model_config, **{depth_field(model_config): depth})


def mesh_config(train_config):
    """The run's resolved ``parallel.ParallelConfig`` on ``jax.device_count()`` devices (None: one device)."""
    from sciscale_jax import parallel

    if not train_config.mesh:
        return None
    return parallel.ParallelConfig.parse(train_config.mesh).resolve(jax.device_count())


def mesh_sizes(mesh: str) -> dict:
    """Devices per role of a mesh string: dp (data x fsdp), tp (tensor x tensor2 x sequence),
    fsdp, dap and pp (pipeline)."""
    from sciscale_jax import parallel

    if not mesh:
        return {"dp": 1, "tp": 1, "fsdp": 1, "dap": 1, "pp": 1}
    c = parallel.ParallelConfig.parse(mesh).resolve(jax.device_count())
    return {"dp": c.data * c.fsdp, "tp": c.tensor * c.tensor2 * c.sequence, "fsdp": c.fsdp, "dap": c.dap,
            "pp": c.pipeline}


def probe_depths(model_config, train_config=None) -> tuple[int, int]:
    """Depths of the two probes: k and 2k, or 2k and 3k under a remat policy (or checkpoints inside
    each layer) or on a pipeline
    (with one checkpointed group XLA may keep the forward pass's values instead of recomputing
    them, and a one-layer stage is scheduled unlike deeper ones, so the first group does not add
    what each later one does); k is a whole remat group
    (every_k) and, on a pipeline mesh, a whole number of layers per stage and virtual stage."""
    from sciscale_jax import remat

    k = remat.layer_group_size(model_config.remat, depth_of(model_config))
    stages = mesh_sizes(train_config.mesh)["pp"] if train_config is not None else 1
    if stages > 1:
        k = math.lcm(k, stages * train_config.virtual_stages)
    if model_config.remat != "none" or _checkpoints_inside(model_config) or stages > 1:
        return 2 * k, 3 * k
    return k, 2 * k


def _checkpoints_inside(model_config) -> bool:
    """Checkpoints inside each layer: the Evoformer's sub-module remat, or its chunks recomputed in
    the backward pass (one block's probe is then scheduled unlike deeper stacks, as under a
    remat policy: with k and 2k, sub-module remat at crop 384 predicted 12.0 GiB for 8 blocks
    that compile at 6.5 GiB)."""
    chunked = getattr(model_config, "chunk_size", None) is not None and getattr(model_config, "chunk_remat", False)
    return bool(getattr(model_config, "remat_modules", False) or chunked)


def extend(probes, depth: int) -> tuple[float, float]:
    """(total at ``depth``, bytes per layer) from ``((k1, peak1), (k2, peak2))``, linear in depth."""
    (k1, p1), (k2, p2) = probes
    per_layer = (p2 - p1) / (k2 - k1)
    return p1 + per_layer * (depth - k1), per_layer


def shard_bytes(x) -> int:
    """Bytes of one device's shard of an array or ShapeDtypeStruct (its whole size without a sharding)."""
    sharding = getattr(x, "sharding", None)
    shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
    return int(math.prod(shape)) * np.dtype(x.dtype).itemsize


def tree_device_bytes(tree) -> int:
    return sum(shard_bytes(x) for x in jax.tree.leaves(tree))


def state_bytes(run) -> dict:
    """Per-device bytes of params, grads and optimizer state of a run description with
    ``state`` (params, opt_state), ``place`` (gradient shardings ``place.grads``, or None),
    ``offload`` (the names of the trees kept in host memory) and optionally ``trainable`` (a
    predicate on jax key paths: the parameters that get gradients, LoRA's ``is_lora``)."""
    params, opt = run.state.params, run.state.opt_state
    if run.place is not None:
        grads = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), params, run.place.grads)
    else:
        grads = params
    trainable = getattr(run, "trainable", None)  # LoRA: gradients of the adapters alone
    if trainable is not None:
        grads = [g for path, g in jax.tree_util.tree_flatten_with_path(grads)[0] if trainable(path)]
    out = {"params": tree_device_bytes(params), "grads": tree_device_bytes(grads),
           "opt_state": tree_device_bytes(opt), "offloaded": 0}
    for name in ("params", "opt_state"):
        if name in run.offload:
            out["offloaded"] += out[name]
            out[name] = 0
    return out


def host_counted_on_device(offloaded: int) -> int:
    """Offloaded bytes a compile counts as device memory: the CPU backend compiles host offload
    away (pinned-host arrays are plain device arrays there), GPU and TPU keep them apart."""
    return offloaded if jax.default_backend() == "cpu" else 0


def microbatch(train_config) -> int:
    """Examples one device holds at once: the batch over the data-parallel devices and accumulation."""
    return max(1, train_config.batch_size // (mesh_sizes(train_config.mesh)["dp"] * train_config.grad_accum))


def itemsize(dtype) -> int:
    """Bytes per element; a PRNG key array counts its key data (two uint32 for threefry)."""
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return 8
    return np.dtype(dtype).itemsize


def gradient_profile(fn, params, *rest) -> tuple[int, float]:
    """(residual bytes, FLOPs) of differentiating ``fn(params, *rest)`` (a scalar) with respect
    to ``params``, from one trace.

    The forward and backward passes are traced together (``jax.vjp`` and its cotangent
    function in one jaxpr). Residual bytes are what the vjp function keeps, as
    ``jax.ad_checkpoint.print_saved_residuals`` lists them: arguments excluded (looking
    through ``reduce_precision``), literals and computed values counted. FLOPs are those of the
    matrix products (``matmul_flops``) of both passes, recomputation under ``jax.checkpoint``
    included: the FLOPs that model-FLOPs utilisation counts, without the elementwise work.
    """
    leaves, tree = jax.tree.flatten((params, rest))

    def forward_backward(*flat):
        p, others = jax.tree.unflatten(tree, flat)
        out, vjp = jax.vjp(lambda q: fn(q, *others), p)
        return jax.tree.leaves(vjp), vjp(jax.numpy.ones_like(out))

    closed, shapes = jax.make_jaxpr(forward_backward, return_shape=True)(*leaves)
    jaxpr = closed.jaxpr
    residuals = jaxpr.outvars[:len(shapes[0])]
    through = {e.outvars[0]: e.invars[0] for e in jaxpr.eqns if e.primitive.name == "reduce_precision"}
    arguments = set(jaxpr.invars)
    saved = 0
    for v in residuals:
        if hasattr(v, "val"):  # a literal
            saved += _aval_bytes(v.aval)
        elif through.get(v, v) not in arguments:
            saved += _aval_bytes(v.aval)
    return saved, matmul_flops(jaxpr)


def _aval_bytes(aval) -> int:
    return int(math.prod(aval.shape)) * itemsize(aval.dtype)


TRIPS_SCOPE = "expected_trips="


def expected_trips(mean: float):
    """A ``jax.named_scope`` saying how many times, on average, a ``while_loop`` traced inside it
    runs (its count drawn at run time, e.g. AlphaFold's recycling passes): :func:`matmul_flops`
    counts its body that many times, instead of once."""
    if not (isinstance(mean, (int, float)) and math.isfinite(mean) and mean >= 0):
        raise ValueError(f"expected trips {mean!r} must be a finite number >= 0")
    return jax.named_scope(f"{TRIPS_SCOPE}{float(mean)!r}")


def _while_trips(eqn) -> float:
    """Trips of a ``while`` equation: the innermost :func:`expected_trips` around it, else 1."""
    for part in reversed(re.split(r"[/()]", str(eqn.source_info.name_stack))):
        if part.startswith(TRIPS_SCOPE):
            return float(part[len(TRIPS_SCOPE):])
    return 1.0


def matmul_flops(jaxpr) -> float:
    """FLOPs of the matrix products of a jaxpr: 2 x output elements x contracted size for each
    ``dot_general`` and convolution, through nested jaxprs (a ``scan`` body times its length,
    the largest ``cond`` branch, a ``while`` body once, or as many times as the
    :func:`expected_trips` scope it was traced in says)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_feature = eqn.params["dimension_numbers"].rhs_spec[0]
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) / rhs[out_feature]
        times = eqn.params.get("length", 1) if name == "scan" else _while_trips(eqn) if name == "while" else 1
        for key, value in eqn.params.items():
            if key == "branches":
                total += max((matmul_flops(b) for b in value), default=0.0)
            elif hasattr(value, "eqns") or hasattr(getattr(value, "jaxpr", None), "eqns"):
                total += times * matmul_flops(value)
    return total
