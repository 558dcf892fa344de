"""The training loop: jitted step, progress bar, periodic evaluation, JSONL metrics, Orbax checkpoints.

``train(recipe, model_config, train_config, out_dir)`` runs a recipe end to end and returns
a summary (final loss, the recipe's validation metrics and baselines, the memory report of
the compiled step, where the checkpoint went). The loop never names a model or a loss: the
recipe (``sciscale_jax.recipes.base.Recipe``) builds the model, the data, the loss and the
metrics, and says which logical axes each batch field has. Batches are a pure function of
(seed, step) and dropout keys of the step, so ``resume=True`` continues exactly where a
killed run left off. ``init_from`` starts a new run (step 0, fresh optimizer state) from the
parameters of another run of the same recipe, or from a checkpoint of another library the
recipe reads (ESM-2 for protein-mlm), read straight into this run's placement: the
pretrain-then-fine-tune workflow.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import inspect
import json
import os
import pathlib
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from sciscale_jax import _validate, optim, parallel, precision, remat
from sciscale_jax.memory import report_from_analysis, tree_bytes
from sciscale_jax.data.prefetch import Prefetch
from sciscale_jax.parallel import dap, multihost
from sciscale_jax.parallel import offload as host_offload
from sciscale_jax.train import pipeline as pipeline_run
from sciscale_jax.train import rundir, validate, zo_budget
from sciscale_jax.train.checkpoint import Checkpointer, check_run_dir
from sciscale_jax.train.init_from import FROZEN, frozen_record, frozen_weights, leaves_out, read_init_params
from sciscale_jax.train.signals import RunInterrupted, StopSignals
from sciscale_jax.train.sharding import pick_strategy, plan_placement
from sciscale_jax.train.abstract import _whole_count_updates, eval_shape_module
from sciscale_jax.models.stack import check_lora_train, is_lora, lora_trains
from sciscale_jax.pure import combine, like, partition
from sciscale_jax.quant import nf4
from sciscale_jax.train.step import (TrainState, abstract_train_state, accumulating_grad_fn, init_train_state,
                                     make_eval_step, make_train_step, make_zeroth_order_step, split_model,
                                     trainable_only, with_shardings)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = dataclasses.field(default=128, metadata={"help": "sequence length (or crop) the recipe's data uses"})
    learning_rate: float = dataclasses.field(default=2e-3, metadata={"flag": "lr", "help": "peak learning rate"})
    warmup_steps: int = 30
    weight_decay: float = dataclasses.field(default=0.01, metadata={
        "help": "decoupled weight decay on weight matrices (never on norms and biases)"})
    decay_embeddings: bool = dataclasses.field(default=False, metadata={
        "help": "also decay embedding tables (default: they are skipped, as most LLM training code does)"})
    grad_clip: float = dataclasses.field(default=1.0, metadata={"help": "global-norm clip; 0: none"})
    optimizer: str = dataclasses.field(default="adamw", metadata={
        "help": "optimizer by name", "choices": lambda: tuple(optim.OPTIMIZERS)})
    seed: int = 0
    eval_every: int = 100
    save_every: int = 100
    keep: int = dataclasses.field(default=3, metadata={"help": "checkpoints kept"})
    log_every: int = 10
    grad_accum: int = dataclasses.field(default=1, metadata={"help": "microbatches per step (lax.scan inside the step)"})
    offload: str = dataclasses.field(default="", metadata={
        "group": "distribution", "help": "keep opt_state, params or opt_state,params in pinned host memory"})
    mesh: str = dataclasses.field(default="", metadata={
        "group": "distribution", "help": "device mesh, e.g. data=2,fsdp=2,tensor=2 (axes: data fsdp dap sequence "
                                         "tensor2 tensor pipeline; one may be -1); empty: one device"})
    zero: int = dataclasses.field(default=0, metadata={"group": "distribution", "help": "ZeRO stage 0-3 over the data axes"})
    pipeline_schedule: str = dataclasses.field(default="1f1b", metadata={
        "group": "distribution", "help": "schedule over the pipeline mesh axis",
        "choices": lambda: parallel.PIPELINE_SCHEDULES})
    microbatches: int = dataclasses.field(default=0, metadata={
        "group": "distribution", "help": "pipeline microbatches per step; 0: as many as pipeline stages"})
    virtual_stages: int = dataclasses.field(default=1, metadata={
        "group": "distribution", "help": "model chunks per pipeline device (schedule interleaved)"})
    schedule_steps: int = dataclasses.field(default=0, metadata={
        "help": "length of the warm-up + cosine schedule; 0: steps (kept when a resumed run adds steps)"})
    init_from: str = dataclasses.field(default="", metadata={
        "help": "start from the parameters of this run directory (the same recipe and model shapes; "
                "step 0, fresh optimizer state), e.g. to fine-tune on --data; protein-mlm: or an ESM-2 "
                "checkpoint folder in Hugging Face's layout (the model's shape is read from it)"})
    init_step: int = dataclasses.field(default=0, metadata={
        "help": "the --init-from checkpoint to start from; 0: its newest readable one (saved as the one used)"})
    async_checkpoint: bool = dataclasses.field(default=False, metadata={
        "help": "write checkpoints in the background while training goes on (Orbax's asynchronous "
                "checkpointing: the state is copied to host memory at the save, then written); a failed "
                "write is reported at the next save or at the end"})
    prefetch: int = dataclasses.field(default=2, metadata={
        "help": "training batches built ahead of the step, in as many background threads (the batches "
                "are the same); 0: each built when its step starts"})
    save_frozen: bool = dataclasses.field(default=False, metadata={
        "help": "LoRA from --init-from: also write the frozen weights into every checkpoint (default: the "
                "adapters and optimizer state alone; the frozen weights are read again from --init-from)"})

    def __post_init__(self):
        _validate.train_config(self)  # integers, finite numbers, known optimizer
        for name in ("decay_embeddings", "save_frozen", "async_checkpoint"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a bool")
        for name in ("steps", "batch_size", "seq_len", "eval_every", "save_every", "keep", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be positive")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps}, weight_decay={self.weight_decay} and "
                             f"grad_clip={self.grad_clip} must be >= 0")
        if self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ValueError(f"grad_accum={self.grad_accum} must be >= 1 and divide batch_size={self.batch_size}")
        if self.offload:
            host_offload.parse_offload(self.offload)
        parallel.validate_zero_stage(self.zero)
        if self.zero and not self.mesh:
            raise ValueError(f"zero={self.zero} needs a mesh (--mesh data=N,...)")
        pipeline_run.check_config(self)
        if not isinstance(self.init_from, str) or self.init_step < 0 or (self.init_step and not self.init_from):
            raise ValueError(f"init_step={self.init_step} must be >= 0 and needs init_from (got {self.init_from!r})")
        if self.init_from:  # recorded absolute: a resumed or loaded run finds it from any working directory
            object.__setattr__(self, "init_from", os.path.abspath(os.path.expanduser(self.init_from)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _field_defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def build_optimizer(cfg: TrainConfig):
    """Warm-up + cosine learning-rate schedule, global-norm clipping, then the named optimizer.

    Names come from ``sciscale_jax.optim.OPTIMIZERS``; weight decay is passed to optimizers that
    take it, masked by ``optim.default_decay_mask`` (weight matrices only; embeddings only with
    ``decay_embeddings``). Zeroth-order optimizers see no gradient, so they get no clipping.
    """
    length = cfg.schedule_steps or cfg.steps  # past its end the schedule stays at its final value
    warmup = min(cfg.warmup_steps, length - 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, length,
                                                  end_value=cfg.learning_rate * 0.1)
    mask = functools.partial(optim.default_decay_mask, decay_embeddings=cfg.decay_embeddings)
    inner = optim.get_optimizer(cfg.optimizer, schedule, mask=mask, **_decay_kwargs(cfg.optimizer, cfg.weight_decay))
    if optim.is_zeroth_order(cfg.optimizer) or not cfg.grad_clip:
        return inner
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), inner)


def trainable(model_config):
    """The predicate on parameter key paths that picks what a run of ``model_config`` trains: the
    LoRA factors (and the parameters ``lora_train`` names) under ``lora_rank`` > 0, else None
    (every parameter)."""
    return lora_trains(model_config)


def run_optimizer(cfg: TrainConfig, model_config):
    """The optimizer a run of ``model_config`` steps with: :func:`build_optimizer`, over the LoRA
    factors alone under ``lora_rank``, inside dynamic loss scaling under fp16."""
    tx = build_optimizer(cfg)
    if trainable(model_config) is not None:
        tx = trainable_only(tx, trainable(model_config))
    if precision.get_policy(model_config.precision).loss_scaling:
        tx = precision.dynamic_loss_scaling(tx)
    return tx


def _decay_kwargs(name: str, weight_decay: float) -> dict:
    params = inspect.signature(optim.registry.factory(name)).parameters
    for key in ("weight_decay", "weight_decay_rate"):
        if key in params:
            return {key: weight_decay}
    return {}


def evaluate(metrics_step, params, rest, batches) -> dict:
    """Mean of each metric over ``batches``: ``metrics_step(params, rest, batch)`` returns
    ``{name: (sum, count)}`` (or one ``(sum, count)``, read as the loss); sums and counts are
    added in float64 over the batches before dividing. One batch is computed while the next is
    prepared: each result is fetched after the following batch has been dispatched."""
    totals = {}

    def add(out):
        out = out if isinstance(out, dict) else {"loss": out}
        for name, (s, n) in out.items():
            t = totals.setdefault(name, [0.0, 0.0])
            t[0], t[1] = t[0] + float(s), t[1] + float(n)

    pending = None
    for batch in batches:
        out = metrics_step(params, rest, batch)
        if pending is not None:
            add(jax.device_get(pending))
        pending = out
    if pending is not None:
        add(jax.device_get(pending))
    return {name: s / max(n, 1e-30) if n else float("nan") for name, (s, n) in totals.items()}


def init_program(build, tx, shardings, given_params: bool = False):
    """The jitted program :func:`sharded_init` runs (lower and compile it to see what each device
    holds); with ``given_params`` it takes the parameters as its argument."""

    def init(params=None):
        with _whole_count_updates():  # traced in time linear in the model's size
            if params is None:
                return init_train_state(build(), tx)[1]
            graphdef, fresh, rest = split_model(build())  # the fresh parameters given are dead code
            params = nf4.store(params, like=fresh)  # QLoRA: float kernels read, stored in 4 bits
            return init_train_state(nnx.merge(graphdef, combine(fresh, params), rest), tx)[1]

    return jax.jit(init, out_shardings=shardings, donate_argnums=0 if given_params else ())


def sharded_init(build, tx, shardings, params=None) -> TrainState:
    """The ``TrainState`` of ``build()`` (a fresh model, or its other variables with ``params``;
    parameters ``params`` lacks, e.g. new LoRA adapters, stay fresh)
    and ``tx.init``, computed by one jitted program whose outputs have ``shardings``: each device
    computes and holds only its shards of the parameters and optimizer state (with ZeRO-3 or
    FSDP, a fraction of the whole). The values are the eager initialisation's (jax's random bits
    do not depend on the sharding), up to float rounding of the initialisers' arithmetic compiled
    as one program."""
    if params is None:
        return init_program(build, tx, shardings)()
    with warnings.catch_warnings():  # QLoRA: float kernels given become 4-bit codes, their buffers unused
        warnings.filterwarnings("ignore", "Some donated buffers were not usable")
        return init_program(build, tx, shardings, given_params=True)(params)


def recipe_eval_step(recipe, graphdef):
    """``(params, rest, pieces) -> {name: (sum, count)}``: the recipe's evaluation metrics, no
    dropout, summed over an evaluation batch's pieces (:func:`eval_batches`, :func:`over_pieces`)."""
    metrics_fn = recipe.metrics_fn()
    return over_pieces(make_eval_step(graphdef, lambda model, batch, _key: metrics_fn(model, batch)))


