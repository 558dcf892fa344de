"""Checks of what enters a run, on the host and before anything is compiled or written.

- :func:`validate_batch`: one batch (a dict of arrays): required fields present, one batch
  size across fields, integer token fields with ids in ``[0, vocab_size)``, finite
  non-negative float weights, a boolean or 0/1 mask. A few numpy reductions per field.
- :func:`check_data`: the first training batch and every evaluation batch of a recipe's data.
- :func:`check_loss_fields`: traces the recipe's loss abstractly (``jax.eval_shape``) on the
  first batch, so a field the loss reads but the batches lack is named in one line instead
  of surfacing as a bare ``KeyError`` from inside the compiled step.
- :func:`check_run`: settings of the model and of the run that only make sense together.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

TOKEN_FIELDS = ("inputs", "targets", "tokens")  # integer ids into the vocabulary, where present
WEIGHT_FIELDS = ("weights",)                    # per-token loss weights, where present
MASK_FIELDS = ("mask",)                         # real-token marks, where present
SEGMENT_FIELDS = ("segments",)                  # packed rows: which sequence each token belongs to
MESH_ATTENTION = {"ring": "sequence", "ulysses": "sequence"}  # attention that splits over a mesh axis


def validate_batch(batch, vocab_size: int | None, *, required=(), where: str = "batch") -> None:
    """ValueError (one line, naming ``where``, the field and the values) if ``batch`` is malformed."""
    if not isinstance(batch, Mapping):
        raise ValueError(f"{where} must be a dict of arrays, got {type(batch).__name__}")
    missing = [k for k in required if k not in batch]
    if missing:
        raise ValueError(f"{where} lacks the field(s) {missing} (it has {sorted(batch)})")
    arrays = {}
    for key, value in batch.items():
        if not hasattr(value, "shape") or not hasattr(value, "dtype"):
            raise ValueError(f"{where}[{key!r}] must be an array, got {type(value).__name__}")
        arrays[key] = value
    sizes = {k: (v.shape[0] if v.ndim else None) for k, v in arrays.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{where} fields disagree on the batch size (leading dimension): {sizes}")
    for key in TOKEN_FIELDS:
        if key not in arrays:
            continue
        ids = np.asarray(arrays[key])
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{where}[{key!r}] holds token ids and must have an integer dtype, got {ids.dtype}")
        if ids.size and vocab_size is not None and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"{where}[{key!r}] holds ids in [{ids.min()}, {ids.max()}], outside the "
                             f"vocabulary [0, {vocab_size})")
    for key in WEIGHT_FIELDS:
        if key not in arrays:
            continue
        w = np.asarray(arrays[key])
        if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer) or w.dtype == bool):
            raise ValueError(f"{where}[{key!r}] must be numeric, got {w.dtype}")
        if w.size and (not np.all(np.isfinite(w)) or w.min() < 0):
            raise ValueError(f"{where}[{key!r}] must hold finite non-negative weights; min {w.min()}, "
                             f"{int(np.sum(~np.isfinite(w)))} non-finite")
    for key in MASK_FIELDS:
        if key not in arrays:
            continue
        m = np.asarray(arrays[key])
        if m.dtype != bool and not (np.issubdtype(m.dtype, np.integer) and np.isin(m, (0, 1)).all()):
            raise ValueError(f"{where}[{key!r}] must be boolean (or 0/1 integers), got dtype {m.dtype}")
    for key in SEGMENT_FIELDS:
        if key not in arrays:
            continue
        ids = np.asarray(arrays[key])
        if not np.issubdtype(ids.dtype, np.integer) or ids.ndim != 2:
            raise ValueError(f"{where}[{key!r}] must be integer segment ids [batch, seq], got {ids.dtype} "
                             f"of shape {ids.shape}")
        if "mask" in arrays and ids.shape == np.shape(arrays["mask"]) and ids.size:
            padding = ~np.asarray(arrays["mask"]).astype(bool)
            if (ids[padding] != 0).any() or (ids[~padding] == 0).any():
                raise ValueError(f"{where}[{key!r}] must be 0 exactly on padding (where 'mask' is False)")


def check_data(data, vocab_size: int | None, example=None) -> None:
    """Validate the first training batch and every evaluation batch (the same fields as training,
    but those ``data.train_only`` names)."""
    example = data.train.batch(0) if example is None else example
    validate_batch(example, vocab_size, where="training batch 0")
    if not data.eval:
        raise ValueError("the recipe's data has no evaluation batches")
    fields = tuple(k for k in example if k not in getattr(data, "train_only", ()))
    for i, batch in enumerate(data.eval):
        validate_batch(batch, vocab_size, required=fields, where=f"evaluation batch {i}")


def check_loss_fields(loss_fn, model, batch) -> None:
    """Trace ``loss_fn(model, batch, key)`` abstractly; a KeyError names the missing batch field."""
    from flax import nnx

    graphdef, state = nnx.split(model)  # the trace works on a merged copy: the model is never touched
    try:
        jax.eval_shape(lambda s, b: loss_fn(nnx.merge(graphdef, s), b, jax.random.key(0)), state, batch)
    except KeyError as err:
        raise ValueError(f"the loss reads the batch field {err.args[0]!r}, which the recipe's batches lack "
                         f"(they have {sorted(batch)})") from None
    except Exception:  # anything else surfaces, with its own message, when the step is compiled
        pass


def check_run(model_config, train_config) -> None:
    """Settings of the model and the run that only make sense together (ValueError, one line)."""
    from sciscale_jax import parallel

    axis = MESH_ATTENTION.get(getattr(model_config, "attention", None))
    if axis is not None:
        size = parallel.ParallelConfig.parse(train_config.mesh).sizes()[axis] if train_config.mesh else 1
        if size == 1:
            raise ValueError(f"attention={model_config.attention!r} splits the sequence over the mesh axis {axis!r}, "
                             f"but mesh={train_config.mesh!r} has no {axis} axis; pass e.g. --mesh {axis}=2 "
                             "or choose another --attention")
    if getattr(model_config, "sharding", None) is not None and not train_config.mesh:
        raise ValueError(f"sharding={model_config.sharding!r} needs a mesh (--mesh data=N,tensor=M,...); without "
                         "one the run uses one device and the rule table would do nothing")
    if hasattr(model_config, "max_len") and train_config.seq_len > model_config.max_len:
        raise ValueError(f"seq_len={train_config.seq_len} exceeds the model's max_len={model_config.max_len}")
