"""The gpt plugin (built on nxdt.modeling): HF parity for GPT-2 and Megatron shapes, the export
forms and refusals, exact parameter counts, the NxDT and HF config keys, the adapter, the tokenizer."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
from pathlib import Path

import pluggy
import pytest
import safetensors.torch
import torch
import transformers

import nxdt.hookspecs
from nxdt.cli.main import main as nxdt_main
from nxdt.errors import NxdtError
from nxdt.specs import ParallelDims
from nxdt.testing import build_initialized, check_builds_on_meta, check_hf_parity, run_conformance
from nxdt_gpt import bpe, plugin
from nxdt_gpt.config import GPTConfig
from nxdt_gpt.hf import hf_form
from nxdt_gpt.plugin import GPT_SPEC, tiny_tokenizer_path

ANCHOR = Path(__file__).resolve().parents[4] / "shared" / "anchors" / "nxdt-configs" / "megatron_gpt_config.yaml"
config_from_nxdt, config_from_hf, config_to_hf = GPT_SPEC.config_from_nxdt, GPT_SPEC.config_from_hf, GPT_SPEC.config_to_hf


def tiny(**overrides) -> GPTConfig:
    """A 2-layer GPT-2 shape with odd sizes: 5 heads of 12 channels, a vocabulary of 131, tied."""
    base = dict(vocab_size=131, hidden_size=60, num_layers=2, num_attention_heads=5, max_position_embeddings=64)
    return GPTConfig(**{**base, **overrides})


def megatron(**keys) -> GPTConfig:
    """A 2-layer Megatron GPT from NxDT model.* keys (4 heads, 2 KV heads unless overridden)."""
    base = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_kv_heads": 2, "ffn_hidden_size": 96,
            "vocab_size": 100, "max_position_embeddings": 64, "layernorm_epsilon": 1e-5}
    return config_from_nxdt({**base, **keys})


ROPE_SWIGLU = {"position_embedding_type": "rope", "activation": "swiglu"}
PARITY_CASES = {
    # GPT-2 (GPT2LMHeadModel)
    "gpt2_odd_heads_and_vocab_tied": (tiny(), "gpt2"),
    "gpt2_3_heads_untied_erf_gelu": (tiny(hidden_size=48, num_attention_heads=3, vocab_size=97,
                                          tie_word_embeddings=False, activation="gelu"), "gpt2"),
    "gpt2_fused_qkv_relu": (tiny(fuse_qkv=True, activation="relu", vocab_size=257), "gpt2"),
    # Megatron GPT with rope and swiglu: RMSNorm is Llama, LayerNorm without output/MLP biases StableLM
    "megatron_rope_swiglu_rmsnorm_biases": (megatron(**ROPE_SWIGLU, normalization="rmsnorm", has_bias=True), "llama"),
    "megatron_rope_swiglu_rmsnorm_tied": (megatron(**ROPE_SWIGLU, normalization="rmsnorm", has_bias=False,
                                                   share_embeddings_and_output_weights=True), "llama"),
    "megatron_rope_swiglu_layernorm_partial_rotary": (megatron(**ROPE_SWIGLU, normalization="layernorm", has_bias=False,
                                                               rotary_percentage=0.5, rope_theta=5000.0), "stablelm"),
}


@pytest.mark.parametrize("name", PARITY_CASES)
def test_logits_match_transformers_both_directions(name):
    """HF->nxdt and nxdt->HF weights give the same fp32 logits as the transformers model of the shape's form."""
    cfg, form = PARITY_CASES[name]
    assert hf_form(cfg) == form
    diff = check_hf_parity(GPT_SPEC, cfg, atol=1e-5, seq_len=48)
    print(f"{name} ({form}): max |logit diff| {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("name", ["gpt2_odd_heads_and_vocab_tied", "megatron_rope_swiglu_rmsnorm_biases",
                                  "megatron_rope_swiglu_layernorm_partial_rotary"])
def test_conformance_kit(name):
    """Meta build, init, plan globs, named modules, adapter and config round trips, pipeline split, packing, HF parity."""
    results = run_conformance(GPT_SPEC, PARITY_CASES[name][0], ParallelDims(tp=1, sequence_parallel=True))
    assert results["hf_max_abs_diff"] <= 1e-5 and results["packed_documents_diff"] <= 1e-5


