"""The checks a run makes before it trains, run without spawning a worker or allocating a weight.

``nxdt run --dry-run`` runs all of them; ``nxdt run`` runs those that need no data before it
launches (so that a layout the model cannot take fails before N workers start); ``nxdt config
validate`` runs the layout and name checks when the file's model resolves. Each failure is the
run's own one-line error, raised as a :class:`~nxdt.errors.ConfigError` (exit 2).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nxdt.errors import ConfigError, NxdtError

#: data up to this size is loaded exactly as the run loads it; beyond it, files are checked and first rows parsed
FULL_DATA_CHECK_BYTES = 64 << 20
FIRST_ROWS = 8


def plan_context(resolved: Any, world_size: int, nproc: int) -> Any:
    """The run context of rank 0 without a process group: layout, precision, batch arithmetic (checked here)."""
    from nxdt.parallel.world import World, pick_device
    from nxdt.run_context import RunContext

    world = World(rank=0, world_size=world_size, local_rank=0, device=pick_device(), backend=None)
    return RunContext.create(resolved, world, mesh=None)


def preflight(resolved: Any, world_size: int, nproc: int, *, data: bool = True, model: bool = True) -> Any:
    """Every check of the run; the first failure is raised as one line. Returns the run context."""
    ctx = _config_error(plan_context, resolved, world_size, nproc)
    check_layout(ctx)
    check_names(ctx)
    if model:
        meta = _config_error(_meta_model, ctx)
        _config_error(check_model_wrapping, ctx, meta)
        check_fit(ctx, meta, nproc)
    if data:
        _config_error(check_data, ctx)
    return ctx


def _config_error(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` with any one-line run error (or a family's ValueError) turned into a config error."""
    try:
        return fn(*args)
    except ConfigError:
        raise
    except (NxdtError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def check_config_file(path: str, overrides: list[str], cfg: Any) -> str | None:
    """`config validate`: the layout and name checks of the run the file describes, without data or a model build.

    Returns a note instead when the file's model cannot be resolved on this machine (its
    ``model.model_config`` or ``hf_checkpoint`` is elsewhere); other failures are the run's errors.
    """
    from nxdt.resolve import default_recipe, resolve

    for key, value in (("model.model_config", cfg.model.model_config_path), ("model.hf_checkpoint", cfg.model.hf_checkpoint)):
        if value and not Path(str(value)).expanduser().exists():
            return f"layout not checked against the model: {key} {value} is not on this machine"
    resolved = resolve(path, default_recipe(path), overrides)
    nproc = resolved.config.trainer.devices or 1
    world = nproc * (resolved.config.trainer.num_nodes or 1)
    try:
        resolved.parallel_dims(world)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{world_advice(resolved)}") from None
    preflight(resolved, world, nproc, data=False, model=False)
    return None


def world_advice(resolved: Any) -> str:
    """For a world the configured layout does not divide: the ranks it needs, and whether the model fits them here."""
    planned = resolved.parallel_dims()  # the smallest world the layout fits
    ranks = planned.world_size
    launch = f"--nproc-per-node {ranks}"
    try:
        ctx = plan_context(resolved, ranks, ranks)
        check_layout(ctx)
        check_fit(ctx, _meta_model(ctx), ranks)
    except (NxdtError, ValueError) as exc:
        return f"; with {ranks} ranks ({launch}) {exc}"
    return f"; the layout needs {ranks} ranks: {launch}"


def check_layout(ctx: Any) -> None:
    """Context parallelism, the shard plan (head and FFN splits, EP), KV replication, the pipeline split and schedule."""
    from nxdt.parallel.kv_replication import kv_replication_factor

    run, parallel = ctx.run, ctx.parallel
    if parallel.cp > 1:
        raise ConfigError(f"distributed_strategy.context_parallel_size={parallel.cp}: context parallelism is not "
                          "available yet; set it to 1")
    if parallel.tp > 1 or parallel.ep > 1:
        plan = _config_error(ctx.host.shard_plan, run.spec, run.arch, parallel)
        heads, kv = getattr(run.arch, "num_attention_heads", None), getattr(run.arch, "num_kv_heads", None)
        if parallel.tp > 1 and plan.kv_projections and heads is not None and kv is not None:
            kv_replication_factor(int(kv), int(heads), parallel.tp, parallel.kv_replicator)
    if parallel.pp > 1:
        from nxdt.parallel.pipeline import schedule_class, split_blocks

        if run.spec.pipeline_blocks is None:
            raise ConfigError(f"{run.family}: the family declares no pipeline_blocks, so it cannot be pipelined")
        split_blocks(run.spec.pipeline_blocks(run.arch), parallel.pp * parallel.vpp, ctx.cfg.model.pipeline_cuts)
        schedule_class(ctx.cfg.distributed_strategy.pipeline_schedule, parallel.vpp)


def check_names(ctx: Any) -> None:
    """The optimizer, the learning-rate schedule and the run length, as the trainer builds them."""
    from nxdt.train.optim import build_optimizer
    from nxdt.train.schedules import lr_factor_fn

    cfg = ctx.cfg
    optim = cfg.model.optim
    build_optimizer(nn.Linear(1, 1), optim, bool(cfg.model.do_layer_norm_weight_decay))
    max_steps, epochs = cfg.trainer.max_steps, cfg.trainer.max_epochs
    if (max_steps is None or max_steps < 0) and not (epochs and epochs > 0):
        raise ConfigError("set trainer.max_steps or trainer.max_epochs (a positive number)")
    lr_factor_fn(optim.sched, optim.lr, max_steps if max_steps and max_steps > 0 else 1)


def _meta_model(ctx: Any) -> nn.Module:
    with torch.device("meta"):
        return ctx.host.build_model(ctx.run.spec, ctx.run.arch)


def check_model_wrapping(ctx: Any, meta: nn.Module) -> None:
    """Activation checkpointing and the pipeline stage placement, applied to the meta-device model."""
    from nxdt.parallel.activation_checkpoint import apply_activation_checkpointing

    run, cfg = ctx.run, ctx.cfg
    blocks = run.spec.pipeline_blocks(run.arch) if run.spec.pipeline_blocks else []
    if ctx.parallel.pp > 1:
        from nxdt.parallel.pipeline import _placement

        _placement(meta, blocks)
    apply_activation_checkpointing(meta, cfg.model.activations_checkpoint_granularity,
                                   cfg.model.activations_checkpoint_recompute, run.spec.recompute_modules, blocks)


@contextmanager
def _local_world(nproc: int):
    """``LOCAL_WORLD_SIZE`` as the workers will have it (CPU ranks of one node share its memory)."""
    before = os.environ.get("LOCAL_WORLD_SIZE")
    os.environ["LOCAL_WORLD_SIZE"] = str(nproc)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LOCAL_WORLD_SIZE", None)
        else:
            os.environ["LOCAL_WORLD_SIZE"] = before


def check_fit(ctx: Any, meta: nn.Module, nproc: int) -> None:
    """The trainer's fit check; when it fails, the error also names a layout that would fit."""
    from nxdt.train.fit_check import check_model_fits

    with _local_world(nproc):
        try:
            check_model_fits(ctx, meta)
        except NxdtError as exc:
            from nxdt.cli.layout_hint import fitting_layout

            raise ConfigError(f"{exc}{fitting_layout(ctx)}") from None


def check_data(ctx: Any) -> None:
    """The tokenizer loads and matches the vocabulary; the data files exist and parse (all of it when small)."""
    cfg = ctx.cfg
    paths = data_paths(cfg)
    if sum(_size(p) for p in paths) <= FULL_DATA_CHECK_BYTES:
        from nxdt.recipes.data import build_data

        build_data(ctx)  # exactly what each rank does at start-up
    else:
        from nxdt.cli.generate_command import run_tokenizer

        tokenizer = run_tokenizer(cfg)
        vocab = getattr(ctx.run.arch, "vocab_size", None)
        if vocab is not None and tokenizer.vocab_size > vocab:
            raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {vocab}; "
                              f"set model.vocab_size={tokenizer.vocab_size} or use a matching tokenizer")
        for path in paths:
            _first_rows(path)
    if ctx.run.recipe is not None and ctx.run.recipe.evaluate is not None:
        from nxdt.recipes.evaluate import evaluation_rows

        evaluation_rows(cfg)


