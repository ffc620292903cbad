"""`nxdt run` end to end: recipes, every data format, data parallelism, multi-node launch, logging."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nxdt.data.embedded import embedded_paths

TINY = [
    "model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4", "model.num_kv_heads=2",
    "model.ffn_hidden_size=128", "data.seq_length=64", "data.global_batch_size=8", "data.micro_batch_size=4",
    "trainer.log_every_n_steps=1", "model.optim.sched.warmup_steps=2",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NXDT_DEVICE": "cpu"}


def nxdt_run(run_dir: Path, *args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real `nxdt run` in a fresh process, logging into ``run_dir``."""
    cmd = [sys.executable, "-m", "nxdt.cli.main", "run", *args, f"exp_manager.explicit_log_dir={run_dir}"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)
    if check:
        assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in metrics(run_dir) if "loss" in m]


def test_sft_recipe_learns_and_logs(tmp_path):
    """SFT on the embedded task: validation loss falls, exact match beats the untrained model."""
    run_dir = tmp_path / "sft"
    nxdt_run(run_dir, "llama3-tiny", "--recipe", "sft", "trainer.max_steps=80", "trainer.val_check_interval=40",
             "data.global_batch_size=16", "data.micro_batch_size=16", "data.seq_length=128",
             "trainer.log_every_n_steps=1")
    rows = metrics(run_dir)
    ls = losses(run_dir)
    assert len(ls) == 80 and ls[-1] < ls[0] * 0.6
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(vals) >= 2 and vals[-1] < vals[0]
    final = rows[-1]
    assert final["task/exact_match"] > final["task/exact_match_before_training"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "config.yaml").is_file() and (run_dir / "result.json").is_file()


def test_pretrain_formats(tmp_path):
    """Raw text (.txt, .jsonl, .parquet), an HF datasets directory and Megatron .bin/.idx all train."""
    import datasets

    from nxdt.data.tokenizer import load_tokenizer

    corpus = embedded_paths()["pretrain_jsonl"]
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()][:300]
    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(tmp_path / "corpus.parquet"))
    tok = load_tokenizer("embedded")
    stream = [t for text in texts for t in tok.encode(text) + [tok.eos_id]]
    blocks = [stream[i : i + 65] for i in range(0, len(stream) - 65, 65)]
    datasets.Dataset.from_dict({"input_ids": blocks}).save_to_disk(str(tmp_path / "hf_ds"))
    prefix = tmp_path / "megatron" / "corpus"
    pre = subprocess.run([sys.executable, "-m", "nxdt.cli.main", "data", "preprocess", str(corpus),
                          "--output-prefix", str(prefix), "--json"], capture_output=True, text=True, env=ENV, timeout=120)
    assert pre.returncode == 0, pre.stderr
    assert json.loads(pre.stdout)["documents"] > 0
    sources = {
        "txt": [f"data.train_dir={embedded_paths()['pretrain_txt']}"],
        "jsonl": [f"data.train_dir={corpus}"],
        "parquet": [f"data.train_dir={tmp_path / 'corpus.parquet'}"],
        "hf": [f"data.train_dir={tmp_path / 'hf_ds'}"],
        "megatron": [f"data.data_prefix=[1.0,{prefix}]"],
    }
    for name, args in sources.items():
        run_dir = tmp_path / f"run_{name}"
        nxdt_run(run_dir, "llama3-tiny", "--recipe", "pretrain", *TINY, *args, "trainer.max_steps=12",
                 "trainer.val_check_interval=0", "model.optim.lr=0.01")
        ls = losses(run_dir)
        assert len(ls) == 12 and ls[-1] < ls[0], (name, ls)


