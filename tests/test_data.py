"""Tests of nxdt.data: tokenizers, pretraining/SFT datasets, Megatron files, sampler, embedded data."""

from __future__ import annotations

import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from nxdt.data import (
    IGNORE_INDEX,
    BlendedDataset,
    DistributedBatchSampler,
    GPTDataset,
    HFPretrainDataset,
    IndexedDataset,
    PackedTextDataset,
    SFTDataset,
    build_megatron_dataset,
    collate,
    embedded_paths,
    load_task_rows,
    load_tokenizer,
    packed_causal_mask,
    parse_data_prefix,
    preprocess_to_megatron,
    tokenize_chat,
    write_indexed_dataset,
)
from nxdt.data.embedded import VOCAB_SIZE, generate
from nxdt.errors import NxdtError


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("embedded")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def assert_shifted(item: dict[str, torch.Tensor], seq_length: int) -> None:
    """Every non-ignored label is the next input token, and the item has the common shape."""
    assert set(item) == {"input_ids", "labels", "position_ids"}
    for value in item.values():
        assert value.shape == (seq_length,) and value.dtype == torch.long
    labels, inputs = item["labels"], item["input_ids"]
    inner = labels[:-1] != IGNORE_INDEX
    assert torch.equal(labels[:-1][inner], inputs[1:][inner])


# ----------------------------------------------------------------------------- tokenizers


def test_embedded_tokenizer_surface(tok):
    assert tok.vocab_size == VOCAB_SIZE == 512
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    ids = tok.encode("reverse: XKQ =")
    assert tok.decode(ids) == "reverse: XKQ ="
    assert tok.encode("QKX") == [tok.encode(c)[0] for c in "QKX"]  # capitals are single tokens
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert chat[0] == tok.bos_id and tok.decode(chat, skip_special_tokens=False).endswith("<|assistant|>")


def test_embedded_tokenizer_matches_transformers(tok):
    hf = load_tokenizer(str(embedded_paths()["tokenizer"]))  # a directory with a config: AutoTokenizer
    assert type(hf).__name__ == "HFTokenizer" and type(tok).__name__ == "FastTokenizer"
    messages = [{"role": "user", "content": "next: C ="}, {"role": "assistant", "content": "D"}]
    assert hf.render_chat(messages) == tok.render_chat(messages)
    assert hf.render_chat(messages[:1], add_generation_prompt=True) == tok.render_chat(messages[:1], True)
    text = tok.render_chat(messages) + " the quick fox, 12 ünïcode"
    assert hf.encode(text) == tok.encode(text) and hf.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert (hf.vocab_size, hf.bos_id, hf.eos_id, hf.pad_id) == (
        tok.vocab_size,
        tok.bos_id,
        tok.eos_id,
        tok.pad_id,
    )


def test_missing_tokenizer_names_the_path(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(NxdtError, match="no_such_tokenizer"):
        load_tokenizer(str(missing))
    with pytest.raises(NxdtError, match="vocab_file"):
        load_tokenizer("GPT2BPETokenizer")


def test_sentencepiece_model_loads(tmp_path):
    import sentencepiece

    lines = ["the quick brown fox jumps over the lazy dog", "a small cat sits on the warm mat"] * 20
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=40,
        model_type="bpe",
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_id=0,
    )
    template = "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    sp = load_tokenizer(str(tmp_path / "sp.model"), chat_template=template)
    assert (sp.bos_id, sp.eos_id, sp.pad_id, sp.vocab_size) == (1, 2, 3, 40)
    ids = sp.encode("the lazy cat")
    assert sp.decode(ids) == "the lazy cat" and sp.eos_id not in ids
    chat = sp.apply_chat_template(
        [{"role": "user", "content": "the dog"}, {"role": "assistant", "content": "a cat"}]
    )
    assert chat[-1] == sp.eos_id  # "</s>" in the rendered text became the EOS id


