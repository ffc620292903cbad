"""The llama plugin (built on nxdt.modeling): logits parity with transformers, packing, meta builds, plan,
adapter, conformance, Mistral's sliding window."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import tomllib
from pathlib import Path

import pluggy
import pytest
import safetensors.torch
import torch
import transformers

import nxdt.hookspecs
from nxdt.modeling import CoreAttention, attention_mask, num_parameters
from nxdt.specs import ParallelDims, ShardPlan
from nxdt.testing import (
    build_hf_model,
    build_initialized,
    check_builds_on_meta,
    check_hf_parity,
    check_shard_plan_matches,
    run_conformance,
)
from nxdt_llama import plugin
from nxdt_llama.plugin import LLAMA_SPEC, LlamaConfig

config_from_hf, config_from_nxdt, config_to_hf = LLAMA_SPEC.config_from_hf, LLAMA_SPEC.config_from_nxdt, LLAMA_SPEC.config_to_hf

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def tiny(**overrides) -> LlamaConfig:
    """A 2-layer, 64-wide config with GQA (4 query heads, 2 KV heads) unless overridden."""
    base = dict(
        vocab_size=128,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=128,
        max_position_embeddings=128,
        norm_eps=1e-5,
    )
    return LlamaConfig(**{**base, **overrides})


PARITY_CASES = {
    "mha": tiny(num_kv_heads=4),
    "gqa2": tiny(num_kv_heads=2),
    "mqa": tiny(num_kv_heads=1),
    "tied": tiny(tie_word_embeddings=True),
    "llama3_rope": tiny(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING),
    "fused": tiny(fuse_qkv=True, fuse_gate_up=True),
    "fused_mqa_tied": tiny(num_kv_heads=1, fuse_qkv=True, fuse_gate_up=True, tie_word_embeddings=True),
    "biases": tiny(attention_bias=True, mlp_bias=True),
    "head_dim_32": tiny(head_dim=32),  # heads * head_dim != hidden, as in Mistral-Nemo
}


@pytest.mark.parametrize("name", PARITY_CASES)
def test_logits_match_transformers_both_directions(name):
    """HF->nxdt and nxdt->HF weights give the same fp32 logits as LlamaForCausalLM."""
    cfg = PARITY_CASES[name]
    # 64 positions reach past original_max_position_embeddings / low_freq_factor, where llama3 scaling acts.
    diff = check_hf_parity(LLAMA_SPEC, cfg, atol=1e-5, seq_len=64)
    assert diff <= 1e-5


def test_llama3_rope_scaling_changes_logits():
    """The scaled case above is not vacuous: dropping the scaling changes the logits."""
    cfg = PARITY_CASES["llama3_rope"]
    scaled = build_initialized(LLAMA_SPEC, cfg).eval()
    plain = build_initialized(LLAMA_SPEC, dataclasses.replace(cfg, rope_scaling=None)).eval()
    plain.load_state_dict(scaled.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (scaled(ids) - plain(ids)).abs().max() > 1e-3


@pytest.mark.parametrize("window", [None, 8])
def test_mistral_parity(window):
    """A Mistral config.json reads as llama and matches MistralForCausalLM, with a window shorter than the sequence."""
    mistral_dict = transformers.MistralConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=1e6,
        sliding_window=window,
    ).to_dict()
    cfg = config_from_hf(mistral_dict)
    assert (cfg.num_kv_heads, cfg.rope_theta, cfg.ffn_hidden_size, cfg.sliding_window) == (2, 1e6, 128, window)
    exported = config_to_hf(cfg)
    assert exported["model_type"] == ("mistral" if window else "llama")
    spec = LLAMA_SPEC
    if window is None:
        def mistral_config_to_hf(c):
            return {**config_to_hf(c), "model_type": "mistral", "architectures": ["MistralForCausalLM"]}

        spec = dataclasses.replace(LLAMA_SPEC, config_to_hf=mistral_config_to_hf)
    assert type(build_hf_model(spec, cfg)).__name__ == "MistralForCausalLM"
    # 40 tokens: five windows long, so the window masks most of every row.
    assert check_hf_parity(spec, cfg, atol=1e-5, seq_len=40) <= 1e-5


def test_sliding_window_changes_logits_past_the_window():
    """The window is not vacuous: positions beyond it differ from full attention, positions within it do not."""
    windowed = build_initialized(LLAMA_SPEC, tiny(sliding_window=8)).eval()
    full = build_initialized(LLAMA_SPEC, tiny()).eval()
    full.load_state_dict(windowed.state_dict())
    ids = torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = windowed(ids), full(ids)
    assert (a[:, :8] - b[:, :8]).abs().max() <= 1e-5
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-3


def test_packed_documents_do_not_attend_across_boundaries():
    """Two documents packed in one row with restarting position_ids give each document's own logits."""
    cfg = tiny()
    model = build_initialized(LLAMA_SPEC, cfg).eval()
    gen = torch.Generator().manual_seed(1)
    doc_a = torch.randint(0, cfg.vocab_size, (1, 10), generator=gen)
    doc_b = torch.randint(0, cfg.vocab_size, (1, 14), generator=gen)
    packed = torch.cat([doc_a, doc_b], dim=1)
    position_ids = torch.cat([torch.arange(10), torch.arange(14)]).unsqueeze(0)
    with torch.no_grad():
        together = model(packed, position_ids=position_ids)
        separate = torch.cat([model(doc_a), model(doc_b)], dim=1)
        unpacked = model(packed, position_ids=torch.arange(24).unsqueeze(0))
        plain = model(packed)
    assert (together - separate).abs().max() <= 1e-5
    assert (unpacked - plain).abs().max() <= 1e-5
    assert (together[:, 10:] - plain[:, 10:]).abs().max() > 1e-3


