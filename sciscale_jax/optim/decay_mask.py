"""Which parameters weight decay applies to: weight matrices only, as in most LLM training code.

Decoupled weight decay (Loshchilov & Hutter, ICLR 2019) pulls every decayed parameter toward
0. On norm scales (whose neutral value is 1) and biases that is a pull toward a degenerate
layer, not a regulariser, so GPT-2/3, LLaMA and the Adam-mini authors' code skip them;
embeddings are commonly skipped too (a rarely seen token's row would decay to 0 between its
occurrences). :func:`default_decay_mask` builds that choice as a bool pytree for the ``mask``
argument of this package's optimizers (and ``optax.adamw``).
"""

from __future__ import annotations

from typing import Any

import jax

from sciscale_jax.optim import _checks


def _decays(names: tuple, array, decay_embeddings: bool) -> bool:
    names = tuple(names)
    if len(names) > 1 and names[-1] == "value":   # an nnx.Variable's own attribute, not a module name
        names = names[:-1]
    leaf = names[-1] if names else None
    if getattr(array, "ndim", 0) <= 1 or leaf in ("bias", "scale"):
        return False
    if not decay_embeddings and any(isinstance(n, str) and "embed" in n for n in names):
        return False
    return True


def default_decay_mask(params: Any, decay_embeddings: bool = False) -> Any:
    """A bool pytree like ``params``: True only for weight matrices.

    False for every leaf with ``ndim <= 1`` (vectors and scalars), every leaf named ``bias``
    or ``scale`` (norm scales and biases, also when ``scan_layers`` stacks them into
    matrices), and, unless ``decay_embeddings``, every leaf whose path has an entry
    containing ``embed`` (token, position and patch embeddings). Paths are read as in
    ``jax.tree_util`` key paths: dict keys, attribute names, sequence indices; meant for the
    pure-dict parameter tree of an NNX model (``nnx.to_pure_dict``), and a trailing
    ``value`` entry (an ``nnx.State``) is ignored. Works on arrays and ``ShapeDtypeStruct``.
    """
    if not isinstance(decay_embeddings, bool):
        raise ValueError(f"decay_embeddings={decay_embeddings!r} must be a bool")
    return jax.tree_util.tree_map_with_path(
        lambda path, p: _decays(_checks.path_names(path), p, decay_embeddings), params)
