"""Orbax checkpoints of the train state, plus a guard that a run directory is not reused by mistake.

The state is saved with Orbax's ``CheckpointManager`` (every N steps and at the end, the
last K kept, written to a temporary folder and renamed when complete, so a killed save
never leaves a half checkpoint that looks finished). Restoring takes an abstract target
(``jax.ShapeDtypeStruct`` with shardings), so a state saved on one mesh restores onto
another.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from sciscale_jax.train.step import TrainState

CONFIG_FILE = "run_config.json"
# Fields a resumed run may change without being a different run (the mesh only changes placement).
RESUMABLE_CHANGES = ("steps", "eval_every", "save_every", "log_every", "keep", "mesh", "zero", "sharding")


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) matching ``tree``: a restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _drop_empty(tree):
    """Zero-size arrays (optimizer placeholders) become None: Orbax cannot write them."""
    return jax.tree.map(lambda x: None if x.size == 0 else x, tree)


def _refill_empty(restored, target):
    """Put back the zero-size arrays ``_drop_empty`` removed, shaped and placed as in ``target``."""
    return jax.tree.map(lambda r, t: jnp.zeros(t.shape, t.dtype, device=t.sharding) if r is None else r,
                        restored, target, is_leaf=lambda x: x is None)


class Checkpointer:
    """Save and restore ``TrainState`` under ``<run_dir>/checkpoints``."""

    def __init__(self, run_dir, *, keep: int = 3, save_every: int = 100):
        if keep < 1 or save_every < 1:
            raise ValueError(f"keep={keep} and save_every={save_every} must be >= 1")
        self.directory = pathlib.Path(run_dir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                               enable_async_checkpointing=False, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, *, force: bool = False) -> bool:
        """Save at ``state.step`` if the interval says so (or ``force``); returns whether it saved."""
        step = int(jax.device_get(state.step))
        saved = self.manager.save(step, args=ocp.args.StandardSave(_drop_empty(state._asdict())), force=force)
        self.manager.wait_until_finished()
        return saved

    def restore(self, target: TrainState, step: int | None = None) -> TrainState:
        """Restore ``step`` (default: latest) into the structure, dtypes and shardings of ``target``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        try:
            target_tree = target._asdict()
            restored = self.manager.restore(
                step, args=ocp.args.StandardRestore(_drop_empty(abstract_like(target_tree))))
        except Exception as err:  # Orbax raises many types for unreadable or mismatched data
            raise ValueError(f"checkpoint {self.directory / str(step)} cannot be restored into this run "
                             f"(corrupt, or saved by a different model or optimizer): {err}") from err
        return TrainState(**_refill_empty(restored, target_tree))

    def close(self):
        self.manager.close()


def check_run_dir(run_dir, run_config: dict, *, resume: bool, force: bool = False,
                  defaults: dict | None = None) -> None:
    """Refuse to start in a directory that holds another run; write ``run_config.json`` otherwise.

    - a directory with checkpoints and no ``resume``: refused (starting over would overwrite them);
    - ``resume`` with a saved config that differs outside ``RESUMABLE_CHANGES``: refused unless ``force``.
    ``defaults`` (same nesting as ``run_config``) gives the value a setting had before it
    existed: a saved config that lacks a field then matches a run that leaves it at its default.
    Nothing on disk changes before these checks pass.
    """
    run_dir = pathlib.Path(run_dir)
    run_config = json.loads(json.dumps(run_config))  # compare as it reads back (tuples -> lists)
    config_path = run_dir / CONFIG_FILE
    has_checkpoints = any((run_dir / "checkpoints").glob("[0-9]*")) if (run_dir / "checkpoints").is_dir() else False
    if config_path.exists():
        try:
            saved = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_path} is not valid JSON ({err}); refusing to reuse {run_dir}") from err
        diff = _config_diff(_fill(saved, defaults or {}), run_config)
        if diff and not force:
            raise ValueError(f"output directory {run_dir} holds a different run; differing settings: "
                             + "; ".join(diff) + ". Choose another --out, or pass --force to reuse it.")
    if has_checkpoints and not resume:
        raise ValueError(f"output directory {run_dir} already holds checkpoints; pass --resume to continue "
                         "that run, or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = config_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(run_config, indent=2, sort_keys=True))
    tmp.replace(config_path)


def _fill(saved: dict, defaults: dict) -> dict:
    """``saved`` with the keys it lacks taken from ``defaults``, recursively."""
    out = dict(saved)
    for key, value in defaults.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _fill(out[key], value)
        elif key not in out:
            out[key] = value
    return out


def _config_diff(saved: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(new)):
        a, b = saved.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, f"{prefix}{key}.")
        elif a != b and key not in RESUMABLE_CHANGES:
            out.append(f"{prefix}{key}: saved {a!r}, now {b!r}")
    return out
