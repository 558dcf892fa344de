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

Adapters-only checkpoints. A LoRA run whose frozen weights are read unchanged from its
``--init-from`` (not folded; stored in 4 bits by an elementwise rule) leaves them out of its
checkpoints (``leaves_out``): a checkpoint holds the adapters, the optimizer state and the step,
as PEFT saves adapters alone, so a rank-8 run on ESM-2 15B writes megabytes per checkpoint, not
the 30 GB base. Its ``run_config.json`` records a ``fingerprint`` of the weights as read
(``FROZEN``); resuming, evaluating or starting another run from it reads them again from the same
checkpoint (``frozen_weights``, ``restore_run``; runs of runs recursively) and refuses in one line
if that checkpoint is gone or its weights are no longer the ones the run started from (a base
that moved is followed by resuming with ``--init-from`` at its new place, its fingerprint checked
there first). Parameters ``lora_train`` names train, so they are written like the adapters.
Double-quantised 4-bit scales are kept in the checkpoints (their row means are sums whose
rounding may depend on the mesh; 1/64 of the codes' bytes), so a resumed run, on any mesh,
computes with the very weights it trained with.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx, traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from sciscale_jax.models.stack import Techniques, is_lora, lora_trains, merge_lora
from sciscale_jax.pure import combine, like, partition
from sciscale_jax.quant import nf4
from sciscale_jax.train import rundir
from sciscale_jax.train.abstract import eval_shape_module
from sciscale_jax.train.checkpoint import CheckpointError, fingerprint, place_arrays, restore_model
from sciscale_jax.train.step import split_model

FROZEN = "frozen_weights"  # run_config.json: present when the run's checkpoints leave its frozen weights out
_LORA_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Techniques)  # what shapes the parameters
                  if f.name.startswith("lora_") and f.name != "lora_train"}


def _lora_layout(model: dict) -> tuple:
    """The LoRA settings of a saved model config (``Techniques``' defaults where an older run lacks them)."""
    return tuple(model.get(k, d) for k, d in _LORA_DEFAULTS.items()) if model.get("lora_rank", 0) else ()


def read_init_params(recipe, model_config, init_from: str, init_step: int, target, lora=None,
                     log=print) -> tuple[int, dict, bool]:
    """``(step, params, verbatim)``: the parameters of ``init_from``'s checkpoint ``init_step`` (0: its
    newest readable one), read onto ``target`` (ShapeDtypeStructs carrying this run's shardings);
    ``verbatim`` unless computed from what was read (adapters folded in). The other run must be of
    ``recipe``, its parameters of the same shapes and dtypes (ValueError in one line naming an
    array that differs) and, for a recipe whose vocabulary comes from its data, its tokens the same
    as ``model_config``'s. ``lora``: the predicate of what this run trains (LoRA's ``is_lora``),
    None: everything. See the module docstring for what is converted."""
    quantized = getattr(model_config, "lora_quant", "none") != "none"
    frozen = partition(target, lora)[1] if lora is not None else target  # what the checkpoint gives
    floats = nf4.float_target(frozen) if quantized else frozen
    if recipe.init_settings is not None and recipe.init_settings(init_from) is not None:
        if init_step:
            raise ValueError(f"--init-step {init_step}: --init-from {init_from} is not a sciscale run "
                             "and has no numbered checkpoints")
        return 0, place_arrays(recipe.init_params(model_config, init_from), floats, f"--init-from {init_from}"), True
    saved = rundir.saved_config(init_from)
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise ValueError(f"--init-from {init_from}: not a `sciscale train` run directory (no readable "
                         f"{rundir.CONFIG_FILE})")
    if saved.get("recipe") != recipe.name:
        raise ValueError(f"--init-from {init_from} holds a {saved.get('recipe')!r} run, not {recipe.name!r}")
    theirs = lambda: _their_config(recipe, saved, f"--init-from {init_from}")  # noqa: E731  (read where needed)
    if recipe.vocabulary is not None:  # token ids mean what they meant in the other run
        their_tokens, ours = recipe.vocabulary(theirs()), recipe.vocabulary(model_config)
        if their_tokens != ours:
            at = next((i for i, (a, b) in enumerate(zip(their_tokens, ours)) if a != b),
                      min(len(their_tokens), len(ours)))
            raise ValueError(f"--init-from {init_from}: its vocabulary ({len(their_tokens)} tokens) is not this "
                             f"run's ({len(ours)}; first difference at id {at}): {recipe.name} builds it from the "
                             "training data, so start from a run with the same data settings")
    layout = _lora_layout(saved["model"])
    if layout and layout != _lora_layout(model_config.to_dict()):  # fold the other run's adapters in
        return (*_read_merged(recipe, theirs(), init_from, init_step, floats, log), False)
    # (the whole target: a LoRA run of the same layout gives its adapters too, to train on)
    source = nf4.float_target(target) if quantized and saved["model"].get("lora_quant", "none") == "none" else target
    try:
        found, params, _ = restore_run(recipe, init_from, source, None, init_step or None, log=log,
                                       hint=_same_shapes(saved["model"], model_config), optional=lora,
                                       cast=lora is not None)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"--init-from: {err}") from None
    return found, params, True


