"""The ``sciscale`` command: ``sciscale train <recipe> [flags]``, ``sciscale plan <recipe> [flags]``,
``sciscale eval <run_dir>``, ``sciscale embed <run_dir>`` and ``sciscale recipes``.

Flags are generated from the dataclasses: the recipe's model config (its own fields and the
technique switches it inherits) and ``TrainConfig``. A field's metadata may rename its flag
(``"flag"``), restrict its values (``"choices"``, a tuple or a function giving one), place it
in a group (``"group"``), describe it (``"help"``) or hide it (``"cli": False``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import pathlib
import sys
import typing


class UsageError(ValueError):
    """A flag the command line cannot take (unknown, or a value outside its type or choices)."""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors become one line through ``main``'s error handler (exit 2)."""

    def error(self, message):
        raise UsageError(message)


BASE_HELP = ("where an adapters-only LoRA run's frozen base (its --init-from) is now, if it moved; read-only: the "
             "run is not changed, the base's fingerprint is checked")
MESH_LOAD_HELP = ("load the weights sharded over this mesh, e.g. fsdp=8 or fsdp=4,tensor=2 (any axes but pipeline; "
                  "any mesh, whatever the run trained on); default: one device")


def _flag(field: dataclasses.Field) -> str:
    return "--" + field.metadata.get("flag", field.name).replace("_", "-")


def _flag_text(field: dataclasses.Field, value) -> str:
    """The command-line text that sets ``field`` to ``value`` (booleans: ``--x`` / ``--no-x``)."""
    if isinstance(value, bool):
        return _flag(field) if value else "--no-" + _flag(field)[2:]
    return f"{_flag(field)} {value}"


def _add_config_flags(parser, cls, defaults: dict, prefix: str, default_group: str, groups: dict):
    """One flag per CLI-visible field of dataclass ``cls``; values land in ``<prefix>.<field>``."""
    from sciscale_jax.models.stack import technique_fields

    hints, technique_names = typing.get_type_hints(cls), technique_fields()
    for field in dataclasses.fields(cls):
        if not field.metadata.get("cli", True):
            continue
        group_name = field.metadata.get("group", "techniques" if field.name in technique_names else default_group)
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        group = groups[group_name]
        default = defaults.get(field.name, field.default)
        shown = "required" if default is dataclasses.MISSING else repr(default)
        text = field.metadata.get("help", "")
        help_text = f"{text} (default: {shown})" if text else f"default: {shown}"
        kind = hints[field.name]
        # absent flags stay out of the namespace, so ``--x none`` (None) differs from "not given"
        kw = dict(dest=f"{prefix}.{field.name}", default=argparse.SUPPRESS, help=help_text,
                  metavar=getattr(kind, "__name__", "str").upper())
        choices = field.metadata.get("choices")
        if callable(choices):
            choices = choices()
        if choices is not None:
            kw["choices"] = tuple(choices)
            kw["metavar"] = "{" + ",".join(map(str, choices)) + "}"
        if kind is bool:  # --x / --no-x take no value (a metavar there is deprecated from Python 3.12)
            kw.pop("metavar")
            group.add_argument(_flag(field), action=argparse.BooleanOptionalAction, **kw)
        elif kind in (int, float, str):
            group.add_argument(_flag(field), type=kind, **kw)
        elif kind in (str | None, typing.Optional[str]):
            group.add_argument(_flag(field), type=str, **kw)
        elif kind in (int | None, typing.Optional[int], float | None, typing.Optional[float]):
            base = int if int in typing.get_args(kind) else float
            kw["metavar"] = f"{base.__name__.upper()}|none"
            group.add_argument(_flag(field), type=_optional(base), **kw)
        else:
            raise TypeError(f"{cls.__name__}.{field.name}: no CLI flag for type {kind}; mark it cli=False")


def _optional(base):
    """argparse type: ``none`` (any case) for None, else ``base(text)``."""
    def parse(text: str):
        return None if text.lower() == "none" else base(text)
    parse.__name__ = base.__name__
    return parse


def _picked(args, prefix: str) -> dict:
    """The ``<prefix>.<field>`` flags given on the command line (``none`` included, as None)."""
    return {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith(prefix + ".")}


