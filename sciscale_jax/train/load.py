"""A trained run back as a model: ``load_trained(recipe, run_dir)``.

A run directory holds ``run_config.json`` (the recipe, model and run settings) and Orbax
checkpoints of the whole train state. Loading rebuilds the model config and the model from
the saved settings (abstractly: no weights are initialised), reads the parameters and other
model variables of the newest readable checkpoint (or a given step) onto one device, and
returns the model with them, never reading the optimizer state. The directory is only read,
so a run may still be training in it.

Settings that only make sense on the training mesh are dropped for one device, each named in
one line: a ``sharding`` rule table, and sequence-split attention (``ring``, ``ulysses``, which
compute exact attention) becomes ``auto``. ``model_overrides`` replace settings that do not
change the parameters (``attention="chunked"`` for long inputs, ``remat``, ``dropout``); one
that does is refused in one line naming an array that differs.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sciscale_jax.train import rundir
from sciscale_jax.train.checkpoint import restore_model
from sciscale_jax.train.loop import TrainConfig, eval_batches, recipe_eval_step, validation_metrics
from sciscale_jax.train.step import TrainState, split_model
from sciscale_jax.train.validate import MESH_ATTENTION


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A model restored from a run directory, with the settings it was trained with."""

    recipe: Any                  # sciscale_jax.recipes.Recipe
    model: nnx.Module            # holds the checkpoint's parameters, on one device
    model_config: Any            # the recipe's config class, as used to build ``model``
    train_config: TrainConfig    # as saved (its mesh was the training run's)
    step: int                    # the checkpoint's step
    run_dir: pathlib.Path

    def state(self) -> TrainState:
        """The model's variables as a ``TrainState`` without optimizer state (what a recipe's
        ``report`` takes)."""
        _, params, rest = split_model(self.model)
        return TrainState(jnp.asarray(self.step, jnp.int32), params, rest, None)

    def evaluate(self, data=None) -> dict:
        """``val_<name>`` of the recipe's metrics over its evaluation batches (``data``: the
        recipe's ``build_data`` for the saved settings unless given), cut into the training
        microbatch as the training loop evaluates them."""
        if data is None:
            data = self.recipe.build_data(self.train_config, self.model_config)
        graphdef, params, rest = split_model(self.model)
        eval_fn = jax.jit(recipe_eval_step(self.recipe, graphdef))
        rows = self.train_config.batch_size // self.train_config.grad_accum
        return validation_metrics(self.recipe, eval_fn, params, rest, eval_batches(data.eval, None, self.recipe, rows))


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


def load_trained(recipe, run_dir, *, step: int | None = None, log=print, **model_overrides) -> TrainedRun:
    """The model of ``run_dir`` (trained with ``recipe``) with the weights of checkpoint ``step``
    (default: the newest readable one), on one device. See the module docstring."""
    if jax.process_count() > 1:
        raise ValueError(f"loading a trained run is for one process; this job has {jax.process_count()}")
    run_dir = pathlib.Path(run_dir)
    saved = read_run_config(run_dir)
    if saved["recipe"] != recipe.name:
        raise ValueError(f"{run_dir} holds a {saved['recipe']!r} run, not {recipe.name!r}")
    train_config = _config(TrainConfig, saved["train"], "train", run_dir)
    model_config = _config(recipe.config_class, saved["model"], "model", run_dir)
    unknown = sorted(set(model_overrides) - {f.name for f in dataclasses.fields(model_config)})
    if unknown:
        raise ValueError(f"{recipe.name} models have no setting {', '.join(unknown)}")
    model_config = dataclasses.replace(model_config, **model_overrides)
    for name, needs_mesh, value in (("sharding", lambda v: v is not None, None),
                                    ("attention", lambda v: v in MESH_ATTENTION, "auto")):
        if not needs_mesh(getattr(model_config, name, None)):
            continue
        if name in model_overrides:
            raise ValueError(f"{name}={model_overrides[name]!r} needs a mesh; a trained run loads on one device")
        log(f"{name}={getattr(model_config, name)!r} needs the training mesh; loading with {name}={value!r}")
        model_config = dataclasses.replace(model_config, **{name: value})

    abstract = nnx.eval_shape(lambda: recipe.build_model(model_config, nnx.Rngs(train_config.seed)))
    graphdef, params, rest = split_model(abstract)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    on_device = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)  # noqa: E731
    found, params, rest = restore_model(run_dir, jax.tree.map(on_device, params), jax.tree.map(on_device, rest),
                                        step, log=log)
    model = nnx.merge(graphdef, params, rest)
    return TrainedRun(recipe, model, model_config, train_config, found, run_dir)
