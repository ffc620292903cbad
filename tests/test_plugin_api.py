"""Plugin API v2 as a third party meets it: the docs' Qwen2 plugin pip-installed (not editable) and
trained by the engine's own recipes under TP=2 and PP=2, a plugin API 1 family that keeps working
unchanged, a shard-plan override that takes effect in training, and a plugin that needs a newer API.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from plugin_packages import write_plugin

ROOT = Path(__file__).resolve().parents[1]
NXDT = [sys.executable, "-m", "nxdt.cli.main"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NXDT_DEVICE": "cpu"}
PIP = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]


def nxdt(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process (new entry points are seen)."""
    return subprocess.run([*NXDT, *args], capture_output=True, text=True, env={**ENV, **(env or {})}, timeout=timeout)


def docs_files(root: Path) -> list[Path]:
    """Write every ``<!-- file: PATH -->`` code block of docs/plugins.md under ``root``."""
    text = (ROOT / "docs" / "plugins.md").read_text()
    written = []
    for path, body in re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", text, flags=re.S):
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(body)
        written.append(target)
    return written


V1_FAMILY = '''
    """An API 1 plugin: its own tiny model, ModelSpec keywords of API 1, an API 1 loss and a families= recipe."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from nxdt import hookimpl
    from nxdt.specs import LossSpec, ModelSpec, PresetSpec, RecipeSpec, ShardPlan

    NXDT_PLUGIN_API = 1


    class ToyConfig:
        def __init__(self, vocab_size=512, hidden_size=32):
            self.vocab_size, self.hidden_size = vocab_size, hidden_size


    class Toy(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.out = nn.Linear(cfg.hidden_size, cfg.vocab_size)

        def forward(self, input_ids, position_ids=None):
            return self.out(torch.tanh(self.embed(input_ids)))


    def init(model, cfg):
        for p in model.parameters():
            nn.init.normal_(p, std=0.02)


    def loss(logits, batch):
        labels = batch["labels"]
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                reduction="sum")
        return total, (labels != -100).sum()


    SPEC = ModelSpec(
        family="toy", config_class=ToyConfig, build_model=Toy, init_weights=init,
        config_from_nxdt=lambda section, base=None: ToyConfig(section.get("vocab_size", 512)),
        config_from_hf=lambda d: ToyConfig(), config_to_hf=lambda c: {}, shard_plan=lambda c, p: ShardPlan(rules={}),
        state_dict_adapter=lambda c: None, flops_per_token=lambda c, s: 6.0 * c.vocab_size * c.hidden_size,
        task="causal_lm",
    )


    @hookimpl
    def nxdt_register_models(register):
        register(SPEC)


    @hookimpl
    def nxdt_register_presets(register):
        register(PresetSpec(name="toy-v1", family="toy", plugin="toyv1", style="hf", hf_model_id="",
                            architecture={"vocab_size": 512}, seq_length=32))


    @hookimpl
    def nxdt_register_losses(register):
        register(LossSpec("toy_loss", lambda run_config, model_spec: loss))


    @hookimpl
    def nxdt_register_recipes(register):
        register(RecipeSpec(name="toy-sft", description="sft with the toy loss", defaults={}, dataset="sft",
                            loss="toy_loss", families=("toy",)))
'''

NEWER_API = '''
    from nxdt import hookimpl
    from nxdt.specs import PresetSpec

    NXDT_PLUGIN_API = 3

    @hookimpl
    def nxdt_register_presets(register):
        register(PresetSpec(name="future-mini", family="future", plugin="future", style="hf", hf_model_id="",
                            architecture={}))
'''

TUNED_PLAN = '''
    """Replaces the qwen2 plan: attention sharded, the MLP replicated; leaves a marker that training used it."""
    import os

    from nxdt import hookimpl
    from nxdt.specs import ShardPlan


    @hookimpl
    def nxdt_shard_plan(spec, config, parallel):
        if spec.family != "qwen2" or not os.environ.get("TUNED_PLAN_MARKER"):
            return None
        plan = spec.shard_plan(config, parallel)
        rules = {k: v for k, v in plan.rules.items() if "feed_forward" not in k}
        import inspect

        # Who asked: the training path (nxdt.parallel.apply._shard) or a planner / pre-flight check.
        caller = "apply" if any(frame.function == "_shard" for frame in inspect.stack()) else "other"
        with open(os.environ["TUNED_PLAN_MARKER"], "a") as f:
            f.write(f"{caller} rank={os.environ.get('RANK', '-')} tp={parallel.tp}\\n")
        return ShardPlan(rules=rules, sequence_parallel=plan.sequence_parallel, kv_projections=plan.kv_projections,
                         notes="tuned")
'''


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The docs' Qwen2 plugin and three throwaway plugins, pip-installed (not editable) into this env."""
    root = tmp_path_factory.mktemp("thirdparty")
    written = docs_files(root)
    assert {p.name for p in written} == {"pyproject.toml", "__init__.py", "plugin.py"}
    pkgs = [root / "nxdt-qwen2",
            write_plugin(root, "nxdt-toyv1", "nxdt_toyv1", "toyv1", V1_FAMILY),
            write_plugin(root, "nxdt-future", "nxdt_future", "future", NEWER_API),
            write_plugin(root, "nxdt-tunedplan", "nxdt_tunedplan", "tunedplan", TUNED_PLAN)]
    subprocess.run([*PIP, *map(str, pkgs)], check=True, capture_output=True, timeout=300)
    importlib.invalidate_caches()
    yield root
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "nxdt-qwen2", "nxdt-toyv1", "nxdt-future",
                    "nxdt-tunedplan"], check=False, capture_output=True)


