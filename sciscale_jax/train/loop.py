"""The training loop: jitted step, progress bar, periodic evaluation, JSONL metrics, Orbax checkpoints.

``train(recipe, model_config, train_config, out_dir)`` runs a recipe end to end and returns
a summary (final losses, perplexities, the memory report of the compiled step, where the
checkpoint went). Batches are a pure function of (seed, step) and dropout keys of the step,
so ``resume=True`` continues exactly where a killed run left off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import pathlib
import time

import jax
import optax
from flax import nnx
from tqdm.auto import tqdm

from sciscale_jax import _validate, optim, parallel, precision
from sciscale_jax.memory import report_from_analysis, tree_bytes
from sciscale_jax.parallel import offload as host_offload
from sciscale_jax.models import Transformer
from sciscale_jax.train import rundir, validate, zo_budget
from sciscale_jax.train.checkpoint import Checkpointer, check_run_dir
from sciscale_jax.train.signals import RunInterrupted, StopSignals
from sciscale_jax.train.sharding import plan_placement, resolve_strategy
from sciscale_jax.train.step import accumulating_grad_fn, init_train_state, make_eval_step, make_train_step, make_zeroth_order_step


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    learning_rate: float = 2e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    optimizer: str = "adamw"
    seed: int = 0
    eval_every: int = 100
    save_every: int = 100
    keep: int = 3
    log_every: int = 10
    grad_accum: int = 1     # microbatches per step (lax.scan inside the step)
    offload: str = ""       # "opt_state", "params" or both, kept in pinned host memory between steps
    mesh: str = ""          # e.g. "data=2,fsdp=2,tensor=2"; empty: one device
    zero: int = 0           # ZeRO stage 0-3 over the data axes of the mesh
    sharding: str = "auto"  # rule table (sciscale_jax.parallel.RULES), or picked from the mesh
    schedule_steps: int = 0  # length of the warm-up + cosine schedule; 0: steps (kept when a resume adds steps)

    def __post_init__(self):
        _validate.train_config(self)  # integers, finite numbers, known optimizer, sharding needs a mesh
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
        if self.sharding != "auto":
            parallel.rules_for(self.sharding)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _field_defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def build_optimizer(cfg: TrainConfig):
    """Warm-up + cosine learning-rate schedule, global-norm clipping, then the named optimizer.

    Names come from ``sciscale_jax.optim.OPTIMIZERS``; weight decay is passed to optimizers that
    take it. Zeroth-order optimizers see no gradient, so they get no clipping.
    """
    length = cfg.schedule_steps or cfg.steps  # past its end the schedule stays at its final value
    warmup = min(cfg.warmup_steps, length - 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, length,
                                                  end_value=cfg.learning_rate * 0.1)
    inner = optim.get_optimizer(cfg.optimizer, schedule, **_decay_kwargs(cfg.optimizer, cfg.weight_decay))
    if optim.is_zeroth_order(cfg.optimizer) or not cfg.grad_clip:
        return inner
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), inner)


def _decay_kwargs(name: str, weight_decay: float) -> dict:
    params = inspect.signature(optim.registry.factory(name)).parameters
    for key in ("weight_decay", "weight_decay_rate"):
        if key in params:
            return {key: weight_decay}
    return {}


def evaluate(eval_fn, params, rest, batches) -> tuple[float, float]:
    """(token-mean loss, perplexity) over ``batches``."""
    total, count = 0.0, 0.0
    for batch in batches:
        s, n = jax.device_get(eval_fn(params, rest, batch))
        total, count = total + float(s), count + float(n)
    loss = total / max(count, 1.0)
    return loss, math.exp(loss)


class MetricsLog:
    """Append-only JSONL log of metrics, one object per line."""

    def __init__(self, path):
        self.path = pathlib.Path(path)

    def write(self, record: dict):
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def train(recipe, model_config, train_config: TrainConfig, out_dir, *, resume: bool = False,
          force: bool = False, progress: bool = True, log=print) -> dict:
    """Train ``recipe`` and return a summary dict; see the module docstring."""
    out_dir = pathlib.Path(out_dir)
    rundir.preflight(out_dir, resume=resume)  # [h3] --out usable; --resume needs a checkpoint; writes nothing
    cfg = rundir.keep_schedule(out_dir, train_config, resume=resume)  # [h3] extending keeps the schedule
    validate.check_run(model_config, cfg)  # [h3] seq_len vs max_len, ring/ulysses need a mesh
    data = recipe.build_data(cfg)
    if model_config.vocab_size < data.vocab_size:
        raise ValueError(f"model vocab_size={model_config.vocab_size} is smaller than the data's {data.vocab_size}")
    if cfg.mesh and model_config.sharding is None:  # activations follow the parameters' rule table
        model_config = dataclasses.replace(model_config, sharding=resolve_strategy(cfg.mesh, cfg.sharding))
    model = Transformer(model_config, rngs=nnx.Rngs(cfg.seed))
    policy = precision.get_policy(model_config.precision)
    tx = build_optimizer(cfg)
    if policy.loss_scaling:
        tx = precision.dynamic_loss_scaling(tx)
    param_axes, fp8 = parallel.param_axes(model), precision.fp8_paths(model)
    example = data.train.batch(0)
    validate.check_data(data, model_config.vocab_size, example)  # [h3] fields, dtypes, id ranges on the host
    validate.check_loss_fields(recipe.loss_fn, model, example)  # [h3] a field the loss reads is present
    graphdef, state = init_train_state(model, tx)
    del model
    zo_budget.check_budget(cfg.optimizer, state.params, force=force, log=log)  # [h3] ZO cost per step
    step = _make_step(cfg, graphdef, tx, recipe.loss_fn, fp8, policy.loss_scaling)
    mesh = None
    put_batch = lambda b: b  # noqa: E731
    jit_kw = dict(donate_argnums=0)
    if cfg.mesh:
        place = plan_placement(cfg.mesh, cfg.sharding, cfg.zero, state, param_axes, tx, example)
        mesh, state = place.mesh, jax.device_put(state, place.state)
        put_batch = lambda b: jax.device_put(b, place.batch)  # noqa: E731
        jit_kw.update(in_shardings=(place.state, place.batch), out_shardings=(place.state, None))
    if cfg.offload:  # between steps these trees sit in pinned host memory, each keeping its sharding
        targets = host_offload.parse_offload(cfg.offload)
        kind = {t: "pinned_host" if t in targets else "device" for t in ("params", "opt_state")}
        state = state._replace(params=host_offload.place(state.params, kind["params"], mesh),
                               opt_state=host_offload.place(state.opt_state, kind["opt_state"], mesh))
        placed = jax.tree.map(lambda x: x.sharding, state)
        jit_kw["out_shardings"] = (placed, None)
        if "in_shardings" in jit_kw:
            jit_kw["in_shardings"] = (placed, jit_kw["in_shardings"][1])
    # Every check above runs before anything in out_dir is written.
    run_config = {"recipe": recipe.name, "model": model_config.to_dict(), "train": cfg.to_dict()}
    defaults = {"model": _field_defaults(type(model_config)), "train": _field_defaults(TrainConfig)}
    with rundir.RunLock(out_dir) as lock, StopSignals() as stop:  # [h3] one run per --out; stop on SIGINT/TERM
        check_run_dir(out_dir, run_config, resume=resume, force=force, defaults=json.loads(json.dumps(defaults)))
        lock.write_pid()
        ckpt = Checkpointer(out_dir, keep=cfg.keep, save_every=cfg.save_every, log=log)
        ckpt.remove_partial()  # [h3] a save killed mid-write leaves a tmp folder
        if resume:
            state = ckpt.restore(state)  # newest intact checkpoint, onto this run's shardings
            log(f"resumed from step {int(state.step)} in {ckpt.directory}")
        return _train_locked(cfg, recipe, mesh, step, jit_kw, state, put_batch, example, graphdef, data, ckpt,
                             out_dir, progress, stop)


def _train_locked(cfg, recipe, mesh, step, jit_kw, state, put_batch, example, graphdef, data, ckpt, out_dir,
                  progress, stop):
    """Compile, loop, evaluate: the part of :func:`train` that runs holding the run directory's lock."""
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        compiled = jax.jit(step, **jit_kw).lower(state, put_batch(example)).compile()
        eval_step = make_eval_step(graphdef, recipe.loss_fn)
        if "params" in cfg.offload:  # evaluate on a device copy of host-resident parameters
            eval_step = lambda p, r, b, f=eval_step: f(host_offload.to_device(p), r, b)  # noqa: E731
        eval_fn = jax.jit(eval_step)
        metrics_log = MetricsLog(out_dir / "metrics.jsonl")
        state, train_loss, t0 = _loop(cfg, recipe.name, compiled, eval_fn, state, data, put_batch, ckpt,
                                      metrics_log, progress, stop)
        if stop.requested:  # [h3] saved at a step boundary: say where to resume from
            raise RunInterrupted(stop.signum, f"stopped by {stop.name} after step {int(state.step)}; checkpoint "
                                              f"{int(state.step)} saved in {ckpt.directory}; continue with --resume "
                                              f"--out {out_dir}")
        val_loss, val_ppl = evaluate(eval_fn, state.params, state.rest, data.eval)
    metrics_log.write({"step": int(state.step), "val_loss": val_loss, "val_ppl": val_ppl})
    return {
        "steps": int(state.step), "train_loss": train_loss, "val_loss": val_loss, "val_ppl": val_ppl,
        "baselines": dict(data.baselines), "memory": report_from_analysis(compiled.memory_analysis()),
        "param_bytes": tree_bytes(state.params), "opt_state_bytes": tree_bytes(state.opt_state),
        "checkpoint_dir": str(ckpt.directory), "seconds": time.perf_counter() - t0, "state": state,
    }


