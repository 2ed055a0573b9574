"""Every tokenized dataset llmcli trains or evaluates on is built here, from `sources.RawData`.

LM text is tokenized and cut into blocks (run_clm.py's group_texts), prompt/completion rows become
masked-prompt examples, labelled rows become classification examples. Each is cached on disk
(`cache.py`) under a key made of its inputs, so a rerun or resume skips the work.
"""

from __future__ import annotations

import itertools

from llmcli.config import DataSection
from llmcli.data.cache import cached, tokenizer_fingerprint
from llmcli.data.sources import (RawData, _builder, builder_for, check_file, is_line_text, load_files, load_hub,
                                 pick_column, resolve_files, source_fingerprint)
from llmcli.errors import DataError


def _num_proc(data: DataSection) -> int | None:
    return data.preprocessing_num_workers if (data.preprocessing_num_workers or 1) > 1 else None


# --------------------------------------------------------------------------------------------
# Language-modelling datasets (pretrain, causal-LM finetune)


def lm_datasets(raw: RawData, tokenizer, block_size: int, masked: bool):
    """Tokenize and cut into `block_size` chunks (run_clm.py's group_texts); cached.

    Local JSON/CSV/Parquet rows are documents, so an EOS token separates them for causal LMs;
    text files are line streams whose newlines are kept, so nothing is inserted there.
    With `data.streaming`, the training split is tokenized on the fly instead (no cache).
    """
    data = raw.data
    if data.streaming:
        return _streaming_lm(raw, tokenizer, block_size, masked)
    parts = {
        "kind": "lm", "source": source_fingerprint(data), "tokenizer": tokenizer_fingerprint(tokenizer),
        "block_size": block_size, "masked": masked, "text_column": data.text_column, "seed": raw.seed,
        "validation_split_percentage": data.validation_split_percentage, "keep_linebreaks": data.keep_linebreaks,
    }

    def build():
        from datasets import DatasetDict

        column = pick_column(raw.first_split(), data.text_column, "text_column")
        out = {}
        for split, ds in raw.splits.items():
            tokenize, group = _lm_functions(data, tokenizer, column, block_size, masked, _split_is_line_text(data, split))
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


def _split_is_line_text(data: DataSection, split: str) -> bool:
    """Whether a split comes from plain-text files (its own validation_file, else the training files)."""
    return is_line_text(data.validation_file if split == "validation" and data.validation_file else data.train_file)


def _lm_functions(data: DataSection, tokenizer, column: str, block_size: int, masked: bool, line_text: bool):
    """The batched `tokenize` and `group` functions shared by the cached and streaming paths.

    Rows of JSON/CSV/Parquet files are documents: an EOS token ends each one for causal LMs. Lines
    of text files (and hub rows) are a stream whose newlines are kept: nothing is inserted."""
    add_eos = not masked and tokenizer.eos_token_id is not None and not line_text and not data.dataset_name

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


def _streaming_lm(raw: RawData, tokenizer, block_size: int, masked: bool):
    """Training blocks produced on the fly from a streamed corpus: memory stays flat however
    large it is. Validation comes from data.validation_file only (tokenized and cached as usual)."""
    from datasets import IterableDatasetDict, load_dataset

    data = raw.data
    if data.train_file:
        files = resolve_files(data.train_file, "train_file")
        builder, kwargs = _builder(files, data, "train_file")
        stream = load_dataset(builder, data_files={"train": files}, split="train", streaming=True, **kwargs)
    elif data.dataset_name:
        stream = load_dataset(data.dataset_name, data.dataset_config_name, split=data.train_split, streaming=True)
    else:
        raise DataError("data.streaming needs data.train_file or data.dataset_name")
    column = data.text_column or "text"
    tokenize, group = _lm_functions(data, tokenizer, column, block_size, masked, is_line_text(data.train_file))
    token_keys = ["input_ids"] + (["special_tokens_mask"] if masked else [])
    # only the token columns go on to `group`, which changes the row count (other columns would not fit)
    train = stream.map(tokenize, batched=True).select_columns(token_keys).map(group, batched=True)
    keep = ["input_ids", "labels"] if not masked else ["input_ids", "special_tokens_mask"]
    train = train.select_columns(keep).shuffle(seed=raw.seed, buffer_size=1000)
    out = IterableDatasetDict({"train": train})
    if data.validation_file:
        val = data.model_copy(update={"streaming": False, "train_file": None, "dataset_name": None})
        out["validation"] = lm_datasets(RawData(val, raw.seed), tokenizer, block_size, masked)["validation"]
    return out


