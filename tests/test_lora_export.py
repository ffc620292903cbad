"""LoRA out of nxdt, checked with the user's tools: an SFT run from an HF base with LoRA (fused q/k/v and
gate/up layouts), `nxdt export --to peft` loaded by `peft.PeftModel` on the transformers base, and
`nxdt export --to hf` (merged) loaded by transformers, all giving nxdt's logits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NXDT_DEVICE": "cpu"}
SHAPE = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4", "model.num_kv_heads=2",
         "model.ffn_hidden_size=128"]


def nxdt(*args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "nxdt.cli.main", *args], capture_output=True, text=True, env=ENV,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def write_hf_base(out: Path, preset: str, shape: list[str]) -> None:
    """``preset`` at ``shape`` as a transformers checkpoint directory (random weights, its tokenizer)."""
    from safetensors.torch import save_file

    from nxdt.data.embedded import embedded_paths
    from nxdt.recipes.data import tokenizer_source
    from nxdt.resolve import resolve
    from nxdt.testing import build_initialized

    run = resolve(preset, overrides=shape)
    model = build_initialized(run.spec, run.arch, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # not the init nxdt would draw itself
    out.mkdir(parents=True)
    hf = run.spec.state_dict_adapter(run.arch).to_hf(model.state_dict())
    save_file({k: v.contiguous() for k, v in hf.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(run.spec.config_to_hf(run.arch)))
    source = tokenizer_source(run.config)
    for f in Path(embedded_paths()["tokenizer"] if source == "embedded" else source).iterdir():
        shutil.copy2(f, out / f.name)


CASES = {
    # nxdt's fused wqkv/w13 -> HF's separate q/k/v and gate/up adapters sharing lora_A
    "llama_fused": ("llama3-tiny", SHAPE, ["model.fuse_qkv=true", "model.fuse_gate_up=true",
                                           "model_alignment_strategy.peft.target_modules=[qkv_proj,o_proj,gate_up_proj,down_proj]"],
                    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    # nxdt's separate q/k/v -> GPT-2's one c_attn (block-diagonal B, rank 3r); only the attention's c_proj
    "gpt2": ("gpt2-tiny", [], ["model_alignment_strategy.peft.target_modules=[qkv_proj,o_proj]"],
             {"c_attn", "transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"}),
    # the attention of a mixture-of-experts decoder (experts stay frozen)
    "mixtral": ("mixtral-tiny", [], ["model_alignment_strategy.peft.target_modules=[qkv_proj,o_proj]"],
                {"q_proj", "k_proj", "v_proj", "o_proj"}),
    # an encoder trained by masked-LM pre-training (BertForPreTraining's heads)
    "bert": ("bert-tiny", [], ["model_alignment_strategy.peft.target_modules=[qkv_proj]"], {"query", "key", "value"}),
}
#: the recipe each case trains with, and the transformers class its export loads as
RECIPES = {"bert": ("pretrain", "AutoModelForPreTraining")}


def _logits(out):
    """Causal LMs' ``logits``; BERT pre-training's masked-LM ``prediction_logits``."""
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.prediction_logits


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_peft_export_and_merged_export_match_nxdt(case, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    preset, shape, extra, targets = CASES[case]
    base = tmp_path / "base"
    write_hf_base(base, preset, shape)
    run_dir = tmp_path / "run"
    recipe, auto = RECIPES.get(case, ("sft", "AutoModelForCausalLM"))
    nxdt("run", preset, "--recipe", recipe, *shape, f"model.hf_checkpoint={base}", *extra,
         "trainer.max_steps=6", "data.global_batch_size=8", "data.micro_batch_size=4",
         "data.seq_length=64", "model.optim.lr=0.02", "trainer.limit_test_batches=0", "trainer.val_check_interval=0",
         "model_alignment_strategy.peft.lora_rank=4", "model_alignment_strategy.peft.lora_alpha=16",
         f"exp_manager.explicit_log_dir={run_dir}")
    listing = json.loads(nxdt("checkpoints", str(run_dir), "--json").stdout)["checkpoints"]
    checkpoint = run_dir / "checkpoints" / listing[-1]["name"]
    nxdt("export", str(checkpoint), "--to", "peft", str(tmp_path / "peft"))
    nxdt("export", str(checkpoint), "--to", "hf", str(tmp_path / "merged"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == targets

    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    auto_class = getattr(transformers, auto)
    hf_base = auto_class.from_pretrained(base, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        plain = _logits(hf_base(input_ids=ids))
    with_adapters = peft.PeftModel.from_pretrained(hf_base, tmp_path / "peft").eval()
    merged = auto_class.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32).eval()

    # nxdt's own LoRA model, rebuilt from the checkpoint (adapters not merged)
    from nxdt.checkpoint.hf_export import read_checkpoint
    from nxdt.peft.export import base_state_of
    from nxdt.peft.lora import LoRASettings, inject_lora, target_globs
    from nxdt.testing import build_initialized

    run, state, _ = read_checkpoint(str(checkpoint))
    ours = build_initialized(run.spec, run.arch)
    settings = LoRASettings.from_section(run.config.model_alignment_strategy.peft, ())
    inject_lora(ours, target_globs(run.spec, settings.targets), settings, seed=0)
    ours.load_state_dict({**base_state_of(run), **state}, strict=True)  # the base from the HF checkpoint if not saved
    ours.eval()
    with torch.no_grad():
        nxdt_logits = _logits(ours(ids))
        peft_logits = _logits(with_adapters(input_ids=ids))
        merged_logits = _logits(merged(input_ids=ids))
    assert (nxdt_logits - plain).abs().max() > 1e-3  # the adapters trained: not the base model
    assert (peft_logits - nxdt_logits).abs().max() <= 1e-5
    assert (merged_logits - nxdt_logits).abs().max() <= 1e-5
