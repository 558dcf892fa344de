"""A trained run back as a model: ``load_trained(recipe, run_dir)``; a checkpoint of another
library a recipe reads (ESM-2) as one: ``load_checkpoint(recipe, path)``.

A run directory holds ``run_config.json`` (the recipe, model and run settings) and Orbax
checkpoints of the whole train state (a LoRA run's frozen weights may be left out of them: they
are then read again from where the run started, ``train.init_from``). Loading rebuilds the model
config and the model from the saved settings (abstractly: no weights are initialised), reads the
parameters and other model variables of the newest readable checkpoint (or a given step) onto one device, or with
``mesh="fsdp=8"`` (any mesh without a pipeline axis, whatever mesh the run trained on) straight
into their shards on that mesh, so a model too large for one device loads (in a multi-process
job every process loads its devices' shards of a mesh over all of them); it returns the model
with them, never reading the optimizer state. The directory is only read, so a run may still
be training in it.

A run that trained on the user's own data files recorded their SHA-256 (``data_files``):
evaluating it on the same paths after they changed is refused in one line (a path given
anew, ``data=...``, is the user's choice), and so is loading a run of a recipe whose
vocabulary is built from its training data (``Recipe.vocabulary``) once those
files are gone or changed.

Settings that only make sense on the training mesh are dropped, each named in one line: on one
device a ``sharding`` rule table, and on a mesh without a ``sequence`` axis sequence-split
attention (``ring``, ``ulysses``, which compute exact attention) becomes ``auto``; on a mesh the
rule table is the one the mesh's shape picks (as ``sciscale train`` picks it) unless
``sharding=`` is given. ``model_overrides`` replace settings that do not change the parameters
(``attention="chunked"`` for long inputs, ``remat``, ``dropout``); one that does is refused in
one line naming an array that differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sciscale_jax import parallel
from sciscale_jax.data import files
from sciscale_jax.parallel import dap
from sciscale_jax.train import rundir
from sciscale_jax.train.abstract import eval_shape_module
from sciscale_jax.train.checkpoint import place_arrays
from sciscale_jax.train.init_from import restore_run
from sciscale_jax.train.loop import TrainConfig, eval_batches, recipe_eval_step, validation_metrics
from sciscale_jax.train.sharding import pick_strategy
from sciscale_jax.train.step import TrainState, split_model, with_shardings
from sciscale_jax.train.validate import MESH_ATTENTION


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A model restored from a run directory, with the settings it was trained with."""

    recipe: Any                  # sciscale_jax.recipes.Recipe
    model: nnx.Module            # holds the checkpoint's parameters, on one device or sharded over ``mesh``
    model_config: Any            # the recipe's config class, as used to build ``model``
    train_config: TrainConfig    # as saved (its mesh was the training run's)
    step: int                    # the checkpoint's step
    run_dir: pathlib.Path
    mesh: jax.sharding.Mesh | None = None  # where the parameters are sharded by ``model_config.sharding``'s
                                           # rule table (None: one device)
    data_files: dict = dataclasses.field(default_factory=dict)  # {path: sha256} of the user's data files
                                                                # the run trained on (empty: shipped data)
    data_as_saved: bool = False  # no "data" setting overridden: build_data reads the recorded files

    def on_mesh(self):
        """A context in which the model's activation constraints apply (``jax.set_mesh(self.mesh)``;
        nothing on one device). Outside it the sharded model still runs: XLA then places the
        activations itself."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def data_stats(self) -> dict | None:
        """What the run saved of its training data beside its checkpoints (``Data.stats``, e.g.
        weather-vit's normalization: ``data_stats.npz``), or None where it saved none."""
        return rundir.read_data_stats(self.run_dir)

    def state(self) -> TrainState:
        """The model's variables as a ``TrainState`` without optimizer state (what a recipe's
        ``report`` takes)."""
        _, params, rest = split_model(self.model)
        return TrainState(jnp.asarray(self.step, jnp.int32), params, rest, None)

    def evaluate(self, data=None) -> dict:
        """``val_<name>`` of the recipe's metrics over its evaluation batches (``data``: the
        recipe's ``build_data`` for the saved settings unless given), cut into the training
        microbatch as the training loop evaluates them (on a mesh, each piece split over its data
        axes by the recipe's batch axes)."""
        if data is None:
            data = self.build_data()
        graphdef, params, rest = split_model(self.model)
        rows = self.train_config.batch_size // self.train_config.grad_accum
        place = None if self.mesh is None else _EvalPlacement(self.mesh, parallel.rules_for(self.model_config.sharding))
        with self.on_mesh():
            eval_fn = jax.jit(recipe_eval_step(self.recipe, graphdef))
            return validation_metrics(self.recipe, eval_fn, params, rest,
                                      eval_batches(data.eval, place, self.recipe, rows))

    def with_batches(self, batch_size: int | None = None, seq_len: int | None = None) -> "TrainedRun":
        """This run, evaluated (``evaluate``, ``build_data``) in batches of ``batch_size`` rows of
        ``seq_len`` (the recipe's sequence length or crop) instead of the training run's, one
        microbatch per batch (None: as trained); ValueError in one line for a value that is not a
        positive integer or a sequence longer than the model takes."""
        changes = {k: v for k, v in (("batch_size", batch_size), ("seq_len", seq_len)) if v is not None}
        if not changes:
            return self
        for name, value in changes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        max_len = getattr(self.model_config, "max_len", None)
        if seq_len is not None and max_len is not None and seq_len > max_len:
            raise ValueError(f"seq_len={seq_len} exceeds the model's max_len={max_len}")
        train_config = dataclasses.replace(self.train_config, grad_accum=1, **changes)
        return dataclasses.replace(self, train_config=train_config)

    def build_data(self):
        """The recipe's data for the run's settings; ValueError in one line if a file the run
        trained on is read again but its bytes have changed since."""
        if self.data_as_saved and self.recipe.data_files_are_bytes:
            changed = files.changed(self.data_files)  # before reading: a changed corpus is not packed to be refused
            if changed:
                raise ValueError(f"{self.run_dir} trained on other data: {'; '.join(changed)}")
        data = self.recipe.build_data(self.train_config, self.model_config)
        changed = files.changed(self.data_files, data.sources)
        if changed:
            raise ValueError(f"{self.run_dir} trained on other data: {'; '.join(changed)}")
        return data


@dataclasses.dataclass(frozen=True)
class _EvalPlacement:
    """What ``eval_batches`` reads of a training ``Placement``: the mesh and the rule table."""

    mesh: jax.sharding.Mesh
    rules: tuple


def read_run_config(run_dir) -> dict:
    """The saved ``run_config.json`` of ``run_dir``; ValueError in one line if there is none."""
    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not a directory (pass the --out of a `sciscale train` run)")
    saved = rundir.saved_config(run_dir)
    if not isinstance(saved, dict) or not {"recipe", "model", "train"} <= set(saved):
        raise ValueError(f"{run_dir} has no readable {rundir.CONFIG_FILE} with recipe, model and train settings; "
                         "it is not a `sciscale train` run directory")
    return saved


def _config(cls, saved: dict, what: str, run_dir):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(saved) - names)
    if unknown:
        raise ValueError(f"{run_dir}/{rundir.CONFIG_FILE} has {what} settings this version does not know: "
                         f"{', '.join(unknown)}")
    return cls(**saved)  # fields added since the run was saved take their defaults


