"""One file per `sciscale train` recipe."""

import pathlib

from sciscale_jax.recipes.base import Data, Recipe
from sciscale_jax.recipes.msa_evoformer import RECIPE as MSA_EVOFORMER
from sciscale_jax.recipes.protein_mlm import RECIPE as PROTEIN_MLM
from sciscale_jax.recipes.smiles_lm import RECIPE as SMILES_LM
from sciscale_jax.recipes.weather_vit import RECIPE as WEATHER_VIT

RECIPES = {r.name: r for r in (PROTEIN_MLM, MSA_EVOFORMER, SMILES_LM, WEATHER_VIT)}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def checkpoint_recipe(path) -> Recipe | None:
    """The recipe that reads ``path`` as a checkpoint of another library (``Recipe.init_settings``;
    protein-mlm: an ESM-2 folder), or None (a ``sciscale train`` run directory, or nothing a recipe
    knows). A checkpoint of a kind a recipe reads but refuses is its one-line ValueError."""
    if (pathlib.Path(path).expanduser() / "run_config.json").exists():
        return None
    return next((r for r in RECIPES.values() if r.init_settings is not None and r.init_settings(path) is not None),
                None)


def load_run(run_dir, *, step: int | None = None, mesh: str | None = None, log=print, base: str | None = None,
             **model_overrides):
    """The trained model of a ``sciscale train`` run directory, on one device or sharded over
    ``mesh`` (``"fsdp=8"``, ``"fsdp=4,tensor=2"``): a ``sciscale_jax.train.load.TrainedRun``
    (``.model``, ``.model_config``, ``.train_config``, ``.step``, ``.recipe``, ``.mesh``).
    ``step``: that checkpoint instead of the newest readable one; ``model_overrides``: settings
    that keep the parameters (``attention="chunked"``, ``remat``). ``run_dir`` may also be a
    checkpoint of another library a recipe reads (an ESM-2 folder: ``checkpoint_recipe``).
    ``base``: where an adapters-only LoRA run's frozen base is now, if it moved (the run's
    recorded fingerprint is checked there)."""
    from sciscale_jax.train.load import load_checkpoint, load_trained, read_run_config

    foreign = checkpoint_recipe(run_dir)
    if foreign is not None:
        if step is not None:
            raise ValueError(f"step={step}: {run_dir} is not a sciscale run and has no numbered checkpoints")
        if base is not None:
            raise ValueError(f"base={base}: {run_dir} is not a sciscale run and has no base")
        return load_checkpoint(foreign, run_dir, mesh=mesh, log=log, **model_overrides)
    recipe = get_recipe(read_run_config(run_dir)["recipe"])
    return load_trained(recipe, run_dir, step=step, mesh=mesh, log=log, base=base, **model_overrides)


__all__ = ["Data", "RECIPES", "Recipe", "checkpoint_recipe", "get_recipe", "load_run"]
