"""The run dir a training command writes: the lock, resume/overwrite/finished decisions, config
comparison and provenance. What a run dir holds, and reading it, is `llmcli/layout.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llmcli import console
from llmcli.config import Config, dump_resolved, load_config
from llmcli.dist import is_main_process, wait_for_everyone
from llmcli.errors import ConfigError, Interrupted, LockedError, first_line
from llmcli.files import atomic_write_text, ensure_writable_dir, write_json_atomic
from llmcli.layout import (LOCK_NAME, STAGING_DIR, holds_finished_run, latest_checkpoint, list_checkpoints,
                           read_summary, resume_step)

# What llmcli (through Trainer, tokenizers and peft) writes in a run dir: `--overwrite` deletes these
# and nothing else.
RUN_FILES = (
    "config.yaml", "metrics.jsonl", "summary.json", "config.json", "generation_config.json", "training_args.bin",
    "trainer_state.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja", "confusion_matrix.json",
    "confusion_matrix.png", "curves.png", "adapter_config.json", "head_config.json", "README.md", "*.safetensors",
    "model.safetensors.index.json", "checkpoint-*", STAGING_DIR, "merged", "tensorboard", "*.tmp",
)


# --------------------------------------------------------------------------------------------
# Lock


class RunLock:
    """An exclusive lock on a run dir: `fcntl.flock` on `.llmcli.lock`, which holds pid, host and
    start time for the messages.

    The kernel drops the lock when its holder dies, so taking over a dead run's lock is atomic:
    of two runs that find it stale, exactly one gets it. A second run into a live run's dir fails
    at once with exit 75 naming the holder.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        import fcntl

        ensure_writable_dir(self.path.parent)
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = self.holder() or {}
                raise LockedError(
                    f"{self.path.parent} is in use by another llmcli run (pid {holder.get('pid', '?')} on "
                    f"{holder.get('host', '?')}, started {holder.get('started', '?')}); lock file {self.path}"
                ) from None
            if self._same_file(fd):
                break
            os.close(fd)  # the previous holder removed the file between our open and flock: try again
        previous = self.holder()
        if previous and previous.get("pid") != os.getpid():
            console.warn(f"taking over stale lock {self.path} (pid {previous.get('pid')} on {previous.get('host')} is gone)")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return self

    def _same_file(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked: a waiting run then retries on a new file
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# --------------------------------------------------------------------------------------------
# Checkpoints and resume


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool, protect: str | None = None) -> Path | None:
    """Decide between resume, fresh start and refusal. Returns the checkpoint to resume from.

    - resume (default) and a complete checkpoint exists: resume from the newest one;
    - otherwise, a dir that holds checkpoints or a finished run is only reused with --overwrite,
      which deletes the files llmcli wrote there (RUN_FILES) and refuses when anything else is
      there, or when the dir holds `protect` (the model being fine-tuned);
    - a fresh start drops the metrics of a run killed before its first checkpoint.
    """
    if (read_summary(run_dir) or {}).get("status") == "failed":
        (run_dir / "summary.json").unlink()  # a failed session's: this one resumes or starts over
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
    if previous:
        _clear_run_files(run_dir, protect)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    return None


def _clear_run_files(run_dir: Path, protect: str | None) -> None:
    if protect and Path(protect).resolve().is_relative_to(run_dir.resolve()):
        raise ConfigError(f"--overwrite would delete the model being fine-tuned ({protect}); pick another --output-dir")
    ours = {child for pattern in RUN_FILES for child in run_dir.glob(pattern)}
    foreign = sorted(c.name for c in run_dir.iterdir() if c not in ours and c.name != LOCK_NAME)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(f"{run_dir} holds files llmcli did not write ({shown}); --overwrite deletes only a run's own "
                          "files, so move those or pick another --output-dir")
    for child in ours:
        shutil.rmtree(child) if child.is_dir() else child.unlink()


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


# --------------------------------------------------------------------------------------------
# Provenance


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


# --------------------------------------------------------------------------------------------
# The run dir of one training command

ARCHITECTURE_KEYS = ("model.model_type", "model.config_overrides", "model.model_name_or_path", "task")


def output_dir_of(cfg: Config) -> Path:
    if not cfg.training.output_dir:
        raise ConfigError("config key 'training.output_dir' is required (or pass --output-dir)")
    return Path(cfg.training.output_dir)


