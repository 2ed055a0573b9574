"""What every llmcli run adds to the Trainer, whatever Trainer class runs it.

`trainer_class(base)` mixes `LlmcliTrainerMixin` (staged checkpoints, NaN guard) into any
`transformers.Trainer` subclass, TRL's included; the callbacks here (metrics.jsonl, progress,
signal checkpoint) are plain TrainerCallbacks. `fit` in fit.py puts them together.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import rotate_checkpoints

from llmcli import console
from llmcli.dist import is_distributed
from llmcli.errors import TrainingFailed
from llmcli.evaluate.metrics import safe_exp
from llmcli.files import append_jsonl
from llmcli.layout import STAGING_DIR, latest_checkpoint
from llmcli.train.curves import SESSION_START_KEY


def trainer_class(base: type) -> type:
    """`base` (Trainer or any subclass) with llmcli's checkpoint and NaN guarantees mixed in."""
    if issubclass(base, LlmcliTrainerMixin):
        return base
    return type(f"Llmcli{base.__name__}", (LlmcliTrainerMixin, base), {})


class LlmcliTrainerMixin:
    """What llmcli adds to any `transformers.Trainer` subclass (TRL's included): atomic checkpoints
    (staged, then renamed) and a per-step NaN/inf check (Trainer's logging_nan_inf_filter hides
    non-finite losses). Mixed in by `trainer_class`, so it sits in front of the Trainer in the MRO."""

    nan_check = True
    _staging: Path | None = None

    def _get_train_sampler(self, train_dataset=None):
        """`group_by_length` over the global batch (per device x accumulation x processes): Trainer groups
        per device, so N processes trained on other batches than one process with the same global batch."""
        from transformers.trainer_pt_utils import LengthGroupedSampler

        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            sampler.batch_size = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return sampler

    def _save_checkpoint(self, model, trial):
        """Write checkpoint-N under <run>/.staging/ and rename it into place once complete, so a kill
        while saving leaves the previous checkpoint as the latest (Trainer writes in place)."""
        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        self._staging = run_dir / STAGING_DIR
        try:
            super()._save_checkpoint(model, trial)  # writes into .staging/ (see _get_output_dir); its rotation finds nothing there
        finally:
            self._staging = None
        # every rank writes its own RNG state file into the staged dir: rename only once all are done
        self.accelerator.wait_for_everyone()
        if not self.args.should_save:
            return
        staged, final = run_dir / STAGING_DIR / name, run_dir / name
        best = self.state.best_model_checkpoint
        if best and Path(best).parent == staged.parent:
            self.state.best_model_checkpoint = str(run_dir / Path(best).name)
            self.state.save_to_json(str(staged / "trainer_state.json"))  # record the final path, not the staging one
        if final.exists():
            shutil.rmtree(final)
        os.replace(staged, final)
        try:
            staged.parent.rmdir()
        except OSError:
            pass
        rotate_checkpoints(str(run_dir), self.args.save_total_limit, self.state.best_model_checkpoint)

    def _get_output_dir(self, trial):
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.nan_check and not torch.isfinite(loss).all():
            last = latest_checkpoint(Path(self.args.output_dir), warn=False)
            raise TrainingFailed(
                f"loss became {loss.item()} at step {self.state.global_step + 1}; stopped without saving "
                f"(last good checkpoint: {last or 'none'}); lower the learning rate or check the data "
                "(training.nan_check=false disables this check)"
            )
        return loss


# --------------------------------------------------------------------------------------------
# Callbacks


class MetricsLog(TrainerCallback):
    """Append every log/eval event to metrics.jsonl (main process only)."""

    def __init__(self, run_dir: Path, is_lm: bool):
        self.path = run_dir / "metrics.jsonl"
        self.is_lm = is_lm

    def on_train_begin(self, args, state, control, **kwargs):
        # a resumed session says where it starts: a session killed with -9 wrote no end record
        if state.is_world_process_zero and state.global_step > 0:
            append_jsonl(self.path, {"step": state.global_step, "epoch": state.epoch, "time": time.time(), SESSION_START_KEY: True})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
        if "eval_loss" in logs and self.is_lm:
            record["eval_perplexity"] = safe_exp(logs["eval_loss"])
        append_jsonl(self.path, record)

class ConsoleProgress(TrainerCallback):
    """Rich progress on a TTY (step, loss, lr, tokens/s, ETA); one plain line per log event otherwise."""

    def __init__(self, is_lm: bool):
        self.bar = None
        self.status = ""
        self.is_lm = is_lm

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.bar = console.progress("train", total=state.max_steps).__enter__()
        self.bar.update(completed=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(completed=state.global_step, status=self.status)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        parts = [f"step {state.global_step}/{state.max_steps}"]
        for key, label in (("loss", "loss"), ("learning_rate", "lr"), ("train_tokens_per_second", "tok/s"),
                           ("eval_loss", "eval_loss"), ("eval_accuracy", "eval_acc"), ("eval_f1", "eval_f1")):
            if key in logs and isinstance(logs[key], (int, float)):
                parts.append(f"{label} {console.format_value(float(logs[key]))}")
        if "eval_loss" in logs and self.is_lm:
            parts.append(f"eval_ppl {console.format_value(safe_exp(logs['eval_loss']))}")
        line = "  ".join(parts)
        if self.bar is not None and self.bar.enabled:
            self.status = "  ".join(parts[1:])
        elif len(parts) > 1 and "train_loss" not in logs:
            console.info(line)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None

class GracefulStop(TrainerCallback):
    """First SIGINT/SIGTERM: finish the step, save a checkpoint, stop. Second SIGINT: exit now.

    Built on the Trainer's own control flow (should_save + should_training_stop), so the
    checkpoint is the normal, complete kind that resume expects.
    """

    def __init__(self):
        self.signum: int | None = None  # the signal this run stops for (seen here, or on another rank)
        self._received = False  # a signal reached this process (a second SIGINT then exits at once)
        self._previous: dict[int, Any] = {}

    def installed(self):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread
                    pass
            try:
                yield
            finally:
                for sig, handler in self._previous.items():
                    signal.signal(sig, handler)

        return ctx()

    def _handle(self, signum, frame):
        if self._received:
            if signum == signal.SIGINT:
                console.error("second interrupt: exiting now (the last complete checkpoint is kept)")
                os._exit(130)
            return
        self._received = True
        self.signum = signum
        console.warn(f"{signal.Signals(signum).name} received: finishing this step and saving a checkpoint (Ctrl-C again to quit now)")

    def on_step_end(self, args, state, control, **kwargs):
        if is_distributed():
            self.signum = self._signal_on_any_rank(args.device)
        if self.signum is not None:
            control.should_save = True
            control.should_training_stop = True

    def _signal_on_any_rank(self, device) -> int | None:
        """A signal seen by one rank stops every rank at this same step (a collective save, never a
        hang): the largest signal number seen anywhere (SIGTERM over SIGINT), or None."""
        import torch.distributed as dist

        seen = torch.tensor([self.signum or 0], device=device)
        dist.all_reduce(seen, op=dist.ReduceOp.MAX)
        return int(seen.item()) or None
