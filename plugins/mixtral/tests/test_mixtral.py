"""The mixtral plugin and the kit's MoE layer: logits, router choices, auxiliary loss and its gradient at
parity with transformers' MixtralForCausalLM (hub checkpoints both ways), the grouped experts against a
per-expert loop, capacity drops, Sinkhorn routing, the fp32 router, keys, refusals, counts, conformance."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from nxdt.errors import ConfigError, NxdtError
from nxdt.modeling import MoE, MoEConfig, transformer_plan
from nxdt.modeling.moe import padded_bmm
from nxdt.modeling.moe_routing import capacity, load_balancing_loss, sinkhorn, z_loss
from nxdt.specs import ParallelDims
from nxdt.testing import build_initialized, run_conformance
from nxdt_mixtral.plugin import MIXTRAL_SPEC, MixtralConfig

TOL = 1e-5


def tiny(num_experts: int = 4, top_k: int = 2, **overrides) -> MixtralConfig:
    """A 2-layer, 64-wide Mixtral with GQA (4 query heads, 2 KV heads) unless overridden."""
    moe = MoEConfig(num_experts=num_experts, top_k=top_k, output_router_logits=True, router_aux_loss_coef=0.02)
    base = dict(vocab_size=128, hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                ffn_hidden_size=128, max_position_embeddings=128, moe=moe)
    return MixtralConfig(**{**base, **overrides})


def random_model(cfg: MixtralConfig, seed: int = 0) -> torch.nn.Module:
    """An nxdt Mixtral whose every weight is perturbed, so no two same-shaped tensors agree."""
    model = build_initialized(MIXTRAL_SPEC, cfg, seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


def export(model: torch.nn.Module, cfg: MixtralConfig, out: Path) -> Path:
    """The model as a hub-layout transformers directory (one tensor per expert)."""
    hf_state = MIXTRAL_SPEC.state_dict_adapter(cfg).to_hf(model.state_dict())
    save_file({k: v.contiguous() for k, v in hf_state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(MIXTRAL_SPEC.config_to_hf(cfg)))
    return out


CASES = {
    "4_experts_top1": tiny(4, 1),
    "8_experts_top2": tiny(8, 2),
    "gqa_1_kv_head": tiny(4, 2, num_kv_heads=1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_router_choices_match_transformers_both_ways(case, tmp_path):
    cfg = CASES[case]
    model = random_model(cfg).eval()
    hf = transformers.MixtralForCausalLM.from_pretrained(export(model, cfg, tmp_path), attn_implementation="eager").eval()
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in MIXTRAL_SPEC.state_dict_adapter(cfg).to_hf(
        model.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(input_ids=ids, output_router_logits=True)
    logit_diff = (ours - theirs.logits).abs().max().item()
    routers = [layer.feed_forward.router_logits for layer in model.layers.values()]
    router_diff = max((a - b.float()).abs().max().item() for a, b in zip(routers, theirs.router_logits, strict=True))
    k = cfg.moe.top_k
    same_choices = all(torch.equal(a.topk(k).indices, b.topk(k).indices) for a, b in zip(routers, theirs.router_logits))
    # transformers -> nxdt: its in-memory (fused) experts read back through the adapter
    back = build_initialized(MIXTRAL_SPEC, cfg, 3).eval()
    back.load_state_dict(MIXTRAL_SPEC.state_dict_adapter(cfg).from_hf(hf.state_dict()), strict=True)
    with torch.no_grad():
        back_diff = (back(ids) - theirs.logits).abs().max().item()
    print(f"{case}: logits {logit_diff:.2e}, router logits {router_diff:.2e}, HF->nxdt logits {back_diff:.2e}")
    assert logit_diff <= TOL and router_diff <= TOL and back_diff <= TOL and same_choices


def test_auxiliary_loss_and_its_gradient_match_transformers(tmp_path):
    """One MoE layer: nxdt's attached load-balancing loss gives transformers' loss value and gradients."""
    cfg = tiny(4, 2, num_layers=1)
    model = random_model(cfg).train()
    hf = transformers.MixtralForCausalLM.from_pretrained(export(model, cfg, tmp_path), attn_implementation="eager")
    hf.train()
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    out = hf(input_ids=ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    logits = model(ids)
    F.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1)).backward()
    layer = model.layers["0"].feed_forward
    router = layer.router_logits
    ours = load_balancing_loss(router, router.topk(2).indices, 4)
    theirs = load_balancing_loss_func((router,), 4, 2)
    assert abs(ours.item() - theirs.item()) <= TOL and abs(ours.item() - out.aux_loss.item()) <= TOL
    logged = layer.nxdt_step_metrics()["aux_loss"]
    assert abs((logged[0] / logged[1]).item() - out.aux_loss.item()) <= TOL
    hf_grads = MIXTRAL_SPEC.state_dict_adapter(cfg).from_hf({n: p.grad for n, p in hf.named_parameters()})
    worst = max((p.grad - hf_grads[n]).abs().max().item() for n, p in model.named_parameters())
    print(f"aux loss {ours.item():.6f} vs transformers {theirs.item():.6f}; max |grad diff| {worst:.2e}")
    assert worst <= TOL


def test_model_aux_loss_is_the_mean_over_moe_layers():
    cfg = tiny(4, 2, num_layers=3)
    model = random_model(cfg).train()
    model(torch.randint(0, cfg.vocab_size, (2, 16)))
    per_layer = []
    total = torch.zeros(2)
    for layer in model.layers.values():
        moe = layer.feed_forward
        per_layer.append(load_balancing_loss_func((moe.router_logits,), 4, 2).item())
        total += torch.stack(moe.nxdt_step_metrics()["aux_loss"])
    assert abs((total[0] / total[1]).item() - sum(per_layer) / 3) <= TOL


def test_router_z_loss_reaches_the_router_by_gradient():
    """With only a z-loss, the layer's output carries nothing back but z_coef * d z_loss / d router."""
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, top_k=2, output_router_logits=True, router_z_loss_coef=0.1)
    layer = MoE(16, 32, "swiglu", moe)
    layer.experts.init_weights(0.3, 0.3)
    torch.nn.init.normal_(layer.router.weight, std=0.3)
    x = torch.randn(2, 8, 16)
    (layer(x) * 0).sum().backward()
    logits = F.linear(x.reshape(-1, 16), layer.router.weight)
    (expected,) = torch.autograd.grad(0.1 * z_loss(logits), [layer.router.weight])
    assert torch.allclose(layer.router.weight.grad, expected, atol=1e-7)
    logged = layer.nxdt_step_metrics()["z_loss"]
    assert abs((logged[0] / logged[1]).item() - z_loss(logits).item()) <= TOL


