"""The bert plugin's model: logits parity with transformers (BertForPreTraining, BertForMaskedLM) on padded
batches with token types, exact parameter counts of the presets, FLOPs, config translation, the HF adapter,
from_pretrained, the shard plan and the conformance kit."""

from __future__ import annotations

import dataclasses
import importlib.metadata

import pytest
import torch
import transformers

from nxdt.errors import ConfigError, NxdtError
from nxdt.specs import ParallelDims
from nxdt.testing import build_initialized, check_builds_on_meta, check_shard_plan_matches, run_conformance
from nxdt.testing.conformance import build_hf_model
from nxdt_bert import hf
from nxdt_bert.model import BertConfig, PreTrainingOutput, flops_per_token, num_parameters
from nxdt_bert.plugin import BERT_SPEC


def tiny(**overrides) -> BertConfig:
    """A 2-layer, 64-wide BERT with both heads and no dropout unless overridden."""
    base = dict(vocab_size=128, hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=128,
                max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)
    return BertConfig(**{**base, **overrides})


PARITY_CASES = {
    "pretraining": tiny(),
    "masked_lm": tiny(next_sentence=False),
    "three_token_types": tiny(type_vocab_size=3),
    "untied_decoder": tiny(tie_word_embeddings=False),
    "fused_qkv": tiny(fuse_qkv=True),
    "gelu_tanh_8_heads_3_layers": tiny(activation="gelu_tanh", num_attention_heads=8, num_layers=3),
    "wide_ffn_eps": tiny(hidden_size=96, num_attention_heads=6, ffn_hidden_size=384, norm_eps=1e-5),
}