def test_tokenizer_json_and_gpt2_bpe(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(["hello world, hello there"] * 10, trainer=trainer)
    bpe.save(str(tmp_path / "tokenizer.json"))
    vocab_file, merge_file = bpe.model.save(str(tmp_path))

    from_json = load_tokenizer(str(tmp_path / "tokenizer.json"))
    gpt2 = load_tokenizer("GPT2BPETokenizer", vocab_file=vocab_file, merge_file=merge_file)
    for tokenizer in (from_json, gpt2):
        assert tokenizer.eos_id == bpe.token_to_id("<|endoftext|>")
        assert tokenizer.decode(tokenizer.encode("hello world")) == "hello world"
    assert gpt2.encode("hello there<|endoftext|>")[-1] == gpt2.eos_id
    assert load_tokenizer(str(tmp_path)).encode("hello") == from_json.encode("hello")  # bare directory


# ----------------------------------------------------------------------------- pretraining


def test_hf_dataset_rows_of_both_lengths(tmp_path):
    import datasets

    seq = 4
    rows = {"input_ids": [[1, 2, 3, 4, 5], [6, 7, 8, 9], [1, 2]]}  # seq+1, seq, and a bad row
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "plain"))
    data = HFPretrainDataset(tmp_path / "plain", seq)
    assert len(data) == 2 and data.bad_rows.count == 1
    assert "row 3: wrong length" in data.bad_rows.summary()
    assert data[0]["input_ids"].tolist() == [1, 2, 3, 4] and data[0]["labels"].tolist() == [2, 3, 4, 5]
    assert data[1]["input_ids"].tolist() == [6, 7, 8, 9] and data[1]["labels"].tolist() == [
        7,
        8,
        9,
        IGNORE_INDEX,
    ]

    # A labels column is unshifted (HF convention): it is shifted, masks included.
    with_labels = {"input_ids": [[6, 7, 8, 9]], "labels": [[-100, 7, -100, 9]]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(with_labels)}).save_to_disk(
        str(tmp_path / "dict")
    )
    item = HFPretrainDataset(tmp_path / "dict", seq, split="train")[0]
    assert item["labels"].tolist() == [7, -100, 9, IGNORE_INDEX]
    assert_shifted(item, seq)
    with pytest.raises(NxdtError, match="no split 'validation'"):
        HFPretrainDataset(tmp_path / "dict", seq, split="validation")


