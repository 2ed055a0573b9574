"""Preference and prompt rows for the feedback tasks: loading, checking row by row (exit 4, naming
file and line) and renaming to TRL's columns; text or TRL's conversational form."""

from __future__ import annotations

import json
from pathlib import Path

from llmcli.data.sources import RawData, load_files, resolve_files
from llmcli.errors import DataError
from llmcli.tasks import Task

PROMPT_CANDIDATES = ("prompt", "query", "text")


def datasets(task: Task, raw: RawData):
    """(DatasetDict with TRL's columns, one line for the log). Every row is checked first."""
    from datasets import DatasetDict

    data = raw.data
    preference = task in (Task.REWARD, Task.DPO)
    _check_sources(raw, preference)
    out = DatasetDict()
    for split, ds in raw.splits.items():
        if preference:
            names = preference_columns(ds, data)
            ds = ds.select_columns(list(names.values()))
        else:  # the other columns go with each prompt to the reward functions (an `answer` to check against)
            names = {"prompt": prompt_column(ds, data)}
            ds = ds.remove_columns([c for c in ("prompt", "completion") if c in ds.column_names and c != names["prompt"]])
        ds = ds.rename_columns({old: new for new, old in names.items() if old != new})
        limit = data.max_train_samples if split == "train" else data.max_eval_samples
        out[split] = ds.select(range(min(limit, len(ds)))) if limit else ds
    if "train" not in out:
        raise DataError("no training rows: set data.train_file (or a hub dataset with a train split)")
    kind = "conversations" if is_conversation(out["train"][0]["chosen" if preference else "prompt"]) else "text"
    held = f", {len(out['validation']):,} held out" if "validation" in out else ""
    what = "preference pairs" if preference else "prompts"
    return out, f"{task}: {len(out['train']):,} {what} ({kind}){held}"


def preference_columns(ds, data) -> dict[str, str]:
    """TRL column -> the data's column: prompt (optional), chosen, rejected."""
    columns = ds.column_names
    names = {}
    for role, key in (("chosen", "chosen_column"), ("rejected", "rejected_column"), ("prompt", "prompt_column")):
        name = getattr(data, key) or role
        if name not in columns:
            if role == "prompt" and not getattr(data, key):
                continue  # no prompt column: TRL takes the shared start of chosen/rejected (conversations) or none
            raise DataError(f"data.{key}: column '{name}' not found; the data has columns: {', '.join(columns)}")
        names[role] = name
    return names


def prompt_column(ds, data) -> str:
    columns = ds.column_names
    if data.prompt_column:
        if data.prompt_column not in columns:
            raise DataError(f"data.prompt_column: column '{data.prompt_column}' not found; the data has columns: {', '.join(columns)}")
        return data.prompt_column
    for name in PROMPT_CANDIDATES:
        if name in columns:
            return name
    raise DataError(f"data.prompt_column is not set and there is no 'prompt' column; the data has columns: {', '.join(columns)}")


def is_conversation(value) -> bool:
    """TRL's conversational form: a list of {"role": ..., "content": ...} messages."""
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _check_sources(raw: RawData, preference: bool) -> None:
    """Check every row where it comes from: local files line by line (JSONL read directly, so the
    line is exact even where `datasets` could not load the file), hub splits row by row."""
    data = raw.data
    if data.train_file or data.validation_file:
        for key in ("train_file", "validation_file"):
            spec = getattr(data, key)
            for path in resolve_files(spec, key) if spec else []:
                _check_rows(_file_rows(path, data, key), data, preference, key)
    else:
        for split, ds in raw.splits.items():
            _check_rows(((f"the {split} split, row {i + 1}", row) for i, row in enumerate(ds)), data, preference, "dataset_name")


def _file_rows(path: str, data, key: str):
    """(where, row) for each row of a file: JSONL read line by line, other formats through `datasets`."""
    if Path(path).suffix.lower() == ".jsonl":
        return _jsonl_rows(path)
    ds = load_files([path], data, key)
    if Path(path).suffix.lower() in (".csv", ".tsv"):
        return ((f"{path}:{i + 2}", row) for i, row in enumerate(ds))  # line 1 is the header
    return ((f"{path}: row {i + 1}", row) for i, row in enumerate(ds))


def _jsonl_rows(path: str):
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if line.strip():
                yield f"{path}:{i}", json.loads(line)  # sources.check_file has vetted the JSON


def _check_rows(rows, data, preference: bool, key: str) -> None:
    kind_seen: tuple[str, str] | None = None  # (kind, where) of the first row
    for where, row in rows:
        if preference:
            roles = [("chosen", data.chosen_column or "chosen"), ("rejected", data.rejected_column or "rejected")]
            prompt_key = data.prompt_column or "prompt"
            if data.prompt_column or prompt_key in row:
                roles.append(("prompt", prompt_key))
        else:
            name = data.prompt_column or next((c for c in PROMPT_CANDIDATES if c in row), None)
            if name is None:
                raise DataError(f"{where}: no 'prompt' field (fields: {', '.join(row) or 'none'}); set data.prompt_column")
            roles = [("prompt", name)]
        kinds = {}
        for role, column in roles:
            if column not in row:
                raise DataError(f"{where}: no '{column}' field (data.{role}_column); the row has: {', '.join(row) or 'nothing'}")
            value = row[column]
            if value is None:
                raise DataError(f"{where}: '{column}' is null")
            if isinstance(value, str):
                kinds[role] = "text"
                empty = not value.strip()
            elif is_conversation(value):
                kinds[role] = "conversation"
                empty = not value or any(not isinstance(m["content"], (str, list)) for m in value)
            else:
                raise DataError(f"{where}: '{column}' must be text or a list of {{role, content}} messages, got {type(value).__name__}")
            if empty and not (role == "prompt" and preference):
                raise DataError(f"{where}: '{column}' is empty")
        if len(set(kinds.values())) > 1:
            shown = ", ".join(f"'{c}' is {kinds[r]}" for r, c in roles)
            raise DataError(f"{where}: mixed row types ({shown}); use text for all fields or conversations for all")
        kind = next(iter(kinds.values()))
        if kind_seen is None:
            kind_seen = (kind, where)
        elif kind != kind_seen[0]:
            raise DataError(f"{where}: a {kind} row, but {kind_seen[1]} is a {kind_seen[0]} row; use one form for the whole data")


def eval_pairs(data, split: str):
    """`llmcli eval` of a reward model: the preference rows it scores (the file `--data` names, else
    the hub split), checked like training rows and renamed to prompt/chosen/rejected."""
    from llmcli.data.tokenized import load_eval_split

    raw = load_eval_split(data, split)
    key = "validation_file" if data.validation_file else "train_file" if data.train_file else None
    if key is not None:
        for path in resolve_files(getattr(data, key), key):
            _check_rows(_file_rows(path, data, key), data, True, key)
    else:
        _check_rows(((f"the {split} split, row {i + 1}", row) for i, row in enumerate(raw)), data, True, "dataset_name")
    names = preference_columns(raw, data)
    return raw.select_columns(list(names.values())).rename_columns({old: new for new, old in names.items() if old != new})


def check_rows_for(rows, tokenizer) -> None:
    """Conversational rows need a chat template to become tokens (checked before the run dir)."""
    first = rows["train"][0]
    if any(is_conversation(v) for v in first.values()) and not getattr(tokenizer, "chat_template", None):
        raise DataError("the rows are conversations (lists of messages) but the tokenizer has no chat template; "
                        "use text rows or a model whose tokenizer has one")