def data_paths(cfg: Any) -> list[Path]:
    """The data files and directories the run reads (Megatron prefixes as their .bin/.idx files)."""
    data = cfg.data
    named = [data.train_dir, data.val_dir, getattr(data, "test_dir", None)]
    prefix = data.data_prefix
    prefixes: list[Any] = []
    if isinstance(prefix, dict):
        prefixes = [v for value in prefix.values() for v in (value if isinstance(value, list) else [value])]
    elif isinstance(prefix, list):
        prefixes = list(prefix)
    elif prefix:
        prefixes = [prefix]
    for p in prefixes:
        if isinstance(p, str) and not _is_number(p):
            named += [f"{p}.bin", f"{p}.idx"]
    paths = []
    for entry in named:
        if not entry:
            continue
        path = Path(str(entry)).expanduser()
        if not path.exists():
            raise ConfigError(f"data path not found: {path}")
        paths.append(path)
    return paths


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _first_rows(path: Path) -> None:
    """The first rows of each JSONL file parse as JSON objects; text files are UTF-8; Megatron indexes have their magic."""
    import json

    from nxdt.data.records import text_lines

    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file.suffix == ".idx":
            with open(file, "rb") as handle:
                if handle.read(9) != b"MMIDIDX\x00\x00":
                    raise ConfigError(f"{file}: not a Megatron MMIDIDX index")
        elif file.suffix in (".jsonl", ".json"):
            rows = 0
            for number, line in text_lines(file):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{file}:{number}: not valid JSON: {exc.msg}") from None
                if not isinstance(record, dict):
                    raise ConfigError(f"{file}:{number}: not a JSON object")
                rows += 1
                if rows >= FIRST_ROWS:
                    break
        elif file.suffix == ".txt":
            for number, _ in text_lines(file):
                if number >= FIRST_ROWS:
                    break
