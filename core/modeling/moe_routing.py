"""Mixture-of-experts routing math: top-k and Sinkhorn routing, capacity, the balancing losses.

Everything here runs in fp32 on ``[tokens, experts]`` router logits and takes no module state,
so the MoE layer, the tests and the benchmark share one implementation.

- top-k: softmax (or sigmoid) affinities, the k largest per token, optionally renormalised to sum
  to one (``normalize_top_k_affinities``, Mixtral's choice);
- Sinkhorn (top_k = 1, Megatron's ``sinkhorn``): in training the expert is the argmax of the
  Sinkhorn-balanced affinities, its weight the plain affinity; in evaluation plain top-1;
- capacity: each expert takes at most ``ceil(capacity_factor * tokens * k / experts)`` assignments,
  first choices before second choices, earlier tokens first (GShard); the rest are dropped;
- the Switch/Mixtral load-balancing loss, ``E * sum_e f_e * P_e`` with ``f_e`` the share of top-k
  selections and ``P_e`` the mean softmax probability of expert ``e`` (transformers'
  ``load_balancing_loss_func`` for one layer), and the router z-loss, ``mean(logsumexp(logits)^2)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Routing:
    """Where each token goes: ``indices`` and ``weights`` are ``[tokens, k]``; ``logits`` ``[tokens, experts]``."""

    logits: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor


def affinities(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """Router affinities from fp32 logits: ``softmax`` over experts or an independent ``sigmoid``."""
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)


@torch.no_grad()
def sinkhorn(logits: torch.Tensor, iterations: int = 100, tol: float = 1e-4) -> torch.Tensor:
    """Sinkhorn-Knopp balancing of ``exp(logits)``: rows and columns rescaled towards uniform sums.

    Stops when the column scales move less than ``tol`` (mean absolute change) or after
    ``iterations`` rounds; the logits are shifted by their maximum first, which the balancing
    cancels, so ``exp`` cannot overflow.
    """
    cost = torch.exp(logits - logits.max())
    d0 = torch.ones(cost.shape[0], device=cost.device, dtype=cost.dtype)
    d1 = torch.ones(cost.shape[1], device=cost.device, dtype=cost.dtype)
    eps = 1e-8
    for _ in range(iterations):
        d0 = 1.0 / (cost.shape[0] * ((cost * d1).sum(1) + eps))
        d1_new = 1.0 / (cost.shape[1] * ((cost * d0.unsqueeze(1)).sum(0) + eps))
        moved = float((d1_new - d1).abs().mean())
        d1 = d1_new
        if moved < tol:
            break
    return d1 * cost * d0.unsqueeze(1)


def route(
    logits: torch.Tensor,
    top_k: int,
    *,
    algorithm: str = "top_k",
    activation: str = "softmax",
    normalize: bool = True,
    training: bool = False,
    sinkhorn_iterations: int = 100,
    sinkhorn_tol: float = 1e-4,
) -> Routing:
    """Pick experts for fp32 ``logits`` ``[tokens, experts]``; weights keep their gradient to the router."""
    probs = affinities(logits, activation)
    if algorithm == "sinkhorn" and training:
        # The balanced assignment only chooses; the weight is the router's own affinity.
        indices = sinkhorn(logits.detach(), sinkhorn_iterations, sinkhorn_tol).topk(top_k, dim=-1).indices
        weights = probs.gather(1, indices)
    else:
        weights, indices = probs.topk(top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(logits, indices, weights)


def capacity(tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Assignments one expert may take: ``ceil(capacity_factor * tokens * k / experts)``, at most ``tokens``."""
    return min(tokens, math.ceil(capacity_factor * tokens * top_k / num_experts))


def within_capacity(indices: torch.Tensor, num_experts: int, limit: int) -> torch.Tensor:
    """``[tokens, k]`` mask of the assignments each expert keeps: first choices first, then by token order."""
    slot_major = indices.t().reshape(-1)  # all first choices, then all second choices, ...
    one_hot = torch.nn.functional.one_hot(slot_major, num_experts)
    position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # this assignment's place in its expert's queue
    return (position < limit).view(indices.shape[1], indices.shape[0]).t()


def expert_counts(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Top-k selections per expert (float, as the balancing loss uses them)."""
    return torch.bincount(indices.reshape(-1), minlength=num_experts).float()


def load_balancing_loss(logits: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch/Mixtral auxiliary loss of one layer: ``E * sum_e (selections_e / T) * mean_t softmax_e``.

    Equals transformers' ``load_balancing_loss_func((logits,), E, k)``; the selection counts carry
    no gradient, the mean probabilities carry it to the router.
    """
    tokens = logits.shape[0]
    probs = torch.softmax(logits.float(), dim=-1)
    fraction = expert_counts(indices, num_experts) / tokens
    return num_experts * (fraction * probs.mean(0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): the mean squared log-partition of the router logits."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
