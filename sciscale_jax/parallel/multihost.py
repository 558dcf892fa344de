"""Multi-process training on JAX's multi-controller runtime (``jax.distributed``).

One Python process runs per host (or per GPU); each sees its local devices, and
``jax.distributed.initialize`` joins them into one job whose ``jax.devices()`` lists every
process's devices. This module holds the three pieces a run needs on top of that runtime:

- :func:`initialize`: join the job with an explicit coordinator ``host:port``, process count
  and process id, or with none of them where JAX detects the cluster itself (Slurm, Open MPI,
  TPU pods, Kubernetes via JobSet/indexed Job env); a coordinator that cannot be reached, or a
  count no process matches, fails after ``timeout_s`` with one line instead of hanging. On CPU
  the cross-process collectives are gloo (jax 0.10's default for
  ``jax_cpu_collectives_implementation``, set explicitly here when unset).
- :func:`hybrid_devices`: the device array of a mesh whose data-like axes (data, pipeline,
  fsdp: the ones that communicate least per byte of compute) span processes and whose
  bandwidth-hungry axes (tensor, sequence, DAP ...) stay inside one process, as
  ``mesh_utils.create_hybrid_device_mesh`` lays out ICI x DCN meshes.
- :func:`global_batch`: each process builds only the rows (and columns) of a global batch that
  its devices hold and assembles the global ``jax.Array`` with
  ``jax.make_array_from_process_local_data``. A source with ``batch_rows(step, start, stop)``
  (every shipped recipe's) builds just those rows; otherwise the slice is cut from
  ``batch(step)``. Either way the global batch is the one the single-process run sees,
  whatever the process count. :func:`place_batch` places a batch every process holds whole
  (the fixed evaluation batches) the same way.
"""

from __future__ import annotations

import math
import os
import re
import socket
import sys
import threading

import jax
import numpy as np
from jax.experimental import mesh_utils

DCN_AXES = ("data", "pipeline", "fsdp")  # mesh axes that may span processes, most preferred first
JOIN_MARGIN_S = 10  # the runtime's own join deadline runs this much past ours


class DistributedError(RuntimeError):
    """Joining the ``jax.distributed`` job failed; the message is one line."""


def is_primary() -> bool:
    """True on the process that writes logs, metrics and run files (process 0)."""
    return jax.process_index() == 0


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, timeout_s: int = 300, local_device_ids=None) -> None:
    """Join the ``jax.distributed`` job; must run before anything touches a JAX device.

    Give all of ``coordinator`` ("host:port", served by process 0), ``num_processes`` and
    ``process_id``, or none of them to let JAX detect the cluster. ``timeout_s`` bounds the
    wait for every process to connect: past it the process prints one line on stderr (whether
    the coordinator answered) and exits with status 1, where the runtime would abort it.
    ValueError for bad arguments; :class:`DistributedError` (one line) when the runtime
    refuses the job or the process count differs from ``num_processes``.
    """
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    unset = [k for k, v in given.items() if v is None]
    if unset and len(unset) < 3:
        raise ValueError(f"give all of --coordinator, --num-processes and --process-id or none of them "
                         f"(none: detect the cluster); missing {', '.join(unset)}")
    if coordinator is not None and not re.fullmatch(r"\[?[\w.:-]+\]?:\d{1,5}", coordinator):
        raise ValueError(f"coordinator={coordinator!r} must be host:port (e.g. 10.0.0.1:1234)")
    if num_processes is not None:
        if not isinstance(num_processes, int) or not isinstance(process_id, int) or num_processes < 1 \
                or not 0 <= process_id < num_processes:
            raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    if not isinstance(timeout_s, int) or timeout_s < 1:
        raise ValueError(f"timeout_s={timeout_s!r} must be a positive integer (seconds)")
    if jax.distributed.is_initialized():
        if num_processes is not None and (jax.process_count(), jax.process_index()) != (num_processes, process_id):
            raise ValueError(f"jax.distributed is already initialized as process {jax.process_index()} of "
                             f"{jax.process_count()}, not {process_id} of {num_processes}")
        return
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = f"coordinator {coordinator} as process {process_id} of {num_processes}" if coordinator else \
        "the job detected from the environment"
    # The runtime aborts the process (a C++ fatal error) when joining times out; a watchdog that
    # fires just before says why in one line and exits with status 1 instead.
    watchdog = threading.Timer(timeout_s, _join_timed_out, (where, coordinator, num_processes, timeout_s))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id, local_device_ids=local_device_ids,
                                   initialization_timeout=timeout_s + JOIN_MARGIN_S)
        count = jax.process_count()  # the devices of every process are known once this returns
    except Exception as err:
        detail = " ".join(str(err).split())[:300]
        raise DistributedError(f"could not join the jax.distributed job ({where}): {type(err).__name__}: "
                               f"{detail}") from None
    finally:
        watchdog.cancel()
    if num_processes is not None and count != num_processes:
        raise DistributedError(f"--num-processes {num_processes} but the job has {count} processes: give every "
                               "process the same --num-processes")