def _base_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sciscale", description="Memory-efficient training of transformers for science.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("recipes", help="list the training recipes")
    t = sub.add_parser("train", help="train a recipe", add_help=False,
                       description="Train a recipe; unset flags take the recipe's defaults (with --resume: the "
                                   "run's own settings; with --init-from a run: that run's model settings). "
                                   "`sciscale train <recipe> --help` lists that recipe's flags.")
    t.add_argument("recipe", nargs="?", help="recipe name (see `sciscale recipes`)")
    t.add_argument("-h", "--help", action="store_true", help="show the recipe's flags and exit")
    pl = sub.add_parser("plan", help="pick the technique mix that fits a memory budget", add_help=False,
                        description="`sciscale plan <recipe> --devices N --memory 80GiB [flags]`")
    pl.add_argument("recipe", nargs="?", help="recipe name (see `sciscale recipes`)")
    pl.add_argument("-h", "--help", action="store_true", help="show the recipe's flags and exit")
    e = sub.add_parser("eval", help="evaluate a trained run's checkpoint", add_help=False,
                       description="`sciscale eval <run_dir> [--step N] [model flags]`; "
                                   "`sciscale eval <run_dir> --help` lists the flags")
    e.add_argument("run_dir", nargs="?", help="the --out of a `sciscale train` run")
    e.add_argument("-h", "--help", action="store_true", help="show the flags and exit")
    em = sub.add_parser("embed", help="a trained run's representations of the inputs in a file (protein-mlm: FASTA; "
                                         "msa-evoformer: an alignment; smiles-lm: SMILES; weather-vit: its "
                                         "forecasts of Zarr/NetCDF fields)",
                        description="Restore a run's newest readable checkpoint (or --step) on one device (or sharded "
                                    "over --mesh) and save its embeddings of --input to --out (.npz).")
    em.add_argument("run_dir", help="the --out of a `sciscale train` run, or an ESM-2 checkpoint folder in Hugging "
                                    "Face's layout (config.json, model.safetensors) for protein-mlm's embeddings")
    em.add_argument("--input", required=True, metavar="FILE",
                    help="inputs (protein-mlm: a FASTA file; msa-evoformer: a Stockholm, A3M or aligned FASTA "
                         "file, query first; smiles-lm: a .smi, .csv or .txt file of SMILES, first column; "
                         "each may be .gz; weather-vit: Zarr stores or NetCDF files, comma-separated, holding the "
                         "run's channels on its grid)")
    em.add_argument("--out", required=True, metavar="FILE", help="where to write the .npz (weather-vit: or a .zarr "
                                                                 "or .nc dataset in WeatherBench 2's layout)")
    em.add_argument("--step", type=int, help="use this checkpoint (default: the newest readable one)")
    em.add_argument("--batch-size", type=int, default=16, help="inputs per forward pass (default: 16)")
    em.add_argument("--mesh", metavar="AXES", help=MESH_LOAD_HELP)
    em.add_argument("--base", metavar="PATH", help=BASE_HELP)
    em.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    em.epilog = "recipe switches: " + "; ".join(
        f"{r.name}: " + ", ".join(f"--{n.replace('_', '-')} ({text})" for n, text in r.embed_options.items())
        for r in _recipes().values() if r.embed_options)
    x = sub.add_parser("export", help="write a trained run in another library's layout (protein-mlm: Hugging Face's "
                                      "EsmForMaskedLM, or its LoRA adapters alone in PEFT's layout)",
                       description="Restore a run's newest readable checkpoint (or --step) and write its model into a "
                                   "new folder --out in the layout the recipe exports (protein-mlm: config.json, "
                                   "model.safetensors and vocab.txt that transformers' EsmForMaskedLM.from_pretrained "
                                   "reads, LoRA adapters folded in; with --adapters, adapter_config.json and "
                                   "adapter_model.safetensors that peft's PeftModel.from_pretrained puts on the ESM-2 "
                                   "checkpoint the run started from).")
    x.add_argument("run_dir", help="the --out of a `sciscale train` run")
    x.add_argument("--out", required=True, metavar="FOLDER", help="the folder to write (must not exist)")
    x.add_argument("--step", type=int, help="use this checkpoint (default: the newest readable one)")
    x.add_argument("--base", metavar="PATH", help=BASE_HELP)
    x.add_argument("--adapters", action="store_true", help="the LoRA adapters alone (PEFT's layout), for a LoRA run "
                                                           "started from an ESM-2 checkpoint")
    x.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="the tensors' dtype in the file (default: float32)")
    x.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    c = sub.add_parser("cache", help="list what the data cache holds (packed corpora, simulations) and remove "
                                     "entries", description="List the entries of the data cache ($SCISCALE_CACHE, "
                                                            "else ~/.cache/sciscale_jax) with their sizes, or remove "
                                                            "some.")
    c.add_argument("--remove", nargs="+", metavar="PATH", help="remove these entries (paths as listed)")
    c.add_argument("--remove-unused", action="store_true",
                   help="remove the entries no run reads any more: packs whose source files are gone, folders left "
                        "by a killed writer, files of an earlier version's format")
    c.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    return p


