"""Optimizer-state accounting: bytes held by an optax state, in total and per parameter.

Counts what the state arrays occupy (``size × itemsize`` of every array leaf, typed PRNG
keys by their raw key data), so a uint8 moment counts one byte per element and a factored
moment only its row and column vectors. Works on concrete arrays and on
``jax.ShapeDtypeStruct`` trees (e.g. from ``jax.eval_shape(opt.init, params)``).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from sciscale_jax.optim import _checks


def _leaf_bytes(x) -> int:
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return 0
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        data = jax.eval_shape(jax.random.key_data, x)
        return int(np.prod(data.shape)) * np.dtype(data.dtype).itemsize
    return int(np.prod(x.shape)) * np.dtype(dtype).itemsize


def state_bytes(opt_state: Any) -> int:
    """Total bytes of every array in ``opt_state``."""
    return sum(_leaf_bytes(x) for x in jax.tree.leaves(opt_state))


def state_report(opt_state: Any, params: Any) -> list[dict]:
    """Per-parameter state bytes: one row per parameter leaf, plus one row for shared state.

    The state is walked from the top; every subtree laid out like ``params`` (``params``'
    tree structure is a prefix of it, as for optax's ``mu`` / ``nu`` and this package's
    per-leaf moments, factored or quantised) charges each per-parameter part to its
    parameter. Everything else (step counts, PRNG keys) goes to the row ``"(shared)"``.
    Each row: ``{"param": "a/b", "shape": (...), "param_bytes": int, "state_bytes": int,
    "ratio": float}``.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    per_param = [0] * len(flat)
    shared = 0

    def walk(node):
        nonlocal shared
        if treedef.num_leaves > 0 and treedef.num_nodes > 1:
            try:
                parts = treedef.flatten_up_to(node)
            except (ValueError, TypeError):
                parts = None
            if parts is not None:
                for i, part in enumerate(parts):
                    per_param[i] += state_bytes(part)
                return
        children, _ = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
        if len(children) == 1 and children[0] is node:   # an array leaf
            shared += _leaf_bytes(node)
        else:
            for child in children:
                walk(child)

    walk(opt_state)
    rows = []
    for (path, p), sb in zip(flat, per_param):
        pb = _leaf_bytes(p)
        rows.append({"param": "/".join(map(str, _checks.path_names(path))), "shape": tuple(p.shape),
                     "param_bytes": pb, "state_bytes": sb, "ratio": sb / pb if pb else 0.0})
    rows.append({"param": "(shared)", "shape": (), "param_bytes": 0, "state_bytes": shared, "ratio": 0.0})
    return rows


def format_report(rows: list[dict]) -> str:
    """A markdown table of :func:`state_report` rows."""
    lines = ["| parameter | shape | param bytes | state bytes | state / param |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['param']} | {r['shape']} | {r['param_bytes']} | {r['state_bytes']} | {r['ratio']:.3f} |")
    return "\n".join(lines)
