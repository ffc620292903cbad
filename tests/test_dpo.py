"""DPO and ORPO: TRL's loss code as the oracle, the first DPO step at ln 2, the reference model (precomputed,
frozen copy, LoRA without a second model), preference data (formats, truncation, bad rows with file and line),
and the CLI recipes learning the embedded preference task."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import types
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from multirank import tiny

from nxdt.data.batch import collate
from nxdt.data.embedded import embedded_paths
from nxdt.data.preference import PreferenceDataset
from nxdt.data.tokenizer import load_tokenizer
from nxdt.recipes.preference import DPOObjective, ORPOObjective, token_logps

ENV_CMD = [sys.executable, "-m", "nxdt.cli.main"]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> list[str]:
    """A small preference run: 3 steps of 8 pairs from 64 training pairs; 16 validation pairs."""
    val = tmp_path_factory.mktemp("val") / "val.jsonl"
    val.write_text("".join(embedded_paths()["preference_validation"].read_text().splitlines(True)[:16]))
    return [*tiny(2, 3), "data.dev_choose_samples=64", f"data.val_dir={val}"]


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded tokenizer."""
    return load_tokenizer(str(embedded_paths()["tokenizer"]))


@pytest.fixture(scope="module")
def pairs(tokenizer) -> dict[str, torch.Tensor]:
    """Six embedded validation pairs as one micro-batch (rows c0, r0, c1, r1, ...) and random policy logits."""
    data = PreferenceDataset(embedded_paths()["preference_validation"], tokenizer, 32, dev_choose_samples=6)
    batch = collate([data[i] for i in range(len(data))])
    torch.manual_seed(0)
    # fp64, so the comparison shows the formulas agree rather than how fp32 rounds them
    batch["logits"] = torch.randn(*batch["input_ids"].shape, 512, dtype=torch.float64) * 3
    batch["ref_logps"] = -torch.rand(batch["input_ids"].shape[0], dtype=torch.float64) * 30
    return batch


def _trl_rows(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TRL's layout of our pairs: all chosen rows, then all rejected rows; completion and attention masks."""
    order = torch.cat([torch.arange(0, len(batch["input_ids"]), 2), torch.arange(1, len(batch["input_ids"]), 2)])
    ids, labels = batch["input_ids"][order], batch["labels"][order]
    completion = torch.zeros_like(ids)
    completion[:, 1:] = labels[:, :-1] != -100  # our labels[t] is the token at t + 1
    last = torch.where(labels != -100, torch.arange(ids.shape[1]), -1).amax(-1, keepdim=True)
    attention = (torch.arange(ids.shape[1]) <= last + 1).long()
    return order, {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_loss_equals_trl(pairs, loss_type):
    """Our DPO loss and reward metrics equal DPOTrainer._compute_loss on the same policy and reference log-probs."""
    from trl import DPOTrainer
    from trl.trainer.utils import selective_log_softmax

    beta = 0.1
    ours = DPOObjective(beta, loss_type)({"logits": pairs["logits"]}, pairs)
    n_pairs = len(pairs["input_ids"]) // 2
    order, inputs = _trl_rows(pairs)
    per_token = token_logps(pairs["logits"], pairs["labels"])[order][:, :-1]
    # Our per-token log-probs are TRL's selective_log_softmax on the same logits and targets.
    logits, ids = pairs["logits"][order][:, :-1], inputs["input_ids"][:, 1:]
    theirs_tokens = selective_log_softmax(logits, ids) * inputs["completion_mask"][:, 1:]
    assert (per_token - theirs_tokens).abs().max() <= 1e-12
    ref = pairs["ref_logps"][order]
    inputs |= {"ref_chosen_logps": ref[:n_pairs], "ref_rejected_logps": ref[n_pairs:]}

    def model(**_):  # TRL's fused LM head output, carrying the same per-token log-probs
        zeros = torch.zeros_like(per_token)
        return types.SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x),
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta, use_weighting=False,
        label_smoothing=0.0, _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    theirs = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    diff = abs(ours.loss.item() / n_pairs - theirs.item())
    print(f"dpo {loss_type}: loss {theirs.item():.6f}, |ours - trl| = {diff:.2e}")
    assert diff <= 1e-6
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        total, count = ours.metrics[name]
        assert abs(total.item() / count.item() - trainer._metrics["train"][name][0]) <= 1e-5, name


def test_orpo_loss_equals_trl(pairs):
    """Our ORPO loss (NLL over the chosen prompt+response, odds ratio of mean response log-probs) equals TRL's."""
    from trl.experimental.orpo import ORPOTrainer

    beta = 0.1
    objective = ORPOObjective(beta)
    batch = dict(pairs)
    objective.annotate([batch])  # one micro-batch is the whole global batch here
    ours = objective({"logits": pairs["logits"]}, batch)
    n_pairs = len(pairs["input_ids"]) // 2
    order, rows = _trl_rows(pairs)
    unshifted = torch.where(rows["completion_mask"].bool(), rows["input_ids"], -100)
    trl_batch = {}
    for name, part in (("chosen", slice(0, n_pairs)), ("rejected", slice(n_pairs, None))):
        trl_batch |= {f"{name}_input_ids": rows["input_ids"][part], f"{name}_attention_mask": rows["attention_mask"][part],
                      f"{name}_labels": unshifted[part]}

    def model(input_ids, attention_mask=None, use_cache=False):
        return types.SimpleNamespace(logits=pairs["logits"][order])

    trainer = types.SimpleNamespace(is_encoder_decoder=False, padding_value=0, aux_loss_enabled=False, beta=beta,
                                    accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x))
    for method in ("concatenated_forward", "odds_ratio_loss"):
        setattr(trainer, method, types.MethodType(getattr(ORPOTrainer, method), trainer))
    trainer.concatenated_inputs, trainer.get_batch_logps = ORPOTrainer.concatenated_inputs, ORPOTrainer.get_batch_logps
    theirs, metrics = ORPOTrainer.get_batch_loss_metrics(trainer, model, trl_batch, "train")
    diff = abs(ours.loss.item() / n_pairs - theirs.item())
    print(f"orpo: |ours - trl| = {diff:.2e}")
    assert diff <= 1e-6
    for name in ("rewards/chosen", "rewards/margins", "rewards/accuracies", "nll_loss", "log_odds_ratio"):
        total, count = ours.metrics[name]
        assert abs(total.item() / count.item() - metrics[name]) <= 1e-5, name