def test_raw_text_packed_from_every_format(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("first doc line one\nline two\n\n\nsecond doc\n", encoding="utf-8")
    write_jsonl(
        corpus / "b.jsonl", [{"text": "third doc"}, {"text": ""}, {"title": "no text"}, {"text": "fourth"}]
    )
    pq.write_table(pa.table({"text": ["fifth doc", None]}), corpus / "c.parquet")
    seq = 8
    data = PackedTextDataset(corpus, tok, seq)

    documents = ["first doc line one\nline two", "second doc", "third doc", "fourth", "fifth doc"]
    stream = [t for doc in documents for t in tok.encode(doc) + [tok.eos_id]]
    assert data.num_documents == 5 and data.tokens.tolist() == stream
    assert len(data) == (len(stream) - 1) // seq
    for i in range(len(data)):
        item = data[i]
        assert item["input_ids"].tolist() == stream[i * seq : i * seq + seq]
        assert item["labels"].tolist() == stream[i * seq + 1 : i * seq + seq + 1]
        assert item["position_ids"].tolist() == list(range(seq))
    assert data.bad_rows.by_reason() == {"empty field 'text'": 1, "missing field 'text'": 2}
    assert (
        "b.jsonl: 2 bad rows skipped (line 2: empty field 'text'; line 3: missing field 'text')"
        in data.bad_rows.summary()
    )
    assert "c.parquet: 1 bad row skipped (row 2: missing field 'text')" in data.bad_rows.summary()


# ----------------------------------------------------------------------------- Megatron


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_indexed_dataset_round_trip(tmp_path, dtype):
    documents = [[5, 6, 7], [], [8], list(range(100, 140))]
    bin_path, idx_path = write_indexed_dataset(tmp_path / "docs", documents, dtype=dtype)
    header = idx_path.read_bytes()
    assert header[:9] == b"MMIDIDX\x00\x00"
    indexed = IndexedDataset(tmp_path / "docs")
    assert indexed.dtype == np.dtype(dtype) and len(indexed) == 4 and indexed.num_tokens == 44
    assert [indexed[i].tolist() for i in range(4)] == documents
    assert indexed.get(3, offset=2, length=3).tolist() == [102, 103, 104]
    assert indexed.doc_idx.tolist() == [0, 1, 2, 3, 4]
    assert bin_path.stat().st_size == 44 * np.dtype(dtype).itemsize
    reopened = pickle.loads(pickle.dumps(indexed))  # what spawned DataLoader workers receive
    assert len(pickle.dumps(indexed)) < 500 and reopened[3].tolist() == documents[3]


def test_gpt_dataset_cuts_samples_across_documents(tmp_path):
    documents = [list(range(i * 10, i * 10 + 7)) for i in range(6)]
    write_indexed_dataset(tmp_path / "docs", documents)
    stream = [t for doc in documents for t in doc]
    seq = 5
    ordered = GPTDataset(IndexedDataset(tmp_path / "docs"), seq, shuffle=False)
    assert len(ordered) == (len(stream) - 1) // seq
    for i in range(len(ordered)):
        assert ordered.sample_tokens(i).tolist() == stream[i * seq : i * seq + seq + 1]
        assert_shifted(ordered[i], seq)

    # Shuffled over several epochs: every sample is still seq+1 consecutive tokens of some document order.
    shuffled = GPTDataset(IndexedDataset(tmp_path / "docs"), seq, num_samples=30, seed=3)
    assert len(shuffled) == 30
    follows = {a: b for doc in documents for a, b in zip(doc[:-1], doc[1:], strict=True)}
    for i in range(30):
        tokens = shuffled.sample_tokens(i).tolist()
        assert len(tokens) == seq + 1
        inside = sum(follows.get(a) == b for a, b in zip(tokens[:-1], tokens[1:], strict=True))
        assert inside >= seq - 1  # at most one document boundary in 6 tokens of 7-token documents
    again = GPTDataset(IndexedDataset(tmp_path / "docs"), seq, num_samples=30, seed=3)
    assert all(torch.equal(shuffled[i]["input_ids"], again[i]["input_ids"]) for i in range(30))


def test_blend_respects_weights(tmp_path):
    write_indexed_dataset(tmp_path / "low", [list(range(0, 50))] * 40)
    write_indexed_dataset(tmp_path / "high", [list(range(100, 150))] * 40)
    assert parse_data_prefix([0.3, "a", "0.7", "b"]) == [(0.3, "a"), (0.7, "b")]
    assert parse_data_prefix(["only"]) == [(1.0, "only")]
    blend = build_megatron_dataset(
        [0.3, tmp_path / "low", 0.7, tmp_path / "high"], seq_length=16, num_samples=1000
    )
    assert isinstance(blend, BlendedDataset) and len(blend) == 1000
    from_low = [int(blend[i]["input_ids"][0] < 100) for i in range(1000)]
    assert abs(sum(from_low) / 1000 - 0.3) < 0.01
    assert abs(sum(from_low[:100]) - 30) <= 1  # proportional in every prefix, not just overall
    single = build_megatron_dataset([str(tmp_path / "low")], seq_length=16)
    assert isinstance(single, GPTDataset)


def test_preprocess_to_megatron(tmp_path, tok):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "hello there"}, "not json", {"text": "second"}])
    stats = preprocess_to_megatron(corpus, tok, tmp_path / "out" / "corpus")
    assert (stats["documents"], stats["bad_rows"], stats["dtype"]) == (2, 1, "uint16")
    indexed = IndexedDataset(tmp_path / "out" / "corpus")
    assert indexed[0].tolist() == tok.encode("hello there") + [tok.eos_id]
    assert stats["tokens"] == indexed.num_tokens


