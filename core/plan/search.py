"""``nxdt plan --search``: every (TP, PP, VPP, DP, EP, ZeRO-1, AC) layout of a world, judged and ranked.

Step time is a stated estimate, not a measurement: the step's training FLOPs (the family's
``flops_per_token`` x tokens, plus one more forward of the blocks under full recomputation or of
the core attention under selective) over ``world x peak x MFU`` with :data:`MFU` of the device's
dense bf16 peak, stretched by the pipeline bubble ``(pp - 1) / (vpp m)``; plus communication
volume over link bandwidth, none of it overlapped with compute: TP's four activation all-reduces
(or all-gather/reduce-scatter pairs under SP) per layer and micro-batch, the DP gradient
all-reduce (ZeRO-1 adds the all-gather of the updated weights), pipeline sends, and MoE token
all-to-alls. Links: a group that fits in one node uses the device's intra-node bandwidth, else the
inter-node one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from nxdt.errors import ConfigError
from nxdt.plan.devices import Device
from nxdt.plan.estimate import Layout
from nxdt.plan.planner import MemoryPlan, plan_memory

#: share of the dense bf16 peak that the step's matmuls reach (a stated, typical large-model figure)
MFU = 0.45


@dataclass
class Candidate:
    """One layout, its memory plan and its step-time estimate."""

    plan: MemoryPlan
    compute_s: float
    comm_s: float
    bubble: float

    @property
    def step_s(self) -> float:
        """Estimated seconds per optimizer step."""
        return self.compute_s * (1 + self.bubble) + self.comm_s

    def as_dict(self) -> dict[str, Any]:
        """Machine-readable summary."""
        return {"layout": self.plan.layout.label, "fits": self.plan.fits, "peak_gib": round(self.plan.peak_bytes / 2**30, 2),
                "step_s": round(self.step_s, 3), "compute_s": round(self.compute_s, 3), "comm_s": round(self.comm_s, 3),
                "bubble": round(self.bubble, 3), "layout_detail": vars(self.plan.layout)}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(run: Any, world_size: int, dev: Device, base: Layout) -> list[Layout]:
    """Every layout of ``world_size`` ranks the engine accepts for ``run`` (batch keys and precision fixed)."""
    cfg, arch = run.config, run.arch
    layers = int(getattr(arch, "num_layers", 1) or 1)
    heads = int(getattr(arch, "num_attention_heads", 1) or 1)
    moe = getattr(arch, "moe", None)
    experts = int(getattr(moe, "num_experts", 1)) if moe is not None else 1
    gbs, mbs, seq = cfg.data.global_batch_size, cfg.data.micro_batch_size, cfg.data.seq_length
    selective = "CoreAttention" in run.spec.recompute_modules
    checkpointing: list[str | None] = [None, "full"] + (["selective"] if selective else [])
    out = []
    for tp in _divisors(world_size):
        if tp > dev.ranks_per_node or heads % tp:
            continue
        for pp in _divisors(world_size // tp):
            if 2 * pp > layers:
                continue  # fewer than two layers per pipeline stage: never the better layout
            dp = world_size // (tp * pp)
            if gbs % (mbs * dp):
                continue
            m = gbs // (mbs * dp)
            vpps = [1] + ([v for v in (2, 4) if pp > 1 and 2 * pp * v <= layers and m % pp == 0])
            eps = [e for e in _divisors(dp) if experts % e == 0] if moe is not None else [1]
            for vpp in vpps:
                for ep in eps:
                    for zero1 in ([False, True] if dp > 1 else [False]):
                        for ac in checkpointing:
                            out.append(replace(base, tp=tp, pp=pp, dp=dp, ep=ep, vpp=vpp, zero1=zero1,
                                               sequence_parallel=tp > 1 and seq % tp == 0, activation_checkpointing=ac,
                                               grad_accum=m, schedule=None if vpp > 1 or base.vpp > 1 else base.schedule))
    return out


def step_time(run: Any, plan: MemoryPlan, dev: Device) -> Candidate:
    """The stated step-time estimate of ``plan``'s layout on ``dev``."""
    lay, facts, arch = plan.layout, plan.facts, run.arch
    seq = facts.seq_length
    tokens = run.config.data.global_batch_size * seq * facts.rows_per_sample
    flops = float(run.spec.flops_per_token(arch, seq)) * tokens
    layers = int(getattr(arch, "num_layers", 1) or 1)
    h = int(getattr(arch, "hidden_size", 0) or 0)
    q = int(getattr(arch, "num_attention_heads", 1) or 1) * int(getattr(arch, "head_dim", 0) or (h // max(1, getattr(arch, "num_attention_heads", 1) or 1)))
    if lay.activation_checkpointing == "full":
        flops *= 4 / 3  # the blocks' forward again (vocabulary projection excluded is ignored: small)
    elif lay.activation_checkpointing == "selective":
        flops += 4 * layers * q * seq * tokens  # QK^T and AV forward once more
    compute = flops / (lay.world_size * dev.peak_tflops * 1e12 * MFU)
    bubble = (lay.pp - 1) / (lay.vpp * lay.grad_accum) if lay.pp > 1 else 0.0
    e = 2 if (facts.param_bytes == 2 or facts.autocast) else 4
    micro_tokens = lay.micro_batch_size * seq * facts.rows_per_sample

    def bandwidth(span: int) -> float:
        return (dev.intra_gbs if span <= dev.ranks_per_node else dev.inter_gbs) * 1e9

    comm = 0.0
    if lay.tp > 1:
        per_layer = 4 * 2 * (lay.tp - 1) / lay.tp * micro_tokens * h * e
        comm += layers / lay.pp * lay.grad_accum * per_layer / bandwidth(lay.tp)
    trainable = max(r.trainable for r in plan.ranks)
    if lay.dp > 1:
        grad_bytes = 4 if (facts.fp32_grad_acc or facts.param_bytes == 4) else facts.param_bytes
        volume = 2 * (lay.dp - 1) / lay.dp * trainable * grad_bytes
        if lay.zero1:
            volume += (lay.dp - 1) / lay.dp * trainable * 4
        comm += volume / bandwidth(lay.tp * lay.dp)
    if lay.pp > 1:
        comm += 2 * lay.grad_accum * lay.vpp * micro_tokens * h * e / (lay.tp if lay.sequence_parallel else 1) / bandwidth(lay.world_size)
    moe = getattr(arch, "moe", None)
    if moe is not None and lay.ep > 1:
        moe_layers = len(moe.moe_layers(layers)) if hasattr(moe, "moe_layers") else layers
        volume = 4 * micro_tokens * int(moe.top_k) * h * e * (lay.ep - 1) / lay.ep
        comm += moe_layers / lay.pp * lay.grad_accum * volume / bandwidth(lay.tp * lay.ep)
    return Candidate(plan, compute, comm, bubble)


def search(run: Any, world_size: int, dev: Device, *, snapshot: Any, base: Layout, host: Any = None,
           sharded_build: bool | None = None) -> list[Candidate]:
    """Every layout's plan and step time, fitting ones first, each group by estimated step time."""
    from nxdt.plan.planner import facts_of

    facts = facts_of(run, dev.name == "cpu")
    out = []
    for layout in layouts(run, world_size, dev, base):
        try:
            plan = plan_memory(run, layout=layout, target=dev, snapshot=snapshot, host=host, facts=facts,
                               sharded_build=sharded_build)
        except ConfigError:
            continue  # a split the shard plan refuses (heads, KV heads or experts not divisible)
        out.append(step_time(run, plan, dev))
    # fitting layouts by step time; the others by how far they are, training phases before the build
    out.sort(key=lambda c: (not c.plan.fits, (c.step_s, 0) if c.plan.fits else (c.plan.peak_bytes, c.plan.training_peak_bytes)))
    return out
