"""Run directories: the lock, resume detection, overwrite rules, metrics log and provenance.

Layout of a run dir (`training.output_dir`):
    config.yaml      resolved config (provenance in leading comments)
    metrics.jsonl    one JSON object per log/eval event
    summary.json     final metrics, written when the run ends
    checkpoint-N/    Trainer checkpoints (model, optimizer, scheduler, RNG, trainer_state.json), each
                     written under .staging/ and renamed into place when complete
    *.safetensors, config.json, tokenizer files: the final model, loadable with from_pretrained
    .llmcli.lock     held while a run writes here
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llmcli import console
from llmcli.errors import ConfigError, LockedError

LOCK_NAME = ".llmcli.lock"
STAGING_DIR = ".staging"  # checkpoints are written here, then renamed into place
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


def is_main_process() -> bool:
    """Rank 0 under torchrun/accelerate launch, or a plain single process."""
    return int(os.environ.get("RANK", "0")) == 0


def is_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def distributed_state():
    """accelerate's process state. Without a GPU, ranks talk over gloo (`cpu=True`); Trainer is
    given the same choice (`use_cpu`), since the state is a singleton set up by its first caller."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


@contextlib.contextmanager
def main_process_first():
    """accelerate's main_process_first across ranks (shared caches are built once); a no-op otherwise."""
    if not is_distributed():
        yield
        return
    with distributed_state().main_process_first():
        yield


def wait_for_everyone() -> None:
    """A barrier across ranks under accelerate/torchrun; nothing in a single process."""
    if is_distributed():
        distributed_state().wait_for_everyone()


# --------------------------------------------------------------------------------------------
# Lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run dir: a file created with O_EXCL holding pid, host and start time.

    A second run into the same dir fails at once with exit 75 naming the holder. A lock whose
    holder is gone (same host, pid not alive) is taken over with a warning.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False

    def acquire(self) -> "RunLock":
        ensure_writable_dir(self.path.parent)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read_holder()
                if holder and holder.get("host") == me["host"] and not _pid_alive(int(holder.get("pid", -1))):
                    console.warn(f"taking over stale lock {self.path} (pid {holder.get('pid')} is gone)")
                    self.path.unlink(missing_ok=True)
                    continue
                if holder is None:
                    # unreadable: a holder killed between create and write; give it a moment, then take over
                    if time.time() - self.path.stat().st_mtime > 5:
                        console.warn(f"taking over unreadable lock {self.path}")
                        self.path.unlink(missing_ok=True)
                        continue
                    holder = {"pid": "?", "host": "?", "started": "?"}
                raise LockedError(
                    f"{self.path.parent} is in use by another llmcli run (pid {holder.get('pid')} on {holder.get('host')}, "
                    f"started {holder.get('started')}); lock file {self.path}"
                )
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return self
        raise LockedError(f"could not take the lock {self.path}")

    def _read_holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            holder = self._read_holder()
            if holder and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def ensure_writable_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create output dir {path}: {err.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"output dir {path} is not writable")


# --------------------------------------------------------------------------------------------
# Checkpoints and resume


def checkpoint_is_complete(path: Path) -> bool:
    """Trainer writes trainer_state.json last (after weights, optimizer, scheduler and RNG), so a
    parseable trainer_state.json without the JIT 'incomplete' sentinel marks a finished save."""
    if (path / "checkpoint-is-incomplete.txt").exists():
        return False
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return any((path / f).exists() for f in WEIGHT_FILES + ("pytorch_model.bin",))


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """All checkpoint-N dirs, oldest first (complete or not)."""
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        m = _CHECKPOINT_RE.match(child.name)
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
    return (run_dir / "summary.json").exists() or any((run_dir / f).exists() for f in WEIGHT_FILES)


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Decide between resume, fresh start and refusal. Returns the checkpoint to resume from.

    - resume (default) and a complete checkpoint exists: resume from the newest one;
    - otherwise, a dir that holds checkpoints or a finished run is only reused with --overwrite,
      which clears the previous run's files first (the lock stays).
    """
    staging = run_dir / STAGING_DIR
    if staging.is_dir():
        for partial in sorted(staging.iterdir()):
            console.warn(f"removing incomplete checkpoint {partial} (interrupted while saving)")
        shutil.rmtree(staging, ignore_errors=True)
    ckpt = latest_checkpoint(run_dir, remove_incomplete=True) if resume else None
    if ckpt is not None:
        return ckpt
    previous = holds_finished_run(run_dir) or bool(list_checkpoints(run_dir))
    if previous and not overwrite:
        what = "a finished run" if holds_finished_run(run_dir) else "checkpoints"
        hint = "" if resume else " (--no-resume)"
        raise ConfigError(f"{run_dir} already holds {what}; pass --overwrite to start over{hint}, or pick another --output-dir")
    if previous and overwrite:
        for child in run_dir.iterdir():
            if child.name == LOCK_NAME:
                continue
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    return None


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, drop metrics.jsonl records logged after the checkpoint (they will be logged again)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:
            continue  # a line cut short by a kill
    atomic_write_text(path, "".join(x + "\n" for x in kept))


def resume_step(checkpoint: Path | None) -> int | None:
    if checkpoint is None:
        return None
    return int(_CHECKPOINT_RE.match(checkpoint.name).group(1))


# --------------------------------------------------------------------------------------------
# Files in the run dir


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file under a temporary name and rename it into place: readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def publish_dir(final: Path, write, marker: str) -> None:
    """Fill a temporary dir with `write(tmp)`, add the completion marker, rename it to `final`:
    a killed writer never leaves a dir that a reader trusts (readers check the marker)."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    (tmp / "llmcli-complete").write_text(marker)
    shutil.rmtree(final, ignore_errors=True)  # a stale entry without a marker, or a racing writer's
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, default=_json_default) + "\n")
        fh.flush()


def provenance() -> dict[str, str]:
    """Library versions and the git commit of the working directory, for config.yaml."""
    from importlib import metadata

    info = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": sys.version.split()[0]}
    for pkg in ("llmcli", "torch", "transformers", "datasets", "accelerate", "tokenizers", "peft"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    info["command"] = " ".join(sys.argv)
    return info