def _same_shapes(theirs: dict, model_config) -> str:
    """What to do about a run of other shapes: the model settings (not technique switches) in
    which it differs from ``model_config`` (on the command line: flags given that contradict it)."""
    techniques = {f.name for f in dataclasses.fields(Techniques)}
    ours = model_config.to_dict()
    differ = [f"{k}={theirs[k]!r} (this run: {ours[k]!r})" for k in ours
              if k in theirs and k not in techniques and theirs[k] != ours[k]]
    if not differ:
        return "start from a run of the same model shapes"
    shown = ", ".join(differ[:6]) + (f" and {len(differ) - 6} more" if len(differ) > 6 else "")
    return f"start from a run of the same model shapes (it has {shown}: leave those model flags out)"


def _their_config(recipe, saved: dict, run_dir):
    try:
        return recipe.config_class(**saved["model"])
    except (TypeError, ValueError) as err:  # settings this version does not know or refuses
        raise ValueError(f"{run_dir}: its model settings cannot be read: {err}") from None


def _their_params(recipe, theirs) -> dict:
    """The parameters of a model of config ``theirs`` as ShapeDtypeStructs (nothing initialised)."""
    return split_model(eval_shape_module(lambda: recipe.build_model(theirs, nnx.Rngs(0))))[1]


def leaves_out(model_config):
    """The predicate on parameter key paths of what an adapters-only run of ``model_config`` leaves
    out of its checkpoints: its frozen weights but double-quantised scales (None without LoRA); what
    ``lora_train`` names trains, so it is written."""
    trains = lora_trains(model_config)
    if trains is None:
        return None
    return lambda path: not trains(path) and str(path[-1]) not in (nf4.SCALE_CODES, nf4.SCALE_ROWS)


def frozen_record(params) -> dict:
    """What ``run_config.json`` records (under ``FROZEN``) of the frozen weights a LoRA run read
    from its ``--init-from`` (``params`` as ``read_init_params`` gave them): their fingerprint."""
    return {"fingerprint": fingerprint(partition(params, is_lora)[1])}


def frozen_weights(recipe, model_config, init_from: str, init_step: int, target, record: dict, run_dir,
                   log=print) -> dict:
    """The parameters a run of ``model_config`` left out of its checkpoints (``leaves_out``), read
    again from its ``init_from`` checkpoint ``init_step`` onto ``target`` (the run's parameters as
    ShapeDtypeStructs with shardings, or arrays) and stored as the run stores them; ValueError in
    one line naming ``run_dir`` if they cannot be read or differ from what ``record`` says it read."""
    lead = f"{run_dir} keeps its frozen weights in --init-from {init_from} (checkpoint {init_step})"
    try:
        _, params, _ = read_init_params(recipe, model_config, init_from, init_step, target, is_lora, log)
    except (FileNotFoundError, ValueError, CheckpointError) as err:
        raise ValueError(f"{lead}, which cannot be read now (moved? resume with --init-from at its new place): "
                         f"{err}") from None
    got = frozen_record(params)["fingerprint"]
    if got != record.get("fingerprint"):
        raise ValueError(f"{lead}, whose weights are no longer those the run started from (fingerprint {got}, "
                         f"recorded {record.get('fingerprint')}): put that checkpoint back as it was")
    frozen = partition(params, is_lora)[1]
    if getattr(model_config, "lora_quant", "none") != "none":  # stored in 4 bits as the run stores them
        like_ = partition(target, is_lora)[1]
        frozen = jax.jit(lambda p: nf4.store(p, like_), out_shardings=jax.tree.map(lambda x: x.sharding, like_))(frozen)
    return partition(frozen, leaves_out(model_config))[0]


