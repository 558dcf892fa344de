"""Optimizers by name: ``get_optimizer("came", 1e-3)`` for configs and the ``sciscale`` CLI.

First-order names return ``optax.GradientTransformation``; zeroth-order names (see
:func:`is_zeroth_order`) return ``optax.GradientTransformationExtraArgs`` whose ``update``
takes the loss as ``value_fn``. ``adamw``, ``adafactor`` and ``lion`` are optax's algorithms
called through :mod:`sciscale_jax.optim.optax_aliases`. Every optimizer's weight decay is 0
unless the caller passes ``weight_decay``; every optimizer with a decay takes ``mask``.
"""

from __future__ import annotations

import inspect
from typing import Callable

from sciscale_jax.optim import _checks
from sciscale_jax.optim.adam_mini import adam_mini
from sciscale_jax.optim.adamw_8bit import adamw_8bit
from sciscale_jax.optim.came import came
from sciscale_jax.optim.deepzero import deepzero
from sciscale_jax.optim.mezo import mezo
from sciscale_jax.optim.optax_aliases import adafactor, adamw, lion
from sciscale_jax.optim.sm3 import sm3
from sciscale_jax.optim.zo_adamu import zo_adamu

_FACTORIES: dict[str, Callable] = {
    "adamw": adamw,
    "adafactor": adafactor,
    "sm3": sm3,
    "came": came,
    "lion": lion,
    "adam_mini": adam_mini,
    "adamw_8bit": adamw_8bit,
    "mezo": mezo,
    "zo_adamu": zo_adamu,
    "deepzero": deepzero,
}
OPTIMIZERS: tuple[str, ...] = tuple(_FACTORIES)
_ZEROTH_ORDER = frozenset({"mezo", "zo_adamu", "deepzero"})


def _known(name: str) -> str:
    if name not in _FACTORIES:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    return name


def is_zeroth_order(name: str) -> bool:
    """True for optimizers that take ``value_fn`` instead of gradients."""
    return _known(name) in _ZEROTH_ORDER


def get_optimizer(name: str, learning_rate, *, mask=None, **kwargs):
    """The optimizer ``name`` built with ``learning_rate`` (number or schedule) and its keyword args.

    ``mask`` (a bool pytree or a function params -> bool pytree, e.g.
    :func:`sciscale_jax.optim.default_decay_mask`) chooses the parameters that weight decay
    applies to; it goes to every optimizer that has a decay and is dropped for the one that
    has none (``sm3``). Weight decay itself is 0 unless ``weight_decay=`` is passed.
    """
    factory = _FACTORIES[_known(name)]
    _checks.learning_rate(learning_rate)
    if mask is not None and "mask" in inspect.signature(factory).parameters:
        kwargs["mask"] = mask
    return factory(learning_rate, **kwargs)


def factory(name: str) -> Callable:
    """The factory behind ``name`` (e.g. to inspect which keyword arguments it takes)."""
    return _FACTORIES[_known(name)]