@pytest.mark.slow
def test_megatron_rope_swiglu_shape_under_tensor_and_sequence_parallel():
    """A Megatron rope/swiglu GPT (partial rotary, GQA) sharded TP=2 + SP on two gloo processes equals one process."""
    from nxdt.testing import check_tensor_parallel

    cfg = PARITY_CASES["megatron_rope_swiglu_layernorm_partial_rotary"][0]
    assert check_tensor_parallel(GPT_SPEC, cfg, tp=2, sequence_parallel=True) <= 1e-5


def test_megatron_anchor_architecture_is_a_gpt2_with_erf_gelu():
    """megatron_gpt_config.yaml's model keys (sizes shrunk) resolve to GPT-2's form with erf GELU and HF parity."""
    if not ANCHOR.is_file():
        pytest.skip(f"anchor config not found at {ANCHOR}")
    from nxdt.resolve import resolve

    sizes = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
             "model.num_kv_heads=4", "model.encoder_seq_length=64", "model.vocab_size=100"]
    run = resolve(str(ANCHOR), overrides=sizes)
    cfg = run.arch
    assert run.family == "gpt" and isinstance(cfg, GPTConfig)
    assert (cfg.norm, cfg.activation, cfg.position_embedding, cfg.tie_word_embeddings) == (
        "layernorm", "gelu", "learned_absolute", True)
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.init_std, cfg.scaled_init) == (104, 64, 0.021, True)
    assert (cfg.hidden_dropout, cfg.attention_dropout, cfg.ffn_dropout) == (0.1, 0.1, 0.1)
    assert config_to_hf(cfg)["activation_function"] == "gelu"
    assert check_hf_parity(GPT_SPEC, cfg, atol=1e-5) <= 1e-5  # eval mode: dropout off on both sides


def test_shapes_without_a_transformers_form_are_refused_in_one_line():
    """LayerNorm + rope + swiglu with output/MLP biases has no HF architecture: export says so, never writes a guess."""
    cfg = megatron(**ROPE_SWIGLU, normalization="layernorm", has_bias=True)
    state = build_initialized(GPT_SPEC, cfg).state_dict()
    for convert in (lambda: config_to_hf(cfg), lambda: GPT_SPEC.state_dict_adapter(cfg).to_hf(state),
                    lambda: GPT_SPEC.state_dict_adapter(cfg).from_hf({})):
        with pytest.raises(NxdtError, match="has no transformers architecture") as info:
            convert()
        assert "\n" not in str(info.value) and "layernorm, swiglu" in str(info.value)
    for other in (megatron(normalization="rmsnorm"), megatron(has_bias=False), megatron(num_kv_heads=2),
                  megatron(**ROPE_SWIGLU, normalization="rmsnorm", rotary_percentage=0.5),
                  megatron(position_embedding_type="rope", activation="gelu")):
        assert hf_form(other) is None
    assert hf_form(megatron(num_kv_heads=4)) == "gpt2"


# -- parameter counts ---------------------------------------------------------------------------
GPT2_SIZES = {"gpt2": (768, 12, 12), "gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20), "gpt2-xl": (1600, 48, 25)}


@pytest.mark.parametrize("preset", GPT2_SIZES)
def test_presets_have_transformers_exact_parameter_counts(preset):
    """Each preset's formula count = its meta build = GPT2LMHeadModel's count on the meta device (gpt2: 124,439,808)."""
    from nxdt.resolve import resolve

    cfg = resolve(preset).arch
    hidden, layers, heads = GPT2_SIZES[preset]
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads))
    expected = sum(p.numel() for p in hf.parameters())
    assert GPT_SPEC.num_parameters(cfg) == check_builds_on_meta(GPT_SPEC, cfg) == expected
    if preset == "gpt2":
        assert expected == 124_439_808
    assert hf_form(cfg) == "gpt2" and config_to_hf(cfg)["activation_function"] == "gelu_new"


@pytest.mark.parametrize("preset", ["gpt2-tiny", *GPT2_SIZES])
def test_inspect_shows_count_flops_and_plan(capsys, preset):
    """`nxdt inspect PRESET --json`: exact parameters, training FLOPs per token and the shard plan with learned positions."""
    from nxdt.resolve import resolve

    code = nxdt_main(["inspect", preset, "--json"])
    info = json.loads(capsys.readouterr().out)
    assert code == 0
    run = resolve(preset)
    assert info["parameters"] == GPT_SPEC.num_parameters(run.arch) == check_builds_on_meta(GPT_SPEC, run.arch)
    assert info["flops_per_token"] == GPT_SPEC.flops_per_token(run.arch, run.config.data.seq_length) > 0
    assert info["shard_plan"]["pos_embeddings"] == "sequence_output"
    assert info["shard_plan"]["layers.*.feed_forward.w1"] == "colwise" and "layers.*.feed_forward.w3" not in info["shard_plan"]


