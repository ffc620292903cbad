"""The gpt family as a user runs it, in real processes: `nxdt run gpt2-tiny --recipe sft` then
`nxdt export --to hf` loaded by transformers; megatron_gpt_config.yaml with only data and size
overrides; the one-line refusal to export a shape transformers has no architecture for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nxdt_gpt.plugin import tiny_tokenizer_path

pytestmark = pytest.mark.slow

ANCHOR = Path(__file__).resolve().parents[4] / "shared" / "anchors" / "nxdt-configs" / "megatron_gpt_config.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NXDT_DEVICE": "cpu"}


def nxdt(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The `nxdt` command line in a fresh process."""
    res = subprocess.run([sys.executable, "-m", "nxdt.cli.main", *args], capture_output=True, text=True, env=ENV, timeout=400)
    if check:
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def losses(run_dir: Path) -> list[float]:
    """The training losses a run logged to metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def nxdt_model_at(checkpoint: Path, run_dir: Path):
    """A one-process gpt2-tiny model holding ``checkpoint``'s weights, loaded the way a resume loads them."""
    from nxdt.parallel.world import World
    from nxdt.resolve import resolve
    from nxdt.train.trainer import Trainer

    step = int(checkpoint.name.split("step=")[1].split("-")[0])
    run = resolve("gpt2-tiny", "sft", [f"exp_manager.resume_from_checkpoint={checkpoint}", f"trainer.max_steps={step}",
                                       f"exp_manager.explicit_log_dir={run_dir}"])
    trainer = Trainer(run, World(0, 1, 0, torch.device("cpu"), None))
    trainer.setup()
    trainer.checkpointer.maybe_resume()
    assert trainer.state.step == step
    trainer.model.eval()
    return trainer.model


def test_sft_run_then_export_loads_in_transformers_with_equal_logits(tmp_path):
    """gpt2-tiny's sft recipe on CPU (its own tokenizer, the embedded task): loss falls; the export is a GPT-2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = tmp_path / "run"
    # The preset trains 250 steps (about a minute on two cores); 60 show the loss falling.
    nxdt("run", "gpt2-tiny", "--recipe", "sft", "trainer.max_steps=60", "trainer.val_check_interval=30",
         f"exp_manager.explicit_log_dir={run_dir}")
    got = losses(run_dir)
    print(f"sft losses: first {got[0]:.3f}, last {got[-1]:.3f}")
    assert got[-1] < 0.6 * got[0]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["val_losses"]["60"] < result["val_losses"]["30"]

    (checkpoint,) = (run_dir / "checkpoints").iterdir()
    nxdt("export", str(checkpoint), "--to", "hf", str(tmp_path / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    shipped = AutoTokenizer.from_pretrained(tiny_tokenizer_path())
    text = "reverse: XKQ ="
    # The exported tokenizer prepends BOS as nxdt's data path does; the shipped GPT-2 files do not.
    ids = torch.tensor([tokenizer.encode(text)])
    assert ids[0].tolist() == [tokenizer.bos_token_id, *shipped.encode(text)]
    model = nxdt_model_at(checkpoint, tmp_path / "load")
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)).abs().max().item()
    print(f"export: max |logit diff| transformers vs nxdt = {diff:.2e}")
    assert diff <= 1e-5


def test_megatron_anchor_runs_with_only_data_and_size_overrides(tmp_path):
    """megatron_gpt_config.yaml as shipped (TP, SP, ZeRO-1, mixed precision, selective recompute, dropout, GPT-2 BPE)
    trains 10 steps on a Megatron .bin/.idx corpus; the overrides are data paths and sizes only."""
    if not ANCHOR.is_file():
        pytest.skip(f"anchor config not found at {ANCHOR}")
    from nxdt.data.embedded import embedded_paths

    tokenizer = tiny_tokenizer_path()
    prefix = tmp_path / "corpus"
    nxdt("data", "preprocess", str(embedded_paths()["pretrain_jsonl"]), "--tokenizer", str(tokenizer),
         "--output-prefix", str(prefix))
    data = [f"data.data_prefix=[1.0,{prefix}]", f"data.tokenizer.vocab_file={tokenizer / 'vocab.json'}",
            f"data.tokenizer.merge_file={tokenizer / 'merges.txt'}", f"exp_manager.explicit_log_dir={tmp_path / 'run'}"]
    sizes = ["trainer.devices=2", "distributed_strategy.tensor_model_parallel_size=2", "model.num_layers=2",
             "model.hidden_size=64", "model.ffn_hidden_size=256", "model.num_attention_heads=4", "model.num_kv_heads=4",
             "model.encoder_seq_length=64", "model.vocab_size=512", "data.global_batch_size=8", "trainer.max_steps=10"]
    res = nxdt("run", str(ANCHOR), *data, *sizes)
    banner = " ".join(res.stdout.split())
    assert "(gpt), recipe=pretrain" in banner and "tp=2" in banner, banner[:300]
    got = losses(tmp_path / "run")
    assert len(got) == 10 and all(0 < x < 10 for x in got), got
    config = (tmp_path / "run" / "config.yaml").read_text()
    for kept in ("sequence_parallel: true", "zero1: true", "type: mixed_precision", "name: adamw_fp32OptState"):
        assert kept in config, kept


def test_export_of_a_shape_without_transformers_form_is_one_line(tmp_path):
    """A Megatron GPT with layernorm, rope, swiglu and biases trains, but `nxdt export --to hf` refuses in one line, writing nothing."""
    from nxdt.data.embedded import embedded_paths
    from nxdt.parallel.world import World
    from nxdt.resolve import resolve
    from nxdt.train.trainer import Trainer

    run_dir = tmp_path / "run"
    overrides = ["model.position_embedding_type=rope", "model.activation=swiglu", "trainer.max_steps=2",
                 "trainer.val_check_interval=0", f"data.train_dir={embedded_paths()['pretrain_txt']}",
                 f"exp_manager.explicit_log_dir={run_dir}"]
    Trainer(resolve("gpt2-tiny", "pretrain", overrides), World(0, 1, 0, torch.device("cpu"), None)).fit()
    (checkpoint,) = (run_dir / "checkpoints").iterdir()
    res = nxdt("export", str(checkpoint), "--to", "hf", str(tmp_path / "hf"), check=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1 and "has no transformers architecture" in res.stderr, res.stderr
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("precision", ["autocast", "bf16SR"])
def test_precision_modes_train(precision, tmp_path):
    """gpt2-tiny trains under the bf16 precision modes (fp32 parity and mixed_precision are covered above)."""
    from nxdt.data.embedded import embedded_paths
    from nxdt.parallel.world import World
    from nxdt.resolve import resolve
    from nxdt.train.trainer import Trainer

    paths = embedded_paths()
    overrides = [f"precision.type={precision}", "trainer.max_steps=20", "trainer.val_check_interval=0",
                 "data.seq_length=32", "data.micro_batch_size=8", "data.global_batch_size=8",
                 f"data.train_dir={paths['sft_train']}", f"data.val_dir={paths['sft_validation']}",
                 "exp_manager.create_checkpoint_callback=false", f"exp_manager.explicit_log_dir={tmp_path}"]
    torch.manual_seed(0)
    got = Trainer(resolve("gpt2-tiny", "sft", overrides), World(0, 1, 0, torch.device("cpu"), None)).fit().losses
    print(f"{precision}: loss {got[0]:.3f} -> {got[-1]:.3f}")
    assert all(0 < x < 10 for x in got) and sum(got[-5:]) / 5 < got[0] - 1.0, got
