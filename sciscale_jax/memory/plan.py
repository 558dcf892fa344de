"""The arithmetic of ``sciscale plan``: technique mixes, their screened memory and a step-time model.

``enumerate_settings`` lists the mixes of mesh shape (data / fsdp x tensor, data x dap for
models with Dynamic Axial Parallelism, pipeline x data for recipes with pipeline stages), ZeRO
stage, remat policy, attention implementation, precision, gradient accumulation,
optimizer-state offload and the switches of some model families (``MODEL_SWITCHES``: the
Evoformer's chunk size and sub-module remat, a rollout's per-step remat) where the model has
them (every switch the caller did not fix). ``step_time`` gives one mix its
modelled step time and ``screened_parts`` its per-device memory parts from a description of
the model (state bytes as the loop places them, per-example residual bytes per layer, FLOPs);
``train.plan`` measures those descriptions for a recipe, ranks the mixes and confirms the best
with a compiled estimate.

The screen of one mix: parameters, gradients and optimizer state per device exactly as placed,
plus activations = residuals per example (depth k and 2k, extended to the full depth) times
the examples each device holds at once, divided over the tensor and DAP devices; one layer's
recomputation under a remat policy; a float32 accumulator with ``grad_accum``. On a pipeline
mesh each device holds depth / stages layers and, per microbatch in flight (all of them for
GPipe, up to the stage count for 1F1B-type schedules), their residuals.

The step-time model (stated, not measured; no overlap of compute and communication):

- compute: FLOPs of the matrix products of the forward and backward passes, recomputation
  included, counted in the traced gradient program of one example (within 10% of XLA's cost
  analysis, which adds the elementwise work), times the examples per device,
  divided over the tensor, DAP and pipeline devices, at ``Hardware.flops`` (bf16/fp16/fp8) or
  half of it (fp32); a pipeline adds its schedule's bubble (``parallel.analytic_bubble``:
  (p - 1) / (m + p - 1) of the time for GPipe and 1F1B, (p - 1) / (3m + p - 1) for ZB-H1);
- data-parallel traffic per device: an all-reduce of the gradients moves 2(n-1)/n of their bytes
  (ZeRO 0-1), a reduce-scatter (n-1)/n (ZeRO 2), ZeRO-3/FSDP adds two all-gathers of the
  parameters per microbatch; tensor parallel and DAP move 4 (t-1)/t of each layer's input per
  layer and example; a pipeline sends each microbatch's stage output forward and its gradient
  back; all over ``Hardware.link_bandwidth``;
- offloaded optimizer state crosses the host link twice per step (``Hardware.host_bandwidth``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

from sciscale_jax.memory.estimate import Estimate, mesh_sizes

GiB = 2.0 ** 30
PLAN_REMAT = ("none", "selective", "full")
PLAN_ATTENTION = ("xla", "chunked")
PLAN_PRECISION = ("fp32", "bf16")
PLAN_OFFLOAD = ("", "opt_state")
PLAN_SCHEDULES = ("gpipe", "1f1b", "zbh1")  # on pipeline meshes (interleaved needs --virtual-stages: give it)
PIPELINE_ZERO = (0, 1)  # ZeRO stages enumerated with a pipeline axis
# Switches of some model families, enumerated where the model config has the field; each lists
# its values cheapest first (at equal modelled time the planner prefers the earlier value: the
# model counts matrix products, not the loop overhead of chunking). The Evoformer's: chunking of
# every sub-module (recomputed per chunk in the backward pass) and sub-module remat; weather-vit's:
# each step of a multi-step training rollout checkpointed (its input kept, the step recomputed).
MODEL_SWITCHES = {"chunk_size": (None, 32, 8), "remat_modules": (False, True), "train_rollout_remat": (False, True)}
# Switches enumerated only where they change the step (the per-step remat of a multi-step rollout
# needs a rollout); every other switch wherever the model config has the field.
SWITCH_APPLIES = {"train_rollout_remat": lambda cfg: getattr(cfg, "train_rollout", 1) > 1}
# The switches ``plan`` enumerates, by config: (model or train, field).
SWITCHES = {"remat": "model", "attention": "model", "precision": "model", "mesh": "train", "zero": "train",
            "grad_accum": "train", "offload": "train", "pipeline_schedule": "train",
            **{name: "model" for name in MODEL_SWITCHES}}


def model_switches(model_config) -> list[str]:
    """The ``MODEL_SWITCHES`` a model config has and for which its settings make a difference."""
    return [k for k in MODEL_SWITCHES
            if hasattr(model_config, k) and SWITCH_APPLIES.get(k, lambda cfg: True)(model_config)]


@dataclasses.dataclass(frozen=True)
class Hardware:
    """What the step-time model assumes per device (defaults: an H100-class GPU on NVLink)."""

    flops: float = 400e12            # sustained bf16 FLOP/s; fp32 runs at half
    link_bandwidth: float = 100e9    # bytes/s per device for collectives
    host_bandwidth: float = 25e9     # bytes/s between device and host (PCIe)


@dataclasses.dataclass(frozen=True)
class Plan:
    """One technique mix with its screened memory parts and modelled step time."""

    mesh: str
    zero: int
    remat: str
    attention: str
    precision: str
    grad_accum: int
    offload: str
    parts: dict                      # screened bytes per device: parameters, gradients, ...
    step_seconds: float
    flops: float                     # per device per step
    comm_bytes: float                # per device per step
    predicted: Estimate | None = None
    pipeline_schedule: str = ""      # on pipeline meshes only
    model_switches: tuple = ()       # (name, value) of the MODEL_SWITCHES the model has

    @property
    def screen_bytes(self) -> int:
        return int(sum(self.parts.values()))

    @property
    def peak_bytes(self) -> int:
        return self.predicted.peak_bytes if self.predicted is not None else self.screen_bytes

    def dominant(self) -> tuple[str, int]:
        parts = self.predicted.parts() if self.predicted is not None else self.parts
        return max(parts.items(), key=lambda kv: kv[1])

    def settings(self) -> dict:
        return {"mesh": self.mesh, "zero": self.zero, "remat": self.remat, "attention": self.attention,
                "precision": self.precision, "grad_accum": self.grad_accum, "offload": self.offload,
                "pipeline_schedule": self.pipeline_schedule, **dict(self.model_switches)}

    def flags(self) -> list[str]:
        out = []
        for name, value in self.settings().items():
            if value == "" or value is None or value is False or (name == "zero" and not self.mesh):
                continue  # unset, off, or one device (no mesh, no ZeRO)
            out.append(f"--{name.replace('_', '-')}" + ("" if value is True else f" {value}"))
        return out

    def describe(self) -> str:
        s = self.settings()
        return ", ".join(f"{k}={v}" for k, v in s.items() if v not in ("", None) and v is not False)

    def switch_cost(self) -> int:
        return switch_cost(self.model_switches)


def switch_order(name: str, value) -> int:
    """Where ``value`` stands in ``MODEL_SWITCHES[name]`` (cheapest 0); -1 for a value not listed
    (one the caller fixed)."""
    return MODEL_SWITCHES[name].index(value) if value in MODEL_SWITCHES[name] else -1


def switch_cost(switches) -> int:
    """How far down each model switch's list of values a mix went (``((name, value), ...)``)."""
    return sum(max(0, switch_order(k, v)) for k, v in switches)


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB', '512MiB', '1.5T', '1000000' -> bytes (GB is 10^9, GiB 2^30)."""
    units = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2 ** 10, "m": 1e6, "mb": 1e6, "mib": 2 ** 20,
             "g": 1e9, "gb": 1e9, "gib": 2 ** 30, "t": 1e12, "tb": 1e12, "tib": 2 ** 40}
    s = str(text).strip().lower().replace(" ", "")
    num = s.rstrip("abgikmt")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = float("nan")
    if unit not in units or not math.isfinite(value) or value <= 0:
        raise ValueError(f"memory={text!r} is not a positive size such as 80GiB, 80GB or 512MiB")
    return int(value * units[unit])


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_meshes(devices: int, *, dap: bool = False, pipeline_layers: int = 0) -> list[tuple[str, int]]:
    """(mesh, zero) pairs on ``devices``: data x tensor with ZeRO 0-3, fsdp x tensor; with ``dap``
    data x dap (ZeRO 0-3); with ``pipeline_layers`` (the layer count; 0: no pipeline) pipeline x
    data for every stage count that divides it. One device: ("", 0)."""
    if devices == 1:
        return [("", 0)]
    out = []
    for t in _divisors(devices):
        d = devices // t
        tensor = f",tensor={t}" if t > 1 else ""
        if d > 1:
            out += [(f"data={d}{tensor}", z) for z in range(4)]
            out.append((f"fsdp={d}{tensor}", 0))
        else:
            out.append((f"tensor={t}", 0))
    for k in _divisors(devices)[1:]:
        d = devices // k
        data = f"data={d}," if d > 1 else ""
        zeros = range(4) if d > 1 else (0,)
        if dap:
            out += [(f"{data}dap={k}", z) for z in zeros]
        if pipeline_layers and pipeline_layers % k == 0:
            out += [(f"pipeline={k}" + (f",data={d}" if d > 1 else ""), z) for z in zeros if z in PIPELINE_ZERO]
    return out


