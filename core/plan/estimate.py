"""Bytes one rank holds in each phase of a run: build, load, optimizer set-up, forward/backward, step, checkpoint.

The per-rank peak is the largest phase. Each phase adds what is alive then, as the engine's code
allocates it (docs/memory.md derives every term):

- model state: local parameters in the parameter dtype plus buffers (RoPE tables stay fp32);
  gradients (torch AdamW: fp32 ``.grad``; the flat optimizer of bf16 modes: an fp32 accumulator
  of every local parameter, unsharded, or ``.grad`` in the parameter dtype without
  ``fp32_grad_acc``); optimizer state (torch AdamW: two fp32 moments per parameter; the flat
  optimizer: two moments in the state dtype per element of this rank's DP slice, ZeRO-1 slicing
  dense weights over DP and experts over DP / EP) and the flat optimizer's own copy of the slice
  (fp32 master weights, or the parameter dtype without them: under fp32 + ZeRO-1 an fp32 copy);
- transients: :data:`BUILD` (materialising), the HF checkpoint read, the flat optimizer's
  construction, its step (flattened gradients, DP division, AdamW temporaries, the all-gather of
  the updated slices), the loss backward, checkpoint export and async staging.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nxdt.plan.activations import ActivationModel, in_flight, layer_bytes
from nxdt.plan.placement import RankParams

#: How ``nxdt.parallel.apply`` builds a family *without* a per-parameter init rule
#: (``ModelSpec.init_parameter``): every rank allocates the *whole* model and initialises it, then
#: casts, prunes and shards it. Families with the rule (every kit family) build sharded: each rank
#: holds its own local parameters plus one full tensor while it is drawn (planner.plan_memory decides).
BUILD_MATERIALIZES_WHOLE_MODEL = True
#: ... and loads HF weights whole beside the materialised model; sharded builds read them one layer
#: group at a time and keep their slices (nxdt.parallel.materialize.load_hf_sharded).
LOAD_READS_WHOLE_CHECKPOINT = True


#: Elements of the flat buffers one collective of ``nxdt.parallel.zero1`` moves over the whole DP group.
FLAT_CHUNK_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class Facts:
    """What a plan reads from the run besides its layout."""

    seq_length: int
    param_bytes: int  # 2 (bf16) or 4
    state_bytes: int  # AdamW moments: 2 or 4
    master_weights: bool
    fp32_grad_acc: bool
    stochastic_rounding: bool
    autocast: bool
    rows_per_sample: int = 1  # preference pairs: 2
    hf_checkpoint_bytes: int = 0  # bytes of the HF safetensors read at start (0: none)
    checkpoint: str = "none"  # none | sync | async
    reference_model: bool = False  # a frozen copy of the weights (DPO)
    flash: bool = True
    masked: bool = False  # rows carry an explicit attention mask (packed or padded documents)
    device_is_cpu: bool = False


@dataclass(frozen=True)
class Layout:
    """One parallel layout and its batch split."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    vpp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    zero1: bool = False
    activation_checkpointing: str | None = None  # None | selective | full
    micro_batch_size: int = 1
    grad_accum: int = 1
    kv_replicator: int = 1
    schedule: str | None = None

    @property
    def world_size(self) -> int:
        """Ranks this layout spans."""
        return self.tp * self.pp * self.dp * self.cp

    def dims(self) -> Any:
        """The layout as the engine's ParallelDims."""
        from nxdt.specs import ParallelDims

        return ParallelDims(dp=self.dp, tp=self.tp, pp=self.pp, ep=self.ep, cp=self.cp, vpp=self.vpp,
                            sequence_parallel=self.sequence_parallel and self.tp > 1, kv_replicator=self.kv_replicator)

    @property
    def label(self) -> str:
        """``TP8 SP PP4 VPP2 DP4 EP2 ZeRO-1 AC=full`` style summary."""
        parts = [f"TP{self.tp}" + (" SP" if self.sequence_parallel and self.tp > 1 else ""), f"PP{self.pp}"]
        if self.vpp > 1:
            parts.append(f"VPP{self.vpp}")
        parts.append(f"DP{self.dp}")
        if self.ep > 1:
            parts.append(f"EP{self.ep}")
        if self.zero1:
            parts.append("ZeRO-1")
        parts.append(f"AC={self.activation_checkpointing or 'none'}")
        return " ".join(parts)


GIB = 1 << 30


