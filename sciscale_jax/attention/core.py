"""The attention front door: one signature, implementations chosen by name.

``dot_product_attention(q, k, v, *, bias, mask, segment_ids, causal, scale, impl)`` validates
shapes and dtypes before anything compiles, then dispatches to a registered implementation.
Layout: q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim] with kv_heads
dividing heads; a float ``bias`` and a boolean ``mask`` (True = attend) broadcastable to
[batch, heads, q_len, kv_len]; integer ``segment_ids`` [batch, seq] (or a pair: queries' [batch,
q_len], keys' [batch, kv_len]) for packed rows, where a query attends only to keys of its own
segment. "chunked" and "flash" compare the ids tile by tile (no [Q, K] mask is formed); any other
implementation gets them as the equivalent boolean mask.

Implementations: "xla" (reference), "chunked" (Rabe & Staats 2021, O(N) memory), "cudnn"
(``jax.nn.dot_product_attention`` on cuDNN), "flash" (Pallas kernel in
``sciscale_jax.kernels.flash_attention``), "ring" and "ulysses" (sequence parallel, in
``sciscale_jax.parallel``; listed by path in ``IMPLS`` and imported on first use), "sm90" (Pallas
Mosaic GPU kernels for Hopper, ``sciscale_jax.attention.sm90``), "tokamax" (the tokamax
package's attention, optional: ``tokamax_backend.py``) and "auto". On a CUDA GPU whose
kind was measured (``measured.py``: forward+backward TFLOP/s from ``benchmarks/attention_gpu.py``
and ``benchmarks/attention_evoformer_gpu.py``, per head_dim, sequence length, causal, and whether
there is a bias, a mask alone or neither), "auto" picks the fastest
implementation at the nearest measured point that takes the inputs, never cuDNN with a bias or
mask (cuDNN needs them at full [B, H, Q, K] size, which would undo the O(N) memory); with segment
ids, one that reads them, else for rows under ``AUTO_CHUNKED_MIN_LEN`` one that takes their mask
(``resolve_impl``). Where
nothing was measured, the rules: cuDNN when it takes the inputs and there is no bias or mask (on
an H200 it ran 1.5-3.6x faster than the flash kernel); otherwise, on GPU or TPU, flash where the
kernel supports the case; else chunked once either sequence reaches ``AUTO_CHUNKED_MIN_LEN``
(or, on CPU, whenever there are segment ids: ``benchmarks/packed_attention.py``), else xla.
"linformer" and "performer" are approximate attention modules with parameters
(``LinformerAttention``, ``PerformerAttention``): model configs may name them, the
parameter-free front door cannot run them.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sciscale_jax.attention import measured
from sciscale_jax.attention.chunked import chunked_attention
from sciscale_jax.attention.cudnn import check_cudnn, cudnn_attention
from sciscale_jax.attention.xla import xla_attention
from sciscale_jax.registry import Registry

AUTO_CHUNKED_MIN_LEN = 2048     # "auto" picks chunked once q_len or kv_len reaches this
MODULE_IMPLS = ("linformer", "performer")  # approximate attention: NNX modules, not functions


class Impl(NamedTuple):
    fn: Callable             # fn(q, k, v, *, bias, mask, causal, scale[, segment_ids])
    check: Callable | None   # check(q, k, v, bias, mask): raise ValueError if unsupported
    segments: bool = False   # fn takes segment_ids=(q_ids [B, Q], kv_ids [B, K]) itself


def _as_impl(entry) -> Impl:
    return entry if isinstance(entry, Impl) else Impl(*entry) if isinstance(entry, tuple) else Impl(entry, None)


# Implementations in other modules are listed by path and imported on first use.
IMPLS = Registry("attention implementation", {
    "xla": Impl(xla_attention, None),
    "chunked": Impl(chunked_attention, None, segments=True),
    "cudnn": Impl(cudnn_attention, check_cudnn),
    "flash": "sciscale_jax.attention.flash:IMPL",
    "sm90": "sciscale_jax.attention.sm90:IMPL",
    "tokamax": "sciscale_jax.attention.tokamax_backend:IMPL",
    "ring": "sciscale_jax.parallel.ring:IMPL",
    "ulysses": "sciscale_jax.parallel.ulysses:IMPL",
}, convert=_as_impl)


def register(name: str, fn: Callable, check: Callable | None = None, segments: bool = False) -> None:
    """Register an attention implementation; ``check`` raises ValueError for inputs it cannot take;
    ``segments``: ``fn`` takes ``segment_ids`` itself (else it gets them as a mask)."""
    IMPLS.register(name, Impl(fn, check, segments))


def available() -> tuple[str, ...]:
    """Names accepted by ``impl``."""
    return IMPLS.names() + ("auto",)


def config_impls() -> tuple[str, ...]:
    """Names a model config may give: the front door's and the approximate attention modules."""
    return available() + MODULE_IMPLS


