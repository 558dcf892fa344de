"""Dynamic loss scaling (Micikevicius et al. 2018, "Mixed Precision Training", sec. 3.2).

float16 gradients underflow; multiplying the loss by a large scale S before
differentiation lifts them into range, and dividing the gradients by S restores them.
S adapts: after ``period`` finite steps in a row it grows by ``factor``; on a step with a
non-finite gradient it backs off by ``factor`` (never below ``min_loss_scale``) and the
step is skipped.

``DynamicLossScale`` is a NamedTuple whose every field is an array leaf, so the whole
configuration (not only the current scale) survives ``jit``, ``tree.map`` and checkpoint
round trips; google-deepmind/jmp keeps ``min_loss_scale`` as static metadata and loses it.

Two optax wrappers, written without flax so they stand alone:

- ``skip_nonfinite(inner)``: never applies a non-finite update and never advances
  ``inner``'s state on such a step, however many come in a row (``optax.apply_if_finite``
  gives up after ``max_consecutive_errors`` and applies the bad update). It counts skipped
  steps. Use it for bf16/fp32.
- ``dynamic_loss_scaling(inner, ...)``: the same, plus a ``DynamicLossScale`` kept in the
  optimizer state. The train step multiplies its loss by ``loss_scale_of(opt_state)``
  before differentiating; ``update`` divides the gradients by it and adjusts it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def all_finite(tree) -> jax.Array:
    """True when every element of every floating leaf of ``tree`` is finite."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    if not leaves:
        return jnp.array(True)
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]).all()


class DynamicLossScale(NamedTuple):
    """Current scale and its adjustment rule, all as array leaves."""

    loss_scale: jax.Array      # float32 scalar, the current S
    counter: jax.Array         # int32, finite steps since the last change of S
    period: jax.Array          # int32, finite steps before S grows
    factor: jax.Array          # float32, growth and back-off factor
    min_loss_scale: jax.Array  # float32, S never goes below this

    @classmethod
    def create(cls, initial_scale: float = 2.0**15, period: int = 2000, factor: float = 2.0,
               min_loss_scale: float = 1.0) -> "DynamicLossScale":
        if not min_loss_scale > 0:
            raise ValueError(f"min_loss_scale={min_loss_scale} must be > 0")
        if not initial_scale >= min_loss_scale:
            raise ValueError(
                f"initial_scale={initial_scale} must be >= min_loss_scale={min_loss_scale}")
        if int(period) != period or period < 1:
            raise ValueError(f"period={period} must be a positive integer")
        if not factor > 1:
            raise ValueError(f"factor={factor} must be > 1")
        return cls(jnp.asarray(initial_scale, jnp.float32), jnp.asarray(0, jnp.int32),
                   jnp.asarray(period, jnp.int32), jnp.asarray(factor, jnp.float32),
                   jnp.asarray(min_loss_scale, jnp.float32))

    def scale(self, tree):
        """Multiply every floating leaf by S (in the leaf's dtype)."""
        return jax.tree.map(lambda x: x * self.loss_scale.astype(x.dtype), tree)

    def unscale(self, tree):
        """Divide every floating leaf by S, computing in float32."""
        inv = 1.0 / self.loss_scale
        return jax.tree.map(lambda x: (x.astype(jnp.float32) * inv).astype(x.dtype), tree)

    def adjust(self, grads_finite: jax.Array) -> "DynamicLossScale":
        """The scale for the next step: grow after ``period`` finite steps, back off on a
        non-finite one."""
        counter = self.counter + 1
        grow = counter >= self.period
        grown = jnp.where(grow, self.loss_scale * self.factor, self.loss_scale)
        finite_scale = jnp.where(jnp.isfinite(grown), grown, self.loss_scale)
        finite_counter = jnp.where(grow, 0, counter)
        backed_off = jnp.maximum(self.loss_scale / self.factor, self.min_loss_scale)
        return self._replace(
            loss_scale=jnp.where(grads_finite, finite_scale, backed_off).astype(jnp.float32),
            counter=jnp.where(grads_finite, finite_counter, 0).astype(jnp.int32))


class SkipNonFiniteState(NamedTuple):
    inner_state: Any
    skipped_steps: jax.Array      # int32, total steps skipped so far
    consecutive_skips: jax.Array  # int32, skipped steps since the last applied one