def padded_inputs(cfg: BertConfig, batch: int = 3, seq: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids with two segments, rows padded to different lengths (the first row not at all)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(1, batch):
        mask[row, seq - 5 * row :] = 0
    types = torch.zeros(batch, seq, dtype=torch.long)
    types[:, seq // 3 :] = 1
    types[0, -4:] = cfg.type_vocab_size - 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types * mask}


def _perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _outputs(out) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(out, torch.Tensor):
        return out, None
    if isinstance(out, PreTrainingOutput):
        return out.logits, out.next_sentence_logits
    return getattr(out, "prediction_logits", getattr(out, "logits", None)), getattr(out, "seq_relationship_logits", None)


def _diffs(ours, theirs, mask) -> tuple[float, float]:
    (a, a_nsp), (b, b_nsp) = _outputs(ours), _outputs(theirs)
    assert a.shape == b.shape and (a_nsp is None) == (b_nsp is None)
    real = mask.bool()
    nsp = (a_nsp - b_nsp).abs().max().item() if a_nsp is not None else 0.0
    return (a[real] - b[real]).abs().max().item(), nsp


@pytest.mark.parametrize("name", PARITY_CASES)
def test_logits_match_transformers_both_directions(name):
    """HF->nxdt and nxdt->HF weights: masked-LM (and NSP) logits equal transformers' at real positions, fp32."""
    cfg = PARITY_CASES[name]
    inputs = padded_inputs(cfg)
    adapter = BERT_SPEC.state_dict_adapter(cfg)
    worst = []
    # HF -> nxdt
    hf_model = build_hf_model(BERT_SPEC, cfg, seed=0)
    assert type(hf_model).__name__ == ("BertForPreTraining" if cfg.next_sentence else "BertForMaskedLM")
    _perturb(hf_model, 0)
    model = build_initialized(BERT_SPEC, cfg).eval()
    model.load_state_dict(adapter.from_hf(hf_model.state_dict()), strict=True)
    with torch.no_grad():
        worst.append(_diffs(model(**inputs), hf_model(**inputs), inputs["attention_mask"]))
    # nxdt -> HF, through a saved checkpoint as users load it
    model = build_initialized(BERT_SPEC, cfg, seed=1).eval()
    _perturb(model, 1)
    hf_model = build_hf_model(BERT_SPEC, cfg, seed=1)
    missing, unexpected = hf_model.load_state_dict(adapter.to_hf(model.state_dict()), strict=False)
    assert not unexpected and set(missing) <= set(hf_model._tied_weights_keys), (missing, unexpected)
    if not cfg.tie_word_embeddings:
        assert "cls.predictions.decoder.weight" not in missing
    with torch.no_grad():
        worst.append(_diffs(model(**inputs), hf_model(**inputs), inputs["attention_mask"]))
    print(f"{name}: max |logit diff| (masked LM, NSP) HF->nxdt {worst[0]}, nxdt->HF {worst[1]}")
    assert max(max(pair) for pair in worst) <= 1e-5


def test_padding_and_token_types_are_not_vacuous():
    """Padding content never reaches real positions; token types change the logits."""
    cfg = tiny()
    model = build_initialized(BERT_SPEC, cfg).eval()
    inputs = padded_inputs(cfg)
    other = dict(inputs, input_ids=torch.where(inputs["attention_mask"].bool(), inputs["input_ids"], 7))
    with torch.no_grad():
        a, b = model(**inputs), model(**other)
        untyped = model(**{**inputs, "token_type_ids": torch.zeros_like(inputs["token_type_ids"])})
    real = inputs["attention_mask"].bool()
    assert (a.logits[real] - b.logits[real]).abs().max() <= 1e-6
    assert (a.next_sentence_logits - b.next_sentence_logits).abs().max() <= 1e-6
    assert (a.logits[real] - untyped.logits[real]).abs().max() > 1e-3


#: transformers' own counts of the two head sets (verified against a meta-device build below)
PRESET_COUNTS = {
    "bert-base": (110_106_428, 109_514_298),  # BertForPreTraining, BertForMaskedLM
    "bert-large": (336_226_108, 335_174_458),
}


@pytest.mark.parametrize("preset", PRESET_COUNTS)
def test_preset_parameter_counts_match_transformers(preset):
    """bert-base/large count BertForPreTraining's head set exactly; bert_binary_head=false is BertForMaskedLM's."""
    from nxdt.cli.hub_commands import inspect_preset
    from nxdt.resolve import resolve

    pretraining, masked_lm = PRESET_COUNTS[preset]
    run = resolve(preset)
    assert run.arch.next_sentence
    assert num_parameters(run.arch) == check_builds_on_meta(BERT_SPEC, run.arch) == pretraining
    mlm_arch = dataclasses.replace(run.arch, next_sentence=False)
    assert num_parameters(mlm_arch) == check_builds_on_meta(BERT_SPEC, mlm_arch) == masked_lm
    with torch.device("meta"):
        hf_config = transformers.BertConfig(**{k: v for k, v in hf.config_to_hf(run.arch).items() if k != "architectures"})
        for cls, expected in ((transformers.BertForPreTraining, pretraining), (transformers.BertForMaskedLM, masked_lm)):
            assert sum(p.numel() for p in cls(hf_config).parameters()) == expected
    info = inspect_preset(preset, [])
    assert info["parameters"] == pretraining and info["flops_per_token"] == flops_per_token(run.arch, 512)
    assert info["shard_plan"]["output"] == "lm_head" and info["recipes"] == ["pretrain"]


def test_bert_tiny_preset():
    """bert-tiny: masked-LM head set, its own WordPiece tokenizer, the masked-LM pretrain recipe by default."""
    from nxdt.resolve import default_recipe, resolve

    assert default_recipe("bert-tiny") == "pretrain"
    run = resolve("bert-tiny", "pretrain")
    assert run.recipe.tasks == ("masked_lm",) and run.recipe.dataset == "masked_lm"
    assert not run.arch.next_sentence and run.arch.hidden_size == 64
    assert num_parameters(run.arch) == check_builds_on_meta(BERT_SPEC, run.arch)
    assert run.config.data.tokenizer.type.endswith("tokenizer")
    assert resolve("bert-tiny", "pretrain", ["model.bert_binary_head=true"]).arch.next_sentence
    with pytest.raises(NxdtError, match="recipe 'sft' trains the causal_lm task"):
        resolve("bert-tiny", "sft")


def test_flops_per_token_formula():
    """6 x (matmul parameters, decoder included, embedding tables not) + attention; the NSP head once per sequence."""
    cfg = BertConfig()  # bert-base
    h, v, seq = 768, 30522, 512
    tables = (v + 512 + 2) * h
    per_sequence = (h * h + h) + (2 * h + 2)
    matmul = 110_106_428 - tables + v * h - per_sequence
    assert flops_per_token(cfg, seq) == pytest.approx(6 * matmul + 6 * per_sequence / seq + 12 * 12 * h * seq)


def test_conformance_kit():
    """Meta build, init, plan globs, named modules, adapter round trip, config round trip, pipeline split."""
    for cfg, parallel in ((tiny(), ParallelDims(tp=2, sequence_parallel=True)),
                          (tiny(next_sentence=False, fuse_qkv=True, tie_word_embeddings=False), ParallelDims())):
        results = run_conformance(BERT_SPEC, cfg, parallel, hf_parity=False)
        assert results["parameters"] == num_parameters(cfg)
        assert results["pipeline_split_diff"] <= 1e-5


def test_shard_plan():
    """Plan as data; SP rules cover every module that runs on sequence shards; fused qkv and odd heads refused."""
    plan = BERT_SPEC.shard_plan(tiny(), ParallelDims(tp=2, sequence_parallel=True))
    assert plan.rules["tok_embeddings"] == "embedding" and plan.rules["output"] == "lm_head"
    assert plan.rules["pos_embeddings"] == plan.rules["type_embeddings"] == "sequence_output"
    assert set(plan.sequence_parallel) == {
        "embedding_norm", "layers.*.attention_norm", "layers.*.ffn_norm", "head_transform.dense",
        "head_transform.norm", "pooler",
    }
    assert "pooler" not in BERT_SPEC.shard_plan(tiny(next_sentence=False), ParallelDims(tp=2)).sequence_parallel
    check_shard_plan_matches(BERT_SPEC, tiny(), ParallelDims(tp=2))
    with pytest.raises(ValueError, match="fuse_qkv"):
        BERT_SPEC.shard_plan(tiny(fuse_qkv=True), ParallelDims(tp=2))
    with pytest.raises(ValueError, match="divisible"):
        BERT_SPEC.shard_plan(tiny(), ParallelDims(tp=3))


def test_config_round_trip_through_transformers():
    """config.json both ways: BertConfig reloads it, and the head set follows `architectures`."""
    for cfg in (tiny(), tiny(next_sentence=False, activation="gelu_tanh", type_vocab_size=3, tie_word_embeddings=False)):
        exported = BERT_SPEC.config_to_hf(cfg)
        reloaded = transformers.AutoConfig.for_model(exported.pop("model_type"), **exported).to_dict()
        assert BERT_SPEC.config_from_hf(reloaded) == cfg
    assert not BERT_SPEC.config_from_hf({"model_type": "bert", "architectures": ["BertForMaskedLM"]}).next_sentence
    assert BERT_SPEC.config_from_hf({"model_type": "bert"}).next_sentence
    for bad, match in (({"hidden_act": "tanh"}, "hidden_act"), ({"is_decoder": True}, "is_decoder"),
                       ({"position_embedding_type": "relative_key"}, "relative_key")):
        with pytest.raises(ValueError, match=match):
            BERT_SPEC.config_from_hf({"model_type": "bert", **bad})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.num_kv_heads=2", "model.num_kv_heads is not supported by the bert family"),
        ("model.rope_theta=10000.0", "model.rope_theta is not supported by the bert family"),
        ("model.normalization=rmsnorm", "model.normalization='rmsnorm': the bert family supports only layernorm"),
        ("model.transformer_block_type=pre_ln", "supports only post_ln"),
        ("model.position_embedding_type=rope", "supports only learned_absolute"),
        ("model.activation=swiglu", "activation must be one of"),
        ("model.fuse_gate_up=true", "model.fuse_gate_up is not supported"),
    ],
)
def test_nxdt_keys_bert_cannot_honour_are_refused(override, message):
    """Every architecture key does what it says or is refused with one line naming it."""
    from nxdt.resolve import resolve

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        resolve("bert-tiny", "pretrain", [override])
    assert "\n" not in str(info.value)


