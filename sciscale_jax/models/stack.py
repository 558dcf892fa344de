"""The technique switches every model shares, and the one layer stack that applies them.

``Techniques`` is a frozen dataclass of the switches that apply to any model family: the
remat policy (``sciscale_jax.remat``), layer scan, attention implementation
(``sciscale_jax.attention``), precision policy (``sciscale_jax.precision``), QAT scheme
(``sciscale_jax.quant``), the rule table for activation sharding constraints
(``sciscale_jax.parallel``) and LoRA fine-tuning (``lora_rank``: adapters on the dense layers
``lora_targets`` names, every other parameter frozen, the blocks' dense weights stored in 4 bits
under ``lora_quant="nf4"``; a model family without adapters keeps
``supports_lora = False`` and refuses the switch). A model config embeds it by inheriting from
it, so its fields are keyword-only fields of the model config (``TransformerConfig(vocab_size=32,
remat="full")``) and the CLI lists them with the model's own flags.

``stack_layers`` builds ``num_layers`` blocks and ``run_layers`` runs them under those
switches: stacked (``nnx.vmap``) and run by ``lax.scan`` when ``scan_layers``, else an
``nnx.List`` run by a Python loop; every
remat policy, ``every_k:<k>`` grouping included, is applied by ``remat.apply_layers`` to
the block's pure function (the block's state is split out of NNX and merged back inside
the checkpointed function), so the policy has the same meaning on both paths. A block is
any NNX module called as ``block(carry, *args, key) -> carry``; the carry may be a tuple
(the Evoformer carries the MSA and pair representations).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from sciscale_jax import _validate, attention, parallel, remat
from sciscale_jax.models.layers import LORA_SUFFIX
from sciscale_jax.parallel import axes as ax
from sciscale_jax.precision.policy import POLICIES, get_policy
from sciscale_jax.quant import nf4
from sciscale_jax.quant.registry import QUANT_SCHEMES, make_matmul


def _choices(names):
    return {"choices": tuple(names)}


LORA_TARGETS = ("attention", "all")  # the attention projections; those and the MLP's
LORA_QUANT = ("none", "nf4", "nf4-dq")  # how the blocks' frozen dense weights are stored (QLoRA: nf4;
                                        # nf4-dq: its scales double-quantised)
LORA_PARAMS = ("lora_a", "lora_b")   # the names of a LoRA adapter's two factors (models.layers.Dense)


def is_lora(path) -> bool:
    """Whether the parameter at key ``path`` (a tuple of keys or ``jax.tree_util`` key entries) is a
    LoRA factor: under ``lora_rank`` > 0 these alone train."""
    if not path:
        return False
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last))) in LORA_PARAMS


@dataclasses.dataclass(frozen=True, kw_only=True)
class Techniques:
    """Technique switches shared by every model family (all keyword-only)."""

    remat: str = dataclasses.field(default="none", metadata={
        "help": f"remat policy: {', '.join(remat.REMAT_FORMS)}"})
    scan_layers: bool = dataclasses.field(default=False, metadata={
        "help": "stack the blocks and run them with lax.scan (compile time flat in depth)"})
    attention: str = dataclasses.field(default="xla", metadata={
        "help": "attention implementation (sciscale_jax.attention)", "choices": lambda: attention.config_impls()})
    precision: str = dataclasses.field(default="fp32", metadata=_choices(POLICIES))
    quant: str = dataclasses.field(default="none", metadata=_choices(QUANT_SCHEMES))
    sharding: str | None = dataclasses.field(default=None, metadata={
        "group": "distribution", "help": "rule table for parameters and activations (dp fsdp tp tp_sp tp2d "
                                         "fsdp_tp); None: picked from the mesh"})
    lora_rank: int = dataclasses.field(default=0, metadata={
        "group": "fine-tuning", "help": "LoRA: train rank-r adapters on the dense layers --lora-targets names and "
        "freeze every other parameter (no gradient, no optimizer state, stored in the compute dtype); 0: off"})
    lora_alpha: float = dataclasses.field(default=8.0, metadata={
        "group": "fine-tuning", "help": "LoRA: an adapter's output is scaled by lora_alpha / lora_rank"})
    lora_targets: str = dataclasses.field(default="attention", metadata={
        "group": "fine-tuning", "choices": LORA_TARGETS,
        "help": "LoRA: the attention projections (query, key, value, output) or all of the blocks' dense layers"})
    lora_train: str = dataclasses.field(default="", metadata={
        "group": "fine-tuning", "help": "LoRA: also train these parameters beside the adapters, kept in "
        "param_dtype: module or parameter names, comma-separated (e.g. lm_head, lead_embed, final_norm; PEFT's "
        "modules_to_save); empty: the adapters alone"})
    lora_quant: str = dataclasses.field(default="none", metadata={
        "group": "fine-tuning", "choices": LORA_QUANT,
        "help": "LoRA: nf4 stores every frozen dense weight of the blocks in 4-bit NormalFloat (QLoRA; "
                "dequantised as each layer runs); none: in the compute dtype"})
    dtype: Any = dataclasses.field(default="float32", metadata={"cli": False})        # compute dtype
    param_dtype: Any = dataclasses.field(default="float32", metadata={"cli": False})
    supports_lora: ClassVar[bool] = False  # the model family builds LoRA adapters (lora_rank > 0)

    def __post_init__(self):
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"scan_layers={self.scan_layers!r} must be a bool")
        remat.validate_remat(self.remat, getattr(self, "num_layers", None))
        attention.validate_impl(self.attention)
        if self.sharding is not None:
            parallel.rules_for(self.sharding)
        make_matmul(self.quant, self.precision)  # ValueError: unknown names, quant with fp8
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"lora_rank={self.lora_rank!r} must be an int >= 0 (0: no LoRA)")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha={self.lora_alpha!r} must be a finite number > 0")
        if self.lora_targets not in LORA_TARGETS:
            raise ValueError(f"lora_targets={self.lora_targets!r} must be one of {', '.join(LORA_TARGETS)}")
        if self.lora_quant not in LORA_QUANT:
            raise ValueError(f"lora_quant={self.lora_quant!r} must be one of {', '.join(LORA_QUANT)}")
        names = self.lora_train.split(",") if isinstance(self.lora_train, str) and self.lora_train else []
        if not isinstance(self.lora_train, str) or not all(n.strip().isidentifier() for n in names):
            raise ValueError(f"lora_train={self.lora_train!r} must name parameters or modules, comma-separated")
        if names and not self.lora_rank:
            raise ValueError(f"lora_train={self.lora_train!r} trains parameters beside LoRA's adapters: it needs "
                             "lora_rank > 0 (without LoRA every parameter trains)")
        if self.lora_quant != "none" and not self.lora_rank:
            raise ValueError(f"lora_quant={self.lora_quant!r} stores LoRA's frozen weights: it needs lora_rank > 0")
        if self.lora_quant != "none" and (self.quant != "none" or get_policy(self.precision).fp8):
            raise ValueError(f"lora_quant={self.lora_quant!r} takes no other weight quantisation (quant="
                             f"{self.quant!r}, precision={self.precision!r}): the frozen weights are already 4-bit")
        # (the bare switches describe no model: a LoRA Transformer config's ``techniques`` are such)
        if self.lora_rank and not self.supports_lora and type(self) is not Techniques:
            raise ValueError(f"lora_rank={self.lora_rank}: {type(self).__name__} has no LoRA adapters (the "
                             "Transformer families and the weather ViT have them)")
        if self.precision != "fp32":  # a non-default policy decides the dtypes
            policy = get_policy(self.precision)
            object.__setattr__(self, "dtype", policy.compute_dtype)
            object.__setattr__(self, "param_dtype", policy.param_dtype)
        for name in ("dtype", "param_dtype"):  # by name, so configs compare and serialise
            object.__setattr__(self, name, _validate.float_dtype(getattr(self, name), name))

    @property
    def lora_scale(self) -> float:
        """The factor on a LoRA adapter's output (alpha / rank)."""
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    @property
    def lora_train_names(self) -> tuple[str, ...]:
        """The names ``lora_train`` gives (stripped)."""
        return tuple(n.strip() for n in self.lora_train.split(",")) if self.lora_train else ()

    @property
    def techniques(self) -> Techniques:
        """The technique switches alone (for a config that embeds them)."""
        return Techniques(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Techniques)})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def technique_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(Techniques))


