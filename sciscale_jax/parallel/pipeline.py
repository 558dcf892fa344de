"""Pipeline parallelism in one SPMD program: any schedule table of ``pipeline_schedule`` (GPipe,
1F1B, interleaved 1F1B, ZB-H1) run inside ``jax.shard_map`` over the ``pipeline`` mesh axis.

The model is ``first -> stage_0 -> ... -> stage_{S-1} -> last``: ``first_fn(first_params,
batch_mb) -> h`` (an embedding; ``h`` an array or a pytree of them) runs on global stage 0,
``stage_fn(stage_params, h, batch_mb) -> h`` on every stage (stage parameters stacked with a
leading axis of S = p x v stages, device d holding stages d, d + p, ...), ``last_fn(last_params,
h, batch_mb) -> scalar`` (head and loss) on stage S - 1; the loss is the sum of ``last_fn`` over microbatches (and data shards).

Executor: ``lax.scan`` over the table's ticks with the table as a constant array, so the stage
is traced once per action kind whatever p and m. Each tick a device (1) files the activation
and cotangent that arrived from its neighbours into the stash slots the table assigned, (2)
runs its entry through ``lax.switch`` (branches: idle and F/B/W for first, middle and last
stages): F applies the stage; B takes ``jax.vjp`` of the stage at its stashed input and applies
it to the received cotangent (input and weight gradients, or only the input gradient when the
backward is split); W applies the vjp for the weight gradient; (3) ``ppermute``s its output one
device forward (device p - 1 to 0 between interleaved chunks) and its input gradient one
back. The stash holds stage inputs, not vjp residuals: a backward recomputes its stage's
forward, so per-device memory is the table's stash slots of activations (flat in m for
1F1B and ZB-H1) plus one stage's residuals.

The shard_map is manual over the pipeline axis and the data axes (``data``, ``fsdp``: the
microbatch rows are split over them); any other mesh axis (``tensor``) stays automatic, so
parameters sharded over it are partitioned by GSPMD inside each stage.

FSDP / ZeRO-3 inside stages (``param_specs``): a parameter may be split over data axes along
one of its dimensions; each device then holds only its shard, and every use (a stage's forward,
its recomputation in the backward, the embedding and the head) ``all_gather``s it over those
axes first. The transpose of that gather is a ``psum_scatter``, so each backward adds its
weight gradient into a shard-sized accumulator. Along the data axes a parameter is not split
over, it is replicated: such parameters (and ``first``/``last`` along the pipeline axis) are
cast device-varying at entry, so differentiating them per microbatch adds no collective, and
their gradients are summed once after the loop, by a ``psum``, or by a ``psum_scatter`` into
the shard ``grad_specs`` asks for (ZeRO-2: replicated parameters, split gradients).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from sciscale_jax.parallel.pipeline_schedule import SCHEDULES, Schedule, make_schedule

# columns of the constant table the executor scans over
_BRANCH, _MB, _CHUNK, _IN, _COT, _RECV_ACT, _RECV_COT = range(7)


def _branches(schedule: Schedule):
    """(kind, first, last) of every branch the table uses; branch 0 is idle."""
    S, p = schedule.total_stages, schedule.num_stages
    combos = sorted({(a.kind, a.chunk * p + d == 0, a.chunk * p + d == S - 1)
                     for row in schedule.table for d, a in enumerate(row) if a is not None})
    return [None] + combos


def _table_array(schedule: Schedule, branches) -> np.ndarray:
    """[ticks, p, 7] int32: branch, microbatch, chunk, input slot, cotangent slot, and the slots
    the arriving activation and cotangent are filed into (the last slot is scratch)."""
    p, S = schedule.num_stages, schedule.total_stages
    act_slot, cot_slot, n_act, n_cot = schedule.stash()
    out = np.zeros((schedule.num_ticks, p, 7), np.int32)
    out[:, :, _IN], out[:, :, _COT], out[:, :, _RECV_ACT], out[:, :, _RECV_COT] = n_act, n_cot, n_act, n_cot
    index = {combo: i for i, combo in enumerate(branches)}
    for t, row in enumerate(schedule.table):
        for d, a in enumerate(row):
            if a is None:
                continue
            s = a.chunk * p + d
            out[t, d, :_IN] = index[(a.kind, s == 0, s == S - 1)], a.mb, a.chunk
            out[t, d, _IN] = act_slot.get((a.mb, s), n_act)
            out[t, d, _COT] = cot_slot.get((a.mb, s), n_cot)
            if t + 1 < schedule.num_ticks and a.kind == "F" and s < S - 1:
                out[t + 1, (d + 1) % p, _RECV_ACT] = act_slot[(a.mb, s + 1)]
            if t + 1 < schedule.num_ticks and a.kind == "B" and s > 0:
                out[t + 1, (d - 1) % p, _RECV_COT] = cot_slot[(a.mb, s - 1)]
    return out


def to_device_layout(stages, p: int, v: int):
    """Leading axis from stage order (stage c * p + d) to device order (entry d * v + c)."""
    return jax.tree.map(lambda x: x.reshape((v, p) + x.shape[1:]).swapaxes(0, 1).reshape(x.shape), stages)


def from_device_layout(stages, p: int, v: int):
    """The inverse of ``to_device_layout``."""
    return jax.tree.map(lambda x: x.reshape((p, v) + x.shape[1:]).swapaxes(0, 1).reshape(x.shape), stages)


def check_pipeline_args(schedule: str, *, num_layers: int | None = None, stages: int, microbatches: int,
                        virtual_stages: int = 1, batch_size: int | None = None, data_size: int = 1) -> None:
    """ValueError (one line, naming the values) before anything compiles."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    if num_layers is not None and num_layers < stages * virtual_stages:
        raise ValueError(f"num_layers={num_layers} is fewer than pipeline stages x virtual stages = "
                         f"{stages} x {virtual_stages} = {stages * virtual_stages}")
    if batch_size is not None:
        if batch_size % microbatches:
            raise ValueError(f"microbatches={microbatches} does not divide the batch size {batch_size}")
        if (batch_size // microbatches) % data_size:
            raise ValueError(f"microbatch size {batch_size // microbatches} (batch {batch_size} / microbatches "
                             f"{microbatches}) is not divisible by the data-parallel size {data_size}")
    make_schedule(schedule, stages, microbatches, virtual_stages)  # schedule-specific checks


def _entries(spec, ndim: int):
    """A PartitionSpec as ``ndim`` tuples of mesh-axis names."""
    out = [(e,) if isinstance(e, str) else tuple(e or ()) for e in tuple(spec)]
    return out + [()] * (ndim - len(out))


def data_spec(spec, ndim: int, axes) -> P:
    """``spec`` (a PartitionSpec or None) restricted to the mesh axes ``axes`` (the manual data axes)."""
    if spec is None:
        return P()
    kept = [tuple(a for a in e if a in axes) for e in _entries(spec, ndim)]
    return P(*[None if not e else (e[0] if len(e) == 1 else e) for e in kept])


def _spec_axes(spec) -> set:
    return {a for e in tuple(spec) for a in ((e,) if isinstance(e, str) else tuple(e or ()))}


def _gather(x, spec):
    """The whole of ``x`` from its shard: ``all_gather`` along every dim ``spec`` splits."""
    for dim, names in enumerate(_entries(spec, x.ndim)):
        if names:
            x = jax.lax.all_gather(x, names if len(names) > 1 else names[0], axis=dim, tiled=True)
    return x


def _reduce(g, pspec, gspec, axes):
    """A gradient accumulated per device -> summed over the manual ``axes`` it is replicated on:
    ``psum_scatter`` along the dims where ``gspec`` adds axes to ``pspec``, ``psum`` over the rest."""
    done = _spec_axes(pspec)
    for dim, (pe, ge) in enumerate(zip(_entries(pspec, g.ndim), _entries(gspec, g.ndim))):
        extra = ge[len(pe):]
        if extra and ge[:len(pe)] == pe:
            g = jax.lax.psum_scatter(g, extra if len(extra) > 1 else extra[0], scatter_dimension=dim, tiled=True)
            done |= set(extra)
    left = tuple(a for a in axes if a not in done)
    return jax.lax.psum(g, left) if left else g


def _out_spec(pspec, gspec, ndim):
    """The spec ``_reduce`` leaves a gradient with: ``gspec`` where it extends ``pspec``, else ``pspec``."""
    out = []
    for pe, ge in zip(_entries(pspec, ndim), _entries(gspec, ndim)):
        e = ge if ge[:len(pe)] == pe else pe
        out.append(None if not e else (e[0] if len(e) == 1 else e))
    return P(*out)


def _vary(tree, axes):
    """Cast every leaf device-varying over those of ``axes`` it does not vary over yet."""
    def cast(x):
        missing = tuple(a for a in axes if a not in jax.typeof(x).manual_axis_type.varying)
        return jax.lax.pcast(x, missing, to="varying") if missing else x
    return jax.tree.map(cast, tree)


def pipeline_value_and_grad(first_fn: Callable, stage_fn: Callable, last_fn: Callable, *, mesh,
                            schedule: str = "1f1b", microbatches: int, virtual_stages: int = 1,
                            axis: str = "pipeline", data_axes=("data", "fsdp"), stage_layout: str = "stage",
                            param_specs=None, grad_specs=None):
    """``fn(params, batch, scale=1.0) -> (loss, grads)`` computed by pipeline schedule ``schedule``.

    ``params = {"first": ..., "stages": ..., "last": ...}``, every leaf of ``"stages"`` with a
    leading axis of p x v stages: in global stage order (``stage_layout="stage"``), or in device
    order (``"device"``: entry d * v + c is chunk c of device d, i.e. stage c * p + d; see
    ``to_device_layout``), which is already laid out for a ``P(axis)`` sharding, so stage
    parameters stored that way are never gathered or moved. ``batch`` is a pytree of arrays with a
    leading batch axis, split into ``microbatches`` equal microbatches: with data axes in the
    mesh microbatch i is rows i, i + m, i + 2m, ... (a batch split in blocks over the data axes
    then splits every microbatch the same way without moving a row), else rows
    ``[i * b, (i + 1) * b)``. Returns the summed loss and the gradients of ``scale`` x that sum
    (``scale`` seeds the backward: a loss scale and 1 / token count), with the structure and
    layout of ``params``.

    ``param_specs`` (FSDP inside stages): ``{"first", "stages", "last"}``, each a PartitionSpec
    per leaf (a pytree prefix of ``params``) over the data axes; a ``"stages"`` spec describes
    one stage's leaf, without the leading stage axis. Each leaf is then held and differentiated
    as its shard and gathered at every use; the gradients come back split the same way.
    ``grad_specs`` (same form, default ``param_specs``) may split gradients further (ZeRO-2).
    Axes other than the data axes in these specs are ignored (GSPMD handles them).
    """
    if stage_layout not in ("stage", "device"):
        raise ValueError(f"stage_layout={stage_layout!r} must be 'stage' or 'device'")
    p = mesh.shape[axis]
    data = tuple(a for a in data_axes if mesh.shape.get(a, 1) > 1)
    n_data = int(np.prod([mesh.shape[a] for a in data])) if data else 1
    check_pipeline_args(schedule, stages=p, microbatches=microbatches, virtual_stages=virtual_stages)
    table = make_schedule(schedule, p, microbatches, virtual_stages)
    branches = _branches(table)
    plan = _table_array(table, branches)
    _, _, n_act, n_cot = table.stash()
    v, m, split = virtual_stages, microbatches, table.split_backward
    manual = (axis,) + data

    def specs_for(params, given, drop_leading):
        """Per-leaf data-axis specs (one stage's shape for stage leaves)."""
        out = {}
        for k in ("first", "stages", "last"):
            tree = params[k]
            prefix = (given or {}).get(k)
            if prefix is None:
                out[k] = jax.tree.map(lambda _: P(), tree)
                continue
            full = jax.tree.broadcast(prefix, tree, is_leaf=lambda x: isinstance(x, P) or x is None)
            ndim = lambda x: x.ndim - (1 if drop_leading and k == "stages" else 0)  # noqa: E731
            out[k] = jax.tree.map(lambda s, x: data_spec(s, ndim(x), data), full, tree,
                                  is_leaf=lambda x: isinstance(x, P) or x is None)
        return out

    def fn(params, batch, scale=1.0):
        stages = params["stages"]
        for leaf in jax.tree.leaves(stages):
            if leaf.shape[:1] != (p * v,):
                raise ValueError(f"stage parameters need a leading axis of stages x virtual stages = {p * v}; "
                                 f"got shape {leaf.shape}")
        for leaf in jax.tree.leaves(batch):
            check_pipeline_args(schedule, stages=p, microbatches=m, virtual_stages=v,
                                batch_size=leaf.shape[0], data_size=n_data)
        pspecs = specs_for(params, param_specs, True)
        gspecs = specs_for(params, grad_specs if grad_specs is not None else param_specs, True)
        ospecs = {k: jax.tree.map(lambda ps, gs, x: _out_spec(ps, gs, x.ndim - (k == "stages")),
                                  pspecs[k], gspecs[k], params[k]) for k in pspecs}
        # -> [p, v, ...]: device d holds its v chunks
        local = stages if stage_layout == "device" else to_device_layout(stages, p, v)
        local = jax.tree.map(lambda x: x.reshape((p, v) + x.shape[1:]), local)
        if data:  # strided: each data shard's block of rows holds its share of every microbatch
            mbs = jax.tree.map(lambda x: x.reshape((x.shape[0] // m, m) + x.shape[1:]).swapaxes(0, 1), batch)
        else:     # contiguous: a reshape, no copy
            mbs = jax.tree.map(lambda x: x.reshape((m, x.shape[0] // m) + x.shape[1:]), batch)
        stage_in = lambda specs: jax.tree.map(lambda s: P(axis, None, *s), specs)  # noqa: E731
        specs = (pspecs["first"], stage_in(pspecs["stages"]), pspecs["last"],
                 jax.tree.map(lambda _: P(None, data or None), mbs), P())
        out_specs = (P(), ospecs["first"], stage_in(ospecs["stages"]), ospecs["last"])
        body = functools.partial(_run, first_fn, stage_fn, last_fn, plan, branches, p, v, n_act, n_cot, split,
                                 axis, data, pspecs, gspecs)
        loss, g_first, g_local, g_last = jax.shard_map(
            body, mesh=mesh, in_specs=specs, out_specs=out_specs, axis_names=set(manual),
        )(params["first"], local, params["last"], mbs, jnp.asarray(scale, jnp.float32))
        g_stages = jax.tree.map(lambda x: x.reshape((p * v,) + x.shape[2:]), g_local)
        g_stages = g_stages if stage_layout == "device" else from_device_layout(g_stages, p, v)
        return loss, {"first": g_first, "stages": g_stages, "last": g_last}

    return fn


def _run(first_fn, stage_fn, last_fn, plan, branches, p, v, n_act, n_cot, split, axis, data, pspecs, gspecs,
         first_p, local, last_p, mbs, scale):
    manual = (axis,) + data
    vary = lambda tree, axes: jax.lax.pcast(tree, axes, to="varying") if axes else tree  # noqa: E731
    gather = lambda tree, specs: jax.tree.map(_gather, tree, specs)  # noqa: E731
    first_p, last_p = _vary(first_p, manual), _vary(last_p, manual)  # differentiated per microbatch
    chunks = _vary(jax.tree.map(lambda x: x[0], local), manual)      # [v, ...] this device's stages
    mbs = vary(mbs, (axis,))
    me = jax.lax.axis_index(axis)
    mb0 = jax.tree.map(lambda x: x[0], mbs)
    # every use of a parameter gathers its shard (a no-op for parameters not split over data axes)
    first_g = lambda fp, b: first_fn(gather(fp, pspecs["first"]), b)  # noqa: E731
    stage_g = lambda w, h, b: stage_fn(gather(w, pspecs["stages"]), h, b)  # noqa: E731
    last_g = lambda lp, h, b: last_fn(gather(lp, pspecs["last"]), h, b)  # noqa: E731
    h_shape = jax.eval_shape(lambda: first_g(first_p, mb0))  # a pytree: the Evoformer carries (msa, pair)
    loss_dtype = jax.eval_shape(lambda: last_g(last_p, first_g(first_p, mb0), mb0)).dtype
    acc_dtype = jnp.promote_types(loss_dtype, jnp.float32)  # the loss sum, at least float32
    zeros_h = lambda: vary(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), h_shape), manual)  # noqa: E731
    zeros_like = lambda tree: jax.tree.map(jnp.zeros_like, tree)  # noqa: E731
    zeros_chunk = jax.tree.map(lambda x: jnp.zeros_like(x[0]), chunks)
    seed_value = _vary(scale.astype(loss_dtype), manual)

    def full(first, last, params, fparams, lparams, h, batch):
        """One stage with the embedding on the first and head + loss on the last."""
        if first:
            h = first_g(fparams, batch)
        h = stage_g(params, h, batch)
        return last_g(lparams, h, batch) if last else h

    def make_branch(combo):
        def idle(params, x_in, cot, batch):
            return zeros_h(), zeros_h(), zeros_chunk, zeros_like(first_p), zeros_like(last_p), jnp.zeros((), acc_dtype)

        if combo is None:
            return idle
        kind, first, last = combo
        f = functools.partial(full, first, last)

        def run(params, x_in, cot, batch):
            none_h, none_c, none_f, none_l = zeros_h(), zeros_chunk, zeros_like(first_p), zeros_like(last_p)
            zero = jnp.zeros((), acc_dtype)
            if kind == "F":
                y = f(params, first_p, last_p, x_in, batch)
                return (none_h, none_h, none_c, none_f, none_l, y.astype(acc_dtype)) if last else \
                    (y, none_h, none_c, none_f, none_l, zero)
            seed = seed_value if last else cot
            wrt_w = kind == "W" or not split
            wrt_x = kind == "B" and not first
            if not (wrt_w or wrt_x):
                return idle(params, x_in, cot, batch)
            _, vjp = jax.vjp(lambda w, fw, lw, x: f(w, fw, lw, x, batch), params, first_p, last_p, x_in)
            dw, dfw, dlw, dx = vjp(seed)
            if not wrt_w:
                dw, dfw, dlw = none_c, none_f, none_l
            return (none_h, dx if wrt_x else none_h, dw, dfw, dlw, zero)

        return run

    def varying(fn):  # every branch returns values varying over all manual axes, as switch needs
        def wrapped(*args):
            missing = lambda x: tuple(a for a in manual if a not in jax.typeof(x).manual_axis_type.varying)  # noqa: E731
            return jax.tree.map(lambda x: vary(x, missing(x)), fn(*args))
        return wrapped

    fns = [varying(make_branch(c)) for c in branches]
    fwd_perm = [(j, (j + 1) % p) for j in range(p)]
    bwd_perm = [(j, (j - 1) % p) for j in range(p)]

    def tick(carry, plan_t):
        act, cot, g_chunks, g_first, g_last, loss, recv_act, recv_cot = carry
        row = plan_t[me]
        act = jax.tree.map(lambda a, r: a.at[row[_RECV_ACT]].set(r), act, recv_act)
        cot = jax.tree.map(lambda c, r: c.at[row[_RECV_COT]].set(r), cot, recv_cot)
        params = jax.tree.map(lambda x: x[row[_CHUNK]], chunks)
        batch = jax.tree.map(lambda x: x[row[_MB]], mbs)
        send_act, send_cot, dw, dfw, dlw, dloss = jax.lax.switch(
            row[_BRANCH], fns, params, jax.tree.map(lambda a: a[row[_IN]], act),
            jax.tree.map(lambda c: c[row[_COT]], cot), batch)
        g_chunks = jax.tree.map(lambda g, d: g.at[row[_CHUNK]].add(d), g_chunks, dw)
        g_first = jax.tree.map(jnp.add, g_first, dfw)
        g_last = jax.tree.map(jnp.add, g_last, dlw)
        recv_act = jax.lax.ppermute(send_act, axis, fwd_perm)
        recv_cot = jax.lax.ppermute(send_cot, axis, bwd_perm)
        return (act, cot, g_chunks, g_first, g_last, loss + dloss, recv_act, recv_cot), None

    stash = lambda n: vary(jax.tree.map(lambda s: jnp.zeros((n + 1,) + s.shape, s.dtype), h_shape), manual)  # noqa: E731
    carry = (stash(n_act), stash(n_cot), zeros_like(chunks), zeros_like(first_p), zeros_like(last_p),
             vary(jnp.zeros((), acc_dtype), manual), zeros_h(), zeros_h())
    carry, _ = jax.lax.scan(tick, carry, jnp.asarray(plan))
    _, _, g_chunks, g_first, g_last, loss, _, _ = carry
    # the one reduction of the step: gradients over the axes their parameters are replicated on
    loss = jax.lax.psum(loss, manual)
    g_first = jax.tree.map(lambda g, ps, gs: _reduce(g, ps, gs, manual), g_first, pspecs["first"], gspecs["first"])
    g_last = jax.tree.map(lambda g, ps, gs: _reduce(g, ps, gs, manual), g_last, pspecs["last"], gspecs["last"])
    g_chunks = jax.tree.map(lambda g, ps, gs: _reduce(g, P(None, *ps), P(None, *gs), data),
                            g_chunks, pspecs["stages"], gspecs["stages"])
    return loss, g_first, jax.tree.map(lambda x: x[None], g_chunks), g_last
