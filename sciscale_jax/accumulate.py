"""Gradient accumulation over microbatches inside one jitted step.

The batch is split into ``num_microbatches`` microbatches that a ``lax.scan`` runs one
after another, adding each gradient into a single accumulator (float32 by default), so
activation memory is that of one microbatch and only one gradient-sized buffer exists.
Unlike ``optax.MultiSteps``, which keeps the running sum in the optimizer state between
``k`` calls of the step, nothing outlives the step: the optimizer sees one full gradient.

Token-averaged losses (mean over the real, unpadded tokens) need care: when microbatches
hold different numbers of real tokens, the mean of microbatch means is not the full-batch
mean. With ``weight_fn`` giving each microbatch's token count ``n_i``, the result is

    loss = sum_i n_i * loss_i / sum_i n_i,     grad = sum_i n_i * grad_i / sum_i n_i,

which equals the loss and gradient of the whole batch taken at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def split_microbatches(batch, num_microbatches: int):
    """Reshape every leaf [B, ...] to [num_microbatches, B // num_microbatches, ...].

    Microbatch i takes examples i, i + n, i + 2n, ... (strided), so that when the batch axis
    is sharded over devices each microbatch draws evenly from every device's shard.
    """
    leaves = jax.tree.leaves(batch)
    if not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(f"num_microbatches must be a positive integer, got {num_microbatches!r}")
    if not leaves:
        raise ValueError("the batch has no arrays to split into microbatches")
    sizes = {tuple(jnp.shape(x))[:1] for x in leaves}
    if len(sizes) != 1 or sizes == {()}:
        raise ValueError(f"every batch leaf needs the same leading batch size; got leading dims {sorted(sizes)}")
    (size,), = sizes
    if size % num_microbatches:
        raise ValueError(f"grad accumulation num_microbatches={num_microbatches} does not divide "
                         f"the batch size {size}")
    n = num_microbatches
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape((size // n, n) + x.shape[1:]), 0, 1), batch)


def accumulate_gradients(loss_fn: Callable, params, batch, num_microbatches: int, *,
                         weight_fn: Callable | None = None, has_aux: bool = False,
                         accum_dtype: Any = jnp.float32):
    """Loss and gradient of ``loss_fn(params, batch)`` computed microbatch by microbatch.

    Args:
      loss_fn: ``loss_fn(params, microbatch) -> loss`` (or ``(loss, aux)`` with ``has_aux``),
        the mean loss over the microbatch's real tokens.
      params: the pytree to differentiate with respect to.
      batch: a pytree of arrays with a common leading batch axis.
      num_microbatches: how many microbatches; must divide the batch size. 1 is plain grad.
      weight_fn: ``weight_fn(microbatch) -> scalar`` real-token count of a microbatch, used to
        weight its loss and gradient; None weighs microbatches equally (right for losses
        averaged over equally many examples per microbatch).
      has_aux: ``loss_fn`` returns ``(loss, aux)``; aux comes back stacked per microbatch.
      accum_dtype: dtype of the loss and gradient accumulators (float32 by default).

    Returns:
      ``(loss, grads)`` or ``((loss, aux), grads)``; grads have the structure of params in
      ``accum_dtype``.
    """
    micro = split_microbatches(batch, num_microbatches)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)

    def step(carry, mb):
        loss_sum, grad_sum, weight_sum = carry
        out, grads = grad_fn(params, mb)
        loss, aux = out if has_aux else (out, None)
        w = jnp.asarray(1.0 if weight_fn is None else weight_fn(mb), accum_dtype)
        # A microbatch with no real token (w == 0) may have a 0/0 loss: it adds nothing.
        add = lambda a, v: a + jnp.where(w > 0, w * v.astype(accum_dtype), 0)
        return (add(loss_sum, loss), jax.tree.map(add, grad_sum, grads), weight_sum + w), aux

    zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), accum_dtype), params)
    init = (jnp.zeros((), accum_dtype), zeros, jnp.zeros((), accum_dtype))
    (loss_sum, grad_sum, weight_sum), aux = jax.lax.scan(step, init, micro)
    # All-padding batch: every weight is zero, so the sums are zero; return zeros, not NaN.
    inv = jnp.where(weight_sum > 0, 1.0 / jnp.where(weight_sum > 0, weight_sum, 1.0), 0.0)
    loss = loss_sum * inv
    grads = jax.tree.map(lambda g: g * inv, grad_sum)
    return ((loss, aux), grads) if has_aux else (loss, grads)


def accumulated_value_and_grad(loss_fn: Callable, num_microbatches: int, **kwargs) -> Callable:
    """``jax.value_and_grad``-like wrapper: ``f(params, batch) -> (loss, grads)`` accumulated."""
    return lambda params, batch: accumulate_gradients(loss_fn, params, batch, num_microbatches, **kwargs)