def lora_trains(config) -> Callable | None:
    """The predicate on parameter key paths of what a run of ``config`` trains under LoRA: the
    adapters' factors (``is_lora``) and every parameter under a key ``lora_train`` names; None
    without LoRA (everything trains)."""
    if not getattr(config, "lora_rank", 0):
        return None
    names = frozenset(getattr(config, "lora_train_names", ()))
    if not names:
        return is_lora
    return lambda path: is_lora(path) or any(str(getattr(k, "key", getattr(k, "name", k))) in names for k in path)


def check_lora_train(config, params: dict) -> None:
    """ValueError in one line if a name ``lora_train`` gives matches no parameter of ``params`` (a
    model's parameter tree) or matches a 4-bit weight (codes cannot train)."""
    flat = traverse_util.flatten_dict(params)
    for name in getattr(config, "lora_train_names", ()):
        hit = [p for p in flat if name in map(str, p)]
        if not hit:
            tops = sorted({str(p[0]) for p in flat})
            raise ValueError(f"lora_train: no parameter or module named {name!r} (the model's modules: "
                             f"{', '.join(tops)})")
        stored = [p for p in hit if str(p[-1]) in (nf4.CODES, nf4.SCALES, nf4.SCALE_CODES, nf4.SCALE_ROWS)]
        if stored:
            raise ValueError(f"lora_train: {name!r} names {'/'.join(map(str, stored[0][:-1]))}, stored in 4 bits "
                             f"under lora_quant={config.lora_quant!r}: 4-bit weights cannot train")


