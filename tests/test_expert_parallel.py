"""Expert parallelism at loss parity with one process (real gloo ranks): EP2 x DP, TP2 (experts split
inside), EP2 x TP2 + SP, PP2 with EP2, ZeRO-1 with EP2, full recomputation; bf16 modes with EP2;
capacity-factor routing with the same drops under EP1 and EP2; gradient norms (clipping at 1.0 in
every run) counting each expert once; an EP2 checkpoint resumed bitwise under EP2 and at parity
under EP1, TP2 x EP2 and PP2 x EP2, loaded by one process whose logits equal those of transformers'
MixtralForCausalLM reading the checkpoint's HF export.

One ``torchrun --nproc-per-node 4`` launch of tests/expert_parallel_driver.py trains every layout;
the single-process runs happen in this process.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from expert_parallel_driver import STEP5
from multirank import TOL, export_hf, launch

pytestmark = pytest.mark.slow

BASE = [
    "data.seq_length=32", "data.global_batch_size=8", "data.micro_batch_size=2", "trainer.max_steps=10",
    "model.optim.sched.warmup_steps=2", "trainer.val_check_interval=0", "trainer.log_every_n_steps=1",
    "model.moe.output_router_logits=true", "exp_manager.log_gradient_norm=true", "trainer.gradient_clip_val=1.0",
]
#: layout -> what it must match: the single-process run ("single") or another layout
PARITY = ["dp4_ep2", "dp2_tp2", "dp2_ep2_tp2_sp", "pp2_dp2_ep2", "dp4_ep2_zero1_clip", "dp4_ep2_full_recompute"]


def single(overrides: list[str], run_dir: Path):
    """A single-process Trainer of mixtral-tiny's sft recipe."""
    from nxdt.parallel.world import World
    from nxdt.resolve import resolve
    from nxdt.train.trainer import Trainer

    torch.manual_seed(0)
    resolved = resolve("mixtral-tiny", "sft", [*overrides, f"exp_manager.explicit_log_dir={run_dir}"])
    return Trainer(resolved, World(0, 1, 0, torch.device("cpu"), None))


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, data_overrides) -> dict[str, dict]:
    """Every 4-rank job's results, from one launch."""
    return launch("expert_parallel_driver.py", tmp_path_factory.mktemp("ep"), [*BASE, *data_overrides])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_overrides) -> dict:
    """The single-process run every dropless layout must match: losses, gradient norms, trained experts."""
    import json

    run_dir = tmp_path_factory.mktemp("single")
    trainer = single([*BASE, *data_overrides], run_dir)
    losses = trainer.fit().losses
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    norms = [r["grad_norm"] for r in rows if "loss" in r]
    w1 = float(trainer.model.full_state_dict()["layers.1.feed_forward.experts.w1"].norm())
    return {"losses": losses, "grad_norms": norms, "w1_norm": w1}


def _max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("layout", PARITY)
def test_loss_parity_with_one_process(layout, jobs, reference):
    got = jobs[layout]
    loss_diff = _max_diff(got["losses"], reference["losses"])
    norm_diff = _max_diff(got["grad_norms"], reference["grad_norms"])
    print(f"{layout}: max |loss diff| {loss_diff:.2e}, max |grad norm diff| {norm_diff:.2e} over 10 steps")
    assert len(got["losses"]) == 10 and loss_diff <= TOL, (got["losses"], reference["losses"])
    # every expert's gradient counted once in the clipped norm, whichever rank holds it
    assert norm_diff <= TOL * max(reference["grad_norms"]) and min(reference["grad_norms"]) > 1.0  # clipping was on
    assert abs(got["w1_norm"] - reference["w1_norm"]) <= TOL


def test_aux_loss_and_expert_load_logged(jobs, reference):
    last = jobs["dp4_ep2"]["last"]
    assert math.isfinite(last["aux_loss"]) and last["aux_loss"] >= 1.0  # E * sum f_e P_e >= top_k-ish
    for layer in (0, 1):
        tokens = [last[f"moe/layer{layer}/expert{e}_tokens"] for e in range(4)]
        # 2 rows x 32 tokens per micro-batch, two choices each, none dropped
        assert sum(tokens) == pytest.approx(2 * 32 * 2) and last[f"moe/layer{layer}/dropped_fraction"] == 0.0


def test_capacity_drops_are_the_same_under_ep1_and_ep2(jobs):
    ep1, ep2 = jobs["cap_dp4_ep1"], jobs["cap_dp4_ep2"]
    diff = _max_diff(ep1["losses"], ep2["losses"])
    dropped = [ep1["last"][f"moe/layer{i}/dropped_fraction"] for i in (0, 1)]
    print(f"capacity_factor=1: EP1 vs EP2 max |loss diff| {diff:.2e}; dropped fractions {dropped}")
    assert diff <= TOL and max(dropped) > 0.0
    assert dropped == [ep2["last"][f"moe/layer{i}/dropped_fraction"] for i in (0, 1)]


@pytest.mark.parametrize("layout", ["dp4_ep2_mixed", "dp4_ep2_bf16sr"])
def test_bf16_modes_with_experts_follow_fp32(layout, jobs, reference):
    losses = jobs[layout]["losses"]
    diff = _max_diff(losses, reference["losses"])
    print(f"{layout}: max |loss diff| to fp32 {diff:.2e}")
    assert all(math.isfinite(x) for x in losses) and diff < 0.05


def test_ep2_checkpoint_resumes_bitwise_and_under_other_layouts(jobs):
    """Steps 6..10 from the EP2 step-5 checkpoint: bitwise under EP2, at parity under EP1, TP2 x EP2 + SP, PP2 x EP2."""
    assert jobs["resume_dp4_ep2"]["losses"] == jobs["dp4_ep2"]["losses"][5:]
    for name, got in [("to_dp4_ep1", jobs["resume_dp4_ep1"]["losses"]),
                      ("to_dp2_ep2_tp2_sp", jobs["resume_dp2_ep2_tp2"]["losses"]),
                      ("to_pp2_dp2_ep2", jobs["resume_pp2_ep2"]["losses"])]:
        diff = _max_diff(got, jobs["dp4_ep2"]["losses"][5:])
        print(f"EP2 checkpoint {name}: max |loss diff| over steps 6..10 = {diff:.2e}")
        assert diff <= TOL


def test_ep2_checkpoint_holds_experts_one_by_one_and_exports_to_transformers(jobs, tmp_path, data_overrides):
    from torch.distributed.checkpoint import FileSystemReader
    from transformers import MixtralForCausalLM

    ckpt = Path(jobs["dp4_ep2"]["run_dir"]) / STEP5
    keys = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    assert {f"model.layers.0.feed_forward.experts.{e}.w1" for e in range(4)} <= set(keys)
    assert "model.layers.0.feed_forward.experts.w1" not in keys
    export_hf(ckpt, tmp_path / "hf")
    hf = MixtralForCausalLM.from_pretrained(tmp_path / "hf").eval()
    trainer = single([*BASE, *data_overrides, f"exp_manager.resume_from_checkpoint={ckpt}", "trainer.max_steps=5"],
                     tmp_path / "run")
    trainer.setup()
    trainer.checkpointer.maybe_resume()
    trainer.model.eval()
    ids = torch.randint(0, hf.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(ids).logits - trainer.model(ids)).abs().max().item()
    print(f"export of the EP2 checkpoint: max |logit diff| transformers vs nxdt = {diff:.2e}")
    assert diff <= TOL
