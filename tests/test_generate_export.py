"""An export that generates like nxdt: the tokenizer files reproduce nxdt's special-token handling and
vocabulary for every model type; transformers' greedy `generate` on an exported checkpoint equals
`nxdt generate` token for token on 20 embedded prompts, stopping at EOS. (The fixed cost of an SFT
run is measured by bench/startup.py, not asserted here.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nxdt.data.embedded import load_task_rows

# One intra-op thread: on a shared machine, spinning OpenMP threads make small matmuls 10x slower
ENV = {**os.environ, "NXDT_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
MODEL_TYPES = ["llama", "qwen2", "gpt2", "mistral", "mixtral"]


def _tokenizers():
    from nxdt.data.tokenizer import load_tokenizer
    from nxdt_gpt.plugin import tiny_tokenizer_path

    return {"embedded": load_tokenizer("embedded"), "gpt2-tiny": load_tokenizer(tiny_tokenizer_path())}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_exported_tokenizer_is_nxdts_for_every_model_type(tmp_path, model_type):
    """transformers loads the written files into nxdt's tokenizer: same size, BOS added as nxdt adds it, same specials."""
    from transformers import AutoTokenizer

    from nxdt.checkpoint.hf_export import write_tokenizer
    from nxdt.data.sft import prompt_ids

    prompts = [row[0] for row in load_task_rows("test")[:5]] + ["<|eos|> inside", "héllo  wörld\n\ttabs"]
    for name, tok in _tokenizers().items():
        out = tmp_path / name
        out.mkdir()
        write_tokenizer(None, tok, out, 256)
        (out / "config.json").write_text(json.dumps({"model_type": model_type}))
        hf = AutoTokenizer.from_pretrained(out)
        assert len(hf) == tok.vocab_size, (name, model_type)  # Qwen2's class once added <|endoftext|>
        assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
        for prompt in prompts:
            assert hf(prompt)["input_ids"] == prompt_ids(tok, prompt), (name, model_type, prompt)


def _run(run_dir: Path, steps: int) -> None:
    """`nxdt run llama3-tiny --recipe sft` for ``steps`` steps, saving the last checkpoint."""
    res = subprocess.run([sys.executable, "-m", "nxdt.cli.main", "run", "llama3-tiny", "--recipe", "sft",
                          f"trainer.max_steps={steps}", f"exp_manager.explicit_log_dir={run_dir}",
                          "exp_manager.checkpoint_callback_params.save_last=true"],
                         capture_output=True, text=True, env=ENV, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Checkpoints of 0-, 1- and 20-step SFT runs of llama3-tiny (initial, barely and partly trained weights)."""
    root = tmp_path_factory.mktemp("sft")
    for name, steps in (("zero", 0), ("one", 1), ("twenty", 20)):
        _run(root / name, steps)
    return {"root": root}


def _checkpoint(run_dir: Path) -> Path:
    (name,) = [p for p in (run_dir / "checkpoints").iterdir() if p.is_dir()]
    return name


def _nxdt_generate(source: Path, prompts: list[str], new: int) -> list[list[int]]:
    args = [sys.executable, "-m", "nxdt.cli.main", "--json", "generate", str(source), "--max-new-tokens", str(new)]
    for prompt in prompts:
        args += ["--prompt", prompt]
    res = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return [r["tokens"] for r in json.loads(res.stdout)["results"]]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["zero", "one", "twenty"])
def test_transformers_generate_on_the_export_equals_nxdt_generate(runs, which, tmp_path):
    """20 embedded prompts: transformers' greedy generate on `nxdt export --to hf` gives nxdt's tokens, EOS included."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = _checkpoint(runs["root"] / which)
    out = tmp_path / "hf"
    subprocess.run([sys.executable, "-m", "nxdt.cli.main", "export", str(checkpoint), "--to", "hf", str(out)],
                   check=True, capture_output=True, env=ENV, timeout=600)
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 1, 2)
    assert generation["eos_token_id"] == 1
    prompts = [row[0] for row in load_task_rows("test")[:20]]
    ours = _nxdt_generate(out, prompts, 24)
    assert _nxdt_generate(checkpoint, prompts, 24) == ours  # the checkpoint itself decodes the same
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    stopped, full = 0, 0
    for prompt, row in zip(prompts, ours):
        enc = tok(prompt, return_tensors="pt")  # the user's call: BOS comes from the exported tokenizer
        with torch.no_grad():
            theirs = model.generate(**enc, max_new_tokens=24, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
        assert theirs == row, prompt
        stopped += bool(row) and row[-1] == tok.eos_token_id
        full += len(row) == 24 and row[-1] != tok.eos_token_id
    print(f"{which}: 20/20 prompts equal, {stopped} stopped at EOS, {full} ran to 24 tokens")
    if which == "zero":
        assert full >= 1
    if which == "twenty":
        assert stopped >= 1