def enumerate_settings(train_config, devices: int, fixed: dict, *, dap: bool = False,
                       pipeline_layers: int = 0, model_switches=()) -> list[dict]:
    """Every mix of the switches not in ``fixed`` (name -> value); ``model_switches`` names the
    ``MODEL_SWITCHES`` the model has."""
    meshes = candidate_meshes(devices, dap=dap, pipeline_layers=pipeline_layers)
    if "mesh" in fixed:
        meshes = [(fixed["mesh"], fixed.get("zero", z)) for z in (range(4) if "zero" not in fixed else (0,))]
    elif "zero" in fixed:
        meshes = sorted({(m, fixed["zero"]) for m, _ in meshes})
    accum = [a for a in (1, 2, 4, 8, 16) if train_config.batch_size % a == 0]
    choices = {
        "remat": [fixed["remat"]] if "remat" in fixed else list(PLAN_REMAT),
        "attention": [fixed["attention"]] if "attention" in fixed else list(PLAN_ATTENTION),
        "precision": [fixed["precision"]] if "precision" in fixed else list(PLAN_PRECISION),
        "grad_accum": [fixed["grad_accum"]] if "grad_accum" in fixed else accum,
        "offload": [fixed["offload"]] if "offload" in fixed else list(PLAN_OFFLOAD),
        **{k: [fixed[k]] if k in fixed else list(MODEL_SWITCHES[k]) for k in model_switches},
    }
    schedules = [fixed["pipeline_schedule"]] if "pipeline_schedule" in fixed else list(PLAN_SCHEDULES)
    out = []
    for (mesh, zero), *rest in itertools.product(meshes, *choices.values()):
        for schedule in (schedules if mesh_sizes(mesh)["pp"] > 1 else [""]):
            out.append({"mesh": mesh, "zero": zero, **dict(zip(choices, rest)), "pipeline_schedule": schedule})
    return out


