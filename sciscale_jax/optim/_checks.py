"""Shared argument validation and small helpers for the optax transforms in ``sciscale_jax.optim``.

Every check runs in Python on the arguments a factory receives, so bad input fails with a
``ValueError`` naming the value before anything is traced or compiled.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def learning_rate(value: Any, name: str = "learning_rate") -> Any:
    """A non-negative number, or a schedule: a callable of the step count."""
    if callable(value):
        return value
    if not _is_real(value) or not value >= 0:
        raise ValueError(f"{name}={value!r} must be a non-negative number or a schedule (callable of the step)")
    return value


def lr_at(value: Any, count: jax.Array) -> jax.Array:
    """The learning rate at step ``count`` (0 for the first update), as a float32 scalar."""
    return jnp.asarray(value(count) if callable(value) else value, jnp.float32)


def non_negative(value: Any, name: str) -> float:
    if not _is_real(value) or not value >= 0:
        raise ValueError(f"{name}={value!r} must be a non-negative number")
    return float(value)


def positive(value: Any, name: str) -> float:
    if not _is_real(value) or not value > 0:
        raise ValueError(f"{name}={value!r} must be a positive number")
    return float(value)


def beta(value: Any, name: str, *, allow_one: bool = False) -> float:
    """A decay rate in [0, 1), or in [0, 1] when ``allow_one``."""
    ok = _is_real(value) and (0.0 <= value <= 1.0 if allow_one else 0.0 <= value < 1.0)
    if not ok:
        interval = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{name}={value!r} must lie in {interval}")
    return float(value)


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
