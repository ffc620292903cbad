"""Autoregressive decoding for every causal family: a KV cache where the model takes one, batched.

A kit model (``forward(..., kv_cache=...)``) is decoded incrementally: the prompts are left-padded
into one batch, run once, and each new token costs one single-token forward over the cache. A
model without that argument falls back to recomputing the whole sequence for every token, with
prompts batched by equal length (no padding reaches it). Decoding stops per row at an EOS token
and for the batch when every row has stopped. Greedy decoding (``temperature`` 0) is what
transformers' ``generate(do_sample=False)`` does; sampling applies temperature, then top-k, then
top-p, as transformers' logits warpers do.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nxdt.modeling.kv_cache import KVCache


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy when ``temperature`` is 0, else sampled (seeded)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    @property
    def greedy(self) -> bool:
        """Whether decoding takes the argmax."""
        return self.temperature <= 0.0


def takes_kv_cache(model: Any) -> bool:
    """Whether ``model``'s forward accepts ``kv_cache`` (every kit family does)."""
    forward = getattr(model, "forward", None)
    try:
        return forward is not None and "kv_cache" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def full_logits(logits: Any) -> torch.Tensor:
    """Logits as a plain tensor: the ``logits`` of an output object, gathered when vocabulary-sharded (TP)."""
    if not isinstance(logits, torch.Tensor) and hasattr(logits, "logits"):
        logits = logits.logits
    if isinstance(logits, dict):
        logits = logits["logits"]
    return logits.full_tensor() if hasattr(logits, "full_tensor") else logits


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row from its last-position logits ``[batch, vocab]``."""
    if sampling.greedy:
        return logits.argmax(-1)
    scores = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(scores, min(sampling.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        ordered, order = scores.sort(dim=-1, descending=False)
        cumulative = ordered.softmax(-1).cumsum(-1)
        # Drop the low tail whose mass is at most 1 - top_p; the most likely token always stays.
        drop = cumulative <= 1 - sampling.top_p
        drop[..., -1] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(
    model: Callable[..., Any],
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_ids: Iterable[int],
    pad_id: int,
    *,
    sampling: Sampling | None = None,
    use_cache: bool | None = None,
    batch_size: int = 64,
    length_multiple: int = 1,
    device: torch.device | str | None = None,
    max_length: int | None = None,
) -> list[list[int]]:
    """The new tokens of each prompt, up to and including the EOS token that stopped it.

    ``model`` is called with keyword inputs and returns logits ``[batch, seq, vocab]`` (or an
    object holding them). ``use_cache`` None: the cache when the model takes one.
    ``length_multiple`` right-pads recomputed inputs (sequence parallelism splits the sequence;
    incremental decoding is not used then). ``max_length`` (the model's positions) bounds prompt
    plus new tokens.
    """
    sampling = sampling or Sampling()
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    cached = takes_kv_cache(model) if use_cache is None else use_cache
    if length_multiple > 1:
        cached = False
    if max_length is not None:
        longest = max((len(p) for p in prompts), default=0)
        if longest + max_new_tokens > max_length:
            raise ValueError(
                f"a prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds the model's "
                f"{max_length} positions"
            )
    generator = None
    if not sampling.greedy:
        generator = torch.Generator(device=device or "cpu")
        generator.manual_seed(sampling.seed)
    out: list[list[int]] = [[] for _ in prompts]
    if cached:
        for start in range(0, len(prompts), batch_size):
            chunk = list(range(start, min(start + batch_size, len(prompts))))
            rows = _decode_cached(model, [prompts[i] for i in chunk], max_new_tokens, eos, pad_id, sampling,
                                  generator, device)
            for i, row in zip(chunk, rows):
                out[i] = row
        return out
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            rows = _decode_recomputed(model, [prompts[i] for i in chunk], max_new_tokens, eos, pad_id, sampling,
                                      generator, device, length_multiple)
            for i, row in zip(chunk, rows):
                out[i] = row
    return out


def _finish(tokens: list[torch.Tensor], eos: torch.Tensor) -> list[list[int]]:
    """Each row's tokens up to and including its first EOS."""
    if not tokens:
        return []
    rows = torch.stack(tokens, dim=1).tolist()
    stops = set(eos.tolist())
    out = []
    for row in rows:
        cut = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
        out.append(row[:cut])
    return out


@torch.no_grad()
def _decode_cached(
    model: Callable[..., Any],
    prompts: list[Sequence[int]],
    max_new_tokens: int,
    eos: torch.Tensor,
    pad_id: int,
    sampling: Sampling,
    generator: torch.Generator | None,
    device: torch.device | str | None,
) -> list[list[int]]:
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long, device=device)
    for r, prompt in enumerate(prompts):
        if prompt:
            ids[r, longest - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long, device=device)
            mask[r, longest - len(prompt) :] = 1
    cache = KVCache(len(prompts), longest + max_new_tokens, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated: list[torch.Tensor] = []
    inputs, new_mask = ids, mask
    for _ in range(max_new_tokens):
        logits = full_logits(model(input_ids=inputs, attention_mask=new_mask, kv_cache=cache))[:, -1]
        token = next_tokens(logits, sampling, generator)
        token = torch.where(done, pad_id, token)
        generated.append(token)
        done |= torch.isin(token, eos)
        if bool(done.all()):
            break
        inputs, new_mask = token[:, None], torch.ones_like(token)[:, None]
    return _finish(generated, eos)


@torch.no_grad()
def _decode_recomputed(
    model: Callable[..., Any],
    prompts: list[Sequence[int]],
    max_new_tokens: int,
    eos: torch.Tensor,
    pad_id: int,
    sampling: Sampling,
    generator: torch.Generator | None,
    device: torch.device | str | None,
    length_multiple: int,
) -> list[list[int]]:
    batch = torch.tensor([list(p) for p in prompts], dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        length = batch.shape[1]
        # Right padding leaves earlier positions untouched under causal attention.
        padded = torch.nn.functional.pad(batch, (0, -length % length_multiple), value=pad_id)
        logits = full_logits(model(input_ids=padded))[:, length - 1]
        token = torch.where(done, pad_id, next_tokens(logits, sampling, generator))
        generated.append(token)
        done |= torch.isin(token, eos)
        if bool(done.all()):
            break
        batch = torch.cat([batch, token[:, None]], dim=1)
    return _finish(generated, eos)
