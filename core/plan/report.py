"""What ``nxdt plan``, ``nxdt run --dry-run`` and ``nxdt inspect`` print of a plan: the table and its assumptions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nxdt.plan import estimate
from nxdt.plan.devices import GIB

if TYPE_CHECKING:
    from nxdt.plan.planner import MemoryPlan

_PHASES = {
    "build": "build (materialise)",
    "hf_load": "HF checkpoint load",
    "optimizer_init": "optimizer set-up",
    "forward_backward": "forward/backward",
    "optimizer_step": "optimizer step",
    "checkpoint": "checkpoint save",
}


def assumptions(plan: MemoryPlan) -> list[str]:
    """Every assumption the figures rest on, in words."""
    f, lay, dev = plan.facts, plan.layout, plan.device
    dtype = "bf16" if f.param_bytes == 2 else "fp32"
    out = [
        f"device {dev.name}: {dev.memory_gib:g} GiB per rank, {dev.reserve_gib:g} GiB reserved for the runtime "
        f"({dev.source})",
        f"weights {dtype} ({f.param_bytes} B/param), buffers (RoPE tables) fp32; optimizer: "
        + (f"flat AdamW, moments {f.state_bytes} B x2, {'fp32 master' if f.master_weights else 'own copy of the slice'}"
           f"{', fp32 gradient accumulator (unsharded)' if f.fp32_grad_acc else ''}"
           if (lay.zero1 or f.param_bytes == 2) else "torch AdamW, fp32 moments (8 B/param), fp32 gradients")
        + (f"; ZeRO-1 slices state over DP={lay.dp}" + (f" (experts over DP/EP={max(1, lay.dp // lay.ep)})" if lay.ep > 1 else "")
           if lay.zero1 else ""),
        f"activations per token from the kit's saved tensors (docs/memory.md), {'bf16' if f.param_bytes == 2 or f.autocast else 'fp32'} "
        f"matmul activations, seq {f.seq_length}, micro-batch {lay.micro_batch_size}"
        + (f" x {f.rows_per_sample} rows" if f.rows_per_sample > 1 else "")
        + f", micro-batches per step {lay.grad_accum}, recomputation {lay.activation_checkpointing or 'none'}"
        + ("" if f.flash else ", unfused attention (S x S softmax kept)")
        + (", explicit attention masks (packed/padded rows)" if f.masked else ""),
    ]
    if lay.pp > 1:
        out.append(f"pipeline: {lay.schedule or ('Interleaved1F1B' if lay.vpp > 1 else '1F1B')}, in-flight micro-batches "
                   "per rank as torch schedules them (1F1B: min(m, pp - rank); interleaved: warm-up + 1 chunks)")
    whole = estimate.BUILD_MATERIALIZES_WHOLE_MODEL if plan.sharded_build is None else not plan.sharded_build
    out.append("build: " + ("every rank materialises the whole model in its build dtype before pruning and sharding "
                            "(a family without a per-parameter init rule)" if whole else
                            "each rank materialises only its own shards (plus one full tensor while it is drawn)"))
    if f.hf_checkpoint_bytes:
        whole_load = estimate.LOAD_READS_WHOLE_CHECKPOINT if plan.sharded_build is None else not plan.sharded_build
        out.append(f"HF load: {f.hf_checkpoint_bytes / GIB:.2f} GiB of weights read "
                   + ("whole onto every rank beside the materialised model" if whole_load else "slice by slice"))
    if f.checkpoint != "none":
        flat = lay.zero1 or f.param_bytes == 2
        out.append(f"checkpoint saves ({f.checkpoint}): "
                   + ("the flat optimizer exports its state per parameter, gathered over DP and copied (x2)"
                      if flat else "torch AdamW's state is saved in place")
                   + ("; the async save stages a copy of weights and state"
                      + (" in host memory" if not f.device_is_cpu else " in the same RAM") if f.checkpoint == "async" else ""))
    out.append(f"allocator slack {plan.slack:.0%} of the peak" + (
        f", plus {plan.runtime_bytes / 2**20:.0f} MiB process runtime (measured on CPU)" if plan.runtime_bytes else ""))
    return out


def lines(plan: MemoryPlan) -> list[str]:
    """The plan as text: the layout, a per-rank table, the verdict and the assumptions."""
    lay = plan.layout
    out = [f"memory plan: {plan.source}, {plan.parameters:,} parameters, {lay.label}, world {lay.world_size}, "
           f"device {plan.device.name}"]
    header = f"{'pp rank':>7} {'params':>14} {'weights':>8} {'grads':>8} {'optim':>8} {'master':>8} {'activ.':>8} {'peak':>8}  phase"
    out += ["per rank (GiB; every TP/DP rank of a pipeline rank alike):", header]
    for r in plan.ranks:
        out.append(f"{r.pp_rank:>7} {r.parameters:>14,} {r.weights / GIB:>8.2f} {r.gradients / GIB:>8.2f} "
                   f"{r.optimizer_state / GIB:>8.2f} {r.master_weights / GIB:>8.2f} {r.activations / GIB:>8.2f} "
                   f"{plan.predicted(r) / GIB:>8.2f}  {_PHASES.get(r.peak_phase, r.peak_phase)}")
    worst = plan.worst
    out.append("phases of pp rank {} (GiB): {}".format(
        worst.pp_rank, ", ".join(f"{_PHASES.get(k, k)} {v / GIB:.2f}" for k, v in worst.phases.items())))
    if worst.host_staging:
        out.append(f"async checkpoint staging: {worst.host_staging / GIB:.2f} GiB of host memory per rank")
    out.append(verdict(plan))
    out += [f"assumption: {a}" for a in assumptions(plan)]
    out += [f"note: {n}" for n in plan.notes]
    return out


def verdict(plan: MemoryPlan) -> str:
    """One line: fits or not, the peak against the usable memory, and what sets it when it does not fit."""
    usable = f"{plan.capacity_bytes / GIB:.2f} GiB usable on {plan.device.name}"
    if plan.fits:
        return f"verdict: fits: peak {plan.peak_bytes / GIB:.2f} GiB per rank of {usable}"
    worst = plan.worst
    line = (f"verdict: does NOT fit: peak {plan.peak_bytes / GIB:.2f} GiB per rank (pipeline rank {worst.pp_rank}, "
            f"{_PHASES.get(worst.peak_phase, worst.peak_phase)}) of {usable}")
    if plan.training_peak_bytes <= plan.capacity_bytes:
        line += (f"; training alone peaks at {plan.training_peak_bytes / GIB:.2f} GiB and would fit: the whole-model "
                 "build/load of today's engine is what does not (--sharded-build plans the sharded one)")
    return line


def machine_plan(run: Any, world_size: int | None = None, nproc_per_node: int = 1) -> MemoryPlan:
    """``run``'s plan (a ResolvedRun) on this machine's device kind, ``nproc_per_node`` ranks sharing a CPU's RAM."""
    from nxdt.plan.devices import local_device
    from nxdt.plan.planner import plan_memory

    return plan_memory(run, world_size=world_size, target=local_device(nproc_per_node))