def step_time(settings: dict, state: dict, flops: float, carry: float, depth: int, train_config,
              hardware: Hardware) -> tuple[float, float, float]:
    """(modelled seconds, FLOPs, communicated bytes) per device for one step of one mix.

    ``state``: per-device params / grads / opt_state bytes as placed (``memory.estimate.state_bytes``);
    ``flops``: one example's forward and backward matrix-product FLOPs under the mix's remat
    policy and attention; ``carry``: one layer's input per example (the bytes full remat keeps
    per layer); ``depth``: the layer count. The model is the module docstring's.
    """
    s = settings
    sizes = mesh_sizes(s["mesh"])
    accum = s["grad_accum"]
    dp, tp, dap, pp = sizes["dp"], sizes["tp"], sizes["dap"], sizes["pp"]
    split = tp * dap
    examples = train_config.batch_size // dp      # per data-parallel group and step
    total = flops * examples / (split * pp)
    if pp > 1:                                     # the bubble, counted as idle compute
        from sciscale_jax.parallel.pipeline_schedule import analytic_bubble

        total /= 1 - analytic_bubble(train_config.pipeline_schedule, pp, train_config.microbatches or pp,
                                     train_config.virtual_stages)
    rate = hardware.flops if s["precision"] != "fp32" else hardware.flops / 2
    grad = state["grads"]
    comm = 0.0
    if dp > 1:
        if s["zero"] >= 2 or sizes["fsdp"] > 1:    # reduce-scatter of the whole gradient (dp shards of it)
            comm += grad * dp * (dp - 1) / dp
        else:                                      # all-reduce
            comm += 2 * grad * (dp - 1) / dp
        if s["zero"] >= 3 or sizes["fsdp"] > 1:
            comm += 2 * state["params"] * (dp - 1) * accum
    if split > 1:
        comm += 4 * carry * depth * examples * (split - 1) / split / split
    if pp > 1:
        comm += 2 * carry * examples
    host = 2 * state["opt_state"] if s["offload"] == "opt_state" else 0.0
    seconds = total / rate + comm / hardware.link_bandwidth + host / hardware.host_bandwidth
    return seconds, total, comm


