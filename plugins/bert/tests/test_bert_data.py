"""Masked-LM data and objective: the 15% / 80-10-10 masking, sample layout, sentence pairs for NSP,
determinism per sample, every corpus source the pretrain recipe reads, refusals, the shipped WordPiece
tokenizer, and the objective's sums, counts and metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nxdt.data.batch import IGNORE_INDEX, collate
from nxdt.data.tokenizer import load_tokenizer
from nxdt.errors import ConfigError, NxdtError
from nxdt_bert.data import MASK_PROB, MaskedLMDataset, SpecialTokens, build_masked_lm_dataset, text_corpus
from nxdt_bert.objective import MaskedLMObjective
from nxdt_bert.plugin import tokenizer_path

DOCS = [
    "the quick fox sees the old river. 3 plus 4 is 7! every morning the cat finds a red stone.",
    "the letter after b is c. there are 5 birds on the hill, and each one is happy. the dog likes a blue tree.",
    "every morning the robot paints a green house. 2 plus 2 is 4.",
    "the brave child visits the quiet garden by the sea. the word abc reversed is cba. 9 minus 1 is 8.",
]


@pytest.fixture(scope="module")
def tok():
    """The WordPiece tokenizer bert-tiny ships with."""
    return load_tokenizer(str(tokenizer_path()))


@pytest.fixture(scope="module")
def embedded(tok):
    """nxdt's embedded corpus as sentences of WordPiece ids."""
    from nxdt.data.embedded import embedded_paths

    return text_corpus([embedded_paths()["pretrain_txt"]], tok, 125)


def _run_config(*overrides: str):
    from nxdt.resolve import resolve

    return resolve("bert-tiny", "pretrain", list(overrides)).config