def test_nxdt_keys_apply():
    """type_vocab_size, bert_binary_head, dropout, eps, init std, sizes and tying reach the config."""
    from nxdt.resolve import resolve

    arch = resolve("bert-tiny", "pretrain", [
        "model.type_vocab_size=4", "model.bert_binary_head=true", "model.hidden_dropout=0.2", "model.layernorm_epsilon=1e-6",
        "model.init_method_std=0.01", "model.share_embeddings_and_output_weights=false", "model.num_layers=3",
        "model.activation=gelu_new",
    ]).arch
    assert (arch.type_vocab_size, arch.next_sentence, arch.hidden_dropout, arch.norm_eps) == (4, True, 0.2, 1e-6)
    assert (arch.init_std, arch.tie_word_embeddings, arch.num_layers, arch.activation) == (0.01, False, 3, "gelu_tanh")
    with pytest.raises(ConfigError, match="model.bert_binary_head is not supported by the llama family"):
        resolve("llama3-tiny", "sft", ["model.bert_binary_head=true"])


def test_adapter_reads_original_checkpoint_names():
    """LayerNorm gamma/beta and saved position_ids buffers read; a masked-LM model skips the NSP head's weights."""
    cfg = tiny()
    hf_state = BERT_SPEC.state_dict_adapter(cfg).to_hf(build_initialized(BERT_SPEC, cfg).state_dict())
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in hf_state.items()}
    old["bert.embeddings.position_ids"] = torch.arange(64)[None]
    old["cls.predictions.decoder.bias"] = old["cls.predictions.bias"]
    back = BERT_SPEC.state_dict_adapter(cfg).from_hf(old)
    build_initialized(BERT_SPEC, cfg).load_state_dict(back, strict=True)
    mlm_cfg = tiny(next_sentence=False)
    build_initialized(BERT_SPEC, mlm_cfg).load_state_dict(BERT_SPEC.state_dict_adapter(mlm_cfg).from_hf(old), strict=True)
    assert "cls.predictions.decoder.weight" not in hf_state  # tied: saved once, as the word embedding
    with pytest.raises(KeyError, match="unexpected HF key"):
        BERT_SPEC.state_dict_adapter(cfg).from_hf({**hf_state, "bert.encoder.layer.0.crossattention.x.weight": torch.zeros(1)})


