"""Loading tokenizers behind one small protocol.

Every tokenizer nxdt hands out has the same surface, whatever it wraps (a transformers tokenizer,
a bare ``tokenizer.json``, a sentencepiece ``.model``, Megatron's GPT-2 vocab/merges):

* ``encode(text) -> list[int]``: never adds BOS/EOS, but special-token strings in the text
  (``<|eos|>``, ``</s>``) become their ids, so rendered chat templates encode correctly;
* ``encode_batch(texts)``, ``decode(ids, skip_special_tokens=True)``;
* ``eos_id``, ``bos_id`` (``None`` when the tokenizer has none), ``pad_id`` (EOS when there is no
  pad token; padded positions are never trained on), ``vocab_size`` (added tokens included);
* ``cls_id``, ``sep_id``, ``mask_id``: an encoder's (BERT's) special tokens, ``None`` where absent;
* ``render_chat(messages, add_generation_prompt=False) -> str`` and
  ``apply_chat_template(...) -> list[int]`` from the tokenizer's chat template.
"""

from __future__ import annotations

import functools
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nxdt.errors import NxdtError

EMBEDDED_NAMES = (None, "", "embedded", "default")


class Tokenizer(ABC):
    """The protocol every nxdt tokenizer implements (the base class only shares the chat glue)."""

    vocab_size: int
    eos_id: int
    bos_id: int | None
    pad_id: int
    cls_id: int | None = None
    sep_id: int | None = None
    mask_id: int | None = None
    name: str = ""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS added."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` over many texts (wrappers override this with a faster batched call)."""
        return [self.encode(text) for text in texts]

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``."""

    @abstractmethod
    def render_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The chat template applied to ``messages``, as text."""

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
    ) -> list[int]:
        """Token ids of the rendered chat (what generation starts from)."""
        return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size})"


