"""Nested pure dicts of arrays (``nnx.to_pure_dict``'s form of model state) cut by key path and put back.

A leaf module (flax's ``traverse_util`` only), so the techniques (fp8's metadata) and the train
step (LoRA's frozen parameters) share one pair of helpers. Empty sub-dicts are kept, so a tree
cut and put back has the structure it had.
"""

from __future__ import annotations

from typing import Callable

from flax import traverse_util


def partition(tree: dict, keep: Callable) -> tuple[dict, dict]:
    """``tree`` cut into (the entries whose key path, a tuple of keys, ``keep`` accepts; the others)."""
    flat = traverse_util.flatten_dict(tree, keep_empty_nodes=True)
    kept = {p: v for p, v in flat.items() if keep(p)}
    return (traverse_util.unflatten_dict(kept),
            traverse_util.unflatten_dict({p: v for p, v in flat.items() if p not in kept}))


def combine(*trees: dict) -> dict:
    """Trees with disjoint key paths as one (:func:`partition`'s inverse; a later tree wins a shared path)."""
    flat = {}
    for tree in trees:
        flat.update(traverse_util.flatten_dict(tree, keep_empty_nodes=True))
    return traverse_util.unflatten_dict(flat)


def like(template: dict, tree: dict) -> dict:
    """The entries of ``tree`` at the key paths of ``template``."""
    flat = traverse_util.flatten_dict(tree, keep_empty_nodes=True)
    paths = traverse_util.flatten_dict(template, keep_empty_nodes=True)
    return traverse_util.unflatten_dict({p: flat[p] for p in paths})
