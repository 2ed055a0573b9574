"""The one training path shared by `pretrain` and `finetune` (imported only inside commands).

`RunDir` locks the output dir and decides resume vs fresh start; `fit` builds TrainingArguments
and the Trainer, trains (resuming from the newest complete checkpoint), evaluates, saves the final
model + tokenizer at the run dir root and writes `summary.json`. Along the way it logs every event
to `metrics.jsonl`, shows progress, stops cleanly on SIGINT/SIGTERM (checkpoint first) and stops
with exit 1 on a NaN/inf loss.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import EarlyStoppingCallback, PrinterCallback, ProgressCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import rotate_checkpoints

from llmcli import console, runs
from llmcli.config import Config, dump_resolved, load_config
from llmcli.errors import ConfigError, Interrupted, TrainingFailed

ARCHITECTURE_KEYS = ("model.model_type", "model.config_overrides", "model.model_name_or_path", "task")


def seed_of(cfg: Config) -> int:
    return int(cfg.training.model_dump().get("seed") or 42)


def output_dir_of(cfg: Config) -> Path:
    if not cfg.training.output_dir:
        raise ConfigError("config key 'training.output_dir' is required (or pass --output-dir)")
    return Path(cfg.training.output_dir)


def lm_data(cfg: Config, model, tokenizer, masked: bool, seed: int):
    """Language-modelling blocks and their collator, shared by pretrain and causal/masked finetune.

    Returns (datasets, collator, a one-line description for the log)."""
    from transformers import DataCollatorForLanguageModeling, default_data_collator

    from llmcli import data, modeling

    block_size = cfg.data.block_size or modeling.default_block_size(model.config, tokenizer)
    modeling.check_block_size(model.config, block_size)
    datasets = data.lm_datasets(cfg.data, tokenizer, block_size, masked=masked, seed=seed)
    if masked:
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=cfg.data.mlm_probability)
    else:
        collator = default_data_collator  # blocks are full length and carry their labels (run_clm.py)
    size = "streamed" if cfg.data.streaming else f"{len(datasets['train']):,}"
    about = f"{size} blocks of {block_size} tokens"
    if "validation" in datasets:
        about += f", validating on {len(datasets['validation']):,}"
    return datasets, collator, about


class RunDir:
    """Lock the run dir (main process only), pick the checkpoint to resume from, save config.yaml."""

    def __init__(self, cfg: Config, resume: bool = True, overwrite: bool = False):
        self.cfg = cfg
        self.path = output_dir_of(cfg)
        self.resume, self.overwrite = resume, overwrite
        self.lock = runs.RunLock(self.path)
        self.checkpoint: Path | None = None

    def __enter__(self) -> "RunDir":
        # The main process locks, decides and may clear the dir; the other ranks then follow it.
        if runs.is_main_process():
            self.lock.acquire()
            try:
                self.checkpoint = runs.prepare_run_dir(self.path, self.resume, self.overwrite)
                if self.checkpoint is not None:
                    _compare_with_previous(self.cfg, self.path / "config.yaml")
                    runs.truncate_metrics(self.path, runs.resume_step(self.checkpoint))
                    console.info(f"resuming from {self.checkpoint}")
                dump_resolved(self.cfg, self.path / "config.yaml", runs.provenance())
            except BaseException:
                self.lock.release()
                raise
        runs.wait_for_everyone()
        if not runs.is_main_process():
            self.checkpoint = runs.latest_checkpoint(self.path, warn=False) if self.resume else None
        return self

    def __exit__(self, *exc):
        self.lock.release()


def _compare_with_previous(cfg: Config, previous_path: Path) -> None:
    """On resume: refuse a changed architecture, warn about other changed keys."""
    if not previous_path.exists():
        return
    try:
        before = _flatten(load_config(previous_path, check_training=False).model_dump(mode="json"))
    except Exception:
        console.warn(f"could not read {previous_path} to compare configs")
        return
    now = _flatten(cfg.model_dump(mode="json"))
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    arch = [k for k in changed if k.startswith(ARCHITECTURE_KEYS)]
    if arch:
        k = arch[0]
        raise ConfigError(
            f"config key '{k}' changed since the checkpoint ({before.get(k)!r} -> {now.get(k)!r}); "
            "resuming needs the same model; use --overwrite --no-resume or another --output-dir"
        )
    for k in changed:
        if k != "training.output_dir":
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


# --------------------------------------------------------------------------------------------
# Training


def training_arguments(cfg: Config, has_eval: bool, **forced):
    """TrainingArguments from `training:`, with llmcli's console in place of tqdm, and mixed
    precision dropped (with a warning) when there is no GPU to run it on."""

    kwargs = cfg.training_arguments()
    kwargs.update(forced)
    kwargs["disable_tqdm"] = True
    if torch.cuda.is_available():
        # GPU speed defaults for keys the config leaves unset (fused AdamW is already Trainer's default)
        if "bf16" not in kwargs and not kwargs.get("fp16") and torch.cuda.is_bf16_supported():
            kwargs["bf16"] = True
        if "tf32" not in kwargs and torch.cuda.get_device_capability()[0] >= 8:
            kwargs["tf32"] = True
    else:
        if runs.is_distributed():
            kwargs.setdefault("use_cpu", True)  # several CPU processes: DDP over gloo
        for flag in ("bf16", "fp16", "tf32", "bf16_full_eval", "fp16_full_eval"):
            if kwargs.get(flag):
                console.warn(f"training.{flag}=true needs a CUDA GPU; none found, so training runs in fp32")
                kwargs[flag] = False
    if cfg.data.streaming and (kwargs.get("max_steps") or -1) <= 0:
        raise ConfigError("data.streaming=true needs training.max_steps (a stream has no length to count epochs by)")
    if runs.is_distributed():
        kwargs.setdefault("ddp_find_unused_parameters", False)  # GPT-2/BERT heads use every parameter
    strategy = str(kwargs.get("eval_strategy", "no"))
    if strategy not in ("no", "IntervalStrategy.NO") and not has_eval:
        raise ConfigError(f"training.eval_strategy={strategy} but there is no validation data (set data.validation_file or data.validation_split_percentage > 0)")
    try:
        return TrainingArguments(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"training: {err}") from None


def fit(
    run: RunDir,
    cfg: Config,
    model,
    tokenizer,
    datasets,
    collator,
    task: str,
    compute_metrics: Callable | None = None,
    preprocess_logits: Callable | None = None,
    after_train: Callable[[Any], dict[str, Any]] | None = None,
    callbacks: tuple = (),
) -> dict[str, Any]:
    """Train, evaluate, save and summarise. Returns the summary dict (also in summary.json).

    `after_train(trainer)` runs after the final model is saved and returns extra summary entries
    (finetune's per-class report, LoRA's merged model).
    """

    eval_ds = datasets.get("validation") if hasattr(datasets, "get") else None
    args = training_arguments(cfg, has_eval=eval_ds is not None)
    guard = GracefulStop()
    callbacks = [MetricsLog(run.path, task), ConsoleProgress(task), guard, *callbacks]
    if cfg.training.early_stopping_patience:
        if not args.load_best_model_at_end:
            raise ConfigError("training.early_stopping_patience needs training.load_best_model_at_end=true (and matching eval/save strategies)")
        callbacks.append(EarlyStoppingCallback(cfg.training.early_stopping_patience, cfg.training.early_stopping_threshold))
    trainer = LlmcliTrainer(
        model=model, args=args, train_dataset=datasets["train"], eval_dataset=eval_ds, data_collator=collator,
        processing_class=tokenizer, compute_metrics=compute_metrics, callbacks=callbacks,
        preprocess_logits_for_metrics=preprocess_logits,
    )
    trainer.nan_check = cfg.training.nan_check
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)

    resumed_from = runs.resume_step(run.checkpoint)
    with guard.installed():
        result = trainer.train(resume_from_checkpoint=str(run.checkpoint) if run.checkpoint else None)
    if guard.signum is not None:
        raise Interrupted(
            guard.signum,
            f"stopped by {signal.Signals(guard.signum).name} at step {trainer.state.global_step}; checkpoint saved in "
            f"{run.path}; run the same command again to resume",
        )

    metrics: dict[str, Any] = {}
    if eval_ds is not None:
        # reuse an evaluation the schedule already ran at this very step (best model not reloaded)
        last = trainer.state.log_history[-2] if len(trainer.state.log_history) > 1 else {}
        if "eval_loss" in last and last.get("step") == trainer.state.global_step and not args.load_best_model_at_end:
            metrics = {k: v for k, v in last.items() if k.startswith("eval_")}
        else:
            metrics = trainer.evaluate()
    trainer.save_model(str(run.path))
    if trainer.is_world_process_zero():
        trainer.save_state()

    state = trainer.state
    train_metrics = result.metrics
    runtime = float(train_metrics.get("train_runtime", 0.0))
    session_tokens = state.num_input_tokens_seen - (getattr(trainer, "_initial_num_input_tokens_seen", 0) or 0)
    summary: dict[str, Any] = {
        "task": task,
        "train_loss": train_metrics.get("train_loss"),
        "global_step": state.global_step,
        "epoch": state.epoch,
        "train_tokens": state.num_input_tokens_seen,
        "train_tokens_per_second": (session_tokens / runtime) if runtime > 0 else None,
        "train_samples_per_second": train_metrics.get("train_samples_per_second"),
        "train_runtime_s": runtime,
        "resumed_from": resumed_from,
    }
    for key, value in metrics.items():
        summary[key] = value
    if "eval_loss" in metrics and task in ("causal-lm", "masked-lm"):
        summary["perplexity"] = _safe_exp(metrics["eval_loss"])
    if after_train is not None:
        summary.update(after_train(trainer))
    if state.best_model_checkpoint:
        summary["best_model_checkpoint"] = state.best_model_checkpoint
    if trainer.is_world_process_zero():
        runs.write_json_atomic(run.path / "summary.json", summary)
    return summary


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def _test_hook(name: str) -> int:
    """Test hooks (env vars) that make kill/signal tests deterministic; 0 = off."""
    return int(os.environ.get(f"LLMCLI_TEST_{name}", "0"))


def _test_pause(until=lambda: False) -> None:
    """Write the marker file the test waits for, then block (until `until()` or 120 s)."""
    marker = os.environ.get("LLMCLI_TEST_MARKER")
    if marker:
        Path(marker).write_text(str(os.getpid()))
    deadline = time.time() + 120
    while not until() and time.time() < deadline:
        time.sleep(0.02)


class LlmcliTrainer(Trainer):
    """Trainer with atomic checkpoints (staged, then renamed) and a per-step NaN/inf check
    (Trainer's own logging_nan_inf_filter hides non-finite losses)."""

    nan_check = True
    _staging: Path | None = None

    def _save_checkpoint(self, model, trial):
        """Write checkpoint-N under <run>/.staging/ and rename it into place once complete, so a kill
        while saving leaves the previous checkpoint as the latest (Trainer writes in place)."""
        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        self._staging = run_dir / runs.STAGING_DIR
        try:
            super()._save_checkpoint(model, trial)  # writes into .staging/ (see _get_output_dir); its rotation finds nothing there
        finally:
            self._staging = None
        # every rank writes its own RNG state file into the staged dir: rename only once all are done
        self.accelerator.wait_for_everyone()
        if not self.args.should_save:
            return
        staged, final = run_dir / runs.STAGING_DIR / name, run_dir / name
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

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        if _test_hook("PAUSE_IN_SAVE") == self.state.global_step:
            _test_pause()  # weights and optimizer written, trainer_state.json not yet: an incomplete checkpoint

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if 0 < _test_hook("NAN_AT_STEP") <= self.state.global_step + 1:
            loss = loss * float("nan")
        if self.nan_check and not torch.isfinite(loss).all():
            last = runs.latest_checkpoint(Path(self.args.output_dir), warn=False)
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

    def __init__(self, run_dir: Path, task: str):
        self.path = run_dir / "metrics.jsonl"
        self.task = task

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
        if "eval_loss" in logs and self.task in ("causal-lm", "masked-lm"):
            record["eval_perplexity"] = _safe_exp(logs["eval_loss"])
        runs.append_jsonl(self.path, record)

class ConsoleProgress(TrainerCallback):
    """Rich progress on a TTY (step, loss, lr, tokens/s, ETA); one plain line per log event otherwise."""

    def __init__(self, task: str):
        self.bar = None
        self.status = ""
        self.is_lm = task in ("causal-lm", "masked-lm")

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
            parts.append(f"eval_ppl {console.format_value(_safe_exp(logs['eval_loss']))}")
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
        self.signum: int | None = None
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
        if self.signum is not None:
            if signum == signal.SIGINT:
                console.error("second interrupt: exiting now (the last complete checkpoint is kept)")
                os._exit(130)
            return
        self.signum = signum
        console.warn(f"{signal.Signals(signum).name} received: finishing this step and saving a checkpoint (Ctrl-C again to quit now)")

    def on_step_end(self, args, state, control, **kwargs):
        if _test_hook("PAUSE_AT_STEP") == state.global_step:
            _test_pause(until=lambda: self.signum is not None)
        if self.signum is not None:
            control.should_save = True
            control.should_training_stop = True



def dry_run(cfg: Config, command: str, task: str, model_path: str | None) -> dict[str, Any]:
    """Print the resolved config (stdout) and what would run (stderr); train nothing."""
    import yaml

    from llmcli import data

    out = output_dir_of(cfg)
    training_arguments(cfg, has_eval=True)  # surfaces TrainingArguments' own consistency errors
    ckpt = runs.latest_checkpoint(out, warn=False) if out.is_dir() else None
    source = data.source_fingerprint(cfg.data)
    files = {k: [f[0] for f in v] for k, v in source.items() if k != "hub"} or {"hub": source.get("hub")}
    plan = {
        "command": command,
        "task": task,
        "model": model_path or f"{cfg.model.model_type} from scratch {cfg.model.config_overrides or ''}".strip(),
        "tokenizer": cfg.model.tokenizer_name or model_path or f"train one (vocab_size={cfg.model.vocab_size})",
        **{k: ", ".join(map(str, v)) if isinstance(v, list) else v for k, v in files.items()},
        "output_dir": str(out),
        "would resume from": str(ckpt) if ckpt else "nothing (fresh start)",
    }
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    console.table("dry run: nothing was trained", list(plan.items()), to_stderr=True)
    return {"dry_run": True, **plan}
