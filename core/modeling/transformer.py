"""The decoder/encoder skeleton: embeddings, a ``layers`` ModuleDict of blocks, final norm, LM head.

The layout is the pipeline contract (docs/plugins.md, "model contract"): modules holding parameters
that are registered before ``layers`` (embeddings) belong to the first pipeline stage, those after
it (final norm, output) to the last, parameterless ones (RoPE tables) to every stage. Pipeline
parallelism deletes entries of ``layers`` and sets end modules to None; ``forward`` then passes
hidden states through, so one class serves every stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nxdt.modeling.attention import Attention, attention_mask
from nxdt.modeling.config import TransformerConfig
from nxdt.modeling.kv_cache import KVCache, LayerKV
from nxdt.modeling.mlp import MLP
from nxdt.modeling.moe import GroupedExperts, MoE
from nxdt.modeling.norms import RMSNorm, build_norm
from nxdt.modeling.rope import RotaryEmbedding


class TransformerBlock(nn.Module):
    """Attention then MLP, each around a residual; pre-norm (decoders) or post-norm (BERT-style)."""

    def __init__(self, cfg: TransformerConfig, post_norm: bool = False, layer_id: int = 0) -> None:
        super().__init__()
        assert cfg.head_dim is not None and cfg.num_kv_heads is not None and cfg.qkv_bias is not None
        self.post_norm = post_norm
        self.dropout = cfg.hidden_dropout
        self.attention_norm = build_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        self.attention = Attention(
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            qkv_bias=cfg.qkv_bias,
            out_bias=cfg.attention_bias,
            fused_qkv=cfg.fuse_qkv,
            causal=cfg.causal,
            dropout=cfg.attention_dropout,
        )
        self.ffn_norm = build_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        self.feed_forward: nn.Module
        if cfg.moe is not None and cfg.moe.is_moe_layer(layer_id):
            self.feed_forward = MoE(
                cfg.hidden_size,
                cfg.ffn_hidden_size,
                cfg.activation,
                cfg.moe,
                layer_id=layer_id,
                num_moe_layers=len(cfg.moe.moe_layers(cfg.num_layers)),
            )
        else:
            self.feed_forward = MLP(
                cfg.hidden_size,
                cfg.ffn_hidden_size,
                cfg.activation,
                bias=cfg.mlp_bias,
                fused_gate_up=cfg.fuse_gate_up,
                dropout=cfg.ffn_dropout,
            )

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout) if self.dropout and self.training else x

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: LayerKV | None = None,
    ) -> torch.Tensor:
        """Run the block on ``x`` ``[batch, seq, hidden]`` (``kv_cache``: incremental decoding)."""
        # The cache goes by keyword and only when decoding, so a plugin's attention written before
        # incremental decoding existed (forward(x, cos, sin, attn_mask)) keeps training.
        extra = {"kv_cache": kv_cache} if kv_cache is not None else {}
        if self.post_norm:
            h = self.attention_norm(x + self._drop(self.attention(x, cos, sin, attn_mask, **extra)))
            return self.ffn_norm(h + self._drop(self.feed_forward(h)))
        h = x + self._drop(self.attention(self.attention_norm(x), cos, sin, attn_mask, **extra))
        return h + self._drop(self.feed_forward(self.ffn_norm(h)))


class Transformer(nn.Module):
    """A causal LM (or, with ``causal=False``, an encoder trunk) built from a ``TransformerConfig``.

    Inputs are HF's keywords: ``input_ids`` ``[batch, seq]`` (hidden states on a later pipeline
    stage), ``position_ids`` (honoured: RoPE or learned positions use them, and where they restart
    at 0 the row holds packed documents that do not attend to each other) and ``attention_mask``
    (1 for real tokens). Returns logits ``[batch, seq, vocab]``.
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_embeddings: nn.Embedding | None = None
        self.rope: RotaryEmbedding | None = None
        if cfg.position_embedding == "learned_absolute":
            self.pos_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        else:
            self.rope = RotaryEmbedding(cfg.rotary_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, cfg.post_norm, i) for i in range(cfg.num_layers)})
        # Post-norm blocks end normalised; pre-norm stacks need a final norm.
        self.norm: nn.Module | None = None if cfg.post_norm else build_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        self.output: nn.Linear | None = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        tie_weights(self)

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        """Token (and learned position) embeddings of the first stage; identity on later stages."""
        if self.tok_embeddings is None:
            return input_ids  # hidden states from the previous pipeline stage
        h = self.tok_embeddings(input_ids)
        if self.pos_embeddings is not None:
            if position_ids is None:
                # [1, seq]: the output's dim 1 is the sequence, which sequence parallelism splits
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            h = h + self.pos_embeddings(position_ids)
        if self.cfg.hidden_dropout and self.training:
            h = F.dropout(h, self.cfg.hidden_dropout)
        return h

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits for ``input_ids`` (hidden states where this pipeline stage has no output layer).

        With ``kv_cache`` the inputs are the next tokens of the cached rows (left-padded, padding
        marked 0 in ``attention_mask``); positions continue from the cache unless given.
        """
        if kv_cache is not None:
            return self._forward_cached(input_ids, position_ids, attention_mask, kv_cache)
        # The whole sequence's length: under sequence parallelism h holds only this rank's slice.
        if position_ids is not None:
            seq_len = position_ids.shape[-1]
        elif attention_mask is not None:
            seq_len = attention_mask.shape[-1]
        else:
            seq_len = input_ids.shape[1]
        h = self.embed(input_ids, position_ids)
        cos = sin = None
        if self.rope is not None:
            cos, sin = self.rope(position_ids)
        mask = attention_mask_for(self.cfg, seq_len, h.device, position_ids, attention_mask)
        for layer in self.layers.values():
            h = layer(h, cos, sin, mask)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h

    def _forward_cached(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        """One incremental-decoding forward: positions and mask from the cache, each block's keys cached."""
        seq_len = input_ids.shape[1]
        position_ids, mask = kv_cache.prepare(seq_len, attention_mask, position_ids, self.cfg.sliding_window)
        h = self.embed(input_ids, position_ids)
        cos = sin = None
        if self.rope is not None:
            cos, sin = self.rope(position_ids)
        for name, layer in self.layers.items():
            h = layer(h, cos, sin, mask, kv_cache.layer(name))
        kv_cache.advance(seq_len)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h


