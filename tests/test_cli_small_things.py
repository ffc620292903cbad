"""Small things users hit: --json/--debug before the sub-command; `nxdt checkpoints` on a missing
directory; a failed run leaves no run directory; console.log in the run directory; lines not
wrapped when piped; license metadata in the current format; what the README says the main job prints."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from nxdt.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NXDT_DEVICE": "cpu"}
TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4", "model.num_kv_heads=2",
        "model.ffn_hidden_size=128", "data.seq_length=64", "data.global_batch_size=8", "data.micro_batch_size=4",
        "trainer.val_check_interval=0", "trainer.limit_test_batches=1"]


def test_json_and_debug_work_before_the_subcommand(capsys):
    """`nxdt --json list` prints JSON; `nxdt --debug ...` raises the error instead of one line."""
    assert main(["--json", "list", "--family", "llama"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["family"] for r in rows} == {"llama"}
    assert main(["list", "--family", "llama", "--json"]) == 0  # after it still works
    json.loads(capsys.readouterr().out)
    from nxdt.errors import NxdtError

    with pytest.raises(NxdtError):
        main(["--debug", "checkpoints", "/nonexistent/run"])
    os.environ.pop("NXDT_DEBUG", None)  # --debug sets it for the process


def test_checkpoints_on_a_missing_directory_fails(capsys):
    """A missing run directory is an error (exit 1, one line), not an empty listing."""
    assert main(["checkpoints", "/nonexistent/run"]) == 1
    err = capsys.readouterr().err
    assert err == "nxdt: error: /nonexistent/run does not exist (a run directory or checkpoint root is expected)\n"


def test_a_failed_run_leaves_no_run_directory(tmp_path, capsys):
    """A run failing before its first step removes the directories it created (exp_dir/name/version)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n" * 10)
    exp = tmp_path / "exp"
    assert main(["run", "llama3-tiny", *TINY, f"data.train_dir={bad}", f"exp_manager.exp_dir={exp}"]) == 1
    assert "rows are bad" in capsys.readouterr().err
    assert not exp.exists()
    (exp / "other").mkdir(parents=True)  # a directory that was there before is left alone
    assert main(["run", "llama3-tiny", *TINY, f"data.train_dir={bad}", f"exp_manager.exp_dir={exp}"]) == 1
    capsys.readouterr()
    assert sorted(p.name for p in exp.iterdir()) == ["other"]


def test_console_log_and_unwrapped_lines_when_piped(tmp_path):
    """A real run piped to a file: long lines stay whole, and console.log holds the same lines, task metrics included."""
    run_dir = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "nxdt.cli.main", "run", "llama3-tiny", "--recipe", "sft", *TINY,
                          "trainer.max_steps=2", f"exp_manager.explicit_log_dir={run_dir}"],
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    start = next(line for line in res.stdout.splitlines() if line.startswith("nxdt: llama3-tiny (llama)"))
    assert len(start) > 80 and start.endswith(f"run_dir={run_dir}")  # one line, not cut at 80 columns
    log = (run_dir / "console.log").read_text()
    assert start in log.splitlines() and "task metrics: task/exact_match=" in log and "\x1b[" not in log
    # what the README's quick start shows the main job printing
    readme = (ROOT / "README.md").read_text()
    for prefix in ("nxdt: llama3-tiny (llama), recipe=sft, world=1", "data: ", "step 250/250 loss=",
                   "task metrics: task/exact_match="):
        assert prefix in readme
    assert re.search(r"takes about \d+", readme)


def test_license_metadata_is_an_spdx_expression():
    """PEP 639: ``license`` is an SPDX string (the table form is deprecated) and no License classifier repeats it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert not [c for c in project.get("classifiers", []) if c.startswith("License ::")]


@pytest.mark.slow
def test_building_the_wheel_warns_nothing(tmp_path):
    """`pip wheel .` (what an install builds) emits no setuptools deprecation or other warning."""
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    output = res.stdout + res.stderr
    assert "Deprecat" not in output and "Warning" not in output, output[-3000:]
