"""Conformance checks of a family under the engine's layouts: TP slicing on real gloo ranks, the
pipeline split, and packed-document masking.

These catch what a single-process check passes wrongly: head counts taken from the config instead
of tensor shapes (wrong under TP), blocks outside one top-level ModuleDict or a forward that
cannot pass hidden states through (wrong under PP), and ``position_ids`` that are accepted but do
not keep packed documents apart (wrong for packed SFT).
"""

from __future__ import annotations

import importlib
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from nxdt.specs import ModelSpec, ParallelDims


def _logits(outputs: Any) -> torch.Tensor:
    from nxdt.recipes.losses import logits_of

    out = logits_of(outputs)
    return out.full_tensor() if hasattr(out, "full_tensor") else out


def sample_inputs(spec: ModelSpec, cfg: Any, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random keyword inputs for the inputs ``spec`` declares (the second row padded where masks exist)."""
    g = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)}
    if "attention_mask" in spec.inputs:
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[-1, -3:] = 0
        inputs["attention_mask"] = mask
    if "token_type_ids" in spec.inputs:
        types = torch.zeros(batch, seq, dtype=torch.long)
        types[:, seq // 2 :] = 1
        inputs["token_type_ids"] = types
    return inputs


def _compared(outputs: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits at real (non-padding) positions."""
    mask = inputs.get("attention_mask")
    return outputs[mask.bool()] if mask is not None else outputs


def spec_reference(spec: ModelSpec) -> str:
    """How a worker process finds ``spec``: ``module:attribute`` when importable, else the family name."""
    for module_name, module in list(sys.modules.items()):
        if module is None or module_name == "__main__":
            continue
        for attr, value in list(vars(module).items()):
            if value is spec and not attr.startswith("_"):
                return f"{module_name}:{attr}"
    return spec.family


def _load_spec(ref: str) -> ModelSpec:
    if ":" in ref:
        module, attr = ref.split(":", 1)
        return getattr(importlib.import_module(module), attr)
    from nxdt.plugin_host import get_host

    return get_host().model_spec(ref)


def _tp_worker(rank: int, world: int, store: str, ref: str, cfg: Any, sp: bool, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from nxdt.parallel.kv_replication import kv_replication_factor, replicate_kv_
    from nxdt.parallel.tensor_parallel import apply_tensor_parallel
    from nxdt.parallel.world import leave_process_group
    from nxdt.testing.conformance import build_initialized

    torch.set_num_threads(1)
    # A file rendezvous: no port to race for with other processes on the machine.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        spec = _load_spec(ref)
        model = build_initialized(spec, cfg, seed=0).eval()
        inputs = sample_inputs(spec, cfg, seq=8 * world)
        with torch.no_grad():
            expected = _compared(_logits(model(**inputs)), inputs)
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        parallel = ParallelDims(tp=world, sequence_parallel=sp)
        plan = spec.shard_plan(cfg, parallel)
        if plan.kv_projections:
            replicas = kv_replication_factor(cfg.num_kv_heads, cfg.num_attention_heads, world)
            replicate_kv_(model, tuple(plan.kv_projections), cfg.num_kv_heads, replicas)
        apply_tensor_parallel(model, plan, mesh, sp)
        with torch.no_grad():
            got = _compared(_logits(model(**inputs)), inputs)
        if rank == 0:
            torch.save({"diff": float((got - expected).abs().max())}, out)
    finally:
        leave_process_group()


def check_tensor_parallel(spec: ModelSpec, cfg: Any, tp: int = 2, sequence_parallel: bool = True, atol: float = 1e-5) -> float:
    """A TP forward on ``tp`` gloo processes (the engine's own sharding) equals one process; returns the max diff."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.pt")
        try:
            mp.start_processes(
                _tp_worker,
                args=(tp, str(Path(tmp) / "store"), spec_reference(spec), cfg, sequence_parallel, out),
                nprocs=tp,
                start_method="spawn",
            )
        except Exception as exc:  # the worker's error, e.g. a view sized from the config
            last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise AssertionError(f"{spec.family}: a TP={tp} forward failed on the gloo ranks: {last}") from exc
        diff = torch.load(out)["diff"]
    assert diff <= atol, (
        f"{spec.family}: a TP={tp} forward differs from one process by {diff:.3g} (> {atol}); head counts must come "
        "from tensor shapes and the shard plan must cover every matrix that needs splitting"
    )
    return diff


def check_pipeline_split(spec: ModelSpec, cfg: Any, atol: float = 1e-5) -> float:
    """The engine's PP=2 split of the model (stage views, pruned end modules) composes to the whole forward."""
    from torch import nn

    from nxdt.parallel.pipeline import StagePlan, _placement, split_blocks, stage_views
    from nxdt.testing.conformance import build_initialized

    assert spec.pipeline_blocks is not None, f"{spec.family}: no pipeline_blocks, so it cannot be pipelined"
    from nxdt.errors import NxdtError

    model = build_initialized(spec, cfg, seed=0).eval()
    blocks = spec.pipeline_blocks(cfg)
    try:
        container, first_only, last_only = _placement(model, blocks)
    except NxdtError as exc:
        raise AssertionError(f"{spec.family}: the model cannot be split into pipeline stages: {exc}") from exc
    plan = StagePlan(split_blocks(blocks, 2), [0, 1], container, first_only, last_only, [])
    first, last = stage_views(model, plan)
    inputs = sample_inputs(spec, cfg)
    extra = {k: v for k, v in inputs.items() if k != "input_ids"}
    if "position_ids" in spec.inputs:
        extra["position_ids"] = torch.arange(inputs["input_ids"].shape[1]).expand_as(inputs["input_ids"])
    with torch.no_grad():
        whole = _logits(model(**inputs))
        hidden = first(inputs["input_ids"], **extra)
        assert isinstance(hidden, torch.Tensor) and not isinstance(first, nn.Identity), "stage 0 must return hidden states"
        staged = _logits(last(hidden, **extra))
    diff = float((_compared(staged, inputs) - _compared(whole, inputs)).abs().max())
    assert diff <= atol, f"{spec.family}: two pipeline stages differ from the whole model by {diff:.3g}"
    return diff


def check_packed_documents(spec: ModelSpec, cfg: Any, atol: float = 1e-5) -> float:
    """Two documents packed in one row (positions restarting at 0) give each document's own logits."""
    from nxdt.testing.conformance import build_initialized

    assert "position_ids" in spec.inputs, f"{spec.family} takes no position_ids, so it cannot train on packed rows"
    model = build_initialized(spec, cfg, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, cfg.vocab_size, (1, 7), generator=g), torch.randint(0, cfg.vocab_size, (1, 9), generator=g)
    positions = torch.cat([torch.arange(7), torch.arange(9)]).unsqueeze(0)
    with torch.no_grad():
        packed = _logits(model(input_ids=torch.cat([a, b], dim=1), position_ids=positions))
        separate = torch.cat([_logits(model(input_ids=a)), _logits(model(input_ids=b))], dim=1)
    diff = float((packed - separate).abs().max())
    assert diff <= atol, (
        f"{spec.family}: packed documents leak into each other (diff {diff:.3g}); where position_ids restart at 0 "
        "attention must stay inside each document"
    )
    return diff