def _join_timed_out(where: str, coordinator: str | None, num_processes: int | None, timeout_s: int) -> None:
    reason = "not every process joined"
    if coordinator is not None:
        host, _, port = coordinator.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
            reason = (f"the coordinator answers but not all {num_processes} processes joined (one is missing, "
                      "or the processes were given different --num-processes)")
        except OSError:
            reason = f"nothing answers at {coordinator} (is process 0 running there, and the port open?)"
    sys.stderr.write(f"sciscale: could not join the jax.distributed job ({where}) within {timeout_s} s: "
                     f"{reason}\n")
    sys.stderr.flush()
    os._exit(1)


def shutdown() -> None:
    """Leave the job (every process calls it at the end; a no-op if not initialized)."""
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


def process_split(sizes: dict[str, int], num_processes: int) -> dict[str, int]:
    """How many processes each mesh axis spans: only ``DCN_AXES``, greedily in that order.

    ValueError if the data-like axes cannot absorb ``num_processes`` (then a tensor or sequence
    axis would have to cross processes).
    """
    remaining, split = num_processes, {name: 1 for name in sizes}
    for name in DCN_AXES:
        if name in sizes:
            split[name] = math.gcd(sizes[name], remaining)
            remaining //= split[name]
    if remaining != 1:
        desc = ",".join(f"{k}={v}" for k, v in sizes.items() if v != 1) or "all axes 1"
        raise ValueError(f"mesh {desc} cannot span {num_processes} processes: only the axes {DCN_AXES} may cross "
                         f"processes, and their sizes {[sizes.get(a, 1) for a in DCN_AXES]} leave a factor "
                         f"{remaining} over; make data (or fsdp, pipeline) a multiple of the process count")
    return split


def hybrid_devices(sizes: dict[str, int], devices=None) -> np.ndarray:
    """Devices shaped ``tuple(sizes.values())``: data-like axes across processes, the rest within one.

    ``sizes`` maps mesh axis names (outermost first) to sizes whose product is the number of
    ``devices`` (default: all devices of all processes); every process must hold the same
    number of them.
    """
    devices = list(jax.devices() if devices is None else devices)
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh {sizes} has {math.prod(sizes.values())} devices but the job has {len(devices)}; "
                         "a multi-process mesh runs on every device of every process")
    per_process: dict[int, int] = {}
    for d in devices:
        per_process[d.process_index] = per_process.get(d.process_index, 0) + 1
    if len(set(per_process.values())) != 1:
        raise ValueError(f"processes hold different device counts {per_process}; give each the same number")
    split = process_split(sizes, len(per_process))
    inner = [sizes[name] // split[name] for name in sizes]
    outer = [split[name] for name in sizes]
    return mesh_utils.create_hybrid_device_mesh(inner, outer, devices, process_is_granule=True)


def local_index(sharding, shape) -> tuple[slice, ...]:
    """The slice of a global array of ``shape`` that this process's devices hold (one box)."""
    boxes = sharding.addressable_devices_indices_map(tuple(shape)).values()
    out = []
    for dim, size in enumerate(shape):
        spans = [box[dim].indices(size)[:2] for box in boxes]
        out.append(slice(min(s for s, _ in spans), max(e for _, e in spans)))
    return tuple(out)


def global_batch(source, step: int, shardings: dict, shapes: dict) -> dict:
    """The global batch of ``step`` as ``jax.Array``s placed by ``shardings``, built per process.

    ``shapes`` gives each field's global shape (rows first); :func:`local_batch` builds this
    process's part.
    """
    build, place = batch_builder(source, shardings, shapes)
    return place(build(step))


def batch_builder(source, shardings: dict, shapes: dict):
    """(build, place) of :func:`global_batch` apart: ``build(step)`` makes this process's part of
    the batch (NumPy, no device touched: it may run in a background thread), ``place(part)``
    assembles the global arrays from every process's part."""
    index = {k: local_index(shardings[k], shapes[k]) for k in shardings}

    def place(local: dict) -> dict:
        return {k: jax.make_array_from_process_local_data(shardings[k], local[k], tuple(shapes[k]))
                for k in shardings}

    return (lambda step: local_batch(source, step, index)), place


def place_batch(batch: dict, shardings: dict) -> dict:
    """A batch every process holds whole (numpy), placed by ``shardings``: ``jax.device_put`` in one
    process; in several, each process puts only the part its devices hold."""
    if jax.process_count() == 1:
        return jax.device_put(batch, shardings)
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(shardings[k], v[local_index(shardings[k], v.shape)], v.shape)
    return out


def local_batch(source, step: int, index: dict) -> dict:
    """Fields of batch ``step`` cut to ``index`` (field -> tuple of slices, the first over rows).

    A source with ``batch_rows(step, start, stop)`` builds only the rows some field needs;
    otherwise the part is cut out of ``source.batch(step)``.
    """
    if not hasattr(source, "batch_rows"):
        full = source.batch(step)
        return {k: np.asarray(full[k])[ix] for k, ix in index.items()}
    start, stop = min(ix[0].start for ix in index.values()), max(ix[0].stop for ix in index.values())
    part = source.batch_rows(step, int(start), int(stop))
    return {k: np.asarray(part[k])[(slice(ix[0].start - start, ix[0].stop - start), *ix[1:])]
            for k, ix in index.items()}


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (nothing to wait for in one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