def _make_step(cfg: TrainConfig, graphdef, tx, loss_fn, fp8_paths, loss_scaling: bool):
    """The un-jitted step for this run: zeroth order, fp8, accumulated or plain backprop."""
    if optim.is_zeroth_order(cfg.optimizer):
        if cfg.grad_accum > 1 or loss_scaling or fp8_paths or cfg.offload:
            raise ValueError(f"the zeroth-order optimizer {cfg.optimizer!r} takes no gradient: it cannot be "
                             f"combined with grad_accum={cfg.grad_accum}, loss scaling, fp8 or offload")
        return make_zeroth_order_step(graphdef, tx, loss_fn=loss_fn, seed=cfg.seed)
    if fp8_paths and cfg.grad_accum > 1:
        raise ValueError(f"fp8 scales update once per step; grad_accum={cfg.grad_accum} is not supported with fp8")
    if fp8_paths:
        grad_fn = precision.fp8_grad_fn(graphdef, loss_fn, fp8_paths)
    elif cfg.grad_accum > 1:
        grad_fn = accumulating_grad_fn(graphdef, loss_fn, cfg.grad_accum)
    else:
        grad_fn = None
    offload = host_offload.parse_offload(cfg.offload) if cfg.offload else frozenset()
    return make_train_step(graphdef, tx, loss_fn=loss_fn, grad_fn=grad_fn, seed=cfg.seed, loss_scaling=loss_scaling,
                           offload=offload)


