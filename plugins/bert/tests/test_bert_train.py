"""`nxdt run bert-tiny --recipe pretrain` as a user runs it: the masked-LM loss falls and masked-token accuracy
rises far above chance on the embedded corpus, and `nxdt export --to hf` of its final checkpoint loads in
transformers (model and tokenizer) with nxdt's logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))

from multirank import TOL, export_hf  # noqa: E402

pytestmark = pytest.mark.slow


def test_bert_tiny_pretrain_run_learns_and_exports(tmp_path):
    """The preset's own defaults (500 steps of 32 samples); then the exported BertForMaskedLM matches nxdt."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from nxdt.parallel.world import World
    from nxdt.resolve import resolve
    from nxdt.train.trainer import Trainer

    run_dir = tmp_path / "run"
    env = {**os.environ, "NXDT_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}  # one core: the machine is shared
    res = subprocess.run([sys.executable, "-m", "nxdt.cli.main", "run", "bert-tiny", "--recipe", "pretrain",
                          f"exp_manager.explicit_log_dir={run_dir}"], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"], r["val_mlm_accuracy"]) for r in rows if "val_loss" in r]
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; validation (step, loss, masked-token accuracy): {val}")
    assert rows[-1]["step"] == 500 and losses[-1] < losses[0] - 2.0
    assert [v[1] for v in val] == sorted((v[1] for v in val), reverse=True)  # validation loss falls at every check
    # chance is 1/512, always guessing the most frequent token ("the") is right ~10% of the time
    assert val[-1][2] > 0.25 and val[-1][2] > val[0][2] + 0.1

    checkpoint = next((run_dir / "checkpoints").glob("*step=500*"))
    export_hf(checkpoint, tmp_path / "hf")
    hf = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "BertForMaskedLM"
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    trainer = Trainer(resolve("bert-tiny", "pretrain", [f"exp_manager.resume_from_checkpoint={checkpoint}",
                                                        f"exp_manager.explicit_log_dir={tmp_path / 'load'}"]),
                      World(0, 1, 0, torch.device("cpu"), None))
    trainer.setup()
    trainer.checkpointer.maybe_resume()
    trainer.model.eval()
    text = ["every morning the [MASK] sees a small dog.", "3 plus 4 is [MASK], and 7 minus 4 is 3."]
    inputs = tok(text, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours, theirs = trainer.model(**inputs), hf(**inputs).logits
    real = inputs["attention_mask"].bool()
    diff = (ours - theirs)[real].abs().max().item()
    at_mask = inputs["input_ids"] == tok.mask_token_id
    print(f"export: max |logit diff| transformers vs nxdt {diff:.2e}; fills: {tok.convert_ids_to_tokens(theirs[at_mask].argmax(-1))}")
    assert diff <= TOL