def _original(item: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sample's tokens before masking."""
    return torch.where(item["labels"] != IGNORE_INDEX, item["labels"], item["input_ids"])


def test_shipped_tokenizer_has_bert_special_tokens(tok, tmp_path):
    """512 WordPiece tokens; [CLS] [SEP] [MASK] [PAD] are tokenizer properties, also through a bare tokenizer.json."""
    from transformers import AutoTokenizer

    from nxdt_bert.wordpiece import SPECIAL_TOKENS, build

    assert tok.vocab_size == 512
    ids = {name: getattr(tok, f"{name}_id") for name in ("pad", "cls", "sep", "mask")}
    assert ids == {"pad": 0, "cls": 2, "sep": 3, "mask": 4}
    bare = load_tokenizer(str(tokenizer_path() / "tokenizer.json"))
    assert (bare.cls_id, bare.sep_id, bare.mask_id, bare.pad_id) == (2, 3, 4, 0)
    assert load_tokenizer("embedded").mask_id is None
    hf = AutoTokenizer.from_pretrained(tokenizer_path())
    pair = hf("The fox sees a river.", "2 plus 2 is 4")
    assert pair["input_ids"][0] == 2 and pair["input_ids"].count(3) == 2 and pair["token_type_ids"][-1] == 1
    assert tok.decode(tok.encode("The fox sees a river.")) == "the fox sees a river."
    rebuilt = build(DOCS * 5)  # the generator: specials first, filled to exactly 512 entries
    assert rebuilt.get_vocab_size() == 512 and [rebuilt.id_to_token(i) for i in range(5)] == SPECIAL_TOKENS


def test_masking_is_15_percent_80_10_10_and_never_special(embedded, tok):
    """Per sample exactly round(15%) of the maskable tokens carry labels; of those 80% [MASK], 10% random, 10% kept."""
    specials = SpecialTokens.of(tok)
    ds = MaskedLMDataset(embedded, embedded.spans(62), 64, specials, tok.vocab_size, pairs=False, copies=3, seed=7)
    assert len(ds) == 3 * len(embedded.spans(62))
    counts = {"mask": 0, "random": 0, "kept": 0}
    for i in range(0, len(ds), 7):
        item = ds[i]
        ids, labels, attn = item["input_ids"], item["labels"], item["attention_mask"]
        n = int(attn.sum())
        assert ids[0] == specials.cls and ids[n - 1] == specials.sep and bool((ids[n:] == specials.pad).all())
        assert attn[:n].all() and not attn[n:].any() and not item["token_type_ids"].any()
        chosen = labels != IGNORE_INDEX
        assert int(chosen.sum()) == max(1, round((n - 2) * MASK_PROB))
        assert not chosen[0] and not chosen[n - 1:].any()
        counts["mask"] += int((ids[chosen] == specials.mask).sum())
        kept = ids[chosen] == labels[chosen]
        counts["kept"] += int(kept.sum())
        counts["random"] += int((~kept & (ids[chosen] != specials.mask)).sum())
        assert not torch.isin(ids[chosen], torch.tensor(sorted(specials.special - {specials.mask}))).any()
    total = sum(counts.values())
    shares = {k: v / total for k, v in counts.items()}
    print(f"{total} chosen tokens: {shares}")
    assert total > 3000
    assert abs(shares["mask"] - 0.8) < 0.03 and abs(shares["random"] - 0.1) < 0.02 and abs(shares["kept"] - 0.1) < 0.02


def test_samples_are_deterministic_per_index(embedded, tok):
    """The same index gives the same sample from any dataset object (any rank); copies are masked differently."""
    specials = SpecialTokens.of(tok)

    def make():
        return MaskedLMDataset(embedded, embedded.spans(61), 64, specials, tok.vocab_size, pairs=True, copies=2, seed=3)

    a, b = make(), make()
    for i in (0, 5, len(a) - 1):
        assert all(torch.equal(a[i][k], b[i][k]) for k in a[i])
    n = len(embedded.spans(61))
    assert not torch.equal(a[0]["input_ids"], a[n]["input_ids"])  # the span's second, differently masked copy


def test_sentence_pairs_for_next_sentence_prediction(embedded, tok):
    """[CLS] A [SEP] B [SEP] with token types 0/1; B continues A (label 0) or comes from another document (1), 50/50."""
    specials = SpecialTokens.of(tok)
    spans = embedded.spans(125)
    ds = MaskedLMDataset(embedded, spans, 128, specials, tok.vocab_size, pairs=True, seed=11)
    labels = []
    for i in range(0, len(ds), 3):
        item = ds[i]
        tokens = _original(item)
        n = int(item["attention_mask"].sum())
        seps = torch.nonzero(tokens[:n] == specials.sep).flatten()
        assert len(seps) == 2 and seps[1] == n - 1 and tokens[0] == specials.cls
        types = item["token_type_ids"]
        assert not types[: seps[0] + 1].any() and types[seps[0] + 1 : n].all() and not types[n:].any()
        doc, first, end = spans[i % len(spans)]
        text = np.concatenate([embedded.sentence(s) for s in range(first, end)])
        a, b = tokens[1 : seps[0]].numpy(), tokens[seps[0] + 1 : n - 1].numpy()
        label = int(item["next_sentence_label"])
        labels.append(label)
        if label == 0:  # no truncation at this length: A then B is the whole span, cut at a sentence end
            assert np.array_equal(np.concatenate([a, b]), text)
        else:
            assert np.array_equal(a, text[: len(a)]) and not np.array_equal(b, text[len(a) : len(a) + len(b)])
    share = sum(labels) / len(labels)
    print(f"{len(labels)} pairs, {share:.2f} with a random B")
    assert abs(share - 0.5) < 0.08


def _write_sources(tmp_path, tok):
    """The same documents as .txt, .jsonl, .parquet, an HF datasets dir (text and input_ids) and Megatron .bin/.idx."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nxdt.data.megatron import preprocess_to_megatron

    docs = DOCS * 10
    (tmp_path / "c.txt").write_text("\n\n".join(docs) + "\n")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    pq.write_table(pa.table({"text": docs}), tmp_path / "c.parquet")
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "hf_text"))
    ids = [[tok.cls_id, *tok.encode(d), tok.sep_id] for d in docs]
    datasets.Dataset.from_dict({"input_ids": ids}).save_to_disk(str(tmp_path / "hf_ids"))
    preprocess_to_megatron(tmp_path / "c.jsonl", tok, tmp_path / "mg" / "c")
    return docs


def test_every_corpus_source_gives_the_same_text(tmp_path, tok):
    """txt, jsonl, parquet, HF datasets (text or input_ids) and Megatron .bin/.idx: the same documents, the same spans."""
    _write_sources(tmp_path, tok)
    texts = {}
    for name, key in (("c.txt", "train_dir"), ("c.jsonl", "train_dir"), ("c.parquet", "train_dir"),
                      ("hf_text", "train_dir"), ("hf_ids", "train_dir"), ("mg/c", "data_prefix")):
        value = f"[{tmp_path / name}]" if key == "data_prefix" else str(tmp_path / name)
        ds = build_masked_lm_dataset(_run_config(f"data.{key}={value}"), tok, "train")
        texts[name] = [tok.decode(_original(ds[i]).tolist()) for i in range(len(ds) // 10)]
        assert build_masked_lm_dataset(_run_config(f"data.{key}={value}"), tok, "validation") is None
    reference = texts.pop("c.txt")
    assert len(reference) == len(DOCS) * 10 and reference[0].startswith("the quick fox sees the old river.")
    # WordPiece splits sentences exactly as it splits whole documents, so the samples agree token for token.
    for name, got in texts.items():
        assert got == reference, name


def test_validation_sources_splits_and_blends(tmp_path, tok):
    """val_dir, splits_string shares of spans, a train/validation data_prefix dict, a weighted Megatron blend."""
    from nxdt.data.megatron import preprocess_to_megatron

    _write_sources(tmp_path, tok)
    train = build_masked_lm_dataset(_run_config(f"data.train_dir={tmp_path / 'c.txt'}", f"data.val_dir={tmp_path / 'c.jsonl'}"), tok, "validation")
    assert train is not None and len(train) == len(DOCS) * 10  # one masked copy of each validation span
    cfg = _run_config(f"data.train_dir={tmp_path / 'c.txt'}", "data.splits_string=80,20,0")
    sizes = {s: build_masked_lm_dataset(cfg, tok, s) for s in ("train", "validation", "test")}
    assert len(sizes["train"]) == 10 * 32 and len(sizes["validation"]) == 8 and sizes["test"] is None
    (tmp_path / "d.txt").write_text("every morning the ship helps a slow fox.\n\nthe stone sees a cloud.\n")
    preprocess_to_megatron(tmp_path / "d.txt", tok, tmp_path / "mg" / "d")
    split = _run_config(f"data.data_prefix={{train: [{tmp_path / 'mg/c'}], validation: [{tmp_path / 'mg/d'}]}}")
    assert len(build_masked_lm_dataset(split, tok, "validation")) == 2
    blend = build_masked_lm_dataset(_run_config(f"data.data_prefix=[0.5,{tmp_path / 'mg/c'},0.5,{tmp_path / 'mg/d'}]"), tok, "train")
    from_d = sum(tok.decode(_original(blend[i]).tolist()).startswith(("every morning the ship", "the stone"))
                 for i in range(100))
    assert 40 <= from_d <= 60  # drawn in proportion to the weights
    embedded = {s: build_masked_lm_dataset(_run_config(), tok, s) for s in ("train", "validation")}
    assert len(embedded["train"]) % 10 == 0 and 0 < len(embedded["validation"]) < len(embedded["train"]) / 100


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["data.eod_mask_loss=true"], ConfigError, "data.eod_mask_loss: masked-LM samples hold one document"),
        (["data.splits_string=90,10", "data.val_dir=x.txt"], ConfigError, "data.splits_string cuts one source"),
        (["data.tokenizer.type=embedded"], NxdtError, "has no \\[CLS\\], \\[SEP\\], \\[MASK\\]"),
        (["data.train_dir=/nonexistent/corpus.txt"], NxdtError, "data path not found"),
    ],
)
def test_data_errors_are_one_line(overrides, error, message):
    """What the masked-LM data cannot honour is refused with one line."""
    cfg = _run_config(*overrides)
    tokenizer = load_tokenizer(cfg.data.tokenizer.type)
    with pytest.raises(error, match=message) as info:
        build_masked_lm_dataset(cfg, tokenizer, "train")
    assert "\n" not in str(info.value)


def test_run_data_keys_reach_the_masked_lm_recipe():
    """The pretrain keys (data_prefix, splits_string) are accepted for the masked-LM pretrain recipe; SFT keys are not."""
    from nxdt.resolve import resolve

    resolve("bert-tiny", "pretrain", ["data.data_prefix=[x]", "data.splits_string=98,1,1"])
    with pytest.raises(ConfigError, match="applies to the sft recipe"):
        resolve("bert-tiny", "pretrain", ["model_alignment_strategy.sft.packing=true"])


def test_objective_sums_counts_and_metrics(embedded, tok):
    """Loss = sum over masked tokens (+ NSP per pair, weighted by its masked tokens); count = masked tokens; metrics."""
    specials = SpecialTokens.of(tok)
    ds = MaskedLMDataset(embedded, embedded.spans(61), 64, specials, tok.vocab_size, pairs=True, seed=5)
    batch = collate([ds[i] for i in range(6)])
    batch["labels"][5] = IGNORE_INDEX  # a validation padding row: no labels of either kind
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 64, tok.vocab_size, generator=g)
    nsp = torch.randn(6, 2, generator=g)
    objective = MaskedLMObjective()
    masked = batch["labels"] != IGNORE_INDEX
    assert objective.count(batch) == masked.sum()
    mlm_only = objective(logits, {k: v for k, v in batch.items() if k != "next_sentence_label"})
    ce = F.cross_entropy(logits[masked], batch["labels"][masked], reduction="none")
    assert torch.allclose(mlm_only.loss, ce.sum())
    loss_sum, count = mlm_only.metrics["mlm_accuracy"]
    assert loss_sum == (logits[masked].argmax(-1) == batch["labels"][masked]).sum() and count == masked.sum()
    both = objective((logits, nsp), batch)
    pair_ce = F.cross_entropy(nsp, batch["next_sentence_label"], reduction="none")
    assert torch.allclose(both.loss, ce.sum() + (pair_ce * masked.sum(-1)).sum())
    nsp_sum, pairs = both.metrics["nsp_loss"]
    assert pairs == 5 and torch.allclose(nsp_sum, pair_ce[:5].sum())
    assert both.metrics["nsp_accuracy"][0] == (nsp.argmax(-1) == batch["next_sentence_label"])[:5].sum()
    with pytest.raises(NxdtError, match="no next-sentence head"):
        objective(logits, batch)
    with pytest.raises(NxdtError, match="no sentence pairs"):
        objective((logits, nsp), {k: v for k, v in batch.items() if k != "next_sentence_label"})