def load_trained(recipe, run_dir, *, step: int | None = None, mesh: str | None = None, log=print,
                 base: str | None = None, **model_overrides) -> TrainedRun:
    """The model of ``run_dir`` (trained with ``recipe``) with the weights of checkpoint ``step``
    (default: the newest readable one), on one device or, with ``mesh`` (``"fsdp=4,tensor=2"``),
    sharded over that mesh. ``base``: where the checkpoint an adapters-only LoRA run keeps its
    frozen weights in is now, if not where the run recorded it (read-only: the run is not
    changed; its fingerprint must match). See the module docstring."""
    mesh_config = _mesh_config(mesh, "a trained run")
    run_dir = pathlib.Path(run_dir)
    saved = read_run_config(run_dir)
    if saved["recipe"] != recipe.name:
        raise ValueError(f"{run_dir} holds a {saved['recipe']!r} run, not {recipe.name!r}")
    train_config = _config(TrainConfig, saved["train"], "train", run_dir)
    model_config = _config(recipe.config_class, saved["model"], "model", run_dir)
    data_files = saved.get("data_files") or {}
    changed = files.changed(data_files) if recipe.vocabulary is not None else []
    if changed:
        raise ValueError(f"{recipe.name} builds its vocabulary from the training data, which is not as {run_dir} "
                         f"trained on it: {'; '.join(changed)}")
    unknown = sorted(set(model_overrides) - {f.name for f in dataclasses.fields(model_config)})
    if unknown:
        raise ValueError(f"{recipe.name} models have no setting {', '.join(unknown)}")
    data_as_saved = all(model_overrides[f.name] == getattr(model_config, f.name)
                        for f in dataclasses.fields(model_config)
                        if f.metadata.get("group") == "data" and f.name in model_overrides)
    model_config = _settings_for_mesh(dataclasses.replace(model_config, **model_overrides), model_overrides,
                                      mesh_config, mesh, log)
    if mesh_config is not None:
        dap.check_dap(mesh_config.sizes(), getattr(model_config, "attention", "xla"),
                      getattr(model_config, "supports_dap", False), f"{recipe.name} model")

    build = lambda: recipe.build_model(model_config, nnx.Rngs(train_config.seed))  # noqa: E731
    read = lambda params, rest: restore_run(recipe, run_dir, params, rest, step, log=log, base=base)  # noqa: E731
    model, found, device_mesh = _placed_model(build, model_config, mesh_config, mesh, read)
    return TrainedRun(recipe, model, model_config, train_config, found, run_dir, device_mesh, data_files,
                      data_as_saved)