def _recipes() -> dict:
    from sciscale_jax.recipes import RECIPES
    return RECIPES


def train_parser(recipe) -> argparse.ArgumentParser:
    """The full parser of ``sciscale train <recipe>``: run flags, then the recipe's model flags."""
    from sciscale_jax.train import TrainConfig

    p = _Parser(prog=f"sciscale train {recipe.name}", description=f"{recipe.name}: {recipe.description}")
    p.add_argument("--out", help="run directory (default: runs/<recipe>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out; flags left "
                   "out keep the run's settings, flags given must match them (but steps, eval, save and log "
                   "intervals, keep, mesh, zero, sharding, pipeline schedule)")
    p.add_argument("--force", action="store_true", help="reuse --out even if its saved config differs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    _add_distributed_flags(p)
    groups = {}
    _add_config_flags(p, TrainConfig, recipe.train_defaults, "train", "run", groups)
    _add_config_flags(p, recipe.config_class, recipe.model_defaults, "model", "model", groups)
    return p


def _add_distributed_flags(parser) -> None:
    g = parser.add_argument_group("multi-process (jax.distributed; run one process per host or per GPU)")
    g.add_argument("--distributed", action="store_true",
                   help="join a jax.distributed job first (eval: with --mesh over every process's devices); without "
                        "the three flags below the job is detected from the environment (Slurm, Open MPI, TPU pods, "
                        "JobSet)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0, which serves the job")
    g.add_argument("--num-processes", type=int, metavar="N", help="processes in the job")
    g.add_argument("--process-id", type=int, metavar="I", help="this process's id, 0..N-1")
    g.add_argument("--distributed-timeout", type=int, default=300, metavar="S",
                   help="seconds to wait for every process to connect before failing (default: 300)")


def start_distributed(args) -> None:
    """``jax.distributed.initialize`` from the ``--distributed`` flags (nothing without ``--distributed``)."""
    from sciscale_jax.parallel import multihost

    given = [f for f in ("coordinator", "num_processes", "process_id") if getattr(args, f, None) is not None]
    if not getattr(args, "distributed", False):
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} needs --distributed")
        return
    multihost.initialize(args.coordinator, args.num_processes, args.process_id, timeout_s=args.distributed_timeout)


def model_settings(recipe, picked: dict, init_from: str, base: dict | None = None) -> dict:
    """The model flags given (``picked``) over what an ``--init-from`` checkpoint of another library
    fixes (``Recipe.init_settings``: ESM-2's depth and widths) over ``base`` (the settings a flag left
    out takes instead of the recipe's default: ``run_settings``); a flag that contradicts what the
    checkpoint fixes is refused."""
    fixed = recipe.init_settings(init_from) if init_from and recipe.init_settings is not None else None
    if not fixed:
        return {**(base or {}), **picked}
    fields = {f.name: f for f in dataclasses.fields(recipe.config_class)}
    for name, value in picked.items():
        if name in fixed and value != fixed[name]:
            raise UsageError(f"{_flag_text(fields[name], value)}: --init-from {init_from} fixes {name}={fixed[name]!r} "
                             "(leave the flag out)")
    return {**(base or {}), **fixed, **picked}


def run_settings(recipe, run_dir, kind: str, cls, leave=()) -> dict:
    """The settings (``kind``: "model" or "train") a flag of class ``cls`` left out takes from the
    ``sciscale train`` run of ``recipe`` in ``run_dir``: its saved values of the fields the command
    line sets, those named in ``leave`` excepted; {} where ``run_dir`` holds no run of ``recipe``
    (what reads it later says why in one line)."""
    from sciscale_jax.train import rundir

    saved = rundir.saved_config(run_dir) if run_dir else None
    if not isinstance(saved, dict) or saved.get("recipe") != recipe.name or not isinstance(saved.get(kind), dict):
        return {}
    known = {f.name for f in dataclasses.fields(cls) if f.metadata.get("cli", True)} - set(leave)
    return {k: v for k, v in saved[kind].items() if k in known}


