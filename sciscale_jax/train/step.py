"""The train step: loss, gradients, optax update and metrics as one pure, jittable function.

State is a plain pytree (``TrainState``: step, parameters, other model variables and the
optimizer state, all pure dicts) so it jits, shards and checkpoints without special cases.
The step is built from small parts that the techniques replace:

- ``loss_fn(model, batch, key) -> (sum of per-token losses, token count)``: token sums, so
  gradient accumulation can weight microbatches by their real token counts;
- ``grad_fn(params, rest, batch, key) -> (loss, (count, new_rest), grads)``: how gradients
  are computed (plain backprop here; accumulation and loss scaling wrap it);
- ``tx``: any optax ``GradientTransformation``.

With ``trainable`` (a predicate on a parameter's key path; LoRA's ``models.stack.is_lora``) only
those parameters train: the others are passed to the loss as constants with the model's other
variables, so they get no gradient, and the optimizer (``trainable_only``) holds state for the
trainable ones alone.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sciscale_jax.accumulate import accumulate_gradients
from sciscale_jax.pure import combine, like, partition
from sciscale_jax.parallel import offload as host
from sciscale_jax.precision import loss_scale_metrics, loss_scale_of


class TrainState(NamedTuple):
    step: jax.Array        # int32 scalar
    params: Any            # pure dict of nnx.Param values
    rest: Any              # pure dict of every other model variable (may be empty)
    opt_state: Any


def split_model(model: nnx.Module):
    """(graphdef, params, rest) with params and rest as pure dicts."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation):
    """(graphdef, TrainState) for a freshly built model."""
    graphdef, params, rest = split_model(model)
    opt_state = tx.init(params)
    # The step donates the state, and XLA refuses a buffer donated twice: give any leaves an
    # optimizer's init shares (one zeros array in two fields, say) buffers of their own.
    seen = set()

    def own(x):
        if isinstance(x, jax.Array) and id(x) in seen:
            return jnp.array(x, copy=True)
        seen.add(id(x))
        return x

    opt_state = jax.tree.map(own, opt_state)
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, rest, opt_state)


def abstract_train_state(params, rest, tx: optax.GradientTransformation) -> TrainState:
    """The ``TrainState`` :func:`init_train_state` would build, as ``jax.ShapeDtypeStruct``s, from
    abstract ``params`` and ``rest`` (a model built by ``nnx.eval_shape``, split)."""
    return TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, rest, jax.eval_shape(tx.init, params))