# -- the layer against a per-expert loop -------------------------------------------------------------------
def loop_reference(layer: MoE, x: torch.Tensor, limit: int | None = None) -> torch.Tensor:
    """The MoE layer as a loop over experts and slots (the reference only): first choices fill capacity first."""
    tokens = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(F.linear(tokens.float(), layer.router.weight.float()), dim=-1)
    weights, idx = probs.topk(layer.cfg.top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(tokens)
    taken = [0] * layer.num_experts
    ex = layer.experts
    for j in range(idx.shape[1]):
        for t in range(idx.shape[0]):
            e = int(idx[t, j])
            if limit is not None and taken[e] >= limit:
                continue
            taken[e] += 1
            h = F.silu(tokens[t] @ ex.w1[e].T) * (tokens[t] @ ex.w3[e].T)
            out[t] = out[t] + weights[t, j] * (h @ ex.w2[e].T)
    return out.view_as(x)


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_grouped_experts_equal_a_per_expert_loop_forward_and_backward(capacity_factor):
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, top_k=2, capacity_factor=capacity_factor)
    layer = MoE(16, 32, "swiglu", moe)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 12, 16, requires_grad=True)
    limit = capacity(24, 4, 2, capacity_factor) if capacity_factor else None
    ours, ref = layer(x), loop_reference(layer, x, limit)
    grads = torch.autograd.grad(ours.square().sum(), [x, *layer.parameters()])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *layer.parameters()])
    assert (ours - ref).abs().max() <= TOL
    assert max((a - b).abs().max().item() for a, b in zip(grads, ref_grads)) <= 1e-4
    dropped = layer.nxdt_step_metrics()["moe/layer0/dropped_fraction"]
    assert (dropped[0] > 0) == (capacity_factor is not None)


