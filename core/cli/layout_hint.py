"""Which layout would fit: the clause a failed fit check gains before a run is launched.

The memory planner's search (``nxdt plan --search``) is asked for the fastest fitting layout on
1, 2, 4, ... nodes of this machine's device kind (a CPU machine runs one rank per node: its ranks
share the RAM); the first node count with a fitting layout is named with the flags to run it.
"""

from __future__ import annotations

from typing import Any

NODE_COUNTS = (1, 2, 4, 8, 16, 32)


def _device(ctx: Any) -> Any:
    """The planner's description of this machine's device, one CPU rank per node or every GPU of the node."""
    import torch

    from nxdt.plan import DEVICES, device

    if ctx.world.device.type != "cuda":
        return device("cpu", ranks_per_node=1)
    name = torch.cuda.get_device_name(ctx.world.device).lower()
    known = next((key for key in ("h200", "h100", "a100") if key in name), None)
    total = torch.cuda.mem_get_info(ctx.world.device)[1] / (1 << 30)
    return device(known, ranks_per_node=torch.cuda.device_count()) if known else DEVICES["h100"].with_memory(total)


def fitting_layout(ctx: Any) -> str:
    """``"; it would fit as ... on N node(s): <flags>"``; on a CPU machine that no count of its like holds, the GPU layout."""
    from nxdt.plan import DEVICES

    dev = _device(ctx)
    found = _first_fit(ctx, dev)
    if found:
        return f"; it would fit as {found}"
    most = NODE_COUNTS[-1]
    where = f"{most} machines like this one" if dev.name == "cpu" else f"{most} nodes of {dev.ranks_per_node} {dev.name}"
    text = f"; no layout fits on up to {where}"
    if dev.name == "cpu":
        gpu = _first_fit(ctx, DEVICES["h100"])
        text += f"; it would fit as {gpu}" if gpu else ""
    return text


def _first_fit(ctx: Any, dev: Any) -> str | None:
    """The fastest fitting layout on the fewest nodes of ``dev``, with where and how to run it; None if none fits."""
    from nxdt.errors import ConfigError
    from nxdt.plan import Layout, layout_of, snapshot_of
    from nxdt.plan.search import search

    run = ctx.run
    snapshot = snapshot_of(run, ctx.host)
    for nodes in NODE_COUNTS:
        world = nodes * dev.ranks_per_node
        try:
            base = layout_of(run, world)
        except ConfigError:  # the config's own TP x PP need not divide this world; the search sets them anyway
            ds = run.config.distributed_strategy
            base = Layout(micro_batch_size=run.config.data.micro_batch_size, kv_replicator=ds.kv_replicator or 1,
                          schedule=ds.pipeline_schedule)
        fitting = [c for c in search(run, world, dev, snapshot=snapshot, base=base, host=ctx.host) if c.plan.fits]
        if fitting:
            layout = fitting[0].plan.layout
            flags = _flags(layout, nodes, dev, run.config.data.micro_batch_size)
            return f"{layout.label} on {_where(nodes, dev)}: {flags}"
    return None


def _where(nodes: int, dev: Any) -> str:
    if dev.name == "cpu":
        return f"{nodes} machine(s) like this one, one process each"
    return f"{nodes} node(s) x {dev.ranks_per_node} {dev.name}"


def _flags(layout: Any, nodes: int, dev: Any, micro_batch_size: int) -> str:
    """The `nxdt run` options of ``layout`` (launch, then the distributed_strategy / model keys it sets)."""
    parts = [f"--nproc-per-node {dev.ranks_per_node}"] + ([f"--nnodes {nodes}"] if nodes > 1 else [])
    ds = "distributed_strategy"
    for key, value, default in (("tensor_model_parallel_size", layout.tp, 1), ("pipeline_model_parallel_size", layout.pp, 1),
                                ("virtual_pipeline_model_parallel_size", layout.vpp, 1),
                                ("expert_model_parallel_size", layout.ep, 1)):
        if value != default:
            parts.append(f"{ds}.{key}={value}")
    if layout.sequence_parallel and layout.tp > 1:
        parts.append(f"{ds}.sequence_parallel=true")
    if layout.zero1:
        parts.append(f"{ds}.zero1=true")
    if layout.activation_checkpointing:
        parts.append(f"model.activations_checkpoint_granularity={layout.activation_checkpointing}")
    if layout.micro_batch_size != micro_batch_size:
        parts.append(f"data.micro_batch_size={layout.micro_batch_size}")
    return " ".join(parts)
