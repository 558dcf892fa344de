"""One file per `sciscale train` recipe."""

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


__all__ = ["Data", "RECIPES", "Recipe", "get_recipe"]
