"""Checkpoints across parallel layouts (real gloo ranks): a DP2 x TP2 + ZeRO-1 checkpoint continues
under DP4 + ZeRO-1, TP4 (KV heads replicated x2, torch AdamW) and one process with the same losses;
mixed precision (fp32 master weights) resumes bitwise; `nxdt export` of a KV-replicated checkpoint
writes each KV head once and transformers reproduces nxdt's logits.

One ``torchrun --nproc-per-node 4`` launch of tests/checkpoint_driver.py runs the 4-rank jobs in
sequence; the single-process loads run in this process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoint_driver import STEP4
from multirank import TOL, export_hf, launch, single_trainer, tiny

BASE = tiny(2, 8)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, data_overrides) -> dict[str, dict]:
    """Every 4-rank job's losses and run directory, from one launch."""
    return launch("checkpoint_driver.py", tmp_path_factory.mktemp("layouts"), [*BASE, *data_overrides])


def test_reshard_dp2_tp2_zero1_to_other_layouts(jobs, tmp_path, data_overrides):
    """Steps 5..8 after loading the step-4 checkpoint under DP4, TP4 and one process match the uninterrupted run."""
    ref = jobs["ref"]["losses"][4:]
    ckpt = Path(jobs["ref"]["run_dir"]) / STEP4
    single = single_trainer([*BASE, *data_overrides, f"exp_manager.resume_from_checkpoint={ckpt}"], tmp_path).fit().losses
    for name, got in [("to_dp4_zero1", jobs["to_dp4_zero1"]["losses"]), ("to_tp4_kv2", jobs["to_tp4_kv2"]["losses"]),
                      ("one_process", single)]:
        diffs = [abs(a - b) for a, b in zip(got, ref, strict=True)]
        print(f"{name}: max |loss diff| over steps 5..8 = {max(diffs):.2e}")
        assert max(diffs) <= TOL, (name, got, ref)


def test_mixed_precision_resume_is_bitwise(jobs):
    """DP2 x TP2 + ZeRO-1 with fp32 master weights resumes from step 4 with bitwise-equal losses."""
    print(f"mixed_precision resume: {jobs['mixed_resume']['losses']} vs {jobs['mixed_ref']['losses'][4:]}")
    assert jobs["mixed_resume"]["losses"] == jobs["mixed_ref"]["losses"][4:]


def test_export_kv_replicated_checkpoint_matches_transformers(jobs, tmp_path, data_overrides):
    """`nxdt export` of a DP2 x TP2 (1 KV head, replicated x2) checkpoint: each KV head once, logits match."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    ckpt = Path(jobs["kv1"]["run_dir"]) / STEP4
    export_hf(ckpt, tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    head_dim = 64 // 4
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (head_dim, 64)
    assert weights["model.layers.0.self_attn.v_proj.weight"].shape == (head_dim, 64)

    one_kv = [*BASE, *data_overrides, "model.num_kv_heads=1", f"exp_manager.resume_from_checkpoint={ckpt}"]
    # The KV heads went back to one copy each: one process continues the run with the same losses.
    continued = single_trainer(one_kv, tmp_path / "continued").fit().losses
    diff = max(abs(a - b) for a, b in zip(continued, jobs["kv1"]["losses"][4:], strict=True))
    print(f"kv1 -> one process: max |loss diff| over steps 5..8 = {diff:.2e}")
    assert diff <= TOL

    trainer = single_trainer([*one_kv, "trainer.max_steps=4"], tmp_path / "run")
    trainer.setup()
    trainer.checkpointer.maybe_resume()
    assert trainer.state.step == 4
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    trainer.model.eval()
    ids = torch.randint(0, hf.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(ids).logits - trainer.model(ids)).abs().max().item()
    print(f"export: max |logit diff| transformers vs nxdt = {diff:.2e}")
    assert diff <= TOL
