"""Which process am I, and waiting for the others: the few rank helpers every module needs.

Stdlib-only at import (the CLI reads `is_main_process` before any command loads torch). Under
`accelerate launch`/torchrun, RANK and WORLD_SIZE are set; a plain run is rank 0 of 1.
"""

from __future__ import annotations

import contextlib
import os


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


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) in a plain run."""
    if not is_distributed():
        return 0, 1
    state = distributed_state()
    return state.process_index, state.num_processes


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


def leave_process_group() -> None:
    """Tear down torch's process group at the end of a command that succeeded: a rank that exits
    with the group still up can abort at interpreter exit ('terminate called without an active
    exception', seen once on a gloo rank after a finished run), and torch warns about it."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not is_distributed():
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
