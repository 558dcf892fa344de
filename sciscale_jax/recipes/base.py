"""What a recipe is: defaults for the model and the run, a data builder and a loss."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Data:
    train: Any            # has .batch(step) -> dict of numpy arrays
    eval: list            # fixed evaluation batches
    vocab_size: int
    baselines: dict       # name -> value printed next to the model's figures (e.g. unigram_ppl)


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    model_defaults: dict  # TransformerConfig fields, vocab_size included
    train_defaults: dict  # TrainConfig fields
    build_data: Callable  # TrainConfig -> Data
    loss_fn: Callable     # (model, batch, key) -> (sum of token losses, token count)