def test_document_mask_without_restarts_is_plain_causal():
    """One document needs no mask (the fused causal kernel), and an explicit causal mask agrees with it."""
    q, k, v = torch.randn(3, 2, 4, 12, 16).unbind(0)
    assert attention_mask(12, torch.device("cpu"), position_ids=torch.arange(12).expand(2, 12)) is None
    packed = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, 12)
    mask = attention_mask(12, torch.device("cpu"), position_ids=packed)
    assert mask is not None and mask.shape == (2, 1, 12, 12) and not mask[0, 0, 6, 3]
    causal = torch.ones(12, 12, dtype=torch.bool).tril()[None, None]
    attention = CoreAttention()
    assert (attention(q, k[:, :2], v[:, :2], causal) - attention(q, k[:, :2], v[:, :2])).abs().max() <= 1e-6


# Published parameter counts (untied embeddings).
META_CASES = {
    "llama3-8b": (
        dict(
            num_layers=32,
            hidden_size=4096,
            ffn_hidden_size=14336,
            num_attention_heads=32,
            num_kv_heads=8,
            vocab_size=128256,
        ),
        8_030_261_248,
    ),
    "llama3-70b": (
        dict(
            num_layers=80,
            hidden_size=8192,
            ffn_hidden_size=28672,
            num_attention_heads=64,
            num_kv_heads=8,
            vocab_size=128256,
        ),
        70_553_706_496,
    ),
    "llama2-7b": (
        dict(
            num_layers=32,
            hidden_size=4096,
            ffn_hidden_size=11008,
            num_attention_heads=32,
            num_kv_heads=32,
            vocab_size=32000,
        ),
        6_738_415_616,
    ),
}


@pytest.mark.parametrize("name", META_CASES)
def test_meta_build_has_published_parameter_count(name):
    """Full-size configs build on the meta device with no storage and the published parameter count."""
    arch, expected = META_CASES[name]
    cfg = LlamaConfig(**arch, max_position_embeddings=8192)
    assert check_builds_on_meta(LLAMA_SPEC, cfg) == expected
    assert num_parameters(cfg) == expected


def test_flops_per_token_formula():
    """6 * (params - input embedding) + 12 * layers * hidden * seq for Llama 3 8B at 8k."""
    cfg = LlamaConfig(**META_CASES["llama3-8b"][0])
    non_embedding = 8_030_261_248 - 128256 * 4096
    assert LLAMA_SPEC.flops_per_token(cfg, 8192) == 6 * non_embedding + 12 * 32 * 4096 * 8192


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"num_kv_heads": 1},
        {"tie_word_embeddings": True},
        {"fuse_qkv": True, "fuse_gate_up": True, "tie_word_embeddings": True},
    ],
    ids=["gqa", "mqa", "tied", "fused_tied"],
)
def test_conformance_kit(overrides):
    """The plugin passes the whole conformance kit (meta build, init, plan, names, adapter, HF parity)."""
    results = run_conformance(LLAMA_SPEC, tiny(**overrides), ParallelDims(tp=1, sequence_parallel=True))
    assert results["hf_max_abs_diff"] <= 1e-5


def test_tied_embeddings_share_one_parameter():
    """Tied output is the embedding Parameter, also after to_empty + init_weights; HF export omits lm_head."""
    cfg = tiny(tie_word_embeddings=True, fuse_qkv=True, fuse_gate_up=True)
    model = build_initialized(LLAMA_SPEC, cfg)
    assert model.output.weight is model.tok_embeddings.weight
    hf = LLAMA_SPEC.state_dict_adapter(cfg).to_hf(model.state_dict())
    assert "lm_head.weight" not in hf and "model.embed_tokens.weight" in hf
    safetensors.torch.save(hf)  # no two exported tensors share storage
    untied = build_initialized(LLAMA_SPEC, tiny())
    assert untied.output.weight is not untied.tok_embeddings.weight


