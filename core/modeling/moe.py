"""The kit's mixture-of-experts feed-forward layer: a router and batched experts, any family may use it.

``MoE`` replaces a block's MLP on every ``frequency``-th layer (``TransformerConfig.moe``). Per
token the fp32 router picks ``top_k`` experts (nxdt.modeling.moe_routing); the token copies are
sorted by expert and every expert runs on its contiguous group in one grouped matmul
(``torch._grouped_mm``; a padded batched matmul where that kernel is unavailable), never a loop
over tokens or experts. With a ``capacity_factor`` (and not ``dropless``) assignments beyond an
expert's capacity are dropped: they add nothing, so a token dropped everywhere passes through the
residual. The expert outputs come back weighted by the routing weights, summed per token.

Parallelism enters through ``comm`` (the engine installs one for EP, TP and SP, see
nxdt.parallel.expert_parallel): it gathers a sequence-parallel input, sends token copies to the
ranks holding their experts and back (all-to-all), and wraps the tensor-parallel experts. The
experts' weights are ``[experts, out, in]`` tensors; the engine may split dim 0 over EP ranks.

Router losses (load balancing, z-loss) reach training by gradient, not by value: the loss of each
layer is attached to the layer's output by an autograd function whose backward adds its gradient
(weighted by ``nxdt_aux_loss_scale``, which the engine sets to 1 / micro-batches). So they flow
through pipeline stages with the activations. A model's router losses are the mean over its MoE
layers (transformers applies ``load_balancing_loss_func`` to all layers' logits at once; the
per-layer mean keeps each stage's layers independent and equals it for one layer).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nxdt.modeling.mlp import ACTIVATION_FUNCTIONS
from nxdt.modeling.moe_routing import Routing, capacity, load_balancing_loss, route, within_capacity, z_loss

ROUTING_ALGORITHMS = ("top_k", "sinkhorn")
ROUTER_ACTIVATIONS = ("softmax", "sigmoid")


@dataclass
class MoEConfig:
    """The NxDT ``model.moe`` keys (same names); which layers are MoE and how tokens are routed."""

    num_experts: int = 8
    top_k: int = 2
    frequency: int = 1  # layer i is MoE when i % frequency == 0; the others keep the dense MLP
    routing_algorithm: str = "top_k"
    router_activation: str = "softmax"
    normalize_top_k_affinities: bool = True
    capacity_factor: float | None = None  # None: no token is dropped
    dropless: bool | None = None  # True: never drop (capacity_factor must be unset)
    # As in transformers and NxDT, the router losses enter training only with output_router_logits.
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.0
    router_z_loss_coef: float = 0.0
    dropout: float = 0.0  # on the experts' hidden activations
    sinkhorn_iterations: int = 100
    sinkhorn_tol: float = 1e-4

    def __post_init__(self) -> None:
        if self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"moe.top_k {self.top_k} must be between 1 and num_experts {self.num_experts}")
        if self.frequency < 1:
            raise ValueError(f"moe.frequency must be at least 1, got {self.frequency}")
        if self.routing_algorithm not in ROUTING_ALGORITHMS:
            raise ValueError(f"moe.routing_algorithm {self.routing_algorithm!r} is not one of {', '.join(ROUTING_ALGORITHMS)}")
        if self.routing_algorithm == "sinkhorn" and self.top_k != 1:
            raise ValueError(f"moe.routing_algorithm 'sinkhorn' routes each token to one expert; set top_k=1 (got {self.top_k})")
        if self.router_activation not in ROUTER_ACTIVATIONS:
            raise ValueError(f"moe.router_activation {self.router_activation!r} is not one of {', '.join(ROUTER_ACTIVATIONS)}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"moe.capacity_factor must be positive, got {self.capacity_factor}")
        if self.dropless and self.capacity_factor is not None:
            raise ValueError("moe.dropless=true drops no token, so capacity_factor must be unset")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"moe.dropout must be in [0, 1), got {self.dropout}")
        if self.router_z_loss_coef and not self.output_router_logits:
            # nxdt's own key, so no HF or NxDT config sets it expecting it to be inert
            raise ValueError("moe.router_z_loss_coef takes effect only with moe.output_router_logits=true; set that too")

    @property
    def drops(self) -> bool:
        """Whether assignments beyond an expert's capacity are dropped."""
        return self.capacity_factor is not None and not self.dropless

    @property
    def router_losses(self) -> bool:
        """Whether the load-balancing or z-loss enters training."""
        return self.output_router_logits and (self.router_aux_loss_coef > 0 or self.router_z_loss_coef > 0)

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block ``layer`` (0-based) has the MoE feed-forward."""
        return layer % self.frequency == 0

    def moe_layers(self, num_layers: int) -> list[int]:
        """The indices of the MoE blocks."""
        return [i for i in range(num_layers) if self.is_moe_layer(i)]


def as_moe_config(value: Any) -> MoEConfig | None:
    """``MoEConfig`` from a mapping (HF/NxDT keys by their nxdt names), itself, or None."""
    if value is None or isinstance(value, MoEConfig):
        return value
    unknown = sorted(set(value) - set(MoEConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"model.moe.{unknown[0]} is not a mixture-of-experts setting")
    return MoEConfig(**{k: v for k, v in value.items() if v is not None})


# -- grouped matmul ------------------------------------------------------------------------------
class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient (the grouped kernel's backward needs one)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


_GROUPED_OK: dict[tuple[Any, ...], bool] = {}


def _grouped_kernel_works(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs forward and backward for this device, dtype and shape (probed once).

    The probe runs in a thread of its own: autograd's saved-tensor hooks (activation
    checkpointing) and autocast are per thread, so it leaves no trace in the caller's graph.
    """
    key = (x.device, x.dtype, weight.shape[1], weight.shape[2])
    if key not in _GROUPED_OK:
        found: list[bool] = []

        def probe() -> None:
            try:
                a = torch.zeros(4, weight.shape[2], device=x.device, dtype=x.dtype, requires_grad=True)
                b = torch.zeros(2, weight.shape[1], weight.shape[2], device=x.device, dtype=x.dtype, requires_grad=True)
                offs = torch.tensor([1, 4], device=x.device, dtype=torch.int32)
                out = torch._grouped_mm(a, b.transpose(-2, -1), offs=offs)
                out.backward(torch.ones_like(out))
                found.append(True)
            except (RuntimeError, NotImplementedError, TypeError):
                found.append(False)

        if hasattr(torch, "_grouped_mm"):
            thread = threading.Thread(target=probe)
            thread.start()
            thread.join()
        _GROUPED_OK[key] = bool(found and found[0])
    return _GROUPED_OK[key]


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``x[rows of g] @ weight[g].T`` for consecutive row groups of sizes ``counts``; ``weight`` is ``[G, out, in]``."""
    if _grouped_kernel_works(x, weight):
        offs = counts.cumsum(0).to(torch.int32)
        return _ContiguousGrad.apply(torch._grouped_mm(x, weight.transpose(-2, -1), offs=offs))
    return padded_bmm(x, weight, counts)


def padded_bmm(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The grouped matmul as one batched matmul over groups zero-padded to the largest (one host sync)."""
    groups = weight.shape[0]
    if x.shape[0] == 0:
        return x.new_zeros(0, weight.shape[1])
    group = torch.repeat_interleave(torch.arange(groups, device=x.device), counts)
    position = torch.arange(x.shape[0], device=x.device) - (counts.cumsum(0) - counts)[group]
    padded = x.new_zeros(groups, int(counts.max()), x.shape[1]).index_put((group, position), x)
    return torch.bmm(padded, weight.transpose(1, 2))[group, position]


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (DTensor) expert weight; gradients flow back into the DTensor."""
    from torch.distributed.tensor import DTensor  # on use: importing it costs a second of start-up (sympy)

    return t.to_local() if isinstance(t, DTensor) else t




class GroupedExperts(nn.Module):
    """``num_experts`` MLPs stored as ``[experts, out, in]`` tensors: gate ``w1``, up ``w3`` (gated), down ``w2``."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, activation: str, dropout: float = 0.0):
        super().__init__()
        if activation not in ACTIVATION_FUNCTIONS:
            raise ValueError(f"unknown activation {activation!r}; one of {', '.join(ACTIVATION_FUNCTIONS)}")
        self.act = ACTIVATION_FUNCTIONS[activation]
        self.gated = activation in ("swiglu", "geglu")
        self.dropout = dropout
        self.w1 = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        if self.gated:
            self.w3 = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        #: parameter -> the dimension tensor parallelism splits (dim 0, the expert, is expert parallelism's)
        self.nxdt_expert_params = {"w1": 1, **({"w3": 1} if self.gated else {}), "w2": 2}

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        """N(0, std) inputs, N(0, out_std) for ``w2``, which writes into the residual stream."""
        for name in self.nxdt_expert_params:
            nn.init.normal_(getattr(self, name), mean=0.0, std=out_std if name == "w2" else std)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows of ``x`` ``[tokens, hidden]`` grouped by expert (``counts`` rows each) through their experts."""
        h = self.act(grouped_mm(x, local_part(self.w1), counts))
        if self.gated:
            h = h * grouped_mm(x, local_part(self.w3), counts)
        if self.dropout and self.training:
            h = F.dropout(h, self.dropout)
        return grouped_mm(h, local_part(self.w2), counts)


class LocalComm:
    """The single-device ``comm``: every expert is here, nothing to gather, send or reduce."""

    def gather_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """The whole sequence of the layer's input."""
        return x

    def scatter_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's part of the layer's output."""
        return x

    def dispatch(self, x: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Token copies sorted by expert -> those of this rank's experts, their counts, and a return ticket."""
        return x, counts, None

    def combine(self, y: torch.Tensor, ticket: Any) -> torch.Tensor:
        """Expert outputs back in the order ``dispatch`` received their tokens."""
        return y

    def enter_experts(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens entering (tensor-parallel) experts."""
        return x

    def leave_experts(self, y: torch.Tensor) -> torch.Tensor:
        """Expert outputs leaving (tensor-parallel) experts."""
        return y


class _AttachLoss(torch.autograd.Function):
    """Returns ``out``; its backward also starts ``loss``'s backward, with gradient ``scale``."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        return grad, torch.full((), ctx.scale, device=grad.device, dtype=torch.float32), None


def _recomputing() -> bool:
    """Whether this forward runs inside a backward pass (activation-checkpoint recomputation)."""
    return torch._C._current_graph_task_id() != -1


class MoE(nn.Module):
    """Router + grouped experts for ``[batch, seq, hidden]`` inputs; a drop-in for a block's MLP."""

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        activation: str,
        moe: MoEConfig,
        *,
        layer_id: int = 0,
        num_moe_layers: int = 1,
    ) -> None:
        super().__init__()
        self.cfg = moe
        self.num_experts = moe.num_experts
        self.layer_id, self.num_moe_layers = layer_id, num_moe_layers
        self.router = nn.Linear(hidden_size, moe.num_experts, bias=False)
        self.experts = GroupedExperts(moe.num_experts, hidden_size, ffn_hidden_size, activation, moe.dropout)
        self.comm: Any = LocalComm()
        #: the router losses' gradient weight; the engine sets 1 / micro-batches per optimizer step
        self.nxdt_aux_loss_scale = 1.0
        #: per training forward: [tokens per expert..., dropped, assignments, aux, z]
        self._records: list[torch.Tensor] = []
        #: the last forward's fp32 router logits [tokens, experts] when output_router_logits is set
        self.router_logits: torch.Tensor | None = None

    def route(self, tokens: torch.Tensor) -> Routing:
        """fp32 router logits and the experts and weights of every token of ``tokens`` ``[T, hidden]``."""
        cfg = self.cfg
        # fp32 under every precision mode: autocast off, bf16 weights and inputs upcast.
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            logits = F.linear(tokens.float(), self.router.weight.float())
        return route(
            logits,
            cfg.top_k,
            algorithm=cfg.routing_algorithm,
            activation=cfg.router_activation,
            normalize=cfg.normalize_top_k_affinities,
            training=self.training,
            sinkhorn_iterations=cfg.sinkhorn_iterations,
            sinkhorn_tol=cfg.sinkhorn_tol,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The weighted expert outputs for ``x`` (this rank's sequence slice under sequence parallelism)."""
        cfg = self.cfg
        full = self.comm.gather_sequence(x)
        tokens = full.reshape(-1, full.shape[-1])
        routing = self.route(tokens)
        keep = None
        if cfg.drops:
            assert cfg.capacity_factor is not None
            limit = capacity(tokens.shape[0], self.num_experts, cfg.top_k, cfg.capacity_factor)
            keep = within_capacity(routing.indices, self.num_experts, limit)
        out, counts = self._run_experts(tokens, routing, keep)
        out = self.comm.scatter_sequence(out.view(full.shape))
        losses = self._router_losses(routing)
        if losses is not None and torch.is_grad_enabled():
            out = _AttachLoss.apply(out, losses[0] * cfg.router_aux_loss_coef + losses[1] * cfg.router_z_loss_coef,
                                    self.nxdt_aux_loss_scale / self.num_moe_layers)
        if cfg.output_router_logits:
            self.router_logits = routing.logits.detach()
        if self.training and not _recomputing():
            self._record(counts, routing, losses)
        return out

    def _run_experts(
        self, tokens: torch.Tensor, routing: Routing, keep: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``sum_k weight_k * expert_k(token)`` per token, and the assignments each expert took."""
        n, k = routing.indices.shape
        expert = routing.indices.reshape(-1)  # slot t * k + j is token t's j-th choice
        slot = torch.arange(n * k, device=tokens.device)
        if keep is not None:
            kept = keep.reshape(-1)
            expert, slot = expert[kept], slot[kept]
        order = torch.argsort(expert, stable=True)
        expert, slot = expert[order], slot[order]
        counts = torch.bincount(expert, minlength=self.num_experts)
        received, local_counts, ticket = self.comm.dispatch(tokens[slot // k], counts)
        y = self.comm.leave_experts(self.experts(self.comm.enter_experts(received), local_counts))
        y = self.comm.combine(y, ticket)
        # Dropped slots stay zero; the weighting and the sum over k run in fp32.
        slots = y.new_zeros(n * k, y.shape[-1]).index_copy(0, slot, y)
        out = (slots.view(n, k, -1).float() * routing.weights.unsqueeze(-1)).sum(1)
        return out.to(tokens.dtype), counts

    def _router_losses(self, routing: Routing) -> tuple[torch.Tensor, torch.Tensor] | None:
        cfg = self.cfg
        if not cfg.router_losses:
            return None
        zero = routing.logits.new_zeros(())
        aux = load_balancing_loss(routing.logits, routing.indices, self.num_experts) if cfg.router_aux_loss_coef else zero
        z = z_loss(routing.logits) if cfg.router_z_loss_coef else zero
        return aux, z

    @torch.no_grad()
    def _record(self, counts: torch.Tensor, routing: Routing, losses: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        assigned = float(routing.indices.numel())
        extra = [assigned - counts.sum().float(), torch.tensor(assigned, device=counts.device)]
        extra += [losses[0].detach(), losses[1].detach()] if losses is not None else [counts.new_zeros(()).float()] * 2
        self._records.append(torch.cat([counts.float(), torch.stack([e.float().reshape(()) for e in extra])]))

    def nxdt_step_metrics(self, last: int | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The training forwards' load and losses since the last call, as (sum, count) pairs; clears them.

        ``last``: only the last that many forwards count (a pipeline schedule's first step also
        runs its stages once on placeholder activations). Tokens per expert are means per forward
        (micro-batch); router losses are shares of the model's mean over its MoE layers.
        """
        records, self._records = self._records, []
        if last is not None:
            records = records[-last:] if last else []
        if not records:
            return {}
        total = torch.stack(records).sum(0)
        n = torch.tensor(float(len(records)), device=total.device)
        e = self.num_experts
        prefix = f"moe/layer{self.layer_id}"
        out = {f"{prefix}/expert{i}_tokens": (total[i], n) for i in range(e)}
        out[f"{prefix}/dropped_fraction"] = (total[e], total[e + 1])
        if self.cfg.router_losses:
            share = 1.0 / self.num_moe_layers
            if self.cfg.router_aux_loss_coef:
                out["aux_loss"] = (total[e + 2] * share, n * share)
            if self.cfg.router_z_loss_coef:
                out["z_loss"] = (total[e + 3] * share, n * share)
        return out


def moe_parameter_counts(hidden_size: int, ffn_hidden_size: int, gated: bool, moe: MoEConfig) -> tuple[int, int]:
    """(all parameters, parameters one token uses) of one MoE layer: router plus experts."""
    expert = (3 if gated else 2) * hidden_size * ffn_hidden_size
    router = hidden_size * moe.num_experts
    return router + moe.num_experts * expert, router + moe.top_k * expert