def describe_plan(run: Any, world_size: int | None = None, nproc_per_node: int = 1, target: str | None = None,
                  **kwargs: Any) -> list[str]:
    """The plan's lines for ``run`` (a ResolvedRun) on ``target`` (a device name; None: this machine)."""
    from nxdt.plan.planner import plan_memory

    if target is None:
        return lines(machine_plan(run, world_size, nproc_per_node))
    return lines(plan_memory(run, world_size=world_size, target=target, **kwargs))


def plan_lines(plan: dict[str, Any]) -> list[str]:
    """The per-rank table and verdict of a plan already turned into a dict (``MemoryPlan.as_dict``)."""
    out = [f"memory per rank on {plan['device']['name']} ({plan['layout']['label']}, world {plan['layout']['world_size']}; "
           f"GiB; `nxdt plan` states the assumptions):"]
    for r in plan["ranks"]:
        out.append(f"  pipeline rank {r['pp_rank']}: weights {r['weights_gib']:.2f}, gradients {r['gradients_gib']:.2f}, "
                   f"optimizer state {r['optimizer_state_gib'] + r['master_weights_gib']:.2f}, activations "
                   f"{r['activations_gib']:.2f}; peak {r['predicted_peak_gib']:.2f} in {_PHASES.get(r['peak_phase'], r['peak_phase'])}")
    verdict = "fits" if plan["fits"] else "does NOT fit"
    out.append(f"  {verdict}: peak {plan['peak_gib']:.2f} of {plan['capacity_gib']:.2f} GiB usable"
               + ("" if plan["fits"] or plan["training_peak_gib"] > plan["capacity_gib"]
                  else f" (training alone: {plan['training_peak_gib']:.2f}; today's whole-model build does not fit)"))
    return out
