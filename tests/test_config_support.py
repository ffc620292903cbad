"""Every accepted key takes effect or is refused: the schema walk, the refusals users meet, and the
keys that used to be accepted and ignored (epoch-based schedules, tiny validation sets, test_dir)."""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
from multirank import single_trainer, tiny

from nxdt.config.loader import _fields, _is_model, _unwrap
from nxdt.config.schema import RunConfig
from nxdt.config.support import KEYS, key_rule
from nxdt.errors import ConfigError
from nxdt.modeling.nxdt_keys import ENGINE_KEYS, KIT_KEYS, NO_EFFECT_KEYS
from nxdt.resolve import resolve

ANCHORS = Path(__file__).resolve().parents[1].parent / "shared" / "anchors" / "nxdt-configs"
ENV_CMD = [sys.executable, "-m", "nxdt.cli.main"]


def schema_leaves(model: type = RunConfig, prefix: str = "") -> list[str]:
    """Dotted paths of every field of the schema (sections included)."""
    out = []
    for key, field in _fields(model).items():
        inner = _unwrap(field.annotation)
        out.append(prefix + key)
        if _is_model(inner):
            out += schema_leaves(inner, f"{prefix}{key}.")
    return out


def test_every_schema_field_is_read_refused_or_backend_only():
    """A field with no rule fails; a 'read' field must be named in the module said to read it."""
    unclassified, unread = [], []
    for path in schema_leaves():
        rule = key_rule(path)
        if rule is None:
            if not any(k.startswith(path + ".") for k in KEYS):  # a section whose fields carry the rules
                unclassified.append(path)
            continue
        if rule.status == "read" and path in KEYS:
            source = inspect.getsource(importlib.import_module(rule.where))
            if path.rsplit(".", 1)[-1] not in source:
                unread.append(f"{path} (said to be read by {rule.where})")
        if rule.status == "family":
            key = path.split(".", 1)[1]
            # The kit's families read it, the engine checks it, it is reported as no effect, or some
            # installed family reads it (BERT's token types) while the others refuse it.
            if not (key in KIT_KEYS or key in ENGINE_KEYS or key in NO_EFFECT_KEYS):
                assert _a_family_reads(key), f"{path}: no installed family reads it"
    assert not unclassified, f"schema fields with no rule in nxdt.config.support: {unclassified}"
    assert not unread, f"fields whose reader does not mention them: {unread}"


def _a_family_reads(key: str) -> bool:
    """Whether some installed family applies NxDT ``model.<key>`` (with a value of its type) without refusing it."""
    from nxdt.config.sections_model import ModelSection
    from nxdt.plugin_host import get_host

    kind = _unwrap(ModelSection.model_fields[key].annotation)
    value = {bool: True, int: 2, float: 0.5}.get(kind, "x")
    readers = []
    for spec in get_host().models:
        try:
            spec.config_from_nxdt({key: value})
            readers.append(spec.family)
        except (ValueError, TypeError):
            pass
    return bool(readers)


def _one_line_error(*args: str) -> str:
    res = subprocess.run([*ENV_CMD, *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    return lines[0]


@pytest.fixture(scope="module")
def llama_config_json(tmp_path_factory) -> Path:
    """A Llama config.json for the upstream YAMLs' model.model_config (llama3-tiny's shape)."""
    run = resolve("llama3-tiny")
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps(run.spec.config_to_hf(run.arch)))
    return path


def test_upstream_lora_yaml_plans_lora(llama_config_json):
    """hf_llama3_8B_SFT_lora_config.yaml once ran a full fine-tune; its dry run now states LoRA on the fused qkv
    projection, and the memory plan holds no gradients or optimizer state for the frozen base."""
    target = ANCHORS / "hf_llama3_8B_SFT_lora_config.yaml"
    if not target.is_file():
        pytest.skip("anchor configs not present")
    from multirank import embedded_data_overrides

    shape = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_kv_heads=2",
             "model.ffn_hidden_size=128", "model.encoder_seq_length=64", "model.max_position_embeddings=128",
             "data.seq_length=64"]
    res = subprocess.run([*ENV_CMD, "run", str(target), "--dry-run", "--json", f"model.model_config={llama_config_json}",
                          "distributed_strategy.tensor_model_parallel_size=1", "trainer.devices=1",
                          "distributed_strategy.kv_replicator=1", *shape, *embedded_data_overrides()],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["peft"].startswith("LoRA r=16 alpha=32 dropout=0.05 bias=none on qkv_proj")
    (rank,) = out["memory_plan"]["ranks"]
    # q/k/v adapters of 2 layers, r x (in + out) each, are all the optimizer sees
    assert rank["trainable"] == 2 * 16 * ((64 + 64) + (64 + 32) + (64 + 32)) < rank["parameters"]
    assert rank["gradients_gib"] < rank["weights_gib"] / 10


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["distributed_strategy.expert_model_parallel_size=2", "trainer.devices=2"],
         "expert parallelism needs a mixture-of-experts family"),
        (["model.normalization=layernorm"], "model.normalization='layernorm': the llama family supports only rmsnorm"),
        (["model.moe.num_experts=8"], "only with a mixture-of-experts family"),
        (["model.model_config=/nonexistent/config.json"], "/nonexistent/config.json does not exist"),
        (["model_alignment_strategy.sft=null", "model_alignment_strategy.dpo.kl_beta=0.1"], "applies to the dpo recipe"),
        (["distributed_strategy.context_parallel_size=2", "trainer.devices=2"], "context parallelism is not available"),
        (["exp_manager.save_bf16=true"], "not available yet"),
        (["data.reset_position_ids=true"], "must be set together"),
        (["data.eod_mask_loss=true"], "applies to pre-training data"),
        (["data.data_impl=lazy"], "only the mmap"),
        (["exp_manager.checkpoint_callback_params.model_parallel_size=4"], "does not match"),
        (["data.seq_length=512"], "exceeds the model's max_position_embeddings"),
        (["data.tokenizer.use_fast=false"], "slow (Python) tokenizers"),
    ],
)
def test_keys_that_cannot_be_honoured_are_refused_with_one_line(overrides, expected):
    """Each used to be accepted and ignored; now `nxdt run --dry-run` exits 2 with one line naming the key."""
    line = _one_line_error("run", "llama3-tiny", "--recipe", "sft", "--dry-run", *overrides)
    assert expected in line, line


