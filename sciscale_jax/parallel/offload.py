"""Host offload of optimizer state and float32 master parameters (ZeRO-Offload placement).

Ren et al. 2021, "ZeRO-Offload: Democratizing Billion-Scale Model Training": the optimizer
state and the float32 master copy of the parameters live in host memory; the device keeps
only what the forward and backward passes need. Here the offloaded trees are placed in
``pinned_host`` memory between steps (each leaf keeps its sharding, only its memory kind
changes). Inside the jitted step they are brought to device memory for the update and put
back afterwards, or, with ``on_host=True``, the gradients go to the host and the optimizer
update itself runs there under ``compute_on("device_host")``, as ZeRO-Offload runs Adam on
the CPU.

On CPU the host and device memories are the same RAM, so offload is compiled to copies and
saves nothing; the placement (memory kinds of the compiled step's shardings) is what a CPU
test can check, while the bytes saved show in ``device.memory_stats()`` on GPU/TPU. On an
H200 (``benchmarks/offload_memory.py``, README) offloading AdamW state and fp32 master
parameters lowered a 134M-parameter step's peak by about their size and trained bit-identically
under deterministic GPU ops; ``on_host=True`` did not compile there (jax 0.11.2: XLA fails in
layout assignment of the host call), so on GPU the update runs on the device.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.experimental.compute_on import compute_on

HOST_MEMORY = "pinned_host"
DEVICE_MEMORY = "device"
OFFLOAD_TARGETS = ("opt_state", "params")


def parse_offload(offload: str | Iterable[str]) -> frozenset[str]:
    """``"opt_state"``, ``"params"``, ``"opt_state,params"`` (or a sequence) -> set of targets."""
    items = offload.split(",") if isinstance(offload, str) else list(offload)
    targets = frozenset(t.strip() for t in items if t.strip())
    bad = sorted(targets - set(OFFLOAD_TARGETS))
    if bad or not targets:
        raise ValueError(f"offload={offload!r}: expected one or more of {', '.join(OFFLOAD_TARGETS)}"
                         + (f"; unknown {bad}" if bad else ""))
    return targets


def check_host_memory(devices: Sequence[Any] | None = None) -> str:
    """Return ``"pinned_host"`` if every device can address it, else raise a ValueError."""
    devices = jax.devices() if devices is None else devices
    for d in devices:
        kinds = sorted(m.kind for m in d.addressable_memories())
        if HOST_MEMORY not in kinds:
            raise ValueError(f"host offload needs memory kind {HOST_MEMORY!r}, but device {d} "
                             f"(platform {d.platform!r}) offers only {kinds}")
    return HOST_MEMORY


def _mesh_of(tree):
    for leaf in jax.tree.leaves(tree):
        if isinstance(getattr(leaf, "sharding", None), jax.sharding.NamedSharding):
            return leaf.sharding.mesh
    return None


def memory_shardings(tree, kind: str, mesh=None):
    """Each leaf's sharding with memory kind ``kind``; unsharded leaves (e.g. a step count
    made by ``tx.init``) are replicated over ``mesh`` (default: the mesh the tree uses)."""
    mesh = _mesh_of(tree) if mesh is None else mesh

    def one(leaf):
        s = getattr(leaf, "sharding", None)
        if mesh is not None and not isinstance(s, jax.sharding.NamedSharding):
            s = jax.sharding.NamedSharding(mesh, jax.P())
        elif s is None:
            s = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return s.with_memory_kind(kind)

    return jax.tree.map(one, tree)


def place(tree, kind: str, mesh=None):
    """Outside jit: move every leaf to memory ``kind`` ("pinned_host" or "device"). Abstract
    leaves (``jax.ShapeDtypeStruct``s, e.g. a restore target) come back abstract, in that memory."""
    if kind == HOST_MEMORY:
        check_host_memory()
    shardings = memory_shardings(tree, kind, mesh)
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree)):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
    return jax.device_put(tree, shardings)


def to_device(tree):
    """Inside jit: bring a tree to device memory, keeping each leaf's sharding."""
    return jax.device_put(tree, jax.memory.Space.Device)


