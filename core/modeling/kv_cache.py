"""The key/value cache of incremental decoding, for any model built on the kit's skeleton.

Rows are left-padded so that every row's next token lands in the same slot: ``valid[b, j]`` says
whether slot ``j`` of row ``b`` holds a real token. A token's position counts the real tokens
before it, so a padded row gets the same positions (RoPE or learned) as the row alone, and the
mask keeps padding out of every attention. A sliding window is measured in slots, which equals
real-token distance because a row's padding is all on its left.
"""

from __future__ import annotations

import torch


class LayerKV:
    """One block's view of a :class:`KVCache`: ``update`` stores the step's keys/values, returns all so far."""

    def __init__(self, cache: KVCache, name: str) -> None:
        self.cache, self.name = cache, name

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k``/``v`` ``[batch, kv_heads, new, head_dim]``; return the cached ``[.., length, ..]`` tensors."""
        return self.cache.update(self.name, k, v)


class KVCache:
    """Preallocated keys and values of ``batch_size`` rows up to ``max_length`` slots, per block.

    The skeleton calls :meth:`prepare` once per forward (positions and mask of the new tokens),
    each block's attention calls :meth:`update` through its :class:`LayerKV`, and the skeleton
    ends with :meth:`advance`. Tensors take the dtype and device of the first keys stored, and the
    local head count (a tensor-parallel rank caches only its own heads).
    """

    def __init__(self, batch_size: int, max_length: int, device: torch.device | str | None = None) -> None:
        self.batch_size, self.max_length = batch_size, max_length
        self.length = 0
        self.valid = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._end = 0

    def layer(self, name: str) -> LayerKV:
        """The view block ``name`` stores its keys and values through."""
        return LayerKV(self, name)

    def prepare(
        self,
        seq_len: int,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        sliding_window: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(position ids ``[batch, seq_len]``, boolean mask ``[batch, 1, seq_len, length + seq_len]``) of new tokens.

        ``attention_mask`` ``[batch, seq_len]`` marks real tokens (0 on left padding).
        """
        start, end = self.length, self.length + seq_len
        if end > self.max_length:
            raise ValueError(f"the KV cache holds {self.max_length} tokens; {end} were asked for")
        device = self.valid.device
        real = (
            attention_mask.to(device=device, dtype=torch.bool)
            if attention_mask is not None
            else torch.ones(self.batch_size, seq_len, dtype=torch.bool, device=device)
        )
        self.valid[:, start:end] = real
        if position_ids is None:
            position_ids = self.next_position[:, None] + (real.long().cumsum(-1) - 1).clamp_min(0)
        self.next_position += real.long().sum(-1)
        keys = torch.arange(end, device=device)
        queries = torch.arange(start, end, device=device)
        allowed = keys[None, :] <= queries[:, None]
        if sliding_window is not None:
            allowed = allowed & (queries[:, None] - keys[None, :] < sliding_window)
        mask = self.valid[:, None, :end] & allowed[None]
        # A padding query keeps its own slot, so its softmax row is never empty (no NaN to spread).
        mask = mask | (keys[None, :] == queries[:, None])[None]
        self._end = end
        return position_ids, mask[:, None]

    def update(self, name: str, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store block ``name``'s keys/values of the prepared tokens; return the block's whole cache so far."""
        entry = self._kv.get(name)
        if entry is None:
            shape = (k.shape[0], k.shape[1], self.max_length, k.shape[-1])
            entry = (k.new_zeros(shape), v.new_zeros((*shape[:3], v.shape[-1])))
            self._kv[name] = entry
        start = self._end - k.shape[2]
        entry[0][:, :, start : self._end] = k
        entry[1][:, :, start : self._end] = v
        return entry[0][:, :, : self._end], entry[1][:, :, : self._end]

    def advance(self, seq_len: int) -> None:
        """Account for the ``seq_len`` tokens the forward just stored."""
        self.length += seq_len
