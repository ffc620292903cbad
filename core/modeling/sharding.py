"""The tensor/sequence-parallel plan of a kit transformer, as plain data the engine maps onto DTensor."""

from __future__ import annotations

from nxdt.modeling.config import TransformerConfig
from nxdt.specs import ParallelDims, ShardPlan

NOTES = (
    "Column-parallel q/k/v and the MLP's input projections shard heads and FFN channels; wo and w2 reduce. "
    "The embedding is vocabulary-parallel and the output keeps logits vocabulary-sharded for loss-parallel "
    "cross-entropy; a tied matrix is split on its vocabulary rows by both, so the tie survives. Fused wqkv/w13 "
    "store [q; k; v] and [gate; up] end to end, which a plain column split would cut across, so fused layouts "
    "are refused for tp > 1 (the HF adapter converts either layout). MoE layers are styled 'expert': expert "
    "parallelism splits their experts, tensor parallelism each expert's hidden dimension, the router is replicated."
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


def check_ep(cfg: TransformerConfig, parallel: ParallelDims, family: str) -> None:
    """Refuse (ValueError) expert parallelism the model's experts cannot be split for."""
    if parallel.ep == 1:
        return
    if cfg.moe is None:
        raise ValueError(f"{family}: expert_model_parallel_size={parallel.ep} needs mixture-of-experts layers (model.moe)")
    if cfg.moe.num_experts % parallel.ep:
        raise ValueError(
            f"{family}: moe.num_experts {cfg.moe.num_experts} is not divisible by expert_model_parallel_size={parallel.ep}"
        )


def _feed_forward_rules(cfg: TransformerConfig) -> dict[str, str]:
    """Dense MLPs: column-parallel inputs, row-parallel w2. MoE layers: ``expert`` (EP splits the experts,
    TP their hidden dimension inside an EP rank) with the router replicated."""
    moe_layers = cfg.moe.moe_layers(cfg.num_layers) if cfg.moe is not None else []
    dense_layers = [i for i in range(cfg.num_layers) if i not in moe_layers]

    def blocks(layers: list[int]) -> list[str]:
        if not layers:
            return []
        return ["layers.*"] if len(layers) == cfg.num_layers else [f"layers.{i}" for i in layers]

    rules: dict[str, str] = {}
    for where in blocks(moe_layers):
        rules[f"{where}.feed_forward"] = "expert"
        rules[f"{where}.feed_forward.router"] = "replicate"
    for where in blocks(dense_layers):
        if cfg.fuse_gate_up:
            rules[f"{where}.feed_forward.w13"] = "colwise"
        else:
            rules.update({f"{where}.feed_forward.{w}": "colwise" for w in (("w1", "w3") if cfg.gated else ("w1",))})
        rules[f"{where}.feed_forward.w2"] = "rowwise"
    return rules


def transformer_plan(cfg: TransformerConfig, parallel: ParallelDims, family: str = "transformer") -> ShardPlan:
    """The plan for ``cfg`` under ``parallel``; raises ValueError for layouts TP cannot split."""
    check_tp(cfg, parallel, family)
    check_ep(cfg, parallel, family)
    rules: dict[str, str] = {"tok_embeddings": "embedding"}
    if cfg.position_embedding == "learned_absolute":
        rules["pos_embeddings"] = "sequence_output"
    if cfg.fuse_qkv:
        rules["layers.*.attention.wqkv"] = "colwise"
    else:
        rules.update({f"layers.*.attention.{w}": "colwise" for w in ("wq", "wk", "wv")})
    rules["layers.*.attention.wo"] = "rowwise"
    rules.update(_feed_forward_rules(cfg))
    rules["output"] = "lm_head"
    sequence = {"layers.*.attention_norm": "sequence_norm", "layers.*.ffn_norm": "sequence_norm"}
    if not cfg.post_norm:
        sequence["norm"] = "sequence_norm"
    kv = () if cfg.fuse_qkv else ("layers.*.attention.wk", "layers.*.attention.wv")
    return ShardPlan(rules=rules, sequence_parallel=sequence, kv_projections=kv, notes=NOTES)
