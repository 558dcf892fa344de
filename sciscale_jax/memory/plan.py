"""The planner behind ``sciscale plan``: which technique mix fits a memory budget, and which is fastest.

``plan(recipe, model_config, train_config, devices=..., budget=...)`` enumerates the mixes of
mesh shape (data / fsdp x tensor), ZeRO stage, remat policy, attention implementation,
precision, gradient accumulation and optimizer-state offload (every switch the caller did not
fix), screens each against the budget, ranks the ones that fit by a step-time model, and
confirms the best with ``estimate(method="compile")`` (the figure it prints).

The screen of one mix: parameters, gradients and optimizer state per device exactly as the
loop places them (``estimate.state_bytes`` of the run's abstract step), plus activations from
the residuals autodiff saves on one example (depth k and 2k, extended to the full depth),
times the examples each device holds at once, divided over the tensor devices, plus one
layer's recomputation under a remat policy and a float32 accumulator with ``grad_accum``.

The step-time model (stated, not measured; no overlap of compute and communication):

- compute: FLOPs of the forward and backward passes, recomputation included, from XLA's cost
  analysis of the lowered gradient program on one example, times the examples per device,
  divided over the tensor devices, at ``Hardware.flops`` (bf16/fp16/fp8) or half of it (fp32);
- data-parallel traffic per device: an all-reduce of the gradients moves 2(n-1)/n of their bytes
  (ZeRO 0-1), a reduce-scatter (n-1)/n (ZeRO 2), ZeRO-3/FSDP adds two all-gathers of the
  parameters per microbatch; tensor parallel moves 4 (t-1)/t of each layer's input per layer and
  example; all over ``Hardware.link_bandwidth``;
- offloaded optimizer state crosses the host link twice per step (``Hardware.host_bandwidth``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax

from sciscale_jax.memory.estimate import (Estimate, _at_depth, _loss_program, _probe_depths, depth_field, estimate,
                                          state_bytes)
GiB = 2.0 ** 30
PLAN_REMAT = ("none", "selective", "full")
PLAN_ATTENTION = ("xla", "chunked")
PLAN_PRECISION = ("fp32", "bf16")
PLAN_OFFLOAD = ("",)  # offload only when asked (--offload): its saving shows on GPU/TPU, not in a CPU compile
# The switches ``plan`` enumerates, by config: (model or train, field).
SWITCHES = {"remat": "model", "attention": "model", "precision": "model", "mesh": "train", "zero": "train",
            "grad_accum": "train", "offload": "train"}


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
                "precision": self.precision, "grad_accum": self.grad_accum, "offload": self.offload}

    def flags(self) -> list[str]:
        out = []
        for name, value in self.settings().items():
            if value == "" or (name == "zero" and not self.mesh):  # one device: no mesh, no ZeRO
                continue
            out.append(f"--{name.replace('_', '-')} {value}")
        return out

    def describe(self) -> str:
        s = self.settings()
        return ", ".join(f"{k}={v}" for k, v in s.items() if v not in ("", None))


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


def candidate_meshes(devices: int) -> list[tuple[str, int]]:
    """(mesh, zero) pairs on ``devices``: data x tensor with ZeRO 0-3, fsdp x tensor ("" on one device)."""
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
    return out


class _Profiles:
    """Per-example activation bytes and FLOPs by (remat, attention, precision), cached."""

    def __init__(self, recipe, model_config, train_config):
        self.recipe, self.model_config, self.train_config = recipe, model_config, train_config
        self.cache = {}

    def __call__(self, remat: str, attention: str, precision: str) -> dict:
        key = (remat, attention, precision)
        if key not in self.cache:
            self.cache[key] = self._measure(*key)
        return self.cache[key]

    def _depth_pair(self, cfg):
        k1, k2 = _probe_depths(cfg)
        saved, flops = {}, {}
        for k in (k1, k2):
            saved[k], flops[k] = _loss_program(self.recipe, _at_depth(cfg, k), self._one_example(), flops=True)
        return k1, k2, saved, flops

    def _one_example(self):
        return dataclasses.replace(self.train_config, batch_size=1, grad_accum=1, mesh="", zero=0, offload="")

    def _measure(self, remat, attention, precision):
        cfg = dataclasses.replace(self.model_config, remat=remat, attention=attention, precision=precision,
                                  sharding=None)
        depth = getattr(cfg, depth_field(cfg))
        k1, k2, saved, flops = self._depth_pair(cfg)
        layer = (saved[k2] - saved[k1]) / (k2 - k1)
        recompute = 0.0
        if remat != "none":
            recompute = self("none", attention, precision)["layer"] * k1  # one group rebuilt at a time
        carry = layer if remat == "full" else None  # the layer input: what full remat keeps per layer
        layer_flops = (flops[k2] - flops[k1]) / (k2 - k1)
        return {"layer": layer, "base": saved[k1] - layer * k1, "recompute": recompute, "carry": carry,
                "depth": depth, "flops": flops[k1] + layer_flops * (depth - k1)}


def _mesh_sizes(mesh: str) -> dict:
    from sciscale_jax import parallel

    if not mesh:
        return {"dp": 1, "tp": 1, "fsdp": 1}
    c = parallel.ParallelConfig.parse(mesh).resolve(jax.device_count())
    return {"dp": c.data * c.fsdp, "tp": c.tensor * c.tensor2 * c.sequence, "fsdp": c.fsdp}


def _screen(recipe, model_config, train_config, settings: dict, profiles, states, hw: Hardware) -> Plan | None:
    """The screened Plan for one mix, or None when the mix is not a valid run."""
    from sciscale_jax.train.abstract import abstract_run

    s = settings
    try:
        cfg = dataclasses.replace(model_config, remat=s["remat"], attention=s["attention"], precision=s["precision"])
        tc = dataclasses.replace(train_config, mesh=s["mesh"], zero=s["zero"], grad_accum=s["grad_accum"],
                                 offload=s["offload"])
        key = (s["mesh"], s["zero"], s["precision"])
        if key not in states:
            run = abstract_run(recipe, dataclasses.replace(cfg, remat="none", attention="xla"),
                               dataclasses.replace(tc, grad_accum=1, offload=""))
            states[key] = state_bytes(run)
        sizes = _mesh_sizes(s["mesh"])
        if tc.batch_size % (sizes["dp"] * tc.grad_accum):
            return None
        prof = profiles(s["remat"], s["attention"], s["precision"])
    except ValueError:
        return None
    st = dict(states[key])
    if s["offload"] == "opt_state":
        st["opt_state"] = 0
    micro = tc.batch_size // (sizes["dp"] * tc.grad_accum)
    tp = sizes["tp"]
    depth = prof["depth"]
    act = micro * (prof["base"] + prof["layer"] * depth + prof["recompute"]) / tp
    if tc.grad_accum > 1:  # float32 accumulator beside the gradients
        act += st["grads"] * (4 / max(1, _param_itemsize(cfg)))
    parts = {"parameters": st["params"], "gradients": st["grads"], "optimizer state": st["opt_state"],
             "activations": int(act)}
    examples = tc.batch_size // sizes["dp"]
    flops = prof["flops"] * examples / tp
    rate = hw.flops if s["precision"] != "fp32" else hw.flops / 2
    dp, grad = sizes["dp"], st["grads"]
    comm = 0.0
    if dp > 1:
        if s["zero"] >= 2 or sizes["fsdp"] > 1:  # reduce-scatter of the whole gradient (dp shards of it)
            comm += grad * dp * (dp - 1) / dp
        else:  # all-reduce
            comm += 2 * grad * (dp - 1) / dp
        if s["zero"] >= 3 or sizes["fsdp"] > 1:
            comm += 2 * st["params"] * (dp - 1) * tc.grad_accum
    if tp > 1:
        carry = prof["carry"] if prof["carry"] is not None else profiles("full", s["attention"], s["precision"])["carry"]
        comm += 4 * carry * depth * examples * (tp - 1) / tp / tp
    host = 2 * states[key]["opt_state"] if s["offload"] == "opt_state" else 0.0
    seconds = flops / rate + comm / hw.link_bandwidth + host / hw.host_bandwidth
    return Plan(s["mesh"], s["zero"], s["remat"], s["attention"], s["precision"], s["grad_accum"], s["offload"],
                parts, seconds, flops, comm)


def _param_itemsize(cfg) -> int:
    import numpy as np
    return np.dtype(cfg.param_dtype).itemsize


def enumerate_settings(model_config, train_config, devices: int, fixed: dict) -> list[dict]:
    """Every mix of the switches not in ``fixed`` (name -> value)."""
    meshes = candidate_meshes(devices)
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
    }
    out = []
    for (mesh, zero), *rest in itertools.product(meshes, *choices.values()):
        out.append({"mesh": mesh, "zero": zero, **dict(zip(choices, rest))})
    return out


def plan(recipe, model_config, train_config, *, devices: int, budget: int, fixed: dict | None = None,
         top: int = 3, confirm: bool = True, hardware: Hardware = Hardware(), log=None) -> list[Plan]:
    """The ``top`` fastest mixes whose peak fits ``budget`` bytes per device, fastest first.

    ``fixed`` maps switch names (``SWITCHES``) to values the caller chose. With ``confirm`` the
    best screened plans are estimated with compiled probes until one fits; its ``predicted``
    is that estimate. ValueError (one line) when nothing fits: it names the smallest peak found
    and its largest part.
    """
    if jax.device_count() < devices:
        raise ValueError(f"devices={devices} but JAX sees {jax.device_count()} devices (sciscale plan simulates "
                         f"them on CPU)")
    if budget <= 0:
        raise ValueError(f"budget={budget} bytes must be positive")
    fixed = dict(fixed or {})
    profiles, states = _Profiles(recipe, model_config, train_config), {}
    plans = []
    for settings in enumerate_settings(model_config, train_config, devices, fixed):
        p = _screen(recipe, model_config, train_config, settings, profiles, states, hardware)
        if p is not None:
            plans.append(p)
    if not plans:
        raise ValueError(f"no valid technique mix for {recipe.name} on {devices} devices with {fixed or 'no fixed flags'}")
    fits = sorted((p for p in plans if p.screen_bytes <= budget), key=lambda p: (p.step_seconds, p.screen_bytes))
    if confirm:
        confirmed, rejected = [], []
        for p in fits[:max(top, 3)]:
            est = estimate(recipe, dataclasses.replace(model_config, remat=p.remat, attention=p.attention,
                                                       precision=p.precision),
                           dataclasses.replace(train_config, mesh=p.mesh, zero=p.zero, grad_accum=p.grad_accum,
                                               offload=p.offload))
            p = dataclasses.replace(p, predicted=est)
            if est.peak_bytes <= budget:
                confirmed.append(p)
                break
            rejected.append(p)
        done = [c.settings() for c in confirmed + rejected]
        fits = confirmed + [p for p in fits if p.settings() not in done]
        plans = [p for p in plans if p.settings() not in done] + confirmed + rejected
    if not fits:
        small = min(plans, key=lambda p: p.peak_bytes)
        name, value = small.dominant()
        raise ValueError(f"nothing fits {budget / GiB:.2f} GiB per device on {devices} devices: the smallest peak "
                         f"found is {small.peak_bytes / GiB:.2f} GiB ({small.describe()}), dominated by {name} "
                         f"({value / GiB:.2f} GiB)")
    return fits[:top]


def format_plans(recipe_name: str, plans: list[Plan], base_flags: list[str], budget: int, devices: int) -> str:
    lines = [f"plans for {recipe_name} on {devices} devices within {budget / GiB:.2f} GiB per device "
             f"(fastest first by the stated step-time model):"]
    for i, p in enumerate(plans, 1):
        how = "predicted (compiled probes)" if p.predicted is not None else "screen"
        lines.append(f"{i}. peak {p.peak_bytes / GiB:.3f} GiB per device [{how}], step ~{p.step_seconds * 1e3:.2f} ms "
                     f"(model), {p.flops / 1e12:.3f} TFLOP and {p.comm_bytes / 2 ** 20:.1f} MiB traffic per device")
        lines.append("   sciscale train " + " ".join([recipe_name, *base_flags, *p.flags()]))
    return "\n".join(lines)