def build_configs(argv_or_args, recipe=None, note=None):
    """(recipe, model config, TrainConfig) from ``sciscale train`` arguments over the recipe's
    defaults. Where a flag is left out, a resumed run (``--resume``) keeps its saved setting (so
    ``--resume --steps N`` alone extends a run; a flag given that differs is refused later, by
    ``checkpoint.check_run_dir``), and a run started from another run of the recipe
    (``--init-from RUN``) takes RUN's model settings but the technique switches (``Techniques``:
    precision, remat, LoRA, ... are this run's choice). ``note`` (a print function) is told where
    the settings came from."""
    from sciscale_jax.models.stack import technique_fields
    from sciscale_jax.recipes import get_recipe
    from sciscale_jax.train import TrainConfig

    if isinstance(argv_or_args, argparse.Namespace):
        args = argv_or_args
    else:
        recipe = get_recipe(argv_or_args[0])
        args = train_parser(recipe).parse_args(argv_or_args[1:])
    out = getattr(args, "out", None) if getattr(args, "resume", False) else None
    train_base = run_settings(recipe, out, "train", TrainConfig)
    train_cfg = TrainConfig(**{**recipe.train_defaults, **train_base, **_picked(args, "train")})
    init_from = str(train_cfg.init_from)
    if train_base:
        model_base, source = run_settings(recipe, out, "model", recipe.config_class), f"the run in {out} (resumed)"
    else:
        model_base = run_settings(recipe, init_from, "model", recipe.config_class, leave=technique_fields())
        source = f"the model of --init-from {init_from} (techniques: flags and defaults)"
    if note is not None and (train_base or model_base):
        note(f"settings not given: those of {source}")
    model_cfg = recipe.make_config(**model_settings(recipe, _picked(args, "model"), init_from, model_base))
    return recipe, model_cfg, train_cfg


def _train(recipe, args) -> int:
    start_distributed(args)  # before anything touches a device
    import jax

    from sciscale_jax.train import train

    recipe, model_cfg, train_cfg = build_configs(args, recipe, note=print if jax.process_index() == 0 else None)
    if args.distributed and not args.out:
        raise UsageError("--distributed needs --out (a directory every process reaches)")
    out = args.out or f"runs/{recipe.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    if jax.process_index() > 0:  # process 0 prints; the others train silently
        train(recipe, model_cfg, train_cfg, out, resume=args.resume, force=args.force, progress=False)
        return 0
    print(f"recipe {recipe.name}: {recipe.description}")
    print("model  " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(model_cfg).items()))
    print("train  " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(train_cfg).items()))
    result = train(recipe, model_cfg, train_cfg, out, resume=args.resume, force=args.force,
                   progress=not args.no_progress)
    mib = 2.0 ** 20
    print(result["memory"].format("train step memory per device"))
    print(f"parameters {result['param_bytes'] / mib:.2f} MiB, optimizer state {result['opt_state_bytes'] / mib:.2f} MiB")
    print(f"final train loss {result['train_loss']:.4f}")
    _print_figures(result["validation"], result["baselines"])
    print(f"checkpoints in {result['checkpoint_dir']} (step {result['steps']}); metrics in {out}/metrics.jsonl")
    for line in recipe.report(model_cfg, train_cfg, result["state"]) if recipe.report else ():
        print(line)
    return 0


def _print_figures(validation: dict, baselines: dict) -> None:
    val = {k[4:]: v for k, v in validation.items()}
    first = [k for k in ("loss", "ppl", "accuracy") if k in val]
    print("validation " + ", ".join(f"{k} {val[k]:.4f}" for k in first + sorted(set(val) - set(first))))
    for name, value in baselines.items():
        print(f"baseline {name}: {value:.4f}")


def eval_parser(recipe, run_model: dict | None = None) -> argparse.ArgumentParser:
    """``sciscale eval <run_dir>``: the checkpoint, the output, then the recipe's model flags, each
    given one replacing the run's setting (one that changes the parameters is refused)."""
    p = _Parser(prog="sciscale eval <run_dir>",
                description=f"Restore a {recipe.name} run's newest readable checkpoint (or --step) on one device "
                            "(or sharded over --mesh); "
                            "print its validation metrics beside the recipe's baselines, then the recipe's report. "
                            "Model flags given replace the run's settings (e.g. --attention chunked).")
    p.add_argument("--step", type=int, help="evaluate this checkpoint (default: the newest readable one)")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    p.add_argument("--mesh", metavar="AXES", help=MESH_LOAD_HELP)
    p.add_argument("--base", metavar="PATH", help=BASE_HELP)
    p.add_argument("--no-report", action="store_true", help="skip the recipe's report (smiles-lm: sampling)")
    p.add_argument("--batch-size", type=int, help="evaluation batch rows (default: the run's; a checkpoint of "
                                                   "another library: the recipe's default)")
    p.add_argument("--seq-len", type=int, help="sequence length (or crop) of the evaluation batches (default: as "
                                               "--batch-size)")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    _add_distributed_flags(p)
    _add_config_flags(p, recipe.config_class, run_model or {}, "model", "model (defaults: the run's)", {})
    return p