class LossScaleState(NamedTuple):
    loss_scale: DynamicLossScale
    inner_state: Any
    skipped_steps: jax.Array
    consecutive_skips: jax.Array


def _guarded_update(inner, grads, inner_state, params, extra_args):
    """Run ``inner`` and keep its result only if grads and updates are all finite."""
    updates, new_inner = inner.update(grads, inner_state, params, **extra_args)
    ok = jnp.logical_and(all_finite(grads), all_finite(updates))
    updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), updates)
    new_inner = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_inner, inner_state)
    return updates, new_inner, ok


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Wrap ``inner`` so a step with any non-finite gradient (or update) applies a zero
    update and leaves ``inner``'s state exactly as it was."""
    inner = optax.with_extra_args_support(inner)

    def init(params):
        zero = jnp.asarray(0, jnp.int32)
        return SkipNonFiniteState(inner.init(params), zero, zero)

    def update(grads, state, params=None, **extra_args):
        updates, new_inner, ok = _guarded_update(inner, grads, state.inner_state, params, extra_args)
        skipped = jnp.where(ok, 0, 1).astype(jnp.int32)
        return updates, SkipNonFiniteState(
            new_inner, state.skipped_steps + skipped,
            jnp.where(ok, 0, state.consecutive_skips + 1).astype(jnp.int32))

    return optax.GradientTransformationExtraArgs(init, update)


def dynamic_loss_scaling(inner: optax.GradientTransformation, *,
                         initial_scale: float = 2.0**15, period: int = 2000,
                         factor: float = 2.0, min_loss_scale: float = 1.0
                         ) -> optax.GradientTransformationExtraArgs:
    """Wrap ``inner`` for gradients of ``loss * S``: unscale them, skip non-finite steps
    as ``skip_nonfinite`` does, and adjust S (kept in the state) as ``DynamicLossScale``."""
    first = DynamicLossScale.create(initial_scale, period, factor, min_loss_scale)
    inner = optax.with_extra_args_support(inner)

    def init(params):
        # Distinct arrays per field: a donated state must not hold one buffer twice.
        return LossScaleState(first, inner.init(params), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

    def update(grads, state, params=None, **extra_args):
        grads = state.loss_scale.unscale(grads)
        updates, new_inner, ok = _guarded_update(inner, grads, state.inner_state, params, extra_args)
        skipped = jnp.where(ok, 0, 1).astype(jnp.int32)
        return updates, LossScaleState(
            state.loss_scale.adjust(ok), new_inner, state.skipped_steps + skipped,
            jnp.where(ok, 0, state.consecutive_skips + 1).astype(jnp.int32))

    return optax.GradientTransformationExtraArgs(init, update)


def loss_scale_of(opt_state) -> jax.Array:
    """The current loss scale inside ``opt_state`` (1.0 when there is none). Finds the
    first ``LossScaleState`` in the state tree, so it works under optax.chain and inside
    ``nnx.Optimizer`` (whose state leaves are variables; they are unwrapped here)."""
    found = []

    def visit(x):
        if isinstance(x, LossScaleState):
            value = x.loss_scale.loss_scale
            found.append(value.get_value() if hasattr(value, "get_value") else value)
        return x

    jax.tree.map(visit, opt_state, is_leaf=lambda x: isinstance(x, LossScaleState))
    return found[0] if found else jnp.asarray(1.0, jnp.float32)


def loss_scale_metrics(opt_state) -> dict[str, jax.Array]:
    """``{"loss_scale", "skipped_steps"}`` for the train step's metrics: from the first
    ``LossScaleState`` or ``SkipNonFiniteState`` in ``opt_state`` (1.0 and 0 without one)."""
    kinds = (LossScaleState, SkipNonFiniteState)
    found = []

    def visit(x):
        if isinstance(x, kinds):
            found.append(x)
        return x

    jax.tree.map(visit, opt_state, is_leaf=lambda x: isinstance(x, kinds))
    unwrap = lambda v: v.get_value() if hasattr(v, "get_value") else v
    skipped = unwrap(found[0].skipped_steps) if found else jnp.asarray(0, jnp.int32)
    return {"loss_scale": loss_scale_of(opt_state), "skipped_steps": skipped}