def test_padded_batched_matmul_equals_the_grouped_kernel():
    x = torch.randn(10, 8)
    w = torch.randn(3, 5, 8)
    counts = torch.tensor([4, 0, 6])
    loop = torch.cat([x[:4] @ w[0].T, x[4:] @ w[2].T])
    assert torch.allclose(padded_bmm(x, w, counts), loop, atol=1e-6)
    from nxdt.modeling.moe import grouped_mm

    assert torch.allclose(grouped_mm(x, w, counts), loop, atol=1e-6)


def test_a_token_dropped_by_every_expert_passes_through_the_residual():
    torch.manual_seed(0)
    layer = MoE(8, 16, "swiglu", MoEConfig(num_experts=2, top_k=1, capacity_factor=0.25))
    layer.experts.init_weights(0.3, 0.3)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 1.0  # every token prefers expert 0
    x = torch.rand(1, 8, 8) + 0.1
    out = layer(x)
    # capacity ceil(0.25 * 8 / 2) = 1: the first token is served, the other seven are dropped (zero output)
    assert out[0, 0].abs().sum() > 0 and torch.all(out[0, 1:] == 0)
    assert layer.nxdt_step_metrics()["moe/layer0/dropped_fraction"][0].item() == 7


def test_sinkhorn_balances_top1_training_assignments_and_evaluates_top1():
    logits = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)) + torch.tensor([2.0, 0.0, 0.0, 0.0])
    assert logits.argmax(-1).bincount(minlength=4).max() >= 48  # most tokens prefer expert 0
    balanced = sinkhorn(logits).argmax(-1).bincount(minlength=4)
    assert balanced.max() <= 20 and balanced.min() >= 10  # near 64 / 4 each
    layer = MoE(8, 16, "swiglu", MoEConfig(num_experts=4, top_k=1, routing_algorithm="sinkhorn"))
    x = torch.randn(2, 16, 8)
    layer.eval()
    assert torch.equal(layer.route(x.reshape(-1, 8)).indices, layer.route(x.reshape(-1, 8)).logits.topk(1).indices)
    with pytest.raises(ValueError, match="top_k=1"):
        MoEConfig(num_experts=4, top_k=2, routing_algorithm="sinkhorn")


def test_router_runs_in_fp32_under_bf16():
    cfg = tiny(4, 2)
    model = random_model(cfg).to(torch.bfloat16).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randint(0, cfg.vocab_size, (2, 16)))
    assert logits.dtype == torch.bfloat16
    assert model.layers["0"].feed_forward.router_logits.dtype == torch.float32


