"""Measured memory per rank: peaks by phase, gathered to rank 0 for metrics.jsonl and result.json.

CPU ranks: the peak resident set (``VmHWM``) minus the resident set when the trainer starts
(after imports and the process group), the high-water mark reset at each phase boundary by
writing ``5`` to ``/proc/self/clear_refs`` (Linux); elsewhere ``ru_maxrss``, which cannot be
reset, so a phase then reads the peak so far. CUDA ranks: ``max_memory_allocated`` and
``max_memory_reserved``, reset per phase. The attributable part comes from the tensors
themselves: parameters and buffers, gradients (or the flat optimizer's accumulators), optimizer
state, and the activations autograd keeps for backward, tracked during the first step with a
``saved_tensors_hooks`` pack hook (each storage once, freed when the graph lets it go).
"""

from __future__ import annotations

import contextlib
import resource
import sys
import weakref
from collections.abc import Iterator
from typing import Any

import torch

GIB = 1 << 30


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # KiB on Linux, bytes on macOS


class MemoryMonitor:
    """This rank's memory peaks since the trainer started, by phase (``setup``, ``train``)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.phases: dict[str, int] = {}
        self.reserved: dict[str, int] = {}
        self.activations = 0
        self.attributed: dict[str, int] = {}
        self._steps_seen = 0
        self._model: Any = None
        self._resettable = False
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
            self.baseline = int(torch.cuda.memory_allocated(device))
        else:
            self._resettable = _reset_peak_rss()
            kib = _status_kib("VmRSS")
            self.baseline = kib * 1024 if kib is not None else _maxrss_bytes()

    def _peak_now(self) -> tuple[int, int]:
        if self.cuda:
            return (int(torch.cuda.max_memory_allocated(self.device)) - self.baseline,
                    int(torch.cuda.max_memory_reserved(self.device)))
        kib = _status_kib("VmHWM")
        peak = kib * 1024 if kib is not None else _maxrss_bytes()
        return max(0, peak - self.baseline), 0

    def mark(self, phase: str) -> None:
        """Close ``phase``: record its peak (the largest so far if it is seen again) and start the next."""
        peak, reserved = self._peak_now()
        self.phases[phase] = max(peak, self.phases.get(phase, 0))
        self.reserved[phase] = max(reserved, self.reserved.get(phase, 0))
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._resettable:
            _reset_peak_rss()

    @property
    def peak(self) -> int:
        """The largest phase peak so far (bytes above the baseline)."""
        return max([*self.phases.values(), self._peak_now()[0]])

    def setup_done(self, model: Any, optimizer: Any) -> None:
        """Close the ``setup`` phase (data, optimizer, checkpointer) and watch the optimizer's first steps."""
        self.mark("setup")
        self._model = model
        self.attach(model, optimizer)

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """One training step, closed as phase ``train``; the first one also tracks its saved activations."""
        context = _SavedActivations(self._model) if "train" not in self.phases else None
        with context if context is not None else contextlib.nullcontext():
            yield
        if context is not None:
            self.activations = max(self.activations, context.peak)
        self.mark("train")

    def attach(self, model: Any, optimizer: Any) -> None:
        """Attribute bytes just before the first two optimizer steps, when gradients and (from step 2) state exist."""

        def before_step(opt: Any, args: Any, kwargs: Any) -> None:
            self._steps_seen += 1
            if self._steps_seen <= 2:
                now = attributable(model, opt)
                self.attributed = {k: max(v, self.attributed.get(k, 0)) for k, v in now.items()}

        optimizer.register_step_pre_hook(before_step)

    def step_metrics(self, is_distributed: bool) -> dict[str, Any]:
        """``peak_memory_gib`` (largest rank) and the per-rank list, for metrics.jsonl (a collective)."""
        ranks = self._gather([self.peak, max(self.reserved.values(), default=0)], is_distributed)
        out: dict[str, Any] = {
            "peak_memory_gib": round(max(r[0] for r in ranks) / GIB, 4),
            "peak_memory_gib_per_rank": [round(r[0] / GIB, 4) for r in ranks],
        }
        if self.cuda:
            out["peak_reserved_gib"] = round(max(r[1] for r in ranks) / GIB, 4)
        return out

    def report(self, is_distributed: bool) -> list[dict[str, Any]]:
        """Per rank: peaks by phase and the attributable bytes (a collective; every rank gets the list)."""
        record = {
            "kind": "cuda max_memory_allocated" if self.cuda else "peak RSS above the trainer's start",
            "peak_bytes": self.peak,
            "phases_bytes": dict(self.phases),
            "attributable_bytes": {**self.attributed, "activations": self.activations},
        }
        if self.cuda:
            record["reserved_bytes"] = max(self.reserved.values(), default=0)
        return self._gather(record, is_distributed)

    @staticmethod
    def _gather(value: Any, is_distributed: bool) -> list[Any]:
        if not is_distributed:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
        return out


class _SavedActivations:
    """Peak bytes of the storages autograd holds for backward (parameters and buffers excluded)."""

    def __init__(self, model: Any = None) -> None:
        from nxdt.parallel.grad_norm import local_tensor

        module = getattr(model, "trainable_module", None)
        tensors = [*module.parameters(), *module.buffers()] if module is not None else []
        # Matmuls save (views of) their weights: parameter storage is not activation memory.
        self.exclude = {local_tensor(t).untyped_storage().data_ptr() for t in tensors}
        self.live: dict[int, list[int]] = {}  # storage pointer -> [saved tensors alive, bytes]
        self.now = self.peak = 0
        self._hooks: Any = None

    def __enter__(self) -> _SavedActivations:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "meta":
            return t
        local = t.to_local() if hasattr(t, "to_local") else t
        try:
            storage = local.untyped_storage()
            ptr = storage.data_ptr()
        except (RuntimeError, NotImplementedError):
            return t  # tensor subclasses without storage of their own (functional collectives' wrappers)
        if ptr in self.exclude:
            return t
        entry = self.live.get(ptr)
        if entry is None:
            entry = self.live[ptr] = [0, storage.nbytes()]
            self.now += entry[1]
            self.peak = max(self.peak, self.now)
        entry[0] += 1
        weakref.finalize(t, self._release, ptr)
        return t

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.now -= entry[1]
            del self.live[ptr]


def attributable(model: Any, optimizer: Any) -> dict[str, int]:
    """Bytes of this rank's parameters (with buffers), gradients (accumulators too) and optimizer state (slice copies too)."""
    from nxdt.parallel.grad_norm import local_tensor

    module = model.trainable_module
    seen: set[int] = set()

    def size(tensors: Any) -> int:
        total = 0
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            local = local_tensor(t)
            ptr = local.untyped_storage().data_ptr()
            if ptr in seen or local.device.type == "meta":
                continue
            seen.add(ptr)
            total += local.untyped_storage().nbytes()
        return total

    parameters = size([*module.parameters(), *module.buffers()])
    shards = [p for g in optimizer.param_groups for p in g["params"]]
    grads = [p.grad for p in module.parameters()] + [p.grad for p in shards]
    grads += [f.grad_acc for f in getattr(optimizer, "flat_groups", [])]
    gradients = size(grads)
    states = [v for s in optimizer.state.values() for v in s.values()]
    return {"parameters": parameters, "gradients": gradients, "optimizer_state": size(states) + size(shards)}
