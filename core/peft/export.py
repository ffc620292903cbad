"""LoRA checkpoints out: PEFT adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``
with HF module names) and merged weights for ``nxdt export --to hf``.

Names go through the family's own HF state-dict adapter, so fused layouts split the way the
family's weights do: an adapter on nxdt's fused ``wqkv`` becomes ``q_proj``/``k_proj``/``v_proj``
adapters sharing ``lora_A``, and adapters on separate nxdt q/k/v projections that HF stores as
one module (GPT-2's ``c_attn``) become one adapter of rank ``k * r`` with a block-diagonal
``lora_B`` (``rank_pattern``/``alpha_pattern`` keep PEFT's scale ``alpha / r``). Either way
PEFT computes exactly nxdt's update.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nxdt.errors import NxdtError

LORA_KEYS = ("lora_A", "lora_B")


def split_lora_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(base tensors, module FQN -> {"lora_A": ..., "lora_B": ...}) of a model state dict."""
    base: dict[str, torch.Tensor] = {}
    adapters: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        if leaf in LORA_KEYS:
            adapters[module][leaf] = tensor
        else:
            base[key] = tensor
    return base, dict(adapters)


def lora_settings_of(cfg: Any) -> Any:
    """The LoRASettings of a run config (one that trained LoRA)."""
    from nxdt.peft.lora import LoRASettings

    peft = cfg.model_alignment_strategy.peft if cfg.model_alignment_strategy else None
    if peft is None:
        raise NxdtError("the checkpoint holds LoRA adapters but its config has no model_alignment_strategy.peft")
    return LoRASettings.from_section(peft, ())


@torch.no_grad()
def merge_adapters(base: Mapping[str, torch.Tensor], adapters: Mapping[str, Mapping[str, torch.Tensor]],
                   scale: float) -> dict[str, torch.Tensor]:
    """``W + scale * B A`` for every adapted module; other tensors unchanged."""
    merged = dict(base)
    for module, ab in adapters.items():
        key = f"{module}.weight"
        if key not in merged:
            raise NxdtError(f"LoRA adapter {module} has no base weight {key} to merge into")
        w = merged[key]
        merged[key] = (w.float() + scale * (ab["lora_B"].float() @ ab["lora_A"].float())).to(w.dtype)
    return merged


@torch.no_grad()
def base_state_of(run: Any) -> dict[str, torch.Tensor]:
    """The weights a LoRA run started from: its ``model.hf_checkpoint``, else the seeded initialisation."""
    from nxdt.parallel.apply import single_device_state

    return single_device_state(run)


