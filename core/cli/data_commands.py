"""`nxdt data preprocess`: text files to Megatron indexed .bin/.idx for `data.data_prefix`."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_parsers(sub: argparse._SubParsersAction, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register `nxdt data ...`."""
    p = sub.add_parser("data", help="data tools")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    pre = dsub.add_parser("preprocess", help="tokenize .txt/.jsonl/.parquet files into Megatron .bin/.idx")
    pre.add_argument("inputs", nargs="+", help="files or directories of text")
    pre.add_argument("--tokenizer", default="embedded", help="tokenizer dir, tokenizer.json, sentencepiece .model, or 'embedded'")
    pre.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    pre.add_argument("--text-key", default="text", help="field of the text in .jsonl/.parquet rows")
    pre.add_argument("--no-eos", action="store_true", help="do not append EOS after each document")
    add_common(pre)


def dispatch(args: argparse.Namespace) -> int | None:
    """Run `nxdt data preprocess`; None when the command is not a data command."""
    if args.command != "data":
        return None
    from nxdt.cli.main import print_json
    from nxdt.data.megatron import preprocess_to_megatron
    from nxdt.data.tokenizer import load_tokenizer
    from nxdt.errors import NxdtError

    if args.data_command != "preprocess":
        raise NxdtError("usage: nxdt data preprocess INPUTS... --output-prefix PREFIX [--tokenizer T]")
    stats = preprocess_to_megatron(
        args.inputs, load_tokenizer(args.tokenizer), args.output_prefix, text_key=args.text_key, append_eos=not args.no_eos
    )
    if args.json:
        print_json(stats)
    else:
        print(", ".join(f"{k}={v}" for k, v in stats.items()))
    return 0