def with_shardings(abstract, shardings):
    """``jax.ShapeDtypeStruct``s of the tree ``abstract`` carrying ``shardings`` (a tree like it, or
    one sharding for every leaf): a restore target."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, abstract)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def trainable_only(tx: optax.GradientTransformation, trainable: Callable) -> optax.GradientTransformationExtraArgs:
    """``tx`` over the parameters ``trainable`` accepts: ``init`` takes the whole parameter dict and
    keeps state for those alone; ``update`` takes their gradients and values (the train step's
    ``pure.partition``) and returns their updates. Not an optax transform for general use (its
    updates cover only part of the tree): with optax alone, ``optax.multi_transform`` with
    ``optax.set_to_zero()`` for the frozen part does the same, computing their gradients."""
    tx = optax.with_extra_args_support(tx)

    def init(params):
        return tx.init(partition(params, trainable)[0] if isinstance(params, dict) else params)

    return optax.GradientTransformationExtraArgs(init, tx.update)


def backprop_grad_fn(graphdef, loss_fn: Callable) -> Callable:
    """Plain reverse-mode gradients of the token-mean loss, times ``loss_scale`` (fp16)."""

    def objective(params, rest, batch, key, scale):
        model = nnx.merge(graphdef, params, rest)
        total, count = loss_fn(model, batch, key)
        new_rest = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2])
        loss = total / jnp.maximum(count, 1.0)
        return loss * scale, (loss, count, new_rest)

    def grad_fn(params, rest, batch, key, loss_scale=1.0):
        scale = jnp.asarray(loss_scale, jnp.float32)
        (_, (loss, count, new_rest)), grads = jax.value_and_grad(objective, has_aux=True)(
            params, rest, batch, key, scale)
        return loss, (count, new_rest), grads

    return grad_fn


def accumulating_grad_fn(graphdef, loss_fn: Callable, num_microbatches: int, accum_dtype=jnp.float32) -> Callable:
    """Gradients accumulated over ``num_microbatches`` by ``sciscale_jax.accumulate`` (one lax.scan).

    Each microbatch contributes its sum of token losses, and the total is divided by the total
    token count at the end: exactly the full-batch token mean, however unevenly the real
    tokens fall. Microbatch ``i`` draws dropout from ``fold_in(key, i)``.
    """

    def grad_fn(params, rest, batch, key, loss_scale=1.0):
        size = jax.tree.leaves(batch)[0].shape[0]
        tagged = {"batch": batch, "micro_id": jnp.arange(size) % num_microbatches}

        def summed(p, mb):
            model = nnx.merge(graphdef, p, rest)
            total, count = loss_fn(model, mb["batch"], jax.random.fold_in(key, mb["micro_id"][0]))
            return total * loss_scale, count

        (mean_total, counts), grads = accumulate_gradients(summed, params, tagged, num_microbatches,
                                                           has_aux=True, accum_dtype=accum_dtype)
        count = jnp.sum(counts)
        scale = num_microbatches / jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grads, params)
        return mean_total * scale / loss_scale, (count, rest), grads

    return grad_fn


def reduce_scatter_grad_fn(graphdef, loss_fn: Callable, grad_shardings) -> Callable:
    """ZeRO-2 gradients by hand: a ``grad_fn`` whose gradients leave ``jax.lax.psum_scatter``.

    Each device of the data-parallel mesh of ``grad_shardings`` (mesh axes other than
    ``data``/``fsdp`` must have size 1) runs the loss on its slice of the batch (dim 0 of every
    batch array) with a full copy of the parameters; each gradient is then summed and split in
    one reduce-scatter along the dim its sharding names (a ``psum`` for the few leaves that
    stay replicated). The loss is the token mean over the whole batch: local
    token sums over the global token count. Device ``i`` draws dropout from ``fold_in(key, i)``
    (its own masks, not the slice of one batch-wide draw). The model's non-parameter variables
    are passed through unchanged (the path is for models whose forward pass does not update them).
    """
    from sciscale_jax.parallel.mesh import DATA_AXES

    shardings = jax.tree.leaves(grad_shardings)
    mesh = shardings[0].mesh
    others = {a: n for a, n in mesh.shape.items() if a not in DATA_AXES and n > 1}
    if others:
        raise ValueError(f"the psum_scatter ZeRO-2 path shards over {DATA_AXES} only; mesh also has {others}")
    axes = tuple(a for a in DATA_AXES if mesh.shape.get(a, 1) > 1)
    grad_specs = jax.tree.map(lambda sh: sh.spec, grad_shardings)
    P = jax.sharding.PartitionSpec

    def scatter(g, spec):
        done = ()
        for dim, entry in enumerate(tuple(spec)):
            names = tuple(a for a in ((entry,) if isinstance(entry, str) else (entry or ())) if a in axes)
            if names:
                g = jax.lax.psum_scatter(g, names, scatter_dimension=dim, tiled=True)
                done += names
        left = tuple(a for a in axes if a not in done)
        return jax.lax.psum(g, left) if left else g

    def grad_fn(params, rest, batch, key, loss_scale=1.0):
        def local(params, rest, batch, key, scale):
            params = jax.lax.pcast(params, axes, to="varying")
            key = jax.random.fold_in(key, jax.lax.axis_index(axes))  # own dropout masks per device

            def summed(p):
                total, count = loss_fn(nnx.merge(graphdef, p, rest), batch, key)
                return total * scale, (total, count)

            (_, (total, count)), grads = jax.value_and_grad(summed, has_aux=True)(params)
            count = jax.lax.psum(count, axes)
            norm = 1.0 / jnp.maximum(count, 1.0)
            grads = jax.tree.map(lambda g, spec: (scatter(g, spec) * norm).astype(g.dtype), grads, grad_specs)
            return jax.lax.psum(total, axes) * norm, count, grads

        batch_specs = jax.tree.map(lambda _: P(axes), batch)
        replicated = lambda tree: jax.tree.map(lambda _: P(), tree)  # noqa: E731
        loss, count, grads = jax.shard_map(
            local, mesh=mesh, in_specs=(replicated(params), replicated(rest), batch_specs, P(), P()),
            out_specs=(P(), P(), grad_specs))(params, rest, batch, key, jnp.asarray(loss_scale, jnp.float32))
        return loss, (count, rest), grads

    return grad_fn


def make_train_step(graphdef, tx: optax.GradientTransformation, *, loss_fn: Callable,
                    grad_fn: Callable | None = None, seed: int = 0, loss_scaling: bool = False,
                    offload: frozenset = frozenset(), grad_shardings=None,
                    reduce_scatter: bool = False, trainable: Callable | None = None) -> Callable:
    """``step(state, batch) -> (state, metrics)``, not yet jitted (callers choose shardings).

    With ``loss_scaling`` the optimizer is a ``precision.dynamic_loss_scaling`` wrapper: the
    loss is multiplied by its current scale before differentiating, the wrapper unscales the
    gradients and skips non-finite steps, and the metrics report the scale and skipped steps.

    ``offload`` names the trees ("opt_state", "params") that live in pinned host memory between
    steps (ZeRO-Offload placement, ``sciscale_jax.parallel.offload``): the step brings them to
    the device for its work and puts the new values back; jit it with output shardings that
    carry the host memory kind.

    ``grad_shardings`` (``Placement.grads``): the gradients are constrained to these shardings
    before the optimizer sees them (ZeRO-2/3 keep 1/N of each gradient per device). With
    ``reduce_scatter`` (``Placement.reduce_scatter``: ZeRO-2 on a data-parallel mesh) and no
    custom ``grad_fn``, they are computed by :func:`reduce_scatter_grad_fn`, so the compiled
    step reduce-scatters them on every backend.

    The dropout key of step ``s`` is ``fold_in(key(seed), s)``: a pure function of the step,
    so a resumed run draws the same dropout masks as an uninterrupted one.

    ``trainable`` (a predicate on key paths, e.g. LoRA's ``models.stack.is_lora``): only those
    parameters are differentiated and updated, the others enter the loss beside ``rest`` and leave
    the step as they came; ``tx`` must then be ``trainable_only(..., trainable)`` (inside any loss
    scaling wrapper) and ``grad_shardings`` may cover every parameter.
    """
    if trainable is not None and grad_shardings is not None:
        grad_shardings = partition(grad_shardings, trainable)[0]
    if reduce_scatter and grad_fn is None:
        if grad_shardings is None:
            raise ValueError("reduce_scatter=True needs grad_shardings (Placement.grads)")
        grad_fn = reduce_scatter_grad_fn(graphdef, loss_fn, grad_shardings)
    grad_fn = grad_fn or backprop_grad_fn(graphdef, loss_fn)
    base_key = jax.random.key(seed)

    def step(state: TrainState, batch):
        key = jax.random.fold_in(base_key, state.step)
        params = host.to_device(state.params) if "params" in offload else state.params
        opt_state, scale = state.opt_state, jnp.float32(1.0)
        if loss_scaling:
            scale = loss_scale_of(opt_state)
            scale = host.to_device(scale) if "opt_state" in offload else scale
        frozen, rest = {}, state.rest
        if trainable is not None:  # the frozen parameters ride along with the other variables
            params, frozen = partition(params, trainable)
            rest = combine(frozen, state.rest)
        loss, (count, rest), grads = grad_fn(params, rest, batch, key, loss_scale=scale)
        if trainable is not None:  # what comes back of rest: the model's other variables only
            rest = like(state.rest, rest)
        if grad_shardings is not None:
            grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
        if "opt_state" in offload:  # brought in after the backward pass, not prefetched before it
            grads, opt_state = host.after_backward(grads, opt_state)
            opt_state = host.to_device(opt_state)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if trainable is not None:
            params = combine(params, frozen)
        metrics = {"loss": loss, "tokens": count, "grad_norm": optax.tree.norm(grads) / scale}
        if loss_scaling:
            metrics.update(loss_scale_metrics(opt_state))
        params = host.to_host(params) if "params" in offload else params
        opt_state = host.to_host(opt_state) if "opt_state" in offload else opt_state
        return TrainState(state.step + 1, params, rest, opt_state), metrics

    return step


def make_zeroth_order_step(graphdef, tx, *, loss_fn: Callable, seed: int = 0,
                           on_evaluation: Callable[[], None] | None = None,
                           trainable: Callable | None = None) -> Callable:
    """The step for zeroth-order optimizers (MeZO, ZO-AdaMU, DeepZero): only forward passes.

    ``tx.update(None, opt_state, params, value_fn=loss)`` evaluates the loss at perturbed
    parameters; no gradient and no activation for a backward pass is ever stored, so with the
    state donated the step's peak memory stays near a forward evaluation. The reported loss is
    one more forward pass at the parameters before the update.

    A transform with an ``apply(params, opt_state, value_fn)`` (``optim.mezo``) perturbs and
    updates the donated parameters in place instead (no update or perturbed copy is held) and
    returns that loss itself.

    ``on_evaluation()``, if given, is called on the host after every loss evaluation (through
    ``jax.debug.callback``), so a caller can show progress inside a long step.

    ``trainable``: as in :func:`make_train_step`, only those parameters are perturbed and updated.
    """
    base_key = jax.random.key(seed)
    in_place = getattr(tx, "apply", None)

    def step(state: TrainState, batch):
        key = jax.random.fold_in(base_key, state.step)
        params, frozen, rest = state.params, {}, state.rest
        if trainable is not None:
            params, frozen = partition(state.params, trainable)
            rest = combine(frozen, state.rest)
        whole = (lambda p: p) if trainable is None else (lambda p: combine(p, frozen))  # noqa: E731

        def value_fn(params):
            total, count = loss_fn(nnx.merge(graphdef, params, rest), batch, key)
            loss = total / jnp.maximum(count, 1.0)
            if on_evaluation is not None:
                jax.debug.callback(lambda _: on_evaluation(), loss)
            return loss

        count = jnp.sum(batch["weights"]) if "weights" in batch else jnp.float32(0)
        if in_place is not None:   # it also returns the loss at the parameters before the update
            params, opt_state, loss, proj = in_place(params, state.opt_state, value_fn)
            metrics = {"loss": loss, "tokens": count, "projected_grad": jnp.mean(proj)}
            return TrainState(state.step + 1, whole(params), state.rest, opt_state), metrics
        loss = value_fn(params)
        updates, opt_state = tx.update(None, state.opt_state, params, value_fn=value_fn)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "tokens": count, "update_norm": optax.tree.norm(updates)}
        return TrainState(state.step + 1, whole(params), state.rest, opt_state), metrics

    return step


def make_eval_step(graphdef, loss_fn: Callable) -> Callable:
    """``eval_step(params, rest, batch) -> loss_fn(model, batch, None)`` (no dropout key): a
    ``(sum, count)`` pair, or a recipe's ``{name: (sum, count)}`` metrics."""

    def eval_step(params, rest, batch):
        return loss_fn(nnx.merge(graphdef, params, rest), batch, None)

    return eval_step
