"""The GPT-2 style tokenizer of ``gpt2-tiny``, and the generator that writes it.

``python -m nxdt_gpt.bpe [--out DIR]`` regenerates ``nxdt_gpt/gpt2_tiny_tokenizer/`` from nxdt's
embedded corpus and SFT rows (generated from their fixed seeds). It is GPT-2's tokenizer in
miniature: byte-level BPE over GPT-2's pre-tokenisation regex, 256 byte tokens, merges, and
``<|endoftext|>`` last as BOS, EOS and UNK, 512 tokens in all. The directory loads with
``AutoTokenizer`` (``GPT2Tokenizer``) and its ``vocab.json`` / ``merges.txt`` with Megatron's
``GPT2BPETokenizer`` (``data.tokenizer.vocab_file`` / ``merge_file``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

VOCAB_SIZE = 512
EOT = "<|endoftext|>"
TOKENIZER_CONFIG = {
    "tokenizer_class": "GPT2Tokenizer",
    "bos_token": EOT,
    "eos_token": EOT,
    "unk_token": EOT,
    "add_prefix_space": False,
    "model_max_length": 1024,
    "clean_up_tokenization_spaces": False,
}


def training_texts() -> list[str]:
    """What the BPE is trained on: the embedded pre-training corpus and the SFT training rows."""
    from nxdt.data.embedded import corpus_documents, task_rows

    return corpus_documents() + [row["input"] + " " + row["output"] for row in task_rows("train")]


def build_tokenizer(texts: list[str]) -> Any:  # -> tokenizers.Tokenizer
    """Train the byte-level BPE: ``VOCAB_SIZE - 1`` byte and merge tokens, then ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    # use_regex=True is GPT-2's pre-tokenisation ('s|'t|...| ?\p{L}+| ?\p{N}+|...).
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - 1,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.get_vocab_size() != VOCAB_SIZE - 1:
        raise RuntimeError(f"the corpus yields {tokenizer.get_vocab_size()} BPE tokens, not {VOCAB_SIZE - 1}")
    tokenizer.add_special_tokens([EOT])  # id 511, last, as GPT-2's 50256
    return tokenizer


def generate(out_dir: str | Path) -> list[Path]:
    """Write tokenizer.json, vocab.json, merges.txt and the transformers configs under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(training_texts())
    model = json.loads(tokenizer.to_str())["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda item: item[1]))
    vocab[EOT] = tokenizer.token_to_id(EOT)
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    files = {
        "tokenizer.json": tokenizer.to_str(pretty=True) + "\n",
        "vocab.json": json.dumps(vocab, ensure_ascii=False) + "\n",
        "merges.txt": "#version: 0.2\n" + "".join(f"{m}\n" for m in merges),
        "tokenizer_config.json": json.dumps(TOKENIZER_CONFIG, indent=2) + "\n",
        "special_tokens_map.json": json.dumps({"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}, indent=2) + "\n",
    }
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8", newline="\n")
    return [out / name for name in files]


def main(argv: list[str] | None = None) -> None:
    """Command line: regenerate the tokenizer (into the package unless --out is given)."""
    parser = argparse.ArgumentParser(prog="python -m nxdt_gpt.bpe", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "gpt2_tiny_tokenizer")
    for path in generate(parser.parse_args(argv).out):
        print(f"{path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