@pytest.mark.slow
def test_docs_qwen2_plugin_matches_transformers_and_is_small(installed):
    """The worked example is about 50 lines, installed as a wheel, and equals Qwen2ForCausalLM."""
    from nxdt.testing import run_conformance

    module = importlib.import_module("nxdt_qwen2.plugin")
    assert "site-packages" in module.__file__  # the installed copy, not this checkout
    code = [line for line in Path(module.__file__).read_text().splitlines() if line.strip()]
    assert len(code) <= 70, len(code)
    cfg = module.Qwen2Config(vocab_size=96, hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                             ffn_hidden_size=128, max_position_embeddings=128)
    results = run_conformance(module.QWEN2_SPEC, cfg)
    assert results["hf_max_abs_diff"] <= 1e-5
    assert module.QWEN2_SPEC.build_model(cfg).layers["0"].attention.wq.bias is not None
    assert module.QWEN2_SPEC.build_model(cfg).layers["0"].attention.wo.bias is None
    listing = nxdt("inspect", "qwen2-0.5b", "--json")
    assert listing.returncode == 0, listing.stderr
    assert json.loads(listing.stdout)["parameters"] == 494_032_768  # transformers' count
    refused = nxdt("run", "qwen2-tiny", "--dry-run", "model.normalization=layernorm")
    assert refused.returncode == 2 and "the qwen2 family supports only rmsnorm" in refused.stderr


@pytest.mark.slow
def test_docs_qwen2_plugin_trains_with_engine_recipes_under_tp_and_pp(installed, tmp_path):
    """`nxdt run qwen2-tiny` with the engine's sft (TP=2) and pretrain (PP=2) recipes; loss falls.

    The tuned-plan plugin's nxdt_shard_plan override is installed too: the TP run must use it.
    """
    marker = tmp_path / "marker.txt"
    sft = nxdt("run", "qwen2-tiny", "--recipe", "sft", "--nproc-per-node", "2",
               "distributed_strategy.tensor_model_parallel_size=2",
               "trainer.max_steps=12", f"exp_manager.explicit_log_dir={tmp_path / 'sft'}", "trainer.limit_test_batches=0",
               env={"TUNED_PLAN_MARKER": str(marker)})
    assert sft.returncode == 0, sft.stdout[-2000:] + sft.stderr[-3000:]
    applied = sorted(line for line in marker.read_text().splitlines() if line.startswith("apply"))
    assert applied == ["apply rank=0 tp=2", "apply rank=1 tp=2"]  # each TP rank's training path used the override
    pre = nxdt("run", "qwen2-tiny", "--recipe", "pretrain", "--nproc-per-node", "2",
               "distributed_strategy.pipeline_model_parallel_size=2", "trainer.max_steps=12",
               f"exp_manager.explicit_log_dir={tmp_path / 'pre'}")
    assert pre.returncode == 0, pre.stdout[-2000:] + pre.stderr[-3000:]
    for run in ("sft", "pre"):
        losses = [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                  if '"loss"' in line]
        assert len(losses) == 12 and losses[-1] < losses[0] - 0.3, (run, losses)


@pytest.mark.slow
def test_plugin_api_1_family_keeps_working(installed, tmp_path):
    """An API 1 plugin (API 1 ModelSpec keywords, a (sum, count) loss, a families= recipe) trains unchanged."""
    res = nxdt("run", "toy-v1", "--recipe", "toy-sft", "trainer.max_steps=4", "data.global_batch_size=4",
               "data.micro_batch_size=2", f"exp_manager.explicit_log_dir={tmp_path}", "trainer.val_check_interval=0",
               "trainer.log_every_n_steps=1")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert len([line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]) == 4
    # The engine's task-based recipes train it too (it declares task="causal_lm").
    assert nxdt("run", "toy-v1", "--recipe", "pretrain", "--dry-run").returncode == 0
    # An API 1 recipe restricted to its family refuses others with one line.
    other = nxdt("run", "llama3-tiny", "--recipe", "toy-sft", "--dry-run")
    assert other.returncode == 1 and "recipes for llama" in other.stderr


@pytest.mark.slow
def test_plugin_needing_a_newer_api_fails_with_one_line(installed):
    plugins = {r["name"]: r for r in json.loads(nxdt("plugins", "--json").stdout)}
    error = plugins["future"]["error"]
    assert "needs plugin API 3" in error and "provides plugin API 2" in error
    assert plugins["qwen2"]["error"] is None and plugins["toyv1"]["error"] is None
    run = nxdt("run", "future-mini", "--dry-run")
    assert run.returncode != 0 and len(run.stderr.strip().splitlines()) == 1
    assert "future-mini" in run.stderr and "needs plugin API 3" in run.stderr