# -- NxDT and HF config keys --------------------------------------------------------------------
def test_config_from_nxdt_reads_the_architecture_keys():
    """Megatron keys switch the architecture (not pinned as in Llama); FFN defaults to 4 x hidden; biases follow has_bias."""
    cfg = config_from_nxdt({"hidden_size": 32, "num_attention_heads": 2, "normalization": "rmsnorm",
                            "activation": "fast-swiglu", "position_embedding_type": "rope", "rotary_percentage": 0.5,
                            "has_bias": False, "share_embeddings_and_output_weights": False, "init_method_std": 0.01})
    assert (cfg.norm, cfg.activation, cfg.position_embedding, cfg.rotary_percentage) == ("rmsnorm", "swiglu", "rope", 0.5)
    assert (cfg.ffn_hidden_size, cfg.qkv_bias, cfg.attention_bias, cfg.mlp_bias) == (128, False, False, False)
    assert not cfg.tie_word_embeddings and cfg.init_std == 0.01
    gpt2 = config_from_nxdt({})
    assert (gpt2.vocab_size, gpt2.hidden_size, gpt2.ffn_hidden_size, gpt2.activation) == (50257, 768, 3072, "gelu_tanh")
    assert gpt2.tie_word_embeddings and gpt2.qkv_bias and gpt2.attention_bias and gpt2.mlp_bias


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("transformer_block_type", "post_ln", "supports only pre_ln"),
        ("type_vocab_size", 2, "not supported by the gpt family"),
        ("activation", "gelu_fast", "not one of"),
        ("normalization", "batchnorm", "not one of"),
    ],
)
def test_config_from_nxdt_refuses_what_it_cannot_build(key, value, message):
    """Keys the family cannot honour are refused naming the key or value, never ignored."""
    with pytest.raises(ValueError, match=message):
        config_from_nxdt({"num_layers": 2, key: value})


def test_config_from_hf_reads_gpt2_and_stablelm_configs():
    """A transformers GPT2Config reads as the gpt2 preset (plus HF's dropouts) and writes back; StableLM 4.x/5.x forms too."""
    from nxdt.resolve import resolve

    hf = transformers.GPT2Config().to_dict()
    cfg = config_from_hf(hf)
    assert cfg == dataclasses.replace(resolve("gpt2").arch, hidden_dropout=0.1, attention_dropout=0.1)
    assert config_from_hf(config_to_hf(cfg)) == cfg
    reloaded = transformers.AutoConfig.for_model("gpt2", **{k: v for k, v in config_to_hf(cfg).items() if k != "model_type"})
    assert (reloaded.n_inner, reloaded.activation_function, reloaded.eos_token_id) == (3072, "gelu_new", 50256)
    stablelm = transformers.StableLmConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, intermediate_size=96, partial_rotary_factor=0.5,
                                           use_qkv_bias=True).to_dict()
    v4 = {k: v for k, v in stablelm.items() if k != "rope_parameters"} | {"partial_rotary_factor": 0.5, "rope_theta": 10000.0}
    for form in (stablelm, v4):
        got = config_from_hf(form)
        assert (got.rotary_percentage, got.qkv_bias, got.attention_bias, got.norm, got.num_kv_heads) == (
            0.5, True, False, "layernorm", 2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"add_cross_attention": True}, "add_cross_attention"),
        ({"activation_function": "quick_gelu"}, "activation_function"),
        ({"embd_pdrop": 0.0}, "embd_pdrop"),
        ({"model_type": "gpt_neox"}, "gpt_neox"),
    ],
)
def test_config_from_hf_refuses_what_gpt2_form_cannot_compute(change, message):
    """GPT-2 options the kit does not implement are refused with the option's name."""
    with pytest.raises(ValueError, match=message):
        config_from_hf({**transformers.GPT2Config().to_dict(), **change})


