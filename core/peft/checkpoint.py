"""What a LoRA run's checkpoints hold and load (NxDT's ``model_alignment_strategy.peft`` keys).

- ``save_lora_base`` false (the default): checkpoints hold the adapters (and trainable biases)
  only; the frozen base comes back from where the run took it (``model.hf_checkpoint``, a
  ``resume_from_checkpoint``, or the seeded initialisation).
- ``merge_lora``: the *final* checkpoint holds the merged weights ``W + (alpha / r) B A`` under
  the base names and no adapters, for export and inference (intermediate ones stay resumable).
- ``load_lora_from_ckpt``: ``resume_from_checkpoint`` loads the checkpoint's adapters too;
  false takes only its base weights and starts fresh adapters (a LoRA run on a pretrained nxdt
  checkpoint). Auto-resume of the run's own checkpoints always loads its adapters.
- ``save_lora_config_adapter`` writes PEFT's ``adapter_config.json`` into each checkpoint, and
  ``merge_sharded_lora`` also the adapters gathered into one ``adapter_model.safetensors``, so the
  checkpoint directory loads directly with ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

from typing import Any

import torch

from nxdt.peft.lora import ADAPTER_PARAMS, LoRALinear


def peft_section(cfg: Any) -> Any:
    """The run's ``model_alignment_strategy.peft`` section, or None."""
    return cfg.model_alignment_strategy.peft if cfg.model_alignment_strategy is not None else None


def is_adapter_key(key: str) -> bool:
    """Whether a saved model key is a LoRA adapter tensor."""
    return key.rpartition(".")[2] in ADAPTER_PARAMS


@torch.no_grad()
def checkpoint_model_state(model: Any, portable: Any, state: dict[str, Any], peft: Any, final: bool) -> dict[str, Any]:
    """The model part of a LoRA run's checkpoint (see the module docstring)."""
    if final and peft.merge_lora:
        from nxdt.parallel.grad_norm import local_tensor

        merged = dict(state)
        for name, module in model.trainable_module.named_modules():
            if isinstance(module, LoRALinear):
                key = portable.key[f"{name.replace('_checkpoint_wrapped_module.', '')}.weight"]
                merged[key] = portable.saved(module.weight, local_tensor(module.merged_weight()))
        return {k: v for k, v in merged.items() if not is_adapter_key(k)}
    if peft.save_lora_base:
        return state
    trainable = {r.name for r in model.records.trainable()}
    return {k: v for k, v in state.items() if k in trainable}


def wanted_on_load(saved_model_keys: set[str], peft: Any, own_checkpoint: bool) -> set[str]:
    """The saved model keys a LoRA run loads: base keys the checkpoint has, adapters when it should take them."""
    take_adapters = own_checkpoint or bool(peft.load_lora_from_ckpt)
    return {k for k in saved_model_keys if take_adapters or not is_adapter_key(k)}


def write_peft_files(store: Any, target: str, run: Any, marker_less_state: dict[str, torch.Tensor], peft: Any) -> list[str]:
    """Rank 0, after the shards are written: PEFT's files inside the checkpoint directory; returns their names."""
    from safetensors.torch import save as safetensors_bytes

    from nxdt.peft.export import peft_adapter

    config, tensors = peft_adapter(run, marker_less_state)
    written = []
    if peft.save_lora_config_adapter:
        import json

        store.write_text(json.dumps(config, indent=2), target, "adapter_config.json")
        written.append("adapter_config.json")
    if peft.merge_sharded_lora:
        data = safetensors_bytes({k: v.detach().clone().contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
        store.write_bytes(data, target, "adapter_model.safetensors")
        written.append("adapter_model.safetensors")
    return written
