"""Pipeline parallelism (1F1B, interleaved) alone and with TP+SP, DP, ZeRO-1 and tied embeddings:
loss and validation-loss parity against one process over real gloo ranks, plus the stage split.

One ``torchrun --nproc-per-node 4`` launch of tests/pipeline_driver.py trains every layout in
sequence; the single-process references run in this process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from multirank import TOL, launch, single_trainer, tiny

from nxdt.errors import ConfigError

BASE = tiny(4, 10, "trainer.limit_val_batches=2")
#: layout -> the single-process reference overrides it must match
PARITY = {
    "pp2_dp2": [],
    "pp2_vpp2_dp2": [],
    "pp2_tp2_sp": [],
    "pp2_dp2_zero1_clip": ["trainer.gradient_clip_val=0.5"],
    "pp2_dp2_tied": ["model.share_embeddings_and_output_weights=true"],
}


def _single(overrides: list[str], tmp: Path) -> tuple[list[float], list[float]]:
    result = single_trainer(overrides, tmp).fit()
    return result.losses, list(result.val_losses.values())


@pytest.fixture(scope="module")
def distributed(tmp_path_factory, data_overrides) -> dict[str, dict]:
    """Every layout's losses from one 4-rank launch."""
    return launch("pipeline_driver.py", tmp_path_factory.mktemp("pipeline"), [*BASE, *data_overrides])


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
    from nxdt.parallel.stage_split import split_blocks

    blocks = [f"layers.{i}" for i in range(6)]
    assert [len(s) for s in split_blocks(blocks, 4)] == [1, 2, 2, 1]
    assert [len(s) for s in split_blocks(blocks[:4], 2)] == [2, 2]
    assert [len(s) for s in split_blocks(blocks[:4], 4)] == [1, 1, 1, 1]


def test_cuts_accept_hf_and_nxdt_names():
    from nxdt.parallel.stage_split import split_blocks

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
    from nxdt.parallel.stage_split import split_blocks

    with pytest.raises(ConfigError, match=message):
        split_blocks([f"layers.{i}" for i in range(4)], n_stages, cuts)


def test_stage_views_share_parameters_and_keep_names():
    from nxdt.modeling import build_transformer as build_model
    from nxdt.parallel.pipeline import StagePlan, prune_to_rank, stage_views
    from nxdt_llama.plugin import LlamaConfig

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
