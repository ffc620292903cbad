"""What a checkpoint holds and how it moves: DCP save, async save, verified load, one-rank load.

Everything saved is a tensor, and loading never unpickles objects (``nxdt.checkpoint.safe_read``
reads DCP's metadata with an allow-list and refuses pickled items): the model and optimizer state
are layout-independent (``nxdt.checkpoint.portable``: single-device FQNs and shapes, each KV head
once, per-FQN optimizer state whether AdamW or the flat ZeRO-1 AdamW kept it), so any
DP/TP/PP layout loads what another saved (each pipeline rank saves and loads only its stages'
keys); the small non-tensor parts (optimizer hyperparameters, the LR scheduler, the train state)
are JSON or integers stored in tensors. RNG states are saved per rank under keys of their own.
"""

from __future__ import annotations

import json
import re
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from nxdt.checkpoint.layout import MARKER, OWNER_FILE, unlisted_files, verify_files
from nxdt.checkpoint.portable import PortableState
from nxdt.checkpoint.safe_read import metadata_files
from nxdt.checkpoint.store import Store
from nxdt.checkpoint.subject import Checkpointable
from nxdt.errors import NxdtError
from nxdt.parallel.world import dp_leader_ranks

# One process saves and loads without a process group on purpose, and DCP warns each time that
# there is none (async saves warn from their own thread, so a local filter would miss them).
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

TRAIN_STATE = "nxdt.train_state"  # int64 [step, consumed_samples, skipped_nan_steps]
SCHEDULER = "nxdt.scheduler"  # JSON of the LR scheduler's state_dict
OPTIM_GROUPS = "nxdt.optim_param_groups"  # JSON of the optimizer's param_groups' hyperparameters


def rng_key(rank: int, kind: str) -> str:
    """The key of ``rank``'s RNG state of ``kind`` ("cpu" or "cuda")."""
    return f"nxdt.rng.rank{rank}.{kind}"


def json_tensor(obj: Any) -> torch.Tensor:
    """``obj`` as UTF-8 JSON bytes in a uint8 tensor."""
    text = json.dumps(obj, default=lambda v: v.item() if isinstance(v, torch.Tensor) else str(v))
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).clone()


def tensor_json(t: torch.Tensor) -> Any:
    """The object :func:`json_tensor` stored."""
    return json.loads(bytes(t.to(torch.uint8).tolist()).decode())


@dataclass
class Groups:
    """Process groups of checkpoint I/O; all None in a single process."""

    rank: int = 0
    world_size: int = 1
    io: Any = None  # gloo group of all ranks: DCP's own collectives, off the training group
    loaders: Any = None  # the ranks with data-parallel index 0 (load_from_one_dp_rank)
    dp: Any = None  # this rank's data-parallel group
    is_loader: bool = True
    dp_src: int = 0  # global rank of this DP group's loader

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1


def build_groups(mesh: Any, timeout: Any = None) -> Groups:
    """The checkpoint process groups of the run's DeviceMesh (a collective: every rank calls it)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Groups()
    rank, world = dist.get_rank(), dist.get_world_size()
    # A separate gloo group lets async saves run their collectives beside training's.
    io = dist.new_group(backend="gloo", timeout=timeout)
    loader_ranks = dp_leader_ranks(mesh)
    loaders = dist.new_group(ranks=loader_ranks, backend="gloo", timeout=timeout)
    dp_group = mesh["dp"].get_group()
    dp_src = dist.get_global_rank(dp_group, 0)
    return Groups(rank, world, io, loaders, dp_group, rank in loader_ranks, dp_src)


# -- save -------------------------------------------------------------------------------------
def capture(trainer: Checkpointable, rank: int, final: bool = False) -> tuple[dict[str, Any], bool]:
    """The state dict of a checkpoint of ``trainer`` on this rank, and whether it holds optimizer state.

    ``final``: the run's last save (a LoRA run with ``merge_lora`` saves merged weights then).
    """
    from nxdt.peft.checkpoint import checkpoint_model_state, peft_section

    optimizer = trainer.optimizer
    portable = PortableState(trainer.model)
    # Before the first step the optimizer has no state: a step-0 checkpoint holds weights only.
    has_optim = bool(optimizer.state)
    model_state = portable.model_state()
    peft = peft_section(trainer.cfg)
    if peft is not None:
        model_state = checkpoint_model_state(trainer.model, portable, model_state, peft, final)
    state: dict[str, Any] = {"model": model_state}
    if has_optim:
        optim_state = portable.optim_state(optimizer)
        if trainer.cfg.exp_manager.checkpoint_callback_params.use_master_weights_in_ckpt is False:
            # NxDT's use_master_weights_in_ckpt=false: no fp32 master; a resume takes the saved weights as master
            optim_state = {k: {n: v for n, v in e.items() if n != "master"} for k, e in optim_state.items()}
        state["optim"] = {"state": optim_state}
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        state[OPTIM_GROUPS] = json_tensor(hyper)
    s = trainer.state
    state[TRAIN_STATE] = torch.tensor([s.step, s.consumed_samples, s.skipped_nan_steps], dtype=torch.int64)
    state[SCHEDULER] = json_tensor(trainer.scheduler.state_dict())
    state[rng_key(rank, "cpu")] = torch.get_rng_state()
    if torch.cuda.is_available() and trainer.world.device.type == "cuda":
        state[rng_key(rank, "cuda")] = torch.cuda.get_rng_state(trainer.world.device)
    return state, has_optim


def save(state: dict[str, Any], writer: Any, groups: Groups, use_async: bool) -> Future | None:
    """Write ``state`` with DCP; with ``use_async`` stage it to CPU and return the upload's future."""
    kwargs: dict[str, Any] = {"storage_writer": writer}
    if groups.distributed:
        kwargs["process_group"] = groups.io
    else:
        kwargs["no_dist"] = True
    try:
        if use_async:
            return dcp.async_save(state, **kwargs)  # type: ignore[return-value]
        dcp.save(state, **kwargs)
    except CheckpointException as exc:
        raise CheckpointIOError(causes(exc)) from None
    return None


