"""The conformance kit catches the mistakes that used to pass it and fail in real runs.

Each broken family below is a plausible plugin bug on top of the kit: head counts taken from the
config (breaks TP), blocks outside one top-level ModuleDict (breaks PP), and position_ids that
reach RoPE but not the attention mask (packed SFT documents leak into each other). The correct
kit family passes the same checks.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from nxdt.modeling import Attention, HFConfigTable, Transformer, TransformerConfig, transformer_family
from nxdt.testing import check_packed_documents, check_pipeline_split, check_tensor_parallel

CFG = TransformerConfig(vocab_size=96, hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                        ffn_hidden_size=128, max_position_embeddings=64)
HF = HFConfigTable(model_type="llama", architecture="LlamaForCausalLM")
GOOD = transformer_family("kit-good", HF)


class ConfigSizedAttention(Attention):
    """Views q/k/v with the config's head counts: right on one device, wrong on a TP shard."""

    heads = 4

    def forward(self, x, cos=None, sin=None, attn_mask=None):
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.heads, self.head_dim)
        k = self.wk(x).view(b, s, self.heads // 2, self.head_dim)
        v = self.wv(x).view(b, s, self.heads // 2, self.head_dim)
        from nxdt.modeling import apply_rotary

        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.core_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


def _config_sized(cfg):
    model = Transformer(cfg)
    for block in model.layers.values():
        block.attention.__class__ = ConfigSizedAttention
    return model


class ListOfBlocks(Transformer):
    """Keeps its blocks in a ModuleList under another name: stages cannot keep layer names."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.blocks = nn.ModuleList(self.layers.values())
        del self.layers

    def forward(self, input_ids, position_ids=None, attention_mask=None):
        h = self.embed(input_ids, position_ids)
        cos, sin = self.rope(position_ids)
        for block in self.blocks:
            h = block(h, cos, sin)
        return self.output(self.norm(h))


class NoDocumentMask(Transformer):
    """Honours position_ids in RoPE but always attends causally across the whole row."""

    def forward(self, input_ids, position_ids=None, attention_mask=None):
        h = self.embed(input_ids, position_ids)
        cos, sin = self.rope(position_ids)
        for block in self.layers.values():
            h = block(h, cos, sin, None)
        return self.output(self.norm(h))


CONFIG_SIZED = dataclasses.replace(GOOD, family="kit-config-sized", build_model=_config_sized)
LIST_OF_BLOCKS = dataclasses.replace(GOOD, family="kit-list", build_model=ListOfBlocks,
                                     pipeline_blocks=lambda c: [f"blocks.{i}" for i in range(c.num_layers)])
NO_DOCUMENT_MASK = dataclasses.replace(GOOD, family="kit-no-doc-mask", build_model=NoDocumentMask)


def test_the_kit_family_passes_every_layout_check():
    assert check_pipeline_split(GOOD, CFG) <= 1e-5
    assert check_packed_documents(GOOD, CFG) <= 1e-5


@pytest.mark.slow
def test_tensor_parallel_check_on_gloo_ranks():
    """A TP=2 forward (with SP, on two spawned gloo processes) equals one process; config-sized heads fail it."""
    assert check_tensor_parallel(GOOD, CFG) <= 1e-5
    one_kv = dataclasses.replace(CFG, num_kv_heads=1)  # replicated to TP=2
    assert check_tensor_parallel(GOOD, one_kv) <= 1e-5
    good, bad = Transformer(CFG).eval(), _config_sized(CFG).eval()
    bad.load_state_dict(good.state_dict())
    ids = torch.randint(0, CFG.vocab_size, (2, 8))
    with torch.no_grad():  # the mistake is invisible on one device ...
        assert torch.allclose(good(ids), bad(ids))
    with pytest.raises(AssertionError, match="TP=2 forward"):  # ... and caught on two
        check_tensor_parallel(CONFIG_SIZED, CFG)


def test_pipeline_check_catches_blocks_outside_a_module_dict():
    with pytest.raises(AssertionError, match="pipeline stages"):
        check_pipeline_split(LIST_OF_BLOCKS, CFG)


def test_packing_check_catches_positions_without_document_masks():
    with pytest.raises(AssertionError, match="packed documents leak"):
        check_packed_documents(NO_DOCUMENT_MASK, CFG)
