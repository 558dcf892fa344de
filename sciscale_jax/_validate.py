"""Shared checks for configured numbers and names, used by the configs' ``__post_init__``.

Each check raises a one-line ``ValueError`` naming the field, the value and the constraint,
so bad input fails before anything is built, traced or compiled. Booleans are not numbers
here (``num_layers=True`` is refused), NaN and infinities are not finite values, and a
float is not an integer (``steps=2.5`` is refused; ``steps=3.0`` too, to keep configs exact).
"""

from __future__ import annotations

import math
import numbers
from typing import Any



def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int, if it is an integer (not a bool, not a float) within [minimum, maximum]."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be an integer")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value!r} must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}={value!r} must be <= {maximum}")
    return int(value)


def finite(value: Any, name: str, *, minimum: float | None = None, positive: bool = False) -> float:
    """``value`` as a float, if it is a finite real number, ``> 0`` when ``positive``, ``>= minimum``."""
    if not _real(value) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")
    if positive and not value > 0:
        raise ValueError(f"{name}={value!r} must be positive")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value!r} must be >= {minimum}")
    return float(value)


def float_dtype(value: Any, name: str) -> str:
    """The name of a floating-point dtype (``"float32"``, ``"bfloat16"``...), else ValueError."""
    import jax.numpy as jnp
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        raise ValueError(f"{name}={value!r} is not a dtype") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name}={value!r} must be a floating-point dtype (float32, bfloat16, float16)")
    return dtype.name


def transformer_config(cfg) -> None:
    """Checks of a ``TransformerConfig`` beyond its own: integral sizes, finite rope_base, float dtypes."""
    for name in ("vocab_size", "num_layers", "num_heads", "embed_dim", "mlp_dim", "max_len", "linformer_k",
                 "performer_features"):
        integer(getattr(cfg, name), name, minimum=1)
    finite(cfg.rope_base, "rope_base", positive=True)
    finite(cfg.dropout, "dropout", minimum=0.0)
    for name in ("dtype", "param_dtype"):
        float_dtype(getattr(cfg, name), name)


SEED_LIMIT = 2 ** 32 - 1  # numpy and jax.random both take seeds in [0, 2**32)


def train_config(cfg) -> None:
    """Checks of a ``TrainConfig``: integers are integers, numbers are finite, names are known."""
    for name in ("steps", "batch_size", "seq_len", "eval_every", "save_every", "keep", "log_every", "grad_accum"):
        integer(getattr(cfg, name), name, minimum=1)
    integer(cfg.warmup_steps, "warmup_steps", minimum=0)
    integer(cfg.zero, "zero", minimum=0)
    integer(getattr(cfg, "prefetch", 0), "prefetch", minimum=0)
    integer(cfg.seed, "seed", minimum=0, maximum=SEED_LIMIT)
    schedule_steps = getattr(cfg, "schedule_steps", 0)
    integer(schedule_steps, "schedule_steps", minimum=0)
    finite(cfg.learning_rate, "learning_rate", positive=True)
    finite(cfg.weight_decay, "weight_decay", minimum=0.0)
    finite(cfg.grad_clip, "grad_clip", minimum=0.0)
    from sciscale_jax import optim  # the registry names the optimizers a config may choose
    if not isinstance(cfg.optimizer, str):
        raise ValueError(f"optimizer={cfg.optimizer!r} must be a name; known: {', '.join(optim.OPTIMIZERS)}")
    optim.is_zeroth_order(cfg.optimizer)  # ValueError for unknown names, listing the known ones