@dataclass
class RankMemory:
    """The bytes of one pipeline rank (every TP/DP rank of that stage alike), by kind and by phase."""

    pp_rank: int
    parameters: int  # local parameters (elements)
    trainable: int  # of which the optimizer updates
    weights: int
    gradients: int
    optimizer_state: int
    master_weights: int
    activations: int  # per step, at the forward/backward peak
    phases: dict[str, int] = field(default_factory=dict)
    host_staging: int = 0  # async checkpoint staging in host memory (accelerators)

    @property
    def peak(self) -> int:
        """The largest phase."""
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        """The phase that sets the peak."""
        return max(self.phases, key=lambda k: self.phases[k])

    def as_dict(self) -> dict[str, Any]:
        """GiB figures for output."""
        g = round
        return {
            "pp_rank": self.pp_rank,
            "parameters": self.parameters,
            "trainable": self.trainable,
            "weights_gib": g(self.weights / GIB, 3),
            "gradients_gib": g(self.gradients / GIB, 3),
            "optimizer_state_gib": g(self.optimizer_state / GIB, 3),
            "master_weights_gib": g(self.master_weights / GIB, 3),
            "activations_gib": g(self.activations / GIB, 3),
            "phases_gib": {k: g(v / GIB, 3) for k, v in self.phases.items()},
            "peak_gib": g(self.peak / GIB, 3),
            "peak_phase": self.peak_phase,
            **({"host_staging_gib": g(self.host_staging / GIB, 3)} if self.host_staging else {}),
        }


