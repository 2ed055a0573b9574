"""The data layer: raw splits, token streams in every mode, cache keys and label sets (fast, no training)."""

import json

import pytest

from conftest import FIXTURES
from llmcli.config import load_config

TEXT = FIXTURES / "shakespeare_small.txt"


@pytest.fixture(scope="module")
def tokenizer(gpt2_run):
    from llmcli.data import tokenization
    from llmcli.config import ModelSection

    return tokenization.load_tokenizer_for(str(gpt2_run), ModelSection())


def _raw(*overrides, seed=0):
    from llmcli.data.sources import RawData

    return RawData(load_config(None, list(overrides)).data, seed)


def _stream(ds):
    return [t for row in ds for t in row["input_ids"]]


def test_text_training_data_keeps_blank_lines(tokenizer, tmp_path):
    from llmcli.data import tokenized

    text = "First line.\n\nSecond paragraph,\nwith two lines.\n\n\nThird.\n" * 20
    path = tmp_path / "t.txt"
    path.write_text(text)
    raw = _raw(f"data.train_file={path}", "data.validation_split_percentage=0")
    assert "".join(raw.splits["train"]["text"]) == text  # every line, blank ones included, newlines kept
    blocks = tokenized.lm_datasets(raw, tokenizer, block_size=16, masked=False)["train"]
    decoded = tokenizer.decode(_stream(blocks))
    assert decoded == text[: len(decoded)] and len(text) - len(decoded) < 16 * 8  # only the last partial block is dropped


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_streaming_and_cached_data_give_the_same_token_stream(tokenizer, tmp_path, kind):
    from llmcli.data import tokenized

    lines = [line for line in TEXT.read_text().splitlines(keepends=True)][:300]
    if kind == "txt":
        train = tmp_path / "train.txt"
        train.write_text("".join(lines))
    else:  # JSONL documents with an extra column (streaming used to fail with 'Column lengths mismatch')
        train = tmp_path / "train.jsonl"
        train.write_text("".join(json.dumps({"text": line, "id": i}) + "\n" for i, line in enumerate(lines)))
    val = tmp_path / "val.txt"
    val.write_text("".join(lines[:40]))
    common = [f"data.train_file={train}", f"data.validation_file={val}", "training.max_steps=1"]
    cached = tokenized.lm_datasets(_raw(*common), tokenizer, block_size=16, masked=False)
    streamed = tokenized.lm_datasets(_raw(*common, "data.streaming=true"), tokenizer, block_size=16, masked=False)
    cached_blocks = sorted(map(tuple, cached["train"]["input_ids"]))
    streamed_blocks = sorted(tuple(row["input_ids"]) for row in streamed["train"])  # shuffled in a buffer: compare as sets
    assert streamed_blocks == cached_blocks and len(cached_blocks) > 10
    # a text validation file is a line stream in both modes: no EOS after each line
    assert _stream(streamed["validation"]) == _stream(cached["validation"])
    assert tokenizer.eos_token_id not in _stream(cached["validation"])
    if kind == "jsonl":  # documents end with EOS
        assert sum(t == tokenizer.eos_token_id for b in cached_blocks for t in b) > 100


def test_tokenizer_training_reads_the_training_rows_only():
    path = FIXTURES / "sentiment_train.jsonl"
    for seed in (0, 42):
        raw = _raw(f"data.train_file={path}", "data.validation_split_percentage=25", seed=seed)
        texts = [t for batch in raw.training_texts() for t in batch]
        # exactly the training rows (as a multiset: the fixture repeats some sentences), none of the held-out ones
        assert sorted(texts) == sorted(raw.splits["train"]["text"])
        assert len(texts) + len(raw.splits["validation"]) == 160 and len(raw.splits["validation"]) == 40
    assert set(_raw(f"data.train_file={path}", "data.validation_split_percentage=25", seed=0).splits["validation"]["text"]) != \
        set(_raw(f"data.train_file={path}", "data.validation_split_percentage=25", seed=42).splits["validation"]["text"])


def test_cache_keys_follow_every_input(tmp_path):
    import os

    from llmcli.data.cache import cache_key
    from llmcli.data.sources import source_fingerprint

    path = tmp_path / "a.txt"
    path.write_text("hello\n")
    data = load_config(None, [f"data.train_file={path}"]).data
    base = {"kind": "lm", "source": source_fingerprint(data), "tokenizer": "t1", "block_size": 32, "seed": 0}
    assert cache_key(base) == cache_key(dict(base))
    for change in ({"seed": 42}, {"tokenizer": "t2"}, {"block_size": 64}, {"kind": "instruct"}):
        assert cache_key({**base, **change}) != cache_key(base)
    os.utime(path, ns=(1, 1))  # the file changed (mtime): a new key
    assert cache_key({**base, "source": source_fingerprint(data)}) != cache_key(base)


def test_label_sets(tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    from llmcli.data import tokenized
    from llmcli.data.sources import RawData

    def raw_of(train, validation=None, features=None):
        raw = RawData(load_config(None, []).data, 0)
        splits = {"train": Dataset.from_dict(train, features=features)}
        if validation:
            splits["validation"] = Dataset.from_dict(validation, features=features)
        raw.__dict__["splits"] = DatasetDict(splits)
        return raw

    assert tokenized.label_names_from(raw_of({"text": ["a", "b"], "label": ["pos", "neg"]}), None) == ["neg", "pos"]
    assert tokenized.label_names_from(raw_of({"text": ["a", "b"], "label": [0, 2]}), None) == ["0", "1", "2"]
    features = Features({"text": Value("string"), "label": ClassLabel(names=["bad", "good"])})
    assert tokenized.label_names_from(raw_of({"text": ["a"], "label": [1]}, features=features), None) == ["bad", "good"]
    assert tokenized.label_names_from(raw_of({"text": ["a"], "label": [1]}), {"x": 1, "y": 0}) == ["y", "x"]
