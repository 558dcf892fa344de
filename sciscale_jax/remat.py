"""Checkpoint-name vocabulary and rematerialisation (gradient checkpointing) policies.

Every model tags its activations with ``jax.ad_checkpoint.checkpoint_name`` using the
names below, so one policy (a function of a name) decides what is kept, recomputed or
offloaded across all models. Policies follow Chen et al. 2016, "Training Deep Nets with
Sublinear Memory Cost" (full recomputation, checkpoints every k layers) and Korthikanti
et al. 2022, "Reducing Activation Recomputation in Large Transformer Models" (selective
recomputation of the attention core only).

A policy is named by a string, or given as a mapping from checkpoint name to an action:

- ``"none"``: no rematerialisation, every residual is kept.
- ``"full"``: keep only each block's input, recompute the rest of the block.
- ``"selective"``: recompute only the attention logits, probabilities and dropout; keep
  every other tagged activation and every weight-matmul output (dot without batch dims).
- ``"dots"`` / ``"dots_no_batch"``: keep every matmul output / those without batch dims.
- ``"every_k:<k>"``: keep only the input of every k-th block; a group of k blocks is
  recomputed as one (k=1 is ``"full"``). The layer stack groups, see ``apply_layers``.
- ``"offload:<name>,<name>"``: move the named activations to pinned host memory instead of
  recomputing them; recompute the rest.
- ``{"qkv": "save", "mlp_hidden": "offload", ...}`` or the string form
  ``"custom:qkv=save,mlp_hidden=offload"``: the named actions; untagged values and names
  not listed are recomputed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

# Names of tagged activations, shared by every model in sciscale_jax.models.
LAYER_INPUT = "layer_input"    # the residual stream entering a block
ATTN_NORM = "attn_norm"        # pre-attention normalisation output
QKV = "qkv"                    # query/key/value projections
ATTN_LOGITS = "attn_logits"    # q.k^T (+ bias), before softmax
ATTN_PROBS = "attn_probs"      # softmax output (after dropout)
ATTN_CONTEXT = "attn_context"  # probs @ v, before the output projection
ATTN_OUT = "attn_out"          # attention block output (after out projection)
MLP_NORM = "mlp_norm"          # pre-MLP normalisation output
MLP_HIDDEN = "mlp_hidden"      # MLP hidden activation (after the gate / nonlinearity)
MLP_OUT = "mlp_out"            # MLP block output
LOGITS = "logits"              # final vocabulary logits
PAIR_BIAS = "pair_bias"        # Evoformer: per-head attention bias projected from the pair
TRI_PROJ = "tri_proj"          # Evoformer: gated triangle-multiplication projections
OPM_PROJ = "opm_proj"          # Evoformer: outer-product-mean projections

CHECKPOINT_NAMES = (
    LAYER_INPUT, ATTN_NORM, QKV, ATTN_LOGITS, ATTN_PROBS, ATTN_CONTEXT,
    ATTN_OUT, MLP_NORM, MLP_HIDDEN, MLP_OUT, LOGITS, PAIR_BIAS, TRI_PROJ, OPM_PROJ,
)

# Fixed names; "every_k:<k>", "offload:<names>" and "custom:<name>=<action>,..." take arguments.
REMAT_POLICIES = ("none", "full", "selective", "dots", "dots_no_batch")
REMAT_FORMS = REMAT_POLICIES + ("every_k:<k>", "offload:<name>,...", "custom:<name>=<action>,...")
ACTIONS = ("save", "offload", "recompute")
HOST_MEMORY = "pinned_host"

# Korthikanti et al.: the attention core is large (B*H*S^2) and cheap to recompute.
SELECTIVE_RECOMPUTE = (ATTN_LOGITS, ATTN_PROBS)


class RematSpec(NamedTuple):
    """A parsed policy. ``kind`` is one of REMAT_POLICIES, "every_k", "offload" or "custom"."""
    kind: str
    every_k: int = 1
    save: frozenset = frozenset()
    offload: frozenset = frozenset()


def parse_remat(policy: str | Mapping[str, str]) -> RematSpec:
    """Parse a policy string or mapping, raising a ValueError that names any bad value."""
    if isinstance(policy, Mapping):
        return _custom_spec(dict(policy), policy)
    if not isinstance(policy, str):
        raise ValueError(f"remat policy must be a string or a mapping, got {policy!r}")
    if policy in REMAT_POLICIES:
        return RematSpec(policy)
    kind, sep, arg = policy.partition(":")
    if sep and kind == "every_k":
        if not arg.strip().isdigit() or int(arg) < 1:
            raise ValueError(f"remat policy {policy!r}: every_k needs a positive integer k, got {arg!r}")
        return RematSpec("every_k", every_k=int(arg))
    if sep and kind == "offload":
        names = [n.strip() for n in arg.split(",") if n.strip()]
        if not names:
            raise ValueError(f"remat policy {policy!r} names no activation to offload")
        return _custom_spec({n: "offload" for n in names}, policy)._replace(kind="offload")
    if sep and kind == "custom":
        actions = {}
        for item in filter(None, (s.strip() for s in arg.split(","))):
            name, eq, action = item.partition("=")
            if not eq:
                raise ValueError(f"remat policy {policy!r}: expected <name>=<action>, got {item!r}")
            actions[name.strip()] = action.strip()
        return _custom_spec(actions, policy)
    raise ValueError(f"unknown remat policy {policy!r}; known: {', '.join(REMAT_FORMS)}")


def _custom_spec(actions: dict, policy) -> RematSpec:
    bad_names = sorted(set(actions) - set(CHECKPOINT_NAMES))
    if bad_names:
        raise ValueError(f"remat policy {policy!r}: unknown checkpoint name(s) {bad_names}; "
                         f"known: {', '.join(CHECKPOINT_NAMES)}")
    bad_actions = {n: a for n, a in actions.items() if a not in ACTIONS}
    if bad_actions:
        raise ValueError(f"remat policy {policy!r}: unknown action(s) {bad_actions}; "
                         f"known: {', '.join(ACTIONS)}")
    save = frozenset(n for n, a in actions.items() if a == "save")
    offload = frozenset(n for n, a in actions.items() if a == "offload")
    return RematSpec("custom", save=save, offload=offload)


def validate_remat(name: str | Mapping[str, str], num_layers: int | None = None):
    """Return ``name`` if it is a valid remat policy (for ``num_layers`` blocks, if given).

    Raises a ValueError naming the value: an unknown policy, an unknown checkpoint name or
    action in a custom policy, or ``every_k`` not dividing the depth.
    """
    spec = parse_remat(name)
    if num_layers is not None and spec.kind == "every_k" and num_layers % spec.every_k:
        raise ValueError(f"remat policy {name!r}: every_k={spec.every_k} does not divide "
                         f"num_layers={num_layers}")
    return name


def checkpoint_policy(policy: str | Mapping[str, str]) -> Callable[..., Any] | None:
    """The ``jax.checkpoint`` policy for one block, or None where no block is checkpointed.

    "none" gives None (no checkpoint). "every_k" gives ``nothing_saveable``: it is applied to
    a group of k blocks, not to one block (see ``apply_layers``).
    """
    cp = jax.checkpoint_policies
    spec = parse_remat(policy)
    if spec.kind == "none":
        return None
    if spec.kind in ("full", "every_k"):
        return cp.nothing_saveable
    if spec.kind == "selective":
        return cp.save_from_both_policies(cp.save_any_names_but_these(*SELECTIVE_RECOMPUTE),
                                          cp.dots_with_no_batch_dims_saveable)
    if spec.kind == "dots":
        return cp.dots_saveable
    if spec.kind == "dots_no_batch":
        return cp.dots_with_no_batch_dims_saveable
    if not spec.offload:  # custom policy that only saves or recomputes
        return cp.save_only_these_names(*sorted(spec.save))
    return cp.save_and_offload_only_these_names(
        names_which_can_be_saved=sorted(spec.save), names_which_can_be_offloaded=sorted(spec.offload),
        offload_src="device", offload_dst=HOST_MEMORY)


def compiler_options(backend: str | None = None, *, frozen_weights: bool = False) -> dict:
    """XLA options under which rematerialisation holds on ``backend`` (default: JAX's).

    ``jax.checkpoint`` keeps the recomputation apart from the forward pass with optimization
    barriers. XLA's CPU pipeline expands those barriers before scheduling and common
    subexpression elimination, which then merge the recomputation back into the forward pass:
    on an unscanned layer stack every policy compiles to nearly the buffers of "none". Keeping
    the barriers (the ``cse_barrier_expander`` pass off) restores the policy. On other backends
    nothing is changed: on an H200 the policies hold under XLA's GPU defaults (full remat 0.47x
    the temporaries of none on an unscanned stack; ``benchmarks/results/activation_memory_paths_h200.json``).

    ``frozen_weights``: the model stores weights in a low-precision compute dtype (LoRA's frozen
    weights in bfloat16). XLA's CPU backend runs those dots in float32, converting each weight,
    and its loop-invariant code motion hoists the conversion of a stacked layer array out of the
    layer scan: a float32 copy of every layer's weights at once (ESM-2 15B, LoRA on one device:
    99.6 GiB). On CPU that pass is then turned off too (the conversion stays per layer).

    Pass the result to ``jax.jit(f).lower(...).compile(compiler_options)``.
    """
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return {}
    passes = "cse_barrier_expander" + (",while-loop-invariant-code-motion" if frozen_weights else "")
    return {"xla_disable_hlo_passes": passes}


def remat_block(fn: Callable, policy: str | Mapping[str, str], *, prevent_cse: bool = True,
                static_argnums: int | tuple[int, ...] = (), checkpoint: Callable = jax.checkpoint
                ) -> Callable:
    """Wrap one block's apply function so its residuals follow ``policy``.

    ``checkpoint`` is ``jax.checkpoint`` for pure functions; pass ``flax.nnx.remat`` when
    ``fn`` takes NNX modules (it splits and merges their state around the checkpoint).
    Use ``prevent_cse=False`` under ``lax.scan`` / ``nnx.scan``, which already stops CSE.
    "none" and "every_k" return ``fn`` unchanged (every_k checkpoints groups of blocks).
    """
    spec = parse_remat(policy)
    if spec.kind in ("none", "every_k"):
        return fn
    return checkpoint(fn, policy=checkpoint_policy(policy), prevent_cse=prevent_cse,
                      static_argnums=static_argnums)


def layer_group_size(policy: str | Mapping[str, str], num_layers: int) -> int:
    """How many consecutive blocks form one checkpointed group: k for every_k, else 1."""
    validate_remat(policy, num_layers)
    spec = parse_remat(policy)
    return spec.every_k if spec.kind == "every_k" else 1


def apply_layers(block_fn: Callable, x, layer_params, policy: str | Mapping[str, str], *,
                 scan: bool = True):
    """Run ``x -> block_fn(params_i, x)`` over all layers with ``policy`` applied.

    ``layer_params`` is one pytree whose leaves carry a leading ``layers`` axis (``scan``
    True) or a sequence of per-layer pytrees (``scan`` False). For "every_k:<k>" the stack
    runs as groups of k blocks, each group checkpointed as a whole; under scan this is a
    scan over groups whose body is a checkpointed scan over the k blocks of the group.
    For an NNX stack, pass the split state as ``layer_params`` and merge inside ``block_fn``.
    """
    if scan:
        num_layers = jax.tree.leaves(layer_params)[0].shape[0]
    else:
        num_layers = len(layer_params)
    k = layer_group_size(policy, num_layers)
    grouped = parse_remat(policy).kind == "every_k"
    if not scan:
        block = remat_block(block_fn, policy)
        if not grouped:
            for params in layer_params:
                x = block(params, x)
            return x
        def group(params_k, x):
            for params in params_k:
                x = block_fn(params, x)
            return x
        group = jax.checkpoint(group, policy=checkpoint_policy(policy))
        for start in range(0, num_layers, k):
            x = group(list(layer_params[start:start + k]), x)
        return x

    def scan_blocks(fn, x, params_stacked):
        return jax.lax.scan(lambda h, p: (fn(p, h), None), x, params_stacked)[0]

    if not grouped:
        return scan_blocks(remat_block(block_fn, policy, prevent_cse=False), x, layer_params)
    grouped_params = jax.tree.map(lambda a: a.reshape((num_layers // k, k) + a.shape[1:]),
                                  layer_params)
    group = jax.checkpoint(lambda params_k, h: scan_blocks(block_fn, h, params_k),
                           policy=checkpoint_policy(policy), prevent_cse=False)
    return scan_blocks(group, x, grouped_params)