def load_checkpoint(recipe, path, *, mesh: str | None = None, log=print, **model_overrides) -> TrainedRun:
    """The model of a checkpoint of another library that ``recipe`` reads (``Recipe.init_settings``;
    protein-mlm: an ESM-2 folder in Hugging Face's layout), as :func:`load_trained` loads a run:
    on one device or sharded over ``mesh``, each array read and placed on its own. Its
    ``train_config`` is the defaults, its ``step`` 0. ``model_overrides`` as there; the settings
    the checkpoint fixes cannot be overridden."""
    fixed = recipe.init_settings(path) if recipe.init_settings is not None else None
    if fixed is None:
        raise ValueError(f"{path}: not a checkpoint {recipe.name} reads")
    clash = sorted(k for k in model_overrides if k in fixed and model_overrides[k] != fixed[k])
    if clash:
        raise ValueError(f"{path} fixes {', '.join(f'{k}={fixed[k]!r}' for k in clash)}")
    mesh_config = _mesh_config(mesh, "a checkpoint")
    model_config = _settings_for_mesh(recipe.make_config(**{**fixed, **model_overrides}), model_overrides,
                                      mesh_config, mesh, log)
    train_config = TrainConfig(**recipe.train_defaults)
    build = lambda: recipe.build_model(model_config, nnx.Rngs(train_config.seed))  # noqa: E731

    def read(params, rest):  # the parameters from the checkpoint; the other variables as built
        rest = jax.jit(lambda: split_model(build())[2], out_shardings=jax.tree.map(lambda x: x.sharding, rest))()
        return 0, place_arrays(recipe.init_params(model_config, path), params, str(path)), rest

    model, _, device_mesh = _placed_model(build, model_config, mesh_config, mesh, read)
    return TrainedRun(recipe, model, model_config, train_config, 0, pathlib.Path(path), device_mesh)


