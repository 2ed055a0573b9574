"""`--num-processes N` / `launch:`: start the same command under `accelerate launch`.

For users who don't want to learn accelerate: `llmcli pretrain --config c.yaml --num-processes 4`
runs `accelerate launch --multi_gpu --num_processes 4 -m llmcli pretrain --config c.yaml ...`
(one process per GPU; on a machine without GPUs, 4 CPU processes with the gloo backend).
`launch.config_file` passes one of configs/accelerate/*.yaml through.
"""

from __future__ import annotations

import subprocess
import sys

from llmcli import console
from llmcli.config import Config


def wanted(cfg: Config) -> bool:
    """Whether the config asks for several processes (or an accelerate config) in this process."""
    return cfg.launch.num_processes > 1 or bool(cfg.launch.config_file)


def relaunch(cfg: Config) -> int:
    """Run this very command line again under accelerate; returns the launcher's exit code."""
    n = cfg.launch.num_processes
    argv = _without_num_processes(sys.argv[1:]) + ["--set", "launch.num_processes=1", "--set", "launch.config_file=null"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n)]
    if cfg.launch.config_file:
        cmd += ["--config_file", cfg.launch.config_file]
    else:
        cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if n > 1:
            cmd.append("--multi_gpu")
    cmd += ["-m", "llmcli", *argv]
    console.info(f"launching {n} processes: accelerate launch {' '.join(cmd[3:])}")
    return subprocess.run(cmd).returncode  # a list, never a shell


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
