"""The tensor/sequence-parallel plan of a kit transformer, as plain data the engine maps onto DTensor."""

from __future__ import annotations

from nxdt.modeling.config import TransformerConfig
from nxdt.specs import ParallelDims, ShardPlan

NOTES = (
    "Column-parallel q/k/v and the MLP's input projections shard heads and FFN channels; wo and w2 reduce. "
    "The embedding is vocabulary-parallel and the output keeps logits vocabulary-sharded for loss-parallel "
    "cross-entropy; a tied matrix is split on its vocabulary rows by both, so the tie survives. Fused wqkv/w13 "
    "store [q; k; v] and [gate; up] end to end, which a plain column split would cut across, so fused layouts "
    "are refused for tp > 1 (the HF adapter converts either layout)."
)


def check_tp(cfg: TransformerConfig, parallel: ParallelDims, family: str) -> None:
    """Refuse (ValueError) layouts tensor parallelism cannot split."""
    tp = parallel.tp
    if tp == 1:
        return
    fused = [name for name, on in (("fuse_qkv", cfg.fuse_qkv), ("fuse_gate_up", cfg.fuse_gate_up)) if on]
    if fused:
        raise ValueError(
            f"{family}: {' and '.join(fused)} cannot be tensor-parallel (tp={tp}): a column split of the fused "
            "weight would mix q/k/v (gate/up) rows; set them to false"
        )
    if cfg.num_attention_heads % tp:
        raise ValueError(f"{family}: num_attention_heads {cfg.num_attention_heads} is not divisible by tp={tp}")
    if cfg.ffn_hidden_size % tp:
        raise ValueError(f"{family}: ffn_hidden_size {cfg.ffn_hidden_size} is not divisible by tp={tp}")
    assert cfg.num_kv_heads is not None
    # KV heads either split evenly or are replicated (by the engine) until they do.
    kv = cfg.num_kv_heads * parallel.kv_replicator
    if kv % tp and tp % kv:
        raise ValueError(
            f"{family}: num_kv_heads {cfg.num_kv_heads} x kv_replicator {parallel.kv_replicator} = {kv} KV heads "
            f"can neither be split over nor replicated to tp={tp}"
        )


def transformer_plan(cfg: TransformerConfig, parallel: ParallelDims, family: str = "transformer") -> ShardPlan:
    """The plan for ``cfg`` under ``parallel``; raises ValueError for layouts TP cannot split."""
    check_tp(cfg, parallel, family)
    rules: dict[str, str] = {"tok_embeddings": "embedding"}
    if cfg.position_embedding == "learned_absolute":
        rules["pos_embeddings"] = "sequence_output"
    if cfg.fuse_qkv:
        rules["layers.*.attention.wqkv"] = "colwise"
    else:
        rules.update({f"layers.*.attention.{w}": "colwise" for w in ("wq", "wk", "wv")})
    rules["layers.*.attention.wo"] = "rowwise"
    if cfg.fuse_gate_up:
        rules["layers.*.feed_forward.w13"] = "colwise"
    else:
        rules.update({f"layers.*.feed_forward.{w}": "colwise" for w in (("w1", "w3") if cfg.gated else ("w1",))})
    rules["layers.*.feed_forward.w2"] = "rowwise"
    rules["output"] = "lm_head"
    sequence = {"layers.*.attention_norm": "sequence_norm", "layers.*.ffn_norm": "sequence_norm"}
    if not cfg.post_norm:
        sequence["norm"] = "sequence_norm"
    kv = () if cfg.fuse_qkv else ("layers.*.attention.wk", "layers.*.attention.wv")
    return ShardPlan(rules=rules, sequence_parallel=sequence, kv_projections=kv, notes=NOTES)
