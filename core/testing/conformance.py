"""Conformance checks any model plugin can run against its own ModelSpec (no plugin manager needed).

Each check builds what it needs from ``spec`` and a (tiny) architecture config, raises
AssertionError naming what is wrong, and returns something worth printing. Parity checks use
transformers as the oracle at fp32 and perturb every weight so that mixed-up tensors of the same
shape (two norms, q and k, gate and up) cannot go unnoticed.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from nxdt import model_info
from nxdt.specs import ModelSpec, ParallelDims

# styles whose target must be a matrix the engine can split
_MATRIX_STYLES = ("colwise", "rowwise", "embedding", "lm_head")


def build_on_meta(spec: ModelSpec, cfg: Any) -> nn.Module:
    """Build ``spec``'s model for ``cfg`` on the meta device."""
    return model_info.build_on_meta(spec.build_model, cfg)


def build_initialized(spec: ModelSpec, cfg: Any, seed: int = 0, device: str = "cpu") -> nn.Module:
    """Build on meta, materialise with ``to_empty`` and fill with ``spec.init_weights``: the engine's path."""
    model = build_on_meta(spec, cfg).to_empty(device=device)
    torch.manual_seed(seed)
    spec.init_weights(model, cfg)
    return model


def _tensors(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    return itertools.chain(model.named_parameters(), model.named_buffers())


def check_builds_on_meta(spec: ModelSpec, cfg: Any) -> int:
    """Build on the meta device, assert nothing got real storage, return the (unique) parameter count."""
    model = build_on_meta(spec, cfg)
    real = [f"{name} ({t.device})" for name, t in _tensors(model) if not t.is_meta]
    assert not real, f"{spec.family}: build_model allocated real tensors under torch.device('meta'): {real}"
    return sum(p.numel() for p in model.parameters())


def check_init_weights(spec: ModelSpec, cfg: Any) -> None:
    """After meta build + ``to_empty`` + ``init_weights`` every float tensor is set and buffers match an eager build.

    Builds the model eagerly on CPU too, so ``cfg`` must be small.
    """
    model = build_on_meta(spec, cfg).to_empty(device="cpu")
    with torch.no_grad():
        for _, t in _tensors(model):
            if t.is_floating_point():
                t.fill_(float("nan"))  # whatever init_weights forgets stays NaN
    torch.manual_seed(0)
    spec.init_weights(model, cfg)
    bad = [name for name, t in _tensors(model) if t.is_floating_point() and not torch.isfinite(t).all()]
    assert not bad, f"{spec.family}: init_weights left these tensors unset after to_empty: {bad}"
    eager = spec.build_model(cfg)
    eager_buffers = dict(eager.named_buffers())
    for name, buf in model.named_buffers():
        assert torch.equal(buf, eager_buffers[name]), (
            f"{spec.family}: buffer {name} differs from an eager build"
        )


def check_shard_plan_matches(spec: ModelSpec, cfg: Any, parallel: ParallelDims | None = None) -> None:
    """Every glob of the shard plan (rules, SP rules, KV projections) names at least one module of the model.

    Targets of colwise/rowwise/embedding/lm_head must also hold a 2-D ``weight``.
    """
    parallel = parallel or ParallelDims()
    plan = spec.shard_plan(cfg, parallel)
    modules = dict(build_on_meta(spec, cfg).named_modules())
    globs = {**plan.rules, **plan.sequence_parallel, **dict.fromkeys(plan.kv_projections, "kv_projection")}
    unmatched = [glob for glob in globs if not fnmatch.filter(modules, glob)]
    assert not unmatched, f"{spec.family}: shard plan globs match no module: {unmatched}"
    for glob, style in plan.rules.items():
        if style not in _MATRIX_STYLES:
            continue
        for name in fnmatch.filter(modules, glob):
            weight = getattr(modules[name], "weight", None)
            assert isinstance(weight, torch.Tensor) and weight.dim() == 2, (
                f"{spec.family}: shard plan styles {name!r} ({glob!r}) as {style!r} but it has no 2-D weight"
            )


def check_named_modules(spec: ModelSpec, cfg: Any) -> None:
    """``pipeline_blocks``, every ``peft_targets`` entry and every ``recompute_modules`` class exist in the model."""
    model = build_on_meta(spec, cfg)
    modules = dict(model.named_modules())
    if spec.pipeline_blocks is not None:
        missing = [name for name in spec.pipeline_blocks(cfg) if not fnmatch.filter(modules, name)]
        assert not missing, f"{spec.family}: pipeline_blocks name no module: {missing}"
    unmatched = [t for t, globs in spec.peft_targets.items() if not any(fnmatch.filter(modules, g) for g in globs)]
    fuse_flags = {f: False for f in ("fuse_qkv", "fuse_gate_up") if getattr(cfg, f, False)}
    if unmatched and fuse_flags and dataclasses.is_dataclass(cfg):
        # HF single-projection names (q_proj) have no module in a fused layout; the unfused one must have them.
        unfused = dict(build_on_meta(spec, dataclasses.replace(cfg, **fuse_flags)).named_modules())  # type: ignore[type-var]
        unmatched = [t for t in unmatched if not any(fnmatch.filter(unfused, g) for g in spec.peft_targets[t])]
    assert not unmatched, f"{spec.family}: PEFT targets {unmatched} match no module"
    present = {type(m) for m in modules.values()}
    for name, cls in spec.recompute_modules.items():
        assert cls in present, (
            f"{spec.family}: recompute module {name!r} ({cls.__name__}) does not occur in the model"
        )


def check_adapter_round_trip(spec: ModelSpec, cfg: Any) -> None:
    """``from_hf(to_hf(sd))`` returns exactly the model's state dict, which loads back strictly."""
    model = build_initialized(spec, cfg)
    state = model.state_dict()
    adapter = spec.state_dict_adapter(cfg)
    back = adapter.from_hf(adapter.to_hf(state))
    assert set(back) == set(state), (
        f"{spec.family}: adapter round trip changed keys: lost {sorted(set(state) - set(back))}, "
        f"gained {sorted(set(back) - set(state))}"
    )
    changed = [key for key in state if not torch.equal(state[key], back[key])]
    assert not changed, f"{spec.family}: adapter round trip changed tensors: {changed}"
    build_initialized(spec, cfg).load_state_dict(back, strict=True)


def check_config_round_trip(spec: ModelSpec, cfg: Any) -> dict[str, Any]:
    """What ``config_to_hf`` writes survives ``config_from_hf`` (nxdt-only keys such as layouts may not); returns the HF dict."""
    hf_dict = spec.config_to_hf(cfg)
    again = spec.config_to_hf(spec.config_from_hf(hf_dict))
    assert again == hf_dict, f"{spec.family}: HF config changed through config_from_hf: {hf_dict} -> {again}"
    return hf_dict


def _perturb(model: nn.Module, seed: int) -> None:
    """Add noise to every parameter, so norms are not all ones and no two same-shaped tensors agree."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.05)


def build_hf_model(spec: ModelSpec, cfg: Any, seed: int = 0) -> nn.Module:
    """The transformers model for ``spec.config_to_hf(cfg)``, randomly initialised, fp32, eval mode."""
    import transformers

    hf_dict = dict(spec.config_to_hf(cfg))
    architecture = (hf_dict.get("architectures") or [spec.hf_architecture])[0]
    model_type = hf_dict.pop("model_type", None) or spec.hf_model_types[0]
    hf_config = transformers.AutoConfig.for_model(model_type, **hf_dict)
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)._from_config(hf_config, attn_implementation="eager")
    return model.float().eval()


def load_into_hf(hf_model: nn.Module, hf_state_dict: dict[str, torch.Tensor]) -> None:
    """Load strictly, except that keys transformers ties to another weight may be absent."""
    result = hf_model.load_state_dict(hf_state_dict, strict=False)
    tied = getattr(hf_model, "_tied_weights_keys", None) or ()
    tied_ok = set(tied) if getattr(hf_model.config, "tie_word_embeddings", False) else set()
    missing = set(result.missing_keys) - tied_ok
    assert not missing and not result.unexpected_keys, (
        f"HF load: missing {sorted(missing)}, unexpected {sorted(result.unexpected_keys)}"
    )


def check_hf_parity(
    spec: ModelSpec, cfg: Any, atol: float = 1e-5, seq_len: int = 32, batch: int = 2, seed: int = 0
) -> float:
    """fp32 logits parity with transformers on random ids, weights moved HF->nxdt and nxdt->HF; returns the max abs diff."""
    hf_dict = spec.config_to_hf(cfg)
    seq_len = min(seq_len, hf_dict.get("max_position_embeddings", seq_len))
    ids = torch.randint(
        0, hf_dict["vocab_size"], (batch, seq_len), generator=torch.Generator().manual_seed(seed)
    )
    adapter = spec.state_dict_adapter(cfg)
    diffs = []

    # HF weights -> nxdt
    hf_model = build_hf_model(spec, cfg, seed)
    _perturb(hf_model, seed)
    model = build_initialized(spec, cfg, seed).eval()
    model.load_state_dict(adapter.from_hf(hf_model.state_dict()), strict=True)
    diffs.append(_max_diff(model, hf_model, ids))

    # nxdt weights -> HF
    model = build_initialized(spec, cfg, seed + 1).eval()
    _perturb(model, seed + 1)
    hf_model = build_hf_model(spec, cfg, seed + 1)
    load_into_hf(hf_model, adapter.to_hf(model.state_dict()))
    diffs.append(_max_diff(model, hf_model, ids))

    worst = max(diffs)
    assert worst <= atol, (
        f"{spec.family}: logits differ from transformers by {diffs} (HF->nxdt, nxdt->HF) > {atol}"
    )
    return worst


def _max_diff(model: nn.Module, hf_model: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        ours = model(ids)
        theirs = hf_model(input_ids=ids).logits
    assert ours.shape == theirs.shape, (
        f"logits shape {tuple(ours.shape)} != transformers {tuple(theirs.shape)}"
    )
    return (ours - theirs).abs().max().item()


def check_override_hooks(plugin: Any, spec: ModelSpec, cfg: Any, parallel: ParallelDims | None = None) -> list[str]:
    """A plugin's ``nxdt_build_model`` / ``nxdt_shard_plan`` overrides for ``spec`` give a usable model and plan.

    An overriding model must keep the family's parameter names and shapes (checkpoints, the HF
    adapter and the shard plan name them); an overriding plan's globs must match its modules.
    Returns the hooks that overrode something.
    """
    parallel = parallel or ParallelDims(tp=2, sequence_parallel=True)
    used = []
    model = build_on_meta(spec, cfg)
    build = getattr(plugin, "nxdt_build_model", None)
    if build is not None:
        with torch.device("meta"):
            override = build(spec=spec, config=cfg)
        if override is not None:
            used.append("nxdt_build_model")
            ours = {n: tuple(p.shape) for n, p in model.named_parameters()}
            theirs = {n: tuple(p.shape) for n, p in override.named_parameters()}
            assert ours == theirs, (
                f"{spec.family}: nxdt_build_model changes parameter names or shapes: "
                f"{sorted(set(ours.items()) ^ set(theirs.items()))[:4]}"
            )
            model = override
    plan_hook = getattr(plugin, "nxdt_shard_plan", None)
    if plan_hook is not None:
        plan = plan_hook(spec=spec, config=cfg, parallel=parallel)
        if plan is not None:
            used.append("nxdt_shard_plan")
            modules = dict(model.named_modules())
            globs = {**plan.rules, **plan.sequence_parallel, **dict.fromkeys(plan.kv_projections, "kv")}
            unmatched = [g for g in globs if not fnmatch.filter(modules, g)]
            assert not unmatched, f"{spec.family}: the nxdt_shard_plan override's globs match no module: {unmatched}"
    return used


def run_conformance(
    spec: ModelSpec,
    cfg: Any,
    parallel: ParallelDims | None = None,
    hf_parity: bool = True,
    distributed: bool = False,
) -> dict[str, Any]:
    """Run every check on ``cfg`` (a dataclass with ``num_layers`` is cut to 2 layers); returns their results.

    ``distributed`` adds the TP=2 forward on two gloo processes (a few seconds).
    """
    from nxdt.testing import layouts

    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type) and getattr(cfg, "num_layers", 0) > 2:
        cfg = dataclasses.replace(cfg, num_layers=2)
    results: dict[str, Any] = {"parameters": check_builds_on_meta(spec, cfg)}
    if spec.num_parameters is not None:
        formula = spec.num_parameters(cfg)
        assert formula == results["parameters"], (
            f"{spec.family}: num_parameters says {formula:,}, the built model has {results['parameters']:,}"
        )
    check_init_weights(spec, cfg)
    check_shard_plan_matches(spec, cfg, parallel)
    check_named_modules(spec, cfg)
    check_adapter_round_trip(spec, cfg)
    check_config_round_trip(spec, cfg)
    flops = spec.flops_per_token(cfg, 128)
    assert flops > 0, f"{spec.family}: flops_per_token must be positive, got {flops}"
    results["flops_per_token"] = flops
    if spec.pipeline_blocks is not None:
        results["pipeline_split_diff"] = layouts.check_pipeline_split(spec, cfg)
    if "position_ids" in spec.inputs and getattr(cfg, "causal", True):
        results["packed_documents_diff"] = layouts.check_packed_documents(spec, cfg)
    if distributed:
        results["tensor_parallel_diff"] = layouts.check_tensor_parallel(spec, cfg)
    if hf_parity and (spec.hf_architecture or spec.config_to_hf(cfg).get("architectures")):
        results["hf_max_abs_diff"] = check_hf_parity(spec, cfg)
    return results
