"""Loss parity of TP, SP, KV replication, DP x TP and ZeRO-1 against one process (real gloo ranks),
plus precision (stochastic rounding) and activation checkpointing.

One ``torchrun --nproc-per-node 4`` launch of tests/parallel_driver.py trains every layout in
sequence; the single-process references run in this process.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from multirank import TOL, launch, single_trainer, tiny

from nxdt.errors import ConfigError

BASE = tiny(2, 10)
#: layout -> the single-process reference overrides it must match
PARITY = {
    "dp2_tp2": [],
    "dp2_tp2_sp": [],
    "tp4_kv2": [],
    "dp2_tp2_kv1": ["model.num_kv_heads=1"],
    "dp4_zero1": [],
    "dp2_tp2_zero1_clip": ["trainer.gradient_clip_val=0.5"],
}
BF16_LAYOUTS = ("dp4_zero1_mixed", "dp2_tp2_bf16sr")


def _single(overrides: list[str], tmp: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    trainer = single_trainer(overrides, tmp)
    result = trainer.fit()
    return result.losses, trainer.model.full_state_dict()


@pytest.fixture(scope="module")
def distributed(tmp_path_factory, data_overrides) -> dict[str, dict]:
    """Every layout's losses from one 4-rank launch."""
    return launch("parallel_driver.py", tmp_path_factory.mktemp("parallel"), [*BASE, *data_overrides])


@pytest.fixture(scope="module")
def references(tmp_path_factory, data_overrides) -> dict[tuple[str, ...], tuple[list[float], dict]]:
    """Single-process runs, one per distinct reference config."""
    refs = {}
    for extra in {tuple(v) for v in PARITY.values()}:
        refs[extra] = _single([*BASE, *data_overrides, *extra], tmp_path_factory.mktemp("ref"))
    return refs


@pytest.mark.parametrize("layout", list(PARITY))
def test_loss_parity(layout, distributed, references):
    ref_losses, ref_state = references[tuple(PARITY[layout])]
    got = distributed[layout]
    assert len(got["losses"]) == len(ref_losses) == 10
    diff = max(abs(a - b) for a, b in zip(got["losses"], ref_losses))
    print(f"{layout}: max loss difference {diff:.2e}")
    assert diff <= TOL, (layout, diff, got["losses"], ref_losses)
    # the trained K projection, reassembled with each KV head once, equals the single-process one
    assert abs(got["wk_norm"] - float(ref_state["layers.0.attention.wk.weight"].norm())) <= TOL


@pytest.mark.parametrize("layout", BF16_LAYOUTS)
def test_bf16_modes_train_without_divergence(layout, distributed):
    losses = distributed[layout]["losses"]
    assert len(losses) == 50 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses


# -- precision ----------------------------------------------------------------------------------
def test_stochastic_rounding_is_unbiased():
    from nxdt.parallel.precision import stochastic_round_bf16

    gen = torch.Generator().manual_seed(0)
    # values strictly between bf16 neighbours, both signs
    x = torch.tensor([1.0 + 2**-9, -3.0 - 2**-8 / 3, 1e-3 * (1 + 2**-10)], dtype=torch.float32)
    samples = torch.stack([stochastic_round_bf16(x, gen).float() for _ in range(20000)])
    spacing = torch.tensor([2**-7, 2**-6, 1e-3 * 2**-7])
    # standard error of the mean is at most spacing / (2 sqrt(n)); allow 5 of them
    assert torch.all((samples.mean(0) - x).abs() <= 5 * spacing / (2 * math.sqrt(20000)))
    assert len(samples[:, 0].unique()) == 2  # it really rounds both ways


def test_stochastic_rounding_keeps_tiny_updates():
    from nxdt.parallel.precision import stochastic_round_bf16

    gen = torch.Generator().manual_seed(0)
    nearest = torch.ones(1000, dtype=torch.bfloat16)
    stochastic = torch.ones(1000, dtype=torch.bfloat16)
    for _ in range(200):  # 200 updates of 1e-4, each far below bf16's spacing of 2^-7 at 1.0
        nearest = (nearest.float() + 1e-4).to(torch.bfloat16)
        stochastic = stochastic_round_bf16(stochastic.float() + 1e-4, gen)
    assert torch.all(nearest == 1.0)  # round-to-nearest stalls
    assert abs(stochastic.float().mean().item() - 1.02) < 0.003


# -- activation checkpointing -------------------------------------------------------------------
def test_activation_checkpointing_gives_identical_losses(tmp_path, data_overrides):
    base = [*BASE, *data_overrides, "trainer.max_steps=4"]
    plain, _ = _single(base, tmp_path / "plain")
    full, _ = _single([*base, "model.activations_checkpoint_granularity=full"], tmp_path / "full")
    selective, _ = _single(
        [*base, "model.activations_checkpoint_granularity=selective", "model.activations_checkpoint_recompute=[CoreAttention]"],
        tmp_path / "selective",
    )
    assert plain == full == selective


def test_unknown_recompute_module_lists_valid_ones():
    from nxdt.parallel.activation_checkpoint import apply_activation_checkpointing

    with pytest.raises(ConfigError, match="CoreAttention"):
        apply_activation_checkpointing(torch.nn.Linear(2, 2), "selective", ["Attn"], {"CoreAttention": torch.nn.Module}, [])


def test_kv_replication_sizes_that_cannot_work():
    from nxdt.parallel.kv_replication import kv_replication_factor, unreplicate_kv

    assert kv_replication_factor(2, 4, 4) == 2 and kv_replication_factor(1, 4, 2) == 2 and kv_replication_factor(4, 8, 2) == 1
    with pytest.raises(ConfigError, match=r"kv_replicator \(1\) = 3 KV heads must be a multiple of tensor_model_parallel_size \(2\)"):
        kv_replication_factor(3, 6, 2)
    w = torch.arange(12.0).view(6, 2)  # 3 KV heads x head_dim 2 rows, hidden 2
    rep = w.unflatten(0, (3, -1)).repeat_interleave(2, dim=0).flatten(0, 1)
    assert torch.equal(unreplicate_kv(rep, 3, 2), w)