# -- keys, refusals, counts ----------------------------------------------------------------------------------
def test_nxdt_moe_keys_and_hf_config_round_trip():
    from nxdt.errors import NxdtError
    from nxdt.resolve import resolve

    run = resolve("mixtral-tiny", overrides=["model.moe.top_k=1", "model.moe.capacity_factor=2.0",
                                             "model.moe.router_z_loss_coef=0.001"])
    moe = run.arch.moe
    assert (moe.num_experts, moe.top_k, moe.capacity_factor, moe.router_aux_loss_coef, moe.router_z_loss_coef) == (
        4, 1, 2.0, 0.02, 0.001)
    with pytest.raises(NxdtError, match="router_z_loss_coef takes effect only with moe.output_router_logits=true"):
        resolve("mixtral-tiny", overrides=["model.moe.output_router_logits=false", "model.moe.router_z_loss_coef=0.001"])
    inert = resolve("mixtral-tiny", overrides=["model.moe.output_router_logits=false", "model.moe.router_aux_loss_coef=0.02"])
    assert [n for n in inert.notes if "router_aux_loss_coef has no effect" in n]
    assert not [n for n in run.notes if "router" in n]
    hf = MIXTRAL_SPEC.config_to_hf(CASES["8_experts_top2"])
    assert (hf["num_local_experts"], hf["num_experts_per_tok"], hf["model_type"]) == (8, 2, "mixtral")
    assert MIXTRAL_SPEC.config_to_hf(MIXTRAL_SPEC.config_from_hf(hf)) == hf
    with pytest.raises(ValueError, match="router_jitter_noise"):
        MIXTRAL_SPEC.config_from_hf({**hf, "router_jitter_noise": 0.1})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.moe.dropless=true", "model.moe.capacity_factor=1.0"], "capacity_factor must be unset"),
        (["model.moe.routing_algorithm=sinkhorn"], "set top_k=1"),
        (["distributed_strategy.token_shuffle_group_size=2"], "shuffling tokens"),
        (["distributed_strategy.expert_model_parallel_size=2", "exp_manager.load_from_one_dp_rank=true"],
         "every rank must load"),
    ],
)
def test_settings_that_cannot_be_honoured_are_refused_in_one_line(overrides, message):
    from nxdt.resolve import resolve

    with pytest.raises(ConfigError, match=message) as err:
        resolve("mixtral-tiny", overrides=overrides)
    assert "\n" not in str(err.value)


def test_expert_parallel_sizes_that_cannot_split_the_experts():
    cfg = tiny(4, 2)
    with pytest.raises(ValueError, match="not divisible by expert_model_parallel_size=3"):
        transformer_plan(cfg, ParallelDims(dp=3, ep=3), "mixtral")
    plan = transformer_plan(cfg, ParallelDims(dp=2, ep=2, tp=2, sequence_parallel=True), "mixtral")
    assert plan.rules["layers.*.feed_forward"] == "expert" and "layers.*.feed_forward.w1" not in plan.rules
    with pytest.raises(ValueError, match="needs mixture-of-experts"):
        transformer_plan(dataclasses.replace(cfg, moe=None), ParallelDims(dp=2, ep=2), "mixtral")


def test_inspect_refuses_an_ep_size_that_does_not_split_the_experts(capsys):
    from nxdt.cli.main import main

    assert main(["inspect", "mixtral-tiny", "distributed_strategy.expert_model_parallel_size=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "num_experts 4 is not divisible by expert_model_parallel_size=3" in err


def test_every_nth_layer_is_moe_and_the_rest_dense():
    cfg = tiny(4, 2, num_layers=4, moe=MoEConfig(num_experts=4, top_k=2, frequency=2))
    model = random_model(cfg)
    kinds = [type(layer.feed_forward).__name__ for layer in model.layers.values()]
    assert kinds == ["MoE", "MLP", "MoE", "MLP"]
    assert MIXTRAL_SPEC.num_parameters(cfg) == sum(p.numel() for p in model.parameters())
    rules = transformer_plan(cfg, ParallelDims(tp=2), "mixtral").rules
    assert rules["layers.2.feed_forward"] == "expert" and rules["layers.1.feed_forward.w1"] == "colwise"
    assert model(torch.randint(0, 128, (1, 8))).shape == (1, 8, 128)
    with pytest.raises(NxdtError, match="frequency"):
        MIXTRAL_SPEC.config_to_hf(cfg)


@pytest.mark.parametrize(
    "preset, parameters, active",
    [("mixtral-8x7b", 46_702_792_704, 12_879_925_248), ("mixtral-8x22b", 140_630_071_296, 39_161_468_928)],
)
def test_inspect_counts_total_and_active_parameters(preset, parameters, active, capsys):
    from nxdt.cli.main import main

    assert main(["inspect", preset, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["parameters"], info["active_parameters"], info["is_moe"]) == (parameters, active, True)
    # FLOPs per token count the top-2 experts a token runs through, not all eight
    assert 6 * active * 0.9 < info["flops_per_token"] < 6 * parameters * 0.5
    assert info["shard_plan"]["layers.*.feed_forward"] == "expert"


def test_conformance():
    results = run_conformance(MIXTRAL_SPEC, tiny(4, 2), hf_parity=False)
    print(results)