def test_adapter_handles_pipeline_stage_subsets():
    """A last stage of a tied model keeps its output weight through to_hf/from_hf; fused layers split per layer."""
    cfg = tiny(tie_word_embeddings=True, fuse_qkv=True, fuse_gate_up=True)
    state = build_initialized(LLAMA_SPEC, cfg).state_dict()
    last_stage = {k: v for k, v in state.items() if k.startswith(("layers.1.", "norm.", "output."))}
    adapter = LLAMA_SPEC.state_dict_adapter(cfg)
    hf = adapter.to_hf(last_stage)
    assert "lm_head.weight" in hf and not any(k.startswith("model.layers.0.") for k in hf)
    back = adapter.from_hf(hf)
    assert back.keys() == last_stage.keys()
    assert all(torch.equal(back[k], last_stage[k]) for k in back)
    for dropped in ("q_proj.weight", "k_proj.weight", "up_proj.weight"):
        with pytest.raises(KeyError, match="missing"):
            adapter.from_hf({k: v for k, v in hf.items() if not k.endswith(dropped)})


def test_init_weights_scales_output_projections():
    """Linear layers get N(0, init_std), wo/w2 the depth-scaled std, norms ones."""
    cfg = tiny(hidden_size=256, ffn_hidden_size=512, num_attention_heads=8, num_kv_heads=8, init_std=0.02)
    block = build_initialized(LLAMA_SPEC, cfg).layers["0"]
    assert abs(block.attention.wq.weight.std().item() - 0.02) < 2e-3
    assert abs(block.feed_forward.w2.weight.std().item() - 0.02 / 2) < 1e-3  # 0.02 / sqrt(2 * 2 layers)
    assert torch.equal(block.attention_norm.weight, torch.ones(256))


def test_attention_derives_heads_from_shapes_for_tensor_parallel():
    """Column-split q/k/v and row-split wo over 2 'ranks' sum to the unsplit attention output (GQA)."""
    cfg = tiny(num_attention_heads=4, num_kv_heads=2)
    attn = build_initialized(LLAMA_SPEC, cfg).layers["0"].attention
    x = torch.randn(2, 16, cfg.hidden_size)
    cos, sin = build_initialized(LLAMA_SPEC, cfg).rope()
    hd = cfg.head_dim
    with torch.no_grad():
        full = attn(x, cos, sin)
        total = torch.zeros_like(full)
        for rank in range(2):
            shard = build_initialized(LLAMA_SPEC, cfg).layers["0"].attention
            q_rows, kv_rows = slice(rank * 2 * hd, (rank + 1) * 2 * hd), slice(rank * hd, (rank + 1) * hd)
            shard.wq.weight = torch.nn.Parameter(attn.wq.weight[q_rows])
            shard.wk.weight = torch.nn.Parameter(attn.wk.weight[kv_rows])
            shard.wv.weight = torch.nn.Parameter(attn.wv.weight[kv_rows])
            shard.wo.weight = torch.nn.Parameter(attn.wo.weight[:, q_rows])
            total += shard(x, cos, sin)
    assert (total - full).abs().max() <= 1e-5


def test_pipeline_stages_pass_hidden_states_through():
    """Deleting blocks and nulling embeddings/norm/output splits the model into stages that compose."""
    cfg = tiny()
    full = build_initialized(LLAMA_SPEC, cfg).eval()
    first, last = build_initialized(LLAMA_SPEC, cfg).eval(), build_initialized(LLAMA_SPEC, cfg).eval()
    first.load_state_dict(full.state_dict())
    last.load_state_dict(full.state_dict())
    assert LLAMA_SPEC.pipeline_blocks(cfg) == ["layers.0", "layers.1"]
    del first.layers["1"]
    first.norm = first.output = None
    del last.layers["0"]
    last.tok_embeddings = None
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.allclose(last(first(ids)), full(ids), atol=1e-6)


