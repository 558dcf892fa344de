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


def _param_paths(params) -> dict:
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return {_checks.path_names(path): p for path, p in flat}


def state_report(opt_state: Any, params: Any) -> list[dict]:
    """Per-parameter state bytes: one row per parameter leaf, plus one row for shared state.

    A state leaf is charged to the parameter whose path appears inside the state leaf's path
    (e.g. ``("nu", "w", "row")`` -> ``("w",)``): the longest such match, the latest one on a
    tie, so a chain index or a state field never shadows the parameter path. This fits states
    laid out like ``params``, as optax and this package lay them out. Leaves that match no
    parameter (step counts, keys) go to the row ``"(shared)"``. Each row:
    ``{"param": "a/b", "shape": (...), "param_bytes": int, "state_bytes": int, "ratio": float}``.
    """
    params_by_path = _param_paths(params)
    rows = {path: 0 for path in params_by_path}
    shared = 0
    for spath, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        names = _checks.path_names(spath)
        matches = [(stop - start, start) for start in range(len(names))
                   for stop in range(start + 1, len(names) + 1) if names[start:stop] in params_by_path]
        owner = None
        if matches:
            length, start = max(matches)
            owner = names[start:start + length]
        if owner is None:
            shared += _leaf_bytes(leaf)
        else:
            rows[owner] += _leaf_bytes(leaf)
    out = []
    for path, p in params_by_path.items():
        pb = _leaf_bytes(p)
        out.append({"param": "/".join(map(str, path)), "shape": tuple(p.shape), "param_bytes": pb,
                    "state_bytes": rows[path], "ratio": rows[path] / pb if pb else 0.0})
    out.append({"param": "(shared)", "shape": (), "param_bytes": 0, "state_bytes": shared, "ratio": 0.0})
    return out


def format_report(rows: list[dict]) -> str:
    """A markdown table of :func:`state_report` rows."""
    lines = ["| parameter | shape | param bytes | state bytes | state / param |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['param']} | {r['shape']} | {r['param_bytes']} | {r['state_bytes']} | {r['ratio']:.3f} |")
    return "\n".join(lines)
