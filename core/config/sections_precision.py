"""The ``precision`` section and its resolution into concrete dtypes (NxDT semantics)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from pydantic import model_validator

from nxdt.config.sections_base import Section, Str, backend_only

Dtype = Literal["fp32", "bf16"]
PrecisionType = Literal["fp32", "autocast", "bf16SR", "mixed_precision", "mixed_precisionSR", "manual"]


@dataclass(frozen=True)
class ResolvedPrecision:
    """Concrete dtypes and options of a precision type; the engine acts on these, not on the type name."""

    param_dtype: Dtype
    compute_dtype: Dtype
    master_weights: bool  # an fp32 copy of bf16 parameters that the optimizer updates
    fp32_grad_acc: bool  # accumulate gradients of bf16 parameters in fp32
    stochastic_rounding: bool  # round bf16 parameter updates stochastically
    optimizer_state_dtype: Dtype


_PRESETS: dict[str, ResolvedPrecision] = {
    "fp32": ResolvedPrecision("fp32", "fp32", False, False, False, "fp32"),
    "autocast": ResolvedPrecision("fp32", "bf16", False, False, False, "fp32"),
    "bf16SR": ResolvedPrecision("bf16", "bf16", False, False, True, "bf16"),
    "mixed_precision": ResolvedPrecision("bf16", "bf16", True, True, False, "fp32"),
    "mixed_precisionSR": ResolvedPrecision("bf16", "bf16", True, True, True, "fp32"),
}


class PrecisionSection(Section):
    """``precision``: a named type; the flags below it count only when ``type: manual``."""

    type: PrecisionType = "fp32"
    master_weights: bool = False
    fp32_grad_acc: bool = False
    # nxdt flags for manual mode; Neuron configs express the same through the XLA/NRT flags below.
    param_dtype: Dtype | None = None
    stochastic_rounding: bool | None = None

    xla_use_bf16: Str | None = backend_only("xla", "neuron")
    xla_downcast_bf16: Str | None = backend_only("xla", "neuron")
    neuron_rt_stochastic_rounding_en: Str | None = backend_only("neuron")
    # The torch backend reduces gradients in their accumulation dtype (fp32 with fp32_grad_acc).
    fp32_grads_cc: bool | None = backend_only("xla", "neuron")
    parallel_layers_reduce_dtype: Dtype | None = backend_only("neuron")

    @model_validator(mode="after")
    def _manual_flags(self) -> PrecisionSection:
        if self.type != "manual":
            for flag in ("param_dtype", "stochastic_rounding"):
                if getattr(self, flag) is not None:
                    raise ValueError(f"{flag} is only read when type is manual (type is {self.type!r})")
        return self

    def neuron_keys_read(self) -> set[str]:
        """Neuron flags that ``manual`` mode reads because the matching nxdt flag is unset."""
        if self.type != "manual":
            return set()
        keys = set() if self.param_dtype else {"xla_use_bf16", "xla_downcast_bf16"}
        return keys if self.stochastic_rounding is not None else keys | {"neuron_rt_stochastic_rounding_en"}

    def resolved(self, optimizer: str | None = None) -> ResolvedPrecision:
        """Concrete dtypes for this type; ``optimizer`` ``*_fp32OptState`` keeps optimizer state in fp32."""
        if self.type == "manual":
            bf16 = self.xla_use_bf16 == "1" or self.xla_downcast_bf16 == "1"
            param: Dtype = self.param_dtype or ("bf16" if bf16 else "fp32")
            sr = self.stochastic_rounding
            if sr is None:
                sr = self.neuron_rt_stochastic_rounding_en == "1"
            master = self.master_weights and param == "bf16"
            state: Dtype = "fp32" if param == "fp32" or master else "bf16"
            result = ResolvedPrecision(
                param, param, master, self.fp32_grad_acc and param == "bf16", sr, state
            )
        else:
            result = _PRESETS[self.type]
        if optimizer and optimizer.endswith("fp32OptState") and result.optimizer_state_dtype != "fp32":
            result = replace(result, optimizer_state_dtype="fp32")
        return result
