"""Task metrics of the SFT recipe: greedy-decoded exact match on held-out prompt/answer pairs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from nxdt.errors import NxdtError

#: held-out pairs scored at the end of an SFT run (the first N rows of the test file)
MAX_EVAL_ROWS = 200
MAX_NEW_TOKENS = 16
#: prompts decoded together (left-padded into one KV-cached batch)
EVAL_BATCH = 256


@torch.no_grad()
def greedy_answers(
    model: Any, tokenizer: Any, prompts: list[str], device: torch.device, length_multiple: int = 1
) -> list[str]:
    """Greedy continuations up to EOS through :func:`nxdt.generation.generate` (KV cache, batched).

    Sequence parallelism needs lengths divisible by the TP size (``length_multiple``): decoding
    then recomputes right-padded sequences, which leaves earlier positions untouched.
    """
    from nxdt.data.sft import prompt_ids
    from nxdt.generation import generate

    module = getattr(model, "trainable_module", model)  # the model itself: the cache argument reaches it
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    with eager():
        rows = generate(module, encoded, MAX_NEW_TOKENS, [tokenizer.eos_id], tokenizer.pad_id,
                        batch_size=EVAL_BATCH, length_multiple=length_multiple, device=device)
    return [tokenizer.decode([t for t in row if t != tokenizer.eos_id]).strip() for row in rows]


def eager() -> Any:
    """Run compiled blocks eagerly: every decoding step has new shapes, which would only recompile."""
    import contextlib

    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def exact_match(
    model: Any, tokenizer: Any, rows: list[tuple[str, str]], device: torch.device, length_multiple: int = 1
) -> float:
    """Share of ``rows`` whose greedy answer equals the reference answer."""
    answers = greedy_answers(model, tokenizer, [p for p, _ in rows], device, length_multiple)
    return sum(a == ref.strip() for a, (_, ref) in zip(answers, rows)) / max(1, len(rows))


def evaluation_rows(cfg: Any) -> list[tuple[str, str]]:
    """Held-out input/output pairs: ``data.test_dir`` if given, the embedded test split when training on it.

    ``trainer.limit_test_batches`` bounds them like Lightning's: a count of global batches, a
    fraction of the rows, 0 for none; unset, the first :data:`MAX_EVAL_ROWS` rows.
    """
    limit = cfg.trainer.limit_test_batches
    if limit is not None and limit == 0:
        return []
    test_dir = cfg.data.test_dir
    if test_dir:
        path = Path(test_dir)
        if not path.is_file():
            raise NxdtError(f"data.test_dir: {path} is not a file (JSONL rows with input and output)")
    elif cfg.data.train_dir is None:
        from nxdt.data.embedded import embedded_paths

        path = embedded_paths()["sft_test"]
    else:
        return []
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise NxdtError(f"{path}:{number}: not valid JSON: {exc.msg}") from None
            if isinstance(record, dict) and "input" in record and "output" in record:
                rows.append((record["input"], record["output"]))
    if limit is None:
        return rows[:MAX_EVAL_ROWS]
    if isinstance(limit, float) and limit <= 1.0:
        return rows[: int(len(rows) * limit)]
    return rows[: int(limit) * cfg.data.global_batch_size]


def sft_exact_match(trainer: Any) -> dict[str, float]:
    """Exact match of the model as it is now (the trainer calls this before and after training)."""
    rows = evaluation_rows(trainer.cfg)
    if not rows:
        return {}
    model, tokenizer, device = trainer.model, trainer.data.tokenizer, trainer.world.device
    model.eval()
    multiple = trainer.parallel.tp if trainer.parallel.sequence_parallel else 1
    score = exact_match(model, tokenizer, rows, device, multiple)
    model.train()
    return {"task/exact_match": score}