def over_pieces(metrics_step):
    """``(params, rest, pieces) -> metrics`` of ``metrics_step`` summed over the leading axis of
    every field of ``pieces`` (an evaluation batch cut by :func:`eval_batches`), with
    ``lax.scan``: one call per evaluation batch, one piece's activations live at a time."""

    def step(params, rest, pieces):
        first = jax.tree.map(lambda x: x[0], pieces)
        shapes = jax.eval_shape(metrics_step, params, rest, first)
        zero = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)

        def body(total, piece):
            return jax.tree.map(jnp.add, total, metrics_step(params, rest, piece)), None

        return jax.lax.scan(body, zero, pieces)[0]

    return step


def eval_batches(batches, place, recipe, rows: int):
    """The evaluation batches as the train step takes its batch, for :func:`over_pieces`: each
    field reshaped to ``[pieces, rows, ...]``, pieces of ``rows`` rows (the training microbatch,
    so no device holds more examples' activations at once than in training; a batch whose row
    count ``rows`` does not divide is one piece) and, with a ``place``ment, each piece split over
    the data-parallel devices by the recipe's batch axes, each process putting only its devices'
    rows (a field that does not split evenly is replicated). Unplaced, every device would
    evaluate every row. A generator: each batch is placed when it is evaluated. Metrics are sums
    and counts, so the pieces add up exactly."""
    for batch in batches:
        batch = {k: np.asarray(v) for k, v in batch.items()}
        n = len(next(iter(batch.values())))
        if rows and n % rows == 0 and all(len(v) == n for v in batch.values()):
            pieces = {k: v.reshape(n // rows, rows, *v.shape[1:]) for k, v in batch.items()}
        else:
            pieces = {k: v[None] for k, v in batch.items()}
        yield pieces if place is None else multihost.place_batch(pieces, {
            k: _piece_sharding(recipe, k, v[0], place) for k, v in pieces.items()})


def _piece_sharding(recipe, field, piece, place):
    """The sharding of a field's stacked pieces: one piece's batch sharding under a leading unsplit axis."""
    try:
        spec = parallel.batch_sharding(piece.shape, recipe.axes_of(field, piece.ndim), place.rules, place.mesh).spec
    except ValueError:  # no axes for an evaluation-only field, or sizes that do not split over the mesh
        spec = jax.sharding.PartitionSpec()
    return jax.sharding.NamedSharding(place.mesh, jax.sharding.PartitionSpec(None, *spec))


def validation_metrics(recipe, metrics_step, params, rest, batches) -> dict:
    """``val_<name>`` for the recipe's metrics and what its ``summarize`` derives from them."""
    means = evaluate(metrics_step, params, rest, batches)
    return {f"val_{k}": v for k, v in {**means, **recipe.summarize(means)}.items()}


class MetricsLog:
    """Append-only JSONL log of metrics, one object per line (written by process 0 only)."""

    def __init__(self, path):
        self.path = pathlib.Path(path)

    def write(self, record: dict):
        if not multihost.is_primary():
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def train(recipe, model_config, train_config: TrainConfig, out_dir, *, resume: bool = False,
          force: bool = False, progress: bool = True, log=print) -> dict:
    """Train ``recipe`` and return a summary dict; see the module docstring."""
    out_dir = pathlib.Path(out_dir)
    primary = multihost.is_primary()  # in a multi-process run, process 0 alone logs and writes run files
    progress, log = progress and primary, log if primary else (lambda *a, **k: None)
    if jax.process_count() > 1 and not train_config.mesh:
        raise ValueError(f"a multi-process run ({jax.process_count()} processes) needs --mesh over all "
                         f"{jax.device_count()} devices, e.g. --mesh data={jax.device_count()}")
    rundir.preflight(out_dir, resume=resume)  # --out usable; --resume needs a checkpoint; writes nothing
    cfg = rundir.keep_schedule(out_dir, train_config, resume=resume)  # extending keeps the schedule
    cfg = rundir.keep_init(out_dir, cfg, resume=resume)  # and where its parameters started
    validate.check_run(model_config, cfg)  # ring/ulysses and rule tables need a mesh; seq_len vs max_len
    pipeline_run.check_run(recipe, model_config, cfg)  # a pipeline axis: stages, schedule, microbatches
    rundir.check_data_unchanged(out_dir, resume=resume, force=force,  # before reading (packing) the data
                                bytes_digests=recipe.data_files_are_bytes)
    data = recipe.build_data(cfg, model_config)
    if data.summary:
        log(data.summary)
    if recipe.check is not None:
        recipe.check(model_config, cfg, data)
    given_config = model_config  # saved as given: a resumed run may pick another mesh
    mesh_config = parallel.ParallelConfig.parse(cfg.mesh).resolve(jax.device_count()) if cfg.mesh else None
    if mesh_config is not None:  # a dap axis needs a model and attention that support DAP
        dap.check_dap(mesh_config.sizes(), getattr(model_config, "attention", "xla"),
                      getattr(model_config, "supports_dap", False), f"{recipe.name} model")
    if mesh_config is not None and model_config.sharding is None:  # activations follow the parameters' rules
        model_config = dataclasses.replace(model_config, sharding=pick_strategy(mesh_config))
    offload = host_offload.parse_offload(cfg.offload) if cfg.offload else frozenset()
    build = lambda: recipe.build_model(model_config, nnx.Rngs(cfg.seed))  # noqa: E731  (fresh Rngs per call)
    # On a mesh the model is built abstractly here and initialised below by one jitted program
    # straight into its shards, so no device ever holds more of the state than its shards. A
    # resumed run is never initialised: its checkpoint is read straight onto the abstract state.
    initialise = not resume and not cfg.init_from  # else the parameters are read from a checkpoint
    model = build() if mesh_config is None and initialise else eval_shape_module(build)
    policy = precision.get_policy(model_config.precision)
    tx = run_optimizer(cfg, model_config)
    param_axes, fp8 = parallel.param_axes(model), precision.fp8_paths(model)
    example = data.train.batch(0)
    validate.check_data(data, getattr(model_config, "vocab_size", None), example)  # fields, dtypes, id ranges
    validate.check_loss_fields(recipe.loss_fn, model, example)  # a field the loss reads is present
    if mesh_config is None and initialise:
        graphdef, state = init_train_state(model, tx)
    else:
        graphdef, params, rest = split_model(model)
        state = abstract_train_state(params, rest, tx)
    del model
    pipeline_run.check_layers(recipe, cfg, state.params)  # layers >= stages x virtual stages
    check_lora_train(model_config, state.params)  # the names --lora-train gives are parameters that can train
    evaluations = zo_budget.check_budget(cfg.optimizer, state.params, force=force, log=log)  # per ZO step
    mesh, place = None, None
    put_batch = lambda b: b  # noqa: E731
    jit_kw = dict(donate_argnums=0)
    if mesh_config is not None:
        place = plan_placement(mesh_config, model_config.sharding, cfg.zero, state, param_axes, tx, example,
                               model_sharding=model_config.sharding, batch_axes=recipe.axes_of,
                               rule_overrides=pipeline_run.rule_overrides(recipe, cfg, state.params))
    # ZeRO-2: gradients constrained to (or reduce-scattered into) their data-parallel shards
    step = _make_step(cfg, graphdef, tx, recipe.loss_fn, fp8, policy.loss_scaling, offload,
                      place.step_kwargs() if place is not None and not optim.is_zeroth_order(cfg.optimizer) else {},
                      _evaluation_bar(evaluations, progress, tx),
                      pipeline_run.grad_fn(recipe, model_config, cfg, graphdef, place), trainable(model_config))
    where = place.state if place is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])
    frozen, moved = None, ()  # adapters-only checkpoints: FROZEN's record of the frozen weights read from --init-from
    if resume:  # the restore target: shapes, dtypes and this run's shardings
        state = with_shardings(state, where)
        saved = rundir.saved_config(out_dir) or {}
        frozen = saved.get(FROZEN)
        before = (saved.get("train") or {}).get("init_from")
        if isinstance(frozen, dict) and before and cfg.init_from not in ("", before):  # the base moved: the
            moved = ("init_from",)  # fingerprint below decides whether it is the same
            cfg = dataclasses.replace(cfg, init_step=cfg.init_step or saved["train"].get("init_step", 0))
    elif cfg.init_from:  # another run's parameters, read straight into this run's placement
        fresh = is_lora if trainable(model_config) is not None else None  # new adapters; the rest is read
        found, params, verbatim = read_init_params(recipe, model_config, cfg.init_from, cfg.init_step,
                                                   with_shardings(state, where).params, fresh, log)
        log(f"parameters from {cfg.init_from}, checkpoint {found}")
        cfg = dataclasses.replace(cfg, init_step=found)  # saved in run_config.json as the one used
        if trainable(model_config) is not None and verbatim and not cfg.save_frozen:
            frozen = frozen_record(params)
            log("checkpoints hold the adapters and optimizer state; the frozen weights are read again from "
                f"{cfg.init_from} (--save-frozen writes them too)")
        state = sharded_init(build, tx, where, params)
    if place is not None:
        mesh = place.mesh
        if initialise:
            state = sharded_init(build, tx, place.state)
        put_batch = lambda b: jax.device_put(b, place.batch)  # noqa: E731
        jit_kw.update(in_shardings=(place.state, place.batch), out_shardings=(place.state, None))
    build_batch = data.train.batch  # host arrays; put_batch places them (in a background thread: --prefetch)
    if jax.process_count() > 1:  # each process builds only the part of the global batch its devices hold
        build_batch, put_batch = multihost.batch_builder(data.train, place.batch,
                                                         {k: v.shape for k, v in example.items()})
    batch_at = (build_batch, put_batch)
    if offload:  # between steps these trees sit in pinned host memory, each keeping its sharding
        kind = {t: "pinned_host" if t in offload else "device" for t in ("params", "opt_state")}
        state = state._replace(params=host_offload.place(state.params, kind["params"], mesh),
                               opt_state=host_offload.place(state.opt_state, kind["opt_state"], mesh))
        placed = jax.tree.map(lambda x: x.sharding, state)
        jit_kw["out_shardings"] = (placed, None)
        if "in_shardings" in jit_kw:
            jit_kw["in_shardings"] = (placed, jit_kw["in_shardings"][1])
    # Every check above runs before anything in out_dir is written.
    run_config = {"recipe": recipe.name, "model": given_config.to_dict(), "train": cfg.to_dict()}
    if data.sources:  # the user's data files by SHA-256: resuming on changed files is refused below
        run_config["data_files"] = dict(data.sources)
    if isinstance(frozen, dict):
        run_config[FROZEN] = frozen
    defaults = {"model": _field_defaults(type(model_config)), "train": _field_defaults(TrainConfig)}
    defaults = json.loads(json.dumps(defaults))
    weights = None
    if resume and isinstance(frozen, dict):  # before anything is written: a different run, then a base gone,
        check_run_dir(out_dir, run_config, resume=True, force=force, defaults=defaults, write=False, also=moved)
        weights = frozen_weights(recipe, model_config, cfg.init_from, cfg.init_step,  # changed or moved
                                 with_shardings(state, where).params, frozen, out_dir, log)
        if moved:
            log(f"the frozen weights are read from {cfg.init_from} now (the same fingerprint as at {before})")
    lock = rundir.RunLock(out_dir) if primary else contextlib.nullcontext()
    with lock, StopSignals() as stop:  # one run per --out; stop on SIGINT/TERM
        check_run_dir(out_dir, run_config, resume=resume, force=force, defaults=defaults, also=moved,
                      write=primary)
        if primary:
            lock.write_pid()
            if data.stats:  # what embedding needs of the data, beside the checkpoints
                rundir.write_data_stats(out_dir, data.stats)
        left_out = leaves_out(model_config) if isinstance(frozen, dict) else None
        ckpt = Checkpointer(out_dir, keep=cfg.keep, save_every=cfg.save_every, log=log, leave_out=left_out,
                            async_write=cfg.async_checkpoint)
        if primary:
            ckpt.remove_partial()  # a save killed mid-write leaves a tmp folder
        multihost.barrier("run directory checked")  # no process reads it after process 0 starts writing
        if resume:
            if left_out is not None:  # the frozen weights read above, placed as the state's
                target = partition(state.params, left_out)[0]
                state = state._replace(params=combine(state.params, jax.device_put(
                    like(target, weights), jax.tree.map(lambda x: x.sharding, target))))
            state = ckpt.restore(state)  # newest intact checkpoint, onto this run's shardings
            log(f"resumed from step {int(state.step)} in {ckpt.directory}")
        return _train_locked(cfg, recipe, place, step, jit_kw, state, batch_at, graphdef, data, ckpt,
                             out_dir, progress, stop, offload, trainable(model_config) is not None)


