"""``sciscale plan``: which technique mix fits a memory budget for a recipe, and which is fastest.

``plan(recipe, model_config, train_config, devices=..., budget=...)`` enumerates the mixes
(``memory.plan.enumerate_settings``: mesh shape with data / fsdp / tensor axes, DAP for models
that support it, pipeline stages for recipes with ``Recipe.pipeline`` and a scanned layer
stack; ZeRO stage, remat policy, attention, precision, accumulation, optimizer-state offload,
on pipeline meshes the schedule, and the model's own switches where it has them: the
Evoformer's chunk size and sub-module remat, a rollout's per-step remat, ``memory.plan.MODEL_SWITCHES``),
ranks them by the stated step-time model (``memory.plan.step_time``) and screens them against
the budget (``memory.plan.screened_parts``) from descriptions measured once per remat /
attention / precision / model switches (state bytes as the loop places them; residual bytes and matrix-product
FLOPs of one example at depth k and 2k from one trace each), walking the mixes fastest first
and tracing a description only when the walk reaches a mix that needs it. The best that fit
are confirmed with ``train.estimate.estimate`` (compiled probes: the figure it prints).
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools

import jax
import numpy as np

from sciscale_jax import precision
from sciscale_jax.memory import estimate as mem
from sciscale_jax.memory import plan as mplan
from sciscale_jax.train.abstract import abstract_run
from sciscale_jax.train.estimate import estimate, loss_profile


class _Profiles:
    """Per-example residual bytes and FLOPs by (remat, attention, precision, model switches), each
    measured when first asked for: one trace of the loss's forward and backward passes at depth
    k, one at 2k. Model switches are ``((name, value), ...)`` of ``memory.plan.MODEL_SWITCHES``.

    The FLOPs count matrix products, so they depend on the remat policy and attention but not on
    the precision (``flops`` takes them from whichever precision was measured, preferring
    ``precisions[0]``); one layer's input (``carry``) does not depend on the attention.
    """

    def __init__(self, recipe, model_config, train_config, precisions):
        self.recipe, self.model_config, self.train_config = recipe, model_config, train_config
        self.precisions, self.cache = list(precisions), {}

    def __call__(self, remat: str, attention: str, precision: str, switches: tuple = ()) -> dict:
        key = (remat, attention, precision, switches)
        if key not in self.cache:
            try:
                self.cache[key] = self._measure(*key)
            except ValueError as err:  # a combination the model refuses, remembered as refused
                self.cache[key] = err
        if isinstance(self.cache[key], ValueError):
            raise self.cache[key]
        return self.cache[key]

    def _measure(self, remat, attention, precision, switches):
        cfg = dataclasses.replace(self.model_config, remat=remat, attention=attention, precision=precision,
                                  sharding=None, **dict(switches))
        one = dataclasses.replace(self.train_config, batch_size=1, grad_accum=1, mesh="", zero=0, offload="")
        k1, k2 = mem.probe_depths(cfg)
        saved, flops = {}, {}
        for k in (k1, k2):
            saved[k], flops[k] = loss_profile(self.recipe, mem.at_depth(cfg, k), one)
        depth = mem.depth_of(cfg)
        layer = (saved[k2] - saved[k1]) / (k2 - k1)
        recompute = 0.0
        if remat != "none":
            recompute = self("none", attention, precision, switches)["layer"] * k1  # one group rebuilt at a time
        if getattr(cfg, "train_rollout_remat", False) and cfg.train_rollout > 1:
            # each rollout step keeps its input alone; its backward pass rebuilds one step's
            # residuals at a time: those of the same rollout without the per-step remat, over K
            every = self(remat, attention, precision, tuple(dict(switches, train_rollout_remat=False).items()))
            recompute += (every["layer"] * depth + every["base"]) / cfg.train_rollout
        layer_flops = (flops[k2] - flops[k1]) / (k2 - k1)
        return {"layer": layer, "base": saved[k1] - layer * k1, "recompute": recompute, "depth": depth,
                "flops": flops[k1] + layer_flops * (depth - k1)}

    def _known(self, match) -> dict | None:
        for key, prof in self.cache.items():
            if match(key) and not isinstance(prof, ValueError):
                return prof
        return None

    def known_flops(self, remat: str, attention: str, switches: tuple = ()) -> float | None:
        prof = self._known(lambda k: k[:2] == (remat, attention) and k[3] == switches)
        return None if prof is None else prof["flops"]

    def flops(self, remat: str, attention: str, precision: str, switches: tuple = ()) -> float:
        """FLOPs of one example's forward and backward passes (traced at ``precisions[0]`` if
        that precision is among the choices, else at ``precision``)."""
        known = self.known_flops(remat, attention, switches)
        if known is not None:
            return known
        return self(remat, attention, self.precisions[0] if self.precisions else precision, switches)["flops"]

    def known_carry(self, precision: str) -> float | None:
        prof = self._known(lambda k: k[0] == "full" and k[2] == precision)
        return None if prof is None else prof["layer"]

    def carry(self, attention: str, precision: str) -> float:
        """One layer's input per example: the bytes full remat keeps per layer."""
        known = self.known_carry(precision)
        return known if known is not None else self("full", attention, precision)["layer"]