def store_frozen(module: nnx.Module, dtype, trains: Callable = is_lora) -> None:
    """Under LoRA: every float parameter of ``module`` but what trains (``trains``: the adapters'
    factors, and what ``lora_train`` names: ``lora_trains``) cast to ``dtype`` (the compute dtype),
    in place. A frozen weight is never updated, so it needs no higher-precision master copy (4-bit
    codes stay as they are)."""
    for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        if not trains(path) and jnp.issubdtype(variable.get_value().dtype, jnp.floating):
            variable.set_value(variable.get_value().astype(dtype))


def merge_lora(params: dict, scale: float) -> dict:
    """A pure parameter dict (``nnx.to_pure_dict``'s form) of a LoRA model with each adapter folded
    into the weight it adapts (a ``Dense`` layer's kernel, or ``<weight>`` beside a ``<weight>_lora``
    ``LoraAdapter``), ``W + scale * A B`` in float32 (W dequantised from 4 bits
    under ``lora_quant="nf4"``), and the adapters gone; 4-bit kernels without an adapter are
    dequantised too. The result has the parameters of the same model without LoRA (kernels in
    float32; cast them to that model's dtypes). Stacked layers (a leading ``layers`` axis) fold
    layer by layer."""
    flat = traverse_util.flatten_dict(params, keep_empty_nodes=True)
    for at in {p[:-1] for p in flat if p[-1] == nf4.CODES}:  # the frozen weights as floats
        flat[at + (nf4.FLOAT,)] = nf4.pop_float(flat, at)
    for at in {p[:-1] for p in flat if p[-1] == LORA_PARAMS[0]}:
        a, b = flat.pop(at + (LORA_PARAMS[0],)), flat.pop(at + (LORA_PARAMS[1],))
        name = str(at[-1])
        if name.endswith(LORA_SUFFIX):  # a LoraAdapter beside the weight it adapts
            target = at[:-1] + (name[:-len(LORA_SUFFIX)],)
        else:                           # Dense: the adapter in the layer, beside its kernel
            target = at + (nf4.FLOAT,)
        w = flat[target]
        lead = a.ndim + b.ndim - w.ndim - 2  # stacked-layer axes: a [lead, in..., r], b [lead, r, out...]
        a2 = a.reshape(*a.shape[:lead], -1, a.shape[-1]).astype(jnp.float32)
        b2 = b.reshape(*b.shape[:lead + 1], -1).astype(jnp.float32)
        delta = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(w.shape)
        flat[target] = w.astype(jnp.float32) + scale * delta
    return traverse_util.unflatten_dict(flat)


