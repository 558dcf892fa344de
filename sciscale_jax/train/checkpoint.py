"""Orbax checkpoints of the train state, plus a guard that a run directory is not reused by mistake.

The state is saved with Orbax's ``CheckpointManager`` (every N steps and at the end, the
last K kept, written to a temporary folder and renamed when complete, so a killed save
never leaves a half checkpoint that looks finished). Restoring takes an abstract target
(``jax.ShapeDtypeStruct`` with shardings), so a state saved on one mesh restores onto
another.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import logging
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from sciscale_jax.train.step import TrainState

CONFIG_FILE = "run_config.json"
TMP_MARKER = ".orbax-checkpoint-tmp"  # Orbax writes a step here first and renames it when complete
# Fields a resumed run may change without being a different run (the mesh only changes placement).
RESUMABLE_CHANGES = ("steps", "eval_every", "save_every", "log_every", "keep", "mesh", "zero", "sharding",
                     "samples", "temperature", "top_k",  # sampling after training, not training
                     "pipeline_schedule", "microbatches", "virtual_stages", "prefetch",
                     "async_checkpoint")


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


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or none could be read; the message is one line."""


@contextlib.contextmanager
def _quiet_orbax():
    """Hold back Orbax's absl warnings and thread tracebacks: the caller reports failures in one line."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


_TEARDOWN_NOISE = ("Event loop is closed", "sys.meta_path is None")


def _mute_teardown_noise() -> None:
    """Drop the tracebacks of Orbax/TensorStore callbacks that fire after a failed read or write closed its event loop.

    Only exceptions whose message is one of ``_TEARDOWN_NOISE`` are dropped; every other
    exception reaches the hooks that were installed before. Idempotent.
    """
    def noise(value) -> bool:
        return any(text in str(value) for text in _TEARDOWN_NOISE)

    if not getattr(sys.excepthook, "_sciscale_quiet", False):
        previous = sys.excepthook

        def excepthook(kind, value, tb):
            if not noise(value):
                previous(kind, value, tb)
        excepthook._sciscale_quiet = True
        sys.excepthook = excepthook
    if not getattr(sys.unraisablehook, "_sciscale_quiet", False):
        previous_unraisable = sys.unraisablehook

        def unraisablehook(info):
            if not noise(info.exc_value):
                previous_unraisable(info)
        unraisablehook._sciscale_quiet = True
        sys.unraisablehook = unraisablehook
    asyncio_log = logging.getLogger("asyncio")  # the failed write's futures are collected unread
    if not any(getattr(f, "_sciscale_quiet", False) for f in asyncio_log.filters):
        def unread_future(record) -> bool:
            return not str(record.msg).startswith("Future exception was never retrieved")
        unread_future._sciscale_quiet = True
        asyncio_log.addFilter(unread_future)


def _path_name(path) -> str:
    """"a/b/0" of a jax key path: dict keys, list indices and NamedTuple fields read back alike ('0', 'mu')."""
    def name(entry):
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                return str(getattr(entry, attr))
        return str(entry)
    return "/".join(name(e) for e in path)


def _signature(tree) -> dict:
    """{"a/b/0": (shape, dtype)} of the array leaves of ``tree`` (None leaves skipped)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {_path_name(path): (tuple(v.shape), str(jnp.dtype(v.dtype))) for path, v in leaves}