class CheckpointIOError(Exception):
    """A DCP save or load failed on some rank; ``causes`` are the underlying exceptions."""

    def __init__(self, causes: list[BaseException]):
        super().__init__("; ".join(f"{type(c).__name__}: {_first_line(c)}" for c in causes[:3]))
        self.causes = causes


def causes(exc: BaseException) -> list[BaseException]:
    """The exceptions underneath ``exc``: DCP's per-rank failures and ``__cause__`` chains, innermost kept."""
    found: list[BaseException] = []
    stack = [exc]
    seen: set[int] = set()
    while stack:
        e = stack.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        found.append(e)
        if isinstance(e, CheckpointException):
            stack += [pair[0] if isinstance(pair, tuple) else pair for pair in e.failures.values()]
        elif isinstance(e, CheckpointIOError):
            stack += e.causes
        for nxt in (e.__cause__, e.__context__):
            if nxt is not None:
                stack.append(nxt)
    return [e for e in found if not isinstance(e, CheckpointException | CheckpointIOError)] or [exc]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _raise_load_error(exc: BaseException, where: str) -> None:
    """A failed DCP load as one line: an NxdtError underneath as it is, anything else named."""
    found = causes(exc)
    for cause in found:
        if isinstance(cause, NxdtError):
            raise NxdtError(str(cause)) from None
    first = found[0]
    raise NxdtError(f"cannot load checkpoint {where}: {type(first).__name__}: {_first_line(first)}") from None


_RANK_FILE = re.compile(r"__(\d+)_")


def own_file_digests(store: Store, name: str, rank: int) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of the files this rank wrote (rank 0 also takes the shared ones)."""
    digests = {}
    for rel, size in store.files(name).items():
        m = _RANK_FILE.match(rel)
        mine = int(m.group(1)) == rank if m else rank == 0
        if mine and rel not in (MARKER, OWNER_FILE) and not rel.endswith(".tmp"):
            digests[rel] = {"size": size, "sha256": store.sha256(name, rel)}
    return digests


# -- load -------------------------------------------------------------------------------------
class _ByteCounter:
    """Counts the tensor bytes a DCP StorageReader reads (metadata excluded)."""

    def __init__(self, reader: Any):
        self.bytes = 0
        original = reader.read_data

        def read_data(plan, planner):
            self.bytes += sum(reader.storage_data[item.storage_index].length for item in plan.items)
            return original(plan, planner)

        reader.read_data = read_data


@dataclass
class LoadReport:
    """What one rank's load did."""

    bytes_read: int = 0
    weights_only: bool = False


def verify(store: Store, name: str, marker: dict[str, Any], groups: Groups) -> None:
    """Check every listed file's size and SHA-256, the work split over ranks; raise naming the file."""
    files = sorted(marker.get("files", {}))
    problems = unlisted_files(store, name, marker) if groups.rank == 0 else []
    problems += verify_files(store, name, marker, only=files[groups.rank :: groups.world_size])
    if groups.distributed:
        gathered: list[Any] = [None] * groups.world_size
        dist.all_gather_object(gathered, problems, group=groups.io)
        problems = [p for ps in gathered for p in ps]
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise NxdtError(problems[0] + more)


