"""``--init-from``: a run's parameters read from another run's checkpoint or another library's.

``read_init_params`` reads them straight onto the run's placement (each device its shards):

- a checkpoint of another library the recipe reads (``Recipe.init_settings``: protein-mlm's
  ESM-2), array by array;
- a sciscale run of the same recipe and vocabulary, the model's shapes and dtypes;
- under LoRA (``lora_rank``), the frozen weights alone (new adapters start fresh), converted to the
  run's dtype; under ``lora_quant="nf4"`` the blocks' kernels are read as floats and the init
  program stores them in 4 bits (``quant.nf4.store``);
- a LoRA run into a run whose adapters differ (none, another rank, targets or storage): the other
  run's parameters as saved, each adapter folded into its kernel (``models.stack.merge_lora``),
  so a LoRA run can be fine-tuned further in full or with fresh adapters.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx, traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from sciscale_jax.models.stack import Techniques, merge_lora
from sciscale_jax.pure import like, partition
from sciscale_jax.quant import nf4
from sciscale_jax.train import rundir
from sciscale_jax.train.abstract import eval_shape_module
from sciscale_jax.train.checkpoint import place_arrays, restore_model
from sciscale_jax.train.step import split_model

_LORA_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Techniques) if f.name.startswith("lora_")}


def _lora_layout(model: dict) -> tuple:
    """The LoRA settings of a saved model config (``Techniques``' defaults where an older run lacks them)."""
    return tuple(model.get(k, d) for k, d in _LORA_DEFAULTS.items()) if model.get("lora_rank", 0) else ()


def read_init_params(recipe, model_config, cfg, target, lora=None, log=print) -> tuple[int, dict]:
    """``(step, params)`` of ``cfg.init_from``'s checkpoint ``cfg.init_step`` (0: its newest
    readable one), read onto ``target`` (ShapeDtypeStructs carrying this run's shardings); the
    other run must be of ``recipe``, its parameters of the same shapes and dtypes (ValueError in
    one line naming an array that differs) and, for a recipe whose vocabulary comes from its data,
    its tokens the same as ``model_config``'s. ``lora``: the predicate of what this run trains
    (LoRA's ``is_lora``), None: everything. See the module docstring for what is converted."""
    quantized = getattr(model_config, "lora_quant", "none") != "none"
    frozen = partition(target, lora)[1] if lora is not None else target  # what the checkpoint gives
    floats = nf4.float_target(frozen) if quantized else frozen
    if recipe.init_settings is not None and recipe.init_settings(cfg.init_from) is not None:
        if cfg.init_step:
            raise ValueError(f"--init-step {cfg.init_step}: --init-from {cfg.init_from} is not a sciscale run "
                             "and has no numbered checkpoints")
        return 0, place_arrays(recipe.init_params(model_config, cfg.init_from), floats, f"--init-from {cfg.init_from}")
    saved = rundir.saved_config(cfg.init_from)
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise ValueError(f"--init-from {cfg.init_from}: not a `sciscale train` run directory (no readable "
                         f"{rundir.CONFIG_FILE})")
    if saved.get("recipe") != recipe.name:
        raise ValueError(f"--init-from {cfg.init_from} holds a {saved.get('recipe')!r} run, not {recipe.name!r}")

    def their_config():
        try:
            return recipe.config_class(**saved["model"])
        except (TypeError, ValueError) as err:  # settings this version does not know or refuses
            raise ValueError(f"--init-from {cfg.init_from}: its model settings cannot be read: {err}") from None

    if recipe.vocabulary is not None:  # token ids mean what they meant in the other run
        their_tokens, ours = recipe.vocabulary(their_config()), recipe.vocabulary(model_config)
        if their_tokens != ours:
            at = next((i for i, (a, b) in enumerate(zip(their_tokens, ours)) if a != b),
                      min(len(their_tokens), len(ours)))
            raise ValueError(f"--init-from {cfg.init_from}: its vocabulary ({len(their_tokens)} tokens) is not this "
                             f"run's ({len(ours)}; first difference at id {at}): {recipe.name} builds it from the "
                             "training data, so start from a run with the same data settings")
    layout = _lora_layout(saved["model"])
    if layout and layout != _lora_layout(model_config.to_dict()):  # fold the other run's adapters in
        return _read_merged(recipe, their_config(), cfg, floats, log)
    # (the whole target: a LoRA run of the same layout gives its adapters too, to train on)
    source = nf4.float_target(target) if quantized and saved["model"].get("lora_quant", "none") == "none" else target
    try:
        found, params, _ = restore_model(cfg.init_from, source, None, cfg.init_step or None, log=log,
                                         hint="start from a run of the same model shapes", optional=lora,
                                         cast=lora is not None)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"--init-from: {err}") from None
    return found, params


def _read_merged(recipe, theirs, cfg, wanted: dict, log) -> tuple[int, dict]:
    """The LoRA run's parameters read as saved (each placed as this run places the same array,
    the rest replicated), adapters folded into their kernels, as ``wanted`` (floats)."""
    _, their_params, _ = split_model(eval_shape_module(lambda: recipe.build_model(theirs, nnx.Rngs(0))))
    ours = traverse_util.flatten_dict(wanted)
    some = next(iter(ours.values())).sharding
    whole = NamedSharding(some.mesh, P()) if isinstance(some, NamedSharding) else some

    def placed(path, leaf):
        mine = ours.get(path[:-1] + (nf4.FLOAT,)) if path[-1] in (nf4.CODES, nf4.SCALES) else ours.get(path)
        if mine is not None and mine.shape == leaf.shape:
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=mine.sharding)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=whole)

    source = traverse_util.unflatten_dict({p: placed(p, x) for p, x in traverse_util.flatten_dict(their_params).items()})
    folded = traverse_util.flatten_dict(jax.eval_shape(lambda p: merge_lora(p, theirs.lora_scale), source))
    for path, want in ours.items():  # before reading anything
        name = "/".join(map(str, path))
        if path not in folded:
            raise ValueError(f"--init-from {cfg.init_from}: no parameter {name} in its model")
        if folded[path].shape != want.shape:
            raise ValueError(f"--init-from {cfg.init_from}: parameter {name} has shape {folded[path].shape}, this "
                             f"run's is {want.shape}: start from a run of the same model shapes")
    try:
        found, params, _ = restore_model(cfg.init_from, source, None, cfg.init_step or None, log=log,
                                         hint="start from a run of the same model shapes")
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"--init-from: {err}") from None
    fold = jax.jit(lambda p: jax.tree.map(lambda x, w: x.astype(w.dtype), like(wanted, merge_lora(p, theirs.lora_scale)),
                                          wanted), out_shardings=jax.tree.map(lambda w: w.sharding, wanted))
    log(f"--init-from {cfg.init_from}: its LoRA adapters (rank {theirs.lora_rank}) folded into the kernels")
    return found, fold(params)