def _eval(run_dir, rest, show_help: bool) -> int:
    """``sciscale eval <run_dir>``: a checkpoint's validation figures, baselines and report."""
    import json

    from sciscale_jax.recipes import checkpoint_recipe, get_recipe
    from sciscale_jax.train.load import load_checkpoint, load_trained, read_run_config

    if run_dir is None:
        if show_help:
            print("usage: sciscale eval <run_dir> [--step N] [--json FILE] [--no-report] [--batch-size N] "
                  "[--seq-len N] [model flags]   "
                  "(`sciscale eval <run_dir> --help` lists them)")
            return 0
        raise UsageError("eval: the run directory is missing (the --out of a `sciscale train` run)")
    foreign = checkpoint_recipe(run_dir)  # a checkpoint of another library a recipe reads (ESM-2)
    if foreign is not None:
        recipe, settings = foreign, dataclasses.asdict(foreign.make_config(**foreign.init_settings(run_dir)))
    else:
        saved = read_run_config(run_dir)
        recipe, settings = get_recipe(saved["recipe"]), saved["model"]
    parser = eval_parser(recipe, settings)
    if show_help:
        parser.print_help()
        return 0
    args = parser.parse_args(rest)
    if args.distributed and not args.mesh:
        raise UsageError("--distributed needs --mesh over every process's devices (e.g. --mesh fsdp=N)")
    for flag, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value} must be a positive integer")
    start_distributed(args)  # before anything touches a device
    import jax

    primary = jax.process_index() == 0  # every process evaluates its shards; process 0 reports
    if args.json and primary:
        _check_writable(args.json)
    log = lambda line: print(line, file=sys.stderr) if primary else None  # noqa: E731
    if foreign is not None and (args.step is not None or args.base):
        what = f"--step {args.step}" if args.step is not None else f"--base {args.base}"
        raise UsageError(f"{what}: {run_dir} is not a sciscale run and has no numbered checkpoints or base")
    run = (load_checkpoint(recipe, run_dir, mesh=args.mesh, log=log, **_picked(args, "model")) if foreign else
           load_trained(recipe, run_dir, step=args.step, mesh=args.mesh, log=log, base=args.base,
                        **_picked(args, "model")))
    run = run.with_batches(args.batch_size, args.seq_len)
    data = run.build_data()
    validation = run.evaluate(data)
    if not primary:
        return 0
    print(f"checkpoint {run_dir}: read as {recipe.name}" if foreign else
          f"run {run_dir}: {run.recipe.name}, checkpoint step {run.step}")
    _print_figures(validation, dict(data.baselines))
    if run.recipe.report is not None and not args.no_report:
        if jax.process_count() > 1:
            print(f"{run.recipe.name}'s report runs in one process: skipped here (sciscale eval without "
                  "--distributed gives it)", file=sys.stderr)
        else:
            for line in run.recipe.report(run.model_config, run.train_config, run.state()):
                print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"run_dir": str(run_dir), "recipe": run.recipe.name, "step": run.step,
                       "validation": validation, "baselines": dict(data.baselines)}, f, indent=1)
    return 0


