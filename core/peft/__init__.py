"""Parameter-efficient fine-tuning: LoRA on any family's linear layers (tensor-parallel included)."""

from nxdt.peft.lora import LoRALinear, LoRASettings, inject_lora, set_adapters, target_globs

__all__ = ["LoRALinear", "LoRASettings", "inject_lora", "set_adapters", "target_globs"]
