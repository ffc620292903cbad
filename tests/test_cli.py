"""The `nxdt` command line as a user runs it: list, inspect, config validate, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nxdt.cli.main import main

ANCHORS = Path(__file__).resolve().parents[1].parent / "shared" / "anchors" / "nxdt-configs"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "preset, parameters",
    [
        ("llama3-8b", 8_030_261_248),
        ("llama3-70b", 70_553_706_496),
        ("llama3.1-405b", 405_853_388_800),
        ("llama2-7b", 6_738_415_616),
        ("llama2-70b", 68_976_648_192),
    ],
)
def test_inspect_exact_parameter_counts(capsys, preset, parameters):
    code, out, _ = run_cli(capsys, "inspect", preset, "--json")
    assert code == 0
    info = json.loads(out)
    assert info["parameters"] == parameters
    assert info["flops_per_token"] > 6 * parameters * 0.9
    assert info["shard_plan"]["layers.*.attention.wq"] == "colwise"
    assert set(info["recipes"]) >= {"pretrain", "sft"}


def test_inspect_overrides_architecture(capsys):
    code, out, _ = run_cli(capsys, "inspect", "llama3-8b", "model.num_layers=4", "model.num_kv_heads=1", "model.hidden_size=128", "--json")
    assert code == 0
    arch = json.loads(out)["architecture"]
    assert (arch["num_layers"], arch["num_kv_heads"], arch["hidden_size"]) == (4, 1, 128)


def test_inspect_human_output(capsys):
    code, out, _ = run_cli(capsys, "inspect", "llama3-tiny")
    assert code == 0 and "parameters:" in out and "shard plan" in out


def test_list_shows_all_four_families(capsys):
    code, out, _ = run_cli(capsys, "list", "--json")
    assert code == 0
    rows = json.loads(out)
    assert {r["family"] for r in rows} >= {"llama", "gpt", "mixtral", "bert"}
    names = {r["name"] for r in rows}
    required = {
        "llama2-7b", "llama2-13b", "llama2-70b", "llama3-8b", "llama3-70b", "llama3.1-8b", "llama3.1-70b",
        "llama3.1-405b", "mistral-7b", "mixtral-8x7b", "mixtral-8x22b", "gpt2", "gpt2-medium", "gpt2-large",
        "gpt2-xl", "bert-base", "bert-large", "llama3-tiny", "gpt2-tiny", "mixtral-tiny", "bert-tiny",
    }
    assert required <= names
    tiny = next(r for r in rows if r["name"] == "llama3-tiny")
    assert tiny["parameters"] and tiny["parameters"] < 2_000_000


def test_unknown_preset_is_one_line_with_suggestions(capsys):
    code, out, err = run_cli(capsys, "inspect", "llama3-8bb")
    assert code != 0
    assert err.count("\n") == 1 and "llama3-8b" in err and "Traceback" not in err


def test_config_validate_anchor_and_misspelled_key(capsys):
    if not ANCHORS.is_dir():
        pytest.skip(f"anchor configs not found at {ANCHORS}")
    cfg = str(ANCHORS / "hf_llama3_8B_config.yaml")
    code, out, _ = run_cli(capsys, "config", "validate", cfg)
    assert code == 0 and "tensor_model_parallel_size: 32" in out and "compiler_flags" in out
    code, _, err = run_cli(capsys, "config", "validate", cfg, "distributed_strategy.tensor_model_paralel_size=2")
    assert code == 2
    assert "distributed_strategy.tensor_model_paralel_size" in err and "tensor_model_parallel_size" in err
    assert err.count("\n") == 1


def test_cli_error_has_no_traceback_in_a_real_process(tmp_path):
    """The console script itself: a missing file is one line, exit 2, no traceback."""
    missing = tmp_path / "nope.yaml"
    res = subprocess.run(
        [sys.executable, "-m", "nxdt.cli.main", "config", "validate", str(missing)],
        capture_output=True, text=True, env={**os.environ}, timeout=120,
    )
    assert res.returncode == 2
    assert str(missing) in res.stderr and "Traceback" not in res.stderr


def test_from_pretrained_reads_a_transformers_checkpoint(tmp_path):
    import torch
    import transformers

    import nxdt

    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    model = nxdt.from_pretrained(str(tmp_path))
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-5