def without_lora(model: nnx.Module) -> nnx.Module:
    """A LoRA model as the same model without adapters, each folded into its kernel
    (:func:`merge_lora`); parameters in the plain model's dtypes, its other variables as they were.
    For export or evaluation elsewhere; the LoRA model is left as it is."""
    cfg = model.config
    if not getattr(cfg, "lora_rank", 0):
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to merge (lora_rank=0)")
    plain_cfg = dataclasses.replace(cfg, lora_rank=0, lora_quant="none", lora_train="")
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: type(model)(plain_cfg, rngs=nnx.Rngs(0))))
    merged = traverse_util.flatten_dict(merge_lora(nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg.lora_scale))
    others = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))))
    wanted = traverse_util.flatten_dict(nnx.to_pure_dict(abstract))
    values = {p: jnp.asarray(merged[p] if p in merged else others[p]).astype(w.dtype) for p, w in wanted.items()}
    nnx.replace_by_pure_dict(abstract, traverse_util.unflatten_dict(values))
    return nnx.merge(graphdef, abstract)


def stack_layers(make_block: Callable[[nnx.Rngs], nnx.Module], num_layers: int, techniques: Techniques, *,
                 rngs: nnx.Rngs):
    """``num_layers`` blocks from ``make_block(rngs)``: one module whose variables carry a leading
    ``layers`` axis (``techniques.scan_layers``), else an ``nnx.List`` of blocks."""
    remat.validate_remat(techniques.remat, num_layers)
    if techniques.scan_layers:
        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: ax.LAYERS})
        def make_stacked(rngs):
            return make_block(rngs)

        return make_stacked(rngs)
    return nnx.List([make_block(rngs) for _ in range(num_layers)])


def run_layers(layers, carry, *args, policy="none", keys=None, apply=None):
    """``carry`` through every block of ``layers`` (from ``stack_layers``) under remat ``policy``.

    Each block is called as ``apply(block, carry, *args, key)`` (default: ``block(carry, *args,
    key)``); ``keys`` is None or an array of one key per layer. Stacked layers run under
    ``lax.scan``; a list runs as a Python loop.
    """
    if isinstance(layers, nnx.List) and len(layers) == 0:
        return carry
    apply = apply or (lambda block, c, *a: block(c, *a))
    scan = not isinstance(layers, nnx.List)
    if scan:
        graphdef, state = nnx.split(layers)
        num_layers = jax.tree.leaves(state)[0].shape[0]
        layer_params = (state, keys)
    else:
        graphdefs, states = zip(*(nnx.split(b) for b in layers))
        graphdef, num_layers = graphdefs[0], len(states)
        if any(g != graphdef for g in graphdefs[1:]):
            raise ValueError("the blocks of a layer stack must share one structure")
        layer_params = [(s, None if keys is None else keys[i]) for i, s in enumerate(states)]
    if keys is not None and len(keys) != num_layers:
        raise ValueError(f"got {len(keys)} layer keys for {num_layers} layers")

    def block_fn(state_key, x):
        state, key = state_key
        return apply(nnx.merge(graphdef, state), x, *args, key)

    return remat.apply_layers(block_fn, carry, layer_params, policy, scan=scan)


def layer_keys(key, num_layers: int, active: bool = True):
    """One dropout key per layer, or None when there is no key or dropout is off."""
    if key is None or not active:
        return None
    return jax.random.split(key, num_layers)