class RunDir:
    """Lock the run dir (main process only), pick the checkpoint to resume from, save config.yaml;
    on an error inside the `with` block, record the run as failed.

    `finished` holds the summary of a finished run with the same config: rerunning it (the cron
    case) is a no-op. `protect` is a model path that `--overwrite` must never delete; `task` is
    what the run trains (for the failed summary)."""

    def __init__(self, cfg: Config, resume: bool = True, overwrite: bool = False, protect: str | None = None,
                 task: str | None = None):
        self.cfg, self.task = cfg, task
        self.path = output_dir_of(cfg)
        self.resume, self.overwrite, self.protect = resume, overwrite, protect
        self.lock = RunLock(self.path)
        self.checkpoint: Path | None = None
        self.finished: dict[str, Any] | None = None
        self.reached_step: int | None = None  # set by `fit` when training itself fails

    def __enter__(self) -> "RunDir":
        # The main process locks, decides and may clear the dir; the other ranks then follow it.
        if is_main_process():
            self.lock.acquire()
            try:
                self._decide()
            except BaseException:
                self.lock.release()
                raise
        wait_for_everyone()
        if not is_main_process():
            self.finished = self._finished_summary()
            self.checkpoint = latest_checkpoint(self.path, warn=False) if self.resume else None
        return self

    def _decide(self) -> None:
        self.finished = self._finished_summary()
        if self.finished is not None:
            console.info(f"{self.path} already holds this run, finished at step {self.finished.get('global_step')}: "
                         "nothing to do (--overwrite --no-resume trains it again)")
            return
        self.checkpoint = prepare_run_dir(self.path, self.resume, self.overwrite, self.protect)
        if self.checkpoint is not None:
            _compare_with_previous(self.cfg, self.path / "config.yaml")
            truncate_metrics(self.path, resume_step(self.checkpoint))
            console.info(f"resuming from {self.checkpoint}")
        dump_resolved(self.cfg, self.path / "config.yaml", provenance())

    def _finished_summary(self) -> dict[str, Any] | None:
        """The summary of a finished run here whose training config equals this one."""
        if not self.resume or not (self.path / "summary.json").exists():
            return None
        summary = read_summary(self.path)
        if summary is None or summary.get("status") == "failed":
            return None
        return summary if changed_keys(self.cfg, self.path / "config.yaml", ignore=NOT_TRAINING_KEYS) == [] else None

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc is not None and is_main_process():
                self._record_failure(exc)
        finally:
            self.lock.release()

    def _record_failure(self, exc: BaseException) -> None:
        """Any error once the run dir is taken - loading data, building the model or the Trainer
        included - leaves summary.json "failed" with the error, so `llmcli report` and cron show a
        failed run, not an interrupted one a rerun would resume. A signal is no failure."""
        if isinstance(exc, Interrupted) or not isinstance(exc, Exception):
            return
        step = self.reached_step if self.reached_step is not None else resume_step(self.checkpoint) or 0
        write_json_atomic(self.path / "summary.json", {"status": "failed", "error": first_line(exc, 500),
                                                       "task": str(self.task or self.cfg.task), "global_step": step})


# keys that do not change what a finished run trained: rerunning with other values is still a no-op
NOT_TRAINING_KEYS = ("training.output_dir", "generation.", "eval.", "launch.")


def changed_keys(cfg: Config, previous_path: Path, ignore: tuple[str, ...] = ()) -> list[str] | None:
    """Config keys that differ from the config.yaml at `previous_path` (None if it cannot be read)."""
    pair = _before_and_now(cfg, previous_path)
    if pair is None:
        return None
    before, now = pair
    return sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k) and not k.startswith(ignore))


def _before_and_now(cfg: Config, previous_path: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    try:
        before = _flatten(load_config(previous_path).model_dump(mode="json"))
    except Exception:
        return None
    return before, _flatten(cfg.model_dump(mode="json"))


def _compare_with_previous(cfg: Config, previous_path: Path) -> None:
    """On resume: refuse a changed architecture, warn about other changed keys."""
    pair = _before_and_now(cfg, previous_path)
    if pair is None:
        if previous_path.exists():
            console.warn(f"could not read {previous_path} to compare configs")
        return
    before, now = pair
    changed = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k) and k != "training.output_dir"]
    arch = [k for k in changed if k.startswith(ARCHITECTURE_KEYS)]
    if arch:
        k = arch[0]
        raise ConfigError(
            f"config key '{k}' changed since the checkpoint ({before.get(k)!r} -> {now.get(k)!r}); "
            "resuming needs the same model; use --overwrite --no-resume or another --output-dir"
        )
    for k in changed:
        console.warn(f"config key '{k}' changed since the last run: {before.get(k)!r} -> {now.get(k)!r}")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and not key.endswith("config_overrides"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
