"""The WordPiece tokenizer ``bert-tiny`` uses by default, and the generator that writes it.

``python -m nxdt_bert.wordpiece [--out DIR]`` trains it with the ``tokenizers`` library on nxdt's
embedded pre-training corpus and writes it (by default into the package's ``tokenizer/``): a
lower-casing WordPiece of exactly ``VOCAB_SIZE`` (512) entries, BERT's special tokens
``[PAD] [UNK] [CLS] [SEP] [MASK]`` first, the ``[CLS] A [SEP] B [SEP]`` template, and the files
transformers reads (``tokenizer.json``, ``vocab.txt``, ``tokenizer_config.json``,
``special_tokens_map.json``), so an exported bert-tiny loads with ``AutoTokenizer``.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path
from typing import Any

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MAX_LENGTH = 128  # bert-tiny's max_position_embeddings


def build(texts: list[str], vocab_size: int = VOCAB_SIZE) -> Any:  # -> tokenizers.Tokenizer
    """Train the WordPiece on ``texts`` and fill its vocabulary to exactly ``vocab_size`` with ``[unused{i}]``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    def assemble(vocab: dict[str, int] | None) -> Any:
        tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]") if vocab else models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        return tok

    tok = assemble(None)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    # Ids in a fixed order (specials, then by id) and BERT's [unused] fillers up to the size.
    vocab = sorted(tok.get_vocab().items(), key=lambda item: item[1])
    tokens = [t for t, _ in vocab]
    tokens += [f"[unused{i}]" for i in range(vocab_size - len(tokens))]
    tok = assemble({t: i for i, t in enumerate(tokens)})
    tok.add_special_tokens(SPECIAL_TOKENS)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise RuntimeError(f"the WordPiece has {tok.get_vocab_size()} tokens, not {vocab_size}")
    return tok


def generate(out_dir: str | Path) -> list[Path]:
    """Train on the embedded corpus and write the tokenizer files under ``out_dir``; returns their paths."""
    from nxdt.data.embedded import corpus_documents

    tok = build(corpus_documents())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
    special = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}
    config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "tokenize_chinese_chars": True,
        "strip_accents": None,
        "clean_up_tokenization_spaces": True,
        "model_max_length": MAX_LENGTH,
        **special,
    }
    files = {
        out / "tokenizer.json": tok.to_str(pretty=True) + "\n",
        out / "vocab.txt": "".join(f"{token}\n" for token, _ in vocab),
        out / "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        out / "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
    }
    for path, text in files.items():
        path.write_text(text, encoding="utf-8", newline="\n")
    return list(files)


def main(argv: list[str] | None = None) -> None:
    """Command line: regenerate the tokenizer (into the package unless --out is given)."""
    parser = argparse.ArgumentParser(prog="python -m nxdt_bert.wordpiece", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the package's tokenizer/)")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else Path(str(resources.files("nxdt_bert") / "tokenizer"))
    for path in generate(out):
        print(f"{path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