def _embed(args, rest=()) -> int:
    """``sciscale embed <run_dir> --input F --out X.npz``: the recipe's embeddings of F, saved;
    ``rest``: the recipe's own switches (``Recipe.embed_options``)."""
    import pathlib

    import numpy as np

    from sciscale_jax.recipes import RECIPES, checkpoint_recipe, get_recipe
    from sciscale_jax.train.init_from import foreign_base
    from sciscale_jax.train.load import load_checkpoint, load_trained, read_run_config

    foreign = checkpoint_recipe(args.run_dir)  # a checkpoint of another library a recipe reads (ESM-2)
    recipe = foreign or get_recipe(read_run_config(args.run_dir)["recipe"])
    if recipe.embed is None:
        having = ", ".join(r.name for r in RECIPES.values() if r.embed is not None)
        raise ValueError(f"recipe {recipe.name!r} has no embeddings to save ({having} have)")
    options = _Parser(prog=f"sciscale embed ({recipe.name})", add_help=False, allow_abbrev=False)
    for name, text in recipe.embed_options.items():
        options.add_argument(f"--{name.replace('_', '-')}", dest=name, action="store_true", help=text)
    picked, unknown = options.parse_known_args(list(rest))
    if unknown:
        offered = ", ".join(f"--{n.replace('_', '-')}" for n in recipe.embed_options) or "none"
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)} ({recipe.name}'s embed switches: {offered})")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size} must be positive")
    for part in (p.strip() for p in args.input.split(",")):
        if part and not pathlib.Path(part).expanduser().exists():
            raise UsageError(f"--input {part}: no such file or folder")
    out = pathlib.Path(args.out)
    labelled = out.suffix.lower() in (".zarr", ".nc")
    if labelled and recipe.embed_dataset is None:
        having = ", ".join(r.name for r in RECIPES.values() if r.embed_dataset is not None)
        raise UsageError(f"--out {out}: {recipe.name} writes .npz files (a .zarr or .nc dataset: {having})")
    if labelled and out.exists():
        raise UsageError(f"--out {out} exists; remove it or name another")
    _check_writable(args.out, "--out")
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    if foreign is not None and (args.step is not None or args.base):
        what = f"--step {args.step}" if args.step is not None else f"--base {args.base}"
        raise UsageError(f"{what}: {args.run_dir} is not a sciscale run and has no numbered checkpoints or base")
    run = (load_checkpoint(recipe, args.run_dir, mesh=args.mesh, log=log) if foreign is not None else
           load_trained(recipe, args.run_dir, step=args.step, mesh=args.mesh, log=log, base=args.base))
    extra = {}
    if recipe.embed_reads_data:  # the data's statistics as the run saved them, else the data files to read again
        extra = {"data_files": run.data_files, "data_stats": run.data_stats()}
    extra.update(vars(picked))
    if recipe.embed_reads_base:
        extra["base"] = str(args.run_dir) if foreign is not None else \
            foreign_base(recipe, args.base or run.train_config.init_from)
    arrays = recipe.embed(run.model_config, run.model, args.input, args.batch_size, **extra)
    partial = out.with_name(out.name + ".partial")  # written whole, then renamed: a killed run leaves no half file
    if labelled:
        _write_dataset(recipe.embed_dataset(run.model_config, arrays), partial, out.suffix.lower())
    else:
        with open(partial, "wb") as f:
            np.savez(f, **arrays)
    partial.replace(out)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in arrays.items())
    source = f"checkpoint {args.run_dir}: read as {recipe.name}" if foreign is not None else \
        f"run {args.run_dir}: {recipe.name}, checkpoint step {run.step}"
    print(f"{source}; wrote {out} ({shapes})")
    return 0


def _export(args) -> int:
    """``sciscale export <run_dir> --out FOLDER``: the run's model in the recipe's export layout."""
    import pathlib

    import jax
    from flax import nnx

    from sciscale_jax.recipes import RECIPES, checkpoint_recipe, get_recipe
    from sciscale_jax.train.init_from import FROZEN, check_frozen_from, foreign_base
    from sciscale_jax.train.load import load_trained, read_run_config

    if checkpoint_recipe(args.run_dir) is not None:
        raise UsageError(f"{args.run_dir} is a checkpoint of another library already, not a sciscale run to export")
    saved = read_run_config(args.run_dir)
    recipe = get_recipe(saved["recipe"])
    if recipe.export is None:
        having = ", ".join(r.name for r in RECIPES.values() if r.export is not None)
        raise ValueError(f"recipe {recipe.name!r} has no export layout ({having} have)")
    out = pathlib.Path(args.out).expanduser()
    if out.exists():
        raise UsageError(f"--out {out} exists; remove it or name another folder")
    _check_writable(out, "--out")
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    run = load_trained(recipe, args.run_dir, step=args.step, log=log, base=args.base)
    params = nnx.to_pure_dict(nnx.state(run.model, nnx.Param))
    source = args.base or run.train_config.init_from
    base = foreign_base(recipe, source)
    # The adapters are all that differs from ``base`` when the run's frozen weights were just read from
    # it (an adapters-only run started from it: ``restore_run``); otherwise compare them with it.
    read_from_base = source == base and isinstance(saved.get(FROZEN), dict)
    if args.adapters and base is not None and getattr(run.model_config, "lora_rank", 0) and not read_from_base:
        check_frozen_from(recipe, run.model_config, params, base, log=log)
    names = recipe.export(run.model_config, jax.device_get(params), out, base=base, adapters=args.adapters,
                          dtype=args.dtype)
    size = sum((out / n).stat().st_size for n in names)
    on = f" on {base}" if args.adapters else ""
    print(f"run {args.run_dir}: {recipe.name}, checkpoint step {run.step}; wrote {out}{on} "
          f"({', '.join(names)}; {size / 1e6:.2f} MB)")
    quant = getattr(run.model_config, "lora_quant", "none")
    if args.adapters and quant != "none":
        print(f"note: the adapters trained beside {base}'s weights stored in 4 bits (lora_quant={quant}); on its "
              "float weights the model differs from the run's: export without --adapters for the weights it "
              "computed with")
    return 0


def _write_dataset(dataset, path, suffix: str) -> None:
    """An xarray dataset to ``path`` as Zarr (``suffix`` .zarr) or NetCDF, replacing a leftover partial write."""
    import shutil
    import warnings

    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr's note on consolidated metadata in its format 3
        if suffix == ".zarr":
            dataset.to_zarr(path, mode="w")
        else:
            dataset.to_netcdf(path)


