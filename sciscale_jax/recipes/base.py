"""The recipe contract: how a model family joins ``sciscale train``.

A recipe owns its model and everything that depends on what the model is; ``train/`` and
``cli.py`` only call these fields and never name a model class or a loss:

- ``config_class``: the model config, a frozen dataclass that inherits the technique switches
  (``sciscale_jax.models.stack.Techniques``); the CLI generates the model flags from it;
- ``build_model(config, rngs) -> nnx.Module``;
- ``build_data(train_config, model_config) -> Data``: training batches as a pure function of
  the step, fixed evaluation batches, the baselines to print beside the model's figures, and
  the fingerprints of the user's data files it read (``Data.sources``), which the run records;
- ``loss_fn(model, batch, key) -> (sum, count)`` for training (``key`` None: no dropout);
- ``eval_fn(model, batch) -> {name: (sum, count)}``: evaluation metrics, summed over the
  evaluation batches and reported as ``val_<name>`` = sum / count (default: the loss);
- ``summarize(means) -> dict``: figures derived from those means (perplexity = exp(loss));
- ``batch_axes``: the logical axes of each batch field (``{"msa": ("batch", "msa_seq", "res")}``),
  so the run places batches of any rank on any mesh;
- ``check(model_config, train_config, data)``: recipe-specific refusals before anything compiles;
- ``report(model_config, train_config, state) -> list[str]``: optional figures of the trained
  model that the loop does not compute (smiles-lm: sampled molecules scored by RDKit), printed
  by ``sciscale train`` after training;
- ``embed`` (optional): ``(model_config, model, path, batch_size) -> {name: array}``, the trained
  model's representations of the inputs in a file (protein-mlm: per-residue hidden states of a
  FASTA file; msa-evoformer: the single and pair representations of an alignment; smiles-lm:
  molecule representations of a SMILES file), saved by ``sciscale embed``;
- ``embed_options`` (default none): ``{name: help}``, switches ``sciscale embed`` offers as
  ``--<name>`` and passes to ``embed`` as ``name=True/False`` (protein-mlm: ``contacts``);
- ``embed_reads_base`` (default False): ``embed`` takes ``base=``, the checkpoint of another library
  (``init_settings``' kind) the run started from, at the root of its ``--init-from`` chain (or the
  checkpoint itself when one is embedded directly), or None (protein-mlm: ESM-2's contact head);
- ``embed_reads_data`` (default False): ``embed`` reads the training data again (weather-vit: the
  statistics that normalize its inputs); ``sciscale embed`` then passes the run's recorded
  ``data_files`` as ``embed(..., data_files=...)`` and a changed file is refused;
- ``embed_dataset`` (optional): ``(model_config, arrays) -> xarray.Dataset``, what ``embed``
  returned laid out as a labelled dataset, so ``sciscale embed --out X.zarr`` (or ``.nc``) writes
  it (weather-vit: forecasts in WeatherBench 2's layout);
- ``data_files_are_bytes`` (default True): ``Data.sources`` holds each file's SHA-256 as stored
  (``data.files.fingerprints``), so ``--resume`` compares the recorded digests with the files
  before the data is read (a changed corpus is refused without being packed again); weather-vit
  records the SHA-256 of the values it read instead (a rechunked store is the same data) and
  sets False: its resume is checked once the data is read;
- ``vocabulary`` (optional): ``(model_config) -> tokens by id`` for a recipe whose tokenizer is
  built from its training data (smiles-lm), so loading a run re-reads that data and a run
  started from another's parameters (``init_from``) must have the same tokens;
- ``abstract_batch`` (optional): ``(model_config, train_config) -> {field: jax.ShapeDtypeStruct}``,
  one training batch's shapes, for a recipe whose batch shapes depend on the model config beyond
  the batch and sequence axes (weather-vit: channels and grid); memory estimates and the planner
  then build no data. Without it they are read off one tiny batch of the default settings.
- ``init_settings`` and ``init_params`` (optional): another library's checkpoint that ``--init-from``
  starts a run from (protein-mlm: ESM-2). ``init_settings(path) -> dict | None``: the model config
  fields the checkpoint fixes, None for a path that is not such a checkpoint (a ``sciscale train``
  run, read as before); ``init_params(model_config, path)``: the parameters laid out as the
  model's, each leaf a zero-argument function returning its numpy array, so a run reads and
  places one array at a time;
- ``export`` (optional): ``(model_config, params, out, *, base, adapters, dtype) -> [file names]``:
  the trained parameters (a pure dict) written in another library's layout into folder ``out``
  (protein-mlm: Hugging Face's ``EsmForMaskedLM``, or the LoRA adapters alone in PEFT's layout on
  ``base``, the checkpoint of ``init_settings``' kind the run started from, or None), saved by
  ``sciscale export``;
- ``pipeline`` (optional): the model's layer stack as pipeline stages
  (``sciscale_jax.parallel.PipelineStages``: embedding, block arguments, head + loss, token
  count); a recipe without it refuses a mesh with a ``pipeline`` axis.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from sciscale_jax.axes import BATCH, SEQ


@dataclasses.dataclass(frozen=True)
class Data:
    train: Any            # has .batch(step) -> dict of numpy arrays
    eval: list            # fixed evaluation batches
    vocab_size: int | None = None
    baselines: dict = dataclasses.field(default_factory=dict)  # name -> value printed beside the model's
    sources: dict = dataclasses.field(default_factory=dict)    # {path: sha256} of the user's files read
                                                               # (``data.files.fingerprints``), recorded by the run
    summary: str = ""     # one line on what the data is (the user's files: how many records, the split), logged
    train_only: tuple = ()  # fields the training batches alone carry (weather-vit's rollout targets)
    stats: dict = dataclasses.field(default_factory=dict)  # {name: array} the model needs from its training data
                          # beyond its parameters (weather-vit: the normalization), written beside the checkpoints
                          # (``data_stats.npz``) so ``sciscale embed`` need not read the data again


def _identity(means: dict) -> dict:
    return {}


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    config_class: type
    build_model: Callable          # (config, rngs) -> nnx.Module
    build_data: Callable           # (train_config, model_config) -> Data
    loss_fn: Callable              # (model, batch, key) -> (sum, count)
    model_defaults: dict = dataclasses.field(default_factory=dict)   # config_class fields
    train_defaults: dict = dataclasses.field(default_factory=dict)   # TrainConfig fields
    eval_fn: Callable | None = None        # (model, batch) -> {name: (sum, count)}
    summarize: Callable = _identity        # {name: mean} -> {name: derived value}
    batch_axes: dict = dataclasses.field(default_factory=lambda: {"*": (BATCH, SEQ)})
    check: Callable | None = None          # (model_config, train_config, data) -> None or ValueError
    report: Callable | None = None         # (model_config, train_config, state) -> lines printed after training
    pipeline: Any = None                   # parallel.PipelineStages, or None: no pipeline axis
    embed: Callable | None = None          # (model_config, model, path, batch_size) -> {name: array}
    abstract_batch: Callable | None = None  # (model_config, train_config) -> {field: ShapeDtypeStruct}
    embed_dataset: Callable | None = None  # (model_config, embed's arrays) -> xarray.Dataset (--out .zarr/.nc)
    embed_reads_data: bool = False         # embed needs what the training data gives: it gets the recorded
                                           # data_files and data_stats= (Data.stats as the run saved them; None
                                           # for a run saved without: read the data again)
    embed_options: dict = dataclasses.field(default_factory=dict)  # {name: help}: sciscale embed --<name> switches
    embed_reads_base: bool = False         # embed gets base=: the other library's checkpoint the run started from
    data_files_are_bytes: bool = True      # Data.sources holds each file's SHA-256 (files.fingerprints), so a
                                           # resume is checked against the files before the data is read (False:
                                           # the recipe's own digest, weather-vit's of the values read)
    init_settings: Callable | None = None  # (path) -> model config fields another library's checkpoint fixes,
                                           # or None: not such a checkpoint (--init-from a sciscale run)
    init_params: Callable | None = None    # (model_config, path) -> the model's parameters as array readers
    export: Callable | None = None         # (model_config, params, out, *, base, adapters, dtype) -> files written
    vocabulary: Callable | None = None     # (model_config) -> tokens by id, for a tokenizer built from the
                                           # training data: loading a run re-reads that data (changed files
                                           # are refused) and --init-from needs the same tokens

    def metrics_fn(self) -> Callable:
        """``(model, batch) -> {name: (sum, count)}``: ``eval_fn``, or the loss alone."""
        if self.eval_fn is not None:
            return self.eval_fn
        loss_fn = self.loss_fn
        return lambda model, batch: {"loss": loss_fn(model, batch, None)}

    def axes_of(self, field: str, ndim: int) -> tuple:
        """Logical axes of batch field ``field``: its own entry, else the "*" entry cut to ``ndim``."""
        axes = self.batch_axes.get(field, self.batch_axes.get("*"))
        if axes is None:
            raise ValueError(f"recipe {self.name!r} gives no logical axes for batch field {field!r}")
        axes = tuple(axes)[:ndim] if field not in self.batch_axes else tuple(axes)
        if len(axes) != ndim:
            raise ValueError(f"recipe {self.name!r}: batch field {field!r} has rank {ndim} but axes {axes}")
        return axes

    def make_config(self, **overrides):
        """The model config from the recipe's defaults and ``overrides``."""
        return self.config_class(**{**self.model_defaults, **overrides})