def _train_locked(cfg, recipe, place, step, jit_kw, state, batch_at, graphdef, data, ckpt, out_dir,
                  progress, stop, offload, frozen_weights=False):
    """Compile, loop, evaluate: the part of :func:`train` that runs holding the run directory's lock."""
    build_batch, put_batch = batch_at
    with jax.set_mesh(place.mesh) if place is not None else contextlib.nullcontext():
        compiled = jax.jit(step, **jit_kw).lower(state, put_batch(build_batch(0))).compile(
            remat.compiler_options(frozen_weights=frozen_weights))
        eval_step = recipe_eval_step(recipe, graphdef)
        if "params" in offload:  # evaluate on a device copy of host-resident parameters
            eval_step = lambda p, r, b, f=eval_step: f(host_offload.to_device(p), r, b)  # noqa: E731
        eval_fn = jax.jit(eval_step)
        evals = lambda: eval_batches(data.eval, place, recipe, cfg.batch_size // cfg.grad_accum)  # noqa: E731
        metrics_log = MetricsLog(out_dir / "metrics.jsonl")
        state, train_loss, t0 = _loop(cfg, recipe, compiled, eval_fn, state, evals, batch_at, ckpt,
                                      metrics_log, progress, stop)
        if stop.requested:  # saved at a step boundary: say where to resume from
            raise RunInterrupted(stop.signum, f"stopped by {stop.name} after step {int(state.step)}; checkpoint "
                                              f"{int(state.step)} saved in {ckpt.directory}; continue with --resume "
                                              f"--out {out_dir}")
        val = validation_metrics(recipe, eval_fn, state.params, state.rest, evals())
    metrics_log.write({"step": int(state.step), **val})
    return {
        "steps": int(state.step), "train_loss": train_loss, **val, "validation": val,
        "baselines": dict(data.baselines), "memory": report_from_analysis(compiled.memory_analysis()),
        "param_bytes": tree_bytes(state.params), "opt_state_bytes": tree_bytes(state.opt_state),
        "checkpoint_dir": str(ckpt.directory), "seconds": time.perf_counter() - t0, "state": state,
        "compiled": compiled,
    }


def _evaluation_bar(evaluations: int | None, progress: bool, tx, min_evaluations: int = 256):
    """For zeroth-order steps of many loss evaluations: a callback advancing a progress bar of
    the evaluations inside the current step (None when steps are short or progress is off)."""
    if not progress or evaluations is None or evaluations < min_evaluations:
        return None
    total = evaluations + (0 if hasattr(tx, "apply") else 1)  # plus the reported loss, unless in place
    bar = tqdm(total=total, desc="loss evaluations in this step", leave=False, dynamic_ncols=True)

    def tick():
        if bar.n >= total:
            bar.reset()
        bar.update(1)

    return tick


def _make_step(cfg: TrainConfig, graphdef, tx, loss_fn, fp8_paths, loss_scaling: bool, offload: frozenset,
               placement_kwargs: dict, on_evaluation=None, pipeline_grad_fn=None, trainable=None):
    """The un-jitted step for this run: zeroth order, pipelined, fp8, accumulated or plain backprop;
    ``trainable``: the predicate on parameter paths of what trains (LoRA), None for everything."""
    if optim.is_zeroth_order(cfg.optimizer):
        if cfg.grad_accum > 1 or loss_scaling or fp8_paths or cfg.offload:
            raise ValueError(f"the zeroth-order optimizer {cfg.optimizer!r} takes no gradient: it cannot be "
                             f"combined with grad_accum={cfg.grad_accum}, loss scaling, fp8 or offload")
        return make_zeroth_order_step(graphdef, tx, loss_fn=loss_fn, seed=cfg.seed, on_evaluation=on_evaluation,
                                      trainable=trainable)
    if fp8_paths and cfg.grad_accum > 1:
        raise ValueError(f"fp8 scales update once per step; grad_accum={cfg.grad_accum} is not supported with fp8")
    if pipeline_grad_fn is not None:  # train.pipeline.check_run refused fp8 and grad_accum with it
        grad_fn = pipeline_grad_fn
    elif fp8_paths:
        grad_fn = precision.fp8_grad_fn(graphdef, loss_fn, fp8_paths)
    elif cfg.grad_accum > 1:
        grad_fn = accumulating_grad_fn(graphdef, loss_fn, cfg.grad_accum)
    else:
        grad_fn = None
    return make_train_step(graphdef, tx, loss_fn=loss_fn, grad_fn=grad_fn, seed=cfg.seed, loss_scaling=loss_scaling,
                           offload=offload, trainable=trainable, **placement_kwargs)


def _loop(cfg, recipe, compiled, eval_fn, state, evals, batch_at, ckpt, metrics_log, progress, stop=None):
    """Steps from ``state.step`` to ``cfg.steps``: log, evaluate (on ``evals()``) and checkpoint on their
    intervals. ``batch_at`` is (build, put): the host batch of a step (built ``cfg.prefetch`` steps
    ahead in background threads) and its placement on the devices."""
    start = int(state.step)
    build_batch, put_batch = batch_at
    with Prefetch(build_batch, start, cfg.steps, cfg.prefetch) as batches:
        return _steps(cfg, recipe, compiled, eval_fn, state, evals, lambda s: put_batch(batches(s)), ckpt,
                      metrics_log, progress, stop, start)


def _steps(cfg, recipe, compiled, eval_fn, state, evals, batch_at, ckpt, metrics_log, progress, stop, start):
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress,
               desc=recipe.name, dynamic_ncols=True)
    train_loss, t0 = float("nan"), time.perf_counter()
    queued = collections.deque()
    for step in bar:
        if stop is not None and stop.requested:  # a signal came: stop at this step boundary
            break
        state, metrics = compiled(state, batch_at(step))
        done = step + 1
        queued.append(metrics)  # the host runs ahead of the device by at most two steps (and their batches)
        if len(queued) > 2:
            jax.block_until_ready(queued.popleft())
        if done % cfg.log_every == 0 or done == cfg.steps:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            train_loss = m["loss"]
            bar.set_postfix(loss=f"{train_loss:.3f}")
            metrics_log.write({"step": done, **m, "time": time.perf_counter() - t0})
        if done % cfg.eval_every == 0 and done != cfg.steps:
            val = validation_metrics(recipe, eval_fn, state.params, state.rest, evals())
            metrics_log.write({"step": done, **val})
            if multihost.is_primary():
                bar.write(f"step {done}: train loss {train_loss:.4f}  "
                          + "  ".join(f"{k} {v:.4f}" for k, v in val.items()))
        ckpt.save(state, step=done)  # the step counted here: no wait for the device unless it saves
    bar.close()
    if ckpt.latest_step() != int(state.step):
        ckpt.save(state, force=True)
    ckpt.close()
    return state, train_loss, t0
