"""`--num-processes` / `launch:`: start the same command under `accelerate launch`.

For users who don't want to learn accelerate: `llmcli pretrain --config c.yaml --num-processes 4`
runs `accelerate launch --multi_gpu --num_processes 4 -m llmcli pretrain --config c.yaml ...`
(one process per GPU; on a machine without GPUs, 4 CPU processes with the gloo backend).
`launch.config_file` passes one of configs/accelerate/*.yaml through.

The parent stays in charge of what a user or cron sees: SIGINT/SIGTERM are forwarded to the
workers themselves (torch's launcher starts them in sessions of their own, and would give them
only 30 s), and the command exits with the workers' exit code (2, 3, 4, 75, 130, 143, ...) rather
than the launcher's 1 and its traceback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from llmcli import console
from llmcli.config import Config

EXIT_FILE_ENV = "LLMCLI_EXIT_FILE"  # workers write their exit code to <this>.<rank>
# lines of the launcher's own failure report (its traceback, torch.distributed.elastic's banner)
_LAUNCHER_NOISE = ("Traceback (most recent call last)", "torch.distributed.elastic", "ChildFailedError")


def wanted(cfg: Config) -> bool:
    """Whether the config asks for several processes (or an accelerate config) in this process."""
    return cfg.launch.num_processes > 1 or bool(cfg.launch.config_file)


def free_port() -> int:
    """A TCP port free on this machine now, for a launcher's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relaunch(cfg: Config) -> int:
    """Run this very command line again under accelerate; returns the workers' exit code."""
    n = cfg.launch.num_processes
    argv = _without_num_processes(sys.argv[1:]) + ["--set", "launch.num_processes=1", "--set", "launch.config_file=null"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n)]
    if cfg.launch.config_file:
        cmd += ["--config_file", cfg.launch.config_file]
    else:
        # a free port, not accelerate's fixed 29500: two llmcli jobs on one machine must not collide
        cmd += ["--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no"]
        if n > 1:
            cmd.append("--multi_gpu")
    cmd += ["-m", "llmcli", *argv]
    console.info(f"launching {n} processes: accelerate launch {' '.join(cmd[3:])}")
    with tempfile.TemporaryDirectory(prefix="llmcli-launch-") as tmp:
        exit_file = Path(tmp) / "exit"
        # its own session: a terminal's Ctrl-C reaches this process only, which forwards it to the workers
        proc = subprocess.Popen(cmd, env={**os.environ, EXIT_FILE_ENV: str(exit_file)}, start_new_session=True,
                                stderr=subprocess.PIPE)  # a list, never a shell
        held: list[bytes] = []
        relay = threading.Thread(target=_relay_stderr, args=(proc.stderr, held), daemon=True)
        relay.start()
        previous = {sig: signal.signal(sig, lambda signum, frame: _forward(proc, signum)) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            code = proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        relay.join(timeout=10)
        worker_code = _worker_exit_code(exit_file)
    if (code != 0 and worker_code is None) or console.debug():
        sys.stderr.buffer.write(b"".join(held))  # a failure llmcli did not report itself: show everything
        sys.stderr.flush()
    return worker_code if code != 0 and worker_code is not None else code


def write_exit_code(code: int) -> None:
    """In a worker started by `relaunch`: record this rank's exit code for the parent."""
    path = os.environ.get(EXIT_FILE_ENV)
    if path:
        Path(f"{path}.{os.environ.get('RANK', '0')}").write_text(str(code))


def _worker_exit_code(exit_file: Path) -> int | None:
    """Rank 0's exit code, else the first rank's that wrote one."""
    files = sorted(exit_file.parent.glob(exit_file.name + ".*"), key=lambda p: int(p.suffix[1:]))
    return int(files[0].read_text()) if files else None


def _relay_stderr(stream, held: list[bytes]) -> None:
    """Pass the workers' stderr through as it comes; from the launcher's first failure line on, hold
    it back (shown only when no worker reported an exit code of its own)."""
    for line in iter(stream.readline, b""):
        if held or any(mark.encode() in line for mark in _LAUNCHER_NOISE):
            held.append(line)
            continue
        sys.stderr.buffer.write(line)
        sys.stderr.flush()


def _forward(proc: subprocess.Popen, signum: int) -> None:
    """Send the signal to the worker processes (the launcher's children), else to the launcher."""
    targets = _children(proc.pid) or [proc.pid]
    for pid in targets:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _children(pid: int) -> list[int]:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        return [int(c) for t in tasks for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
    except OSError:
        return []  # not Linux, or already gone


def _without_num_processes(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--num-processes":
            skip = True
            continue
        if arg.startswith("--num-processes="):
            continue
        out.append(arg)
    return out
