"""LoRA: adapters only train, the base stays bit-identical, peft's math, and loss parity of TP (with SP and
KV replication), PP and ZeRO-1 layouts against one process (real gloo ranks)."""

from __future__ import annotations

import pytest
import torch
from multirank import TOL, launch, single_trainer, tiny

from nxdt.peft.lora import LoRALinear

LORA = ["model_alignment_strategy.peft.lora_rank=4", "model_alignment_strategy.peft.lora_alpha=8",
        "model_alignment_strategy.peft.lora_dropout=0",
        "model_alignment_strategy.peft.target_modules=[qkv_proj,o_proj,gate_up_proj,down_proj]",
        "model.optim.lr=0.01", "trainer.limit_test_batches=0"]
BASE = [*tiny(2, 10), *LORA]
PARITY = {"dp2_tp2_sp": [], "dp2_tp2_kv1": ["model.num_kv_heads=1"], "pp2_dp2": [], "dp4_zero1": []}


def test_only_adapters_train_and_the_base_is_untouched(tmp_path, data_overrides):
    """Trainable = lora_A/lora_B; the first step starts from the base model (B = 0); the base never moves."""
    trainer = single_trainer([*tiny(2, 4), *LORA, *data_overrides], tmp_path)
    trainer.setup()
    module = trainer.model.trainable_module
    layers = [m for m in module.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    trainable = {r.name for r in trainer.model.records.trainable()}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert all(r.role == "adapter" for r in trainer.model.records.trainable())
    base = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        for layer in layers:
            layer.adapters_enabled = False
        plain = module(ids)
        for layer in layers:
            layer.adapters_enabled = True
        assert torch.equal(module(ids), plain)  # B starts at zero
    trained = single_trainer([*tiny(2, 4), *LORA, *data_overrides], tmp_path / "trained")
    trained.fit()  # builds its own model from the same seed
    module = trained.model.trainable_module
    assert all(torch.equal(p, base[n]) for n, p in module.named_parameters() if n in base)
    assert any(m.lora_B.abs().sum() > 0 for m in module.modules() if isinstance(m, LoRALinear))
    state_params = {id(p) for p in trained.optimizer.state}
    assert state_params == {id(p) for p in module.parameters() if p.requires_grad}


def test_lora_layer_matches_peft_math():
    """LoRALinear equals peft's LoRA Linear with the same A, B, alpha and rank."""
    peft = pytest.importorskip("peft")
    base = torch.nn.Linear(16, 24)
    ours = torch.nn.Linear(16, 24)
    ours.load_state_dict(base.state_dict())
    from nxdt.peft.lora import LoRASettings, inject_lora

    holder = torch.nn.Module()
    holder.proj = ours
    inject_lora(holder, ["proj"], LoRASettings(4, 8.0, 0.0, "none", ("proj",)), seed=0)
    torch.nn.init.normal_(ours.lora_B)
    wrapped = torch.nn.Module()
    wrapped.proj = base
    model = peft.get_peft_model(wrapped, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=0.0))
    model.base_model.model.proj.lora_A["default"].weight.data.copy_(ours.lora_A)
    model.base_model.model.proj.lora_B["default"].weight.data.copy_(ours.lora_B)
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert (model.base_model.model.proj(x) - ours(x)).abs().max() <= 1e-6


@pytest.fixture(scope="module")
def distributed(tmp_path_factory, data_overrides) -> dict[str, dict]:
    """Every LoRA layout's losses from one 4-rank launch."""
    return launch("lora_driver.py", tmp_path_factory.mktemp("lora"), [*BASE, *data_overrides])


@pytest.fixture(scope="module")
def references(tmp_path_factory, data_overrides) -> dict[tuple[str, ...], list[float]]:
    """One single-process LoRA run per distinct reference config."""
    return {extra: single_trainer([*BASE, *data_overrides, *extra], tmp_path_factory.mktemp("ref")).fit().losses
            for extra in {tuple(v) for v in PARITY.values()}}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(PARITY))
def test_lora_loss_parity(layout, distributed, references):
    """10 LoRA steps of each layout match one process within 1e-5; only adapters train there too."""
    ref = references[tuple(PARITY[layout])]
    got = distributed[layout]
    assert len(got["losses"]) == len(ref) == 10
    diff = max(abs(a - b) for a, b in zip(got["losses"], ref))
    print(f"lora {layout}: max loss difference {diff:.2e}")
    assert diff <= TOL, (layout, diff)
    assert ref[-1] < ref[0]
    # Only adapters train (under SP too: torch's SequenceParallel re-creates norm weights as trainable).
    assert got["trainable"] and all(n.endswith(("lora_A", "lora_B")) for n in got["trainable"])


@pytest.mark.slow
def test_upstream_lora_yaml_trains_adapters_only(tmp_path, data_overrides):
    """hf_llama3_8B_SFT_lora_config.yaml, unchanged apart from sizes, paths and the layout of this machine:
    LoRA from a pretrained nxdt checkpoint (weight_init_only, fresh adapters), TP=2, adapters only train."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    anchor = Path(__file__).resolve().parents[1].parent / "shared" / "anchors" / "nxdt-configs" / "hf_llama3_8B_SFT_lora_config.yaml"
    if not anchor.is_file():
        pytest.skip("anchor configs not present")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NXDT_DEVICE": "cpu"}
    shape = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_kv_heads=2",
             "model.ffn_hidden_size=128"]
    pre = subprocess.run([sys.executable, "-m", "nxdt.cli.main", "run", "llama3-tiny", "--recipe", "pretrain", *shape,
                          "trainer.max_steps=1", f"exp_manager.explicit_log_dir={tmp_path / 'pre'}"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert pre.returncode == 0, pre.stderr[-2000:]
    checkpoint = next((tmp_path / "pre" / "checkpoints").iterdir())
    from nxdt.resolve import resolve

    run = resolve("llama3-tiny", overrides=shape)
    (tmp_path / "config.json").write_text(json.dumps(run.spec.config_to_hf(run.arch)))
    res = subprocess.run(
        [sys.executable, "-m", "nxdt.cli.main", "run", str(anchor), *data_overrides, *shape,
         f"model.model_config={tmp_path / 'config.json'}", f"exp_manager.resume_from_checkpoint={checkpoint}",
         "model.encoder_seq_length=64", "model.max_position_embeddings=128", "data.seq_length=64",
         "trainer.devices=2", "distributed_strategy.tensor_model_parallel_size=2", "distributed_strategy.kv_replicator=1",
         "trainer.max_steps=4", "data.global_batch_size=8", "data.dev_choose_samples=200",
         f"exp_manager.explicit_log_dir={tmp_path / 'lora'}"],
        capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    line = next(x for x in res.stdout.splitlines() if "LoRA r=16" in x)  # lora_verbose: true in the file
    import re

    trainable, total = (int(n.replace(",", "")) for n in re.search(r"([\d,]+) trainable of ([\d,]+)", line).groups())
    # q/k/v adapters of 2 layers: r x (in + out) each
    assert trainable == 2 * 16 * ((64 + 64) + (64 + 32) + (64 + 32)) and total > 10 * trainable
    assert "resumed weights" in res.stdout