class HFTokenizer(Tokenizer):
    """A transformers tokenizer behind the nxdt protocol."""

    def __init__(self, hf_tokenizer: Any, name: str = "") -> None:
        self.hf = hf_tokenizer
        self.name = name or getattr(hf_tokenizer, "name_or_path", "")
        self.vocab_size = len(hf_tokenizer)
        self.bos_id = hf_tokenizer.bos_token_id
        # Encoder tokenizers (BERT) have [SEP] where decoders have EOS.
        eos = (
            hf_tokenizer.eos_token_id if hf_tokenizer.eos_token_id is not None else hf_tokenizer.sep_token_id
        )
        if eos is None:
            raise NxdtError(f"tokenizer {self.name!r} has neither an EOS nor a SEP token; pass eos_token=...")
        self.eos_id = eos
        self.pad_id = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else eos
        self.cls_id, self.sep_id = hf_tokenizer.cls_token_id, hf_tokenizer.sep_token_id
        self.mask_id = hf_tokenizer.mask_token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS added."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Batched ``encode`` (one call into the Rust tokenizer for fast tokenizers)."""
        if not texts:
            return []
        return [list(ids) for ids in self.hf(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``."""
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The tokenizer's own chat template applied to ``messages``, as text."""
        if not getattr(self.hf, "chat_template", None):
            raise NxdtError(
                f"tokenizer {self.name!r} has no chat template; use input/output rows or pass chat_template=..."
            )
        return self.hf.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )


class FastTokenizer(Tokenizer):
    """A ``tokenizers`` (Rust) tokenizer behind the nxdt protocol, without importing transformers.

    Used for bare ``tokenizer.json`` files, Megatron's GPT-2 BPE and the embedded default; the
    special tokens are named by string and must be in the vocabulary.
    """

    def __init__(
        self,
        rust_tokenizer: Any,
        name: str,
        eos_token: str,
        bos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.rust, self.name, self.chat_template = rust_tokenizer, name, chat_template
        self.special_tokens = {
            "eos_token": eos_token,
            "bos_token": bos_token or "",
            "pad_token": pad_token or "",
        }
        # Registering them as special makes their strings in text (a rendered chat) encode as one id.
        self.rust.add_special_tokens([t for t in (bos_token, eos_token, pad_token) if t])
        self.vocab_size = self.rust.get_vocab_size(with_added_tokens=True)
        self.eos_id = self.rust.token_to_id(eos_token)
        self.bos_id = self.rust.token_to_id(bos_token) if bos_token else None
        self.pad_id = self.rust.token_to_id(pad_token) if pad_token else self.eos_id
        # A bare tokenizer.json names no roles; an encoder's special tokens go by BERT's names.
        self.cls_id, self.sep_id, self.mask_id = (self.rust.token_to_id(t) for t in ("[CLS]", "[SEP]", "[MASK]"))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS added."""
        return self.rust.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Batched ``encode`` (parallel in Rust)."""
        return [e.ids for e in self.rust.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``."""
        return self.rust.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """``chat_template`` (Jinja, as in transformers) applied to ``messages``."""
        if not self.chat_template:
            raise NxdtError(f"tokenizer {self.name} has no chat template; pass chat_template=...")
        return render_jinja_chat(self.chat_template, messages, add_generation_prompt, **self.special_tokens)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model`` behind the nxdt protocol (chat via an optional Jinja template)."""

    def __init__(self, model_file: str | Path, chat_template: str | None = None) -> None:
        import sentencepiece

        self.name = str(model_file)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        if self.sp.eos_id() < 0:
            raise NxdtError(f"sentencepiece model {self.name} has no EOS piece (train it with eos_id >= 0)")
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.chat_template = chat_template
        # sentencepiece reads "</s>" in text as plain characters; split those out ourselves so a
        # rendered chat template keeps its control tokens.
        self.special_ids = {
            self.sp.id_to_piece(i): i for i in range(self.vocab_size) if self.sp.is_control(i)
        }
        pattern = "|".join(re.escape(piece) for piece in sorted(self.special_ids, key=len, reverse=True))
        self.special_pattern = re.compile(f"({pattern})") if pattern else None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS added (control-piece strings become their ids)."""
        if self.special_pattern is None:
            return list(self.sp.encode(text))
        ids: list[int] = []
        for part in self.special_pattern.split(text):
            if part in self.special_ids:
                ids.append(self.special_ids[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (sentencepiece always drops control pieces)."""
        return self.sp.decode([int(i) for i in ids])

    def render_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """``chat_template`` (Jinja, as in transformers) applied to ``messages``."""
        if not self.chat_template:
            raise NxdtError(
                f"sentencepiece tokenizer {self.name} has no chat template; pass chat_template=..."
            )
        return render_jinja_chat(
            self.chat_template,
            messages,
            add_generation_prompt,
            bos_token=self.sp.id_to_piece(self.bos_id) if self.bos_id is not None else "",
            eos_token=self.sp.id_to_piece(self.eos_id),
        )


def render_jinja_chat(
    template: str, messages: Sequence[dict[str, str]], add_generation_prompt: bool, **special_tokens: str
) -> str:
    """Render a transformers-style chat template in a sandbox (no file or attribute access)."""
    return _compiled_template(template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **special_tokens
    )


@functools.lru_cache(maxsize=16)
def _compiled_template(template: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    # The same environment settings and helpers transformers gives chat templates.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    return env.from_string(template)


def load_tokenizer(type_or_path: str | Path | None = "embedded", **kwargs: Any) -> Tokenizer:
    """Load a tokenizer by path (HF dir, tokenizer.json, sentencepiece .model) or type name.

    ``None``/"embedded" is nxdt's embedded default. "GPT2BPETokenizer" needs ``vocab_file`` and
    ``merge_file`` (Megatron style). ``chat_template`` replaces or supplies the chat template;
    ``bos_token``/``eos_token``/``pad_token`` name special tokens a bare tokenizer.json lacks.
    """
    if type_or_path in EMBEDDED_NAMES:
        from nxdt.data.embedded import embedded_paths

        return _load_configured_json(embedded_paths()["tokenizer"], **kwargs)
    if str(type_or_path) == "GPT2BPETokenizer":
        return _load_gpt2_bpe(kwargs.pop("vocab_file", None), kwargs.pop("merge_file", None), **kwargs)
    path = Path(str(type_or_path)).expanduser()
    if path.is_file() and path.suffix == ".model":
        return SentencePieceTokenizer(path, chat_template=kwargs.get("chat_template"))
    if path.is_file() and path.suffix == ".json":
        return _load_tokenizer_json(path, **kwargs)
    if path.is_dir():
        return _load_hf_dir(path, **kwargs)
    # Not a local path: it may still be a hub id already in the local HF cache (never downloaded).
    try:
        return _from_auto(str(type_or_path), **kwargs)
    except (OSError, ValueError) as err:
        raise NxdtError(
            f"tokenizer not found: {str(type_or_path)!r} is not a tokenizer directory, tokenizer.json "
            f"or sentencepiece .model file, nor a model id in the local Hugging Face cache ({err})"
        ) from None


def _from_auto(name_or_path: str, chat_template: str | None = None, **special: Any) -> HFTokenizer:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True, **special)
    if chat_template:
        hf.chat_template = chat_template
    return HFTokenizer(hf, name=str(name_or_path))


def _load_hf_dir(path: Path, **kwargs: Any) -> Tokenizer:
    """A tokenizer directory; bare directories with only tokenizer.json or a .model still load."""
    has_config = (path / "tokenizer_config.json").is_file() or (path / "config.json").is_file()
    if not has_config and (path / "tokenizer.json").is_file():
        return _load_tokenizer_json(path / "tokenizer.json", **kwargs)
    models = sorted(path.glob("*.model"))
    if not has_config and models:
        return SentencePieceTokenizer(models[0], chat_template=kwargs.get("chat_template"))
    try:
        return _from_auto(str(path), **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise NxdtError(f"cannot load a tokenizer from directory {path}: {err}") from None


def _read_rust_tokenizer(path: Path) -> Any:
    from tokenizers import Tokenizer as RustTokenizer

    try:
        return RustTokenizer.from_file(str(path))
    except Exception as err:  # the Rust side raises plain Exception on malformed files
        raise NxdtError(f"cannot read tokenizer file {path}: {err}") from None


def _load_tokenizer_json(
    path: Path,
    chat_template: str | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
    **_: Any,
) -> FastTokenizer:
    """A bare ``tokenizers`` file; special tokens default to the common names found in its vocab."""
    rust = _read_rust_tokenizer(path)
    vocab = rust.get_vocab(with_added_tokens=True)

    def first_known(*candidates: str | None) -> str | None:
        return next((c for c in candidates if c and c in vocab), None)

    eos = first_known(eos_token, "<|eos|>", "</s>", "<|end_of_text|>", "<|endoftext|>", "[SEP]")
    if eos is None:
        raise NxdtError(f"tokenizer file {path} has no known EOS token; pass eos_token=...")
    return FastTokenizer(
        rust,
        name=str(path),
        eos_token=eos,
        bos_token=first_known(bos_token, "<|bos|>", "<s>", "<|begin_of_text|>", "<|endoftext|>", "[CLS]"),
        pad_token=first_known(pad_token, "<|pad|>", "<pad>", "[PAD]"),
        chat_template=chat_template,
    )


def _load_configured_json(directory: Path, chat_template: str | None = None, **_: Any) -> FastTokenizer:
    """tokenizer.json with the special tokens and chat template of its tokenizer_config.json."""
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))

    def token(key: str) -> str | None:
        value = config.get(key)
        return value.get("content") if isinstance(value, dict) else value

    return FastTokenizer(
        _read_rust_tokenizer(directory / "tokenizer.json"),
        name=str(directory),
        eos_token=token("eos_token"),  # type: ignore[arg-type]
        bos_token=token("bos_token"),
        pad_token=token("pad_token"),
        chat_template=chat_template or config.get("chat_template"),
    )


def _load_gpt2_bpe(
    vocab_file: str | Path | None, merge_file: str | Path | None, chat_template: str | None = None, **_: Any
) -> FastTokenizer:
    """Megatron's GPT2BPETokenizer: byte-level BPE from vocab.json + merges.txt, <|endoftext|> as EOD."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    for label, file in (("vocab_file", vocab_file), ("merge_file", merge_file)):
        if file is None:
            raise NxdtError(f"tokenizer type GPT2BPETokenizer needs {label}")
        if not Path(file).is_file():
            raise NxdtError(f"tokenizer {label} not found: {file}")
    eod = "<|endoftext|>"
    if eod not in json.loads(Path(vocab_file).read_text(encoding="utf-8")):  # type: ignore[arg-type]
        raise NxdtError(f"GPT2BPETokenizer vocab {vocab_file} has no {eod} token")
    rust = RustTokenizer(models.BPE.from_file(str(vocab_file), str(merge_file)))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    return FastTokenizer(
        rust, f"GPT2BPETokenizer({vocab_file})", eos_token=eod, bos_token=eod, chat_template=chat_template
    )
