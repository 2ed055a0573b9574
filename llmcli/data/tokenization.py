"""Tokenizers: load the configured or saved one, or train one on the training text.

A model trained from scratch without `model.tokenizer_name` gets a tokenizer trained here with
`tokenizers`: byte-level BPE (GPT-2 style) for causal LMs, lower-cased WordPiece (BERT style) for
masked LMs, on exactly the training rows the model sees, cached like tokenized data.
"""

from __future__ import annotations

import os
from pathlib import Path

from llmcli import console
from llmcli.config import Config, ModelSection
from llmcli.data.cache import cached_dir
from llmcli.data.sources import RawData, source_fingerprint
from llmcli.errors import ConfigError, first_line

GPT_SPECIAL = "<|endoftext|>"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def looks_like_path(name: str) -> bool:
    """A local path rather than a hub id ('gpt2', 'org/model'): ./x, /x, ~/x, a/b/c, or runs/x when runs/ exists."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or ("/" in name and os.path.isdir(name.split("/", 1)[0]))


def load_tokenizer(cfg: Config, model_path: str | None, raw: RawData, masked: bool = False):
    """The configured tokenizer, the model's own, or one trained here on the training text."""
    name = cfg.model.tokenizer_name or model_path
    if name is None:
        return train_tokenizer(cfg, raw, masked)
    return load_tokenizer_for(name, cfg.model)


def load_tokenizer_for(path: str, m: ModelSection):
    """`model.tokenizer_name`, else the tokenizer saved with the model at `path`."""
    tok = load_tokenizer_by_name(m.tokenizer_name or path, m)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # GPT-2 has no pad token; batching needs one
    return tok


def load_tokenizer_by_name(name: str, m: ModelSection):
    from transformers import AutoTokenizer

    path = Path(os.path.expanduser(name))
    if not path.exists() and looks_like_path(name):
        raise ConfigError(f"model.tokenizer_name: tokenizer path not found: {name}")
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=m.trust_remote_code, revision=m.revision)
    except Exception as err:
        if path.is_dir():  # bare vocab files without a tokenizer_config.json
            if (path / "vocab.json").exists() and (path / "merges.txt").exists():
                from transformers import GPT2Tokenizer

                return GPT2Tokenizer.from_pretrained(str(path))
            if (path / "vocab.txt").exists():
                from transformers import BertTokenizer

                return BertTokenizer.from_pretrained(str(path))
        raise ConfigError(f"could not load tokenizer '{name}': {first_line(err)}") from None


def train_tokenizer(cfg: Config, raw: RawData, masked: bool):
    """Train a byte-level BPE (causal) or WordPiece (masked) tokenizer on the training rows.

    Cached by training data + split seed + vocab size + kind, so a rerun reuses it."""
    kind = "wordpiece" if masked else "bpe"
    parts = {"source": source_fingerprint(cfg.data), "vocab_size": cfg.model.vocab_size, "kind": kind,
             "text_column": cfg.data.text_column, "seed": raw.seed,
             "validation_split_percentage": cfg.data.validation_split_percentage}

    def train_into(folder: Path) -> None:
        console.info(f"training a {kind} tokenizer (vocab_size={cfg.model.vocab_size}) on the training text")
        _train(kind, cfg.model.vocab_size, raw).save(str(folder / "tokenizer.json"))

    return _wrap_tokenizer(cached_dir(cfg.data, "tokenizers", parts, train_into, "tokenizer"), kind)


def _train(kind: str, vocab_size: int, raw: RawData):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[GPT_SPECIAL],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    else:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIALS, show_progress=False)
    tok.train_from_iterator(raw.training_texts(), trainer=trainer)
    if kind == "wordpiece":
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
    return tok


def _wrap_tokenizer(folder: Path, kind: str):
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        return PreTrainedTokenizerFast(
            tokenizer_file=str(folder / "tokenizer.json"), bos_token=GPT_SPECIAL, eos_token=GPT_SPECIAL,
            unk_token=GPT_SPECIAL, pad_token=GPT_SPECIAL, model_max_length=1024,
        )
    return PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=512,
    )
