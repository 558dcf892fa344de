"""``sciscale plan``: which technique mix fits a memory budget for a recipe, and which is fastest.

``plan(recipe, model_config, train_config, devices=..., budget=...)`` enumerates the mixes
(``memory.plan.enumerate_settings``: mesh shape with data / fsdp / tensor axes, DAP for models
that support it, pipeline stages for recipes with ``Recipe.pipeline`` and a scanned layer
stack; ZeRO stage, remat policy, attention, precision, accumulation, optimizer-state offload),
screens each against the budget from a description measured once per remat / attention /
precision (``memory.plan.screen``: state bytes as the loop places them, residuals and FLOPs of
one example at depth k and 2k), ranks the ones that fit by the stated step-time model and
confirms the best with ``train.estimate.estimate`` (compiled probes: the figure it prints).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from sciscale_jax.memory import estimate as mem
from sciscale_jax.memory import plan as mplan
from sciscale_jax.train.abstract import abstract_run
from sciscale_jax.train.estimate import estimate, loss_profile


class _Profiles:
    """Per-example residual bytes and FLOPs by (remat, attention, precision), cached."""

    def __init__(self, recipe, model_config, train_config):
        self.recipe, self.model_config, self.train_config = recipe, model_config, train_config
        self.cache = {}

    def __call__(self, remat: str, attention: str, precision: str) -> dict:
        key = (remat, attention, precision)
        if key not in self.cache:
            self.cache[key] = self._measure(*key)
        return self.cache[key]

    def _measure(self, remat, attention, precision):
        cfg = dataclasses.replace(self.model_config, remat=remat, attention=attention, precision=precision,
                                  sharding=None)
        one = dataclasses.replace(self.train_config, batch_size=1, grad_accum=1, mesh="", zero=0, offload="")
        k1, k2 = mem.probe_depths(cfg)
        saved, flops = {}, {}
        for k in (k1, k2):
            saved[k], flops[k] = loss_profile(self.recipe, mem.at_depth(cfg, k), one, flops=True)
        depth = mem.depth_of(cfg)
        layer = (saved[k2] - saved[k1]) / (k2 - k1)
        recompute = 0.0
        if remat != "none":
            recompute = self("none", attention, precision)["layer"] * k1  # one group rebuilt at a time
        layer_flops = (flops[k2] - flops[k1]) / (k2 - k1)
        return {"layer": layer, "base": saved[k1] - layer * k1, "recompute": recompute, "depth": depth,
                "flops": flops[k1] + layer_flops * (depth - k1)}

    def carry(self, attention: str, precision: str) -> float:
        """One layer's input per example: the bytes full remat keeps per layer."""
        return self("full", attention, precision)["layer"]


def _configs(model_config, train_config, s: dict):
    cfg = dataclasses.replace(model_config, remat=s["remat"], attention=s["attention"], precision=s["precision"])
    tc = dataclasses.replace(train_config, mesh=s["mesh"], zero=s["zero"], grad_accum=s["grad_accum"],
                             offload=s["offload"])
    return cfg, tc


def _check(recipe, cfg, tc) -> None:
    """The loop's refusals that need no model (ValueError): run, pipeline and DAP checks, batch split."""
    from sciscale_jax.parallel import dap
    from sciscale_jax.train import pipeline as pipeline_run
    from sciscale_jax.train import validate

    validate.check_run(cfg, tc)
    pipeline_run.check_run(recipe, cfg, tc)
    sizes = mem.mesh_sizes(tc.mesh)
    if tc.mesh:
        dap.check_dap(mem.mesh_config(tc).sizes(), cfg.attention, getattr(cfg, "supports_dap", False))
    if tc.batch_size % (sizes["dp"] * tc.grad_accum):
        raise ValueError(f"batch_size={tc.batch_size} does not split over {sizes['dp']} x {tc.grad_accum}")


def _screen(recipe, model_config, train_config, settings, profiles, states, hardware):
    """The screened Plan of one mix, or None when the mix is not a valid run."""
    try:
        cfg, tc = _configs(model_config, train_config, settings)
        _check(recipe, cfg, tc)
        key = (settings["mesh"], settings["zero"], settings["precision"])
        if key not in states:
            run = abstract_run(recipe, dataclasses.replace(cfg, remat="none", attention="xla"),
                               dataclasses.replace(tc, grad_accum=1, offload=""))
            states[key] = mem.state_bytes(run)
        prof = profiles(settings["remat"], settings["attention"], settings["precision"])
        carry = profiles.carry(settings["attention"], settings["precision"])
    except ValueError:
        return None
    return mplan.screen(settings, states[key], prof, carry, tc, np.dtype(cfg.param_dtype).itemsize, hardware)


def _rank(p) -> tuple:
    """Fastest first; among equal modelled times, fewer accumulation steps (the model charges them
    nothing, a device does: smaller microbatches run less efficiently), then the smaller peak."""
    return (round(p.step_seconds, 12), p.grad_accum, p.screen_bytes)


def plan(recipe, model_config, train_config, *, devices: int, budget: int, fixed: dict | None = None,
         top: int = 3, confirm: bool = True, hardware: mplan.Hardware = mplan.Hardware(), log=None) -> list:
    """The ``top`` fastest mixes (``memory.plan.Plan``) whose peak fits ``budget`` bytes per device.

    ``fixed`` maps switch names (``memory.plan.SWITCHES``) to values the caller chose. With
    ``confirm`` the best screened plans are estimated with compiled probes until one fits; its
    ``predicted`` is that estimate. ValueError (one line) when nothing fits: it names the
    smallest peak found and its largest part.
    """
    if jax.device_count() < devices:
        raise ValueError(f"devices={devices} but JAX sees {jax.device_count()} devices (sciscale plan simulates "
                         f"them on CPU)")
    if budget <= 0:
        raise ValueError(f"budget={budget} bytes must be positive")
    fixed = dict(fixed or {})
    pipeline_layers = mem.depth_of(model_config) if (recipe.pipeline is not None
                                                      and getattr(model_config, "scan_layers", False)) else 0
    settings = mplan.enumerate_settings(train_config, devices, fixed,
                                        dap=getattr(model_config, "supports_dap", False),
                                        pipeline_layers=pipeline_layers)
    profiles, states = _Profiles(recipe, model_config, train_config), {}
    plans = [p for p in (_screen(recipe, model_config, train_config, s, profiles, states, hardware)
                         for s in settings) if p is not None]
    if not plans:
        raise ValueError(f"no valid technique mix for {recipe.name} on {devices} devices with "
                         f"{fixed or 'no fixed flags'}")
    fits = sorted((p for p in plans if p.screen_bytes <= budget), key=_rank)
    if confirm:
        confirmed, rejected = [], []
        for p in fits[:max(top, 3)]:
            cfg, tc = _configs(model_config, train_config, p.settings())
            try:
                est = estimate(recipe, cfg, tc)
            except Exception as err:  # noqa: BLE001 -- a mix the compiler refuses is skipped, not fatal
                if log is not None:
                    log(f"skipped {p.describe()}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
                rejected.append(p)
                continue
            p = dataclasses.replace(p, predicted=est)
            if est.peak_bytes <= budget:
                confirmed.append(p)
                break
            rejected.append(p)
        done = [c.settings() for c in confirmed + rejected]
        fits = confirmed + [p for p in fits if p.settings() not in done]
        plans = ([p for p in plans if p.settings() not in done] + confirmed
                 + [r for r in rejected if r.predicted is not None]) or plans
    if not fits:
        raise ValueError(mplan.nothing_fits(plans, budget, devices))
    return fits[:top]
