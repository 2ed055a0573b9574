"""What a run dir holds and how to read it: its files, checkpoints, summary.json and lock file.

Every wing reads run dirs (models load their final model or a checkpoint, `report` inspects them,
`sweep` finds finished trials); only `train/rundir.py` writes them. Layout of a run dir
(`training.output_dir`):
    config.yaml      resolved config (provenance in leading comments)
    metrics.jsonl    one JSON object per log/eval event
    summary.json     final metrics, written when the run ends ("status": "finished" or "failed")
    checkpoint-N/    Trainer checkpoints (model, optimizer, scheduler, RNG, trainer_state.json), each
                     written under .staging/ and renamed into place when complete
    *.safetensors, config.json, tokenizer files: the final model, loadable with from_pretrained
    .llmcli.lock     held while a run writes here
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from llmcli import console

LOCK_NAME = ".llmcli.lock"
STAGING_DIR = ".staging"  # checkpoints are written here, then renamed into place
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
# weights of a checkpoint written by FSDP (SHARDED_STATE_DICT: a directory per shard set) or DeepSpeed
SHARDED_WEIGHTS = ("pytorch_model_fsdp*", "global_step*")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists here (any process: a pid is reused after its owner dies)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_is_held(path: Path) -> bool | None:
    """Whether a live process holds the run lock at `path` (an flock, which the kernel drops when its
    holder dies): asked of the kernel with a non-blocking shared lock, not guessed from a pid that
    may be reused. None when there is no lock file."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the shared lock if we got it
    return False


def checkpoint_is_complete(path: Path) -> bool:
    """Trainer writes trainer_state.json last (after weights, optimizer, scheduler and RNG), so a
    parseable trainer_state.json without the JIT 'incomplete' sentinel marks a finished save."""
    if (path / "checkpoint-is-incomplete.txt").exists():
        return False
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return any((path / f).exists() for f in WEIGHT_FILES + ("pytorch_model.bin",)) or any(
        next(path.glob(pattern), None) is not None for pattern in SHARDED_WEIGHTS)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """All checkpoint-N dirs, oldest first (complete or not)."""
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        m = CHECKPOINT_RE.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path, warn: bool = True, remove_incomplete: bool = False) -> Path | None:
    """The newest complete checkpoint; incomplete ones are skipped (with a warning), never loaded.

    With `remove_incomplete` (a resuming run that holds the lock), the incomplete ones newer than
    it are deleted, so that Trainer never saves into, rotates or picks up a half-written dir.
    """
    for step, path in reversed(list_checkpoints(run_dir)):
        if checkpoint_is_complete(path):
            return path
        if warn:
            action = "removing" if remove_incomplete else "skipping"
            console.warn(f"{action} incomplete checkpoint {path} (interrupted while saving)")
        if remove_incomplete:
            shutil.rmtree(path, ignore_errors=True)
    return None


def holds_finished_run(run_dir: Path) -> bool:
    summary = read_summary(run_dir)
    return (summary is not None and summary.get("status") != "failed") or any((run_dir / f).exists() for f in WEIGHT_FILES)


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """summary.json ("status": "finished" or "failed"), or None when absent or unreadable."""
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def resume_step(checkpoint: Path | None) -> int | None:
    if checkpoint is None:
        return None
    return int(CHECKPOINT_RE.match(checkpoint.name).group(1))
