"""The embedded default tokenizer and datasets, and the generator that writes them.

``python -m nxdt.data.embedded [--out DIR]`` regenerates ``core/data/embedded/`` byte for byte
from fixed seeds. It holds:

* ``tokenizer/``: a byte-level BPE with exactly ``VOCAB_SIZE`` (512) tokens, the vocabulary of the
  ``llama3-tiny`` preset, special tokens ``<|bos|> <|eos|> <|pad|> <|system|> <|user|>
  <|assistant|>`` and a chat template. Capital letters and digits are always single tokens,
  so the task strings below are one token per character.
* ``sft/{train,validation,test}.jsonl``: six string tasks on capital letters in NxDT's
  input/output format, ``copy: XKQ =`` -> ``XKQ``, ``reverse: XKQ =`` -> ``QKX``, ``first: XKQ =``
  -> ``X``, ``last: XKQ =`` -> ``Q``, ``next: G =`` -> ``H``, ``prev: H =`` -> ``G``; ``chat/``
  holds the same rows as ``messages``. Validation and test prompts of the word tasks never occur
  in training. The ``llama3-tiny`` shape (0.9M parameters) trained on packed rows with attention
  kept inside each example reaches ~100% exact match in ~150 steps of 32 rows; one example per
  padded row, it is at ~10-15% after 300 steps (chance is ~3%).
* ``pretrain/corpus.{txt,jsonl}``: a templated English corpus, one document per paragraph.
* ``preference/{train,validation}.jsonl``: the SFT rows of the same splits as DPO/ORPO pairs,
  ``{"prompt", "chosen", "rejected"}``: chosen is the correct answer, rejected a wrong one of the
  same shape (every letter replaced by another), so telling them apart takes knowing the task.
  ``llama3-tiny --recipe dpo`` reaches ~0.85 held-out reward accuracy in its 250 steps (with a
  single letter replaced, ~0.75: one contrasting token per pair teaches less).
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import random
import string
from collections.abc import Callable
from pathlib import Path

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPLIT_SIZES = {"train": 6000, "validation": 400, "test": 400}
SEED = 20240611
LETTERS = string.ascii_uppercase


WORD_LENGTH = 3


def _letters(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(low, high)))


def _word_task(transform: Callable[[str], str]) -> Callable[[random.Random], tuple[str, str]]:
    def generate(rng: random.Random) -> tuple[str, str]:
        word = _letters(rng, WORD_LENGTH, WORD_LENGTH)
        return word, transform(word)

    return generate


def _next_letter(rng: random.Random) -> tuple[str, str]:
    letter = rng.choice(LETTERS[:-1])
    return letter, LETTERS[LETTERS.index(letter) + 1]


def _prev_letter(rng: random.Random) -> tuple[str, str]:
    letter = rng.choice(LETTERS[1:])
    return letter, LETTERS[LETTERS.index(letter) - 1]


#: task name -> generator of (argument, answer). Words have a fixed length so that every answer
#: letter sits at a fixed distance from its source letter, which a tiny model learns fast.
TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "copy": _word_task(lambda word: word),
    "reverse": _word_task(lambda word: word[::-1]),
    "first": _word_task(lambda word: word[0]),
    "last": _word_task(lambda word: word[-1]),
    "next": _next_letter,
    "prev": _prev_letter,
}

#: Tasks whose whole argument space is a small lookup table; every other task's validation and
#: test prompts never occur in training.
LOOKUP_TASKS = ("next", "prev")


def task_rows(split: str) -> list[dict[str, str]]:
    """The input/output rows of one split, generated (not read) from the fixed seed."""
    held_out = set()
    if split == "train":
        held_out = {row["input"] for other in ("validation", "test") for row in task_rows(other)}
    rng = random.Random(f"{SEED}-{split}")
    rows: list[dict[str, str]] = []
    while len(rows) < SPLIT_SIZES[split]:
        task = rng.choice(list(TASKS))
        argument, answer = TASKS[task](rng)
        prompt = f"{task}: {argument} ="
        if prompt not in held_out or task in LOOKUP_TASKS:
            rows.append({"input": prompt, "output": answer})
    return rows


PREFERENCE_SPLITS = ("train", "validation")


def preference_rows(split: str) -> list[dict[str, str]]:
    """The SFT rows of ``split`` as preference pairs: the correct answer against one with every letter wrong."""
    rng = random.Random(f"{SEED}-preference-{split}")
    rows = []
    for row in task_rows(split):
        answer = row["output"]
        wrong = "".join(rng.choice([c for c in LETTERS if c != letter]) for letter in answer)
        rows.append({"prompt": row["input"], "chosen": answer, "rejected": wrong})
    return rows


def as_messages(row: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """An input/output row as a chat conversation."""
    return {
        "messages": [
            {"role": "user", "content": row["input"]},
            {"role": "assistant", "content": row["output"]},
        ]
    }


NOUNS = "cat dog bird fox horse fish tree river stone house garden window teacher farmer child robot ship cloud".split()
ADJECTIVES = "red blue green small large quiet happy old young bright dark gentle quick slow brave".split()
VERBS = "sees finds follows watches likes helps paints visits carries builds".split()
PLACES = "in the park|near the river|under the bridge|on the hill|by the sea|in the old town".split("|")


def _sentence(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        return (
            f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
            f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(PLACES)}."
        )
    if kind == 1:
        a, b = rng.randrange(10), rng.randrange(10)
        return f"{a} plus {b} is {a + b}, and {a + b} minus {b} is {a}."
    if kind == 2:
        letter, following = _next_letter(rng)
        return f"the letter after {letter} is {following}."
    if kind == 3:
        word = _letters(rng, 2, 5)
        return f"the word {word} reversed is {word[::-1]}, and sorted it is {''.join(sorted(word))}."
    if kind == 4:
        count = rng.randint(2, 9)
        return f"there are {count} {rng.choice(NOUNS)}s {rng.choice(PLACES)}, and each one is {rng.choice(ADJECTIVES)}."
    return f"every morning the {rng.choice(NOUNS)} {rng.choice(VERBS)} a {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}."


def corpus_documents(num_documents: int = 1000) -> list[str]:
    """The pretraining corpus: paragraphs of 3-8 templated sentences."""
    rng = random.Random(f"{SEED}-corpus")
    return [" ".join(_sentence(rng) for _ in range(rng.randint(3, 8))) for _ in range(num_documents)]


def build_tokenizer(texts: list[str]):  # -> tokenizers.Tokenizer
    """Train the byte-level BPE on ``texts`` and pad its vocabulary to exactly ``VOCAB_SIZE``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # Capitals and digits stand alone so "reverse: XKQ" is one token per letter of XKQ.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("[A-Z0-9]"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    shortfall = VOCAB_SIZE - tokenizer.get_vocab_size(with_added_tokens=True)
    tokenizer.add_special_tokens([f"<|reserved_{i}|>" for i in range(shortfall)])
    if tokenizer.get_vocab_size(with_added_tokens=True) != VOCAB_SIZE:
        raise RuntimeError(f"embedded tokenizer has {tokenizer.get_vocab_size()} tokens, not {VOCAB_SIZE}")
    return tokenizer


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def generate(out_dir: str | Path) -> dict[str, Path]:
    """Write the tokenizer, SFT splits and pretraining corpus under ``out_dir``; return their paths."""
    out = Path(out_dir)
    paths = embedded_paths(out)
    splits = {split: task_rows(split) for split in SPLIT_SIZES}
    documents = corpus_documents()
    files: dict[Path, str] = {
        paths["pretrain_txt"]: "\n\n".join(documents) + "\n",
        paths["pretrain_jsonl"]: _jsonl([{"text": doc} for doc in documents]),
    }
    for split, rows in splits.items():
        files[paths[f"sft_{split}"]] = _jsonl(rows)
        files[paths[f"chat_{split}"]] = _jsonl([as_messages(row) for row in rows])
    for split in PREFERENCE_SPLITS:
        files[paths[f"preference_{split}"]] = _jsonl(preference_rows(split))

    bpe_texts = documents + [row["input"] + " " + row["output"] for row in splits["train"]]
    files[paths["tokenizer"] / "tokenizer.json"] = build_tokenizer(bpe_texts).to_str(pretty=True) + "\n"
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|eos|>",
        "pad_token": "<|pad|>",
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    files[paths["tokenizer"] / "tokenizer_config.json"] = json.dumps(config, indent=2) + "\n"
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="\n")
    return paths


