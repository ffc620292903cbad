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
  any DP size, loads what the other saved;
- mixture-of-experts weights (parameter role ``expert``, experts stacked on dim 0) are saved one
  tensor per expert, ``<module>.<e>.<weight>`` (``layers.0.feed_forward.experts.3.w1``), whatever
  EP rank holds expert ``e``; an expert's TP shards stay DTensors. Any EP/TP/PP layout loads them.

The saved key layout is ``model.<fqn>`` and ``optim.state.<fqn>.<state>``, the one
``torch.distributed.checkpoint.state_dict.get_state_dict`` produces for DDP + AdamW, so checkpoints
of those layouts read the same either way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor, Shard

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
        records = getattr(model, "records", None)
        roles = {r.local_name: r.role for r in records} if records is not None else {}
        #: expert weights' local name -> (global index of this rank's first expert, TP mesh, TP placements)
        self.experts = {name: _expert_layout(p) for name, p in self.params if roles.get(name) == "expert"}

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

    def saved_keys(self, name: str, p: torch.Tensor) -> list[str]:
        """The keys parameter ``name`` is saved under: its FQN, or one per expert this rank holds."""
        if name not in self.experts:
            return [self.key[name]]
        first = self.experts[name][0]
        return [expert_key(self.key[name], first + i) for i in range(local_tensor(p).shape[0])]

    def saved_items(self, name: str, p: torch.Tensor, local: torch.Tensor) -> dict[str, torch.Tensor]:
        """Saved key -> saved form of ``local`` (shaped like ``p``'s local shard); one item per expert for experts."""
        if name not in self.experts:
            return {self.key[name]: self.saved(p, local)}
        _, tp_mesh, placements = self.experts[name]
        out = {}
        for key, piece in zip(self.saved_keys(name, p), local.unbind(0)):
            out[key] = DTensor.from_local(piece, tp_mesh, placements, run_check=False) if tp_mesh is not None else piece
        return out

    def model_state(self) -> dict[str, torch.Tensor]:
        """The model's parameters in saved form, by FQN."""
        out: dict[str, torch.Tensor] = {}
        for name, p in self.params:
            out.update(self.saved_items(name, p, local_tensor(p).detach()))
        return out

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
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, entry in per_fqn.items():
            p = by_param[name]
            for k, v in entry.items():
                items = dict.fromkeys(self.saved_keys(name, p), v) if k == "step" else self.saved_items(name, p, v)
                for key, value in items.items():
                    out.setdefault(key, {})[k] = value
        return out

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

    def targets(self, name: str, p: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Saved key -> an empty saved-form tensor of ``p`` (one per expert for experts)."""
        if name not in self.experts:
            return {self.key[name]: self.target(p, dtype)}
        local = local_tensor(p)
        return self.saved_items(name, p, torch.empty(local.shape, dtype=dtype, device=local.device))

    def model_targets(self) -> dict[str, torch.Tensor]:
        """Empty saved-form tensors for every parameter, in the parameters' dtypes."""
        out: dict[str, torch.Tensor] = {}
        for name, p in self.params:
            out.update(self.targets(name, p, p.dtype))
        return out

    def optim_targets(self, optimizer: Any, saved_keys: Any) -> dict[str, dict[str, torch.Tensor]]:
        """Empty saved-form tensors for the optimizer state the checkpoint holds and ``optimizer`` keeps."""
        flat = hasattr(optimizer, "export_state")
        keep_master = flat and bool(optimizer.precision.master_weights)
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, p in self.params:
            dtype = optimizer.state_dtype if flat else p.dtype
            kinds = [(k, dtype) for k in ADAM_STATES] + ([(MASTER, torch.float32)] if keep_master else [])
            for k, kind_dtype in kinds:
                keys = [key for key in self.saved_keys(name, p) if f"optim.state.{key}.{k}" in saved_keys]
                if keys:
                    empties = self.targets(name, p, kind_dtype)
                    for key in keys:
                        out.setdefault(key, {})[k] = empties[key]
            for key in self.saved_keys(name, p):
                if f"optim.state.{key}.step" in saved_keys:
                    out.setdefault(key, {})["step"] = torch.empty((), dtype=torch.float32)
        return out

    def gathered(self, name: str, p: torch.Tensor, loaded: dict[str, Any]) -> torch.Tensor | None:
        """``p``'s rank-local tensor from loaded saved-form values (key -> tensor); None if any is missing."""
        if name not in self.experts:
            value = loaded.get(self.key[name])
            return None if value is None else self.local(p, value)
        keys = self.saved_keys(name, p)
        if any(key not in loaded for key in keys):
            return None
        return torch.stack([local_tensor(loaded[key]) for key in keys])

    @torch.no_grad()
    def load_model(self, loaded: dict[str, torch.Tensor], partial: bool = False) -> None:
        """Copy loaded saved-form parameters into the (sharded, replicated) model.

        ``partial``: parameters the checkpoint does not hold keep their values (a LoRA run's base).
        """
        for name, p in self.params:
            value = self.gathered(name, p, loaded)
            if value is None and partial:
                continue
            if value is None:
                raise KeyError(f"checkpoint lacks {self.key[name]}")
            local_tensor(p).copy_(value)

    @torch.no_grad()
    def load_optim(self, optimizer: Any, loaded: dict[str, dict[str, torch.Tensor]]) -> None:
        """Install loaded saved-form optimizer state (after :meth:`load_model`: a missing master is the weights)."""
        per_fqn: dict[str, dict[str, torch.Tensor]] = {}
        for name, p in self.params:
            keys = self.saved_keys(name, p)
            kinds = set.intersection(*(set(loaded.get(key, {})) for key in keys))
            entry: dict[str, torch.Tensor] = {}
            for k in sorted(kinds):
                if k == "step":
                    entry[k] = loaded[keys[0]][k]
                    continue
                value = self.gathered(name, p, {key: loaded[key][k] for key in keys})
                if value is not None:
                    entry[k] = value
            if entry:
                per_fqn[name] = entry
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


def expert_key(key: str, expert: int) -> str:
    """The saved key of one expert of stacked weight ``key``: ``a.b.experts.w1`` -> ``a.b.experts.<e>.w1``."""
    module, _, weight = key.rpartition(".")
    return f"{module}.{expert}.{weight}"


def _expert_layout(p: torch.Tensor) -> tuple[int, Any, list[Any]]:
    """(global index of the first local expert, TP mesh of one expert's slice or None, its placements)."""
    if not isinstance(p, DTensor):
        return 0, None, []
    mesh, names = p.device_mesh, p.device_mesh.mesh_dim_names or ()
    first: int = 0
    tp_mesh: Any = None
    placements: list[Any] = []
    for dim, placement in zip(names, p.placements):
        sub = mesh[dim] if mesh.ndim > 1 else mesh
        if dim == "ep":
            first = sub.get_local_rank() * local_tensor(p).shape[0]
        elif isinstance(placement, Shard):
            # One expert's slice drops the expert dimension, so the TP split moves one dimension left.
            tp_mesh, placements = sub, [Shard(placement.dim - 1)]
    return first, tp_mesh, placements

