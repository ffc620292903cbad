"""Decoding with the kit's KV cache: equal to recomputation and to transformers' generate for every
causal family (GQA, RoPE, learned positions, a sliding window, MoE), batched with left padding;
sampling options; the fallback for a model without a cache; the `nxdt generate` command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from nxdt.generation import Sampling, generate, takes_kv_cache
from nxdt.testing.conformance import _perturb, build_initialized

EOS, PAD = 1, 2
# Prompts of several lengths (one longer than the sliding window) decoded in one left-padded batch.
PROMPTS = [[0, 17, 33, 5, 9, 41], [0, 8], [0, 60, 61, 62, 63, 64, 65, 66, 67, 68, 3], [0, 12, 13, 14]]


def _family(name: str):
    if name in ("llama", "mistral"):
        from nxdt_llama.plugin import LLAMA_SPEC, LlamaConfig

        window = {"sliding_window": 4} if name == "mistral" else {}
        return LLAMA_SPEC, LlamaConfig(vocab_size=96, hidden_size=64, num_layers=2, num_attention_heads=4,
                                       num_kv_heads=2, ffn_hidden_size=96, max_position_embeddings=64, **window)
    if name == "gpt":
        from nxdt_gpt.plugin import GPT_SPEC

        cfg = GPT_SPEC.config_from_nxdt({"vocab_size": 96, "hidden_size": 64, "num_layers": 2,
                                         "num_attention_heads": 4, "ffn_hidden_size": 128,
                                         "max_position_embeddings": 64, "normalization": "layernorm",
                                         "position_embedding_type": "learned_absolute", "activation": "gelu_tanh",
                                         "has_bias": True, "share_embeddings_and_output_weights": True})
        return GPT_SPEC, cfg
    from nxdt_mixtral.plugin import MIXTRAL_SPEC

    cfg = MIXTRAL_SPEC.config_from_nxdt({"vocab_size": 96, "hidden_size": 64, "num_layers": 2,
                                         "num_attention_heads": 4, "num_kv_heads": 2, "ffn_hidden_size": 64,
                                         "max_position_embeddings": 64, "moe": {"num_experts": 4, "top_k": 2}})
    return MIXTRAL_SPEC, cfg


def _model(name: str):
    spec, cfg = _family(name)
    model = build_initialized(spec, cfg, seed=3).eval()
    _perturb(model, 3)  # sharper logits than init: long non-EOS continuations, no near-ties
    return spec, cfg, model


FAMILIES = ["llama", "mistral", "gpt", "mixtral"]


@pytest.mark.parametrize("name", FAMILIES)
def test_cached_batch_equals_recomputation_one_prompt_at_a_time(name):
    """The left-padded cached batch gives each prompt the tokens full recomputation gives it alone."""
    _, _, model = _model(name)
    assert takes_kv_cache(model)
    batched = generate(model, PROMPTS, 12, [EOS], PAD)
    alone = [generate(model, [p], 12, [EOS], PAD, use_cache=False)[0] for p in PROMPTS]
    assert batched == alone
    assert all(len(row) == 12 or row[-1] == EOS for row in batched)


def _hf_twin(spec, cfg, model, directory):
    """The transformers model of ``model``'s weights, loaded as a checkpoint directory (HF converts old layouts)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    state = {k: v.detach().clone().contiguous() for k, v in spec.state_dict_adapter(cfg).to_hf(model.state_dict()).items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(spec.config_to_hf(cfg)))
    return AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").float().eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_equals_transformers_generate(name, tmp_path):
    """Token for token what transformers' greedy generate (with its own cache) produces from the same weights."""
    spec, cfg, model = _model(name)
    hf_model = _hf_twin(spec, cfg, model, tmp_path)
    ours = generate(model, PROMPTS, 16, [EOS], PAD)
    for prompt, row in zip(PROMPTS, ours):
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=EOS,
                                pad_token_id=PAD)
        assert out[0, len(prompt):].tolist() == row, name


def test_stops_at_eos_per_row():
    """A row stops at its EOS (kept as its last token) while the others go on."""
    _, _, model = _model("llama")
    free = generate(model, PROMPTS, 10, [EOS], PAD)
    stop = free[0][1]  # make the first row's second token an end-of-sequence token
    rows = generate(model, PROMPTS, 10, [EOS, stop], PAD)
    cuts = [next((j + 1 for j, t in enumerate(row) if t == stop), len(row)) for row in free]
    assert rows == [row[:cut] for row, cut in zip(free, cuts)]
    assert len(rows[0]) <= 2 and max(len(r) for r in rows) == 10


