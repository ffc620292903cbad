"""Measured memory: saved-activation tracking, phase peaks, and what a run writes to metrics.jsonl and result.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nxdt.plan.activations import activation_model
from nxdt.resolve import resolve
from nxdt.train.memory import MemoryMonitor, _SavedActivations

SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4", "model.num_kv_heads=2",
         "model.ffn_hidden_size=96", "model.vocab_size=1000"]


class _Model:
    def __init__(self, module: torch.nn.Module):
        self.trainable_module = module


def test_saved_activations_peak_is_the_planned_activation_bytes():
    from nxdt.recipes.losses import causal_lm_loss

    run = resolve("llama3-tiny", "pretrain", SMALL)
    torch.manual_seed(0)
    model = run.spec.build_model(run.arch)
    ids = torch.randint(0, 1000, (2, 32))
    for _ in range(2):  # the second step sees only its own tensors: the first step's were released
        with _SavedActivations(_Model(model)) as saved:
            loss, _ = causal_lm_loss(model(ids), {"labels": ids})
            peak = saved.now
            loss.backward()
        assert saved.peak == peak and saved.now < peak / 100
    acts = activation_model(run.arch, 32, 1, False, 4, autocast=False)
    assert saved.peak == pytest.approx(64 * (2 * acts.layer + acts.first + acts.last), rel=0.01)


def test_phases_record_the_peak_since_the_last_mark():
    monitor = MemoryMonitor(torch.device("cpu"))
    big = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB touched
    monitor.mark("build")
    del big
    monitor.mark("train")
    assert monitor.phases["build"] >= 60 << 20
    assert monitor.peak >= monitor.phases["build"]
    assert monitor.step_metrics(is_distributed=False)["peak_memory_gib_per_rank"][0] >= 60 / 1024


@pytest.mark.slow
def test_a_run_records_peak_memory_per_rank(tmp_path: Path):
    tiny = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4", "model.num_kv_heads=2",
            "model.ffn_hidden_size=128", "data.seq_length=64", "data.global_batch_size=8", "data.micro_batch_size=4",
            "trainer.log_every_n_steps=1", "trainer.max_steps=2", "trainer.val_check_interval=0",
            "trainer.limit_val_batches=0", "exp_manager.create_checkpoint_callback=false",
            "exp_manager.create_tensorboard_logger=false"]
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NXDT_DEVICE": "cpu"}
    res = subprocess.run([sys.executable, "-m", "nxdt.cli.main", "run", "llama3-tiny", "--recipe", "pretrain", *tiny,
                          "--nproc-per-node", "2", f"exp_manager.explicit_log_dir={run_dir}"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert all(len(r["peak_memory_gib_per_rank"]) == 2 and r["peak_memory_gib"] > 0 for r in steps)
    per_rank = json.loads((run_dir / "result.json").read_text())["memory_per_rank"]
    assert len(per_rank) == 2
    for rank in per_rank:
        assert set(rank["phases_bytes"]) == {"build", "setup", "train"} and rank["peak_bytes"] > 0
        parts = rank["attributable_bytes"]
        # torch AdamW: two fp32 moments per fp32 gradient element (and a 4-byte step count per parameter)
        assert parts["parameters"] > 0 and 0 <= parts["optimizer_state"] - 2 * parts["gradients"] < 1024
        assert parts["activations"] > 0
