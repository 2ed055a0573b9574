"""Every dataset llmcli trains or evaluates on is built here.

Raw data comes from the Hub (`dataset_name`) or local files (`train_file`/`validation_file`:
.txt/.raw, .jsonl/.json, .csv/.tsv, .parquet). It is checked up front so that bad input fails
with the file and line named (exit 4), then tokenized once and cached on disk under a key made of
its inputs (source files, tokenizer, block size, task, ...), so a rerun or resume skips it. Cache
entries are written to a temporary dir and renamed into place: a killed run never leaves a cache
entry that a rerun trusts.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any, Callable

from llmcli import console
from llmcli.config import DataSection
from llmcli.errors import DataError
from llmcli.runs import main_process_first, publish_dir

CACHE_VERSION = 1
TEXT_EXTS = {".txt", ".text", ".raw", ".tokens"}
BUILDERS = {**{e: "text" for e in TEXT_EXTS}, ".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
TEXT_CANDIDATES = ("text", "sentence", "content", "document")


# --------------------------------------------------------------------------------------------
# Files: resolve, check


def resolve_files(spec: str | list[str], key: str) -> list[str]:
    """Expand a path, glob or list of them; every entry must exist and share one format."""
    items = [spec] if isinstance(spec, str) else list(spec)
    files: list[str] = []
    for item in items:
        path = os.path.expanduser(item)
        if any(ch in path for ch in "*?["):
            matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"data.{key}: no file matches {item}")
            files += matches
        elif os.path.isdir(path):
            raise DataError(f"data.{key}: {item} is a directory; give a file or a glob such as {item.rstrip('/')}/*.txt")
        elif not os.path.isfile(path):
            raise DataError(f"data.{key}: file not found: {item}")
        else:
            files.append(path)
    for path in files:
        if os.path.getsize(path) == 0:
            raise DataError(f"data.{key}: {path}: file is empty")
    builders = {builder_for(f, key) for f in files}
    if len(builders) > 1:
        raise DataError(f"data.{key}: files mix formats ({', '.join(sorted(builders))}); use one format per key")
    return files


def builder_for(path: str, key: str = "file") -> str:
    ext = Path(path).suffix.lower()
    if ext not in BUILDERS:
        raise DataError(f"data.{key}: {path}: unsupported extension '{ext or '(none)'}'; expected one of {', '.join(sorted(BUILDERS))}")
    return BUILDERS[ext]


def check_file(path: str) -> None:
    """Fail early, naming file and line, on an empty file, bad UTF-8 or a malformed JSON line."""
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: file is empty")
    builder = builder_for(path)
    if builder == "parquet":
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    line_no = 1
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                line_no += chunk[: max(err.start, 0)].count(b"\n")
                raise DataError(f"{path}:{line_no}: not valid UTF-8 ({err.reason}); re-encode the file as UTF-8") from None
            line_no += chunk.count(b"\n")
    if Path(path).suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{i}: malformed JSON line ({err.msg} at column {err.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{i}: expected a JSON object per line, got {type(obj).__name__}")


def source_fingerprint(data: DataSection) -> dict[str, Any]:
    """What identifies the raw data without reading it: hub id, or file paths with size and mtime."""
    if data.train_file or data.validation_file:
        out = {}
        for key in ("train_file", "validation_file"):
            spec = getattr(data, key)
            if spec:
                out[key] = [(os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in resolve_files(spec, key)]
        return out
    if data.dataset_name:
        return {"hub": [data.dataset_name, data.dataset_config_name, data.train_split, data.validation_split]}
    raise DataError("no data: set data.train_file (a local file) or data.dataset_name (a Hub dataset)")


# --------------------------------------------------------------------------------------------
# Raw datasets


_RAW_MEMO: dict[str, Any] = {}


def load_raw(data: DataSection, seed: int = 42, hold_out: bool = True):
    """A DatasetDict with 'train' and, where there is one, 'validation'.

    Without a validation file/split, `validation_split_percentage` of the training rows is held
    out: the first rows for text files (contiguous, as run_clm.py), a seeded random sample otherwise.
    """
    memo_key = json.dumps([data.model_dump(), seed, hold_out], sort_keys=True, default=str)
    if memo_key in _RAW_MEMO:
        return _RAW_MEMO[memo_key]
    from datasets import DatasetDict

    splits = DatasetDict()
    if data.train_file or data.validation_file:
        for key, split in (("train_file", "train"), ("validation_file", "validation")):
            spec = getattr(data, key)
            if spec:
                splits[split] = _load_files(resolve_files(spec, key), data, key)
    elif data.dataset_name:
        hub = _load_hub(data)
        if data.train_split in hub:
            splits["train"] = hub[data.train_split]
        val_name = data.validation_split or ("validation" if "validation" in hub else None)
        if val_name:
            if val_name not in hub:
                raise DataError(f"data.validation_split: '{val_name}' not in {data.dataset_name} (splits: {', '.join(hub)})")
            splits["validation"] = hub[val_name]
    else:
        raise DataError("no data: set data.train_file (a local file) or data.dataset_name (a Hub dataset)")

    if hold_out and "train" in splits and "validation" not in splits and data.validation_split_percentage > 0:
        train = splits["train"]
        n_val = max(1, int(len(train) * data.validation_split_percentage / 100))
        if len(train) < 2:
            raise DataError("training data has fewer than 2 rows: cannot hold out a validation split")
        if _is_line_text(data):
            splits["validation"] = train.select(range(n_val))
            splits["train"] = train.select(range(n_val, len(train)))
        else:
            parts = train.train_test_split(test_size=n_val, seed=seed, shuffle=True)
            splits["train"], splits["validation"] = parts["train"], parts["test"]
    _RAW_MEMO[memo_key] = splits
    return splits


def _is_line_text(data: DataSection) -> bool:
    spec = data.train_file
    return bool(spec) and builder_for(spec if isinstance(spec, str) else spec[0], "train_file") == "text"


def _load_files(files: list[str], data: DataSection, key: str):
    from datasets import load_dataset

    for f in files:
        check_file(f)
    builder, kwargs = _builder(files, data, key)
    try:
        ds = load_dataset(builder, data_files={"data": files}, split="data", **kwargs)
    except Exception as err:  # the builders raise many kinds; name the files
        raise DataError(f"data.{key}: could not read {', '.join(files)}: {_first_line(err)}") from None
    if len(ds) == 0:
        raise DataError(f"data.{key}: {', '.join(files)} holds no rows")
    if builder == "text":
        ds = ds.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True)
        if len(ds) == 0:
            raise DataError(f"data.{key}: {', '.join(files)} holds only blank lines")
    return ds


def _builder(files: list[str], data: DataSection, key: str) -> tuple[str, dict[str, Any]]:
    """The `datasets` builder for these files and its options."""
    builder = builder_for(files[0], key)
    kwargs: dict[str, Any] = {}
    if builder == "text":
        kwargs["keep_linebreaks"] = data.keep_linebreaks
    if builder == "csv" and Path(files[0]).suffix.lower() == ".tsv":
        kwargs.update(delimiter="\t", quoting=3)  # GLUE-style TSV: no quote characters
    return builder, kwargs


def _load_hub(data: DataSection):
    from datasets import load_dataset

    try:
        return load_dataset(data.dataset_name, data.dataset_config_name)
    except Exception as err:
        raise DataError(
            f"data.dataset_name: could not load '{data.dataset_name}'"
            f"{'/' + data.dataset_config_name if data.dataset_config_name else ''} from the Hugging Face Hub: {_first_line(err)}"
        ) from None


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def pick_column(ds, requested: str | None, key: str, candidates: tuple[str, ...] = TEXT_CANDIDATES) -> str:
    """The column to read: the requested one (which must exist), else the first candidate present,
    else the only string column. Errors list the columns that exist."""
    columns = ds.column_names
    if requested:
        if requested not in columns:
            raise DataError(f"data.{key}: column '{requested}' not found; the data has columns: {', '.join(columns)}")
        return requested
    for name in candidates:
        if name in columns:
            return name
    strings = [c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    if len(strings) == 1:
        return strings[0]
    raise DataError(f"data.{key} is not set and no obvious column exists; the data has columns: {', '.join(columns)}")


def training_texts(data: DataSection, seed: int = 42):
    """Iterator over training texts in batches (for training a tokenizer)."""
    train = load_raw(data, seed)["train"]
    column = pick_column(train, data.text_column, "text_column")
    for start in range(0, len(train), 1000):
        yield [t for t in train[start : start + 1000][column] if t]


# --------------------------------------------------------------------------------------------
# Cache


def cache_root(data: DataSection) -> Path:
    root = data.cache_dir or os.environ.get("LLMCLI_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llmcli")
    return Path(root)


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256((body + specials + type(tokenizer).__name__).encode()).hexdigest()[:16]


def cached(parts: dict[str, Any], data: DataSection, build: Callable[[], Any], what: str):
    """Load `build()`'s DatasetDict from the cache entry keyed by `parts`, or build and store it.

    Under accelerate, the main process builds while the others wait, then all read the cache.
    """
    from datasets import load_from_disk

    final = cache_entry(data, "tokenized", parts)
    with main_process_first():
        if (final / "llmcli-complete").exists():
            console.info(f"tokenized cache hit: {what} from {final}")
            return load_from_disk(str(final))
        console.info(f"tokenizing {what} (cache miss; will be stored in {final})")
        ds = build()
        publish_dir(final, lambda tmp: ds.save_to_disk(str(tmp)), json.dumps(parts, default=str))
    return load_from_disk(str(final))


def cache_entry(data: DataSection, kind: str, parts: dict[str, Any]) -> Path:
    """The cache dir for an artefact of `kind` ('tokenized', 'tokenizers') made from `parts`."""
    key = hashlib.sha256(json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return cache_root(data) / kind / key


def _num_proc(data: DataSection) -> int | None:
    return data.preprocessing_num_workers if (data.preprocessing_num_workers or 1) > 1 else None


# --------------------------------------------------------------------------------------------
# Language-modelling datasets (pretrain, causal-LM finetune)


def lm_datasets(data: DataSection, tokenizer, block_size: int, masked: bool, seed: int = 42):
    """Tokenize and cut into `block_size` chunks (run_clm.py's group_texts); cached.

    Local JSON/CSV/Parquet rows are documents, so an EOS token separates them for causal LMs;
    text files are line streams whose newlines are kept, so nothing is inserted there.
    With `data.streaming`, the training split is tokenized on the fly instead (no cache).
    """
    if data.streaming:
        return _streaming_lm(data, tokenizer, block_size, masked, seed)
    parts = {
        "kind": "lm", "source": source_fingerprint(data), "tokenizer": tokenizer_fingerprint(tokenizer),
        "block_size": block_size, "masked": masked, "text_column": data.text_column, "seed": seed,
        "validation_split_percentage": data.validation_split_percentage, "keep_linebreaks": data.keep_linebreaks,
    }

    def build():
        from datasets import DatasetDict

        raw = load_raw(data, seed)
        column = pick_column(raw["train"] if "train" in raw else raw["validation"], data.text_column, "text_column")
        tokenize, group = _lm_functions(data, tokenizer, column, block_size, masked)
        out = {}
        for split, ds in raw.items():
            tokenized = ds.map(tokenize, batched=True, num_proc=_num_proc(data), remove_columns=ds.column_names, desc=f"tokenize {split}")
            grouped = tokenized.map(group, batched=True, num_proc=_num_proc(data), desc=f"group {split} into {block_size}-token blocks")
            if len(grouped) == 0:
                n_tokens = sum(len(x) for x in tokenized["input_ids"])
                raise DataError(
                    f"the {split} data has {n_tokens} tokens, fewer than one block of data.block_size={block_size}; "
                    f"lower data.block_size or give more {split} text"
                )
            out[split] = grouped
        return DatasetDict(out)

    result = cached(parts, data, build, f"LM data (block_size={block_size})")
    return _truncate(result, data)


def _lm_functions(data: DataSection, tokenizer, column: str, block_size: int, masked: bool):
    """The batched `tokenize` and `group` functions shared by the cached and streaming paths."""
    add_eos = not masked and tokenizer.eos_token_id is not None and not _is_line_text(data) and not data.dataset_name

    def tokenize(batch):
        texts = [t if t is not None else "" for t in batch[column]]
        out = tokenizer(texts, add_special_tokens=masked, return_special_tokens_mask=masked, return_attention_mask=False)
        if add_eos:
            out["input_ids"] = [ids + [tokenizer.eos_token_id] for ids in out["input_ids"]]
        return out

    def group(batch):
        keys = [k for k in batch if k in ("input_ids", "special_tokens_mask")]
        concat = {k: list(itertools.chain.from_iterable(batch[k])) for k in keys}
        total = (len(concat["input_ids"]) // block_size) * block_size
        result = {k: [v[i : i + block_size] for i in range(0, total, block_size)] for k, v in concat.items()}
        if not masked:
            result["labels"] = [list(x) for x in result["input_ids"]]
        return result

    return tokenize, group


def _streaming_lm(data: DataSection, tokenizer, block_size: int, masked: bool, seed: int):
    """Training blocks produced on the fly from a streamed corpus: memory stays flat however
    large it is. Validation comes from data.validation_file only (tokenized and cached as usual)."""
    from datasets import load_dataset

    if data.train_file:
        files = resolve_files(data.train_file, "train_file")
        builder, kwargs = _builder(files, data, "train_file")
        stream = load_dataset(builder, data_files={"train": files}, split="train", streaming=True, **kwargs)
    elif data.dataset_name:
        stream = load_dataset(data.dataset_name, data.dataset_config_name, split=data.train_split, streaming=True)
    else:
        raise DataError("data.streaming needs data.train_file or data.dataset_name")
    column = data.text_column or "text"
    tokenize, group = _lm_functions(data, tokenizer, column, block_size, masked)
    train = stream.map(tokenize, batched=True, remove_columns=[column]).map(group, batched=True)
    keep = ["input_ids", "labels"] if not masked else ["input_ids", "special_tokens_mask"]
    train = train.select_columns(keep).shuffle(seed=seed, buffer_size=1000)
    from datasets import IterableDatasetDict

    out = IterableDatasetDict({"train": train})
    if data.validation_file:
        val_cfg = data.model_copy(update={"streaming": False, "train_file": None, "dataset_name": None})
        out["validation"] = lm_datasets(val_cfg, tokenizer, block_size, masked, seed)["validation"]
    return out


def _truncate(dsd, data: DataSection):
    if data.max_train_samples and "train" in dsd:
        dsd["train"] = dsd["train"].select(range(min(data.max_train_samples, len(dsd["train"]))))
    if data.max_eval_samples and "validation" in dsd:
        dsd["validation"] = dsd["validation"].select(range(min(data.max_eval_samples, len(dsd["validation"]))))
    return dsd


def instruction_datasets(data: DataSection, tokenizer, seed: int = 42):
    """Prompt/completion pairs: input = prompt + completion + EOS, loss on the completion only."""
    parts = {
        "kind": "instruct", "source": source_fingerprint(data), "tokenizer": tokenizer_fingerprint(tokenizer),
        "prompt": data.prompt_column, "completion": data.completion_column, "max_seq_length": data.max_seq_length,
        "seed": seed, "validation_split_percentage": data.validation_split_percentage,
    }

    def build():
        raw = load_raw(data, seed)
        first = raw["train"] if "train" in raw else raw["validation"]
        p_col = pick_column(first, data.prompt_column, "prompt_column", ("prompt", "instruction"))
        c_col = pick_column(first, data.completion_column, "completion_column", ("completion", "output", "response"))
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

        def tokenize(batch):
            prompts = tokenizer([p or "" for p in batch[p_col]], add_special_tokens=False)["input_ids"]
            completions = tokenizer([c or "" for c in batch[c_col]], add_special_tokens=False)["input_ids"]
            ids, labels = [], []
            for p, c in zip(prompts, completions):
                seq = (p + c + eos)[: data.max_seq_length]
                lab = ([-100] * len(p) + c + eos)[: data.max_seq_length]
                ids.append(seq)
                labels.append(lab)
            return {"input_ids": ids, "attention_mask": [[1] * len(s) for s in ids], "labels": labels}

        from datasets import DatasetDict

        out = DatasetDict()
        for split, ds in raw.items():
            out[split] = ds.map(tokenize, batched=True, num_proc=_num_proc(data), remove_columns=ds.column_names, desc=f"tokenize {split}")
            out[split] = out[split].filter(lambda b: [any(x != -100 for x in lab) for lab in b["labels"]], batched=True)
        return out

    return _truncate(cached(parts, data, build, "prompt/completion data"), data)


# --------------------------------------------------------------------------------------------
# Classification datasets (finetune, eval, generate's classifier mode)


def label_names_from(raw, data: DataSection, label2id: dict[str, int] | None) -> list[str]:
    """The label set: a pretrained classifier's own labels, a ClassLabel's names, 0..max for
    integer labels, or the sorted distinct strings of the training data."""
    train = raw["train"] if "train" in raw else raw["validation"]
    col = pick_column(train, data.label_column, "label_column", ("label", "labels"))
    if label2id:
        return [name for name, _ in sorted(label2id.items(), key=lambda kv: kv[1])]
    feature = train.features[col]
    if hasattr(feature, "names"):
        return list(feature.names)
    values = [v for v in train[col] if v is not None]
    if not values:
        raise DataError(f"data.label_column: column '{col}' is empty")
    if all(isinstance(v, (int, bool)) for v in values):
        every = [v for split in raw.values() if col in split.column_names for v in split[col] if isinstance(v, int)]
        low, high = min(every), max(values)
        if low < 0:
            raise DataError(f"data.label_column: integer labels must be 0..K-1, found {low}")
        return [str(i) for i in range(int(high) + 1)]
    return sorted({str(v) for v in values})


def classification_datasets(data: DataSection, tokenizer, label_names: list[str], seed: int = 42, hold_out: bool = True, splits=None):
    """Tokenized (truncated, unpadded) examples with integer `labels`; cached."""
    parts = {
        "kind": "classification", "source": source_fingerprint(data), "tokenizer": tokenizer_fingerprint(tokenizer),
        "labels": label_names, "text": data.text_column, "pair": data.text_pair_column, "label": data.label_column,
        "max_seq_length": data.max_seq_length, "seed": seed, "hold_out": hold_out,
        "validation_split_percentage": data.validation_split_percentage, "splits": splits,
    }
    label2id = {name: i for i, name in enumerate(label_names)}

    def build():
        raw = load_raw(data, seed, hold_out=hold_out)
        from datasets import DatasetDict

        out = DatasetDict()
        for split, ds in raw.items():
            if not splits or split in splits:
                out[split] = tokenize_classification(ds, tokenizer, label2id, data, split)
        return out

    return _truncate(cached(parts, data, build, "classification data"), data)


def classification_columns(ds, data: DataSection) -> tuple[str, str | None, str]:
    """(text, text pair or None, label) column names, checked against the data."""
    text_col = pick_column(ds, data.text_column, "text_column", ("sentence", "text", "sentence1", "content"))
    pair_col = pick_column(ds, data.text_pair_column, "text_pair_column") if data.text_pair_column else None
    label_col = pick_column(ds, data.label_column, "label_column", ("label", "labels"))
    return text_col, pair_col, label_col


def tokenize_classification(ds, tokenizer, label2id: dict[str, int], data: DataSection, split: str):
    """Truncated, unpadded encodings with integer `labels` (every label must be in label2id)."""
    text_col, pair_col, label_col = classification_columns(ds, data)
    names = getattr(ds.features[label_col], "names", None)
    _check_labels(ds[label_col], label2id, names, split, label_col)

    def tokenize(batch):
        texts = [t or "" for t in batch[text_col]]
        pairs = [t or "" for t in batch[pair_col]] if pair_col else None
        enc = tokenizer(texts, pairs, truncation=True, max_length=data.max_seq_length)
        enc["labels"] = [label2id[label_key(v, names)] for v in batch[label_col]]
        return enc

    return ds.map(tokenize, batched=True, num_proc=_num_proc(data), remove_columns=ds.column_names, desc=f"tokenize {split}")


def load_eval_split(data: DataSection, split: str):
    """The one dataset `eval` scores: validation_file, else train_file, else the hub split."""
    for key in ("validation_file", "train_file"):
        spec = getattr(data, key)
        if spec:
            return _load_files(resolve_files(spec, key), data, key)
    if data.dataset_name:
        hub = _load_hub(data)
        if split not in hub:
            raise DataError(f"--split: '{split}' not in {data.dataset_name} (splits: {', '.join(hub)})")
        return hub[split]
    raise DataError("no evaluation data: pass --data FILE or --dataset NAME (or set data.validation_file)")


def label_key(value, names) -> str:
    """A raw label as the string used in label2id (ClassLabel ids become their names; an id
    outside the names, such as -1, stays a number and so matches no label)."""
    if isinstance(value, bool):
        return str(int(value))
    if names is not None and isinstance(value, int) and 0 <= value < len(names):
        return names[value]
    return str(value)


def _check_labels(values, label2id: dict[str, int], names, split: str, col: str) -> None:
    for i, value in enumerate(values):
        if value is None:
            raise DataError(f"data.label_column: row {i + 1} of the {split} data has no '{col}' value")
        if names is not None and value == -1:  # datasets' ClassLabel for "no label" (GLUE test splits)
            n = sum(1 for v in values if v == -1)
            raise DataError(f"the {split} data is unlabelled: {n} of {len(values)} rows have label -1 in '{col}' "
                            "(hub test splits hold no labels); use a labelled split, e.g. --split validation")
        key = label_key(value, names)
        if key not in label2id:
            known = ", ".join(list(label2id)[:20])
            if split == "validation":
                raise DataError(f"label {value!r} in the validation data (row {i + 1}) never occurs in training; known labels: {known}")
            raise DataError(f"label {value!r} (row {i + 1} of the {split} data) is not one of the model's labels ({known})")


def eval_documents(data: DataSection, split: str) -> tuple[list[str], bool]:
    """The evaluation text for LM metrics, as (documents, from_plain_text).

    A plain-text file is one document, its exact contents (newlines included); several files are
    several documents. A dataset with a text column (hub, JSONL, CSV, Parquet) gives one document
    per row. `eval` joins documents with "\\n\\n" unless it scores them one by one.
    """
    for key in ("validation_file", "train_file"):
        spec = getattr(data, key)
        if spec and builder_for(resolve_files(spec, key)[0], key) == "text":
            docs = []
            for path in resolve_files(spec, key):
                check_file(path)
                with open(path, encoding="utf-8", newline="") as fh:
                    docs.append(fh.read())
            return docs, True
    ds = load_eval_split(data, split)
    column = pick_column(ds, data.text_column, "text_column")
    return [t if t is not None else "" for t in ds[column]], False
