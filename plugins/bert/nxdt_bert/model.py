"""The BERT encoder with its pre-training heads, from kit parts (post-LN blocks, bidirectional attention).

Module order is the pipeline placement (nxdt.parallel.pipeline): the embeddings (word, learned
position, token type, their LayerNorm) are registered before ``layers`` and so sit on the first
stage; the masked-LM head (transform + LayerNorm + decoder ``output``, tied to the word embeddings,
with its own bias) and the next-sentence head (pooler + classifier) after it, on the last stage.
``forward`` passes hidden states through wherever a stage has those modules set to None.

Head sets are Hugging Face's: ``next_sentence=True`` is ``BertForPreTraining`` (masked LM + pooler
+ NSP classifier), ``False`` is ``BertForMaskedLM``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nxdt.modeling import TransformerBlock, TransformerConfig, init_transformer, tie_weights
from nxdt.modeling.transformer import attention_mask_for

#: the activations of BERT's MLP and head transform (HF ``hidden_act``: gelu, gelu_new, relu, silu)
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass
class BertConfig(TransformerConfig):
    """A BERT encoder; the defaults are HF ``BertConfig``'s (bert-base-uncased)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_attention_heads: int = 12
    ffn_hidden_size: int = 3072
    max_position_embeddings: int = 512
    norm_eps: float = 1e-12
    tie_word_embeddings: bool = True
    attention_bias: bool = True
    mlp_bias: bool = True
    norm: str = "layernorm"
    activation: str = "gelu"
    position_embedding: str = "learned_absolute"
    causal: bool = False
    scaled_init: bool = False  # HF BERT draws every matrix from N(0, initializer_range)
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    type_vocab_size: int = 2
    #: the next-sentence head (pooler + classifier): BertForPreTraining's head set; False: BertForMaskedLM's
    next_sentence: bool = True
    pad_token_id: int = 0  # only written to config.json (HF initialises that embedding row to zero)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.causal or self.position_embedding != "learned_absolute" or self.norm != "layernorm":
            raise ValueError("BERT is a bidirectional post-LN encoder with learned positions and LayerNorm")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"BERT's activation must be one of {', '.join(ACTIVATIONS)}, not {self.activation!r}")
        if self.num_kv_heads != self.num_attention_heads:
            raise ValueError("BERT has one key/value head per query head (num_kv_heads = num_attention_heads)")
        if self.type_vocab_size < 1:
            raise ValueError(f"type_vocab_size must be at least 1, got {self.type_vocab_size}")


class PreTrainingOutput(NamedTuple):
    """The outputs of a model with both heads: masked-LM logits ``[batch, seq, vocab]`` and NSP logits ``[batch, 2]``."""

    logits: torch.Tensor
    next_sentence_logits: torch.Tensor


class HeadTransform(nn.Module):
    """The masked-LM head's transform: dense, activation, LayerNorm (HF ``cls.predictions.transform``)."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.activation]
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Transform ``h`` ``[batch, seq, hidden]`` before the decoder."""
        return self.norm(self.act(self.dense(h)))