def attention_mask_for(
    cfg: TransformerConfig,
    seq_len: int,
    device: torch.device,
    position_ids: torch.Tensor | None,
    padding_mask: torch.Tensor | None,
) -> torch.Tensor | None:
    """The mask ``cfg``'s attention needs for these inputs (None: the fused causal/full kernel)."""
    if padding_mask is not None and bool(padding_mask.all()):
        padding_mask = None  # no padding: keep the fast path
    return attention_mask(
        seq_len,
        device,
        causal=cfg.causal,
        position_ids=position_ids,
        padding_mask=padding_mask,
        sliding_window=cfg.sliding_window,
    )


def tie_weights(model: nn.Module) -> None:
    """Make ``output.weight`` the very Parameter ``tok_embeddings.weight`` when the config ties them."""
    output, embeddings = getattr(model, "output", None), getattr(model, "tok_embeddings", None)
    if model.cfg.tie_word_embeddings and output is not None and embeddings is not None:  # type: ignore[union-attr]
        output.weight = embeddings.weight


def build_transformer(cfg: TransformerConfig) -> Transformer:
    """Build on the current default device (meta included); values come from :func:`init_transformer`."""
    return Transformer(cfg)


@torch.no_grad()
def init_transformer(model: nn.Module, cfg: TransformerConfig) -> None:
    """Fill every parameter and buffer: N(0, init_std), residual outputs depth-scaled, norms at one.

    Works after ``model.to_empty(device=...)``, which breaks the tie between embeddings and output,
    so the tie is restored first and the shared matrix is initialised once, as the embedding.
    """
    tie_weights(model)
    embeddings = getattr(model, "tok_embeddings", None)
    shared = embeddings.weight if cfg.tie_word_embeddings and embeddings is not None else None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            if module.weight is shared:
                continue
            residual = getattr(module, "nxdt_residual_output", False)
            nn.init.normal_(module.weight, mean=0.0, std=cfg.out_init_std if residual else cfg.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std)
        elif isinstance(module, (RMSNorm, nn.LayerNorm, RotaryEmbedding)):
            module.reset_parameters()
        elif isinstance(module, GroupedExperts):
            module.init_weights(cfg.init_std, cfg.out_init_std)


def init_parameter(module: nn.Module, name: str, shape: tuple[int, ...], cfg: TransformerConfig,
                   generator: torch.Generator) -> torch.Tensor:
    """The single-device initial value of one parameter, by the same rules as :func:`init_transformer`.

    Drawn from ``generator`` (seeded per parameter by the engine), so a sharded build gives the
    same global weights under any layout.
    """
    if isinstance(module, (RMSNorm, nn.LayerNorm)):
        return torch.ones(shape) if name == "weight" else torch.zeros(shape)
    if name == "bias":
        return torch.zeros(shape)
    if isinstance(module, nn.Linear):
        std = cfg.out_init_std if getattr(module, "nxdt_residual_output", False) else cfg.init_std
    elif isinstance(module, nn.Embedding):
        std = cfg.init_std
    elif isinstance(module, GroupedExperts):
        std = cfg.out_init_std if name == "w2" else cfg.init_std
    else:
        raise ValueError(f"no init rule for {type(module).__name__}.{name}")
    return torch.empty(shape).normal_(0.0, std, generator=generator)


def pipeline_blocks(cfg: TransformerConfig) -> list[str]:
    """FQNs of the blocks in order: the points a pipeline split may cut between."""
    return [f"layers.{i}" for i in range(cfg.num_layers)]