@pytest.mark.parametrize("architecture", ["BertForPreTraining", "BertForMaskedLM"])
def test_from_pretrained_takes_hf_keyword_inputs(tmp_path, architecture):
    """nxdt.from_pretrained(dir) of a transformers BERT: HF's keyword inputs in, `.logits` (or the logits) out."""
    import nxdt

    cfg = tiny(next_sentence=architecture == "BertForPreTraining")
    hf_model = build_hf_model(BERT_SPEC, cfg)
    _perturb(hf_model, 3)
    hf_model.save_pretrained(tmp_path)
    model = nxdt.from_pretrained(str(tmp_path))
    inputs = padded_inputs(cfg)
    with torch.no_grad():
        out, ref = model(**inputs), hf_model(**inputs)
    logits = out.logits if hasattr(out, "logits") else out
    real = inputs["attention_mask"].bool()
    assert (logits[real] - _outputs(ref)[0][real]).abs().max() <= 1e-5
    assert isinstance(out, PreTrainingOutput) == cfg.next_sentence
    with pytest.raises(NxdtError, match="does not take labels"):
        model(**inputs, labels=inputs["input_ids"])


def test_plugin_registers_through_entry_point():
    """The plugin is found by its entry point and registers the spec, bert-tiny and the masked-LM recipe."""
    from nxdt.plugin_host import get_host

    entry_points = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="nxdt.plugins")}
    assert entry_points.get("bert") == "nxdt_bert.plugin"
    host = get_host()
    assert host.model_spec("bert") is BERT_SPEC and host.preset("bert-tiny").source == "nxdt-bert"
    assert host.recipe("pretrain", BERT_SPEC).loss == "masked_lm"
    assert host.recipe("pretrain", host.model_spec("llama")).loss == "causal_lm"
    assert BERT_SPEC.inputs == ("input_ids", "attention_mask", "token_type_ids", "position_ids")
