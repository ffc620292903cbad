"""``model.fusions.torch_compile``: blocks compiled in place after TP and activation checkpointing (names
unchanged), and a compiled run's losses equal the eager run's within 1e-5 at fp32 over 10 steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nxdt.parallel.activation_checkpoint import apply_activation_checkpointing
from nxdt.parallel.compile import compile_blocks
from nxdt.testing.conformance import build_initialized


def _tiny():
    from nxdt_llama.plugin import LLAMA_SPEC, LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_layers=3, num_attention_heads=4, num_kv_heads=2,
                      ffn_hidden_size=64, max_position_embeddings=32)
    return LLAMA_SPEC, cfg


def test_compiles_each_block_in_place_keeping_names():
    """Each held block (checkpoint-wrapped or not) is compiled where it is; state-dict names do not change."""
    spec, cfg = _tiny()
    model = build_initialized(spec, cfg)
    apply_activation_checkpointing(model, "full", None, spec.recompute_modules, spec.pipeline_blocks(cfg))
    del model.layers["2"]  # as a pipeline stage holding blocks 0 and 1
    names = list(model.state_dict())
    assert compile_blocks(model, spec.pipeline_blocks(cfg)) == 2
    assert list(model.state_dict()) == names
    assert all(block._compiled_call_impl is not None for block in model.layers.values())
    assert model._compiled_call_impl is None


def test_a_family_without_blocks_is_compiled_whole():
    """No declared blocks: the whole model is compiled."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert compile_blocks(model, []) == 1 and model._compiled_call_impl is not None


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_compiled_losses_equal_eager_within_1e_5(tmp_path):
    """10 fp32 steps of the same run, eager and compiled (inductor): every step's loss within 1e-5."""
    common = ["llama3-tiny", "--recipe", "pretrain", "model.hidden_size=64", "model.num_layers=2",
              "model.num_attention_heads=4", "model.num_kv_heads=2", "model.ffn_hidden_size=128",
              "data.seq_length=32", "data.global_batch_size=8", "data.micro_batch_size=4", "trainer.max_steps=10",
              "trainer.val_check_interval=0", "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1",
              "precision.type=fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, extra in (("eager", []), ("compiled", ["model.fusions.torch_compile=true"])):
        res = subprocess.run([sys.executable, "-m", "nxdt.cli.main", "run", *common, *extra,
                              f"exp_manager.explicit_log_dir={tmp_path / name}"],
                             capture_output=True, text=True, env=env, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 10
    worst = max(abs(a - b) for a, b in zip(eager, compiled))
    print(f"max |compiled - eager| loss over 10 steps: {worst:.3g}")
    assert worst <= 1e-5