class _States:
    """Per-device parameter, gradient and optimizer-state bytes by mesh, ZeRO stage and the
    precision's parameter dtype and loss scaling, as the loop places them; a mix the loop
    refuses (ValueError) is remembered as refused."""

    def __init__(self, recipe):
        self.recipe, self.cache = recipe, {}

    def __call__(self, cfg, tc) -> dict:
        key = (tc.mesh, tc.zero, str(cfg.param_dtype), precision.get_policy(cfg.precision).loss_scaling)
        if key not in self.cache:
            try:
                run = abstract_run(self.recipe, dataclasses.replace(cfg, remat="none", attention="xla"),
                                   dataclasses.replace(tc, grad_accum=1, offload=""))
                self.cache[key] = mem.state_bytes(run)
            except ValueError as err:
                self.cache[key] = err
        if isinstance(self.cache[key], ValueError):
            raise self.cache[key]
        return self.cache[key]


def plan_configs(model_config, train_config, s: dict):
    """(model config, train config) of one mix (a ``Plan.settings()`` dict) over the given ones."""
    cfg = dataclasses.replace(model_config, remat=s["remat"], attention=s["attention"], precision=s["precision"],
                              **{k: s[k] for k in mplan.MODEL_SWITCHES if k in s})
    tc = dataclasses.replace(train_config, mesh=s["mesh"], zero=s["zero"], grad_accum=s["grad_accum"],
                             offload=s["offload"])
    if s.get("pipeline_schedule"):
        tc = dataclasses.replace(tc, pipeline_schedule=s["pipeline_schedule"])
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


