"""BERT in Hugging Face's forms: config.json both ways and the state-dict key table (BertForPreTraining /
BertForMaskedLM names), through the kit's table-driven adapter."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from nxdt.modeling import HFKeyTable, TableAdapter
from nxdt_bert.model import BertConfig

#: HF config.json key -> BertConfig field
CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_attention_heads",
    "intermediate_size": "ffn_hidden_size",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "norm_eps",
    "initializer_range": "init_std",
    "hidden_dropout_prob": "hidden_dropout",
    "attention_probs_dropout_prob": "attention_dropout",
    "tie_word_embeddings": "tie_word_embeddings",
    "pad_token_id": "pad_token_id",
}
#: HF ``hidden_act`` -> the model's activation (``gelu_new`` and ``gelu_pytorch_tanh`` are the tanh GELU)
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                  "silu": "silu", "swish": "silu"}
EXPORT_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}
PRETRAINING, MASKED_LM = "BertForPreTraining", "BertForMaskedLM"


def config_from_hf(hf: Mapping[str, Any]) -> BertConfig:
    """A BertConfig from an HF ``bert`` config.json; the head set follows ``architectures``."""
    if hf.get("model_type", "bert") != "bert":
        raise ValueError(f"cannot read HF model_type {hf.get('model_type')!r} as bert")
    act = hf.get("hidden_act", "gelu")
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"bert: hidden_act {act!r} is not supported (only {', '.join(HF_ACTIVATIONS)})")
    if hf.get("is_decoder"):
        raise ValueError("bert: is_decoder=true (a causal BERT) is not supported; nxdt's BERT is an encoder")
    position = hf.get("position_embedding_type", "absolute")
    if position != "absolute":
        raise ValueError(f"bert: position_embedding_type {position!r} is not supported (only 'absolute')")
    kwargs = {ours: hf[theirs] for theirs, ours in CONFIG_KEYS.items() if hf.get(theirs) is not None}
    architectures = hf.get("architectures") or [PRETRAINING]
    # A checkpoint's head set is what it was saved as; BertModel and the task heads mean no NSP head here.
    kwargs["next_sentence"] = PRETRAINING in architectures
    return BertConfig(activation=HF_ACTIVATIONS[act], **kwargs)


def config_to_hf(cfg: BertConfig) -> dict[str, Any]:
    """An HF config.json dict: BertForPreTraining with the NSP head, BertForMaskedLM without."""
    out: dict[str, Any] = {
        "architectures": [PRETRAINING if cfg.next_sentence else MASKED_LM],
        "model_type": "bert",
        "hidden_act": EXPORT_ACTIVATIONS[cfg.activation],
        "position_embedding_type": "absolute",
        "is_decoder": False,
    }
    out.update({theirs: getattr(cfg, ours) for theirs, ours in CONFIG_KEYS.items()})
    return out


def key_table(cfg: BertConfig) -> HFKeyTable:
    """nxdt module names -> BertForPreTraining's (BertForMaskedLM's lack the pooler and NSP classifier)."""
    top = {
        "tok_embeddings.weight": "bert.embeddings.word_embeddings.weight",
        "pos_embeddings.weight": "bert.embeddings.position_embeddings.weight",
        "type_embeddings.weight": "bert.embeddings.token_type_embeddings.weight",
        "embedding_norm.weight": "bert.embeddings.LayerNorm.weight",
        "embedding_norm.bias": "bert.embeddings.LayerNorm.bias",
        "head_transform.dense.weight": "cls.predictions.transform.dense.weight",
        "head_transform.dense.bias": "cls.predictions.transform.dense.bias",
        "head_transform.norm.weight": "cls.predictions.transform.LayerNorm.weight",
        "head_transform.norm.bias": "cls.predictions.transform.LayerNorm.bias",
        "output.weight": "cls.predictions.decoder.weight",
        # the decoder's bias: with tied embeddings transformers ties it to cls.predictions.bias and saves it so
        "output.bias": "cls.predictions.bias",
    }
    if cfg.next_sentence:
        top.update({
            "pooler.weight": "bert.pooler.dense.weight",
            "pooler.bias": "bert.pooler.dense.bias",
            "nsp.weight": "cls.seq_relationship.weight",
            "nsp.bias": "cls.seq_relationship.bias",
        })
    ignored = [
        r"bert\.embeddings\.(position_ids|token_type_ids)",  # buffers older transformers saved
    ]
    if not cfg.next_sentence:
        # BertForMaskedLM ignores the pooler and NSP classifier a pre-training checkpoint holds (bert-base-uncased)
        ignored += [r"bert\.pooler\..*", r"cls\.seq_relationship\..*"]
    return HFKeyTable(
        top_level=top,
        block={
            "attention.wq": "attention.self.query",
            "attention.wk": "attention.self.key",
            "attention.wv": "attention.self.value",
            "attention.wo": "attention.output.dense",
            "attention_norm": "attention.output.LayerNorm",
            "feed_forward.w1": "intermediate.dense",
            "feed_forward.w2": "output.dense",
            "ffn_norm": "output.LayerNorm",
        },
        hf_blocks="bert.encoder.layer",
        ignored=tuple(ignored),
    )


class BertAdapter(TableAdapter):
    """The kit's table adapter plus BERT's decoder-bias aliases and the original checkpoints' LayerNorm names.

    transformers 5 ties ``cls.predictions.decoder.bias`` to ``cls.predictions.bias`` only with tied
    embeddings; untied, the decoder's own bias is the one its forward adds (4.x always tied them).
    """

    def to_hf(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """nxdt -> HF names; an untied decoder's bias is written under both names."""
        out = super().to_hf(state_dict)
        if not self.tied and "cls.predictions.bias" in out:
            out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]
        return out

    def from_hf(self, hf_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF -> nxdt names (``LayerNorm.gamma``/``beta`` read as ``weight``/``bias``; the decoder's own bias first)."""
        renamed = {_modern(k): v for k, v in hf_state_dict.items()}
        decoder_bias = renamed.pop("cls.predictions.decoder.bias", None)
        if decoder_bias is not None:
            renamed["cls.predictions.bias"] = decoder_bias
        return super().from_hf(renamed)


def _modern(key: str) -> str:
    if ".LayerNorm." in key:
        return key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    return key


def state_dict_adapter(cfg: BertConfig) -> BertAdapter:
    """The HF state-dict adapter for ``cfg``'s head set."""
    return BertAdapter(key_table(cfg), cfg, family="bert")