# -- the weight adapter ------------------------------------------------------------------------
def test_adapter_reads_openai_checkpoint_names_and_skips_mask_buffers():
    """Unprefixed GPT2Model keys (h.0.attn.c_attn.weight) and attn.bias/masked_bias buffers load as the prefixed ones."""
    cfg = tiny()
    hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{
        k: v for k, v in config_to_hf(cfg).items() if k not in ("model_type", "architectures")}))
    state = {k: v for k, v in hf_model.state_dict().items() if not k.endswith(".attn.bias")}
    bare = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
    bare.update({"h.0.attn.bias": torch.ones(1, 1, 64, 64), "h.1.attn.masked_bias": torch.tensor(-1e4)})
    adapter = GPT_SPEC.state_dict_adapter(cfg)
    ours, theirs = adapter.from_hf(state), adapter.from_hf(bare)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # c_attn is split into q/k/v (TP splits each), Conv1D weights come out as [out, in]
    assert ours["layers.0.attention.wq.weight"].shape == (60, 60)
    assert torch.equal(ours["layers.0.attention.wk.weight"], state["transformer.h.0.attn.c_attn.weight"][:, 60:120].t())
    build_initialized(GPT_SPEC, cfg).load_state_dict(ours, strict=True)
    with pytest.raises(KeyError, match="unexpected HF key"):
        adapter.from_hf({**state, "transformer.h.0.attn.c_attn.lora.weight": torch.zeros(1)})


def test_export_writes_tied_matrix_once_and_fuses_c_attn():
    """to_hf of a tied model has no lm_head (safetensors-safe); a last pipeline stage keeps its own head."""
    cfg = tiny()
    state = build_initialized(GPT_SPEC, cfg).state_dict()
    adapter = GPT_SPEC.state_dict_adapter(cfg)
    hf = adapter.to_hf(state)
    assert "lm_head.weight" not in hf and hf["transformer.h.0.attn.c_attn.weight"].shape == (60, 180)
    safetensors.torch.save(hf)  # no two tensors share storage
    last = {k: v for k, v in state.items() if k.startswith(("layers.1.", "norm.", "output."))}
    back = adapter.from_hf(adapter.to_hf(last))
    assert back.keys() == last.keys() and all(torch.equal(back[k], last[k]) for k in back)


# -- the tokenizer and the tiny preset ------------------------------------------------------------
def test_shipped_tokenizer_is_reproducible(tmp_path):
    """`python -m nxdt_gpt.bpe` regenerates the committed files byte for byte."""
    for path in bpe.generate(tmp_path):
        assert path.read_bytes() == (tiny_tokenizer_path() / path.name).read_bytes(), path.name


def test_shipped_tokenizer_is_gpt2_style():
    """512 byte-level BPE tokens with <|endoftext|> last; the HF directory and Megatron's vocab/merges agree."""
    from nxdt.data.tokenizer import load_tokenizer

    directory = tiny_tokenizer_path()
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    assert type(hf).__name__.startswith("GPT2Tokenizer") and len(hf) == 512
    assert hf.eos_token == hf.bos_token == "<|endoftext|>" and hf.eos_token_id == 511
    megatron_bpe = load_tokenizer("GPT2BPETokenizer", vocab_file=directory / "vocab.json", merge_file=directory / "merges.txt")
    ours = load_tokenizer(str(directory))
    for text in ["reverse: XKQ = QKX", "the quick fox, 12 times!<|endoftext|>", "  spaces\tand\nlines é"]:
        assert ours.encode(text) == megatron_bpe.encode(text) == hf.encode(text)
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    assert ours.eos_id == megatron_bpe.eos_id == 511


def test_gpt2_tiny_preset_uses_the_shipped_tokenizer():
    """gpt2-tiny resolves (sft by default) with the package's tokenizer and a 0.14M-parameter GPT-2 shape."""
    from nxdt.plugin_host import get_host
    from nxdt.resolve import default_recipe, resolve

    run = resolve("gpt2-tiny", default_recipe("gpt2-tiny"))
    assert run.recipe.name == "sft" and run.config.data.tokenizer.type == str(tiny_tokenizer_path())
    assert hf_form(run.arch) == "gpt2" and run.arch.vocab_size == 512 and run.arch.activation == "gelu_tanh"
    assert get_host().presets.sources["gpt2-tiny"] == "plugin 'gpt'"
    assert GPT_SPEC.num_parameters(run.arch) == 141_056


def test_plugin_registers_through_pluggy_and_entry_point():
    """The hooks register the gpt spec and gpt2-tiny; the package exposes them under nxdt.plugins."""
    pm = pluggy.PluginManager("nxdt")
    pm.add_hookspecs(nxdt.hookspecs)
    pm.register(plugin)
    pm.check_pending()
    models, presets = [], []
    pm.hook.nxdt_register_models(register=models.append)
    pm.hook.nxdt_register_presets(register=presets.append)
    assert models == [GPT_SPEC] and [p.name for p in presets] == ["gpt2-tiny"]
    assert GPT_SPEC.family == "gpt" and GPT_SPEC.hf_model_types == ("gpt2", "stablelm")
    entry_points = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="nxdt.plugins")}
    assert entry_points.get("gpt") == "nxdt_gpt.plugin"