def screened_parts(settings: dict, state: dict, profile: dict, train_config, param_itemsize: int) -> dict:
    """Screened per-device bytes of one mix: parameters, gradients, optimizer state, activations.

    ``profile``: per-example residual bytes ("base", "layer", "recompute") and the full depth
    ("depth") under the mix's remat policy, attention and precision.
    """
    s = settings
    sizes = mesh_sizes(s["mesh"])
    accum = s["grad_accum"]
    dp, tp, dap, pp = sizes["dp"], sizes["tp"], sizes["dap"], sizes["pp"]
    depth = profile["depth"]
    examples = train_config.batch_size // dp
    st = dict(state)
    if s["offload"] == "opt_state":
        st["opt_state"] = 0
    if pp > 1:
        m = train_config.microbatches or pp
        micro = examples / m
        inflight = m if train_config.pipeline_schedule == "gpipe" else min(m, pp)
        act = micro * (profile["base"] + inflight * profile["layer"] * depth / pp + profile["recompute"])
    else:
        micro = examples // accum
        act = micro * (profile["base"] + profile["layer"] * depth + profile["recompute"]) / (tp * dap)
    if accum > 1:  # float32 accumulator beside the gradients
        act += st["grads"] * (4 / max(1, param_itemsize))
    return {"parameters": st["params"], "gradients": st["grads"], "optimizer state": st["opt_state"],
            "activations": int(act)}


def nothing_fits(plans: list[Plan], budget: int, devices: int) -> str:
    """The one-line message when no mix fits: the smallest peak found, its mix and its largest part."""
    small = min(plans, key=lambda p: p.peak_bytes)
    name, value = small.dominant()
    return (f"nothing fits {size(budget)} per device on {devices} devices: the smallest peak found is "
            f"{size(small.peak_bytes)} ({small.describe()}), dominated by {name} ({size(value)})")


def size(n: float) -> str:
    """Bytes as GiB, or MiB below one GiB."""
    return f"{n / GiB:.3f} GiB" if n >= GiB else f"{n / 2 ** 20:.2f} MiB"


def format_plans(recipe_name: str, plans: list[Plan], base_flags: list[str], budget: int, devices: int) -> str:
    lines = [f"plans for {recipe_name} on {devices} devices within {size(budget)} per device "
             f"(fastest first by the stated step-time model):"]
    for i, p in enumerate(plans, 1):
        how = "predicted (compiled probes)" if p.predicted is not None else "screen"
        host = (f", {size(p.predicted.offloaded_bytes)} in host memory"
                if p.predicted is not None and p.predicted.offloaded_bytes else "")
        lines.append(f"{i}. peak {size(p.peak_bytes)} per device [{how}]{host}, step "
                     f"~{p.step_seconds * 1e3:.2f} ms (model), {p.flops / 1e12:.3f} TFLOP and "
                     f"{p.comm_bytes / 2 ** 20:.1f} MiB traffic per device")
        lines.append("   sciscale train " + " ".join([recipe_name, *base_flags, *p.flags()]))
    return "\n".join(lines)