def test_sampling_is_seeded_and_filters():
    """Sampling repeats with its seed; top-k=1 and a tiny top-p leave only the argmax."""
    _, _, model = _model("llama")
    greedy = generate(model, PROMPTS, 8, [EOS], PAD)
    hot = Sampling(temperature=1.5, seed=7)
    assert generate(model, PROMPTS, 8, [EOS], PAD, sampling=hot) == generate(model, PROMPTS, 8, [EOS], PAD, sampling=hot)
    assert generate(model, PROMPTS, 8, [EOS], PAD, sampling=hot) != greedy
    assert generate(model, PROMPTS, 8, [EOS], PAD, sampling=Sampling(temperature=2.0, top_k=1)) == greedy
    assert generate(model, PROMPTS, 8, [EOS], PAD, sampling=Sampling(temperature=2.0, top_p=1e-6)) == greedy


def test_model_without_a_cache_falls_back_to_recomputation():
    """A family whose forward takes no kv_cache is decoded by recomputing, with the same tokens."""
    _, _, model = _model("llama")

    class NoCache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, position_ids=None):
            return self.inner(input_ids, position_ids)

    wrapped = NoCache()
    assert not takes_kv_cache(wrapped)
    assert generate(wrapped, PROMPTS, 10, [EOS], PAD) == generate(model, PROMPTS, 10, [EOS], PAD)


def test_prompt_beyond_the_positions_is_refused():
    """Prompt plus new tokens longer than the model's positions: a ValueError (the CLI makes it one line)."""
    _, _, model = _model("llama")
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        generate(model, [[0] * 60], 8, [EOS], PAD, max_length=64)


def test_generate_command_batch_in_a_real_process():
    """`nxdt generate`: a batch of prompts in JSON, --chat through the tokenizer's template."""
    res = subprocess.run([sys.executable, "-m", "nxdt.cli.main", "--json", "generate", "llama3-tiny", "--prompt",
                          "copy: AB =", "--prompt", "hi", "--chat", "--max-new-tokens", "5"],
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["kv_cache"] and [len(r["tokens"]) for r in out["results"]] == [5, 5]
    assert out["results"][1]["prompt_ids"] == [0, 4, 387, 5]  # <|bos|><|user|>hi<|assistant|>


@pytest.mark.parametrize("args, code, message", [
    (["--top-p", "0.5"], 2, "set --temperature above 0"),
    (["--temperature", "-1"], 2, "--temperature must be >= 0"),
    (["--max-new-tokens", "0"], 2, "--max-new-tokens must be at least 1"),
    (["--max-new-tokens", "500"], 2, "exceeds the model's 256 positions"),
])
def test_generate_command_refusals_are_one_line(capsys, args, code, message):
    """Options that mean nothing, or a decode longer than the positions: one line, exit 2."""
    from nxdt.cli.main import main

    assert main(["generate", "llama3-tiny", "--prompt", "x", *args]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_generate_refuses_a_masked_lm(capsys):
    """BERT is not a causal LM: one line naming its task."""
    from nxdt.cli.main import main

    assert main(["generate", "bert-tiny", "--prompt", "x"]) == 1
    assert "decodes causal language models; the bert family's task is masked_lm" in capsys.readouterr().err


def _tp_generate_worker(rank: int, world: int, store: str, out: str) -> None:
    """One rank of a TP=2 model (the engine's sharding, KV heads replicated) decoding with the cache."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from nxdt.parallel.kv_replication import kv_replication_factor, replicate_kv_
    from nxdt.parallel.tensor_parallel import apply_tensor_parallel
    from nxdt.parallel.world import leave_process_group
    from nxdt.specs import ParallelDims

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        spec, cfg, model = _model("llama")
        expected = generate(model, PROMPTS, 12, [EOS], PAD)
        plan = spec.shard_plan(cfg, ParallelDims(tp=world))
        replicas = kv_replication_factor(cfg.num_kv_heads, cfg.num_attention_heads, world)
        replicate_kv_(model, tuple(plan.kv_projections), cfg.num_kv_heads, replicas)
        apply_tensor_parallel(model, plan, init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)), False)
        got = generate(model, PROMPTS, 12, [EOS], PAD)
        if rank == 0:
            torch.save({"expected": expected, "got": got}, out)
    finally:
        leave_process_group()


@pytest.mark.slow
def test_cached_decoding_under_tensor_parallelism_equals_one_process(tmp_path):
    """Each TP rank caches its own heads: two gloo ranks decode the tokens one process decodes."""
    import torch.multiprocessing as mp

    out = tmp_path / "result.pt"
    mp.start_processes(_tp_generate_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2,
                       start_method="spawn")
    result = torch.load(out)
    assert result["got"] == result["expected"]
