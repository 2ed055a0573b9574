"""Files that readers can trust: written under a temporary name and renamed into place.

A killed writer never leaves half a file (config.yaml, summary.json, metrics cut back on resume)
or a cache directory without its completion marker.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable

from llmcli.errors import ConfigError

COMPLETE_MARKER = "llmcli-complete"


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file under a temporary name and rename it into place: readers never see half a file.
    The temporary name is this writer's own, so processes writing one file (a sweep's workers and
    its leaderboard) never rename or remove each other's."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for any new file
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=json_default) + "\n")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, default=json_default) + "\n")
        fh.flush()


def json_default(obj):
    """numpy/torch scalars as numbers, anything else as its string (for json.dumps)."""
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def is_published(final: Path) -> bool:
    return (final / COMPLETE_MARKER).exists()


def publish_dir(final: Path, write: Callable[[Path], Any], marker: str) -> None:
    """Fill a temporary dir with `write(tmp)`, add the completion marker, rename it to `final`:
    a killed writer never leaves a dir that a reader trusts (readers check `is_published`)."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    (tmp / COMPLETE_MARKER).write_text(marker)
    if is_published(final):  # a racing writer got there first, and a reader may be using its entry
        shutil.rmtree(tmp, ignore_errors=True)
        return
    shutil.rmtree(final, ignore_errors=True)  # a stale entry without a marker
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_writable_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create output dir {path}: {err.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"output dir {path} is not writable")