def test_shard_plan():
    """Unfused plan as data; fused layouts and indivisible heads are refused for tp > 1."""
    plan = LLAMA_SPEC.shard_plan(tiny(), ParallelDims(tp=2, sequence_parallel=True))
    assert isinstance(plan, ShardPlan)
    assert plan.as_dict() == {
        "tok_embeddings": "embedding",
        "layers.*.attention.wq": "colwise",
        "layers.*.attention.wk": "colwise",
        "layers.*.attention.wv": "colwise",
        "layers.*.attention.wo": "rowwise",
        "layers.*.feed_forward.w1": "colwise",
        "layers.*.feed_forward.w3": "colwise",
        "layers.*.feed_forward.w2": "rowwise",
        "output": "lm_head",
    }
    assert plan.as_dict(sequence_parallel=True)["layers.*.ffn_norm"] == "sequence_norm"
    assert list(plan.kv_projections) == ["layers.*.attention.wk", "layers.*.attention.wv"]
    check_shard_plan_matches(LLAMA_SPEC, tiny(), ParallelDims(tp=2))
    check_shard_plan_matches(LLAMA_SPEC, tiny(fuse_qkv=True, fuse_gate_up=True), ParallelDims(tp=1))
    with pytest.raises(ValueError, match="fuse_qkv"):
        LLAMA_SPEC.shard_plan(tiny(fuse_qkv=True), ParallelDims(tp=2))
    with pytest.raises(ValueError, match="divisible"):
        LLAMA_SPEC.shard_plan(tiny(), ParallelDims(tp=3))
    LLAMA_SPEC.shard_plan(tiny(num_kv_heads=1), ParallelDims(tp=4))  # one KV head, replicated 4 times


def test_config_from_hf_accepts_v4_and_v5_rope_forms():
    """rope_theta + rope_scaling (transformers 4) and rope_parameters (5) read the same; export reloads in HF."""
    v5 = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        rope_parameters={**LLAMA3_SCALING, "rope_theta": 500000.0},
    ).to_dict()
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4.update(rope_theta=500000.0, rope_scaling={**LLAMA3_SCALING, "type": "llama3"})
    assert config_from_hf(v5) == config_from_hf(v4)
    cfg = config_from_hf(v5)
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.num_kv_heads, cfg.norm_eps) == (
        500000.0,
        LLAMA3_SCALING,
        2,
        1e-6,
    )
    exported = config_to_hf(cfg)
    reloaded = transformers.AutoConfig.for_model(exported.pop("model_type"), **exported)
    assert reloaded.rope_parameters == {**LLAMA3_SCALING, "rope_theta": 500000.0}
    assert config_from_hf(reloaded.to_dict()) == cfg
    assert config_from_hf({**v5, "model_type": "mistral", "sliding_window": 16}).sliding_window == 16
    with pytest.raises(ValueError, match="yarn"):
        config_from_hf({**v5, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}})


def test_config_from_nxdt():
    """NxDT model keys map onto LlamaConfig; absent num_kv_heads means MHA; every llama preset translates."""
    cfg = config_from_nxdt(
        {
            "num_layers": 4,
            "hidden_size": 128,
            "num_attention_heads": 4,
            "layernorm_epsilon": 1e-5,
            "share_embeddings_and_output_weights": True,
            "fuse_qkv": True,
            "init_method_std": 0.01,
            "rope_scaling": None,
        }
    )
    assert (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.norm_eps) == (4, 4, 32, 1e-5)
    assert cfg.tie_word_embeddings and cfg.fuse_qkv and not cfg.fuse_gate_up and cfg.init_std == 0.01
    assert cfg.vocab_size == LlamaConfig().vocab_size
    registry = tomllib.loads((Path(__file__).parents[3] / "hub_registry.toml").read_text())
    presets = {name: p for name, p in registry["presets"].items() if p["family"] == "llama"}
    assert presets
    for name, preset in presets.items():
        cfg = config_from_nxdt(preset["architecture"])
        assert cfg.num_layers == preset["architecture"]["num_layers"], name
    assert config_from_nxdt(presets["llama3.1-8b"]["architecture"]).rope_scaling["factor"] == 8.0


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("normalization", "layernorm", "supports only rmsnorm"),
        ("activation", "gelu", "supports only"),
        ("position_embedding_type", "learned_absolute", "supports only rope"),
        ("rotary_percentage", 0.5, "supports only 1.0"),
        ("type_vocab_size", 2, "not supported by the llama family"),
    ],
)
def test_config_from_nxdt_refuses_what_llama_is_not(key, value, message):
    """Architecture keys the family cannot honour are refused, naming the key (never ignored)."""
    with pytest.raises(ValueError, match=message) as info:
        config_from_nxdt({"num_layers": 2, key: value})
    assert f"model.{key}" in str(info.value)
    assert config_from_nxdt({"normalization": "rmsnorm", "activation": "swiglu", "has_bias": True}).mlp_bias


def test_plugin_registers_through_pluggy_and_entry_point():
    """The hook registers exactly the llama spec, and the package exposes it under nxdt.plugins."""
    pm = pluggy.PluginManager("nxdt")
    pm.add_hookspecs(nxdt.hookspecs)
    pm.register(plugin)
    pm.check_pending()
    registered = []
    pm.hook.nxdt_register_models(register=registered.append)
    assert registered == [LLAMA_SPEC]
    assert LLAMA_SPEC.family == "llama" and LLAMA_SPEC.hf_model_types == ("llama", "mistral")
    entry_points = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="nxdt.plugins")}
    assert entry_points.get("llama") == "nxdt_llama.plugin"
