"""gpt2-tiny (tied embeddings, learned positions, biases) on real gloo ranks against one process:
DP2 x TP2 + SP (selective recompute), PP2 x DP2 1F1B (full recompute) and interleaved, PP2 x DP2 +
ZeRO-1; its checkpoint resumed bitwise and resharded onto DP2 x TP2 + SP; `nxdt export` of the
pipeline checkpoint loaded by transformers with nxdt's logits.

One ``torchrun --nproc-per-node 4`` launch of gpt_driver.py trains every job in sequence; the
single-process reference runs in this process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2] / "tests"))  # the shared multi-rank harness

from gpt_driver import STEP4  # noqa: E402
from multirank import TOL, export_hf, launch  # noqa: E402

pytestmark = pytest.mark.slow

PARITY_JOBS = ("dp2_tp2_sp", "pp2_dp2", "pp2_vpp2_dp2", "pp2_dp2_zero1")


def base_overrides() -> list[str]:
    """gpt2-tiny at 4 layers (two per stage, or one per virtual stage) on the embedded SFT files, 10 steps."""
    from nxdt.data.embedded import embedded_paths

    paths = embedded_paths()
    return [
        "model.num_layers=4", "model.ffn_hidden_size=128", "data.seq_length=32", "data.global_batch_size=8",
        "data.micro_batch_size=2", "trainer.max_steps=10", "model.optim.sched.warmup_steps=2",
        "trainer.val_check_interval=0", f"data.train_dir={paths['sft_train']}", f"data.val_dir={paths['sft_validation']}",
    ]


def single_trainer(overrides: list[str], run_dir: Path):
    """A one-process Trainer of gpt2-tiny's sft recipe."""
    from nxdt.parallel.world import World
    from nxdt.resolve import resolve
    from nxdt.train.trainer import Trainer

    torch.manual_seed(0)
    run = resolve("gpt2-tiny", "sft", [*base_overrides(), *overrides, f"exp_manager.explicit_log_dir={run_dir}"])
    return Trainer(run, World(0, 1, 0, torch.device("cpu"), None))


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> dict[str, dict]:
    """Every job's losses from one 4-rank launch."""
    return launch(str(HERE / "gpt_driver.py"), tmp_path_factory.mktemp("gpt_parallel"), base_overrides())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[float]:
    """The 10 losses of one process."""
    return single_trainer([], tmp_path_factory.mktemp("gpt_ref")).fit().losses


@pytest.mark.parametrize("job", PARITY_JOBS)
def test_loss_parity_with_one_process(job, jobs, reference):
    """Each layout's 10 losses equal the single-process ones within 1e-5; the tied embedding stays one matrix."""
    got = jobs[job]["losses"]
    assert len(got) == len(reference) == 10
    diff = max(abs(a - b) for a, b in zip(got, reference))
    print(f"{job}: max |loss diff| over 10 steps = {diff:.2e}")
    assert diff <= TOL, (job, got, reference)
    assert jobs[job]["tie_diff"] == 0.0
    assert sum(got[-3:]) / 3 < got[0]  # it trains


def test_resume_is_bitwise_and_reshards(jobs, reference):
    """The step-4 PP2 x DP2 + ZeRO-1 checkpoint continues bitwise in its layout and within 1e-5 as DP2 x TP2 + SP."""
    assert jobs["resume_pp2_dp2_zero1"]["losses"] == jobs["pp2_dp2_zero1"]["losses"][4:]
    resharded = jobs["resume_as_dp2_tp2_sp"]["losses"]
    diff = max(abs(a - b) for a, b in zip(resharded, reference[4:], strict=True))
    print(f"PP2 x DP2 + ZeRO-1 -> DP2 x TP2 + SP: max |loss diff| over steps 5..10 = {diff:.2e}")
    assert diff <= TOL


def test_export_of_pipeline_checkpoint_loads_in_transformers(jobs, tmp_path):
    """`nxdt export` of the PP2 checkpoint (tied weights on two stages) is a GPT2LMHeadModel with nxdt's logits."""
    from transformers import GPT2LMHeadModel

    ckpt = Path(jobs["pp2_dp2_zero1"]["run_dir"]) / STEP4
    export_hf(ckpt, tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    trainer = single_trainer([f"exp_manager.resume_from_checkpoint={ckpt}", "trainer.max_steps=4"], tmp_path / "run")
    trainer.setup()
    trainer.checkpointer.maybe_resume()
    assert trainer.state.step == 4
    model = trainer.model
    model.eval()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)).abs().max().item()
    print(f"export: max |logit diff| transformers vs nxdt = {diff:.2e}")
    assert diff <= TOL
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied in transformers too