# ----------------------------------------------------------------------------- SFT


def test_input_output_prompt_mask_token_by_token(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", [{"input": "reverse: XKQ =", "output": "QKX"}])
    item = SFTDataset(path, tok, seq_length=16)[0]
    prompt = [tok.bos_id] + tok.encode("reverse: XKQ =")
    answer = tok.encode("QKX") + [tok.eos_id]
    n = len(prompt) + len(answer)
    assert item["input_ids"].tolist() == prompt + answer + [tok.pad_id] * (16 - n)
    assert item["labels"].tolist() == [IGNORE_INDEX] * (len(prompt) - 1) + answer + [IGNORE_INDEX] * (
        16 - n + 1
    )
    assert item["position_ids"].tolist() == list(range(n)) + [0] * (16 - n)
    assert (
        tok.decode([t for t in item["labels"].tolist() if t >= 0], skip_special_tokens=False) == "QKX<|eos|>"
    )


def test_chat_prompt_mask_token_by_token(tmp_path, tok):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "next: C ="},
        {"role": "assistant", "content": "D"},
        {"role": "user", "content": "copy: AB ="},
        {"role": "assistant", "content": "AB"},
    ]
    item = SFTDataset(write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}]), tok, seq_length=32)[0]
    pieces = [  # (text, trained on)
        ("<|bos|><|system|>be brief<|user|>next: C =<|assistant|>", False),
        ("D<|eos|>", True),
        ("<|user|>copy: AB =<|assistant|>", False),
        ("AB<|eos|>", True),
    ]
    ids = [t for text, _ in pieces for t in tok.encode(text)]
    targets = [trained for text, trained in pieces for _ in tok.encode(text)]
    expected = [ids[t + 1] if targets[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
    assert item["input_ids"].tolist()[: len(ids)] == ids
    assert item["labels"].tolist() == expected + [IGNORE_INDEX] * (32 - len(ids))
    assert tok.decode([t for t in expected if t >= 0], skip_special_tokens=False) == "D<|eos|>AB<|eos|>"


def test_chat_template_without_turn_tokens(tmp_path):
    # Turns glued mid-word: the prefix does not encode as a token prefix of the whole, so each
    # turn is encoded on its own and the mask still covers exactly the assistant's text.
    glued = load_tokenizer("embedded", chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    messages = [{"role": "user", "content": "the qui"}, {"role": "assistant", "content": "ck fox"}]
    assert glued.encode("the quick fox")[: len(glued.encode("the qui"))] != glued.encode("the qui")
    ids, mask = tokenize_chat(glued, messages)
    assert ids.tolist() == glued.encode("the qui") + glued.encode("ck fox")
    assert glued.decode(ids[mask]) == "ck fox" and glued.decode(ids[~mask]) == "the qui"

    last_only = load_tokenizer("embedded", chat_template="{{ messages[-1]['content'] }}")
    rows = [{"messages": messages}, {"input": "copy: AB =", "output": "AB"}]
    data = SFTDataset(write_jsonl(tmp_path / "c.jsonl", rows), last_only, seq_length=32)
    assert len(data) == 1 and data.bad_rows.by_reason() == {"chat template": 1}


def test_packing_restarts_positions_and_never_crosses_examples(tmp_path, tok):
    rows = [{"input": f"copy: {w} =", "output": w} for w in ["AB", "CDE", "F", "GHIJ", "KL"]]
    padded = SFTDataset(write_jsonl(tmp_path / "t.jsonl", rows), tok, seq_length=32)
    packed = SFTDataset(tmp_path / "t.jsonl", tok, seq_length=32, packing=True)
    lengths = [len(ids) for ids, _ in packed.examples]
    assert len(padded) == 5 and len(packed) < 5
    assert sum(len(block) for block in packed.blocks) == 5

    block = packed[0]
    n = [lengths[i] for i in packed.blocks[0]]
    expected_positions = [p for length in n for p in range(length)]
    assert block["position_ids"].tolist()[: sum(n)] == expected_positions
    ends = np.cumsum(n) - 1
    assert all(block["labels"][end] == IGNORE_INDEX for end in ends)  # no target across examples
    assert_shifted(block, 32)
    # Each packed example carries exactly the labels it has when padded alone.
    start = 0
    for example, length in zip(packed.blocks[0], n, strict=True):
        assert torch.equal(block["labels"][start : start + length], padded[example]["labels"][:length])
        start += length

    mask = packed_causal_mask(collate([block])["position_ids"])[0]
    assert mask.shape == (32, 32) and not mask[n[0], n[0] - 1] and mask[n[0] + 1, n[0]]


def test_overlong_skip_truncate_and_dev_choose_samples(tmp_path, tok):
    rows = [{"input": "copy: AB =", "output": "AB"}, {"input": "copy: " + "A" * 40 + " =", "output": "B"}] * 3
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    skipped = SFTDataset(path, tok, seq_length=16)
    assert len(skipped) == 3 and skipped.bad_rows.by_reason() == {"longer than seq_length": 3}
    assert "line 2: longer than seq_length (" in skipped.bad_rows.summary()
    # Truncation keeps rows with answer tokens left; these long prompts leave none, so they are reported.
    truncated = SFTDataset(path, tok, seq_length=16, overlong="truncate")
    assert truncated.bad_rows.by_reason() == {"no answer tokens within seq_length": 3}
    long_answer = write_jsonl(tmp_path / "u.jsonl", [{"input": "copy:", "output": "B" * 40}])
    assert SFTDataset(long_answer, tok, seq_length=16, overlong="truncate").truncated == 1
    assert len(SFTDataset(path, tok, seq_length=16, dev_choose_samples=2)) == 2


def test_malformed_rows_reported_with_line_numbers(tmp_path, tok):
    rows = [
        {"input": "copy: AB =", "output": "AB"},
        {"input": "copy: CD =", "output": "CD"},
        '{"input": "broken',
        {"input": "next: A =", "output": "B"},
        "",  # blank lines are not rows
        {"input": "x", "output": ""},
        {"input": "copy: EF ="},
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"input": "next: B =", "output": "C"},
        {"input": "next: C =", "output": "D"},
    ]
    data = SFTDataset(write_jsonl(tmp_path / "train.jsonl", rows), tok, seq_length=32)
    assert len(data) == 5 and data.bad_rows.count == 4
    summary = data.bad_rows.summary()
    assert summary.startswith(f"{tmp_path / 'train.jsonl'}: 4 bad rows skipped (line 3: invalid JSON: ")
    assert "line 6: empty field 'output'" in summary and "line 7: missing field 'output'" in summary
    assert "line 8: invalid messages: no non-empty assistant message" in summary
    assert data.bad_rows.rows_read[str(tmp_path / "train.jsonl")] == 9

    wrong_format = write_jsonl(tmp_path / "wrong.jsonl", [{"prompt": "a", "completion": "b"}] * 3)
    with pytest.raises(NxdtError, match="wrong.jsonl: 3 of 3 rows are bad.*missing field 'input'"):
        SFTDataset(wrong_format, tok, seq_length=32)


# ----------------------------------------------------------------------------- sampler


def micro_batches(num_samples=100, mbs=2, rank=0, dp=1, gbs=8, **kw):
    return list(DistributedBatchSampler(num_samples, mbs, rank, dp, gbs, seed=7, **kw))


def test_sampler_deterministic_and_dp_invariant():
    assert micro_batches() == micro_batches()
    assert micro_batches() != list(DistributedBatchSampler(100, 2, 0, 1, 8, seed=8))
    single = micro_batches()
    global_batches = [sum(single[g * 4 : g * 4 + 4], []) for g in range(len(single) // 4)]
    assert len(global_batches) == 12 and len(set(sum(global_batches, []))) == 96
    for dp in (2, 4):
        per_rank = [micro_batches(rank=r, dp=dp) for r in range(dp)]
        steps = 4 // dp  # micro-batches per rank per global batch
        for g, batch in enumerate(global_batches):
            union = sum((ranks[g * steps : g * steps + steps] for ranks in per_rank), [])
            assert sum(union, []) == batch


def test_sampler_resumes_mid_epoch_and_reshuffles_epochs():
    sampler = DistributedBatchSampler(100, 2, 1, 2, 8, seed=7)
    first_epoch = list(sampler)
    second_epoch = list(sampler)
    assert sampler.epoch == 2 and sorted(sum(first_epoch, [])) != sum(second_epoch, [])
    assert sorted(sum(first_epoch, [])) != sum(first_epoch, [])  # shuffled

    resumed = DistributedBatchSampler(100, 2, 1, 2, 8, seed=7, consumed_samples=5 * 8)
    assert list(resumed) == first_epoch[5 * 2 :]
    state = DistributedBatchSampler(100, 2, 1, 2, 8, seed=7)
    iterator = iter(state)
    taken = [next(iterator) for _ in range(6)]  # three global batches of this rank's two micro-batches
    assert state.state_dict()["consumed_samples"] == 24 and taken == first_epoch[:6]
    restored = DistributedBatchSampler(100, 2, 1, 2, 8, seed=0)
    restored.load_state_dict(state.state_dict())
    assert list(restored) == first_epoch[6:]
    assert len(DistributedBatchSampler(100, 2, 1, 2, 8)) == len(first_epoch) == 24 and len(restored) == 24


def test_sampler_without_drop_last_fills_the_last_batch():
    batches = micro_batches(num_samples=10, gbs=8, drop_last=False, shuffle=False)
    assert sum(batches, []) == list(range(10)) + [0, 1, 2, 3, 4, 5]
    with pytest.raises(NxdtError, match="multiple of micro_batch_size"):
        DistributedBatchSampler(100, 3, 0, 2, 8)


# ----------------------------------------------------------------------------- embedded data


def test_embedded_generator_is_deterministic(tmp_path):
    committed = embedded_paths()["root"]
    generate(tmp_path)
    produced = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    expected = sorted(p.relative_to(committed) for p in committed.rglob("*") if p.is_file())
    assert produced == expected
    for relative in produced:
        assert (tmp_path / relative).read_bytes() == (committed / relative).read_bytes(), relative
    assert sum((committed / p).stat().st_size for p in expected) < 2_000_000


def test_embedded_datasets_load(tok):
    paths = embedded_paths()
    rows = load_task_rows("test")
    assert rows and all(prompt.endswith(" =") and answer for prompt, answer in rows)
    sft = SFTDataset(paths["sft_validation"], tok, seq_length=128, packing=True)
    chat = SFTDataset(paths["chat_validation"], tok, seq_length=128, packing=True)
    assert sft.bad_rows.count == chat.bad_rows.count == 0 and len(sft.examples) == len(chat.examples)
    assert Counter(prompt.split(":")[0] for prompt, _ in rows).keys() >= {"copy", "reverse", "next"}
    assert len(PackedTextDataset(paths["pretrain_txt"], tok, 128)) > 100
    assert PackedTextDataset(paths["pretrain_jsonl"], tok, 128).tokens.tolist() == (
        PackedTextDataset(paths["pretrain_txt"], tok, 128).tokens.tolist()
    )
