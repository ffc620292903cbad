"""LoRA on any family's linear layers, tensor-parallel included.

A target ``nn.Linear`` becomes a :class:`LoRALinear` in place: its ``weight``/``bias`` keep their
names (shard plans, KV replication, checkpoints and HF adapters still find them) and it gains
``lora_A`` ``[r, in]`` and ``lora_B`` ``[out, r]``; the output is ``W x + b + (alpha / r) B A
dropout(x)``. Under tensor parallelism the styles of ``nxdt.parallel.tensor_parallel`` shard the
adapters with the base: a column-parallel base gets a column-parallel ``lora_B`` and a replicated
``lora_A``, a row-parallel base a row-parallel ``lora_A`` and a replicated ``lora_B``; KV-head
replication repeats ``lora_B``'s rows with the weight's. The base is frozen: gradients, optimizer
state and ZeRO-1 buffers exist only for the adapters (and the biases ``lora_bias`` asks for).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nxdt.errors import ConfigError

ADAPTER_PARAMS = ("lora_A", "lora_B")


@dataclass(frozen=True)
class LoRASettings:
    """The NxDT ``model_alignment_strategy.peft`` keys the transform needs."""

    rank: int
    alpha: float
    dropout: float
    bias: str  # none | all | lora_only
    targets: tuple[str, ...]  # target names as the user gave them

    @property
    def scale(self) -> float:
        """The adapter's output scale, ``alpha / r`` (PEFT's default scaling)."""
        return self.alpha / self.rank

    @classmethod
    def from_section(cls, peft: Any, default_targets: Sequence[str]) -> LoRASettings:
        """From the config section; no ``target_modules`` means the family's default targets."""
        targets = tuple(peft.target_modules) if peft.target_modules else tuple(default_targets)
        return cls(int(peft.lora_rank), float(peft.lora_alpha), float(peft.lora_dropout), str(peft.lora_bias), targets)

    @classmethod
    def for_family(cls, peft: Any, spec: Any) -> LoRASettings:
        """From the config section, defaulting to the family's fused ``qkv_proj`` (NxDT's default) or its first target."""
        default = ("qkv_proj",) if "qkv_proj" in spec.peft_targets else tuple(sorted(spec.peft_targets))[:1]
        return cls.from_section(peft, default)


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a low-rank update; ``adapters_enabled=False`` gives the base model's output."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    lora_scale: float
    lora_dropout: float
    adapters_enabled: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus the scaled adapter output."""
        out = F.linear(x, self.weight, self.bias)
        if not self.adapters_enabled:
            return out
        h = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        return out + F.linear(F.linear(h, self.lora_A), self.lora_B) * self.lora_scale

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W + (alpha / r) B A``: the weight of the equivalent plain Linear."""
        return self.weight + (self.lora_B.float() @ self.lora_A.float()).to(self.weight.dtype) * self.lora_scale


def target_globs(spec: Any, targets: Sequence[str]) -> list[str]:
    """Module globs for the target names (NxDT fused names such as ``qkv_proj``, HF names such as ``q_proj``)."""
    globs: list[str] = []
    unknown = [t for t in targets if t not in spec.peft_targets]
    if unknown:
        known = ", ".join(sorted(spec.peft_targets))
        raise ConfigError(
            f"model_alignment_strategy.peft.target_modules: {unknown} are not {spec.family} targets; use some of {known}"
        )
    for target in targets:
        globs += list(spec.peft_targets[target])
    return globs


@torch.no_grad()
def inject_lora(model: nn.Module, globs: Sequence[str], settings: LoRASettings, seed: int) -> list[str]:
    """Turn every ``nn.Linear`` matching ``globs`` into a LoRALinear; freeze the rest. Returns the adapted FQNs.

    Adapters are initialised as PEFT does (A Kaiming-uniform, B zero, so training starts from the
    base model exactly), from ``seed`` in module order, identically on every rank.
    """
    adapted = []
    generator = torch.Generator(device="cpu").manual_seed(seed + 7001)
    for name, module in model.named_modules():
        if not any(fnmatch.fnmatchcase(name, g) for g in globs):
            continue
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"LoRA target {name} is a {type(module).__name__}, not a linear layer")
        weight = module.weight
        a = torch.empty(settings.rank, module.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        module.__class__ = LoRALinear
        lora: LoRALinear = module  # type: ignore[assignment]
        lora.lora_A = nn.Parameter(a.to(device=weight.device, dtype=weight.dtype))
        lora.lora_B = nn.Parameter(torch.zeros(module.out_features, settings.rank, device=weight.device, dtype=weight.dtype))
        lora.lora_scale = settings.scale
        lora.lora_dropout = settings.dropout
        lora.adapters_enabled = True
        adapted.append(name)
    if not adapted:
        raise ConfigError(f"model_alignment_strategy.peft.target_modules {list(settings.targets)} match no module")
    freeze_base(model, adapted, settings.bias)
    return adapted


def freeze_base(model: nn.Module, adapted: Sequence[str], bias: str) -> None:
    """Only adapters train, plus biases: every bias with ``all``, the adapted layers' with ``lora_only``."""
    adapted_set = set(adapted)
    for name, param in model.named_parameters():
        module, _, leaf = name.rpartition(".")
        if leaf in ADAPTER_PARAMS:
            param.requires_grad_(True)
        elif leaf == "bias" and (bias == "all" or (bias == "lora_only" and module in adapted_set)):
            param.requires_grad_(True)
        else:
            param.requires_grad_(False)


def adapter_roles(model: nn.Module) -> dict[str, str]:
    """Parameter name -> ``adapter`` for every LoRA parameter (for the per-parameter record)."""
    return {n: "adapter" for n, _ in model.named_parameters() if n.rpartition(".")[2] in ADAPTER_PARAMS}


def set_adapters(model: nn.Module, enabled: bool) -> None:
    """Enable or disable every adapter (disabled: the frozen base model, e.g. DPO's reference)."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.adapters_enabled = enabled


def lora_modules(model: nn.Module) -> Mapping[str, LoRALinear]:
    """FQN -> LoRALinear of every adapted layer."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of the (single-device) model."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