def test_keys_without_effect_are_reported():
    """A key torch has no use for is accepted and said to have no effect, in --dry-run and at start-up."""
    res = subprocess.run([*ENV_CMD, "run", "llama3-tiny", "--dry-run", "--json", "data.index_mapping_dir=/tmp/idx",
                          "model.persist_layer_norm=true"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    unused = json.loads(res.stdout)["unused_keys"]
    assert "data.index_mapping_dir" in unused and "model.persist_layer_norm" in unused
    run = resolve("llama3-tiny", "sft", ["data.index_mapping_dir=/tmp/idx"])
    assert any("data.index_mapping_dir has no effect" in note for note in run.notes)


def test_epoch_based_schedule_spans_the_dataset(tmp_path, data_overrides):
    """max_epochs=1 with max_steps=-1 trains one epoch and the LR schedule ends there (it used to total -1)."""
    overrides = [*tiny(2, 5), *data_overrides, "trainer.max_steps=-1", "trainer.max_epochs=1",
                 "model.optim.sched.name=LinearAnnealingWithWarmUp", "model.optim.sched.warmup_steps=0",
                 "data.dev_choose_samples=64", "data.global_batch_size=16", "data.micro_batch_size=8",
                 "model_alignment_strategy.sft.packing=false",
                 "model.optim.sched.max_steps=${trainer.max_steps}"]
    trainer = single_trainer(overrides, tmp_path)
    result = trainer.fit()
    assert trainer.max_steps == trainer.steps_per_epoch == len(result.losses) > 1
    assert trainer.scheduler.get_last_lr()[0] == 0.0  # linear annealing reached its end exactly


def test_small_validation_set_runs_a_partial_batch_or_is_refused(tmp_path, data_overrides):
    """Fewer validation rows than one global batch: refused by default, a padded partial batch on request."""
    val = tmp_path / "val.jsonl"
    from nxdt.data.embedded import embedded_paths

    val.write_text("\n".join(embedded_paths()["sft_validation"].read_text().splitlines()[:5]) + "\n")
    base = [*tiny(2, 2), *[o for o in data_overrides if not o.startswith("data.val_dir")], f"data.val_dir={val}",
            "model_alignment_strategy.sft.packing=false"]
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        single_trainer(base, tmp_path / "refused").fit()
    result = single_trainer([*base, "data.validation_drop_last=false"], tmp_path / "partial").fit()
    assert result.val_losses and all(v > 0 for v in result.val_losses.values())


def test_test_dir_is_the_evaluation_set(tmp_path):
    """data.test_dir is a schema key the SFT task metrics read; limit_test_batches bounds it."""
    from nxdt.recipes.evaluate import evaluation_rows

    rows = tmp_path / "test.jsonl"
    rows.write_text("".join(json.dumps({"input": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(10)))
    cfg = resolve("llama3-tiny", "sft", [f"data.test_dir={rows}", "data.train_dir=x.jsonl"]).config
    assert len(evaluation_rows(cfg)) == 10
    half = resolve("llama3-tiny", "sft", [f"data.test_dir={rows}", "trainer.limit_test_batches=0.5"]).config
    assert len(evaluation_rows(half)) == 5
    none = resolve("llama3-tiny", "sft", [f"data.test_dir={rows}", "trainer.limit_test_batches=0"]).config
    assert evaluation_rows(none) == []


def test_preset_recipe_defaults_apply_to_their_recipe_only():
    """llama3-tiny's embedded ORPO demo raises beta for the orpo recipe; a full-size preset keeps TRL's 0.1."""
    assert resolve("llama3-tiny", "orpo").config.model_alignment_strategy.orpo.beta == 2.0
    assert resolve("llama3-8b", "orpo").config.model_alignment_strategy.orpo.beta == 0.1
    assert resolve("llama3-tiny", "sft").config.model_alignment_strategy.orpo is None
