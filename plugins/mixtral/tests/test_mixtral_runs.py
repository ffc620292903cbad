"""`nxdt run` of Mixtral as a user runs it: mixtral-tiny pre-training and SFT on CPU (loss falls, the
auxiliary loss and expert load reach metrics.jsonl and TensorBoard), the NxDT anchor
hf_mixtral_8x7b_config.yaml for 10 steps with size and data overrides, and `nxdt inspect`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nxdt.data.embedded import embedded_paths

pytestmark = pytest.mark.slow

ANCHOR = Path(__file__).resolve().parents[3].parent / "shared" / "anchors" / "nxdt-configs" / "hf_mixtral_8x7b_config.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NXDT_DEVICE": "cpu"}
SHORT = ["data.seq_length=64", "data.global_batch_size=8", "data.micro_batch_size=8", "trainer.max_steps=24",
         "trainer.log_every_n_steps=1", "trainer.val_check_interval=0", "model.optim.sched.warmup_steps=2"]


def nxdt(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    """The real `nxdt` command in a fresh process."""
    res = subprocess.run([sys.executable, "-m", "nxdt.cli.main", *args], capture_output=True, text=True, env=ENV,
                         timeout=timeout)
    assert res.returncode == 0, f"{args}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def steps(run_dir: Path) -> list[dict]:
    """The training rows of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def tensorboard_tags(run_dir: Path) -> set[str]:
    """Scalar tags in a run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in (run_dir / "tensorboard").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


@pytest.mark.parametrize("recipe", ["pretrain", "sft"])
def test_mixtral_tiny_trains_and_logs_expert_load(recipe, tmp_path):
    run_dir = tmp_path / recipe
    nxdt("run", "mixtral-tiny", "--recipe", recipe, *SHORT, "model.moe.output_router_logits=true",
         f"exp_manager.explicit_log_dir={run_dir}")
    rows = steps(run_dir)
    losses = [r["loss"] for r in rows]
    print(f"mixtral-tiny {recipe}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, aux {rows[-1]['aux_loss']:.3f}")
    assert len(losses) == 24 and sum(losses[-4:]) / 4 < losses[0] - 0.5
    last = rows[-1]
    load = [last[f"moe/layer{layer}/expert{e}_tokens"] for layer in (0, 1) for e in range(4)]
    assert sum(load) == pytest.approx(2 * 8 * 64 * 2)  # 2 layers x 512 tokens x top-2, nothing dropped
    assert last["moe/layer0/dropped_fraction"] == 0.0 and last["aux_loss"] > 0
    assert {"aux_loss", "moe/layer1/expert3_tokens", "moe/layer0/dropped_fraction"} <= tensorboard_tags(run_dir)


def test_nxdt_anchor_mixtral_config_runs_10_steps(tmp_path):
    """The NxDT YAML, unchanged, with size, layout and data overrides (capacity 2.0, ZeRO-1, mixed precision,
    full recomputation, as it sets them)."""
    if not ANCHOR.is_file():
        pytest.skip(f"anchor config not found at {ANCHOR}")
    from nxdt.resolve import resolve
    from nxdt_mixtral.plugin import MIXTRAL_SPEC

    tiny = resolve("mixtral-tiny").arch
    (tmp_path / "config.json").write_text(json.dumps(MIXTRAL_SPEC.config_to_hf(tiny)))
    paths = embedded_paths()
    run_dir = tmp_path / "run"
    nxdt("run", str(ANCHOR), f"model.model_config={tmp_path / 'config.json'}", "model.encoder_seq_length=64",
         "data.seq_length=64", "model.num_layers=2", "model.hidden_size=64", "trainer.devices=1", "trainer.num_nodes=1",
         "distributed_strategy.tensor_model_parallel_size=1", "distributed_strategy.pipeline_model_parallel_size=1",
         "trainer.max_steps=10", "data.global_batch_size=4", "data.micro_batch_size=2",
         "model.optim.sched.warmup_steps=2", f"data.train_dir={paths['pretrain_jsonl']}",
         f"data.tokenizer.type={paths['tokenizer']}", f"exp_manager.explicit_log_dir={run_dir}")
    rows = steps(run_dir)
    assert len(rows) == 10 and all(r["loss"] == r["loss"] for r in rows)
    assert rows[-1]["moe/layer0/dropped_fraction"] >= 0.0 and rows[-1]["aux_loss"] > 0


def test_inspect_mixtral_8x7b_human_output():
    out = nxdt("inspect", "mixtral-8x7b", timeout=120).stdout
    assert "46,702,792,704" in out and "active per token: 12,879,925,248" in out