def _check_writable(path, flag: str = "--json") -> None:
    """UsageError in one line if ``path`` cannot be written (checked before any work)."""
    import os
    import pathlib

    parent = pathlib.Path(path).absolute().parent
    if pathlib.Path(path).is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {path}: cannot write a file there")


def _plan_devices_early(argv) -> None:
    """Before JAX starts: ``sciscale plan --devices N`` simulates N CPU devices."""
    import os

    if not argv or argv[0] != "plan" or "jax" in sys.modules and _jax_started():
        return
    for i, a in enumerate(argv):
        value = a.split("=", 1)[1] if a.startswith("--devices=") else argv[i + 1] if a == "--devices" and i + 1 < len(argv) else None
        if value is not None and value.isdigit() and int(value) > 0:
            os.environ["JAX_PLATFORMS"] = "cpu"
            flags = os.environ.get("XLA_FLAGS", "")
            if "xla_force_host_platform_device_count" not in flags:
                os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={value}".strip()


def _jax_started() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge._backends)
    except Exception:  # noqa: BLE001 -- unknown internals: assume started, change nothing
        return True


def plan_parser(recipe) -> argparse.ArgumentParser:
    """``sciscale plan <recipe>``: the budget, the device count, then the train and model flags."""
    from sciscale_jax.train import TrainConfig

    p = _Parser(prog=f"sciscale plan {recipe.name}",
                description=f"Technique mixes for {recipe.name} that fit a memory budget; flags you give are kept, "
                            "the switches you leave out (mesh, zero, remat, attention, precision, grad-accum, "
                            "offload) are chosen.")
    p.add_argument("--devices", type=int, required=True, help="devices of the run (simulated on CPU here)")
    p.add_argument("--memory", required=True, help="memory per device, e.g. 80GiB, 80GB, 512MiB")
    p.add_argument("--top", type=int, default=3, help="plans to print (default: 3)")
    p.add_argument("--verify", action="store_true", help="compile the top plan and print predicted vs compiled")
    p.add_argument("--no-confirm", action="store_true",
                   help="print screened figures only (skip the compiled-probe estimate of the top plan)")
    p.add_argument("--tflops", type=float, default=400.0, help="step-time model: bf16 TFLOP/s per device (fp32: half)")
    p.add_argument("--link-gbs", type=float, default=100.0, help="step-time model: collective GB/s per device")
    p.add_argument("--host-gbs", type=float, default=25.0, help="step-time model: device-host GB/s (offload)")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    groups = {}
    _add_config_flags(p, TrainConfig, recipe.train_defaults, "train", "run", groups)
    _add_config_flags(p, recipe.config_class, recipe.model_defaults, "model", "model", groups)
    return p


