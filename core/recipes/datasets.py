"""Dataset builders of the engine recipes: NxDT ``data`` keys mapped onto ``nxdt.data``.

``build(run_config, tokenizer, split)`` returns a torch Dataset of items (``nxdt.data.batch``),
or None when the split has no source. Without ``data.train_dir`` / ``data_prefix`` the
embedded default data is used, so a bare `nxdt run llama3-tiny` trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Subset

from nxdt.errors import NxdtError

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
    """Megatron ``data_prefix`` blends, an HF datasets directory, or raw text packed into blocks."""
    data = run_config.data
    seq = data.seq_length
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
        from nxdt.data.embedded import embedded_paths

        full = _pretrain_source(str(embedded_paths()["pretrain_txt"]), tokenizer, seq, "train")
        return held_out_split(full, split)
    return None


def held_out_split(dataset: Dataset, split: str) -> Dataset:
    """The last ``HELD_OUT_FRACTION`` of samples for validation, the rest for training."""
    n = len(dataset)  # type: ignore[arg-type]
    held = max(1, int(n * HELD_OUT_FRACTION))
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
