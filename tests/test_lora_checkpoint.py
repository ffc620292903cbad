"""LoRA checkpoints: adapters only unless save_lora_base, bitwise resume, merge_lora's final checkpoint,
PEFT files inside the checkpoint (save_lora_config_adapter, merge_sharded_lora), and
load_lora_from_ckpt when a LoRA run starts from another checkpoint."""

from __future__ import annotations

import json

import torch
from multirank import single_trainer, tiny

from nxdt.checkpoint.dcp_io import _metadata_keys
from nxdt.checkpoint.layout import inspect_marker, list_checkpoints
from nxdt.checkpoint.store import Store

LORA = ["model_alignment_strategy.peft.lora_rank=4", "model_alignment_strategy.peft.lora_alpha=8",
        "model_alignment_strategy.peft.lora_dropout=0", "model.optim.lr=0.01", "trainer.limit_test_batches=0",
        "model_alignment_strategy.peft.target_modules=[qkv_proj,o_proj]", "trainer.val_check_interval=0"]


def _last(run_dir) -> tuple[Store, str, set[str], dict]:
    store = Store(str(run_dir / "checkpoints"))
    name = [i for i in list_checkpoints(store) if i.complete][-1].name
    marker, _ = inspect_marker(store, name)
    return store, name, {k for k in _metadata_keys(store, name, marker) if k.startswith("model.")}, marker


def test_adapters_only_by_default_and_resume_is_bitwise(tmp_path, data_overrides):
    """A LoRA checkpoint holds the adapters (the base comes back from the seeded init); resuming matches."""
    base = [*tiny(2, 4), *data_overrides, *LORA, "exp_manager.checkpoint_callback_params.every_n_train_steps=2",
            "exp_manager.checkpoint_callback_params.save_top_k=-1"]
    straight = single_trainer(base, tmp_path / "straight").fit().losses
    first = single_trainer([*base, "trainer.max_steps=2"], tmp_path / "resumed")
    first.fit()
    store, name, keys, marker = _last(tmp_path / "resumed")
    assert keys and all(k.endswith(("lora_A", "lora_B")) for k in keys), sorted(keys)[:4]
    assert marker["lora"] == {"base": False, "merged": False}
    config = json.loads(store.read_text(name, "adapter_config.json"))  # save_lora_config_adapter (default true)
    assert config["peft_type"] == "LORA" and config["r"] == 4
    resumed = single_trainer([*base, "exp_manager.resume_if_exists=true"], tmp_path / "resumed").fit().losses
    assert resumed == straight[2:]


def test_save_lora_base_merge_lora_and_a_peft_directory(tmp_path, data_overrides):
    """save_lora_base keeps the base; merge_lora's final checkpoint holds merged weights only; with
    merge_sharded_lora the checkpoint directory is a PEFT adapter directory."""
    run = [*tiny(2, 3), *data_overrides, *LORA, "model_alignment_strategy.peft.save_lora_base=true",
           "model_alignment_strategy.peft.merge_sharded_lora=true",
           "exp_manager.checkpoint_callback_params.every_n_train_steps=2"]
    trainer = single_trainer(run, tmp_path / "base")
    trainer.fit()
    store, name, keys, _ = _last(tmp_path / "base")
    assert "model.layers.0.feed_forward.w2.weight" in keys and "model.layers.0.attention.wq.lora_A" in keys
    from safetensors.torch import load

    files = load(open(store.url(name, "adapter_model.safetensors"), "rb").read())
    assert any(k.endswith("q_proj.lora_A.weight") for k in files)

    merged = single_trainer([*tiny(2, 3), *data_overrides, *LORA, "model_alignment_strategy.peft.merge_lora=true"],
                            tmp_path / "merged")
    merged.fit()
    _, _, keys, marker = _last(tmp_path / "merged")
    assert marker["lora"]["merged"] and not any("lora_" in k for k in keys)
    module = merged.model.trainable_module
    from nxdt.checkpoint.dcp_io import load_model_tensors

    store, name, _, marker = _last(tmp_path / "merged")
    saved = load_model_tensors(store, name, marker)
    wq = module.layers["0"].attention.wq
    assert torch.allclose(saved["layers.0.attention.wq.weight"], wq.merged_weight(), atol=1e-6)
    assert not torch.allclose(saved["layers.0.attention.wq.weight"], wq.weight)  # the adapters moved it


def test_load_lora_from_ckpt_decides_whether_adapters_come_along(tmp_path, data_overrides):
    """resume_from_checkpoint + weight_init_only: the base always loads; adapters only with load_lora_from_ckpt."""
    full = [*tiny(2, 2), *data_overrides, "trainer.limit_test_batches=0", "model.optim.lr=0.01"]
    single_trainer(full, tmp_path / "pretrained").fit()  # a plain (non-LoRA) run's final checkpoint
    _, name, _, _ = _last(tmp_path / "pretrained")
    ckpt = tmp_path / "pretrained" / "checkpoints" / name
    start = [*tiny(2, 1), *data_overrides, *LORA, f"exp_manager.resume_from_checkpoint={ckpt}",
             "model.weight_init_only=true", "trainer.max_steps=0"]
    fresh = single_trainer(start, tmp_path / "fresh")
    fresh.fit()
    base = fresh.model.trainable_module.layers["0"].feed_forward.w2.weight
    from nxdt.checkpoint.dcp_io import load_model_tensors

    store, name, _, marker = _last(tmp_path / "pretrained")
    assert torch.equal(base, load_model_tensors(store, name, marker)["layers.0.feed_forward.w2.weight"])
    assert fresh.model.trainable_module.layers["0"].attention.wq.lora_B.abs().sum() == 0  # fresh adapters

    lora_run = [*tiny(2, 2), *data_overrides, *LORA]
    single_trainer(lora_run, tmp_path / "lora").fit()
    _, name, _, _ = _last(tmp_path / "lora")
    ckpt = tmp_path / "lora" / "checkpoints" / name
    for flag, expect_trained in (("false", False), ("true", True)):
        again = single_trainer([*lora_run, f"exp_manager.resume_from_checkpoint={ckpt}", "model.weight_init_only=true",
                                "trainer.max_steps=0", f"model_alignment_strategy.peft.load_lora_from_ckpt={flag}"],
                               tmp_path / f"again_{flag}")
        again.fit()
        b = again.model.trainable_module.layers["0"].attention.wq.lora_B
        assert bool(b.abs().sum() > 0) == expect_trained