def fingerprint(tree) -> str:
    """A digest (16 hex digits) of the key paths, shapes, dtypes and bits of every array in ``tree``,
    the same however the arrays are sharded: each array's bits, mixed with their positions, are
    summed modulo 2**32 on the devices (integer sums do not depend on their order)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    sums = jax.device_get(jax.jit(lambda xs: [_bits_sum(x) for x in xs])([x for _, x in leaves]))
    digest = hashlib.sha256()
    for (path, x), total in zip(leaves, sums):
        digest.update(f"{_path_name(path)}:{tuple(x.shape)}:{jnp.dtype(x.dtype)}:{int(total)};".encode())
    return digest.hexdigest()[:16]


def _bits_sum(x) -> jax.Array:
    """uint32 sum of a hash of each element's bits and flat index (murmur3's finaliser)."""
    width = jnp.dtype(x.dtype).itemsize
    bits = x.astype(jnp.uint8) if x.dtype == jnp.bool_ else jax.lax.bitcast_convert_type(
        x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[width])
    if width == 8:
        bits = bits ^ (bits >> 32)
    h = bits.astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    for axis, n in enumerate(x.shape):  # the flat index, modulo 2**32
        index = index * jnp.uint32(n) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
    h = h ^ (index * jnp.uint32(0x9E3779B9) + jnp.uint32(0x7F4A7C15))
    for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        h = (h ^ (h >> shift)) * jnp.uint32(multiplier)
    return jnp.sum(h ^ (h >> 16), dtype=jnp.uint32)


class Checkpointer:
    """Save and restore ``TrainState`` under ``<run_dir>/checkpoints``.

    :meth:`restore` checks the newest checkpoint before trusting it: a step folder whose
    metadata cannot be read or whose arrays cannot be read back is damaged; it is renamed to
    ``<step>.damaged-<time>`` (never deleted) and the next older one is tried. A checkpoint
    whose arrays have other shapes or dtypes than the run's state belongs to a different
    model or optimizer: that is an error, not damage, and nothing is moved.

    ``leave_out``: a predicate on parameter key paths (tuples of keys) of parameters not written
    (a LoRA run's frozen weights, read again from where the run started): :meth:`restore` then
    takes them from its target, which must hold them as arrays.
    """

    def __init__(self, run_dir, *, keep: int = 3, save_every: int = 100, log=print, leave_out=None,
                 async_write: bool = False):
        if keep < 1 or save_every < 1:
            raise ValueError(f"keep={keep} and save_every={save_every} must be >= 1")
        self.directory = pathlib.Path(run_dir).absolute() / "checkpoints"
        self.log = log
        self.leave_out = leave_out
        self.async_write, self._writing = async_write, None  # the step being written in the background
        self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                                     enable_async_checkpointing=async_write, create=True)
        with _quiet_orbax():
            self.manager = ocp.CheckpointManager(self.directory, options=self._options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state: TrainState, *, force: bool = False, step: int | None = None) -> bool:
        """Save at ``state.step`` (``step`` where the caller counts it: the device is then waited for
        only when the interval says to save) if the interval says so (or ``force``); returns whether
        it saved.

        A failed write (disk full, permissions) removes its temporary folder, keeps the earlier
        checkpoints and raises :class:`CheckpointError` with one line. With ``async_write`` the
        state is copied to host memory here and written in the background while training goes
        on (Orbax's asynchronous checkpointing); a failed write is raised by the next save that
        writes, or by :meth:`finish` / :meth:`close`.
        """
        step = int(jax.device_get(state.step)) if step is None else step
        if not force and not self.manager.should_save(step):
            return False
        self.finish()  # one write at a time: the previous one's failure is raised here
        try:
            with _quiet_orbax():
                saved = self.manager.save(step, args=ocp.args.StandardSave(_drop_empty(self._written(state._asdict()))),
                                          force=True)  # should_save was asked above
                if not self.async_write:
                    self.manager.wait_until_finished()
        except BaseException as err:
            self._failed(step, err)
        if saved and self.async_write:
            self._writing = step
        return saved

    def finish(self) -> None:
        """Wait for the checkpoint being written in the background (``async_write``), if any;
        :class:`CheckpointError` in one line if its write failed."""
        step, self._writing = self._writing, None
        if step is None:
            return
        try:
            with _quiet_orbax():
                self.manager.wait_until_finished()
                self.manager.check_for_errors()
        except BaseException as err:
            self._failed(step, err)

    def _failed(self, step: int, err: BaseException):
        """Remove the partial write of ``step`` and raise ``err`` as one line (re-raise an interrupt)."""
        _mute_teardown_noise()  # the failed write's callbacks keep firing into a closed event loop
        removed = self.remove_partial()
        if not isinstance(err, Exception):  # KeyboardInterrupt, SystemExit: partial write removed, re-raise
            raise err
        reason = f"{type(err).__name__}: {err}".splitlines()[0] if not isinstance(err, OSError) else str(err)
        if "No space left" in str(err) or getattr(err, "errno", None) == errno.ENOSPC:
            reason = "no space left on device"
        kept = self._steps_on_disk()
        raise CheckpointError(f"could not write checkpoint {step} under {self.directory} ({reason}); "
                              f"removed the partial write{' ' + ', '.join(removed) if removed else ''}; "
                              f"earlier checkpoints kept: {kept or 'none'}") from None

    def remove_partial(self) -> list[str]:
        """Delete unfinished ``*.orbax-checkpoint-tmp*`` folders (only this run writes here); their names."""
        removed = []
        if self.directory.is_dir():
            for path in self.directory.iterdir():
                if TMP_MARKER in path.name:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path.name)
        return removed

    def _steps_on_disk(self) -> list[int]:
        return _step_folders(self.directory)

    def restore(self, target: TrainState, step: int | None = None) -> TrainState:
        """Restore ``step``, or the newest intact checkpoint, into the structure, dtypes and shardings of ``target``.

        Without ``step``, damaged checkpoints are moved aside (one line each through ``log``)
        and older ones tried. ``CheckpointError`` if none is readable; ``ValueError`` if the
        checkpoint holds a different model or optimizer.
        """
        target_tree = target._asdict()
        abstract = _drop_empty(abstract_like(self._written(target_tree)))
        candidates = [step] if step is not None else self._steps_on_disk()[::-1]
        if not candidates:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        moved = []
        for candidate in candidates:
            path = self.directory / str(candidate)
            problem = self._check(candidate, abstract)
            if problem is None:
                try:
                    with _quiet_orbax():
                        restored = self.manager.restore(candidate, args=ocp.args.StandardRestore(abstract))
                    restored = {**restored, "params": self._put_back(restored["params"], target_tree["params"])}
                    return TrainState(**_refill_empty(restored, target_tree))
                except Exception as err:  # the arrays' bytes are unreadable (truncated, zeroed, deleted files)
                    problem = _unreadable(err)
            if step is not None or jax.process_count() > 1:  # processes must not rename folders under each other
                raise CheckpointError(f"checkpoint {path} is damaged: {problem}"
                                      + ("; move it aside and resume" if step is None else ""))
            aside = self.move_aside(candidate)
            moved.append(aside.name)
            self.log(f"checkpoint {candidate} is damaged ({problem}); moved it to {aside}")
        raise CheckpointError(f"no readable checkpoint under {self.directory}; damaged ones moved aside: "
                              + ", ".join(moved))

    def _written(self, tree: dict) -> dict:
        """``tree`` (a TrainState as a dict) with the parameters ``leave_out`` picks as None."""
        if self.leave_out is None:
            return tree
        flat = traverse_util.flatten_dict(tree["params"], keep_empty_nodes=True)
        return {**tree, "params": traverse_util.unflatten_dict(
            {p: None if self.leave_out(p) and v is not traverse_util.empty_node else v for p, v in flat.items()})}

    def _put_back(self, restored: dict, target: dict) -> dict:
        """``restored`` parameters with the ones left out taken from ``target``."""
        if self.leave_out is None:
            return restored
        flat, given = (traverse_util.flatten_dict(t, keep_empty_nodes=True) for t in (restored, target))
        return traverse_util.unflatten_dict({p: given[p] if self.leave_out(p) and v is None else v
                                             for p, v in flat.items()})

    def _check(self, step: int, abstract) -> str | None:
        """None if step ``step`` looks complete and matches ``abstract``; else what is wrong with it.

        Raises ValueError (not damage) when its arrays have other shapes or dtypes than the run.
        """
        return _check_item(self.directory / str(step), abstract)

    def move_aside(self, step: int) -> pathlib.Path:
        """Rename step folder ``step`` to ``<step>.damaged-<UTC time>`` (Orbax then ignores it); its new path."""
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
        aside = self.directory / f"{step}.damaged-{stamp}"
        n = 1
        while aside.exists():
            aside, n = self.directory / f"{step}.damaged-{stamp}-{n}", n + 1
        (self.directory / str(step)).rename(aside)
        with _quiet_orbax():
            self.manager.close()
            self.manager = ocp.CheckpointManager(self.directory, options=self._options)
        return aside

    def close(self):
        """Finish a background write (its failure raised, as by :meth:`finish`), then close."""
        try:
            self.finish()
        finally:
            with _quiet_orbax():
                self.manager.close()


def _step_folders(directory: pathlib.Path) -> list[int]:
    """The step numbers of the checkpoint folders under ``directory``, ascending."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def _unreadable(err: Exception) -> str:
    """What is wrong with a checkpoint whose arrays failed to read back with ``err`` (one line)."""
    _mute_teardown_noise()
    detail = (str(err).splitlines() or [""])[0].split(" See full")[0][:120]
    return f"its array data cannot be read back: {detail}"


def _check_item(step_dir: pathlib.Path, abstract, only: tuple[str, ...] = (),
                hint: str = "choose another --out or the matching settings", saved: dict | None = None) -> str | None:
    """None if checkpoint folder ``step_dir`` looks complete and its arrays match ``abstract`` (those
    under the top-level keys ``only``, if given); else what is wrong with it. A shape or dtype
    mismatch is a ValueError (another model or optimizer), not damage. ``saved``: the folder's
    ``_saved_signature`` when the caller has read it already."""
    item = step_dir / "default"
    if not item.is_dir():
        return f"it has no {item.name}/ folder"
    saved = saved if saved is not None else _saved_signature(step_dir)
    if saved is None:
        return "its metadata is missing or unreadable"
    expected = _signature(abstract)
    if only:
        saved = {k: v for k, v in saved.items() if k.split("/")[0] in only}
    if saved != expected:
        diff = [f"{k}: saved {saved.get(k, 'absent')}, run {expected.get(k, 'absent')}"
                for k in sorted(set(saved) | set(expected)) if saved.get(k) != expected.get(k)]
        raise ValueError(f"checkpoint {step_dir} was saved by a different model or optimizer "
                         f"({len(diff)} arrays differ, e.g. {diff[0]}); {hint}")
    return None


def _saved_signature(step_dir: pathlib.Path) -> dict | None:
    """``_signature`` of the arrays checkpoint folder ``step_dir`` holds; None if unreadable."""
    try:
        with _quiet_orbax():
            meta = ocp.StandardCheckpointer().metadata(step_dir / "default")
        return _signature(meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree)
    except Exception:
        return None


def _as_saved(target: dict, saved: dict | None, optional, cast: bool) -> dict:
    """``target`` (a nested dict of ``ShapeDtypeStruct``s) adapted to the checkpoint's arrays ``saved``:
    parameters it lacks that ``optional`` accepts left out, and with ``cast`` each array read in
    the checkpoint's dtype."""
    if saved is None:
        return target
    flat = traverse_util.flatten_dict(target, keep_empty_nodes=True)
    out = {}
    for path, leaf in flat.items():
        name = _path_name(path)
        if name not in saved and optional is not None and path[0] == "params" and optional(path[1:]):
            continue
        if cast and name in saved and isinstance(leaf, jax.ShapeDtypeStruct) and saved[name][1] != str(leaf.dtype):
            leaf = jax.ShapeDtypeStruct(leaf.shape, jnp.dtype(saved[name][1]), sharding=leaf.sharding)
        out[path] = leaf
    return traverse_util.unflatten_dict(out)


def restore_model(run_dir, params, rest, step: int | None = None, *, log=print,
                  hint: str = "load it with the settings it was trained with", optional=None,
                  cast: bool = False) -> tuple[int, dict, dict]:
    """``(step, params, rest)`` from ``step`` or the newest readable checkpoint of ``run_dir``; the
    optimizer state is not read.

    ``params`` and ``rest`` (arrays or ``ShapeDtypeStruct``s with shardings) give the structure,
    dtypes and placement; ``rest=None`` reads the parameters alone (and returns None for it).
    ``optional`` (a predicate on parameter key paths): parameters the checkpoint may lack (new
    LoRA adapters), then absent from the result; with ``cast`` arrays saved in another float
    dtype are read as saved and converted (a LoRA run's frozen weights in the compute dtype).
    Read-only, so a run still training in the directory is left alone: a damaged checkpoint is
    skipped with one line through ``log``, never moved aside (with ``step`` given it is an error).
    ``FileNotFoundError`` names the steps there are; ``CheckpointError`` when none is readable;
    ``ValueError`` when the checkpoint holds a different model (its message ends with ``hint``).
    """
    directory = pathlib.Path(run_dir).absolute() / "checkpoints"
    steps = _step_folders(directory)
    if step is not None and step not in steps:
        raise FileNotFoundError(f"no checkpoint {step} under {directory}; there are: {steps or 'none'}")
    if not steps:
        raise FileNotFoundError(f"no checkpoint under {directory}")
    wanted = abstract_like({"params": params} if rest is None else {"params": params, "rest": rest})
    skipped = []
    for candidate in [step] if step is not None else steps[::-1]:
        step_dir = directory / str(candidate)
        target, saved = wanted, None
        if optional is not None or cast:
            saved = _saved_signature(step_dir)
            target = _as_saved(wanted, saved, optional, cast)
        abstract = _drop_empty(target)
        problem = _check_item(step_dir, abstract, only=tuple(target), hint=hint, saved=saved)
        if problem is None:
            try:
                reader = ocp.PyTreeCheckpointer()
                try:
                    with _quiet_orbax():
                        restored = reader.restore(step_dir / "default", args=ocp.args.PyTreeRestore(
                            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                            partial_restore=True))
                finally:
                    reader.close()
                restored = _refill_empty(restored, target)
                if cast:  # into the dtypes asked for
                    flat = traverse_util.flatten_dict(wanted, keep_empty_nodes=True)
                    restored = traverse_util.unflatten_dict({
                        p: v.astype(flat[p].dtype) if hasattr(v, "astype") and v.dtype != flat[p].dtype else v
                        for p, v in traverse_util.flatten_dict(restored, keep_empty_nodes=True).items()})
                return candidate, restored["params"], restored.get("rest")
            except Exception as err:  # the arrays' bytes are unreadable (truncated, zeroed, deleted files)
                problem = _unreadable(err)
        if step is not None:
            raise CheckpointError(f"checkpoint {step_dir} is damaged: {problem}")
        skipped.append(str(candidate))
        log(f"checkpoint {candidate} is damaged ({problem}); trying an older one")
    raise CheckpointError(f"no readable checkpoint under {directory} (damaged: {', '.join(skipped)})")


def place_arrays(readers: dict, target, source: str):
    """``target``'s tree (``ShapeDtypeStruct`` leaves with shardings) filled from ``readers``, a
    nested dict of the same keys whose leaves return numpy arrays when called (another library's
    checkpoint: ``Recipe.init_params``). One array is read and placed at a time, each device (each
    process) taking its shards, so the host holds one array of the checkpoint at most. ValueError
    in one line naming ``source`` and the first parameter missing, extra or of another shape."""
    wanted = {_path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
    given = {_path_name(path): fn for path, fn in jax.tree_util.tree_flatten_with_path(readers, is_leaf=callable)[0]}
    for name in sorted(set(wanted) ^ set(given)):
        raise ValueError(f"{source}: {'no parameter' if name in wanted else 'a parameter the model lacks:'} {name}")

    def place(path, leaf):
        array = given[_path_name(path)]()
        if array.shape != tuple(leaf.shape):
            raise ValueError(f"{source}: parameter {_path_name(path)} has shape {array.shape}, the model's is "
                             f"{tuple(leaf.shape)}")
        return jax.make_array_from_callback(leaf.shape, leaf.sharding,
                                            lambda index: np.asarray(array[index], dtype=leaf.dtype))

    return jax.tree_util.tree_map_with_path(place, target)


def check_run_dir(run_dir, run_config: dict, *, resume: bool, force: bool = False,
                  defaults: dict | None = None, write: bool = True, also: tuple[str, ...] = ()) -> None:
    """Refuse to start in a directory that holds another run; write ``run_config.json`` otherwise.

    - a directory with checkpoints and no ``resume``: refused (starting over would overwrite them);
    - ``resume`` with a saved config that differs outside ``RESUMABLE_CHANGES`` and ``also`` (or
      is another recipe's run, said first): refused unless ``force``.
    ``defaults`` (same nesting as ``run_config``) gives the value a setting had before it
    existed: a saved config that lacks a field then matches a run that leaves it at its default.
    Nothing on disk changes before these checks pass; with ``write=False`` (every process of a
    multi-process run but the first) nothing is written at all.
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
        if isinstance(saved, dict) and isinstance(saved.get("recipe"), str) \
                and saved["recipe"] != run_config.get("recipe") and not force:
            raise ValueError(f"output directory {run_dir} holds a {saved.get('recipe')!r} run, not a "
                             f"{run_config.get('recipe')!r} one; choose another --out")
        diff = _config_diff(_effective_schedule(_fill(saved, defaults or {})), _effective_schedule(run_config),
                            also=also)
        if diff and not force:
            raise ValueError(f"output directory {run_dir} holds a different run; differing settings: "
                             + "; ".join(diff) + ". Choose another --out, or pass --force to reuse it.")
    if has_checkpoints and not resume:
        raise ValueError(f"output directory {run_dir} already holds checkpoints; pass --resume to continue "
                         "that run, or choose another --out")
    if not write:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = config_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(run_config, indent=2, sort_keys=True))
    tmp.replace(config_path)


def _effective_schedule(config: dict) -> dict:
    """``config`` with ``train.schedule_steps`` 0 (follow steps) replaced by the steps it stands for."""
    train = config.get("train")
    if not isinstance(train, dict) or "steps" not in train or "schedule_steps" not in train:
        return config
    return {**config, "train": {**train, "schedule_steps": train["schedule_steps"] or train["steps"]}}


def _fill(saved: dict, defaults: dict) -> dict:
    """``saved`` with the keys it lacks taken from ``defaults``, recursively."""
    out = dict(saved)
    for key, value in defaults.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _fill(out[key], value)
        elif key not in out:
            out[key] = value
    return out


def _config_diff(saved: dict, new: dict, prefix: str = "", also: tuple[str, ...] = ()) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(new)):
        a, b = saved.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, f"{prefix}{key}.", also)
        elif a != b and key not in RESUMABLE_CHANGES and key not in also:
            out.append(f"{prefix}{key}: saved {a!r}, now {b!r}")
    return out
