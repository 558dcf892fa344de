"""Dynamic Axial Parallelism (Cheng et al. 2022, "FastFold: Reducing AlphaFold Training Time from
11 Days to 67 Hours"): the layouts, collectives and checks, model-independent.

DAP keeps every parameter on every device of the ``dap`` mesh axis and shards the two
activations of an Evoformer-like model along the axis the current sub-module does *not*
compute over: the MSA [B, S, R, c] over sequences S for row attention and over residues R
for column attention, transition and outer product mean; the pair [B, R, R, c] over rows
for the outgoing / starting-node updates and over columns for the incoming / ending-node
ones. Switching between the two is one ``all_to_all``; operands needed whole (the pair bias
of an attention, the second operand of a triangle multiplication or outer product) are
``all_gather``-ed. ``Layout`` holds those operations for one shard inside ``jax.shard_map``
(with degree 1 and no axis they are identities, so the same model code runs unsharded);
``run_sharded`` pads S and R to multiples of the degree (padded mask entries are 0, so the
padding is never attended and never summed) and runs a function under ``shard_map`` with the
batch split over the data axes and parameters replicated.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from sciscale_jax.parallel.mesh import DATA_AXES, axis_size

AXIS = "dap"
# Attention implementations that run per device inside DAP's shard_map. "ring" and "ulysses"
# shard attention over the ``sequence`` axis with their own shard_map and cannot nest here.
SUPPORTED_ATTENTION = ("xla", "chunked", "flash", "cudnn", "sm90", "auto")
# Mesh axes DAP composes with: the data axes (data parallel, ZeRO) and itself.
COMPOSABLE_AXES = (*DATA_AXES, AXIS)


def context_mesh(mesh=None):
    """``mesh``, else the mesh set with ``jax.set_mesh``, else None."""
    if mesh is not None:
        return mesh
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def dap_degree(mesh=None) -> tuple:
    """(mesh in use, its ``dap`` size); degree 1 without a mesh or when ``dap`` is already manual."""
    mesh = context_mesh(mesh)
    if mesh is None or mesh.shape.get(AXIS, 1) == 1:
        return mesh, 1
    types = dict(zip(mesh.axis_names, getattr(mesh, "axis_types", ())))
    if types.get(AXIS) == jax.sharding.AxisType.Manual:
        return mesh, 1
    return mesh, mesh.shape[AXIS]


def check_dap(mesh_sizes: dict, attention_impl: str, supports_dap: bool = True, what: str = "model") -> None:
    """ValueError (before anything compiles) when a mesh with ``dap`` > 1 is combined with a model,
    an attention implementation or another mesh axis that DAP does not support."""
    degree = mesh_sizes.get(AXIS, 1)
    if degree <= 1:
        return
    if not supports_dap:
        raise ValueError(f"mesh dap={degree}: the {what} does not support Dynamic Axial Parallelism (only the "
                         "Evoformer does); drop the dap axis")
    if attention_impl not in SUPPORTED_ATTENTION:
        raise ValueError(f"mesh dap={degree} with attention={attention_impl!r}: DAP runs attention per device and "
                         f"supports attention in {SUPPORTED_ATTENTION}")
    other = {a: n for a, n in mesh_sizes.items() if n > 1 and a not in COMPOSABLE_AXES}
    if other:
        raise ValueError(f"mesh dap={degree} with {other}: DAP composes only with the data axes {DATA_AXES}")


def padded(n: int, degree: int) -> int:
    return -(-n // degree) * degree


def pad_axis(x, axis: int, size: int):
    """``x`` zero-padded along ``axis`` to ``size``."""
    if x.shape[axis] == size:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pads)


@dataclasses.dataclass(frozen=True)
class Layout:
    """One device's view inside the DAP ``shard_map``: the collectives over ``axis`` and the global
    (unpadded) sizes the dropout masks are drawn at. ``axis=None`` (degree 1): identities."""

    axis: str | None
    degree: int
    batch_axes: tuple | None     # mesh axes the batch is split over (None: replicated)
    batch: int                   # global batch size
    msa_rows: int                # S before padding
    residues: int                # R before padding

    def _index(self, names):
        return lax.axis_index(names)

    def local(self, x, dim: int):
        """This device's block along ``dim`` of an array every device holds whole."""
        if self.axis is None:
            return x
        n = x.shape[dim] // self.degree
        return lax.dynamic_slice_in_dim(x, self._index(self.axis) * n, n, dim)

    def gather(self, x, dim: int):
        """The whole array from each device's block along ``dim`` (all_gather)."""
        return x if self.axis is None else lax.all_gather(x, self.axis, axis=dim, tiled=True)

    def swap(self, x, split: int, concat: int):
        """Resharding by all_to_all: whole along ``concat`` becomes sharded, sharded along ``split``
        ... the reverse. [.., n/P along concat, N along split] -> [.., N along concat, N/P along split]."""
        return x if self.axis is None else lax.all_to_all(x, self.axis, split, concat, tiled=True)

    def local_batch(self, x):
        """This device's part of the batch axis (0) of an array drawn for the global batch."""
        if not self.batch_axes:
            return x
        n = x.shape[0] // axis_size_from(self.batch_axes)
        return lax.dynamic_slice_in_dim(x, self._index(self.batch_axes) * n, n, 0)

    def dropout(self, x, rate: float, key, shared_axis: int, sharded_axis: int, sizes: tuple):
        """AlphaFold's shared dropout on a local block ``x``, equal to the single-device result:
        the keep mask is drawn at the global unpadded shape [B, *sizes, c] from ``key`` (exactly
        as on one device), broadcast along ``shared_axis``, padded, and the local block cut out
        (batch over the data axes, ``sharded_axis`` over ``dap``)."""
        if key is None or rate == 0.0:
            return x
        shape = [self.batch, *sizes, x.shape[-1]]
        shape[shared_axis] = 1
        keep = jax.random.bernoulli(key, 1.0 - rate, tuple(shape))
        for dim in (1, 2):
            if dim != shared_axis:
                keep = pad_axis(keep, dim, padded(shape[dim], self.degree))
        keep = self.local_batch(keep)
        if sharded_axis != shared_axis:
            keep = self.local(keep, sharded_axis)
        return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def axis_size_from(names) -> int:
    """Size of mesh ``names`` inside shard_map (product for a tuple)."""
    names = (names,) if isinstance(names, str) else tuple(names)
    size = 1
    for n in names:
        size *= lax.axis_size(n)
    return size


