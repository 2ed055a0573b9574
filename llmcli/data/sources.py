"""Raw data, before any tokenizer: local files or a Hub dataset, checked and split.

Local files (`train_file`/`validation_file`: .txt/.raw, .jsonl/.json, .csv/.tsv, .parquet) are
checked up front so bad input fails with the file and line named (exit 4). `RawData` loads the
splits once per command, on first use (a tokenized-cache hit never needs them), and every later
step (tokenizer training, task detection, tokenization) reads the same splits.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

from llmcli.config import DataSection
from llmcli.errors import DataError, first_line

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


class RawData:
    """The training data of one command: 'train' and, where there is one, 'validation'.

    Without a validation file/split, `validation_split_percentage` of the training rows is held
    out: the first rows for text files (contiguous, as run_clm.py), a seeded random sample otherwise
    (`seed` is training.seed, the same for the tokenizer, the data and the cache key).
    """

    def __init__(self, data: DataSection, seed: int):
        self.data, self.seed = data, seed

    @cached_property
    def splits(self):
        from datasets import DatasetDict

        data = self.data
        splits = DatasetDict()
        if data.train_file or data.validation_file:
            for key, split in (("train_file", "train"), ("validation_file", "validation")):
                spec = getattr(data, key)
                if spec:
                    splits[split] = load_files(resolve_files(spec, key), data, key)
        elif data.dataset_name:
            hub = load_hub(data)
            if data.train_split in hub:
                splits["train"] = hub[data.train_split]
            val_name = data.validation_split or ("validation" if "validation" in hub else None)
            if val_name:
                if val_name not in hub:
                    raise DataError(f"data.validation_split: '{val_name}' not in {data.dataset_name} (splits: {', '.join(hub)})")
                splits["validation"] = hub[val_name]
        else:
            raise DataError("no data: set data.train_file (a local file) or data.dataset_name (a Hub dataset)")
        if "train" in splits and "validation" not in splits and data.validation_split_percentage > 0:
            train = splits["train"]
            if len(train) < 2:
                raise DataError("training data has fewer than 2 rows: cannot hold out a validation split")
            n_val = max(1, int(len(train) * data.validation_split_percentage / 100))
            if is_line_text(data.train_file):
                splits["validation"] = train.select(range(n_val))
                splits["train"] = train.select(range(n_val, len(train)))
            else:
                parts = train.train_test_split(test_size=n_val, seed=self.seed, shuffle=True)
                splits["train"], splits["validation"] = parts["train"], parts["test"]
        return splits

    def first_split(self):
        return self.splits["train"] if "train" in self.splits else self.splits["validation"]

    def columns(self) -> list[str]:
        return self.first_split().column_names

    def training_texts(self, batch_size: int = 1000):
        """Batches of training texts (for training a tokenizer on exactly the rows the model trains on)."""
        train = self.splits["train"]
        column = pick_column(train, self.data.text_column, "text_column")
        for start in range(0, len(train), batch_size):
            yield [t for t in train[start : start + batch_size][column] if t]


def is_line_text(spec: str | list[str] | None) -> bool:
    """Plain-text files are line streams (newlines kept, no EOS between lines); other rows are documents."""
    return bool(spec) and builder_for(spec if isinstance(spec, str) else spec[0]) == "text"


def load_files(files: list[str], data: DataSection, key: str):
    """Local files as one `datasets.Dataset` (builder from the extension); a read error names the files."""
    from datasets import load_dataset

    for f in files:
        check_file(f)
    builder, kwargs = _builder(files, data, key)
    try:
        ds = load_dataset(builder, data_files={"data": files}, split="data", **kwargs)
    except Exception as err:  # the builders raise many kinds; name the files
        raise DataError(f"data.{key}: could not read {', '.join(files)}: {first_line(err)}") from None
    if len(ds) == 0:
        raise DataError(f"data.{key}: {', '.join(files)} holds no rows")
    # text rows are kept exactly, blank lines included ("\n\n" paragraph breaks reach training
    # and the tokenizer as they reach eval and streaming; run_clm.py keeps them too)
    if builder == "text" and not any(t.strip() for batch in ds.iter(batch_size=1000) for t in batch["text"]):
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


def load_hub(data: DataSection):
    from datasets import load_dataset

    try:
        return load_dataset(data.dataset_name, data.dataset_config_name)
    except Exception as err:
        raise DataError(
            f"data.dataset_name: could not load '{data.dataset_name}'"
            f"{'/' + data.dataset_config_name if data.dataset_config_name else ''} from the Hugging Face Hub: {first_line(err)}"
        ) from None


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