def restore_run(recipe, run_dir, params, rest, step: int | None = None, *, log=print,
                hint: str = "load it with the settings it was trained with", optional=None,
                cast: bool = False, base: str | None = None) -> tuple[int, dict, dict]:
    """``checkpoint.restore_model`` of a run of ``recipe``, also of one whose checkpoints leave its
    frozen weights out: those are read again from where it started (``frozen_weights``), or from
    ``base`` where that checkpoint is now (its fingerprint checked all the same), in the run's own
    dtypes and then converted to ``params``'. ``base`` for a run that holds its frozen weights is
    refused (ValueError)."""
    saved = rundir.saved_config(run_dir)
    record = saved.get(FROZEN) if isinstance(saved, dict) else None
    if not isinstance(record, dict):
        if base:
            raise ValueError(f"{run_dir} holds its frozen weights in its checkpoints: it reads no base (given {base})")
        return restore_model(run_dir, params, rest, step, log=log, hint=hint, optional=optional, cast=cast)
    theirs = _their_config(recipe, saved, run_dir)
    left_out = leaves_out(theirs)
    found, part, rest = restore_model(run_dir, params, rest, step, log=log, hint=hint, cast=cast,
                                      optional=lambda p: left_out(p) or (optional is not None and optional(p)))
    # their own parameters (dtypes as they trained), placed as ``params`` places each
    placed = traverse_util.flatten_dict(params)
    own = _their_params(recipe, theirs)
    own = traverse_util.unflatten_dict({p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placed[p].sharding)
                                        for p, x in traverse_util.flatten_dict(own).items() if p in placed})
    train = saved.get("train", {})
    if base:
        log(f"{run_dir}: frozen weights read from {base} (recorded: {train.get('init_from', '')})")
    frozen = frozen_weights(recipe, theirs, base or train.get("init_from", ""), train.get("init_step", 0), own,
                            record, run_dir, log)
    frozen = {p: x.astype(placed[p].dtype) for p, x in traverse_util.flatten_dict(frozen).items() if p in placed}
    return found, combine(part, traverse_util.unflatten_dict(frozen)), rest


def _read_merged(recipe, theirs, init_from: str, init_step: int, wanted: dict, log) -> tuple[int, dict]:
    """The LoRA run's parameters read as saved (each placed as this run places the same array,
    the rest replicated), adapters folded into their kernels, as ``wanted`` (floats)."""
    their_params = _their_params(recipe, theirs)
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
            raise ValueError(f"--init-from {init_from}: no parameter {name} in its model")
        if folded[path].shape != want.shape:
            raise ValueError(f"--init-from {init_from}: parameter {name} has shape {folded[path].shape}, this "
                             f"run's is {want.shape}: start from a run of the same model shapes")
    try:
        found, params, _ = restore_run(recipe, init_from, source, None, init_step or None, log=log,
                                       hint="start from a run of the same model shapes")
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"--init-from: {err}") from None
    fold = jax.jit(lambda p: jax.tree.map(lambda x, w: x.astype(w.dtype), like(wanted, merge_lora(p, theirs.lora_scale)),
                                          wanted), out_shardings=jax.tree.map(lambda w: w.sharding, wanted))
    log(f"--init-from {init_from}: its LoRA adapters (rank {theirs.lora_rank}) folded into the kernels")
    return found, fold(params)


def foreign_base(recipe, init_from: str) -> str | None:
    """The checkpoint of another library (``Recipe.init_settings``: ESM-2) at the root of a run's
    ``--init-from`` chain (a run started from a run started from it, ...), or None: the chain ends
    in a run trained from scratch, or at a path no longer there."""
    seen = set()
    while init_from and init_from not in seen:
        seen.add(init_from)
        if recipe.init_settings is not None and recipe.init_settings(init_from) is not None:
            return init_from
        saved = rundir.saved_config(init_from)
        init_from = (saved or {}).get("train", {}).get("init_from", "") if isinstance(saved, dict) else ""
    return None


def check_frozen_from(recipe, model_config, params, base: str, log=print) -> None:
    """ValueError in one line naming the first frozen weight of a LoRA model's ``params`` (a pure
    dict, arrays) that is not the one ``base`` gives as a run of ``model_config`` stores it (4-bit
    codes and scales compared as stored; double-quantised scale rows left out: their row means
    may round differently on another mesh). What trains (the adapters, ``lora_train``'s names) is
    not compared: the adapters are a difference to ``base`` only if the frozen rest is ``base``."""
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
    _, read, _ = read_init_params(recipe, model_config, base, 0, target, is_lora, log)
    frozen = partition(read, is_lora)[1]
    if getattr(model_config, "lora_quant", "none") != "none":
        frozen = jax.jit(lambda p: nf4.store(p, partition(target, is_lora)[1]))(frozen)
    ours = traverse_util.flatten_dict(partition(params, lora_trains(model_config))[1])
    for path, want in traverse_util.flatten_dict(frozen).items():
        if str(path[-1]) in (nf4.SCALE_CODES, nf4.SCALE_ROWS) or path not in ours:
            continue
        got = ours[path]
        if got.shape != want.shape or got.dtype != want.dtype or not bool(jax.numpy.array_equal(got, want)):
            raise ValueError(f"parameter {'/'.join(map(str, path))} is not {base}'s (the run started from a model "
                             "fine-tuned from it, or from folded adapters): its adapters alone do not give the "
                             "model; export the whole model instead")