def rank_memory(rank: RankParams, layout: Layout, facts: Facts, acts: ActivationModel, full_bytes: int,
                full_buffer_bytes: int, largest_full: int, sharded_build: bool | None = None) -> RankMemory:
    """Every phase's bytes on pipeline rank ``rank`` of ``layout`` (``sharded_build`` None: build as the engine does)."""
    pb, n, nt = facts.param_bytes, rank.numel, rank.trainable
    weights = n * pb + rank.buffer_bytes
    if facts.reference_model:
        weights += n * pb  # the frozen reference copy, same layout, no gradients
    flat = layout.zero1 or pb == 2
    dense_shard = layout.dp if layout.zero1 else 1
    expert_shard = max(1, layout.dp // layout.ep) if layout.zero1 else 1
    sliced = -(-(nt - rank.expert) // dense_shard) + -(-rank.expert // expert_shard)
    phases: dict[str, int] = {}
    if flat:
        copy_bytes = 4 if (facts.master_weights or pb == 4) else pb
        states = 2 * facts.state_bytes * sliced
        master = copy_bytes * sliced
        persistent_grads = 4 * nt if facts.fp32_grad_acc else 0
        grads = persistent_grads or pb * nt
        shard_grad = copy_bytes * sliced
        synced = layout.zero1 and layout.dp > 1
        # zero1.py reduces and gathers in chunks of about FLAT_CHUNK_ELEMENTS over the DP group
        chunk = min(nt, FLAT_CHUNK_ELEMENTS)
        # finalize: this rank's fp32 slice, plus one chunk of the flat gradient (a view of the accumulator);
        # without a DP group the flat fp32 gradient is built whole (the slice is all of it)
        reduce = (4 * sliced + (0 if facts.fp32_grad_acc else 4 * chunk)) if synced else \
            (0 if facts.fp32_grad_acc else 4 * nt)
        upcasts = (2 * 4 * sliced if facts.state_bytes == 2 else 0) + (2 * 4 * sliced if copy_bytes == 2 else 0)
        noise = 8 * sliced if facts.stochastic_rounding else 0
        update = 2 * 4 * sliced + upcasts + noise  # sqrt and its quotient in fp32, fp32 views of bf16 tensors
        # all_gather of one chunk of every rank's slice at a time (an fp32 view of a bf16 shard otherwise)
        gather = 4 * chunk + 4 * min(sliced, chunk) if synced else (4 * nt if copy_bytes == 2 else 0)
        step_extra = shard_grad + max(reduce, update, gather)
        phases["optimizer_init"] = weights + 4 * nt + master + persistent_grads
    else:
        states, master, persistent_grads, grads = 2 * 4 * nt, 0, 0, 4 * nt
        step_extra = 4 * nt  # foreach AdamW's sqrt(exp_avg_sq) temporary
    act, transient = activation_bytes(rank, layout, facts, acts)
    held = weights + states + master + persistent_grads + pipeline_buffers(rank, layout, facts, acts)
    if facts.autocast:
        transient += 2 * n  # autocast's bf16 copies of the weights, kept for backward
    # Gradients are alive while activations are when earlier micro-batches (or stages) already ran backward.
    accumulating = layout.grad_accum > 1 or layout.pp > 1
    live_grads = (grads - persistent_grads) if accumulating else 0
    forward_backward = held + act + transient + live_grads
    backward_end = held + (grads - persistent_grads) + (rank.largest * pb if persistent_grads else 0)
    phases["forward_backward"] = max(forward_backward, backward_end)
    phases["optimizer_step"] = held + (grads - persistent_grads) + step_extra
    whole = BUILD_MATERIALIZES_WHOLE_MODEL if sharded_build is None else not sharded_build
    phases["build"] = build_bytes(rank, facts, weights, full_bytes, full_buffer_bytes, largest_full, whole)
    if facts.hf_checkpoint_bytes:
        whole_load = LOAD_READS_WHOLE_CHECKPOINT if sharded_build is None else not sharded_build
        phases["hf_load"] = load_bytes(rank, facts, full_bytes, full_buffer_bytes, whole_load)
    staging = 0
    if facts.checkpoint != "none":
        export = (2 * facts.state_bytes + (4 if facts.master_weights else 0)) * nt * 2 if flat else 0
        staging = n * pb + (2 * facts.state_bytes + (4 if facts.master_weights else 0)) * nt if flat else n * pb + 8 * nt
        on_device = staging if (facts.checkpoint == "async" and facts.device_is_cpu) else 0
        phases["checkpoint"] = held + export + on_device
    return RankMemory(rank.pp_rank, n, nt, weights, grads, states, master, act, phases,
                      host_staging=staging if facts.checkpoint == "async" and not facts.device_is_cpu else 0)


def build_bytes(rank: RankParams, facts: Facts, weights: int, full_bytes: int, full_buffer_bytes: int,
                largest_full: int, whole: bool = BUILD_MATERIALIZES_WHOLE_MODEL) -> int:
    """Peak while the model is materialised: the whole model (``whole``, today) or the rank's own shards."""
    if whole:
        # the whole model in its build dtype, then each parameter cast (one at a time) to the parameter dtype
        cast = largest_full * facts.param_bytes if facts.param_bytes != 4 else 0
        return full_bytes + full_buffer_bytes + cast
    # a sharded build: the rank's own parameters plus one whole tensor while it is split
    return weights + largest_full * 4


def load_bytes(rank: RankParams, facts: Facts, full_bytes: int, full_buffer_bytes: int,
               whole: bool = LOAD_READS_WHOLE_CHECKPOINT) -> int:
    """Peak while HF weights are read: beside the whole model (``whole``, today) or slice by slice."""
    if whole:
        return full_bytes + full_buffer_bytes + facts.hf_checkpoint_bytes
    return rank.numel * facts.param_bytes + rank.buffer_bytes + rank.largest * 4


def activation_bytes(rank: RankParams, layout: Layout, facts: Facts, acts: ActivationModel) -> tuple[int, int]:
    """(saved activations at the forward/backward peak, transients on top of them) for one pipeline rank."""
    tokens = layout.micro_batch_size * facts.seq_length * facts.rows_per_sample
    chunks = in_flight(layout.schedule, layout.pp, layout.vpp, layout.grad_accum, rank.pp_rank)
    per_layer = layer_bytes(acts, layout.activation_checkpointing)
    layers = sum(rank.layers) / max(1, len(rank.layers))  # blocks of one local stage (chunk)
    saved = chunks * layers * per_layer * tokens
    if rank.first:
        saved += chunks * acts.first * tokens
    if rank.last:
        saved += acts.last * tokens  # the last stage runs each micro-batch's loss and backward back to back
    transient = acts.loss_transient * tokens if rank.last else 0
    if layout.activation_checkpointing == "full":
        transient += acts.layer * tokens  # one block recomputed during backward
    return int(saved), int(transient)


def pipeline_buffers(rank: RankParams, layout: Layout, facts: Facts, acts: ActivationModel) -> int:
    """torch's PipelineStage receive buffers, allocated at the first step for every micro-batch and kept."""
    if layout.pp <= 1:
        return 0
    # each local stage: input activations (all stages but the first), output gradients (all but the last)
    last_stage = layout.pp * layout.vpp - 1
    buffers = sum((s != 0) + (s != last_stage) for s in rank.stages)
    tokens = layout.micro_batch_size * facts.seq_length * facts.rows_per_sample
    return int(layout.grad_accum * tokens * acts.layer_full * buffers)
