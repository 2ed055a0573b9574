"""TrainerCallbacks the tests plug in through `training.callbacks: [hooks:TestHooks]`.

They make kill/signal/NaN tests deterministic: pause after step N (until a signal arrives; with HOOK_PAUSE_SEED only a run of that seed),
pause inside the checkpoint save of step N (weights written, optimizer and trainer_state.json
not yet), make the loss of step N non-finite, or fail at one learning rate (a sweep's failed trial). Settings come from HOOK_* environment variables;
the marker file tells the test that the run is paused.
"""

import os
import signal
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

CALLBACK = "training.callbacks=[hooks:TestHooks]"


def hook_env(marker: Path | None = None, **hooks) -> dict[str, str]:
    """The environment of a CLI subprocess that loads TestHooks: this folder importable, HOOK_* set."""
    env = {**os.environ, **{f"HOOK_{k}": str(v) for k, v in hooks.items()},
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")])}
    if marker is not None:
        env["HOOK_MARKER"] = str(marker)
    return env


def _setting(name: str) -> int:
    return int(os.environ.get(f"HOOK_{name}", "0"))


def _pause(until=lambda: False) -> None:
    marker = os.environ.get("HOOK_MARKER")
    if marker:
        Path(marker).write_text(str(os.getpid()))
    deadline = time.time() + 120
    while not until() and time.time() < deadline:
        time.sleep(0.02)


def _signal_received() -> bool:
    """Whether llmcli's GracefulStop (the installed SIGINT handler) has seen a signal."""
    handler = signal.getsignal(signal.SIGINT)
    return getattr(getattr(handler, "__self__", None), "signum", None) is not None


class TestHooks(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step
        if os.environ.get("HOOK_FAIL_AT_LR") and args.learning_rate == float(os.environ["HOOK_FAIL_AT_LR"]):
            raise RuntimeError("CUDA out of memory (a test's failure at this learning rate)")
        if _setting("NAN_AT_STEP") and step == _setting("NAN_AT_STEP") - 1:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))  # the next step's loss is NaN
        if _setting("PAUSE_IN_SAVE") == step:
            original = optimizer.state_dict

            def paused_state_dict(*a, **kw):
                _pause()  # the weights of this checkpoint are written; optimizer and trainer_state.json are not
                return original(*a, **kw)

            optimizer.state_dict = paused_state_dict
        if _setting("PAUSE_AT_STEP") == step and os.environ.get("HOOK_PAUSE_SEED", str(args.seed)) == str(args.seed):
            _pause(until=_signal_received)


class Unbuildable(TrainerCallback):
    """A callback whose constructor fails: an error after the run dir is taken, before training."""

    def __init__(self):
        raise RuntimeError("this callback cannot be built")


def share_of_e(texts):
    """A reward for subprocess runs (this folder is on their PYTHONPATH): the share of 'e' in each text."""
    return [t.count("e") / max(1, len(t)) for t in texts]
