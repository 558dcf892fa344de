"""DeepSpeed-Ulysses sequence-parallel attention (Jacobs et al. 2023, "DeepSpeed Ulysses:
System Optimizations for Enabling Training of Extreme Long Sequence Transformer Models").

Outside attention, activations are split along the sequence over the ``sequence`` mesh axis.
Inside ``jax.shard_map``, one ``all_to_all`` turns q, k, v from sequence-sharded
[B, S/P, H, D] into head-sharded [B, S, H/P, D]; every device runs exact attention over the
whole sequence for its heads; a second ``all_to_all`` turns the output back. Heads (and
kv heads, else they are repeated first) must divide by the Ulysses degree P (times the
tensor degree when heads are also tensor-parallel). Bias and mask are split by heads.

Registered with the attention front door as ``"ulysses"``; it uses the mesh set with
``jax.set_mesh`` (or ``mesh=``) and falls back to plain attention without a sequence axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sciscale_jax.attention.xla import xla_attention
from sciscale_jax.parallel.mesh import DATA_AXES, axis_size


def context_mesh(mesh=None):
    """``mesh``, else the mesh set with ``jax.set_mesh``, else None."""
    if mesh is not None:
        return mesh
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def sequence_degree(mesh, axis: str):
    """(the mesh in use, its size along the sequence ``axis``); degree 1 without a mesh."""
    mesh = context_mesh(mesh)
    return mesh, (mesh.shape.get(axis, 1) if mesh is not None else 1)


def check_lengths_divide(q_len: int, kv_len: int, degree: int, what: str, axis: str) -> None:
    for name, length in (("q_len", q_len), ("kv_len", kv_len)):
        if length % degree:
            raise ValueError(f"{name}={length} is not divisible by the {what} degree {axis}={degree}")


def qkv_spec_axes(mesh, batch, seq_axis):
    """(batch mesh axes, tensor axis) for [B, S, H, D] blocks inside a sequence shard_map."""
    batch_axes = tuple(a for a in DATA_AXES if mesh.shape.get(a, 1) > 1)
    if batch % axis_size(mesh, batch_axes):
        batch_axes = ()
    head_axis = "tensor" if mesh.shape.get("tensor", 1) > 1 and seq_axis != "tensor" else None
    return (batch_axes or None), head_axis


def ulysses_attention(q_bshd, k_bshd, v_bshd, *, bias=None, mask=None, causal=False, scale=None,
                      mesh=None, axis="sequence"):
    """Exact attention with the sequence split over mesh ``axis``; layout as the front door."""
    mesh, degree = sequence_degree(mesh, axis)
    if degree == 1:
        return xla_attention(q_bshd, k_bshd, v_bshd, bias=bias, mask=mask, causal=causal, scale=scale)
    batch, q_len, heads, head_dim = q_bshd.shape
    kv_len, kv_heads = k_bshd.shape[1], k_bshd.shape[2]
    batch_axes, head_axis = qkv_spec_axes(mesh, batch, axis)
    tensor = axis_size(mesh, head_axis)
    if heads % (tensor * degree):
        raise ValueError(f"num_heads={heads} is not divisible by tensor x ulysses degree = "
                         f"{tensor} x {degree} = {tensor * degree}")
    check_lengths_divide(q_len, kv_len, degree, "ulysses", axis)
    if kv_heads % (tensor * degree):  # grouped kv heads that cannot be split: repeat them
        k_bshd = jnp.repeat(k_bshd, heads // kv_heads, axis=2)
        v_bshd = jnp.repeat(v_bshd, heads // kv_heads, axis=2)
    scale = head_dim ** -0.5 if scale is None else scale
    qkv_spec = P(batch_axes, axis, head_axis, None)
    head_split = (head_axis, axis) if head_axis else axis  # heads after all_to_all: tensor-major

    def extra_spec(x):  # bias / mask [B, H, Q, K], possibly broadcast: split batch and heads
        x = x.reshape((1,) * (4 - x.ndim) + x.shape)
        return x, P(batch_axes if x.shape[0] > 1 else None, head_split if x.shape[1] > 1 else None)

    extras, extra_specs = [], []
    for x in (bias, mask):
        x, spec = extra_spec(x) if x is not None else (None, None)
        extras.append(x)
        extra_specs.append(spec)

    def local(q, k, v, b, m):
        to_heads = lambda x: jax.lax.all_to_all(x, axis, 2, 1, tiled=True)  # [B,S/P,h,D]->[B,S,h/P,D]
        out = xla_attention(to_heads(q), to_heads(k), to_heads(v), bias=b, mask=m, causal=causal, scale=scale)
        return jax.lax.all_to_all(out, axis, 1, 2, tiled=True)

    return jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, *extra_specs),
                         out_specs=qkv_spec)(q_bshd, k_bshd, v_bshd, *extras)


IMPL = (ulysses_attention, None)  # listed as impl="ulysses" in sciscale_jax.attention.core.IMPLS