def embedded_paths(root: str | Path | None = None) -> dict[str, Path]:
    """Paths of the embedded files (under the installed package unless ``root`` is given)."""
    if root is None:
        root = Path(str(importlib.resources.files("nxdt.data").joinpath("embedded")))
    root = Path(root)
    paths = {"root": root, "tokenizer": root / "tokenizer"}
    for split in SPLIT_SIZES:
        paths[f"sft_{split}"] = root / "sft" / f"{split}.jsonl"
        paths[f"chat_{split}"] = root / "chat" / f"{split}.jsonl"
    for split in PREFERENCE_SPLITS:
        paths[f"preference_{split}"] = root / "preference" / f"{split}.jsonl"
    paths["pretrain_txt"] = root / "pretrain" / "corpus.txt"
    paths["pretrain_jsonl"] = root / "pretrain" / "corpus.jsonl"
    return paths


def load_task_rows(split: str = "test") -> list[tuple[str, str]]:
    """(prompt, answer) pairs of an embedded SFT split, read from the committed file."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"split must be one of {list(SPLIT_SIZES)}, got {split!r}")
    with open(embedded_paths()[f"sft_{split}"], encoding="utf-8") as handle:
        return [(row["input"], row["output"]) for row in map(json.loads, handle)]


def main(argv: list[str] | None = None) -> None:
    """Command line: regenerate the embedded files (into the package unless --out is given)."""
    parser = argparse.ArgumentParser(prog="python -m nxdt.data.embedded", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="output directory (default: the package's embedded/)"
    )
    args = parser.parse_args(argv)
    paths = generate(args.out if args.out is not None else embedded_paths()["root"])
    for name, path in paths.items():
        if path.is_file():
            print(f"{name}: {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
