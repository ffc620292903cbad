"""Activation memory of a transformer block per token, after Korthikanti et al. 2022, adapted to the kit.

Korthikanti et al. ("Reducing Activation Recomputation in Large Transformer Models", 2022) count
``s b h (34 + 5 a s / h)`` bytes per layer for a GPT block in fp16 with dropout, ``/t`` under
tensor + sequence parallelism, ``34/t`` with selective recomputation and ``2`` (the block input)
with full recomputation. The kit's block differs, and the terms below are what its tensors save
for backward, counted with ``torch.autograd.graph.saved_tensors_hooks`` on the CPU kernels
(docs/memory.md lists the measurements):

- RMSNorm computes in fp32: it saves its fp32 input (``4h``), the normalised value and its output
  in the residual dtype (``2 h e_r``) and the fp32 ``rsqrt`` (4 B); LayerNorm its input and output
  and fp32 mean/rstd. Under autocast the linears also save the bf16 cast of their input (``h e``).
- Attention (fused SDPA, causal, no mask) saves q, the repeated k and v (GQA heads are expanded to
  the query heads before the kernel), the output (``4 q_dim e``) and the fp32 log-sum-exp (``4 a``).
  The unfused (math) kernel also saves the softmax (``e a s``); an explicit mask (packed or
  padded rows) adds its fp32 form, ``4 s`` per token; attention dropout takes the math path with
  its masks (``~14 a s``).
- A gated MLP saves the gate and up outputs, the activation and the product (``4 f e``); a plain
  one the input and output of its activation (``2 f e``); dropout masks cost 1 B per element.
- The loss keeps the fp32 log-softmax (``4 V / t``); while its backward runs the logits, the
  log-softmax gradient and the logits' fp32 gradient are alive too (``(e + 8) V``), and
  loss-parallel cross-entropy under TP three more fp32 buffers (``+12 V / t``), as measured.
- MoE layers save each token's ``top_k`` copies through the experts (``top_k (h + 4 f / t) e``)
  and the router's fp32 logits and probabilities.

``e`` is the bytes of a matmul activation (2 under bf16 weights or autocast, else 4), ``e_r`` of
the residual stream (the parameter dtype). TP divides the head and channel terms by ``t``; SP
also divides the norms' terms, but torch's SequenceParallel saves the all-gathered input of the
column-parallel linears whole (``h e`` per norm), where Megatron re-gathers it in backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GATED = ("swiglu", "geglu")


@dataclass(frozen=True)
class ActivationModel:
    """Bytes per token a layer, the ends and the loss keep for backward, for one TP rank."""

    layer: float  # one block, no recomputation
    layer_full: float  # one block under full recomputation (its input)
    layer_selective: float  # one block with its core attention recomputed
    first: float  # embedding inputs (first stage)
    last: float  # final norm + the loss's fp32 log-softmax (last stage)
    loss_transient: float  # logits, their gradient and the log-softmax gradient while the loss backward runs
    modelled: bool = True


def _dims(arch: Any) -> dict[str, Any] | None:
    h = getattr(arch, "hidden_size", None)
    if not h:
        return None
    a = int(getattr(arch, "num_attention_heads", 0) or max(1, h // 64))
    head_dim = int(getattr(arch, "head_dim", None) or h // a)
    activation = str(getattr(arch, "activation", "swiglu"))
    return {
        "h": int(h),
        "a": a,
        "q": a * head_dim,
        "f": int(getattr(arch, "ffn_hidden_size", None) or 4 * h),
        "v": int(getattr(arch, "vocab_size", 0) or 0),
        "gated": bool(getattr(arch, "gated", activation in GATED)),
        "norm": str(getattr(arch, "norm", "rmsnorm")),
        "moe": getattr(arch, "moe", None),
        "layers": int(getattr(arch, "num_layers", 0) or 0),
        "hidden_dropout": float(getattr(arch, "hidden_dropout", 0.0) or 0.0),
        "attention_dropout": float(getattr(arch, "attention_dropout", 0.0) or 0.0),
        "ffn_dropout": float(getattr(arch, "ffn_dropout", 0.0) or 0.0),
    }


def activation_model(arch: Any, seq: int, tp: int, sequence_parallel: bool, param_bytes: int, autocast: bool,
                     flash: bool = True, masked: bool = False) -> ActivationModel:
    """Per-token bytes for ``arch`` at sequence length ``seq`` on one of ``tp`` ranks."""
    d = _dims(arch)
    if d is None:
        return ActivationModel(0, 0, 0, 0, 0, 0, modelled=False)
    h, a, q, f, v, t = d["h"], d["a"], d["q"], d["f"], d["v"], tp
    e = 2 if (param_bytes == 2 or autocast) else 4  # matmul activations
    er = param_bytes  # residual stream
    sp = sequence_parallel and t > 1
    if d["norm"] == "layernorm":
        norm_local, norm_out = h * er + 8, h * er
    else:
        norm_local, norm_out = 4 * h + h * er + 4, h * er
    cast = h * e if autocast else 0
    # The norm's own tensors; its output is what the next linears save (all-gathered whole under SP).
    norm = (norm_local / t + h * e) if sp else (norm_local + norm_out + cast)
    attention = (4 * q * e + 4 * a) / t
    if not flash or d["attention_dropout"]:
        attention += ((14 if d["attention_dropout"] else e) * a * seq - 4 * a) / t
    if masked:
        attention += 4 * seq
    mlp = (4 if d["gated"] else 2) * f * e / t
    if d["ffn_dropout"]:
        mlp += f / t
    moe = d["moe"]
    if moe is not None:
        experts = int(getattr(moe, "num_experts", 1))
        top_k = int(getattr(moe, "top_k", 1))
        mlp = top_k * (h * e + mlp) + 8 * experts
    dropout = 2 * h * (1 / t if sp else 1) if d["hidden_dropout"] else 0
    layer = 2 * norm + attention + mlp + dropout
    # Full recomputation keeps the block's input (sequence-sharded under SP).
    layer_full = h * er / (t if sp else 1)
    # Selective (CoreAttention) keeps q, k, v as they enter (k, v before the GQA expansion) instead of
    # the kernel's q, repeated k/v and log-sum-exp; the output is still saved as wo's input.
    kv = q * int(getattr(arch, "num_kv_heads", a) or a) / a
    core_kept = (2 * q + 2 * kv) * e / t
    layer_selective = layer - attention + core_kept
    first = 8.0 + (h if d["hidden_dropout"] else 0)
    final_norm = (norm_local / t + h * e) if sp else (norm_local + norm_out + cast)
    last = final_norm + 4 * v / t
    # While the loss backward runs: the logits (e), the log-softmax gradient and the logits' fp32 gradient;
    # loss-parallel cross-entropy (TP) keeps three more fp32 vocabulary-sized buffers (max-shifted logits,
    # their exp and the gradient's exp), measured 7.4 fp32 buffers in all where one device has 4.
    loss_transient = (e + 8 + (12 if t > 1 else 0)) * v / t
    return ActivationModel(layer, layer_full, layer_selective, first, last, loss_transient)


def layer_bytes(model: ActivationModel, granularity: str | None) -> float:
    """Bytes per token one block keeps under ``granularity`` (None, ``full`` or ``selective``)."""
    if granularity == "full":
        return model.layer_full
    if granularity == "selective":
        return model.layer_selective
    return model.layer


def in_flight(schedule: str | None, pp: int, vpp: int, microbatches: int, pp_rank: int) -> int:
    """Micro-batch chunks (one local stage each) whose activations a pipeline rank holds at once, as torch schedules them."""
    # 1F1B: min(m, pp - rank). GPipe: all m. Interleaved 1F1B (and the other multi-stage schedules): the
    # warm-up of (vpp - 1) m_round + 2 (pp - 1 - rank) forwards plus the one before the first backward, at
    # most m vpp; for rank 0 that is Korthikanti's L (1 + (pp - 1) / (pp vpp)) layers.
    if pp <= 1:
        return 1
    name = (schedule or ("Interleaved1F1B" if vpp > 1 else "1F1B")).lower()
    if name == "gpipe":
        return microbatches * vpp
    if vpp <= 1 and name == "1f1b":
        return min(microbatches, pp - pp_rank)
    rounds = max(1, microbatches // pp)
    per_round = microbatches // rounds
    warmup = min((vpp - 1) * per_round + 2 * (pp - 1 - pp_rank), microbatches * vpp)
    return min(warmup + 1, microbatches * vpp)
