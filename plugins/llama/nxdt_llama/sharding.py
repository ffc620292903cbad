"""The Llama tensor/sequence-parallel plan, as plain data the engine maps onto DTensor styles."""

from __future__ import annotations

from nxdt.specs import ParallelDims, ShardPlan
from nxdt_llama.model import LlamaConfig

ATTENTION_RULES = {
    "layers.*.attention.wq": "colwise",
    "layers.*.attention.wk": "colwise",
    "layers.*.attention.wv": "colwise",
    "layers.*.attention.wo": "rowwise",
}
MLP_RULES = {
    "layers.*.feed_forward.w1": "colwise",
    "layers.*.feed_forward.w3": "colwise",
    "layers.*.feed_forward.w2": "rowwise",
}
# Single-device (tp == 1) names of the fused layouts; never split, see shard_plan.
FUSED_ATTENTION_RULES = {"layers.*.attention.wqkv": "colwise", "layers.*.attention.wo": "rowwise"}
FUSED_MLP_RULES = {"layers.*.feed_forward.w13": "colwise", "layers.*.feed_forward.w2": "rowwise"}

SEQUENCE_PARALLEL_RULES = {
    "layers.*.attention_norm": "sequence_norm",
    "layers.*.ffn_norm": "sequence_norm",
    "norm": "sequence_norm",
}
KV_PROJECTIONS = ("layers.*.attention.wk", "layers.*.attention.wv")

NOTES = (
    "Column-parallel q/k/v and w1/w3 shard heads and FFN channels; wo and w2 reduce. The embedding is "
    "vocabulary-parallel and the output keeps logits vocabulary-sharded for loss-parallel cross-entropy; "
    "a tied matrix is split on its vocabulary rows by both, so the tie survives. Fused wqkv/w13 store "
    "[q; k; v] and [gate; up] end to end, which a plain column split would cut across q/k/v, so fused "
    "layouts are refused for tp > 1 (use the unfused layout; the HF adapter converts either)."
)


def shard_plan(cfg: LlamaConfig, parallel: ParallelDims) -> ShardPlan:
    """The plan for ``cfg`` under ``parallel``; raises ValueError for layouts TP cannot split."""
    tp = parallel.tp
    if tp > 1:
        fused = [name for name, on in (("fuse_qkv", cfg.fuse_qkv), ("fuse_gate_up", cfg.fuse_gate_up)) if on]
        if fused:
            raise ValueError(
                f"llama: {' and '.join(fused)} cannot be tensor-parallel (tp={tp}): a column split of the fused "
                "weight would mix q/k/v (gate/up) rows; set them to false"
            )
        if cfg.num_attention_heads % tp:
            raise ValueError(
                f"llama: num_attention_heads {cfg.num_attention_heads} is not divisible by tp={tp}"
            )
        # KV heads either split evenly or are replicated (by the engine) until they do.
        kv = cfg.num_kv_heads * parallel.kv_replicator
        if kv % tp and tp % kv:
            raise ValueError(
                f"llama: num_kv_heads {cfg.num_kv_heads} x kv_replicator {parallel.kv_replicator} = {kv} KV heads "
                f"can neither be split over nor replicated to tp={tp}"
            )
    rules = {
        "tok_embeddings": "embedding",
        **(FUSED_ATTENTION_RULES if cfg.fuse_qkv else ATTENTION_RULES),
        **(FUSED_MLP_RULES if cfg.fuse_gate_up else MLP_RULES),
        "output": "lm_head",
    }
    return ShardPlan(
        rules=rules,
        sequence_parallel=dict(SEQUENCE_PARALLEL_RULES),
        kv_projections=() if cfg.fuse_qkv else KV_PROJECTIONS,
        notes=NOTES,
    )