def _placed_model(build, model_config, mesh_config, mesh: str | None, read):
    """``(model, step, device mesh)``: ``build``'s model (built abstractly) with the variables
    ``read(params, rest)`` returns as ``(step, params, rest)`` onto targets carrying their
    shardings: one device, or ``mesh_config``'s mesh by ``model_config.sharding``'s rules."""
    abstract = eval_shape_module(build)
    graphdef, params, rest = split_model(abstract)
    device_mesh = None
    if mesh_config is None:
        param_sh = rest_sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    else:
        device_mesh = parallel.make_mesh(mesh_config)
        rules = parallel.rules_for(model_config.sharding)
        try:
            param_sh = parallel.train_shardings(params, parallel.param_axes(abstract), rules, device_mesh, 0).params
        except ValueError as err:  # a size that does not split over the mesh
            raise ValueError(f"loading onto mesh={mesh!r}: {err}") from None
        rest_sh = jax.sharding.NamedSharding(device_mesh, jax.sharding.PartitionSpec())
    found, params, rest = read(with_shardings(params, param_sh), with_shardings(rest, rest_sh))
    return nnx.merge(graphdef, params, rest), found, device_mesh


def _settings_for_mesh(model_config, overrides: dict, mesh_config, mesh: str | None, log):
    """``model_config`` with the settings of the training mesh that the mesh loaded onto
    (``mesh_config``, None: one device) cannot take replaced, one line through ``log`` each: the
    rule table becomes the one this mesh picks (None on one device), sequence-split attention
    without a ``sequence`` axis ``auto``. A replacement asked for in ``overrides`` that this mesh
    cannot take is a ValueError."""
    sizes = mesh_config.sizes() if mesh_config is not None else {}
    if mesh_config is not None and overrides.get("sharding") is None:
        picked = pick_strategy(mesh_config)  # the saved table was the training mesh's
        if model_config.sharding not in (None, picked):
            log(f"sharding={model_config.sharding!r} was for the training mesh; loading onto mesh={mesh!r} "
                f"with sharding={picked!r}")
        model_config = dataclasses.replace(model_config, sharding=picked)

    def missing(name, value):  # what this setting needs that the mesh loaded onto lacks, or None
        if name == "sharding":
            return "a mesh (mesh=..., --mesh on the command line)" if value is not None and not sizes else None
        axis = MESH_ATTENTION.get(value)
        return f"a mesh with a {axis} axis" if axis is not None and sizes.get(axis, 1) == 1 else None

    for name, fallback in (("sharding", None), ("attention", "auto")):
        needs = missing(name, getattr(model_config, name, None))
        if needs is None:
            continue
        if name in overrides:
            raise ValueError(f"{name}={overrides[name]!r} needs {needs}; loading onto "
                             + (f"mesh={mesh!r}" if sizes else "one device"))
        log(f"{name}={getattr(model_config, name)!r} needs the training mesh; loading with {name}={fallback!r}")
        model_config = dataclasses.replace(model_config, **{name: fallback})
    return model_config


def _mesh_config(mesh: str | None, what: str) -> parallel.ParallelConfig | None:
    """The mesh ``what`` loads onto (None: one device), resolved against this machine's devices
    (ValueError, one line; a multi-process job needs one over all its devices)."""
    if jax.process_count() > 1 and not mesh:
        raise ValueError(f"a job of {jax.process_count()} processes loads {what} onto a mesh over all its "
                         f"{jax.device_count()} devices: pass mesh=..., e.g. mesh='fsdp={jax.device_count()}'")
    if not mesh:
        return None
    config = parallel.ParallelConfig.parse(mesh).resolve(jax.device_count())
    if config.pipeline > 1:
        raise ValueError(f"mesh={mesh!r}: a trained run loads onto data, fsdp, dap, sequence and tensor axes, "
                         "not a pipeline axis (pipelining is for training); use fsdp=N to split the weights")
    return config