class Pooler(nn.Linear):
    """tanh(dense(h of the first token)): the [CLS] summary the next-sentence classifier reads (HF ``bert.pooler``).

    One module both selects the first token and projects it, so that under sequence parallelism the
    engine can hand it the whole sequence (the row it reads lives on one rank's sequence shard).
    """

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__(cfg.hidden_size, cfg.hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Pool ``h`` ``[batch, seq, hidden]`` into ``[batch, hidden]``."""
        return torch.tanh(F.linear(h[:, 0], self.weight, self.bias))


class BertModel(nn.Module):
    """BERT: embeddings, post-LN encoder blocks, the masked-LM head and (optionally) the next-sentence head.

    Keyword inputs are HF's: ``input_ids`` ``[batch, seq]`` (hidden states on a later pipeline
    stage), ``attention_mask`` (1 for real tokens, 0 for padding), ``token_type_ids`` (segment A/B)
    and ``position_ids``. Returns the masked-LM logits, or :class:`PreTrainingOutput` with the NSP
    head; a stage without the heads returns its hidden states.
    """

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        # first pipeline stage
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(cfg.vocab_size, h)
        self.pos_embeddings: nn.Embedding | None = nn.Embedding(cfg.max_position_embeddings, h)
        self.type_embeddings: nn.Embedding | None = nn.Embedding(cfg.type_vocab_size, h)
        self.embedding_norm: nn.LayerNorm | None = nn.LayerNorm(h, eps=cfg.norm_eps)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, post_norm=True) for i in range(cfg.num_layers)})
        # last pipeline stage
        self.head_transform: HeadTransform | None = HeadTransform(cfg)
        self.output: nn.Linear | None = nn.Linear(h, cfg.vocab_size, bias=True)
        self.pooler: Pooler | None = Pooler(cfg) if cfg.next_sentence else None
        self.nsp: nn.Linear | None = nn.Linear(h, 2) if cfg.next_sentence else None
        tie_weights(self)

    def embed(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, position_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """word + position + token-type embeddings, LayerNorm, dropout (the first stage); identity later."""
        if self.tok_embeddings is None:
            return input_ids  # hidden states from the previous pipeline stage
        assert self.pos_embeddings is not None and self.type_embeddings is not None and self.embedding_norm is not None
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
        if position_ids.dim() == 1:
            # [1, seq]: the sequence is dimension 1 of the embedding, the one sequence parallelism splits
            position_ids = position_ids.unsqueeze(0)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        h = self.tok_embeddings(input_ids) + self.type_embeddings(token_type_ids) + self.pos_embeddings(position_ids)
        h = self.embedding_norm(h)
        if self.cfg.hidden_dropout and self.training:
            h = F.dropout(h, self.cfg.hidden_dropout)
        return h

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | PreTrainingOutput:
        """Masked-LM logits (and NSP logits) for ``input_ids``; hidden states where this stage has no heads."""
        # The whole sequence's length: under sequence parallelism h holds only this rank's slice.
        if position_ids is not None:
            seq_len = position_ids.shape[-1]
        elif attention_mask is not None:
            seq_len = attention_mask.shape[-1]
        else:
            seq_len = input_ids.shape[1]
        h = self.embed(input_ids, token_type_ids, position_ids)
        mask = attention_mask_for(self.cfg, seq_len, h.device, position_ids, attention_mask)
        for layer in self.layers.values():
            h = layer(h, None, None, mask)
        if self.output is None or self.head_transform is None:
            return h
        logits = self.output(self.head_transform(h))
        if self.pooler is None or self.nsp is None:
            return logits
        return PreTrainingOutput(logits, self.nsp(self.pooler(h)))


def build_bert(cfg: BertConfig) -> BertModel:
    """Build on the current default device (meta included); values come from :func:`init_bert`."""
    return BertModel(cfg)


@torch.no_grad()
def init_bert(model: nn.Module, cfg: BertConfig) -> None:
    """HF BERT's init: every matrix and embedding N(0, init_std), biases zero, LayerNorms at one.

    The kit's init skips the tied decoder (its weight is the word embedding's), so its own bias is zeroed here.
    """
    init_transformer(model, cfg)
    output = getattr(model, "output", None)
    if output is not None and output.bias is not None:
        nn.init.zeros_(output.bias)


def num_parameters(cfg: BertConfig, include_input_embedding: bool = True) -> int:
    """Exact parameter count of ``cfg``'s head set (a tied decoder counts once), optionally without the embedding tables."""
    h, ffn, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    norm = 2 * h
    block = 4 * (h * h + h) + (h * ffn + ffn) + (ffn * h + h) + 2 * norm
    total = cfg.num_layers * block + norm  # blocks and the embedding LayerNorm
    total += (h * h + h) + norm + v  # masked-LM transform, its LayerNorm and the decoder bias
    if cfg.next_sentence:
        total += (h * h + h) + (2 * h + 2)  # pooler and NSP classifier
    if not cfg.tie_word_embeddings:
        total += v * h  # a decoder matrix of its own
    if include_input_embedding:
        total += (v + cfg.max_position_embeddings + cfg.type_vocab_size) * h
    return total


def flops_per_token(cfg: BertConfig, seq_len: int) -> float:
    """Training FLOPs per token: ``6 * N + 12 * layers * hidden * seq_len``.

    N counts the parameters every token multiplies with: the blocks, the masked-LM transform and the
    decoder (counted even when tied, as it is a matmul of its own), but not the embedding tables; the
    pooler and NSP classifier run once per sequence, so they count ``1 / seq_len`` per token.
    """
    h = cfg.hidden_size
    per_token = num_parameters(cfg, include_input_embedding=False)
    per_sequence = (h * h + h) + (2 * h + 2) if cfg.next_sentence else 0
    per_token -= per_sequence
    if cfg.tie_word_embeddings:
        per_token += cfg.vocab_size * h
    attention = 12 * cfg.num_layers * cfg.q_dim * seq_len
    return float(6 * per_token + 6 * per_sequence / seq_len + attention)


def pipeline_blocks(cfg: BertConfig) -> list[str]:
    """FQNs of the encoder blocks in order: the points a pipeline split may cut between."""
    return [f"layers.{i}" for i in range(cfg.num_layers)]
