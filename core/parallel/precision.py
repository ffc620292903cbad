"""Parameter dtypes and stochastic rounding for the precision modes (see docs/precision.md)."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# bf16 keeps the upper 16 bits of an fp32 word; the lower 16 are what rounding discards.
_LOW_BITS = 1 << 16
_HIGH_MASK = -_LOW_BITS  # 0xFFFF0000 as a signed int32


def torch_dtype(name: str) -> torch.dtype:
    """``"fp32"`` / ``"bf16"`` -> the torch dtype."""
    return DTYPES[name]


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round fp32 ``x`` to bf16, up with probability equal to the discarded fraction (unbiased).

    Adding uniform noise in [0, 2^16) to the low 16 bits carries into the kept bits exactly when the
    noise exceeds the gap to the next bf16 value; the sign bit is separate, so negative values round
    away from zero with the same probability. Non-finite values are rounded to nearest.
    """
    x = x.float().contiguous()
    noise = torch.randint(0, _LOW_BITS, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = (x.view(torch.int32) + noise) & _HIGH_MASK
    rounded = bits.view(torch.float32).to(torch.bfloat16)  # exact: the low bits are zero
    return torch.where(torch.isfinite(x), rounded, x.to(torch.bfloat16))


def write_rounded_(dst: torch.Tensor, src: torch.Tensor, stochastic: bool, generator: torch.Generator | None) -> None:
    """Copy fp32 ``src`` into ``dst``; bf16 destinations round stochastically when ``stochastic``."""
    if dst.dtype == torch.bfloat16 and stochastic:
        dst.copy_(stochastic_round_bf16(src, generator))
    else:
        dst.copy_(src)