def _plan(recipe, rest, show_help: bool) -> int:
    """``sciscale plan``: print the fastest plans that fit, as ``sciscale train`` commands."""
    from sciscale_jax.memory import plan as planner
    from sciscale_jax.memory.estimate import host_counted_on_device
    from sciscale_jax.memory.measure import report_from_analysis
    from sciscale_jax.models.stack import technique_fields
    from sciscale_jax.train import TrainConfig
    from sciscale_jax.train.abstract import abstract_run
    from sciscale_jax.train.plan import plan, plan_configs

    parser = plan_parser(recipe)
    if show_help:
        parser.print_help()
        return 0
    args = parser.parse_args(rest)
    if args.devices < 1 or args.top < 1:
        raise ValueError(f"devices={args.devices} and top={args.top} must be positive")
    if min(args.tflops, args.link_gbs, args.host_gbs) <= 0:
        raise ValueError(f"tflops={args.tflops}, link-gbs={args.link_gbs}, host-gbs={args.host_gbs} must be positive")
    budget = planner.parse_bytes(args.memory)
    picked = {"train": _picked(args, "train"), "model": _picked(args, "model")}
    fixed = {k: picked[kind][k] for k, kind in planner.SWITCHES.items() if k in picked[kind]}
    train_cfg = TrainConfig(**{**recipe.train_defaults, **picked["train"]})
    base = run_settings(recipe, train_cfg.init_from, "model", recipe.config_class, leave=technique_fields())
    model_cfg = recipe.make_config(**model_settings(recipe, picked["model"], train_cfg.init_from, base))
    hw = planner.Hardware(args.tflops * 1e12, args.link_gbs * 1e9, args.host_gbs * 1e9)
    plans = plan(recipe, model_cfg, train_cfg, devices=args.devices, budget=budget, fixed=fixed, top=args.top,
                 confirm=not args.no_confirm, hardware=hw, log=lambda line: print(line, file=sys.stderr))
    fields = {f.name: f for cls in (TrainConfig, recipe.config_class) for f in dataclasses.fields(cls)}
    base = [_flag_text(fields[k], v) for kind in ("train", "model") for k, v in picked[kind].items()
            if k not in planner.SWITCHES]
    print(planner.format_plans(recipe.name, plans, base, budget, args.devices))
    if args.verify:
        best = plans[0]
        run = abstract_run(recipe, *plan_configs(model_cfg, train_cfg, best.settings()))  # the schedule too
        compiled = report_from_analysis(run.compile().memory_analysis()).peak_bytes
        host = host_counted_on_device(best.predicted.offloaded_bytes if best.predicted is not None else 0)
        compiled -= host  # the CPU backend counts offloaded (pinned-host) bytes on device
        note = f" (less {planner.size(host)} offloaded, which CPU counts on device)" if host else ""
        print(f"verify (plan 1 compiled on {args.devices} simulated CPU devices): predicted "
              f"{planner.size(best.peak_bytes)}, compiled {planner.size(compiled)} per device{note} "
              f"({100 * (best.peak_bytes / compiled - 1):+.1f}%); "
              + ("fits" if compiled <= budget else "does NOT fit") + f" {planner.size(budget)}")
    return 0


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _cache(args) -> int:
    """``sciscale cache``: list the cache's entries, or remove some."""
    import time

    from sciscale_jax.data import cache, msa, packed, smiles_pack  # noqa: F401 (the formats they register)

    root = cache.cache_root()
    if args.remove or args.remove_unused:
        paths = list(args.remove or []) + [e.path for e in cache.entries(root) if e.unused and not e.busy]
        paths = list(dict.fromkeys(str(pathlib.Path(p).expanduser().resolve()) for p in paths))
        freed = cache.remove(paths, root)
        print("".join(f"removed {p}\n" for p in paths) + f"{len(paths)} entries removed, {_size(freed)} freed")
        return 0
    found = cache.entries(root)
    print(f"{root}: {len(found)} entries, {_size(sum(e.size for e in found))}")
    for e in found:
        what = ""
        if e.sources:
            what = f"from {pathlib.Path(e.sources[0]).name}" + (f" and {len(e.sources) - 1} more"
                                                               if len(e.sources) > 1 else "")
        note = "being written" if e.busy else (f"unused: {e.unused}" if e.unused else "")
        print(f"  {e.kind:10s} {_size(e.size):>10s}  {time.strftime('%Y-%m-%d %H:%M', time.localtime(e.written))}  "
              f"{e.path}" + "".join(f"  ({x})" for x in (what, note) if x))
    unused = [e for e in found if e.unused and not e.busy]
    if unused:
        print(f"{len(unused)} unused ({_size(sum(e.size for e in unused))}): `sciscale cache --remove-unused` "
              "removes them")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _plan_devices_early(argv)
    base = _base_parser()
    args, rest = base.parse_known_args(argv)
    debug = "--debug" in argv
    try:
        from sciscale_jax.recipes import RECIPES, get_recipe

        if args.command == "eval":
            return _eval(args.run_dir, rest, args.help)
        if args.command == "embed":
            return _embed(args, rest)
        if args.command == "export":
            if rest:
                base.error(f"unrecognized arguments: {' '.join(rest)}")
            return _export(args)
        if args.command == "cache":
            if rest:
                base.error(f"unrecognized arguments: {' '.join(rest)}")
            return _cache(args)
        if args.command == "recipes":
            if rest:
                base.error(f"unrecognized arguments: {' '.join(rest)}")
            for r in RECIPES.values():
                print(f"{r.name:16s} {r.description}")
            return 0
        if args.recipe is None:
            if args.help:
                print("usage: sciscale train <recipe> [flags]   (`sciscale train <recipe> --help` lists them)")
                print("recipes: " + ", ".join(RECIPES))
                return 0
            base.error(f"{args.command}: the recipe name is missing (see `sciscale recipes`)")
        recipe = get_recipe(args.recipe)
        if args.command == "plan":
            return _plan(recipe, rest, args.help)
        parser = train_parser(recipe)
        if args.help:
            parser.print_help()
            return 0
        return _train(recipe, parser.parse_args(rest))
    except BaseException as err:  # one line on stderr for every failure; the traceback only with --debug
        if debug or isinstance(err, SystemExit):
            raise
        code, line = error_line(err)
        print(f"sciscale: {line}", file=sys.stderr)
        return code


def error_line(err: BaseException) -> tuple[int, str]:
    """(exit status, one line) for an exception that ends a command."""
    from sciscale_jax.errors import describe
    return describe(err)


if __name__ == "__main__":
    sys.exit(main())
