"""BERT's tensor/sequence-parallel plan, as plain data."""

from __future__ import annotations

from nxdt.modeling.sharding import check_tp
from nxdt.specs import ParallelDims, ShardPlan
from nxdt_bert.model import BertConfig

NOTES = (
    "Attention and MLP as in the kit: column-parallel q/k/v and the MLP input, row-parallel outputs. The word "
    "embedding is vocabulary-parallel and the masked-LM decoder, tied to it, keeps logits vocabulary-sharded "
    "for loss-parallel cross-entropy (both split the shared matrix on its vocabulary rows). Position and token-type "
    "embeddings, the LayerNorms, the head transform and the pooler are small and stay whole; under sequence "
    "parallelism the embeddings' outputs are split along the sequence and the rest run on the sequence shards "
    "(the pooler gathers the [CLS] row it reads)."
)


def shard_plan(cfg: BertConfig, parallel: ParallelDims) -> ShardPlan:
    """The plan for ``cfg`` under ``parallel``; raises ValueError for layouts TP cannot split."""
    check_tp(cfg, parallel, "bert")
    attention = ("wqkv",) if cfg.fuse_qkv else ("wq", "wk", "wv")
    rules = {
        "tok_embeddings": "embedding",
        "pos_embeddings": "sequence_output",
        "type_embeddings": "sequence_output",
        **{f"layers.*.attention.{w}": "colwise" for w in attention},
        "layers.*.attention.wo": "rowwise",
        "layers.*.feed_forward.w1": "colwise",
        "layers.*.feed_forward.w2": "rowwise",
        "output": "lm_head",
    }
    sequence = {
        "embedding_norm": "sequence_norm",
        "layers.*.attention_norm": "sequence_norm",
        "layers.*.ffn_norm": "sequence_norm",
        "head_transform.dense": "sequence_norm",
        "head_transform.norm": "sequence_norm",
    }
    if cfg.next_sentence:
        sequence["pooler"] = "sequence_norm"
    return ShardPlan(rules=rules, sequence_parallel=sequence, notes=NOTES)
