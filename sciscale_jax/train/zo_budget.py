"""How many loss evaluations one step of a zeroth-order optimizer costs, checked before the first step.

Zeroth-order methods replace backpropagation by forward passes: MeZO (Malladi et al. 2023)
and ZO-AdaMU take two per direction; DeepZero (Chen et al. 2024) takes one per kept
coordinate plus the base loss, ``1 + Σ_l max(1, round(d_l·n_l))`` (``optim.deepzero.kept_counts``).
On a model of a million parameters DeepZero's default density of 5% means ~50,000 forward
passes per step: :func:`check_budget` states the count and refuses, unless forced, a step
over ``MAX_EVALUATIONS``, naming the density that would fit.
"""

from __future__ import annotations

import inspect
import math

import jax

from sciscale_jax import optim
from sciscale_jax.optim.deepzero import kept_counts

MAX_EVALUATIONS = 10_000  # loss evaluations per step above which a run is refused without force


def _defaults(name: str) -> dict:
    params = inspect.signature(optim.registry.factory(name)).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def evaluations_per_step(name: str, params, settings: dict | None = None) -> int:
    """Loss evaluations one update of zeroth-order optimizer ``name`` takes on ``params``.

    ``settings``: the factory's keyword arguments (defaults for those not given).
    """
    cfg = {**_defaults(name), **(settings or {})}
    if name == "deepzero":
        return 1 + sum(kept_counts(params, cfg["density"], cfg.get("layer_density")))
    if name == "mezo":
        return 2 * cfg["num_samples"]
    if name == "zo_adamu":
        return 2
    raise ValueError(f"{name!r} is not a zeroth-order optimizer with a known cost")


def feasible_density(params, limit: int = MAX_EVALUATIONS) -> float:
    """The largest uniform DeepZero density (2 significant digits, rounded down) whose step stays within ``limit``."""
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if 1 + sum(kept_counts(params, mid)) <= limit:
            lo = mid
        else:
            hi = mid
    if lo <= 0:
        return 0.0
    scale = 10.0 ** (1 - math.floor(math.log10(lo)))  # keep two significant digits, rounding down
    return math.floor(lo * scale) / scale


def check_budget(name: str, params, *, force: bool = False, log=print, limit: int = MAX_EVALUATIONS,
                 settings: dict | None = None) -> int | None:
    """Log the evaluations per step of zeroth-order ``name``; ValueError above ``limit`` unless ``force``."""
    if not optim.is_zeroth_order(name):
        return None
    n = evaluations_per_step(name, params, settings)
    size = sum(int(x.size) for x in jax.tree.leaves(params))
    if n > limit and not force:
        hint = ""
        if name == "deepzero":
            cfg = {**_defaults(name), **(settings or {})}
            hint = (f"lower DeepZero's density={cfg['density']} to <= {feasible_density(params, limit)} "
                    "(deepzero(density=...) in Python), or ")
        raise ValueError(f"optimizer {name!r} needs {n:,} loss evaluations per step for {size:,} parameters "
                         f"(over {limit:,}: a step would take unreasonably long); {hint}use --optimizer mezo "
                         "(2 per step), or pass --force to run anyway")
    log(f"{name}: {n:,} loss evaluations per step ({size:,} parameters)")
    return n
