"""The item every nxdt dataset yields, and the collation of items into a batch.

An item is a dict of 1-D ``torch.long`` tensors of length ``seq_length``: ``input_ids``,
``labels`` already shifted (``labels[t]`` is the target for position ``t``; ``IGNORE_INDEX`` is
not trained on) and ``position_ids``. The training loss is therefore plain cross-entropy over
``labels`` with ``ignore_index=IGNORE_INDEX``; no model shifts its logits. An item may also hold
several rows (a DPO/ORPO preference pair: chosen, rejected): every tensor then has a leading row
dimension (``input_ids`` is ``[rows, seq_length]``) and collation concatenates the items' rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100


def causal_item(tokens: np.ndarray | Sequence[int], seq_length: int) -> dict[str, torch.Tensor]:
    """An item from ``seq_length + 1`` contiguous tokens: inputs are the first ``seq_length``."""
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    if ids.numel() != seq_length + 1:
        raise ValueError(f"causal_item needs {seq_length + 1} tokens, got {ids.numel()}")
    return {
        "input_ids": ids[:-1].clone(),
        "labels": ids[1:].clone(),
        "position_ids": torch.arange(seq_length, dtype=torch.long),
    }


def shift_labels(labels: np.ndarray | Sequence[int]) -> torch.Tensor:
    """Unshifted (Hugging Face convention) labels to nxdt's shifted ones: drop the first, pad the end."""
    shifted = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    return torch.cat([shifted[1:], torch.tensor([IGNORE_INDEX], dtype=torch.long)])


def packed_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """Boolean ``[batch, seq, seq]`` attention mask (True: may attend), causal within each example.

    Packed SFT rows restart ``position_ids`` at 0 for every example. Without this mask a packed
    example attends to the ones before it, and because their restarted positions alias its own
    under RoPE, a small model learns next to nothing (measured on the embedded task).
    """
    segments = (position_ids == 0).cumsum(dim=-1)
    same_example = segments.unsqueeze(-1) == segments.unsqueeze(-2)
    seq = position_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    return same_example & causal


def collate(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items into ``[batch, seq]`` tensors, key by key; multi-row items (2-D ``input_ids``) are concatenated."""
    if not items:
        raise ValueError("collate needs at least one item")
    join = torch.cat if items[0]["input_ids"].dim() == 2 else torch.stack
    return {key: join([item[key] for item in items]) for key in items[0]}