def validate_impl(name: str) -> str:
    """Return ``name`` if a config may name it (a front-door impl, "auto" or an attention module)."""
    if name in MODULE_IMPLS or name == "auto":
        return name
    if name not in IMPLS:
        raise ValueError(f"unknown attention implementation {name!r}; known: {', '.join(config_impls())}")
    return name


def check_shapes(q, k, v, bias=None, mask=None) -> None:
    """Raise a ValueError naming the shapes when the inputs do not fit the layout."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [batch, seq, heads, head_dim]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"batch or head_dim mismatch: q {q.shape} vs k {k.shape}")
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"kv_heads={kv_heads} does not divide heads={heads}")
    target = (q.shape[0], heads, q.shape[1], k.shape[1])
    for label, x in (("bias", bias), ("mask", mask)):
        if x is None:
            continue
        try:
            if x.ndim > 4 or np.broadcast_shapes(tuple(x.shape), target) != target:
                raise ValueError
        except ValueError:
            raise ValueError(f"{label} of shape {tuple(x.shape)} does not broadcast to "
                             f"[batch, heads, q_len, kv_len] = {target}") from None


def check_dtypes(q, k, v, bias=None, mask=None) -> None:
    """Raise a ValueError naming the dtypes unless q, k, v share a float dtype, bias is float, mask bool."""
    dtypes = (jnp.dtype(q.dtype), jnp.dtype(k.dtype), jnp.dtype(v.dtype))
    if not jnp.issubdtype(dtypes[0], jnp.floating) or len(set(dtypes)) != 1:
        raise ValueError(f"q, k, v must share one floating dtype; got {', '.join(d.name for d in dtypes)}")
    if bias is not None and not jnp.issubdtype(bias.dtype, jnp.floating):
        raise ValueError(f"bias must be floating (it is added to the logits); got {jnp.dtype(bias.dtype).name}")
    if mask is not None and jnp.dtype(mask.dtype) != jnp.dtype(bool):
        raise ValueError(f"mask must be boolean (True = attend); got {jnp.dtype(mask.dtype).name}")


def check_segments(q, k, segment_ids):
    """``segment_ids`` as a pair (query ids [batch, q_len], key ids [batch, kv_len]) of int32, or
    None; a ValueError naming the shapes or dtype when they do not fit q and k."""
    if segment_ids is None:
        return None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError(f"segment_ids must be one [batch, seq] array or a pair (query ids, key ids); "
                             f"got a sequence of {len(segment_ids)}")
        q_ids, kv_ids = segment_ids
    else:
        if q.shape[1] != k.shape[1]:
            raise ValueError(f"one segment_ids array needs q_len == kv_len (got {q.shape[1]} and {k.shape[1]}); "
                             f"give a pair (query ids, key ids)")
        q_ids = kv_ids = segment_ids
    for label, ids, seq in (("query", q_ids, q.shape[1]), ("key", kv_ids, k.shape[1])):
        if not hasattr(ids, "shape") or tuple(ids.shape) != (q.shape[0], seq):
            raise ValueError(f"{label} segment ids of shape {tuple(getattr(ids, 'shape', ()))} must be "
                             f"[batch, {label}_len] = {(q.shape[0], seq)}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"segment ids must be integers; got {jnp.dtype(ids.dtype).name}")
    return jnp.asarray(q_ids, jnp.int32), jnp.asarray(kv_ids, jnp.int32)


def segment_mask(segment_ids):
    """The boolean mask [batch, 1, q_len, kv_len] (True = attend) of a (query ids, key ids) pair."""
    q_ids, kv_ids = segment_ids
    return q_ids[:, None, :, None] == kv_ids[:, None, None, :]


def _accelerator() -> bool:
    return jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")


def _cuda() -> bool:
    return jax.default_backend() in ("gpu", "cuda")


def _device_kind() -> str:
    return jax.devices()[0].device_kind


def _auto_takes(name, q, k, v, bias, mask, causal) -> bool:
    """Whether "auto" may pick ``name`` here: the implementation takes the inputs, and (cuDNN) no
    bias or mask would have to be materialised at full [B, H, Q, K] size."""
    if name == "cudnn" and (bias is not None or mask is not None):
        return False
    if name == "flash":
        try:
            from sciscale_jax.kernels.flash_attention import flash_supported
        except ImportError:
            return False
        return flash_supported(q, k, v, bias, mask)
    try:
        entry = IMPLS[name]
        if name == "cudnn":
            check_cudnn(q, k, v, causal=causal)
        elif name == "sm90":
            entry.check(q, k, v, bias, mask, causal)
            from sciscale_jax.kernels.flash_attention_sm90 import SM90_GPU_TESTED_HEAD_DIMS
            if q.shape[-1] not in SM90_GPU_TESTED_HEAD_DIMS:  # not yet run on a GPU: only when forced
                return False
        elif name == "tokamax":
            from sciscale_jax.attention.tokamax_backend import check_tokamax
            check_tokamax(q, k, v, bias, mask, causal)
        elif entry.check is not None:
            entry.check(q, k, v, bias, mask)
    except (ValueError, ImportError):
        return False
    return True


def _takes_segments(name: str) -> bool:
    try:
        return IMPLS[name].segments
    except ImportError:
        return False


def resolve_impl(q, k, v, bias=None, mask=None, impl: str = "auto", causal: bool = False,
                 segments: bool = False) -> str:
    """The implementation ``impl`` stands for on these inputs ("auto" resolved; others unchanged).
    With ``segments`` (packed rows), "auto" takes an implementation that compares segment ids
    itself; one that needs the [Q, K] mask they stand for only on a GPU where none of those runs and
    the rows are shorter than ``AUTO_CHUNKED_MIN_LEN`` (where xla would form the mask anyway)."""
    if impl != "auto":
        return impl
    if _cuda():  # measured on this kind of GPU: the fastest implementation that takes the inputs
        kind = "pair" if bias is not None else "mask" if mask is not None or segments else "none"
        ranked = measured.ranking(_device_kind(), q.shape[-1], max(q.shape[1], k.shape[1]), causal, kind)
        for name in ranked or ():
            if (not segments or _takes_segments(name)) and _auto_takes(name, q, k, v, bias, mask, causal):
                return name
        if segments and max(q.shape[1], k.shape[1]) < AUTO_CHUNKED_MIN_LEN:
            # Short packed rows and no kernel here that reads the ids (flash needs Pallas's Triton
            # backend): the [B, 1, Q, K] mask is formed either way (xla would take it), so the
            # fastest measured kernel that takes a mask instead (H200, 1,024 positions: sm90 3.1 ms,
            # xla 9.3; benchmarks/results/packed_attention_nvidia_h200.md).
            ids_mask = jax.ShapeDtypeStruct((q.shape[0], 1, q.shape[1], k.shape[1]), jnp.bool_)
            for name in ranked or ():
                if name != "xla" and _auto_takes(name, q, k, v, bias, ids_mask, causal):
                    return name
    if _cuda() and bias is None and mask is None and not segments:
        try:
            check_cudnn(q, k, v, causal=causal)
            return "cudnn"
        except ValueError:
            pass
    if _accelerator():
        try:
            from sciscale_jax.kernels.flash_attention import flash_supported
        except ImportError:
            flash_supported = None
        if flash_supported is not None and flash_supported(q, k, v, bias, mask):
            return "flash"
    if max(q.shape[1], k.shape[1]) >= AUTO_CHUNKED_MIN_LEN or (segments and not _accelerator()):
        return "chunked"  # packed rows on CPU: 2.3-37x faster than xla's mask, 128-4,096 positions
    return "xla"


def dot_product_attention(q, k, v, *, bias=None, mask=None, segment_ids=None, causal=False, scale=None,
                          impl="auto"):
    """Scaled dot-product attention softmax(q k^T * scale + bias) v, masked and optionally causal;
    with ``segment_ids``, query i attends key j only where their segment ids are equal."""
    if impl in MODULE_IMPLS:
        raise ValueError(f"impl={impl!r} is an attention module with parameters; build "
                         f"sciscale_jax.attention.{impl.capitalize()}Attention and call it instead")
    validate_impl(impl)
    check_shapes(q, k, v, bias, mask)
    check_dtypes(q, k, v, bias, mask)
    segments = check_segments(q, k, segment_ids)
    entry = IMPLS[resolve_impl(q, k, v, bias, mask, impl, causal=causal, segments=segments is not None)]
    extra = {}
    if segments is not None and entry.segments:
        extra["segment_ids"] = segments
    elif segments is not None:  # the implementation takes masks only: the segments' [B, 1, Q, K] mask
        mask = segment_mask(segments) if mask is None else mask & segment_mask(segments)
    if entry.check is not None:
        entry.check(q, k, v, bias, mask)
    return entry.fn(q, k, v, bias=bias, mask=mask, causal=causal, scale=scale, **extra)