def _loop(cfg, name, compiled, eval_fn, state, data, put_batch, ckpt, metrics_log, progress, stop=None):
    """Steps from ``state.step`` to ``cfg.steps``: log, evaluate and checkpoint on their intervals."""
    start = int(state.step)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress,
               desc=name, dynamic_ncols=True)
    train_loss, t0 = float("nan"), time.perf_counter()
    for step in bar:
        if stop is not None and stop.requested:  # [h3] a signal came: stop at this step boundary
            break
        state, metrics = compiled(state, put_batch(data.train.batch(step)))
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            train_loss = m["loss"]
            bar.set_postfix(loss=f"{train_loss:.3f}")
            metrics_log.write({"step": done, **m, "time": time.perf_counter() - t0})
        if done % cfg.eval_every == 0 and done != cfg.steps:
            val_loss, val_ppl = evaluate(eval_fn, state.params, state.rest, data.eval)
            metrics_log.write({"step": done, "val_loss": val_loss, "val_ppl": val_ppl})
            bar.write(f"step {done}: train loss {train_loss:.4f}  val loss {val_loss:.4f}  val ppl {val_ppl:.3f}")
        ckpt.save(state)
    bar.close()
    if ckpt.latest_step() != int(state.step):
        ckpt.save(state, force=True)
    ckpt.close()
    return state, train_loss, t0
