"""The memory planner: placement, activations against saved tensors, optimizer terms, schedules, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from nxdt.cli.main import main
from nxdt.plan import plan_memory, snapshot_of
from nxdt.plan.activations import activation_model, in_flight, layer_bytes
from nxdt.plan.estimate import Facts, Layout, rank_memory
from nxdt.plan.placement import RankParams, place
from nxdt.resolve import resolve
from nxdt.specs import ParallelDims

SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4", "model.num_kv_heads=2",
         "model.ffn_hidden_size=96", "model.vocab_size=1000"]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# -- placement ----------------------------------------------------------------------------------
def _placed(preset: str, overrides: list[str], **dims: int) -> tuple[list, object]:
    run = resolve(preset, "pretrain", overrides)
    snap = snapshot_of(run)
    parallel = ParallelDims(**dims)
    plan = run.spec.shard_plan(run.arch, parallel) if parallel.tp > 1 or parallel.ep > 1 else None
    return place(snap, parallel, plan, run.arch), snap


def test_placement_splits_as_the_shard_plan_and_pipeline_say():
    (one,), snap = _placed("llama3-tiny", SMALL)
    assert one.numel == snap.numel == 2 * 1000 * 64 + 2 * (64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 96 + 2 * 64) + 64
    (tp2,), _ = _placed("llama3-tiny", SMALL, tp=2, sequence_parallel=True)
    norms = 2 * 2 * 64 + 64  # replicated under TP (SequenceParallel)
    assert tp2.numel == (snap.numel - norms) // 2 + norms
    first, last = _placed("llama3-tiny", SMALL, pp=2)[0]
    assert first.numel + last.numel == snap.numel and first.first and last.last
    assert last.numel - first.numel == 64  # one block each, embedding and head alike; the final norm is last
    # TP=4 over 2 KV heads: each KV head's rows repeated twice, then split four ways
    (tp4,), _ = _placed("llama3-tiny", SMALL, tp=4)
    kv = 2 * 2 * (32 * 64)  # wk + wv of 2 layers
    assert tp4.numel == (snap.numel - norms - kv) // 4 + norms + 2 * kv // 4


def test_placement_of_experts_and_ties():
    (ep1,), snap = _placed("mixtral-tiny", [])
    (ep2,), _ = _placed("mixtral-tiny", [], dp=2, ep=2)
    experts = sum(p.numel for p in snap.params if p.expert_tp_dim is not None)
    assert ep1.expert == experts and ep2.expert == experts // 2 and ep1.numel - ep2.numel == experts // 2
    first, last = _placed("gpt2-tiny", [], pp=2)[0]
    tied = next(p.numel for p in snap_of("gpt2-tiny").params if len(p.names) == 2)
    assert first.numel + last.numel == snap_of("gpt2-tiny").numel + tied  # the tied matrix lives on both ends


def snap_of(preset: str):
    return snapshot_of(resolve(preset, "pretrain"))


# -- activations --------------------------------------------------------------------------------
def _saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    from nxdt.recipes.losses import causal_lm_loss

    excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids)
        causal_lm_loss(logits, {"labels": ids})
    return sum(saved.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", [None, "full", "selective"])
def test_activation_model_is_what_the_kit_saves(dtype, granularity):
    from nxdt.parallel.activation_checkpoint import apply_activation_checkpointing

    run = resolve("llama3-tiny", "pretrain", SMALL)
    torch.manual_seed(0)
    model = run.spec.build_model(run.arch)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    apply_activation_checkpointing(model, granularity, ["CoreAttention"], run.spec.recompute_modules,
                                   run.spec.pipeline_blocks(run.arch))
    batch, seq = 2, 32
    measured = _saved_bytes(model, torch.randint(0, 1000, (batch, seq)))
    acts = activation_model(run.arch, seq, 1, False, 2 if dtype == torch.bfloat16 else 4, autocast=False)
    predicted = batch * seq * (2 * layer_bytes(acts, granularity) + acts.first + acts.last)
    assert predicted == pytest.approx(measured, rel=0.03)


def test_in_flight_micro_batches_follow_the_schedules():
    assert [in_flight("1F1B", 4, 1, 8, r) for r in range(4)] == [4, 3, 2, 1]
    assert in_flight("1F1B", 4, 1, 2, 0) == 2 and in_flight("GPipe", 4, 1, 8, 3) == 8
    # interleaved, enough micro-batches to fill the warm-up: rank 0 holds L (1 + (p - 1) / (p v)) layers' worth
    # (Korthikanti et al.); with m = p torch's warm-up is capped at every chunk of the step
    p, v, layers = 4, 2, 16
    assert in_flight(None, p, v, p, 0) == p * v
    chunks = in_flight(None, p, v, 2 * p, 0)
    assert chunks * layers / (p * v) == layers * (1 + (p - 1) / (p * v))


# -- model state --------------------------------------------------------------------------------
def _state(precision: str, zero1: bool, dp: int) -> dict[str, int]:
    from nxdt.config.sections_precision import PrecisionSection

    r = PrecisionSection(type=precision).resolved()
    facts = Facts(seq_length=1, param_bytes=2 if r.param_dtype == "bf16" else 4,
                  state_bytes=2 if r.optimizer_state_dtype == "bf16" else 4, master_weights=r.master_weights,
                  fp32_grad_acc=r.fp32_grad_acc, stochastic_rounding=r.stochastic_rounding, autocast=False)
    rank = RankParams(0, (0,), (1,), 1000, 1000, 0, 100, 0, True, True)
    acts = activation_model(object(), 1, 1, False, 4, False)
    m = rank_memory(rank, Layout(dp=dp, zero1=zero1), facts, acts, 4000, 0, 100)
    return {"weights": m.weights, "gradients": m.gradients, "state": m.optimizer_state, "master": m.master_weights}


@pytest.mark.parametrize("precision, zero1, dp, expected", [
    ("fp32", False, 2, {"weights": 4000, "gradients": 4000, "state": 8000, "master": 0}),
    # FlatShardedAdamW under fp32 + ZeRO-1 keeps its own fp32 copy of the slice
    ("fp32", True, 2, {"weights": 4000, "gradients": 4000, "state": 4000, "master": 2000}),
    # fp32 accumulator of every local parameter (not sharded), master and moments sliced
    ("mixed_precision", True, 4, {"weights": 2000, "gradients": 4000, "state": 2000, "master": 1000}),
    ("mixed_precision", False, 4, {"weights": 2000, "gradients": 4000, "state": 8000, "master": 4000}),
    ("bf16SR", True, 2, {"weights": 2000, "gradients": 2000, "state": 2000, "master": 1000}),
])
def test_model_state_per_precision_mode_and_zero1(precision, zero1, dp, expected):
    assert _state(precision, zero1, dp) == expected


def test_build_transient_follows_how_the_family_builds():
    """A kit family builds sharded (a rank's shards plus one tensor); one without init_parameter builds whole."""
    import dataclasses

    run = resolve("llama3-tiny", "pretrain", [*SMALL, "distributed_strategy.tensor_model_parallel_size=2"])
    sharded = plan_memory(run, world_size=2)
    whole_family = dataclasses.replace(run, spec=dataclasses.replace(run.spec, init_parameter=None))
    plan = plan_memory(whole_family, world_size=2)
    whole = snapshot_of(run).full_bytes
    assert plan.ranks[0].phases["build"] >= whole > sharded.ranks[0].phases["build"]
    assert plan_memory(run, world_size=2, sharded_build=True).ranks[0].phases["build"] == sharded.ranks[0].phases["build"]


# -- the command line ---------------------------------------------------------------------------
def test_plan_command_json_and_verdict(capsys):
    code, out, _ = run_cli(capsys, "plan", "llama3-8b", "--device", "h100", "--nodes", "1", "--json",
                           "precision.type=mixed_precision", "model.activations_checkpoint_granularity=full",
                           "data.global_batch_size=64", "data.seq_length=4096")
    assert code == 0
    plan = json.loads(out)
    assert plan["layout"]["tp"] == 2 and plan["layout"]["dp"] == 4 and plan["device"]["memory_gib"] == 79.6
    assert {"weights_gib", "gradients_gib", "optimizer_state_gib", "activations_gib", "phases_gib"} <= set(plan["ranks"][0])
    assert plan["assumptions"] and plan["fits"] in (True, False)
    code, out, _ = run_cli(capsys, "plan", "llama3-8b", "--device", "h100", "--device-memory", "1", "--json")
    assert code == 0 and json.loads(out)["fits"] is False


@pytest.mark.parametrize("args, words", [
    (["--nodes", "0"], "--nodes"),
    (["distributed_strategy.context_parallel_size=2"], "context"),
    (["--device-memory", "-3"], "--device-memory"),
])
def test_plan_command_refusals_are_one_line(capsys, args, words):
    code, _, err = run_cli(capsys, "plan", "llama3-tiny", *args)
    assert code == 2 and err.count("\n") == 1 and words in err and "Traceback" not in err


def test_search_llama_405b_on_one_node_finds_nothing(capsys):
    code, out, _ = run_cli(capsys, "plan", "llama3.1-405b", "--recipe", "pretrain", "--device", "h100", "--nodes", "1",
                           "--search", "--sharded-build", "--json", "precision.type=mixed_precision",
                           "data.global_batch_size=64")
    result = json.loads(out)
    assert code == 0 and result["world_size"] == 8 and result["searched"] > 0 and result["fitting"] == 0


def test_published_layouts(capsys):
    """NxDT's Llama-3-70B TP32 x PP8 on 32 trn1 nodes fits; Llama-3.1-405B fits on 16 8xH100 nodes with a
    layout the search returns (and on one node with none); Mixtral-8x7B finds EP layouts on 4 nodes."""
    code, out, _ = run_cli(capsys, "plan", "llama3-70b", "--device", "trn1", "--nodes", "32", "--json",
                           "distributed_strategy.tensor_model_parallel_size=32",
                           "distributed_strategy.pipeline_model_parallel_size=8", "distributed_strategy.zero1=true",
                           "distributed_strategy.sequence_parallel=true", "distributed_strategy.kv_replicator=4",
                           "precision.type=mixed_precision", "model.activations_checkpoint_granularity=full",
                           "data.seq_length=8192", "model.max_position_embeddings=8192", "data.global_batch_size=1024")
    plan = json.loads(out)
    assert code == 0 and plan["fits"], plan["peak_gib"]
    code, out, _ = run_cli(capsys, "plan", "llama3.1-405b", "--device", "h100", "--nodes", "16", "--search", "--json")
    found = json.loads(out)
    assert code == 0 and found["fitting"] > 0 and found["best"]["fits"]
    code, out, _ = run_cli(capsys, "plan", "mixtral-8x7b", "--device", "h100", "--nodes", "4", "--search", "--json",
                           "--top", "500")
    found = json.loads(out)
    with_ep = [c for c in found["layouts"] if c["fits"] and c["layout_detail"]["ep"] > 1]
    assert code == 0 and found["fitting"] > 0 and with_ep