def _truncate(dsd, data: DataSection):
    if data.max_train_samples and "train" in dsd:
        dsd["train"] = dsd["train"].select(range(min(data.max_train_samples, len(dsd["train"]))))
    if data.max_eval_samples and "validation" in dsd:
        dsd["validation"] = dsd["validation"].select(range(min(data.max_eval_samples, len(dsd["validation"]))))
    return dsd


def instruction_datasets(raw: RawData, tokenizer):
    """Prompt/completion pairs: input = prompt + completion + EOS, loss on the completion only."""
    data = raw.data
    parts = {
        "kind": "instruct", "source": source_fingerprint(data), "tokenizer": tokenizer_fingerprint(tokenizer),
        "prompt": data.prompt_column, "completion": data.completion_column, "max_seq_length": data.max_seq_length,
        "seed": raw.seed, "validation_split_percentage": data.validation_split_percentage,
    }

    def build():
        first = raw.first_split()
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
        for split, ds in raw.splits.items():
            out[split] = ds.map(tokenize, batched=True, num_proc=_num_proc(data), remove_columns=ds.column_names, desc=f"tokenize {split}")
            out[split] = out[split].filter(lambda b: [any(x != -100 for x in lab) for lab in b["labels"]], batched=True)
        return out

    return _truncate(cached(parts, data, build, "prompt/completion data"), data)


# --------------------------------------------------------------------------------------------
# Classification datasets (finetune, eval, generate's classifier mode)


def label_names_from(raw: RawData, label2id: dict[str, int] | None) -> list[str]:
    """The label set: a pretrained classifier's own labels, a ClassLabel's names, 0..max for
    integer labels, or the sorted distinct strings of the training data."""
    data, train = raw.data, raw.first_split()
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
        every = [v for split in raw.splits.values() if col in split.column_names for v in split[col] if isinstance(v, int)]
        low, high = min(every), max(values)
        if low < 0:
            raise DataError(f"data.label_column: integer labels must be 0..K-1, found {low}")
        return [str(i) for i in range(int(high) + 1)]
    return sorted({str(v) for v in values})


def classification_datasets(raw: RawData, tokenizer, label_names: list[str]):
    """Tokenized (truncated, unpadded) examples with integer `labels`; cached."""
    data = raw.data
    parts = {
        "kind": "classification", "source": source_fingerprint(data), "tokenizer": tokenizer_fingerprint(tokenizer),
        "labels": label_names, "text": data.text_column, "pair": data.text_pair_column, "label": data.label_column,
        "max_seq_length": data.max_seq_length, "seed": raw.seed,
        "validation_split_percentage": data.validation_split_percentage,
    }
    label2id = {name: i for i, name in enumerate(label_names)}

    def build():
        from datasets import DatasetDict

        out = DatasetDict()
        for split, ds in raw.splits.items():
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
            return load_files(resolve_files(spec, key), data, key)
    if data.dataset_name:
        hub = load_hub(data)
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


# --------------------------------------------------------------------------------------------
# The datasets a task trains on


def datasets_for(task, fmt, raw: RawData, tokenizer, block_size: int | None = None, label_names: list[str] | None = None):
    """(tokenized datasets, one line for the log) for a task and data format (`tasks.py`); LM text
    is cut into `block_size` blocks (the model's, from `models.build.lm_block_size`)."""
    from llmcli.tasks import DataFormat, Task

    if fmt == DataFormat.LABELLED:
        ds = classification_datasets(raw, tokenizer, label_names)
        shown = ", ".join(label_names[:10])
        return ds, f"classification into {len(label_names)} labels ({shown}) on {len(ds['train']):,} examples"
    if fmt == DataFormat.PROMPT_COMPLETION:
        ds = instruction_datasets(raw, tokenizer)
        about = f"prompt/completion fine-tuning on {len(ds['train']):,} pairs (loss on completions only)"
        if raw.data.packing:
            from llmcli.data.packing import pack

            ds["train"] = pack(ds["train"], raw.data.max_seq_length)
            about += f", packed into {len(ds['train']):,} blocks of up to {raw.data.max_seq_length} tokens"
        return ds, about
    ds = lm_datasets(raw, tokenizer, block_size, masked=task == Task.MASKED_LM)
    about = f"{task} on {'streamed' if raw.data.streaming else format(len(ds['train']), ',')} blocks of {block_size} tokens"
    if "validation" in ds:
        about += f", validating on {len(ds['validation']):,}"
    return ds, about
