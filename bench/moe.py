"""Forward+backward tokens/s of nxdt's MoE layer (dropless and capacity) vs a per-expert loop and
transformers' MixtralSparseMoeBlock, on the same weights and inputs, in the same run.

    python bench/moe.py                                  # 8 experts, top-2, hidden 256, ffn 512, 4096 tokens, fp32, CPU
    python bench/moe.py --threads 1 --rounds 9           # steadier on a shared machine
    python bench/moe.py --experts 4 --top-k 1 --json     # other shapes, machine-readable

Sides: ``nxdt`` (the kit's ``MoE``, dropless: grouped matmuls over variable token counts),
``nxdt_capacity`` (``capacity_factor`` 1.25: over-capacity assignments dropped), ``loop`` (the
same routing, then a Python loop over experts, each a gather + three matmuls + index_add) and
``hf`` (transformers' ``MixtralSparseMoeBlock`` holding the same router and expert weights, as
built standalone: its eager loop over experts) and ``hf_grouped`` (the same block with transformers
5's ``grouped_mm`` experts, the default inside ``from_pretrained`` models).
Before timing, the dropless, loop and transformers outputs are checked equal. Sides run in
interleaved rounds with a rotating order; the script prints median tokens/s per side, the ratio
of medians to each reference and the median of per-round ratios. Target (reported, not asserted):
nxdt >= 1.5x transformers' block at 8 experts, top-2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe_machine  # noqa: E402

from nxdt.modeling import MoE, MoEConfig  # noqa: E402


def build_sides(args: argparse.Namespace) -> tuple[dict[str, torch.nn.Module | Callable], torch.nn.Module]:
    """The four sides on one set of weights (the nxdt dropless layer owns them)."""
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    moe = MoEConfig(num_experts=args.experts, top_k=args.top_k)
    nxdt = MoE(args.hidden, args.ffn, "swiglu", moe)
    nxdt.experts.init_weights(0.02, 0.02)
    torch.nn.init.normal_(nxdt.router.weight, std=0.02)
    capacity = MoE(args.hidden, args.ffn, "swiglu", MoEConfig(num_experts=args.experts, top_k=args.top_k,
                                                              capacity_factor=args.capacity_factor))
    capacity.load_state_dict(nxdt.state_dict())
    hf_cfg = transformers.MixtralConfig(hidden_size=args.hidden, intermediate_size=args.ffn,
                                        num_local_experts=args.experts, num_experts_per_tok=args.top_k)
    hf = MixtralSparseMoeBlock(hf_cfg)  # standalone: its eager loop over the experts that got tokens
    grouped_cfg = transformers.MixtralConfig(hidden_size=args.hidden, intermediate_size=args.ffn,
                                             num_local_experts=args.experts, num_experts_per_tok=args.top_k)
    grouped_cfg._experts_implementation = "grouped_mm"  # what from_pretrained models use by default in transformers 5
    hf_grouped = MixtralSparseMoeBlock(grouped_cfg)
    for block in (hf, hf_grouped):
        with torch.no_grad():
            block.gate.weight.copy_(nxdt.router.weight)
            block.experts.gate_up_proj.copy_(torch.cat([nxdt.experts.w1, nxdt.experts.w3], dim=1))
            block.experts.down_proj.copy_(nxdt.experts.w2)
    loop = LoopMoE(capacity_free=nxdt)
    sides = {"nxdt": nxdt, "nxdt_capacity": capacity, "loop": loop, "hf": hf, "hf_grouped": hf_grouped}
    for side in (nxdt, capacity, hf, hf_grouped, loop):
        side.to(device=args.device, dtype=dtype).train()
    return sides, nxdt


class LoopMoE(torch.nn.Module):
    """The reference: nxdt's routing, then one gather + matmuls + index_add per expert in a Python loop."""

    def __init__(self, capacity_free: MoE):
        super().__init__()
        self.layer = capacity_free  # shares the weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        tokens = x.reshape(-1, x.shape[-1])
        routing = layer.route(tokens)
        out = torch.zeros_like(tokens)
        ex = layer.experts
        for e in range(layer.num_experts):
            token, slot = torch.where(routing.indices == e)
            h = tokens[token]
            y = (F.silu(h @ ex.w1[e].T) * (h @ ex.w3[e].T)) @ ex.w2[e].T
            out = out.index_add(0, token, (y.float() * routing.weights[token, slot, None]).to(y.dtype))
        return out.view_as(x)


def fwd_bwd(module: Callable, x: torch.Tensor, grad: torch.Tensor) -> None:
    """One forward and backward of ``module`` on ``x`` with output gradient ``grad``."""
    x.grad = None
    module(x).backward(grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed forward+backward passes per side per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sides, nxdt = build_sides(args)
    dtype = next(nxdt.parameters()).dtype
    x = torch.randn(args.batch, args.seq, args.hidden, device=args.device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    with torch.no_grad():
        ref = sides["nxdt"](x)
        check = {name: (sides[name](x) - ref).abs().max().item() for name in ("loop", "hf", "hf_grouped")}
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert all(d <= tol for d in check.values()), f"sides disagree with nxdt: {check}"
    for module in sides.values():
        for _ in range(args.warmup):
            fwd_bwd(module, x, grad)
    names = list(sides)
    rates: dict[str, list[float]] = {n: [] for n in names}
    tokens = args.batch * args.seq
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            for _ in range(args.steps):
                fwd_bwd(sides[name], x, grad)
            if args.device != "cpu":
                torch.cuda.synchronize()
            rates[name].append(tokens * args.steps / (time.perf_counter() - start))
    median = {n: statistics.median(v) for n, v in rates.items()}
    ratios = {
        f"{a}/{b}": {"of_medians": median[a] / median[b],
                     "per_round": statistics.median(x / y for x, y in zip(rates[a], rates[b]))}
        for a in ("nxdt", "nxdt_capacity") for b in ("hf", "hf_grouped", "loop")
    }
    result = {"machine": describe_machine(), "args": vars(args), "max_abs_diff_vs_nxdt": check,
              "tokens_per_s": median, "ratios": ratios, "rounds": rates}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.experts} experts, top-{args.top_k}, hidden {args.hidden}, ffn {args.ffn}, {tokens} tokens, "
          f"{args.precision}, {args.device}; outputs vs nxdt: {check}")
    for n in names:
        print(f"  {n:14s} {median[n]:10.0f} tok/s (min {min(rates[n]):.0f}, max {max(rates[n]):.0f})")
    for k, v in ratios.items():
        print(f"  {k:22s} {v['of_medians']:.2f}x (per-round median {v['per_round']:.2f}x)")


if __name__ == "__main__":
    main()
