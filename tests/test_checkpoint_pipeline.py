"""Checkpoints under pipeline parallelism (real gloo ranks): a PP2 x DP2 + ZeRO-1 checkpoint resumes
under PP2 x DP2 bitwise (also with one DP rank reading), under PP4 (torch AdamW) and in one process
with the uninterrupted run's losses; a tied embedding is saved once and loads into both end stages;
`nxdt export` of a PP checkpoint gives transformers the logits nxdt computes.

One ``torchrun --nproc-per-node 4`` launch of tests/checkpoint_driver.py runs the pipeline jobs in
sequence; the single-process loads run in this process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from checkpoint_driver import PIPELINE_JOBS, STEP4, TIED
from multirank import TOL, export_hf, launch, single_trainer, tiny

BASE = tiny(4, 8)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, data_overrides) -> dict[str, dict]:
    """Every pipeline job's losses, run directory and resume reads, from one launch."""
    return launch("checkpoint_driver.py", tmp_path_factory.mktemp("pipeline_ckpt"), [*BASE, *data_overrides], PIPELINE_JOBS)


def _saved_keys(ckpt: Path) -> set[str]:
    return set(dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)


def _max_diff(got: list[float], want: list[float]) -> float:
    return max(abs(a - b) for a, b in zip(got, want, strict=True))


def test_pp2_checkpoint_resumes_under_pp2_pp4_and_one_process(jobs, tmp_path, data_overrides):
    """Steps 5..8 after the PP2 x DP2 + ZeRO-1 step-4 checkpoint: bitwise under PP2, within 1e-5 under PP4 and one process."""
    ref = jobs["pp2_ref"]["losses"][4:]
    ckpt = Path(jobs["pp2_ref"]["run_dir"]) / STEP4
    # Each stage wrote its own layers; together they are the whole model, each tensor once.
    keys = _saved_keys(ckpt)
    assert {f"model.layers.{i}.attention.wq.weight" for i in range(4)} <= keys
    assert {"model.tok_embeddings.weight", "model.output.weight", "optim.state.output.weight.exp_avg"} <= keys
    assert jobs["pp2_resume"]["losses"] == ref
    assert jobs["pp2_one_dp_rank"]["losses"] == ref
    # With load_from_one_dp_rank the second DP rank of each stage reads only the small per-rank parts.
    full, one = jobs["pp2_resume"]["bytes_read"], jobs["pp2_one_dp_rank"]["bytes_read"]
    print(f"bytes read per rank: every rank {full}; one DP rank per stage {one}")
    assert sum(one) < 0.6 * sum(full)

    single = single_trainer([*BASE, *data_overrides, f"exp_manager.resume_from_checkpoint={ckpt}"], tmp_path).fit().losses
    for name, got in [("pp4", jobs["pp4_resume"]["losses"]), ("one_process", single)]:
        diff = _max_diff(got, ref)
        print(f"pp2 x dp2 + zero1 -> {name}: max |loss diff| over steps 5..8 = {diff:.2e}")
        assert diff <= TOL, (name, got, ref)


def test_tied_embedding_saved_once_and_loaded_into_both_stages(jobs, tmp_path, data_overrides):
    """A tied PP2 checkpoint keys the LM head as the embedding, once; PP2 and one process resume with the same losses."""
    ref = jobs["pp2_tied_ref"]["losses"][4:]
    ckpt = Path(jobs["pp2_tied_ref"]["run_dir"]) / STEP4
    keys = _saved_keys(ckpt)
    assert "model.tok_embeddings.weight" in keys and "optim.state.tok_embeddings.weight.exp_avg" in keys
    assert not any("output.weight" in k for k in keys)
    assert jobs["pp2_tied_resume"]["losses"] == ref
    assert jobs["pp2_tied_resume"]["tie_diff"] == 0.0 and jobs["pp2_tied_ref"]["tie_diff"] == 0.0
    single = single_trainer([*BASE, *TIED, *data_overrides, f"exp_manager.resume_from_checkpoint={ckpt}"], tmp_path).fit()
    diff = _max_diff(single.losses, ref)
    print(f"tied pp2 x dp2 -> one process: max |loss diff| over steps 5..8 = {diff:.2e}")
    assert diff <= TOL


def test_export_pipeline_checkpoint_matches_transformers(jobs, tmp_path, data_overrides):
    """`nxdt export` of the PP2 x DP2 checkpoint holds every layer; transformers' logits equal nxdt's."""
    from transformers import LlamaForCausalLM

    ckpt = Path(jobs["pp2_ref"]["run_dir"]) / STEP4
    export_hf(ckpt, tmp_path / "hf")

    trainer = single_trainer([*BASE, *data_overrides, "trainer.max_steps=4", f"exp_manager.resume_from_checkpoint={ckpt}"],
                       tmp_path / "run")
    trainer.setup()
    trainer.checkpointer.maybe_resume()
    assert trainer.state.step == 4
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.num_hidden_layers == 4
    trainer.model.eval()
    ids = torch.randint(0, hf.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(ids).logits - trainer.model(ids)).abs().max().item()
    print(f"export of pp2 x dp2: max |logit diff| transformers vs nxdt = {diff:.2e}")
    assert diff <= TOL