def _ranked(recipe, model_config, train_config, settings, profiles, states, hardware, seen: list, budget=None,
            refused: collections.Counter | None = None):
    """Every valid mix as a screened Plan, in ``_rank`` order, measuring only what the order needs.

    A best-first walk over lower bounds of the step time: a mix whose remat policy or model
    switches have not been traced yet takes the FLOPs of the same attention without remat and
    with each model switch at its cheapest value (recomputation, of a layer, a sub-module or a
    chunk, only adds matrix products), and a precision whose layer input is not yet known counts no
    tensor-parallel traffic. Reaching a bound traces what it stood for and puts the mix back at
    its exact time; reaching an exact time screens the mix (its residual profile) with every
    other mix of the same (time, accumulation, model-switch cost), sorted by peak. The profiles
    of slow mixes are traced only if the walk gets to them; the order is the one a full screen
    would give. With a ``budget`` a model switch is a fallback: a mix is left out (and, where the
    walk allows, never traced) where the same mix with every model switch at the same or a
    cheaper value fits.
    Each Plan is also appended to ``seen``; the first line of each refusal of a mix is counted in
    ``refused``.
    """
    remats = {s["remat"] for s in settings}
    base_remat = "none" if "none" in remats else None
    names = [k for k in mplan.MODEL_SWITCHES if any(k in s for s in settings)]
    switches_of = lambda s: tuple((k, s[k]) for k in names)  # noqa: E731
    order = mplan.switch_order
    base_switches = tuple((k, min({s[k] for s in settings}, key=lambda v: order(k, v))) for k in names)
    others = lambda s: tuple(sorted((k, v) for k, v in s.items() if k not in names))  # noqa: E731
    fits = {}  # the mix without model switches -> the model switches with which it fits the budget

    def superfluous(s) -> bool:
        """A fitting variant of the same mix with every switch at the same or a cheaper value."""
        mine = switches_of(s)
        return any(other != mine and all(order(k, a) <= order(k, b) for (k, a), (_, b) in zip(other, mine))
                   for other in fits.get(others(s), ()))
    heap, count = [], itertools.count()

    def timing(s, cfg, tc, state, level: int):
        """((time, accumulation), exact, (seconds, FLOPs, bytes)). ``level`` 0: lower bounds stand
        in for what is not yet known; 1: traced, except that a mix with model switches off their
        cheapest values is bounded by the same mix at the cheapest values (traced if need be); 2:
        traced."""
        exact, switches = True, switches_of(s)
        flops = profiles.known_flops(s["remat"], s["attention"], switches)
        if flops is None:
            bound_remat = s["remat"] if base_remat is None else base_remat
            same = profiles.known_flops(s["remat"], s["attention"], base_switches)
            if level == 1 and switches != base_switches:
                flops, exact = profiles.flops(s["remat"], s["attention"], s["precision"], base_switches), False
            elif level or (s["remat"], switches) == (bound_remat, base_switches):
                flops = profiles.flops(s["remat"], s["attention"], s["precision"], switches)
            elif same is not None:
                flops, exact = same, False
            else:
                flops, exact = profiles.flops(bound_remat, s["attention"], s["precision"], base_switches), False
        carry = 0.0
        sizes = mem.mesh_sizes(tc.mesh)
        if sizes["tp"] * sizes["dap"] > 1 or sizes["pp"] > 1:
            carry = profiles.known_carry(s["precision"])
            if carry is None and level:
                carry = profiles.carry(s["attention"], s["precision"])
            elif carry is None:
                carry, exact = 0.0, False
        seconds, total, comm = mplan.step_time(s, state, flops, carry, mem.depth_of(cfg), tc, hardware)
        return (round(seconds, 12), s["grad_accum"]), exact, (seconds, total, comm)

    for s in settings:
        try:
            cfg, tc = plan_configs(model_config, train_config, s)
            _check(recipe, cfg, tc)
            state = states(cfg, tc)
            key, exact, timed = timing(s, cfg, tc, state, 0)
        except ValueError as err:
            if refused is not None:
                refused[str(err).splitlines()[0] if str(err) else type(err).__name__] += 1
            continue
        heapq.heappush(heap, (key, mplan.switch_cost(switches_of(s)), exact, next(count),
                              (s, cfg, tc, state, timed, 0)))

    while heap:
        key, c, exact, _, entry = heapq.heappop(heap)
        s, cfg, tc, state, timed, level = entry
        if superfluous(s):
            continue
        if not exact:
            try:
                key, exact, timed = timing(s, cfg, tc, state, level + 1)
            except ValueError:
                continue
            heapq.heappush(heap, (key, c, exact, next(count), (s, cfg, tc, state, timed, level + 1)))
            continue
        tie = [entry]
        while heap and heap[0][:3] == (key, c, True):
            tie.append(heapq.heappop(heap)[4])
        group = []
        for s, cfg, tc, state, (seconds, total, comm), _ in tie:
            if superfluous(s):
                continue
            try:
                prof = profiles(s["remat"], s["attention"], s["precision"], switches_of(s))
            except ValueError:
                continue
            parts = mplan.screened_parts(s, state, prof, tc, np.dtype(cfg.param_dtype).itemsize)
            p = mplan.Plan(s["mesh"], s["zero"], s["remat"], s["attention"], s["precision"], s["grad_accum"],
                           s["offload"], parts, seconds, total, comm, pipeline_schedule=s["pipeline_schedule"],
                           model_switches=switches_of(s))
            if budget is not None and names and p.screen_bytes <= budget:
                fits.setdefault(others(s), []).append(switches_of(s))
            group.append(p)
        group.sort(key=_rank)
        seen.extend(group)
        yield from group