def _trainer(recipe: str, overrides: list[str], run_dir: Path):
    from nxdt.parallel.world import World
    from nxdt.resolve import resolve
    from nxdt.train.trainer import Trainer

    torch.manual_seed(0)
    return Trainer(resolve("llama3-tiny", recipe, [*overrides, f"exp_manager.explicit_log_dir={run_dir}"]),
                   World(0, 1, 0, torch.device("cpu"), None))


@pytest.fixture
def parallelized(monkeypatch) -> list[bool]:
    """Records every model parallelize() materializes (its ``trainable`` flag): the policy and any second model."""
    import nxdt.parallel.apply as apply

    calls: list[bool] = []
    real = apply.parallelize
    monkeypatch.setattr(apply, "parallelize", lambda model, ctx, **kw: calls.append(kw.get("trainable", True))
                        or real(model, ctx, **kw))
    return calls


def test_first_dpo_step_is_ln2_and_both_references_agree(tmp_path, small, parallelized):
    """Policy and reference start equal: the first loss is ln 2; precomputed and live references give equal runs."""
    losses = {}
    for precompute in ("true", "false"):
        flag = f"model_alignment_strategy.dpo.precompute_ref_log_probs={precompute}"
        trainer = _trainer("dpo", [*small, flag], tmp_path / precompute)
        losses[precompute] = trainer.fit().losses
        assert trainer.objective.reference.mode == ("precomputed" if precompute == "true" else "frozen")
    # Precomputed: only the policy is built; live: the policy and a frozen copy.
    assert parallelized == [True, True, False]
    for run in losses.values():
        assert abs(run[0] - math.log(2)) <= 1e-6, run[0]
    print(f"first DPO loss {losses['true'][0]:.9f} (ln 2 = {math.log(2):.9f}); losses {losses}")
    assert max(abs(a - b) for a, b in zip(losses["true"], losses["false"])) <= 1e-6
    assert losses["true"][-1] != losses["true"][0]


@pytest.mark.parametrize("precompute", ["true", "false"])
def test_lora_reference_is_the_policy_without_adapters(tmp_path, small, precompute, parallelized):
    """Under LoRA the reference is the adapters-disabled policy: one model is ever built, and the first loss is ln 2."""
    lora = ["model_alignment_strategy.peft.lora_rank=4", "model_alignment_strategy.peft.lora_dropout=0",
            f"model_alignment_strategy.dpo.precompute_ref_log_probs={precompute}"]
    trainer = _trainer("dpo", [*small, *lora], tmp_path)
    result = trainer.fit()
    assert parallelized == [True]  # the policy, and no second model
    assert trainer.objective.reference.model is None
    assert trainer.objective.reference.mode == ("precomputed" if precompute == "true" else "adapters")
    assert abs(result.losses[0] - math.log(2)) <= 1e-6


