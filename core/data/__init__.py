"""Data: tokenizers, pretraining and SFT datasets, Megatron indexed files, the batch sampler.

Every dataset item is a dict of 1-D ``torch.long`` tensors of length ``seq_length``:
``input_ids``, ``labels`` (already shifted: ``labels[t]`` is the target of position ``t``, -100
is ignored) and ``position_ids``; ``collate`` stacks items into ``[batch, seq]`` tensors.
"""

from nxdt.data.bad_rows import BadRow, BadRowReport
from nxdt.data.batch import IGNORE_INDEX, causal_item, collate, packed_causal_mask, shift_labels
from nxdt.data.blend import BlendedDataset
from nxdt.data.megatron import (
    GPTDataset,
    IndexedDataset,
    IndexedDatasetWriter,
    build_megatron_dataset,
    parse_data_prefix,
    preprocess_to_megatron,
    write_indexed_dataset,
)
from nxdt.data.pretrain import HFPretrainDataset, PackedTextDataset
from nxdt.data.sampler import DistributedBatchSampler
from nxdt.data.sft import SFTDataset, prompt_ids, tokenize_chat, tokenize_pair
from nxdt.data.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer


def __getattr__(name: str):
    # Imported lazily so `python -m nxdt.data.embedded` does not find its module already loaded.
    if name in ("embedded_paths", "load_task_rows"):
        from nxdt.data import embedded

        return getattr(embedded, name)
    raise AttributeError(f"module 'nxdt.data' has no attribute {name!r}")


__all__ = [
    "IGNORE_INDEX",
    "BadRow",
    "BadRowReport",
    "BlendedDataset",
    "DistributedBatchSampler",
    "GPTDataset",
    "HFPretrainDataset",
    "HFTokenizer",
    "IndexedDataset",
    "IndexedDatasetWriter",
    "PackedTextDataset",
    "SFTDataset",
    "SentencePieceTokenizer",
    "Tokenizer",
    "build_megatron_dataset",
    "causal_item",
    "collate",
    "embedded_paths",
    "load_task_rows",
    "load_tokenizer",
    "packed_causal_mask",
    "parse_data_prefix",
    "preprocess_to_megatron",
    "prompt_ids",
    "shift_labels",
    "tokenize_chat",
    "tokenize_pair",
    "write_indexed_dataset",
]
