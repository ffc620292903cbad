"""The trainer's checkpoint schedule: when to save, keep-last-K, async saves, and auto-resume.

The mechanics live in ``nxdt.checkpoint``; this module decides *when* from exp_manager's keys:
a save happens every ``every_n_train_steps`` steps, every ``train_time_interval`` seconds, and at
the last step when ``save_last`` (also with ``trainer.max_steps=0``, which saves the starting
weights). Saves are serialized: a new save first waits for the previous async one to finish.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import torch.distributed as dist

from nxdt.checkpoint import dcp_io
from nxdt.checkpoint.layout import (
    CONFIG_FILE,
    checkpoint_name,
    latest_complete,
    list_checkpoints,
    read_marker,
    retention_victims,
    write_marker,
)
from nxdt.checkpoint.store import Store, split_checkpoint_url
from nxdt.errors import NxdtError

#: Test hook: rank 0 exits abruptly after the shards of this step's save are written and before
#: its completion marker, as a node failure mid-save would. Never set it outside tests.
DIE_DURING_SAVE_ENV = "NXDT_TEST_DIE_DURING_SAVE"


def checkpoint_root(cfg: Any, run_dir: Any) -> str:
    """``exp_manager.checkpoint_dir`` (a path or s3:// URL), else ``<run_dir>/checkpoints``."""
    return cfg.exp_manager.checkpoint_dir or os.path.join(str(run_dir), "checkpoints")


class Checkpointer:
    """Saves, retains and resumes the trainer's checkpoints (every rank holds one)."""

    def __init__(self, trainer: Any):
        self.trainer = trainer
        em = trainer.cfg.exp_manager
        self.em, self.params = em, em.checkpoint_callback_params
        self.store = Store(checkpoint_root(trainer.cfg, trainer.run_dir))
        self.groups = dcp_io.build_groups(trainer)
        self.is_main = self.groups.rank == 0
        p = self.params
        self.saving = bool(em.create_checkpoint_callback) and bool(
            p.every_n_train_steps or p.train_time_interval or p.save_last)
        self.keep = p.save_top_k if p.save_top_k != 0 else 1
        self._last_saved_step: int | None = None
        self._last_save_time = time.monotonic()
        self._pending: threading.Thread | None = None
        self._pending_error: BaseException | None = None
        self.last_load: dcp_io.LoadReport | None = None
        #: seconds the training loop was blocked by each save (capture + staging or the full write)
        self.blocked_s: list[float] = []

    # -- resume -----------------------------------------------------------------------------------
    def maybe_resume(self) -> None:
        """Load ``resume_from_checkpoint``, or the latest complete checkpoint with ``resume_if_exists``."""
        em, weights_only = self.em, bool(self.trainer.cfg.model.weight_init_only)
        if em.resume_from_checkpoint:
            store, name = split_checkpoint_url(em.resume_from_checkpoint)
            self._load(store, name, weights_only)
        elif em.resume_if_exists:
            found = self._agree(lambda: getattr(latest_complete(self.store), "name", None))
            if found is not None:
                self._load(self.store, found, weights_only)
            elif not em.resume_ignore_no_checkpoint:
                raise NxdtError(
                    f"exp_manager.resume_if_exists: no complete checkpoint in {self.store.root}; "
                    "set exp_manager.resume_ignore_no_checkpoint=true to start fresh when there is none"
                )
        if self.trainer.state.step >= self.trainer.max_steps:
            self.maybe_save(final=True)  # the loop will not run (max_steps=0 or already done)

    def _load(self, store: Store, name: str, weights_only: bool) -> None:
        marker = self._agree(lambda: read_marker(store, name))
        if marker is None:
            raise NxdtError(f"{store.url(name)} is not a complete nxdt checkpoint (no valid marker)")
        self.last_load = dcp_io.load(self.trainer, store, name, marker, self.groups,
                                     weights_only=weights_only, one_dp_rank=bool(self.em.load_from_one_dp_rank))
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

    def _agree(self, decide: Any) -> Any:
        """Rank 0's answer of ``decide()``, on every rank (one listing, one view of S3)."""
        box = [decide() if self.is_main else None]
        if self.groups.distributed:
            # the default group: the io group may be busy with an async save's finish on another thread
            dist.broadcast_object_list(box, src=0)
        return box[0]

    # -- save ----------------------------------------------------------------------------------
    def _due(self, final: bool) -> bool:
        step, p = self.trainer.state.step, self.params
        if not self.saving or step == self._last_saved_step:
            return False
        if final and p.save_last:
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
            self.save()

    def save(self) -> str:
        """Save a checkpoint of the trainer's current state; returns its name."""
        t0 = time.perf_counter()
        self.wait()
        trainer, state = self.trainer, self.trainer.state
        name = checkpoint_name(self.params.filename, {"step": state.step, "consumed_samples": state.consumed_samples})
        if self.is_main and self.store.exists(name):
            self.store.remove(name)  # leftovers of a save that died at this step; DCP's first collective orders this
        payload, has_optim = dcp_io.capture(trainer, self.groups.rank)
        use_async = bool(self.em.async_checkpointing)
        future = dcp_io.save(payload, self.store.writer(name), self.groups, use_async)
        meta = {"step": state.step, "consumed_samples": state.consumed_samples, "has_optimizer": has_optim,
                "world_size": self.groups.world_size, "async": use_async,
                "layout": {k: getattr(trainer.parallel, k) for k in ("dp", "tp", "pp", "cp", "ep")}}
        self._last_saved_step = state.step
        self._last_save_time = time.monotonic()
        if future is None:
            self._finish(name, meta)
        else:
            self._pending = threading.Thread(target=self._finish_async, args=(future, name, meta), daemon=True,
                                             name=f"nxdt-ckpt-{name}")
            self._pending.start()
        self.blocked_s.append(time.perf_counter() - t0)
        return name

    def _finish_async(self, future: Any, name: str, meta: dict[str, Any]) -> None:
        try:
            future.result()
            self._finish(name, meta)
        except BaseException as exc:  # reported on the training thread by wait()
            self._pending_error = exc

    def _finish(self, name: str, meta: dict[str, Any]) -> None:
        """After every rank's shards are written: digests, then the marker (rank 0, last), then retention."""
        if self.is_main:
            self.store.write_text(self.trainer.cfg.to_yaml(), name, CONFIG_FILE)
        digests = dcp_io.own_file_digests(self.store, name, self.groups.rank)
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
        write_marker(self.store, name, {**meta, "files": files, "created": time.time()})
        self._retain()

    def _retain(self) -> None:
        for victim in retention_victims(list_checkpoints(self.store, with_sizes=False), self.keep,
                                        self.params.monitor, self.params.mode):
            self.store.remove(victim)

    def wait(self) -> None:
        """Block until the pending async save is complete; re-raise its error."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        if self._pending_error is not None:
            exc, self._pending_error = self._pending_error, None
            raise NxdtError(f"asynchronous checkpoint save failed: {exc}") from exc

    def close(self) -> None:
        """Wait for the pending save."""
        self.wait()


def build_checkpointer(trainer: Any) -> Checkpointer:
    """The checkpointer for ``trainer``'s exp_manager settings."""
    return Checkpointer(trainer)