def _mix(p) -> tuple:
    """A plan's switches other than gradient accumulation."""
    return tuple(sorted((k, v) for k, v in p.settings().items() if k != "grad_accum"))


def _rank(p) -> tuple:
    """Fastest first; among equal modelled times, fewer accumulation steps (the model charges them
    nothing, a device does: smaller microbatches run less efficiently), then model switches at
    their cheaper values (no chunking before chunking, larger chunks before smaller: the model
    counts no loop overhead either), then the smaller peak."""
    return (round(p.step_seconds, 12), p.grad_accum, p.switch_cost(), p.screen_bytes)


def plan(recipe, model_config, train_config, *, devices: int, budget: int, fixed: dict | None = None,
         top: int = 3, confirm: bool = True, hardware: mplan.Hardware = mplan.Hardware(), log=None) -> list:
    """The ``top`` fastest mixes (``memory.plan.Plan``) whose peak fits ``budget`` bytes per device.

    ``fixed`` maps switch names (``memory.plan.SWITCHES``) to values the caller chose. With
    ``confirm`` the best screened plans (up to ``max(top, 3)``) are estimated with compiled
    probes until one fits; it comes first, with that estimate as its ``predicted``, followed by
    the next screened plans. Each mix is listed once, with the fewest accumulation steps that
    fit (more steps of the same mix are not an alternative). ValueError (one line) when nothing fits: it names the smallest peak
    found and its largest part.
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
                                        pipeline_layers=pipeline_layers,
                                        model_switches=mplan.model_switches(model_config))
    # FLOPs are traced at a reduced precision first: the mixes most likely to come first
    precisions = sorted(dict.fromkeys(s["precision"] for s in settings), key=lambda p: p == "fp32")
    profiles, states = _Profiles(recipe, model_config, train_config, precisions), _States(recipe)
    seen, out, confirmed, tries, refused = [], [], None, 0, collections.Counter()
    listed = set()  # a mix listed once: the same mix with more accumulation steps is no alternative
    for p in _ranked(recipe, model_config, train_config, settings, profiles, states, hardware, seen, budget,
                     refused):
        if p.screen_bytes > budget or _mix(p) in listed:
            continue
        if confirm and confirmed is None and tries < max(top, 3):
            tries += 1
            cfg, tc = plan_configs(model_config, train_config, p.settings())
            try:
                est = estimate(recipe, cfg, tc)
            except Exception as err:  # noqa: BLE001 -- a mix the compiler refuses is skipped, not fatal
                if log is not None:
                    log(f"skipped {p.describe()}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
                continue
            checked = dataclasses.replace(p, predicted=est)
            seen[seen.index(p)] = checked
            if est.peak_bytes > budget:
                continue
            confirmed = checked
            out.insert(0, checked)
        else:
            out.append(p)
        listed.add(_mix(p))
        if len(out) >= top and (confirmed is not None or not confirm or tries >= max(top, 3)):
            break
    if not seen:
        why = ""
        if refused:
            reason, n = refused.most_common(1)[0]
            why = f"; the most common refusal ({n} of {sum(refused.values())} mixes): {reason}"
        raise ValueError(f"no valid technique mix for {recipe.name} on {devices} devices with "
                         f"{fixed or 'no fixed flags'}{why}")
    if not out:
        raise ValueError(mplan.nothing_fits(seen, budget, devices))
    return out[:top]
