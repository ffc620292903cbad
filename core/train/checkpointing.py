"""The trainer's checkpoint schedule: when to save, keep-last-K, async saves, and auto-resume.

The mechanics live in ``nxdt.checkpoint``; this module decides *when* from exp_manager's keys:
a save happens every ``every_n_train_steps`` steps, every ``train_time_interval`` seconds, and at
the last step when ``save_last`` (NeMo's default: unset counts as true, so a run without any
checkpoint settings saves one final checkpoint; also with ``trainer.max_steps=0``, which saves the
starting weights). Saves are serialized: a new save first waits for the previous async one.

Safety rules (docs/checkpoints.md): a save never removes the run's last complete checkpoint before
its successor is complete (a name that is taken by a complete checkpoint is written under a
staging name and swapped in afterwards); retention and auto-resume touch only checkpoints of this
run (its id lives in the run directory) whose names its ``filename`` template gives; a failed
save (a full disk included) is one line naming the place, and leaves no partial directory.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from typing import Any

import torch.distributed as dist

from nxdt.checkpoint import dcp_io
from nxdt.checkpoint.layout import (
    CONFIG_FILE,
    MARKER,
    checkpoint_name,
    inspect_marker,
    latest_complete,
    list_checkpoints,
    read_owner,
    remove_checkpoint,
    retention_victims,
    write_marker,
    write_owner,
)
from nxdt.checkpoint.names import name_pattern, old_name, staging_name
from nxdt.checkpoint.store import Store, split_checkpoint_url
from nxdt.checkpoint.subject import Checkpointable
from nxdt.errors import NxdtError
from nxdt.train.exp_manager import release_run_lock, run_id

#: Test hook: rank 0 exits abruptly after the shards of this step's save are written and before
#: its completion marker, as a node failure mid-save would. Never set it outside tests.
DIE_DURING_SAVE_ENV = "NXDT_TEST_DIE_DURING_SAVE"
#: below this many free bytes a failed local write is reported as a full disk
_LOW_SPACE = 64 << 20


def checkpoint_root(cfg: Any, run_dir: Any) -> str:
    """``exp_manager.checkpoint_dir`` (a path or s3:// URL), else ``<run_dir>/checkpoints``."""
    return cfg.exp_manager.checkpoint_dir or os.path.join(str(run_dir), "checkpoints")


class Checkpointer:
    """Saves, retains and resumes the trainer's checkpoints (every rank holds one)."""

    def __init__(self, trainer: Checkpointable):
        # The trainer's attributes are read here and in dcp_io.capture/load only.
        self.trainer = trainer
        cfg = trainer.cfg
        em = cfg.exp_manager
        self.em, self.params = em, em.checkpoint_callback_params
        self.run_dir = trainer.run_dir
        self.store = Store(checkpoint_root(cfg, self.run_dir))
        timeout = _timeout(cfg)
        self.groups = dcp_io.build_groups(trainer.mesh, timeout)
        self.is_main = self.groups.rank == 0
        self.run_id: str = self._agree(lambda: run_id(self.run_dir))
        self.pattern = name_pattern(self.params.filename)
        p = self.params
        self.saving = bool(em.create_checkpoint_callback) and p.saves_any()
        self.keep = p.save_top_k if p.save_top_k != 0 else 1
        self._last_saved_step: int | None = None
        self._last_save_time = time.monotonic()
        self._pending: threading.Thread | None = None
        self._pending_error: BaseException | None = None
        self._pending_target: tuple[str, int] = ("", -1)
        self.last_load: dcp_io.LoadReport | None = None
        #: seconds the training loop was blocked by each save (capture + staging or the full write)
        self.blocked_s: list[float] = []

    # -- resume -----------------------------------------------------------------------------------
    def maybe_resume(self) -> None:
        """Load ``resume_from_checkpoint``, or this run's latest complete checkpoint with ``resume_if_exists``."""
        try:
            self._resume()
        except BaseException:
            if self.is_main:  # the run ends here; let the next one use the directory
                release_run_lock(self.run_dir)
            raise

    def _resume(self) -> None:
        em, weights_only = self.em, bool(self.trainer.cfg.model.weight_init_only)
        if em.resume_from_checkpoint:
            store, name = split_checkpoint_url(em.resume_from_checkpoint)
            self._load(store, name, weights_only)
        elif em.resume_if_exists:
            found = self._agree(lambda: getattr(latest_complete(self.store, self.run_id), "name", None))
            if found is not None:
                self._load(self.store, found, weights_only)
            elif not em.resume_ignore_no_checkpoint:
                raise NxdtError(
                    f"exp_manager.resume_if_exists: no complete checkpoint of this run in {self.store.root}; "
                    "set exp_manager.resume_ignore_no_checkpoint=true to start fresh when there is none"
                )
        self._rewind_metrics()
        if self.trainer.state.step >= self.trainer.max_steps:
            self.maybe_save(final=True)  # the loop will not run (max_steps=0 or already done)

    def _load(self, store: Store, name: str, weights_only: bool) -> None:
        marker, problem = self._agree(lambda: inspect_marker(store, name))
        if marker is None:
            raise NxdtError(f"{store.url(name)} is not a complete nxdt checkpoint ({problem or 'no completion marker'})")
        parallel = getattr(self.trainer, "parallel", None)
        # Pipeline stages and expert-parallel ranks each ask for a part of the model's tensors.
        whole_model = getattr(parallel, "pp", 1) == 1 and getattr(parallel, "ep", 1) == 1
        own = marker.get("run_id") == self.run_id
        self.last_load = dcp_io.load(self.trainer, store, name, marker, self.groups, weights_only=weights_only,
                                     one_dp_rank=bool(self.em.load_from_one_dp_rank), whole_model=whole_model,
                                     own_checkpoint=own)
        if not weights_only:
            self._last_saved_step = self.trainer.state.step
        per_rank = [self.last_load.bytes_read]
        if self.groups.distributed:
            per_rank = [0] * self.groups.world_size
            dist.all_gather_object(per_rank, self.last_load.bytes_read)
        if self.is_main:
            what = "weights" if weights_only else f"step {self.trainer.state.step}"
            print(f"nxdt: resumed {what} from {store.url(name)}; bytes read per rank {per_rank}, "
                  f"total {sum(per_rank)}", flush=True)

    def _rewind_metrics(self) -> None:
        """Drop metrics.jsonl rows past the step training continues from, so each step is logged once."""
        logger = getattr(self.trainer, "logger", None)
        if self.is_main and logger is not None and hasattr(logger, "rewind"):
            logger.rewind(self.trainer.state.step)

    def _agree(self, decide: Any) -> Any:
        """Rank 0's answer of ``decide()`` on every rank; an NxdtError it raises is raised on every rank."""
        box: list[Any] = [None]
        if self.is_main:
            try:
                box = [("ok", decide())]
            except NxdtError as exc:
                box = [("error", exc)]
        if self.groups.distributed:
            # the default group: the io group may be busy with an async save's finish on another thread
            dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise NxdtError(str(value))
        return value

    # -- save ----------------------------------------------------------------------------------
    def _due(self, final: bool) -> bool:
        step, p = self.trainer.state.step, self.params
        if not self.saving or step == self._last_saved_step:
            return False
        if final and p.saves_last_step():
            return True
        if p.every_n_train_steps and step % p.every_n_train_steps == 0:
            return True
        if p.train_time_interval:
            # Clocks differ between ranks; rank 0's decides so that every rank saves or none does.
            return bool(self._agree(lambda: time.monotonic() - self._last_save_time >= p.train_time_interval))
        return False

    def maybe_save(self, final: bool = False) -> None:
        """Save when the schedule says so."""
        if self._due(final):
            self.save(final=final)

    def save(self, final: bool = False) -> str:
        """Save a checkpoint of the trainer's current state; returns its name."""
        t0 = time.perf_counter()
        self.wait()
        trainer, state = self.trainer, self.trainer.state
        name = checkpoint_name(self.params.filename, {"step": state.step, "consumed_samples": state.consumed_samples})
        target = self._agree(lambda: self._claim(name, state.step))
        use_async = bool(self.em.async_checkpointing)
        meta = {"step": state.step, "consumed_samples": state.consumed_samples, "world_size": self.groups.world_size,
                "async": use_async, "run_id": self.run_id, "name": name,
                "layout": {k: getattr(trainer.parallel, k) for k in ("dp", "tp", "pp", "cp", "ep")}}
        try:
            payload, meta["has_optimizer"] = dcp_io.capture(trainer, self.groups.rank, final=final)
            peft = trainer.cfg.model_alignment_strategy.peft if trainer.cfg.model_alignment_strategy else None
            if peft is not None:
                meta["lora"] = {"base": bool(peft.save_lora_base), "merged": bool(final and peft.merge_lora)}
            future = dcp_io.save(payload, self.store.writer(target), self.groups, use_async)
            self._last_saved_step = state.step
            self._last_save_time = time.monotonic()
            if future is None:
                self._finish(name, target, meta)
            else:
                self._pending = threading.Thread(target=self._finish_async, args=(future, name, target, meta),
                                                 daemon=True, name=f"nxdt-ckpt-{name}")
                self._pending.start()
        except (Exception, dcp_io.CheckpointException) as exc:
            raise self._save_failed(exc, target, state.step) from None
        self.blocked_s.append(time.perf_counter() - t0)
        return name

    def _claim(self, name: str, step: int) -> str:
        """Rank 0: where this step's save writes (``name`` or a staging name), with the owner file written.

        A complete checkpoint of this run already called ``name`` stays until its successor is
        complete; an incomplete one of this run is a save that died and goes; anything else there
        belongs to someone else and is never touched.
        """
        try:
            if not self.store.exists(name):
                write_owner(self.store, name, self.run_id, step)
                return name
            marker, _ = inspect_marker(self.store, name)
            owner = marker.get("run_id") if marker is not None else read_owner(self.store, name)
            if owner != self.run_id:
                raise NxdtError(
                    f"{self.store.url(name)} already exists and is not this run's (run id {owner or 'unknown'}); "
                    "nxdt never deletes it. Give this run its own exp_manager.checkpoint_dir or another "
                    "exp_manager.checkpoint_callback_params.filename")
            if marker is None:
                remove_checkpoint(self.store, name)
                write_owner(self.store, name, self.run_id, step)
                return name
            target = staging_name(name, step)
            remove_checkpoint(self.store, target)  # this run's leftover of the same step, if any
            write_owner(self.store, target, self.run_id, step)
            return target
        except OSError as exc:
            raise self._save_failed(exc, name, step) from None

    def _finish_async(self, future: Any, name: str, target: str, meta: dict[str, Any]) -> None:
        try:
            future.result()
            self._finish(name, target, meta)
        except BaseException as exc:  # reported on the training thread by wait()
            self._pending_error = exc
            self._pending_target = (target, meta["step"])

    def _finish(self, name: str, target: str, meta: dict[str, Any]) -> None:
        """After every rank's shards are written: digests, the marker (rank 0, last), the swap, retention."""
        if self.is_main:
            self.store.write_text(self.trainer.cfg.to_yaml(), target, CONFIG_FILE)
            self._write_peft(target, meta)
        digests = dcp_io.own_file_digests(self.store, target, self.groups.rank)
        if self.groups.distributed:
            gathered: list[Any] = [None] * self.groups.world_size
            dist.all_gather_object(gathered, digests, group=self.groups.io)
        else:
            gathered = [digests]
        if not self.is_main:
            return
        if os.environ.get(DIE_DURING_SAVE_ENV) == str(meta["step"]):
            os._exit(17)
        files = {rel: d for ranks in gathered for rel, d in ranks.items()}
        write_marker(self.store, target, {**meta, "files": files, "created": time.time()})
        if target != name:
            self._swap_in(name, target)
        self._retain()

    def _write_peft(self, target: str, meta: dict[str, Any]) -> None:
        """A LoRA run's PEFT files inside the checkpoint (save_lora_config_adapter, merge_sharded_lora)."""
        cfg = self.trainer.cfg
        peft = cfg.model_alignment_strategy.peft if cfg.model_alignment_strategy else None
        if peft is None or meta.get("lora", {}).get("merged") or not (peft.save_lora_config_adapter or peft.merge_sharded_lora):
            return
        from nxdt.peft.checkpoint import write_peft_files

        # Read back what every rank just wrote: the adapters of any layout, gathered in this process.
        state = dcp_io.load_model_tensors(self.store, target)
        write_peft_files(self.store, target, self.trainer.run, state, peft)

    def _swap_in(self, name: str, staged: str) -> None:
        """Replace complete checkpoint ``name`` by the complete ``staged`` one; each moment leaves a complete one."""
        marker, _ = inspect_marker(self.store, name)
        old = old_name(name, marker["step"] if marker else 0)
        remove_checkpoint(self.store, old)
        self.store.rename(name, old, last=MARKER)
        self.store.rename(staged, name, last=MARKER)
        remove_checkpoint(self.store, old)

    def _retain(self) -> None:
        infos = list_checkpoints(self.store, with_sizes=False)
        for victim in retention_victims(infos, self.keep, self.params.monitor, self.params.mode,
                                        run_id=self.run_id, pattern=self.pattern):
            remove_checkpoint(self.store, victim)

    def _save_failed(self, exc: BaseException, target: str, step: int) -> NxdtError:
        """One line for a failed save; rank 0 removes the incomplete directory (a full disk needs the space)."""
        found = dcp_io.causes(exc)
        for cause in found:
            if isinstance(cause, NxdtError):
                return NxdtError(str(cause))
        full = _disk_full(found, self.store)  # before the clean-up below frees space
        free = self.store.free_bytes()
        if self.is_main:
            try:
                if inspect_marker(self.store, target)[0] is None:
                    remove_checkpoint(self.store, target)
            except Exception:  # the report below matters more than the clean-up
                pass
        good = latest_complete(self.store, self.run_id)  # every rank, so that every rank's line is the same
        kept = f"the last good checkpoint {good.name} (step {good.step}) is kept" if good else \
            "this run has no complete checkpoint yet"
        if full:
            free_text = f" ({free} bytes free)" if free is not None else ""
            return NxdtError(f"saving checkpoint step {step} failed: no space left on device in "
                             f"{self.store.root}{free_text}; the incomplete save was removed and {kept}")
        first = found[0]
        message = str(first).strip().splitlines()[0] if str(first).strip() else ""
        return NxdtError(f"saving checkpoint {self.store.url(target)} failed: {type(first).__name__}: {message}; "
                         f"{kept}")

    def wait(self) -> None:
        """Block until the pending async save is complete; re-raise its error as one line."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        if self._pending_error is not None:
            exc, self._pending_error = self._pending_error, None
            raise self._save_failed(exc, *self._pending_target)

    def close(self) -> None:
        """Wait for the pending save, then release the run directory's lock."""
        try:
            self.wait()
        finally:
            if self.is_main:
                release_run_lock(self.run_dir)


def _disk_full(found: list[BaseException], store: Store) -> bool:
    """Whether a failed write looks like a full disk: ENOSPC/EDQUOT, or a local root with almost no space left.

    torch's stream writer reports a short write as ``unexpected pos N vs M`` without the errno,
    so the free space of a local root decides then.
    """
    for exc in found:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(exc):
            return True
    free = store.free_bytes()
    return free is not None and free < _LOW_SPACE


def _timeout(cfg: Any) -> Any:
    """``distributed_strategy.collective_timeout_s`` as a timedelta (None: torch's default)."""
    from datetime import timedelta

    seconds = getattr(cfg.distributed_strategy, "collective_timeout_s", None)
    return timedelta(seconds=seconds) if seconds else None


def build_checkpointer(trainer: Checkpointable) -> Checkpointer:
    """The checkpointer for ``trainer``'s exp_manager settings."""
    return Checkpointer(trainer)
