"""Feed-forward layers: gated (SwiGLU, GeGLU) and plain (GELU, ReLU, ...) MLPs.

Gated: ``w2(act(w1 x) * w3 x)`` with ``w1`` the gate and ``w3`` the up projection (optionally one
fused ``w13``, gate rows first). Plain: ``w2(act(w1 x))``. ``w2`` writes into the residual stream.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

#: activations with a gate and an up projection
GATED = ("swiglu", "geglu")
#: activation name -> function (gated ones apply it to the gate)
ACTIVATION_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "swiglu": F.silu,
    "silu": F.silu,
    "geglu": F.gelu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class MLP(nn.Module):
    """The block's feed-forward network for one of the kit's activations."""

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        activation: str = "swiglu",
        *,
        bias: bool = False,
        fused_gate_up: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATION_FUNCTIONS:
            raise ValueError(f"unknown activation {activation!r}; one of {', '.join(ACTIVATION_FUNCTIONS)}")
        self.act = ACTIVATION_FUNCTIONS[activation]
        self.gated = activation in GATED
        self.fused = fused_gate_up and self.gated
        self.dropout = dropout
        if self.fused:
            self.w13 = nn.Linear(hidden_size, 2 * ffn_hidden_size, bias=bias)
        else:
            self.w1 = nn.Linear(hidden_size, ffn_hidden_size, bias=bias)
            if self.gated:
                self.w3 = nn.Linear(hidden_size, ffn_hidden_size, bias=bias)
        self.w2 = nn.Linear(ffn_hidden_size, hidden_size, bias=bias)
        setattr(self.w2, "nxdt_residual_output", True)  # depth-scaled at init  # noqa: B010

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP to ``x`` ``[batch, seq, hidden]``."""
        if self.fused:
            gate, up = self.w13(x).chunk(2, dim=-1)
            h = self.act(gate) * up
        elif self.gated:
            h = self.act(self.w1(x)) * self.w3(x)
        else:
            h = self.act(self.w1(x))
        if self.dropout and self.training:
            h = F.dropout(h, self.dropout)
        return self.w2(h)
