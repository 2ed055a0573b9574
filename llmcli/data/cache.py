"""The on-disk cache of tokenized data and trained tokenizers.

An entry is keyed by everything that made it (source files with size and mtime or the hub id, the
tokenizer, block size, task, seed, ...), written to a temporary dir and renamed into place with a
completion marker, so a rerun or resume skips the work and a killed run leaves nothing a rerun trusts.
Under accelerate the main process builds an entry while the others wait, then all read it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from llmcli import console
from llmcli.config import DataSection
from llmcli.dist import main_process_first
from llmcli.files import is_published, publish_dir

CACHE_VERSION = 2  # 2: blank lines of text files are kept


def cache_root(data: DataSection) -> Path:
    root = data.cache_dir or os.environ.get("LLMCLI_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llmcli")
    return Path(root)


def cache_entry(data: DataSection, kind: str, parts: dict[str, Any]) -> Path:
    """The cache dir for an artefact of `kind` ('tokenized', 'tokenizers') made from `parts`."""
    return cache_root(data) / kind / cache_key(parts)


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True, default=str).encode()).hexdigest()[:20]


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256((body + specials + type(tokenizer).__name__).encode()).hexdigest()[:16]


def cached(parts: dict[str, Any], data: DataSection, build: Callable[[], Any], what: str):
    """Load `build()`'s DatasetDict from the cache entry keyed by `parts`, or build and store it."""
    from datasets import load_from_disk

    final = cache_entry(data, "tokenized", parts)
    with main_process_first():
        if is_published(final):
            console.info(f"tokenized cache hit: {what} from {final}")
            return load_from_disk(str(final))
        console.info(f"tokenizing {what} (cache miss; will be stored in {final})")
        ds = build()
        publish_dir(final, lambda tmp: ds.save_to_disk(str(tmp)), json.dumps(parts, default=str))
    return load_from_disk(str(final))


def cached_dir(data: DataSection, kind: str, parts: dict[str, Any], write: Callable[[Path], Any], what: str) -> Path:
    """The published cache dir for `parts`, written by `write(tmp_dir)` on a miss (tokenizers)."""
    final = cache_entry(data, kind, parts)
    with main_process_first():  # under accelerate, rank 0 writes it and the others read it
        if is_published(final):
            console.info(f"{what} cache hit: {final}")
        else:
            publish_dir(final, write, json.dumps(parts, default=str))
    return final
