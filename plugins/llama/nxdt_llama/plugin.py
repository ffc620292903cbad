"""nxdt-llama: the Llama family (Llama 2, 3, 3.1) and Mistral (sliding-window attention), from the kit.

Everything generic (RoPE with llama3 scaling, GQA attention, RMSNorm, SwiGLU, the decoder, init,
the shard plan, the HF key tables) comes from ``nxdt.modeling``; what is Llama's own is its HF
config names and that a sliding-window model is exported as Mistral.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nxdt import hookimpl
from nxdt.modeling import HFConfigTable, TransformerConfig, transformer_family, write_hf_config
from nxdt.specs import ModelSpec

NXDT_PLUGIN_API = 2


@dataclass
class LlamaConfig(TransformerConfig):
    """A Llama/Mistral decoder: RMSNorm, RoPE, SwiGLU, GQA (defaults are HF ``LlamaConfig``'s)."""


LLAMA_HF = HFConfigTable(model_type="llama", architecture="LlamaForCausalLM", also_reads=("mistral",))


def config_to_hf(cfg: LlamaConfig) -> dict[str, Any]:
    """An HF config.json: ``LlamaForCausalLM``, or ``MistralForCausalLM`` when attention is windowed."""
    out = write_hf_config(LLAMA_HF, cfg)
    if cfg.sliding_window is not None:
        out.update(model_type="mistral", architectures=["MistralForCausalLM"])
    return out


LLAMA_SPEC = transformer_family(
    "llama",
    LLAMA_HF,
    config_class=LlamaConfig,
    config_to_hf=config_to_hf,
    plugin="llama",
)


@hookimpl
def nxdt_register_models(register: Callable[[ModelSpec], None]) -> None:
    """Register the llama ModelSpec."""
    register(LLAMA_SPEC)