def to_host(tree):
    """Inside jit: move a tree to host memory, keeping each leaf's sharding."""
    return jax.device_put(tree, jax.memory.Space.Host)


def after_backward(grads, *host_trees):
    """Tie host-resident trees to the gradients so their transfers to the device wait for the
    backward pass. Without the tie XLA may prefetch them at the start of the step, and then
    the optimizer state is live on the device through forward and backward and offload
    saves nothing at the step's peak (seen on an H200: ``benchmarks/offload_memory.py``)."""
    return jax.lax.optimization_barrier((grads, *host_trees))


def run_on_host(fn: Callable, *args):
    """Inside jit: ``fn(*args)`` computed on the host CPU, its outputs left in host memory.

    jax <= 0.10 spells this ``compute_on("device_host")`` as a context or decorator; later
    versions take the function and the outputs' memory spaces (``compute_on(fn,
    compute_type=..., out_memory_spaces=...)``). Both are accepted here.
    """
    if "out_memory_spaces" in inspect.signature(compute_on).parameters:
        spaces = jax.tree.map(lambda _: jax.memory.Space.Host, jax.eval_shape(fn, *args))
        return compute_on(fn, compute_type="device_host", out_memory_spaces=spaces)(*args)
    return compute_on("device_host")(jax.jit(fn))(*args)


def make_offloaded_step(loss_fn: Callable, tx: optax.GradientTransformation, params, *,
                        offload: str | Iterable[str] = "opt_state", on_host: bool = False,
                        compute_dtype: Any = None, donate: bool = True):
    """Place params and optimizer state, and build a jitted train step that keeps them there.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar loss``.
      tx: the optax optimizer.
      params: initial (master) parameters, already sharded as wanted.
      offload: which trees live in ``pinned_host`` between steps: "opt_state", "params"
        (the master copy) or both.
      on_host: run ``tx.update`` and ``apply_updates`` on the host (``compute_on``).
      compute_dtype: dtype of the device copy used for forward and backward (e.g. bfloat16
        with float32 master params); None keeps the master dtype.

    Returns:
      ``(params, opt_state, step)`` with ``step(params, opt_state, batch) -> (params,
      opt_state, loss)``; the outputs keep the memory kinds of the inputs.
    """
    targets = parse_offload(offload)
    check_host_memory()
    mesh = _mesh_of(params)
    kind = {t: HOST_MEMORY if t in targets else DEVICE_MEMORY for t in OFFLOAD_TARGETS}
    params = place(params, kind["params"], mesh)
    opt_state = place(jax.jit(tx.init)(params), kind["opt_state"], mesh)
    out_shardings = (memory_shardings(params, kind["params"], mesh),
                     memory_shardings(opt_state, kind["opt_state"], mesh), None)

    def update(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def step(params, opt_state, batch):
        p_dev = to_device(params) if "params" in targets else params
        p_compute = p_dev if compute_dtype is None else jax.tree.map(
            lambda p: p.astype(compute_dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, p_dev)
        loss, grads = jax.value_and_grad(loss_fn)(p_compute, batch)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        if on_host:
            host_args = to_host((grads, opt_state, params))
            new_params, opt_state = run_on_host(update, *host_args)
        else:
            grads, opt_state, params = after_backward(grads, opt_state, params)
            s_dev = to_device(opt_state) if "opt_state" in targets else opt_state
            if "params" in targets and compute_dtype is not None:
                p_dev = to_device(params)  # the master copy again; its first transfer died at the cast
            new_params, opt_state = update(grads, s_dev, p_dev)
        new_params = (to_host if "params" in targets else to_device)(new_params)
        opt_state = (to_host if "opt_state" in targets else to_device)(opt_state)
        return new_params, opt_state, loss

    step = jax.jit(step, out_shardings=out_shardings, donate_argnums=(0, 1) if donate else ())
    return params, opt_state, step
