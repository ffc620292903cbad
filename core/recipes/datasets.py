"""Dataset builders of the engine recipes: NxDT ``data`` keys mapped onto ``nxdt.data``.

``build(run_config, tokenizer, split)`` returns a torch Dataset of items (``nxdt.data.batch``),
or None when the split has no source. Without ``data.train_dir`` / ``data_prefix`` the
embedded default data is used, so a bare `nxdt run llama3-tiny` trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from nxdt.data.batch import IGNORE_INDEX
from nxdt.errors import ConfigError, NxdtError

#: share of a single-source pretraining corpus held out for validation when no val_dir is given
HELD_OUT_FRACTION = 0.05


def _is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _pretrain_source(path: str, tokenizer: Any, seq_length: int, split: str) -> Dataset:
    from nxdt.data.pretrain import HFPretrainDataset, PackedTextDataset

    p = Path(path).expanduser()
    if not p.exists():
        raise NxdtError(f"data path not found: {p}")
    if _is_hf_dataset_dir(p):
        return HFPretrainDataset(p, seq_length, split=split)
    return PackedTextDataset(p, tokenizer, seq_length)


def build_pretrain_dataset(run_config: Any, tokenizer: Any, split: str) -> Dataset | None:
    """Megatron ``data_prefix`` blends, an HF datasets directory, or raw text packed into blocks.

    ``data.splits_string`` ("980,10,10") cuts one source into train/validation/test by sample;
    ``eod_mask_loss`` and ``reset_position_ids``/``reset_attention_mask`` act on the EOS tokens that
    separate documents (see :class:`DocumentBoundaries`).
    """
    dataset = _pretrain_split(run_config, tokenizer, split)
    data = run_config.data
    if dataset is not None and (data.eod_mask_loss or data.reset_position_ids):
        dataset = DocumentBoundaries(dataset, tokenizer.eos_id, data.eod_mask_loss, data.reset_position_ids)
    return dataset


def _pretrain_split(run_config: Any, tokenizer: Any, split: str) -> Dataset | None:
    data = run_config.data
    seq = data.seq_length
    if data.splits_string:
        if data.val_dir or isinstance(data.data_prefix, dict):
            raise ConfigError(
                "data.splits_string cuts one source into train/validation/test, but data.val_dir or a "
                "data_prefix with splits already names the validation data; drop one of them"
            )
        source = _single_source(run_config, tokenizer, seq)
        return split_by_weights(source, data.splits_string, split)
    if data.data_prefix:
        from nxdt.data.megatron import build_megatron_dataset

        prefix = data.data_prefix
        if isinstance(prefix, dict):
            prefix = prefix.get("train" if split == "train" else "validation")
            if not prefix:
                return None
        elif split != "train":
            return None
        return build_megatron_dataset(prefix, seq, seed=run_config.seed)
    explicit = data.train_dir if split == "train" else data.val_dir
    if explicit:
        return _pretrain_source(explicit, tokenizer, seq, split)
    if split != "train" and data.train_dir:
        return None
    if data.train_dir is None:
        return held_out_split(_single_source(run_config, tokenizer, seq), split, data.global_batch_size)
    return None


def _single_source(run_config: Any, tokenizer: Any, seq: int) -> Dataset:
    """The one training source (data_prefix, train_dir, or the embedded corpus) before any split."""
    data = run_config.data
    if data.data_prefix:
        from nxdt.data.megatron import build_megatron_dataset

        return build_megatron_dataset(data.data_prefix, seq, seed=run_config.seed)
    if data.train_dir:
        return _pretrain_source(data.train_dir, tokenizer, seq, "train")
    from nxdt.data.embedded import embedded_paths

    return _pretrain_source(str(embedded_paths()["pretrain_txt"]), tokenizer, seq, "train")


SPLITS = ("train", "validation", "test")


def split_weights(splits_string: str) -> list[float]:
    """Megatron's ``splits_string`` ("980,10,10" or "98/1/1") as three shares summing to 1."""
    parts = [p for p in splits_string.replace("/", ",").split(",") if p.strip()]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"data.splits_string={splits_string!r}: expected numbers such as '980,10,10'") from None
    if not weights or len(weights) > 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"data.splits_string={splits_string!r}: expected up to three non-negative shares, e.g. '980,10,10'")
    weights += [0.0] * (3 - len(weights))
    return [w / sum(weights) for w in weights]


def split_by_weights(dataset: Dataset, splits_string: str, split: str) -> Dataset | None:
    """The ``split`` share of ``dataset``'s samples (contiguous ranges, in the dataset's own order)."""
    n = len(dataset)  # type: ignore[arg-type]
    shares = split_weights(splits_string)
    bounds = [0]
    for share in shares:
        bounds.append(bounds[-1] + round(share * n))
    bounds[-1] = n
    i = SPLITS.index(split if split in SPLITS else "validation")
    start, end = bounds[i], bounds[i + 1]
    if end <= start:
        if split == "train":
            raise ConfigError(f"data.splits_string={splits_string!r} leaves no training samples of {n}")
        return None
    return Subset(dataset, list(range(start, end)))


class DocumentBoundaries(Dataset):
    """Megatron's document-boundary options on packed causal samples, at each EOS in the inputs.

    ``mask_loss`` (``eod_mask_loss``): no loss where the input token is EOS, so nothing learns to
    predict one document's first token from the previous document. ``reset_positions``
    (``reset_position_ids`` with ``reset_attention_mask``): positions restart at 0 after each EOS;
    the model keeps attention inside each document wherever positions restart.
    """

    def __init__(self, dataset: Dataset, eod: int, mask_loss: bool, reset_positions: bool):
        self.dataset, self.eod, self.mask_loss, self.reset_positions = dataset, eod, mask_loss, reset_positions

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = dict(self.dataset[index])
        ids = item["input_ids"]
        is_eod = ids == self.eod
        if self.mask_loss:
            item["labels"] = item["labels"].masked_fill(is_eod, IGNORE_INDEX)
        if self.reset_positions:
            idx = torch.arange(ids.shape[0])
            starts = torch.zeros_like(is_eod)
            starts[1:] = is_eod[:-1]
            item["position_ids"] = idx - torch.where(starts, idx, torch.zeros_like(idx)).cummax(0).values
        return item


def held_out_split(dataset: Dataset, split: str, min_held: int = 1) -> Dataset:
    """The last ``HELD_OUT_FRACTION`` of samples (at least ``min_held``: one global batch) for validation."""
    n = len(dataset)  # type: ignore[arg-type]
    held = max(1, int(n * HELD_OUT_FRACTION), min(min_held, n // 2))
    indices = range(n - held, n) if split != "train" else range(n - held)
    return Subset(dataset, list(indices))


def build_sft_dataset(run_config: Any, tokenizer: Any, split: str) -> Dataset | None:
    """input/output or chat-messages JSONL (``data.train_dir`` / ``val_dir``), packed or padded."""
    from nxdt.data.sft import SFTDataset

    data = run_config.data
    alignment = run_config.model_alignment_strategy
    sft = getattr(alignment, "sft", None) if alignment else None
    packing = bool(getattr(sft, "packing", False)) if sft else False
    source = data.train_dir if split == "train" else data.val_dir
    if source is None and data.train_dir is None:
        from nxdt.data.embedded import embedded_paths

        source = str(embedded_paths()["sft_train" if split == "train" else "sft_validation"])
    if source is None:
        return None
    return SFTDataset(
        source,
        tokenizer,
        data.seq_length,
        packing=packing,
        dev_choose_samples=data.dev_choose_samples if split == "train" else None,
    )