def _hf_blocks(adapter: Any, adapters: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """HF module -> (lora_A, lora_B, number of nxdt adapters merged into it), through the family adapter.

    Each nxdt adapter's B occupies its own block of columns of a padded fake weight; the family's
    ``to_hf`` routes rows (splitting fused nxdt layouts, joining HF-fused ones), so the HF module's
    B comes out with one column block per contributing adapter, and its A is those adapters' As.
    A second pass with blocks of ones tells which adapters reach which HF module (a B may be zero).
    """
    modules = sorted(adapters)
    rank = {m: adapters[m]["lora_A"].shape[0] for m in modules}
    offsets, width = {}, 0
    for m in modules:
        offsets[m] = width
        width += rank[m]
    out_sizes = {adapters[m]["lora_B"].shape[0] for m in modules}
    pad = 1 if width in out_sizes else 0  # keep the fake weights non-square so a transposed table shows

    def route(fill: Any) -> dict[str, torch.Tensor]:
        fake = {}
        for m in modules:
            block = torch.zeros(adapters[m]["lora_B"].shape[0], width + pad, dtype=torch.float32)
            block[:, offsets[m] : offsets[m] + rank[m]] = fill(m)
            fake[f"{m}.weight"] = block
        routed = adapter.to_hf(fake)
        # a Conv1D table transposes weights; PEFT keeps lora_B as [out, r]
        return {k.removesuffix(".weight"): (v if v.shape[-1] == width + pad else v.t())
                for k, v in routed.items() if k.endswith(".weight")}

    values = route(lambda m: adapters[m]["lora_B"].float())
    markers = route(lambda m: 1.0)
    result = {}
    for module, b_hf in values.items():
        used = [m for m in modules if markers[module][:, offsets[m] : offsets[m] + rank[m]].any()]
        a = torch.cat([adapters[m]["lora_A"].float() for m in used], dim=0)
        b = torch.cat([b_hf[:, offsets[m] : offsets[m] + rank[m]] for m in used], dim=1)
        result[module] = (a, b, len(used))
    return result


def peft_adapter(run: Any, state: Mapping[str, torch.Tensor], base_model: str = "") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json dict, adapter_model.safetensors tensors) of a LoRA run's model state."""
    settings = lora_settings_of(run.config)
    base, adapters = split_lora_state(state)
    if not adapters:
        raise NxdtError("the checkpoint holds no LoRA adapters (was it trained with model_alignment_strategy.peft?)")
    adapter = run.spec.state_dict_adapter(run.arch)
    blocks = _hf_blocks(adapter, adapters)
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    dtype = next(iter(next(iter(adapters.values())).values())).dtype
    for module, (a, b, n) in sorted(blocks.items()):
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.to(dtype).contiguous()
        if n > 1:
            rank_pattern[module] = settings.rank * n
            alpha_pattern[module] = settings.alpha * n
    if settings.bias != "none":
        biases = {k: v for k, v in base.items() if k.endswith(".bias")}
        if settings.bias == "lora_only":
            biases = {k: v for k, v in biases.items() if k.removesuffix(".bias") in adapters}
        for key, value in adapter.to_hf(biases).items():
            tensors[f"base_model.model.{key}"] = value.contiguous()
    targets = _target_names(run, adapter, set(blocks))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if run.spec.task == "causal_lm" else None,
        "base_model_name_or_path": base_model or run.config.model.hf_checkpoint or None,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": targets,
        "bias": settings.bias,
        # HF Conv1D layers (GPT-2) store [in, out]; PEFT's flag for them
        "fan_in_fan_out": bool(set(getattr(getattr(adapter, "t", None), "transposed", ())) & _leaf_paths(blocks)),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
    }
    return config, tensors


def _target_names(run: Any, adapter: Any, adapted: set[str]) -> list[str]:
    """PEFT ``target_modules``: leaf names where they select exactly the adapted HF modules, else full paths.

    (GPT-2's ``c_proj`` names both the attention output and the MLP output; adapting one of them
    must not make PEFT wrap the other.)
    """
    from nxdt.model_info import build_on_meta
    from nxdt.plugin_host import get_host

    meta = build_on_meta(lambda cfg: get_host().build_model(run.spec, cfg), run.arch)
    hf_keys = adapter.to_hf({k: v for k, v in meta.state_dict().items()})
    all_modules = {k.rpartition(".")[0] for k in hf_keys if k.endswith(".weight")}
    names: set[str] = set()
    for leaf in {m.rpartition(".")[2] for m in adapted}:
        with_leaf = {m for m in all_modules if m.rpartition(".")[2] == leaf}
        chosen = {m for m in adapted if m.rpartition(".")[2] == leaf}
        names |= {leaf} if with_leaf == chosen else chosen
    return sorted(names)


def _leaf_paths(blocks: Mapping[str, Any]) -> set[str]:
    """Module paths inside a block (``attn.c_attn``) of the HF modules, for the transposed-table check."""
    out = set()
    for module in blocks:
        parts = module.split(".")
        for i, part in enumerate(parts):
            if part.isdigit():
                out.add(".".join(parts[i + 1 :]))
                break
    return out


def write_peft(out_dir: str | Path, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write a PEFT adapter directory."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(dict(config), indent=2))
    return out