def batch_axes_for(mesh, batch: int):
    """The data axes (size > 1) the batch splits over inside DAP, or None when it does not divide."""
    names = tuple(a for a in DATA_AXES if mesh.shape.get(a, 1) > 1)
    if not names or batch % axis_size(mesh, names):
        return None
    return names


def run_sharded(fn, params, m, z, msa_mask, pair_mask, keys, *, mesh):
    """``fn(params, m, z, msa_mask, pair_mask, keys, layout) -> (m, z)`` run per device under
    ``jax.shard_map`` over ``mesh``: m [B, S, R, c_m] enters sharded over S and z [B, R, R, c_z]
    over rows (both padded to multiples of the ``dap`` degree; masks padded with 0 and given
    whole to every device), parameters and keys replicated; outputs come back in the same
    layout, cut to the unpadded sizes."""
    mesh, degree = dap_degree(mesh)
    batch, msa_rows, residues = m.shape[0], m.shape[1], m.shape[2]
    s_pad, r_pad = padded(msa_rows, degree), padded(residues, degree)
    m_p = pad_axis(pad_axis(m, 1, s_pad), 2, r_pad)
    z_p = pad_axis(pad_axis(z, 1, r_pad), 2, r_pad)
    msa_mask_p = pad_axis(pad_axis(msa_mask, 1, s_pad), 2, r_pad)
    pair_mask_p = pad_axis(pad_axis(pair_mask, 1, r_pad), 2, r_pad)
    batch_axes = batch_axes_for(mesh, batch)
    layout = Layout(AXIS, degree, batch_axes, batch, msa_rows, residues)
    act, whole = P(batch_axes, AXIS), P(batch_axes)

    def local(params, m, z, msa_mask, pair_mask, keys):
        return fn(params, m, z, msa_mask, pair_mask, keys, layout)

    m_out, z_out = jax.shard_map(local, mesh=mesh, in_specs=(P(), act, act, whole, whole, P()),
                                 out_specs=(act, act))(params, m_p, z_p, msa_mask_p, pair_mask_p, keys)
    return m_out[:, :msa_rows, :residues], z_out[:, :residues, :residues]


def unsharded_layout(m) -> Layout:
    """The degree-1 layout for inputs ``m`` [B, S, R, c] (every collective an identity)."""
    return Layout(None, 1, None, m.shape[0], m.shape[1], m.shape[2])