def _load_in_one_process(state: dict[str, Any], reader: Any) -> None:
    """dcp.load without a process group (its warning that none exists is the point here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, no_dist=True)


def _dcp_load(state: dict[str, Any], store: Store, name: str, group: Any, counter: list[int]) -> None:
    reader = store.reader(name)
    count = _ByteCounter(reader)
    try:
        if group is None:
            _load_in_one_process(state, reader)
        else:
            dcp.load(state, storage_reader=reader, process_group=group)
    except (CheckpointException, Exception) as exc:
        if isinstance(exc, NxdtError):
            raise
        _raise_load_error(exc, store.url(name))
    counter[0] += count.bytes


def read_metadata(store: Store, name: str, marker: dict[str, Any] | None = None) -> Any:
    """Checkpoint ``name``'s DCP metadata, read safely; with ``marker``, every file it points at must be listed."""
    metadata = store.reader(name).read_metadata()
    if marker is not None:
        unlisted = sorted(metadata_files(metadata) - set(marker.get("files", {})))
        if unlisted:
            raise NxdtError(f"refusing checkpoint {store.url(name)}: its metadata reads {unlisted[0]}, which its "
                            f"{MARKER} does not list (so nothing verified it)")
    return metadata


def _metadata_keys(store: Store, name: str, marker: dict[str, Any] | None = None) -> dict[str, Any]:
    return read_metadata(store, name, marker).state_dict_metadata


def check_fits(saved: dict[str, Any], requested: dict[str, Any], where: str, whole_model: bool) -> None:
    """Raise one line naming the tensors whose names or shapes differ between a checkpoint and this model.

    ``whole_model``: this rank asks for every model tensor (no pipeline stages), so model tensors
    only the checkpoint has are differences too.
    """
    wanted = {key.rstrip("."): t for key, t in _leaves(requested)}
    diffs = []
    for key, t in sorted(wanted.items()):
        meta = saved.get(key)
        if meta is None:
            diffs.append(f"{key} {list(t.shape)} is not in the checkpoint")
        elif tuple(meta.size) != tuple(t.shape):
            diffs.append(f"{key}: checkpoint {list(meta.size)}, model {list(t.shape)}")
    if whole_model:
        diffs += [f"{key} {list(saved[key].size)} is only in the checkpoint"
                  for key in sorted(saved) if key.startswith("model.") and key not in wanted]
    if diffs:
        more = f"; and {len(diffs) - 4} more" if len(diffs) > 4 else ""
        raise NxdtError(f"checkpoint {where} does not fit this model ({len(diffs)} tensors differ; was it saved with "
                        f"other model settings?): {'; '.join(diffs[:4])}{more}")


def _empty_like_saved(meta: Any) -> torch.Tensor:
    return torch.empty(tuple(meta.size), dtype=meta.properties.dtype)


def load(trainer: Checkpointable, store: Store, name: str, marker: dict[str, Any], groups: Groups,
         weights_only: bool = False, one_dp_rank: bool = False, whole_model: bool = True,
         own_checkpoint: bool = False) -> LoadReport:
    """Verify checkpoint ``name`` and load it into ``trainer`` (model, optimizer, schedule, RNG, state).

    ``own_checkpoint``: one of this run's own (auto-resume), whose LoRA adapters always load.
    """
    verify(store, name, marker, groups)
    optimizer = trainer.optimizer
    portable = PortableState(trainer.model)
    saved = _metadata_keys(store, name, marker)
    with_optim = not weights_only and bool(marker.get("has_optimizer", True))
    counter = [0]
    io = groups.io if groups.distributed else None

    small_keys = [] if weights_only else [TRAIN_STATE, SCHEDULER, OPTIM_GROUPS if with_optim else None]
    small_keys += [rng_key(groups.rank, k) for k in ("cpu", "cuda")] if not weights_only else []
    small = {k: _empty_like_saved(saved[k]) for k in small_keys if k and k in saved}
    if not weights_only and TRAIN_STATE not in saved:
        raise NxdtError(f"refusing checkpoint {store.url(name)}: it has no {TRAIN_STATE} (not an nxdt checkpoint)")
    if small or groups.distributed:  # every rank joins, even with nothing to read, DCP load is collective
        _dcp_load(small, store, name, io, counter)

    big: dict[str, Any] = {"model": portable.model_targets()}
    peft = trainer.cfg.model_alignment_strategy.peft if trainer.cfg.model_alignment_strategy else None
    if peft is not None:
        # A LoRA run takes the base weights the checkpoint has (the rest come from where the run
        # took its base) and its adapters only when it should (nxdt.peft.checkpoint).
        from nxdt.peft.checkpoint import wanted_on_load

        keys = wanted_on_load({k[len("model."):] for k in saved if k.startswith("model.")}, peft, own_checkpoint)
        big["model"] = {k: v for k, v in big["model"].items() if k in keys}
        whole_model = False
    if with_optim:
        big["optim"] = {"state": portable.optim_targets(optimizer, saved)}
    check_fits(saved, big, store.url(name), whole_model=whole_model)
    if one_dp_rank and groups.distributed and dist.get_world_size(groups.dp) > 1:
        if groups.is_loader:
            loaders = groups.loaders if dist.get_world_size(groups.loaders) > 1 else None
            _dcp_load(big, store, name, loaders, counter)
        _broadcast_tensors(big, groups)
    else:
        _dcp_load(big, store, name, io, counter)

    portable.load_model(big["model"], partial=peft is not None)
    if with_optim:
        portable.load_optim(optimizer, big["optim"]["state"])
    try:
        if with_optim:
            _restore_learning_rates(optimizer, tensor_json(small[OPTIM_GROUPS]))
        if not weights_only:
            _restore_scalars(trainer, small, groups.rank)
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:  # a crafted or damaged small entry
        raise NxdtError(f"checkpoint {store.url(name)} has a malformed train state, scheduler or RNG entry "
                        f"({type(exc).__name__}: {_first_line(exc)})") from None
    return LoadReport(counter[0], weights_only)


