"""DPO and ORPO under DP2xTP2 (+SP), PP2, ZeRO-1 and LoRA on four real gloo ranks match one process."""

from __future__ import annotations

import pytest
from dpo_driver import JOBS
from multirank import TOL, launch, tiny

from nxdt.data.embedded import embedded_paths

#: 4 steps of 8 pairs (2 per micro-batch) from 64 training pairs; 16 validation pairs
BASE = [*tiny(2, 4), "model.optim.lr=0.01", "data.dev_choose_samples=64", "trainer.limit_val_batches=2"]
#: the single-process run each job must match: (recipe, LoRA or not)
REFERENCE = {name: (recipe, "lora" in name) for name, (recipe, _) in JOBS.items()}
LORA = ["model_alignment_strategy.peft.lora_rank=4", "model_alignment_strategy.peft.lora_dropout=0"]


@pytest.fixture(scope="module")
def val_file(tmp_path_factory):
    """The first 16 embedded validation pairs (a short reference pass)."""
    path = tmp_path_factory.mktemp("val") / "val.jsonl"
    path.write_text("".join(embedded_paths()["preference_validation"].read_text().splitlines(True)[:16]))
    return path


@pytest.fixture(scope="module")
def distributed(tmp_path_factory, val_file) -> dict[str, dict]:
    """Every job's losses from one 4-rank launch."""
    return launch("dpo_driver.py", tmp_path_factory.mktemp("dpo"), [*BASE, f"data.val_dir={val_file}"])


@pytest.fixture(scope="module")
def references(tmp_path_factory, val_file) -> dict[tuple[str, bool], dict]:
    """One single-process run per recipe (precomputed and live DPO references give equal losses; a test says so)."""
    import torch

    from nxdt.parallel.world import World
    from nxdt.resolve import resolve
    from nxdt.train.trainer import Trainer

    out = {}
    for recipe, lora in set(REFERENCE.values()):
        run_dir = tmp_path_factory.mktemp("ref")
        torch.manual_seed(0)
        trainer = Trainer(resolve("llama3-tiny", recipe, [*BASE, f"data.val_dir={val_file}", *(LORA if lora else []),
                                                          f"exp_manager.explicit_log_dir={run_dir}"]),
                          World(0, 1, 0, torch.device("cpu"), None))
        result = trainer.fit()
        out[(recipe, lora)] = {"losses": result.losses, "val": trainer.validate()}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("job", list(JOBS))
def test_preference_parity(job, distributed, references):
    """Each layout's 4 training losses (and its validation loss and reward metrics) match one process within 1e-5."""
    ref, got = references[REFERENCE[job]], distributed[job]
    assert len(got["losses"]) == len(ref["losses"]) == 4
    diff = max(abs(a - b) for a, b in zip(got["losses"], ref["losses"]))
    # validation metrics relative to their size (summed log-probs are ~20 nats)
    val_diff = max(abs(got["val"][k] - ref["val"][k]) / max(1.0, abs(ref["val"][k])) for k in ref["val"])
    print(f"{job}: max loss difference {diff:.2e}, validation metrics (relative) {val_diff:.2e}")
    assert diff <= TOL and val_diff <= TOL, (job, diff, val_diff)
    assert set(got["val"]) == set(ref["val"]) and "val_rewards/accuracies" in got["val"]
    if "lora" in job:  # the reference is the adapters-disabled policy: no second model
        assert got["reference"] == "adapters" and not got["second_model"]
