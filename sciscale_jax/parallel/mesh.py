"""Device meshes for data, ZeRO/FSDP, tensor, sequence and pipeline parallelism.

``ParallelConfig`` names how many devices each kind of parallelism uses; ``make_mesh`` turns
it into a ``jax.sharding.Mesh`` with the axes ``MESH_AXES`` (tensor innermost, so the most
talkative collectives stay between neighbouring devices), after checking that the product
of the axis sizes equals the device count or divides it (then the first devices are used:
``data=4`` on a host with 8 devices runs on devices 0-3).

Axis types: every axis is ``AxisType.Auto``. jax 0.10 defaults to Explicit, where the
sharding of every intermediate is part of its type and an ambiguous op (an einsum that
contracts a sharded dimension) is an error until the code names an ``out_sharding``. Our
strategies are rule tables applied to parameters, batches and a few activations
(``with_logical_constraint``), with GSPMD propagating the rest; the models stay written
for one device. Auto is the mode built for that. Hand-written collectives (ZeRO-2
reduce-scatter, Ulysses, ring attention) use ``jax.shard_map``, which works on Auto axes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

# Outermost to innermost. ``tensor2`` is the second tensor-parallel axis of 2D TP.
# ``dap`` is Dynamic Axial Parallelism (``dap.py``).
MESH_AXES = ("pipeline", "data", "fsdp", "dap", "sequence", "tensor2", "tensor")
DATA_AXES = ("data", "fsdp")  # the axes a batch (and ZeRO state) is split over


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Devices per parallelism; one field may be -1 to take the devices left over."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1
    pipeline: int = 1
    tensor2: int = 1
    dap: int = 1

    def sizes(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MESH_AXES}

    def resolve(self, num_devices: int) -> "ParallelConfig":
        """Fill a -1 field from ``num_devices``; ValueError naming the sizes if they do not fit."""
        sizes = self.sizes()
        bad = {k: v for k, v in sizes.items() if not isinstance(v, (int, np.integer)) or (v < 1 and v != -1)}
        if bad:
            raise ValueError(f"mesh axis sizes must be positive integers or -1; got {bad}")
        fill = [k for k, v in sizes.items() if v == -1]
        if len(fill) > 1:
            raise ValueError(f"at most one mesh axis may be -1; got {fill}")
        known = math.prod(v for v in sizes.values() if v != -1)
        if fill:
            if num_devices % known:
                raise ValueError(f"cannot fill {fill[0]}=-1: the other axes multiply to {known}, "
                                 f"which does not divide the {num_devices} devices")
            sizes[fill[0]] = num_devices // known
        elif known > num_devices or num_devices % known:
            desc = "x".join(f"{k}={v}" for k, v in sizes.items() if v != 1) or "all axes 1"
            raise ValueError(f"mesh {desc} has {known} devices but {num_devices} devices are available; a mesh "
                             f"runs on all of them, or on the first M where M divides {num_devices} (choose "
                             "others with CUDA_VISIBLE_DEVICES), or fill one axis with -1")
        return ParallelConfig(**sizes)

    @property
    def num_devices(self) -> int:
        """Devices the mesh uses (a -1 axis counts as 1 until :meth:`resolve` fills it)."""
        return math.prod(abs(v) for v in self.sizes().values())

    @classmethod
    def parse(cls, text: str) -> "ParallelConfig":
        """Parse the CLI form ``"data=2,fsdp=2,tensor=2"``."""
        sizes = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            name, _, value = item.partition("=")
            if name not in MESH_AXES or not value.lstrip("-").isdigit():
                raise ValueError(f"bad mesh item {item!r}; expected NAME=INT with NAME in {MESH_AXES}")
            if name in sizes:
                raise ValueError(f"mesh axis {name!r} is given twice in {text!r}")
            sizes[name] = int(value)
        return cls(**sizes)


def make_mesh(config: ParallelConfig, devices=None) -> Mesh:
    """A Mesh with axes ``MESH_AXES`` (all Auto) sized by ``config`` over ``devices``.

    In a multi-process job it spans every device of every process, laid out by
    ``multihost.hybrid_devices`` (data-like axes across processes).
    """
    devices = list(jax.devices() if devices is None else devices)
    config = config.resolve(len(devices))
    shape = tuple(config.sizes()[name] for name in MESH_AXES)
    if jax.process_count() > 1:  # data-like axes across processes, the others within one
        from sciscale_jax.parallel.multihost import hybrid_devices
        return Mesh(hybrid_devices(config.sizes(), devices), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    devices = devices[:config.num_devices]  # a mesh smaller than the devices given uses the first ones
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def axis_size(mesh, axes) -> int:
    """Product of the sizes of ``axes`` (a name, a tuple of names or None) in ``mesh``."""
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes if a in mesh.shape)