def _restore_learning_rates(optimizer: Any, saved_groups: list[dict[str, Any]]) -> None:
    """The saved groups' current learning rates (the scheduler sets them only after the next step).

    Other hyperparameters come from the run's config, so a layout with another optimizer class
    (flat ZeRO-1 AdamW or torch's) loads the same checkpoint.
    """
    if len(saved_groups) != len(optimizer.param_groups):
        raise NxdtError(f"checkpoint has {len(saved_groups)} optimizer parameter groups, this run "
                        f"{len(optimizer.param_groups)}; weight-decay settings must match to resume")
    for group, saved in zip(optimizer.param_groups, saved_groups):
        lr = saved["lr"]
        if isinstance(lr, bool) or not isinstance(lr, int | float):
            raise ValueError(f"learning rate {lr!r} is not a number")
        group["lr"] = lr


def _restore_scalars(trainer: Checkpointable, small: dict[str, torch.Tensor], rank: int) -> None:
    step, consumed, skipped = (int(v) for v in small[TRAIN_STATE].tolist())
    trainer.state.step, trainer.state.consumed_samples, trainer.state.skipped_nan_steps = step, consumed, skipped
    trainer.scheduler.load_state_dict(_same_shape_state(trainer.scheduler.state_dict(), tensor_json(small[SCHEDULER])))
    # A rank that did not exist in the saved layout keeps its seeded generator.
    if rng_key(rank, "cpu") in small:
        torch.set_rng_state(small[rng_key(rank, "cpu")])
    if rng_key(rank, "cuda") in small and trainer.world.device.type == "cuda":
        torch.cuda.set_rng_state(small[rng_key(rank, "cuda")], trainer.world.device)


def _same_shape_state(current: dict[str, Any], saved: Any) -> dict[str, Any]:
    """``saved`` scheduler state restricted to the keys ``current`` has, each of the same JSON type.

    Schedulers load a state dict by updating their ``__dict__``; a checkpoint must not set
    attributes the scheduler does not have, or change what kind of value one holds.
    """
    if not isinstance(saved, dict):
        raise ValueError("the scheduler state is not a JSON object")
    out = dict(current)
    for key, value in saved.items():
        if key not in current or key == "lr_lambdas":  # the schedule's functions come from the config
            continue
        now = current[key]
        numbers = (int, float)
        if now is None or value is None or type(value) is type(now) or (
                isinstance(value, numbers) and isinstance(now, numbers) and not isinstance(value, bool)):
            out[key] = value
        else:
            raise ValueError(f"scheduler {key!r} is a {type(value).__name__}, expected {type(now).__name__}")
    return out


def _leaves(tree: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    if isinstance(tree, dict):
        return [leaf for k in sorted(tree) for leaf in _leaves(tree[k], f"{prefix}{k}.")]
    return [(prefix, tree)] if isinstance(tree, torch.Tensor) else []


@torch.no_grad()
def _broadcast_tensors(tree: dict[str, Any], groups: Groups) -> None:
    """Send the loader's tensors to the rest of its DP group, in a key order every rank shares."""
    for _, t in _leaves(tree):
        local = t.to_local() if hasattr(t, "to_local") else t
        dist.broadcast(local, src=groups.dp_src, group=groups.dp)


def load_model_tensors(path_store: Store, name: str, marker: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state dict of a checkpoint, in this process without any process group."""
    saved = _metadata_keys(path_store, name, marker)
    state = {k[len("model."):]: _empty_like_saved(m) for k, m in saved.items() if k.startswith("model.")}
    wrapped = {"model": state}
    _dcp_load(wrapped, path_store, name, None, [0])
    return wrapped["model"]
