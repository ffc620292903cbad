"""The run config: upstream NxDT YAML validates unchanged; overrides, interpolation and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nxdt.config import (
    RunConfig,
    compose,
    load_run_config,
    load_yaml,
    register_resolvers,
)
from nxdt.errors import ConfigError

ANCHORS = Path(__file__).resolve().parents[1].parent / "shared" / "anchors" / "nxdt-configs"
ANCHOR_FILES = sorted(ANCHORS.glob("*.yaml")) if ANCHORS.is_dir() else []
NO_ANCHORS = f"upstream NxDT configs not found at {ANCHORS}"


def anchor(name: str) -> Path:
    path = ANCHORS / name
    if not path.is_file():
        pytest.skip(NO_ANCHORS)
    return path


def config_error(*args, **kwargs) -> str:
    """Run compose/load and return the one-line ConfigError message it raises."""
    fn = kwargs.pop("fn", compose)
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- upstream configs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ANCHOR_FILES or [pytest.param(None, marks=pytest.mark.skip(reason=NO_ANCHORS))],
    ids=lambda p: p.name if p else "missing",
)
def test_anchor_validates_unchanged_and_round_trips(path: Path) -> None:
    cfg = load_run_config(path)
    raw = yaml.safe_load(path.read_text())
    assert cfg.name == raw["name"] and cfg.model_source == raw["model_source"]
    assert (
        cfg.distributed_strategy.tensor_model_parallel_size
        == raw["distributed_strategy"]["tensor_model_parallel_size"]
    )
    again = compose([yaml.safe_load(cfg.to_yaml())])
    assert again == cfg
    assert again.model.architecture_overrides() == cfg.model.architecture_overrides()
    assert again.unused_keys() == cfg.unused_keys()


def test_multiply_resolver() -> None:
    lora = load_run_config(anchor("hf_llama3_8B_SFT_lora_config.yaml"))
    assert lora.exp_manager.checkpoint_callback_params.model_parallel_size == 32
    big = load_run_config(anchor("hf_llama3_70B_config.yaml"))
    assert big.exp_manager.checkpoint_callback_params.model_parallel_size == 32 * 8
    register_resolvers()  # idempotent
    cfg = compose(
        [{"exp_manager": {"checkpoint_callback_params": {"model_parallel_size": "${multiply:2,3,4}"}}}]
    )
    assert cfg.exp_manager.checkpoint_callback_params.model_parallel_size == 24
    message = config_error([{"seed": "${multiply:a,2}"}])
    assert message.startswith("seed: ") and "'a' is not a number" in message


def test_relative_and_absolute_interpolation_follow_overrides() -> None:
    mixtral = load_run_config(anchor("hf_mixtral_8x7b_config.yaml"), ["model.encoder_seq_length=1024"])
    assert mixtral.model.max_position_embeddings == 1024  # ${.encoder_seq_length}
    gpt = load_run_config(anchor("megatron_gpt_config.yaml"), ["model.encoder_seq_length=512"])
    assert gpt.data.seq_length == 512  # ${model.encoder_seq_length}
    assert gpt.model.max_position_embeddings == 512
    llama = load_run_config(anchor("hf_llama3_8B_config.yaml"), ["trainer.max_steps=7"])
    assert llama.model.optim.sched.max_steps == 7  # ${trainer.max_steps}


def test_overrides() -> None:
    cfg = load_run_config(
        anchor("hf_llama3_70B_config.yaml"),
        [
            "model.num_layers=4",
            "distributed_strategy.tensor_model_parallel_size=2",
            "model.activations_checkpoint_recompute=[A,B]",
        ],
    )
    assert cfg.model.num_layers == 4
    assert cfg.distributed_strategy.tensor_model_parallel_size == 2
    assert cfg.exp_manager.checkpoint_callback_params.model_parallel_size == 2 * 8
    assert cfg.model.activations_checkpoint_recompute == ["A", "B"]
    gpt = load_run_config(
        anchor("megatron_gpt_config.yaml"),
        ["data.data_prefix=[0.5,/a,0.5,/b]", "model.rope_scaling.factor=8"],
    )
    assert gpt.data.data_prefix == [0.5, "/a", 0.5, "/b"]
    assert gpt.model.rope_scaling == {"factor": 8}
    assert config_error([], ["trainer.max_steps"]).startswith(
        "override 'trainer.max_steps': expected key=value"
    )


def test_layers_later_wins_and_defaults() -> None:
    cfg = compose(
        [{"trainer": {"max_steps": 10}, "data": {"seq_length": 128}}, {"trainer": {"max_steps": 20}}, None]
    )
    assert cfg.trainer.max_steps == 20 and cfg.data.seq_length == 128
    assert cfg.model.optim.sched.max_steps is None  # the schedule spans the run's steps (lr_factor_fn)
    default = RunConfig()
    assert default.seed == 1234 and default.precision.type == "fp32"
    assert default.model.optim.lr == 3e-4 and default.model.optim.betas == (0.9, 0.95)
    assert default.data.micro_batch_size == 1 and default.data.seq_length == 2048
    assert compose([{"trainer": None}]).trainer == RunConfig().trainer  # a section with only comments


# -- errors -----------------------------------------------------------------------------------


def test_misspelled_key_in_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("distributed_strategy:\n  tensor_model_paralel_size: 2\n")
    assert config_error(path, fn=load_run_config) == (
        "distributed_strategy.tensor_model_paralel_size: unknown key; did you mean 'tensor_model_parallel_size'?"
    )


def test_misspelled_key_in_override() -> None:
    message = config_error([{}], ["distributed_strategy.tensor_model_paralel_size=2"])
    assert (
        message
        == "distributed_strategy.tensor_model_paralel_size: unknown key; did you mean 'tensor_model_parallel_size'?"
    )
    assert (
        config_error([{}], ["model.moe.num_expert=8"])
        == "model.moe.num_expert: unknown key; did you mean 'num_experts'?"
    )
    assert config_error([{}], ["trainr.max_steps=1"]) == "trainr: unknown key; did you mean 'trainer'?"


def test_key_in_the_wrong_section_names_its_home() -> None:
    message = config_error([{"model": {"micro_batch_size": 4}}])
    assert message == "model.micro_batch_size: unknown key; it belongs at data.micro_batch_size"


def test_wrong_type_is_one_line() -> None:
    message = config_error([{}], ["trainer.max_steps=abc"])
    assert message.startswith("trainer.max_steps: Input should be a valid integer")
    assert message.endswith("(got 'abc')")
    several = config_error(
        [{"trainer": {"max_steps": "abc", "devices": "x"}, "model": {"hidden_dropout": 2}}]
    )
    assert several.startswith("trainer.") and several.endswith("(and 2 more)")
    assert config_error([{"model": {"activations_checkpoint_recompute": [1]}}]).startswith(
        "model.activations_checkpoint_recompute[0]: Input should be a valid string"
    )


def test_semantic_errors() -> None:
    assert config_error([{"data": {"data_prefix": ["/a", 0.5]}}]).startswith(
        "data.data_prefix: data_prefix must be"
    )
    assert config_error([{"model_alignment_strategy": {"sft": {}, "dpo": {}}}]) == (
        "model_alignment_strategy: set only one of sft, dpo, orpo (got sft, dpo)"
    )
    assert config_error([{"precision": {"param_dtype": "bf16"}}]).startswith(
        "precision: param_dtype is only read when type is manual"
    )
    assert config_error([{"seed": "${trainer.nope}"}]) == "seed: Interpolation key 'trainer.nope' not found"


@pytest.mark.parametrize(
    "prefix",
    [
        ["/a"],
        ["/a", "/b"],
        [1.0, "/a"],
        [0.3, "/a", 0.7, "/b"],
        "/a",
        {"train": [1.0, "/a"], "validation": ["/v"]},
    ],
)
def test_data_prefix_forms(prefix) -> None:
    assert compose([{"data": {"data_prefix": prefix}}]).data.data_prefix == prefix


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert config_error(missing, fn=load_yaml) == f"{missing}: config file not found"
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: 3\n  devices: [1, 2\n")
    assert config_error(bad, fn=load_yaml).startswith(f"{bad}:4: invalid YAML")
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    assert "expected a mapping" in config_error(listed, fn=load_yaml)


# -- views ------------------------------------------------------------------------------------


def test_unused_neuron_keys() -> None:
    trn2 = load_run_config(anchor("hf_llama3_70B_trn2_config.yaml"))
    unused = trn2.unused_keys(backend="torch")
    for key in (
        "compiler_flags",
        "aync_exec_max_inflight_requests",
        "neuron_rt_exec_timeout",
        "trainer.lnc",
        "precision.xla_use_bf16",
        "precision.parallel_layers_reduce_dtype",
        "exp_manager.save_xser",
    ):
        assert key in unused
    assert "distributed_strategy.kv_replicator" not in unused
    assert trn2.unused_keys(backend="neuron") == []
    assert "exp_manager.save_xser" not in trn2.unused_keys(backend="xla")
    assert RunConfig().unused_keys() == []
    # Manual precision reads the Neuron dtype/rounding flags when the nxdt flags are unset.
    manual = compose(
        [{"precision": {"type": "manual", "xla_use_bf16": "1", "neuron_rt_stochastic_rounding_en": 0}}]
    )
    assert manual.unused_keys() == []


@pytest.mark.parametrize(
    ("ptype", "expected"),
    [
        ("fp32", ("fp32", "fp32", False, False, False, "fp32")),
        ("autocast", ("fp32", "bf16", False, False, False, "fp32")),
        ("bf16SR", ("bf16", "bf16", False, False, True, "bf16")),
        ("mixed_precision", ("bf16", "bf16", True, True, False, "fp32")),
        ("mixed_precisionSR", ("bf16", "bf16", True, True, True, "fp32")),
    ],
)
def test_precision_resolution(ptype: str, expected: tuple) -> None:
    # The anchors' master_weights/fp32_grad_acc flags are ignored outside manual mode.
    r = compose(
        [{"precision": {"type": ptype, "master_weights": False, "fp32_grad_acc": False}}]
    ).precision.resolved()
    fields = (
        r.param_dtype,
        r.compute_dtype,
        r.master_weights,
        r.fp32_grad_acc,
        r.stochastic_rounding,
        r.optimizer_state_dtype,
    )
    assert fields == expected


def test_manual_precision() -> None:
    def resolved(optimizer=None, **precision):
        return compose([{"precision": {"type": "manual", **precision}}]).precision.resolved(optimizer)

    r = resolved(param_dtype="bf16", master_weights=True, fp32_grad_acc=True, stochastic_rounding=True)
    assert (r.param_dtype, r.compute_dtype, r.master_weights, r.fp32_grad_acc, r.stochastic_rounding) == (
        "bf16",
        "bf16",
        True,
        True,
        True,
    )
    assert r.optimizer_state_dtype == "fp32"
    assert resolved(param_dtype="bf16").optimizer_state_dtype == "bf16"
    assert resolved("adamw_fp32OptState", param_dtype="bf16").optimizer_state_dtype == "fp32"
    assert resolved().param_dtype == "fp32"
    neuron = resolved(xla_downcast_bf16="1", neuron_rt_stochastic_rounding_en="1")
    assert neuron.param_dtype == "bf16" and neuron.stochastic_rounding


def test_architecture_overrides_only_set_keys() -> None:
    cfg = compose(
        [{"model": {"num_layers": 2, "rope_theta": None, "optim": {"lr": 1e-3}, "moe": {"top_k": 2}}}]
    )
    assert cfg.model.architecture_overrides() == {"num_layers": 2, "moe": {"top_k": 2}}
    assert RunConfig().model.architecture_overrides() == {}
    gpt = load_run_config(anchor("megatron_gpt_config.yaml"))
    arch = gpt.model.architecture_overrides()
    assert arch["num_attention_heads"] == 32 and arch["max_position_embeddings"] == 2048
    assert "model_config" not in arch and "use_cpu_initialization" not in arch
    llama = load_run_config(anchor("hf_llama3_8B_config.yaml"))
    assert llama.model.model_config_path == "/home/ubuntu/config.json"
    assert "num_attention_heads" not in llama.model.architecture_overrides()
