"""Layout-independent model and optimizer state: what a checkpoint holds whatever DP/TP/ZeRO-1 wrote it.

Every tensor is keyed by its single-device FQN and saved in its single-device (global) shape:

- TP-sharded values stay DTensors (DCP writes each shard once and reshards at load);
- KV-replicated projections (TP > KV heads) are gathered and saved with each KV head once, then
  repeated again for the loading layout's replication factor;
- under pipeline parallelism each rank holds only its stages' parameters, so each rank saves and
  loads its own keys; a tied LM head on the last stage is keyed by the embedding's FQN, as the
  single-device model lists it, so the tied weight is saved once and loads into both stages;
- optimizer state is per FQN (``exp_avg``, ``exp_avg_sq``, ``step`` and, with master weights, the
  fp32 ``master``) for torch's AdamW and for the flat ZeRO-1 AdamW alike, so either optimizer, at
  any DP size, loads what the other saved.

The saved key layout is ``model.<fqn>`` and ``optim.state.<fqn>.<state>``, the one
``torch.distributed.checkpoint.state_dict.get_state_dict`` produces for DDP + AdamW, so checkpoints
of those layouts read the same either way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor

from nxdt.parallel.grad_norm import local_tensor
from nxdt.parallel.kv_replication import replicate_kv, unreplicate_kv

_WRAPPER_PREFIX = "_checkpoint_wrapped_module."
ADAM_STATES = ("exp_avg", "exp_avg_sq")
MASTER = "master"


class PortableState:
    """Maps one ParallelModel's rank-local tensors to and from their saved single-device form."""

    def __init__(self, model: Any):
        self.model = model
        self.params = [(n.replace(_WRAPPER_PREFIX, ""), p) for n, p in model.trainable_module.named_parameters()]
        aliases = getattr(model, "checkpoint_aliases", {})
        #: rank-local FQN -> saved FQN (they differ only for a pipeline stage's tied LM head)
        self.key = {name: aliases.get(name, name) for name, _ in self.params}
        self.kv_ids = {id(p) for p in getattr(model, "kv_params", [])}
        self.kv_heads = getattr(model, "kv_heads", 1)
        self.kv_replicas = getattr(model, "kv_replicas", 1)

    def _is_kv(self, p: torch.Tensor) -> bool:
        return id(p) in self.kv_ids and self.kv_replicas > 1

    # -- to the saved form ------------------------------------------------------------------------
    def saved(self, p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """``local`` (shaped like ``p``'s rank-local shard) in its saved form (a collective for KV values)."""
        value = local
        if isinstance(p, DTensor):
            value = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
        if self._is_kv(p):
            full = value.full_tensor() if isinstance(value, DTensor) else value
            return unreplicate_kv(full, self.kv_heads, self.kv_replicas)
        return value

    def model_state(self) -> dict[str, torch.Tensor]:
        """The model's parameters in saved form, by FQN."""
        return {self.key[name]: self.saved(p, local_tensor(p).detach()) for name, p in self.params}

    def optim_state(self, optimizer: Any) -> dict[str, dict[str, torch.Tensor]]:
        """The optimizer's state in saved form: FQN -> {exp_avg, exp_avg_sq, step[, master]}."""
        if hasattr(optimizer, "export_state"):
            per_fqn = optimizer.export_state()
        else:
            per_fqn = {}
            for name, p in self.params:
                state = optimizer.state.get(p, {})
                entry = {k: local_tensor(state[k]) for k in ADAM_STATES if k in state}
                if "step" in state:
                    entry["step"] = torch.tensor(float(state["step"]))
                per_fqn[name] = entry
        by_param = dict(self.params)
        return {self.key[name]: {k: v if k == "step" else self.saved(by_param[name], v) for k, v in entry.items()}
                for name, entry in per_fqn.items() if entry}

    # -- from the saved form ----------------------------------------------------------------------
    def target(self, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """An empty tensor in ``p``'s saved form for DCP to load into."""
        local = local_tensor(p)
        if self._is_kv(p):
            return torch.empty((p.shape[0] // self.kv_replicas, *p.shape[1:]), dtype=dtype, device=local.device)
        empty = torch.empty(local.shape, dtype=dtype, device=local.device)
        if isinstance(p, DTensor):
            return DTensor.from_local(empty, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
        return empty

    def local(self, p: torch.Tensor, loaded: torch.Tensor) -> torch.Tensor:
        """This rank's part of ``loaded`` (saved form), shaped like ``p``'s rank-local shard."""
        if self._is_kv(p):
            full = replicate_kv(loaded, self.kv_heads, self.kv_replicas)
            if not isinstance(p, DTensor):
                return full
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            for dim, (size, start) in enumerate(zip(shape, offset)):
                full = full.narrow(dim, start, size)
            return full
        return loaded.to_local() if isinstance(loaded, DTensor) else loaded

    def model_targets(self) -> dict[str, torch.Tensor]:
        """Empty saved-form tensors for every parameter, in the parameters' dtypes."""
        return {self.key[name]: self.target(p, p.dtype) for name, p in self.params}

    def optim_targets(self, optimizer: Any, saved_keys: Any) -> dict[str, dict[str, torch.Tensor]]:
        """Empty saved-form tensors for the optimizer state the checkpoint holds and ``optimizer`` keeps."""
        flat = hasattr(optimizer, "export_state")
        keep_master = flat and bool(optimizer.precision.master_weights)
        out = {}
        for name, p in self.params:
            prefix = f"optim.state.{self.key[name]}."
            dtype = optimizer.state_dtype if flat else p.dtype
            entry = {k: self.target(p, dtype) for k in ADAM_STATES if prefix + k in saved_keys}
            if keep_master and prefix + MASTER in saved_keys:
                entry[MASTER] = self.target(p, torch.float32)
            if prefix + "step" in saved_keys:
                entry["step"] = torch.empty((), dtype=torch.float32)
            if entry:
                out[self.key[name]] = entry
        return out

    @torch.no_grad()
    def load_model(self, loaded: dict[str, torch.Tensor]) -> None:
        """Copy loaded saved-form parameters into the (sharded, replicated) model."""
        for name, p in self.params:
            local_tensor(p).copy_(self.local(p, loaded[self.key[name]]))

    @torch.no_grad()
    def load_optim(self, optimizer: Any, loaded: dict[str, dict[str, torch.Tensor]]) -> None:
        """Install loaded saved-form optimizer state (after :meth:`load_model`: a missing master is the weights)."""
        by_param = dict(self.params)
        saved = {self.key[name]: name for name in by_param}
        per_fqn = {saved[key]: {k: v if k == "step" else self.local(by_param[saved[key]], v) for k, v in entry.items()}
                   for key, entry in loaded.items()}
        if hasattr(optimizer, "import_state"):
            optimizer.import_state({name: per_fqn.get(name, {}) for name, _ in self.params})
            return
        fused = any(g.get("fused") for g in optimizer.param_groups)
        for name, p in self.params:
            entry = per_fqn.get(name, {})
            if not all(k in entry for k in (*ADAM_STATES, "step")):
                continue
            state: dict[str, Any] = {}
            for k in ADAM_STATES:
                value = entry[k].to(p.dtype).clone()
                if isinstance(p, DTensor):
                    value = DTensor.from_local(value, p.device_mesh, p.placements, run_check=False,
                                               shape=p.shape, stride=p.stride())
                state[k] = value
            # torch keeps the step on the parameter's device only for fused (and capturable) kernels.
            state["step"] = entry["step"].to(local_tensor(p).device if fused else "cpu").clone()
            optimizer.state[p] = state
