"""Shared argument validation and small helpers for the optax transforms in ``sciscale_jax.optim``.

Every check runs in Python on the arguments a factory receives, so bad input fails with a
``ValueError`` naming the value before anything is traced or compiled.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def _number(value: Any) -> float | None:
    """``value`` as a Python float when it is a real number (Python, numpy or a concrete 0-d array), else None."""
    if isinstance(value, bool) or isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape == () and dtype is not None and (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
        return float(value)
    return None


def _finite(value: Any) -> float | None:
    x = _number(value)
    return x if x is not None and math.isfinite(x) else None


def learning_rate(value: Any, name: str = "learning_rate") -> Any:
    """A finite positive number, or a schedule: a callable of the step count."""
    if callable(value):
        return value
    x = _finite(value)
    if x is None or not x > 0:
        raise ValueError(f"{name}={value!r} must be a finite positive number or a schedule (callable of the step)")
    return value


def lr_at(value: Any, count: jax.Array) -> jax.Array:
    """The learning rate at step ``count`` (0 for the first update), as a float32 scalar."""
    return jnp.asarray(value(count) if callable(value) else value, jnp.float32)


def non_negative(value: Any, name: str) -> float:
    x = _finite(value)
    if x is None or not x >= 0:
        raise ValueError(f"{name}={value!r} must be a finite non-negative number")
    return x


def positive(value: Any, name: str) -> float:
    x = _finite(value)
    if x is None or not x > 0:
        raise ValueError(f"{name}={value!r} must be a finite positive number")
    return x


def beta(value: Any, name: str, *, allow_one: bool = False) -> float:
    """A decay rate in [0, 1), or in [0, 1] when ``allow_one``."""
    x = _finite(value)
    ok = x is not None and (0.0 <= x <= 1.0 if allow_one else 0.0 <= x < 1.0)
    if not ok:
        interval = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{name}={value!r} must lie in {interval}")
    return x


def fraction(value: Any, name: str) -> float:
    """A number in (0, 1]."""
    x = _finite(value)
    if x is None or not 0.0 < x <= 1.0:
        raise ValueError(f"{name}={value!r} must lie in (0, 1]")
    return x


def decay_mask(mask: Any, name: str = "mask") -> Any:
    """``None`` (decay every parameter), a callable ``params -> bool pytree``, or a pytree of bools."""
    if mask is None or callable(mask):
        return mask
    leaves = jax.tree.leaves(mask)
    bad = [m for m in leaves if not isinstance(m, (bool, np.bool_))]
    if bad or not leaves:
        raise ValueError(f"{name}={mask!r} must be a pytree of Python bools (a prefix of params) "
                         f"or a function params -> such a pytree")
    return mask


def decay_flags(mask: Any, params: Any, name: str = "mask") -> list[bool]:
    """One bool per leaf of ``params`` (``jax.tree.leaves`` order): does weight decay apply to it.

    ``mask`` as accepted by :func:`decay_mask`; a bool pytree may be a prefix of ``params``
    (a bool on a subtree covers all its leaves). Subtrees with no leaves, such as the
    ``optax.MaskedNode`` placeholders of ``optax.masked``, take no flags.
    """
    n = len(jax.tree.leaves(params))
    if mask is None:
        return [True] * n
    tree = mask(params) if callable(mask) else mask
    mask_leaves, mask_def = jax.tree.flatten(tree)
    try:
        subtrees = mask_def.flatten_up_to(params)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{name} must be a pytree of bools laid out like params (or a prefix of it): {err}") from None
    flags = []
    for m, sub in zip(mask_leaves, subtrees):
        if not isinstance(m, (bool, np.bool_)):
            raise ValueError(f"{name} holds {m!r}; every entry must be a Python bool")
        flags += [bool(m)] * len(jax.tree.leaves(sub))
    return flags


def positive_int(value: Any, name: str) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return int(value)


def non_negative_int(value: Any, name: str) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name}={value!r} must be a non-negative integer")
    return int(value)


def need_params(params: Any, name: str) -> None:
    if params is None:
        raise ValueError(f"{name} needs `params` in update(updates, state, params)")


def need_value_fn(value_fn: Callable | None, name: str) -> Callable:
    if value_fn is None or not callable(value_fn):
        raise ValueError(f"{name} is zeroth order: call update(updates, state, params, value_fn=loss_fn) "
                         f"with loss_fn(params) -> scalar; got value_fn={value_fn!r}")
    return value_fn


def path_names(path: tuple) -> tuple:
    """A jax key path as plain ``str`` / ``int`` entries (dict keys, attributes, sequence indices)."""
    out = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                out.append(getattr(entry, attr))
                break
        else:
            out.append(str(entry))
    return tuple(out)