def test_resumed_dpo_rebuilds_the_initial_reference(tmp_path, small):
    """Resumed mid-way, a run rebuilds its reference from the initial model, so it continues exactly."""
    every_2 = ["model.optim.sched.max_steps=4", "exp_manager.checkpoint_callback_params.every_n_train_steps=2",
               "exp_manager.checkpoint_callback_params.save_top_k=-1", "exp_manager.resume_if_exists=true",
               "exp_manager.resume_ignore_no_checkpoint=true"]
    whole = _trainer("dpo", [*small, *every_2, "trainer.max_steps=4"], tmp_path / "whole").fit().losses
    _trainer("dpo", [*small, *every_2, "trainer.max_steps=2"], tmp_path / "parts").fit()
    resumed = _trainer("dpo", [*small, *every_2, "trainer.max_steps=4"], tmp_path / "parts")
    rest = resumed.fit().losses
    assert resumed.objective.reference.mode == "precomputed" and len(rest) == 2
    assert rest == whole[2:], (rest, whole)


def test_orpo_trains_without_reference(tmp_path, small):
    """ORPO needs no reference: no ref_logps, and its metrics are logged on training and validation."""
    trainer = _trainer("orpo", small, tmp_path)
    result = trainer.fit()
    assert result.losses[-1] < result.losses[0]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = logged[-1]
    for name in ("rewards/chosen", "rewards/margins", "rewards/accuracies", "nll_loss", "log_odds_ratio"):
        assert name in last and f"val_{name}" in last, name


# -- data ------------------------------------------------------------------------------------------
def test_string_pair_tokenization(tokenizer):
    """[BOS] prompt | response EOS, prompt masked, labels shifted; a pair is two rows of one length."""
    path = embedded_paths()["preference_validation"]
    data = PreferenceDataset(path, tokenizer, 64, dev_choose_samples=1)
    row = json.loads(path.read_text().splitlines()[0])
    item = data[0]
    assert item["input_ids"].shape == item["labels"].shape == (2, data.length) and data.length % 8 == 0
    prompt = [tokenizer.bos_id, *tokenizer.encode(row["prompt"])]
    for r, key in enumerate(("chosen", "rejected")):
        response = [*tokenizer.encode(row[key]), tokenizer.eos_id]
        n = len(prompt) + len(response)
        assert item["input_ids"][r, :n].tolist() == prompt + response
        assert (item["labels"][r, : len(prompt) - 1] == -100).all()
        assert item["labels"][r, len(prompt) - 1 : n - 1].tolist() == response
        assert (item["labels"][r, n - 1 :] == -100).all()


def test_chat_pairs_mask_the_prompt_turns(tmp_path, tokenizer):
    """Chat rows: the template renders the prompt (with generation prompt); only the final response is trained on."""
    prompt = [{"role": "user", "content": "copy: AB ="}, {"role": "assistant", "content": "AB"},
              {"role": "user", "content": "reverse: AB ="}]
    rows = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "BA"}], "rejected": "AB"}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    item = PreferenceDataset(path, tokenizer, 64)[0]
    prompt_ids = tokenizer.encode(tokenizer.render_chat(prompt, add_generation_prompt=True))
    for r, answer in enumerate(("BA", "AB")):
        targets = item["labels"][r][item["labels"][r] != -100].tolist()
        assert targets == [*tokenizer.encode(answer), tokenizer.eos_id]  # the template closes the turn with EOS
        assert item["input_ids"][r, : len(prompt_ids)].tolist() == prompt_ids


def test_truncation_keeps_start_or_end_of_the_prompt(tmp_path, tokenizer):
    """A pair too long for seq_length: the prompt is cut to max_prompt_length (its start or its end, BOS kept)."""
    prompt = "copy: " + " ".join("ABCDEFGHIJKLMNOPQRST")
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "chosen": "XY", "rejected": "YX"}) + "\n")
    ids = [tokenizer.bos_id, *tokenizer.encode(prompt)]
    for mode, expected in (("keep_start", ids[:8]), ("keep_end", [ids[0], *ids[-7:]])):
        data = PreferenceDataset(path, tokenizer, 16, max_prompt_length=8, truncation_mode=mode)
        assert data.pairs[0][0] == expected and data.truncated == 1
    # Without max_prompt_length the prompt leaves no room: the row is bad (and here the only row).
    with pytest.raises(Exception, match="long.jsonl"):
        PreferenceDataset(path, tokenizer, 16)


