"""bert-tiny under parallel layouts on real gloo ranks, against one process: loss and validation parity for
DP2 x TP2, PP2 (1F1B), TP2 + SP with the NSP head and interleaved PP; a TP2 + SP checkpoint resumed under
PP2 x DP2 with ZeRO-1 and activation checkpointing (resharding); a PP2 checkpoint resumed bitwise; mixed
precision with ZeRO-1; and `nxdt export --to hf` of a TP-sharded checkpoint, which transformers loads with
nxdt's logits.

One ``torchrun --nproc-per-node 4`` launch of bert_driver.py trains every 4-rank job in sequence; the
single-process references run in this process.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))

from bert_driver import FOUR_LAYERS, NSP, STEP5  # noqa: E402
from multirank import TOL, export_hf, launch  # noqa: E402

pytestmark = pytest.mark.slow

#: bert-tiny cut to a model the 2-core machine trains in a second (dropout off: layouts draw it differently)
BASE = [
    "model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
    "model.hidden_dropout=0.0", "model.attention_dropout=0.0", "data.seq_length=32", "data.global_batch_size=8",
    "data.micro_batch_size=2", "trainer.max_steps=10", "model.optim.sched.warmup_steps=2",
    "trainer.val_check_interval=0", "trainer.limit_val_batches=2",
]
#: 4-rank job -> the single-process reference overrides it must match
PARITY = {
    "dp2_tp2": (),
    "pp2_dp2": (),
    "dp2_tp2_sp_nsp": tuple(NSP),
    "pp2_vpp2_nsp": (*NSP, *FOUR_LAYERS),
}
VAL_METRICS = ("val_loss", "val_mlm_loss", "val_mlm_accuracy", "val_nsp_loss", "val_nsp_accuracy")


def _single(overrides: list[str], run_dir: Path):
    """A single-process trainer of bert-tiny's masked-LM pretrain recipe."""
    from nxdt.parallel.world import World
    from nxdt.resolve import resolve
    from nxdt.train.trainer import Trainer

    torch.manual_seed(0)
    run = resolve("bert-tiny", "pretrain", [*overrides, f"exp_manager.explicit_log_dir={run_dir}"])
    return Trainer(run, World(0, 1, 0, torch.device("cpu"), None))


def _last_validation(run_dir: str | Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in reversed(rows) if "val_loss" in r)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> dict[str, dict]:
    """Every 4-rank job's losses and run directory, from one launch."""
    return launch(str(Path(__file__).parent / "bert_driver.py"), tmp_path_factory.mktemp("bert"), BASE)


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[tuple[str, ...], dict]:
    """Single-process runs, one per distinct reference config: losses and last validation metrics."""
    refs = {}
    for extra in sorted(set(PARITY.values())):
        run_dir = tmp_path_factory.mktemp("ref")
        result = _single([*BASE, *extra], run_dir).fit()
        refs[extra] = {"losses": result.losses, "val": _last_validation(run_dir)}
    return refs


@pytest.mark.parametrize("job", list(PARITY))
def test_loss_and_validation_parity(job, jobs, references):
    """10 training losses and the validation loss/accuracies equal one process's (<= 1e-5; accuracy counts exactly)."""
    ref = references[PARITY[job]]
    got = jobs[job]
    assert len(got["losses"]) == len(ref["losses"]) == 10
    diff = max(abs(a - b) for a, b in zip(got["losses"], ref["losses"]))
    val, ref_val = _last_validation(got["run_dir"]), ref["val"]
    names = [m for m in VAL_METRICS if m in ref_val]
    val_diff = max(abs(val[m] - ref_val[m]) for m in names)
    print(f"{job}: max |loss diff| over 10 steps {diff:.2e}, max |validation diff| {val_diff:.2e} ({', '.join(names)})")
    assert diff <= TOL, (job, got["losses"], ref["losses"])
    assert val_diff <= TOL, (job, val, ref_val)
    assert ("val_nsp_accuracy" in names) == ("model.bert_binary_head=true" in PARITY[job])


def test_tp_sp_checkpoint_resumes_under_pp2_zero1_recompute(jobs, references):
    """Steps 6..10 after loading a DP2 x TP2 + SP step-5 checkpoint under PP2 x DP2 + ZeRO-1 + full activation
    checkpointing equal the uninterrupted run and one process."""
    resumed = jobs["pp2_zero1_recompute_resume"]["losses"]
    for name, ref in (("tp2 run", jobs["dp2_tp2_sp_nsp"]["losses"][5:]), ("one process", references[tuple(NSP)]["losses"][5:])):
        diff = max(abs(a - b) for a, b in zip(resumed, ref, strict=True))
        print(f"pp2 + zero1 + recompute resume vs {name}: max |loss diff| over steps 6..10 = {diff:.2e}")
        assert diff <= TOL


def test_pipeline_checkpoint_resumes_bitwise(jobs):
    """PP2 x DP2 resumed from its own step-5 checkpoint gives bitwise-equal losses for steps 6..10."""
    assert jobs["pp2_dp2_resume"]["losses"] == jobs["pp2_dp2"]["losses"][5:]


def test_mixed_precision_with_zero1_follows_fp32(jobs, references):
    """DP4 + ZeRO-1 in mixed precision (bf16 compute, fp32 master weights) trains like fp32 to within bf16 error."""
    mixed, fp32 = jobs["dp4_zero1_mixed"]["losses"], references[()]["losses"]
    gap = max(abs(a - b) for a, b in zip(mixed, fp32, strict=True))
    print(f"mixed precision vs fp32: max |loss diff| over 10 steps = {gap:.2e}")
    assert all(math.isfinite(x) for x in mixed) and mixed[-1] < mixed[0] - 0.4 and gap < 0.05


def test_export_of_tp_sharded_checkpoint_matches_transformers(jobs, tmp_path):
    """`nxdt export --to hf` of the DP2 x TP2 + SP checkpoint (NSP head): BertForPreTraining has nxdt's logits."""
    from transformers import AutoTokenizer, BertForPreTraining

    ckpt = Path(jobs["dp2_tp2_sp_nsp"]["run_dir"]) / STEP5
    export_hf(ckpt, tmp_path / "hf")
    hf = BertForPreTraining.from_pretrained(tmp_path / "hf").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    trainer = _single([*BASE, *NSP, f"exp_manager.resume_from_checkpoint={ckpt}", "trainer.max_steps=5"], tmp_path / "run")
    trainer.setup()
    trainer.checkpointer.maybe_resume()
    assert trainer.state.step == 5
    trainer.model.eval()
    inputs = tok(["the quick fox sees the old river.", "2 plus 2 is 4, and 4 minus 2 is 2."],
                 ["every morning the cat finds a stone.", "the letter after b is c."], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours, theirs = trainer.model(**inputs), hf(**inputs)
    real = inputs["attention_mask"].bool()
    diff = (ours.logits - theirs.prediction_logits)[real].abs().max().item()
    nsp_diff = (ours.next_sentence_logits - theirs.seq_relationship_logits).abs().max().item()
    print(f"export: max |logit diff| transformers vs nxdt: masked LM {diff:.2e}, NSP {nsp_diff:.2e}")
    assert diff <= TOL and nsp_diff <= TOL