def test_sft_chat_messages_and_bad_rows(tmp_path):
    """Chat-format rows train; a malformed row is reported with its file and line, not crashed on."""
    chat = embedded_paths()["chat_train"].read_text().splitlines()[:200]
    bad = tmp_path / "chat.jsonl"
    bad.write_text("\n".join(chat[:4] + ["{not json", '{"messages": []}'] + chat[4:]) + "\n")
    run_dir = tmp_path / "chat"
    res = nxdt_run(run_dir, "llama3-tiny", "--recipe", "sft", *TINY, f"data.train_dir={bad}",
                   "trainer.max_steps=6", "trainer.val_check_interval=0")
    out = res.stdout + res.stderr
    assert "line 5" in out and "line 6" in out and "chat.jsonl" in out
    assert len(losses(run_dir)) == 6


def test_data_parallel_matches_one_process(tmp_path):
    """Two processes with DP give the per-step loss of one process with the same global batch."""
    common = ["llama3-tiny", "--recipe", "sft", *TINY, "trainer.max_steps=10", "trainer.val_check_interval=5",
              "model_alignment_strategy.sft.packing=false"]
    nxdt_run(tmp_path / "one", *common)
    nxdt_run(tmp_path / "two", *common, "--nproc-per-node", "2")
    one = [m for m in metrics(tmp_path / "one") if "loss" in m]
    two = [m for m in metrics(tmp_path / "two") if "loss" in m]
    assert len(one) == len(two) >= 10
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
        if "val_loss" in a:
            assert abs(a["val_loss"] - b["val_loss"]) <= 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_agents_on_loopback_train_together(tmp_path):
    """Two torchrun agents (--nnodes 2, c10d rendezvous, one process each) form one DP=2 run."""
    endpoint = f"127.0.0.1:{_free_port()}"
    cmd = [sys.executable, "-m", "nxdt.cli.main", "run", "llama3-tiny", "--recipe", "sft", *TINY,
           "trainer.max_steps=4", "trainer.val_check_interval=0", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-endpoint", endpoint, "--rdzv-id", "loopback-test"]
    procs = [
        subprocess.Popen([*cmd, "--node-rank", str(rank), f"exp_manager.explicit_log_dir={tmp_path / 'run'}"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert "world=2" in "".join(outputs)
    assert len(losses(tmp_path / "run")) == 4


def test_nonfinite_loss_stops_with_the_step(tmp_path):
    res = nxdt_run(tmp_path / "nan", "llama3-tiny", "--recipe", "pretrain", *TINY, "trainer.max_steps=30",
                   "model.optim.lr=1e12", "model.optim.sched.name=constant", "trainer.gradient_clip_val=0",
                   "trainer.val_check_interval=0", check=False)
    assert res.returncode != 0
    assert "not finite" in res.stderr and "step " in res.stderr and "Traceback" not in res.stderr


def test_dry_run_and_batch_arithmetic(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "nxdt.cli.main", "run", "llama3-tiny", "--dry-run", "--json",
                         "--nproc-per-node", "2"], capture_output=True, text=True, env=ENV, timeout=120)
    assert ok.returncode == 0, ok.stderr
    plan = json.loads(ok.stdout)
    assert plan["layout"]["dp"] == 2 and plan["gradient_accumulation"] * 2 * plan["micro_batch_size"] == plan["global_batch_size"]
    bad = subprocess.run([sys.executable, "-m", "nxdt.cli.main", "run", "llama3-tiny", "--dry-run",
                          "data.global_batch_size=10", "data.micro_batch_size=4"], capture_output=True, text=True,
                         env=ENV, timeout=120)
    assert bad.returncode != 0 and "(10)" in bad.stderr and "(4)" in bad.stderr


@pytest.mark.parametrize("target", ["hf_llama3_8B_SFT_config.yaml"])
def test_nxdt_yaml_dry_run(target, tmp_path):
    """An upstream NxDT YAML resolves into a run plan once its model_config exists; a missing one is an error."""
    anchors = Path(__file__).resolve().parents[1].parent / "shared" / "anchors" / "nxdt-configs"
    if not (anchors / target).is_file():
        pytest.skip("anchor configs not present")
    cmd = [sys.executable, "-m", "nxdt.cli.main", "run", str(anchors / target), "--dry-run", "--json"]
    missing = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
    assert missing.returncode == 2 and "/home/ubuntu/config.json does not exist" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    from nxdt.resolve import resolve

    preset = resolve("llama3-8b")
    (tmp_path / "config.json").write_text(json.dumps(preset.spec.config_to_hf(preset.arch)))
    # The dry run checks what the run would (the fit on this machine, the data files), so the 8B model
    # is shrunk and the anchor's /home/ubuntu data replaced; the anchor's layout and recipe stay.
    from nxdt.data.embedded import embedded_paths

    sft = embedded_paths()["sft_train"].parent
    small = ["model.num_layers=2", "model.hidden_size=256", "model.ffn_hidden_size=512", "model.vocab_size=512",
             "data.tokenizer.type=embedded", f"data.train_dir={sft / 'train.jsonl'}",
             f"data.val_dir={sft / 'validation.jsonl'}", "data.seq_length=128"]
    res = subprocess.run([*cmd, f"model.model_config={tmp_path / 'config.json'}", *small], capture_output=True,
                         text=True, env=ENV, timeout=120)
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert plan["family"] == "llama" and plan["recipe"] == "sft" and plan["layout"]["tp"] == 32
    assert plan["world"]["world_size"] == 32 and plan["config"]["model"]["num_layers"] == 2


def test_model_that_will_not_fit_is_refused_before_loading(tmp_path):
    res = nxdt_run(tmp_path / "big", "llama3.1-405b", "--recipe", "pretrain", "distributed_strategy.tensor_model_parallel_size=1",
                   "distributed_strategy.pipeline_model_parallel_size=1", "trainer.max_steps=1", check=False, timeout=120)
    assert res.returncode != 0
    assert "will not fit" in res.stderr and "405,853,388,800" in res.stderr and "Traceback" not in res.stderr


def test_sft_evaluation_under_tensor_and_sequence_parallelism(tmp_path):
    """Exact-match generation runs with TP=2 + SP, whose sequence lengths must divide by TP."""
    run_dir = tmp_path / "tp_sp"
    nxdt_run(run_dir, "llama3-tiny", "--recipe", "sft", *TINY, "--nproc-per-node", "2", "trainer.max_steps=2",
             "distributed_strategy.tensor_model_parallel_size=2", "distributed_strategy.sequence_parallel=true",
             "trainer.val_check_interval=0")
    final = metrics(run_dir)[-1]
    assert "task/exact_match" in final and "task/exact_match_before_training" in final


def test_auxiliary_loss_counts_once_per_optimizer_step():
    """A model's aux_loss gets weight 1 / micro-batches: the same gradient however the batch is split."""
    import torch

    from nxdt.parallel.model import ParallelModel
    from nxdt.specs import LossOutput

    class WithAux(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))

        def forward(self, input_ids, position_ids=None):
            self.aux_loss = 0.5 * (self.w**2).sum()  # a load-balancing-like term, independent of the batch
            return (input_ids.float().unsqueeze(-1) * self.w).sum(-1, keepdim=True)

    class Zero:
        def count(self, batch):
            return torch.tensor(1)

        def __call__(self, outputs, batch):
            return LossOutput(outputs.sum() * 0.0)

    grads, logged = [], []
    for n_micro in (1, 4):
        model = ParallelModel(WithAux())
        batches = [{"input_ids": torch.ones(4 // n_micro, 3, dtype=torch.long)} for _ in range(n_micro)]
        stats = model.forward_backward(batches, Zero(), 1.0, contextlib.nullcontext, aux_scale=1.0 / n_micro)
        grads.append(model.trainable_module.w.grad.clone())
        logged.append(float(stats.metrics["aux_loss"][0] / stats.metrics["aux_loss"][1]))
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], torch.tensor([1.0, -2.0]))
    assert logged == [2.5, 2.5]
