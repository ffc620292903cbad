"""`nxdt run --dry-run` runs every check the run would, without spawning a worker: each failure is one
line and exit 2. `nxdt run` makes the layout checks before launching, and `config validate` makes the
layout and name checks when the file's model resolves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nxdt.cli import run_command
from nxdt.cli.main import main

GIB = 1 << 30


@pytest.fixture(autouse=True)
def no_workers(monkeypatch):
    """Fail the test if anything would start training (torchrun workers or the in-process worker)."""
    import nxdt.cli.worker

    def refuse(*args, **kwargs):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(run_command, "launch_torchrun", refuse)
    monkeypatch.setattr(nxdt.cli.worker, "train", refuse)


def _one_line(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nxdt: error: "), err
    return err


@pytest.fixture(scope="module")
def bad_rows(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(["{not json"] * 5 + ['{"input": 3}'] * 5) + "\n")
    return path


CASES = [
    (["--nproc-per-node", "3", "distributed_strategy.tensor_model_parallel_size=3"],
     "num_attention_heads 4 is not divisible by tp=3"),
    (["--nproc-per-node", "4", "distributed_strategy.tensor_model_parallel_size=4",
      "distributed_strategy.kv_replicator=3"], "kv_replicator 3 = 6 KV heads"),
    (["--nproc-per-node", "8", "distributed_strategy.pipeline_model_parallel_size=8"],
     "4 layers cannot fill 8 stages"),
    (["--nproc-per-node", "2", "distributed_strategy.pipeline_model_parallel_size=2",
      "distributed_strategy.pipeline_schedule=Nope"], "distributed_strategy.pipeline_schedule"),
    (["data.seq_length=512"], "exceeds the model's max_position_embeddings (256)"),
    (["data.train_dir=/nonexistent/train.jsonl"], "data path not found: /nonexistent/train.jsonl"),
    (["data.tokenizer.type=/nonexistent/tokenizer"], "tokenizer not found"),
    (["model.optim.sched.name=Bogus"], "unknown schedule 'Bogus'"),
    (["model.optim.name=sgd"], "unsupported optimizer 'sgd'"),
    (["model.activations_checkpoint_granularity=selective", "model.activations_checkpoint_recompute=[Foo]"],
     "is not a recomputable module"),
    (["exp_manager.checkpoint_callback_params.filename=../{step}"], "filename"),
]


@pytest.mark.parametrize("overrides, expected", CASES, ids=[c[1][:30] for c in CASES])
def test_each_failure_is_one_line_exit_2_without_workers(capsys, overrides, expected):
    """A dry run of a run that would fail: the run's own error, one line, exit 2, no worker."""
    err = _one_line(capsys, "run", "llama3-tiny", "--recipe", "sft", "--dry-run", *overrides)
    assert expected in err


def test_malformed_data_rows_fail_the_dry_run(capsys, bad_rows):
    """Data files are parsed as the run parses them: rows that are not input/output records fail it."""
    err = _one_line(capsys, "run", "llama3-tiny", "--recipe", "sft", "--dry-run", f"data.train_dir={bad_rows}")
    assert str(bad_rows) in err


def test_expert_parallel_split_is_checked(capsys):
    """EP must divide the experts (4 experts over EP=3 fails before any worker)."""
    err = _one_line(capsys, "run", "mixtral-tiny", "--dry-run", "--nproc-per-node", "3",
                    "distributed_strategy.expert_model_parallel_size=3", "data.micro_batch_size=1",
                    "data.global_batch_size=3")
    assert "num_experts 4 is not divisible by expert_model_parallel_size=3" in err


def test_real_run_checks_the_layout_before_launching(capsys):
    """Without --dry-run too, TP=3 with 4 heads fails in the launcher, before 3 workers start."""
    err = _one_line(capsys, "run", "llama3-tiny", "--nproc-per-node", "3", "distributed_strategy.tensor_model_parallel_size=3")
    assert "not divisible by tp=3" in err


def test_a_model_too_big_names_a_layout_that_fits(capsys, monkeypatch):
    """The README's llama3-8b example on a small machine: the fit check's line ends naming a layout that would fit."""
    import nxdt.train.fit_check

    monkeypatch.setattr(nxdt.train.fit_check, "available_bytes", lambda device: 8 * GIB)
    err = _one_line(capsys, "run", "llama3-8b", "--recipe", "sft", "--dry-run", "--nproc-per-node", "2")
    assert "the model will not fit" in err
    assert "each of the 2 CPU ranks on this machine has 8.0 GiB" in err  # the per-rank share, named as one
    assert "it would fit as TP" in err and "--nproc-per-node" in err
    err = _one_line(capsys, "run", "llama3-8b", "--recipe", "sft")  # the preset's TP=2 on one process
    assert "world size 1 is not divisible" in err and "--nproc-per-node 2" in err and "it would fit as TP" in err


def test_a_passing_dry_run_prints_the_plan(capsys):
    """Everything checks out: exit 0 and the run summary."""
    assert main(["--json", "run", "llama3-tiny", "--recipe", "sft", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["layout"]["tp"] == 1 and plan["recipe"] == "sft"


def test_config_validate_checks_the_layout_against_the_model(capsys, tmp_path):
    """`config validate` refuses a split the model cannot take; a model file elsewhere is a note, not an error."""
    from nxdt.resolve import resolve

    preset = resolve("llama3-tiny")
    (tmp_path / "config.json").write_text(json.dumps(preset.spec.config_to_hf(preset.arch)))
    yaml = tmp_path / "run.yaml"
    yaml.write_text(f"name: hf_llama\nmodel:\n  model_config: {tmp_path / 'config.json'}\ndata:\n  seq_length: 128\n"
                    "trainer:\n  devices: 3\ndistributed_strategy:\n  tensor_model_parallel_size: 3\n")
    err = _one_line(capsys, "config", "validate", str(yaml))
    assert "num_attention_heads 4 is not divisible by tp=3" in err
    assert main(["config", "validate", str(yaml), "model.model_config=/elsewhere/config.json"]) == 0
    assert "# layout not checked against the model: model.model_config /elsewhere/config.json" in capsys.readouterr().out
