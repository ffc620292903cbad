"""Pipeline parallelism (1F1B, interleaved) alone and with TP+SP, DP, ZeRO-1 and tied embeddings:
loss and validation-loss parity against one process over real gloo ranks, plus the stage split.

One ``torchrun --nproc-per-node 4`` launch of tests/pipeline_driver.py trains every layout in
sequence; the single-process references run in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nxdt.errors import ConfigError

HERE = Path(__file__).parent
TOL = 1e-5
BASE = [
    "model.hidden_size=64", "model.num_layers=4", "model.num_attention_heads=4", "model.num_kv_heads=2",
    "model.ffn_hidden_size=128", "data.seq_length=32", "data.global_batch_size=8", "data.micro_batch_size=2",
    "trainer.max_steps=10", "model.optim.sched.warmup_steps=2", "trainer.val_check_interval=0",
    "trainer.limit_val_batches=2",
]
#: layout -> the single-process reference overrides it must match
PARITY = {
    "pp2_dp2": [],
    "pp2_vpp2_dp2": [],
    "pp2_tp2_sp": [],
    "pp2_dp2_zero1_clip": ["trainer.gradient_clip_val=0.5"],
    "pp2_dp2_tied": ["model.share_embeddings_and_output_weights=true"],
}


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory) -> list[str]:
    """The embedded SFT data named explicitly (which also skips the recipe's slow generation metric)."""
    from nxdt.data.embedded import embedded_paths

    paths = embedded_paths()
    if not paths["tokenizer"].exists():
        root = tmp_path_factory.mktemp("embedded")
        subprocess.run([sys.executable, "-m", "nxdt.data.embedded", "--out", str(root)], check=True, capture_output=True)
        paths = embedded_paths(root)
    return [
        f"data.tokenizer.type={paths['tokenizer']}",
        f"data.train_dir={paths['sft_train']}",
        f"data.val_dir={paths['sft_validation']}",
    ]


def _single(overrides: list[str], tmp: Path) -> tuple[list[float], list[float]]:
    from nxdt.parallel.world import World
    from nxdt.resolve import resolve
    from nxdt.train.trainer import Trainer

    torch.manual_seed(0)
    trainer = Trainer(resolve("llama3-tiny", "sft", [*overrides, f"exp_manager.explicit_log_dir={tmp}"]),
                      World(0, 1, 0, torch.device("cpu"), None))
    result = trainer.fit()
    return result.losses, list(result.val_losses.values())


@pytest.fixture(scope="module")
def distributed(tmp_path_factory, data_overrides) -> dict[str, dict]:
    """Every layout's losses from one 4-rank launch."""
    out = tmp_path_factory.mktemp("pipeline")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           str(HERE / "pipeline_driver.py"), str(out), "--", *BASE, *data_overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}


@pytest.fixture(scope="module")
def references(tmp_path_factory, data_overrides) -> dict[tuple[str, ...], tuple[list[float], list[float]]]:
    """Single-process runs, one per distinct reference config."""
    return {
        extra: _single([*BASE, *data_overrides, *extra], tmp_path_factory.mktemp("ref"))
        for extra in {tuple(v) for v in PARITY.values()}
    }


@pytest.mark.parametrize("layout", list(PARITY))
def test_loss_parity(layout, distributed, references):
    ref_losses, ref_val = references[tuple(PARITY[layout])]
    got = distributed[layout]
    assert len(got["losses"]) == len(ref_losses) == 10
    diff = max(abs(a - b) for a, b in zip(got["losses"], ref_losses))
    val_diff = abs(got["val_losses"][-1] - ref_val[-1])
    print(f"{layout}: max loss difference {diff:.2e}, validation loss difference {val_diff:.2e}")
    assert diff <= TOL, (layout, diff, got["losses"], ref_losses)
    assert val_diff <= TOL, (layout, got["val_losses"], ref_val)


def test_tied_embeddings_stay_identical_across_stages(distributed):
    # the first stage's embedding and the last stage's LM head, after 10 updates on different ranks
    assert distributed["pp2_dp2_tied"]["tie_diff"] == 0.0


# -- the stage split ----------------------------------------------------------------------------
def test_balanced_split_counts_embedding_and_head():
    from nxdt.parallel.pipeline import split_blocks

    blocks = [f"layers.{i}" for i in range(6)]
    assert [len(s) for s in split_blocks(blocks, 4)] == [1, 2, 2, 1]
    assert [len(s) for s in split_blocks(blocks[:4], 2)] == [2, 2]
    assert [len(s) for s in split_blocks(blocks[:4], 4)] == [1, 1, 1, 1]


def test_cuts_accept_hf_and_nxdt_names():
    from nxdt.parallel.pipeline import split_blocks

    blocks = [f"layers.{i}" for i in range(4)]
    assert split_blocks(blocks, 2, ["model.layers.0"]) == [["layers.0"], ["layers.1", "layers.2", "layers.3"]]
    assert split_blocks(blocks, 3, ["layers.1", "layers.2"]) == [["layers.0", "layers.1"], ["layers.2"], ["layers.3"]]


@pytest.mark.parametrize(
    ("n_stages", "cuts", "message"),
    [
        (8, None, r"4 layers cannot fill 8 stages"),
        (3, ["layers.1"], r"1 cuts make 2 stages, but the layout has 3"),
        (2, ["layers.3"], r"strictly increasing layers before the last"),
        (2, ["model.layers.9"], r"'model.layers.9' names no layer"),
    ],
)
def test_impossible_splits_explain_themselves(n_stages, cuts, message):
    from nxdt.parallel.pipeline import split_blocks

    with pytest.raises(ConfigError, match=message):
        split_blocks([f"layers.{i}" for i in range(4)], n_stages, cuts)


def test_stage_views_share_parameters_and_keep_names():
    from nxdt.parallel.pipeline import StagePlan, prune_to_rank, stage_views
    from nxdt_llama.model import LlamaConfig, build_model

    model = build_model(LlamaConfig(vocab_size=32, hidden_size=8, num_layers=4, num_attention_heads=2,
                                    num_kv_heads=1, ffn_hidden_size=16, tie_word_embeddings=True))
    layout = [["layers.0"], ["layers.1"], ["layers.2"], ["layers.3"]]
    # pipeline rank 0 of 2 with two virtual stages: stages 0 and 2
    plan = StagePlan(layout, [0, 2], "layers", ["tok_embeddings"], ["norm", "output"], [])
    prune_to_rank(model, plan)
    assert sorted(n for n, _ in model.named_parameters() if not n.startswith("layers.")) == ["tok_embeddings.weight"]
    first, third = stage_views(model, plan)
    assert list(first.layers) == ["0"] and list(third.layers) == ["2"] and third.tok_embeddings is None
    assert first.layers["0"] is model.layers["0"] and list(model.layers) == ["0", "2"]
    h = first(torch.tensor([[1, 2, 3]]))
    assert h.shape == (1, 3, 8)  # hidden states, passed on to the next stage


def test_single_stage_schedule_refuses_virtual_stages():
    from nxdt.parallel.pipeline import schedule_class

    with pytest.raises(ConfigError, match="runs one stage per rank"):
        schedule_class("1F1B", 2)
    with pytest.raises(ConfigError, match="pipeline_schedule"):
        schedule_class("NoSuchSchedule", 1)