def test_hf_dataset_directory_reads_like_jsonl(tmp_path, tokenizer):
    """A datasets.save_to_disk directory (a DatasetDict's split) with the same columns gives the same pairs."""
    datasets = pytest.importorskip("datasets")
    path = embedded_paths()["preference_validation"]
    rows = [json.loads(line) for line in path.read_text().splitlines()[:20]]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "hf"))
    from_hf = PreferenceDataset(tmp_path / "hf", tokenizer, 32)
    from_jsonl = PreferenceDataset(path, tokenizer, 32, dev_choose_samples=20)
    assert from_hf.pairs == from_jsonl.pairs


def test_malformed_rows_are_reported_with_file_and_line(tmp_path, tokenizer):
    """Bad rows are skipped and named by file and line; a file of mostly bad rows is one line from the CLI."""
    good = {"prompt": "copy: AB =", "chosen": "AB", "rejected": "AC"}
    lines = [json.dumps(good), "{not json", json.dumps({"prompt": "p", "chosen": "a"}),
             json.dumps({"prompt": "p", "chosen": 3, "rejected": "b"}), json.dumps({**good, "rejected": "AB"}),
             json.dumps({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"})]
    lines += [json.dumps(good)] * 6
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    data = PreferenceDataset(path, tokenizer, 32)
    assert len(data) == 7
    summary = data.bad_rows.summary()
    for line, reason in ((2, "invalid JSON"), (3, "missing field 'rejected'"), (4, "'chosen' is not a string"),
                         (5, "identical"), (6, "role 'robot'")):
        assert f"line {line}: " in summary and reason in summary, (line, reason, summary)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[1:5]) + "\n")
    res = subprocess.run([*ENV_CMD, "run", "llama3-tiny", "--recipe", "dpo", f"data.train_dir={bad}",
                          "trainer.max_steps=1"], capture_output=True, text=True, timeout=240)
    assert res.returncode != 0
    lines_out = res.stderr.strip().splitlines()
    assert len(lines_out) == 1 and "Traceback" not in res.stderr and str(bad) in lines_out[0], res.stderr


def test_dpo_keys_are_read_and_misuse_is_refused(tmp_path):
    """The dpo/orpo sections are read by their recipes; a section of another recipe or an unknown loss_type is refused."""
    from nxdt.errors import ConfigError
    from nxdt.resolve import default_recipe, resolve

    run = resolve("llama3-tiny", "dpo", ["model_alignment_strategy.dpo.kl_beta=0.5"])
    assert run.config.model_alignment_strategy.dpo.kl_beta == 0.5 and run.recipe.loss == "dpo"
    yaml = tmp_path / "hf_llama_orpo.yaml"
    yaml.write_text("name: hf_llama\nmodel_alignment_strategy:\n  orpo:\n    beta: 0.2\n")
    assert default_recipe(str(yaml)) == "orpo"
    with pytest.raises(ConfigError, match="applies to the dpo recipe; this run uses 'orpo'"):
        resolve("llama3-tiny", "orpo", ["model_alignment_strategy.orpo=null", "model_alignment_strategy.dpo.kl_beta=0.1"])
    with pytest.raises(ConfigError, match="loss_type='kto'"):
        resolve("llama3-tiny", "dpo", ["model_alignment_strategy.dpo.loss_type=kto"])


# -- the embedded task, as a user runs it ----------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["dpo", "orpo"])
def test_cli_recipe_learns_the_embedded_preferences(tmp_path, recipe):
    """`nxdt run llama3-tiny --recipe dpo|orpo` as a user runs it: held-out reward accuracy rises well above 0.5."""
    cmd = [*ENV_CMD, "run", "llama3-tiny", "--recipe", recipe, f"exp_manager.explicit_log_dir={tmp_path}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    accuracy = [row["val_rewards/accuracies"] for row in logged if "val_rewards/accuracies" in row]
    print(f"{recipe}: held-out reward accuracy every 50 steps {accuracy}")
    assert len(accuracy) == 5 and accuracy[-1] >= 0.75 and accuracy[-1] > accuracy[0], accuracy
