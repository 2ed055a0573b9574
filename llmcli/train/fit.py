"""The one training path of every training command (imported only inside commands).

`fit` builds the arguments and the Trainer - `transformers.Trainer` or any subclass (TRL's
trainers included) with its own arguments class - with llmcli's guarantees mixed in
(`hooks.py`), trains (resuming from the run dir's newest complete checkpoint), evaluates, saves
the final model + tokenizer at the run dir root and writes `summary.json`.
"""

from __future__ import annotations

import signal
from typing import Any, Callable

import torch
from transformers import EarlyStoppingCallback, PrinterCallback, ProgressCallback, Trainer, TrainerCallback

from llmcli import console, tasks
from llmcli.config import Config
from llmcli.data import tokenization, tokenized
from llmcli.data.sources import source_fingerprint
from llmcli.dist import is_distributed
from llmcli.errors import ConfigError, Interrupted
from llmcli.evaluate.metrics import safe_exp
from llmcli.files import write_json_atomic
from llmcli.layout import latest_checkpoint, resume_step
from llmcli.models import build
from llmcli.train.hooks import ConsoleProgress, GracefulStop, MetricsLog, trainer_class
from llmcli.train.rundir import RunDir, output_dir_of


def training_arguments(cfg: Config, has_eval: bool, args_cls: type | None = None, **forced):
    """`args_cls` (TrainingArguments or a subclass such as TRL's DPOConfig) from `training:`, with
    llmcli's console in place of tqdm, and mixed precision dropped (with a warning) without a GPU."""
    args_cls = args_cls or tasks.args_class(cfg.task)
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
        if is_distributed():
            kwargs.setdefault("use_cpu", True)  # several CPU processes: DDP over gloo
        for flag in ("bf16", "fp16", "tf32", "bf16_full_eval", "fp16_full_eval"):
            if kwargs.get(flag):
                console.warn(f"training.{flag}=true needs a CUDA GPU; none found, so training runs in fp32")
            kwargs[flag] = False  # explicitly: TRL's configs default to bf16=True
    if cfg.data.streaming and (kwargs.get("max_steps") or -1) <= 0:
        raise ConfigError("data.streaming=true needs training.max_steps (a stream has no length to count epochs by)")
    if is_distributed():
        kwargs.setdefault("ddp_find_unused_parameters", False)  # GPT-2/BERT heads use every parameter
    strategy = str(kwargs.get("eval_strategy", "no"))
    if strategy not in ("no", "IntervalStrategy.NO") and not has_eval:
        raise ConfigError(f"training.eval_strategy={strategy} but there is no validation data (set data.validation_file or data.validation_split_percentage > 0)")
    try:
        return args_cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"training: {err}") from None


def prepare(cfg: Config, task: tasks.Task, fmt: tasks.DataFormat, raw, model_path: str | None, label_names: list[str] | None = None):
    """(tokenizer, model, tokenized datasets, collator) for a run, each built from the one before,
    after seeding: the part every training command shares (they differ in init and data)."""
    import transformers

    transformers.set_seed(cfg.training.seed)
    tokenizer = tokenization.load_tokenizer(cfg, model_path, raw, masked=task == tasks.Task.MASKED_LM)
    model = build.build_model(cfg, task, tokenizer, model_path, label_names)
    block_size = build.lm_block_size(model.config, tokenizer, cfg.data.block_size) if fmt == tasks.DataFormat.TEXT else None
    datasets, about = tokenized.datasets_for(task, fmt, raw, tokenizer, block_size, label_names)
    console.info(about)
    if cfg.data.packing:
        from llmcli.data.packing import PackedCollator

        return tokenizer, model, datasets, PackedCollator(tokenizer)
    return tokenizer, model, datasets, tasks.collator(task, fmt, tokenizer, cfg.data.mlm_probability)


def fit(
    run: RunDir,
    cfg: Config,
    model,
    tokenizer,
    datasets,
    collator,
    task: tasks.Task,
    *,
    compute_metrics: Callable | None = None,
    preprocess_logits: Callable | None = None,
    after_train: Callable[[Any], dict[str, Any]] | None = None,
    callbacks: tuple = (),
    trainer_cls: type = Trainer,
    args_cls: type | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train, evaluate, save and summarise. Returns the summary dict (also in summary.json).

    `trainer_cls`/`args_cls`/`trainer_kwargs` plug in another Trainer (e.g. TRL's DPOTrainer with
    DPOConfig and its ref_model); `after_train(trainer)` runs after the final model is saved and
    returns extra summary entries (finetune's per-class report, LoRA's merged model).
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # llmcli draws its own progress; no tqdm bars per checkpoint save
    eval_ds = datasets.get("validation") if hasattr(datasets, "get") else None
    args = training_arguments(cfg, has_eval=eval_ds is not None, args_cls=args_cls)
    is_lm = tasks.spec(task).is_lm
    guard = GracefulStop()
    # the signal guard comes last: it sees the control flow every other callback has set for this step
    every = [MetricsLog(run.path, is_lm), ConsoleProgress(is_lm), *user_callbacks(cfg), *callbacks, guard]
    if cfg.training.curves:
        from llmcli.train.curves import CurvesCallback

        every.insert(1, CurvesCallback(run.path))
    if cfg.training.early_stopping_patience:
        if not args.load_best_model_at_end:
            raise ConfigError("training.early_stopping_patience needs training.load_best_model_at_end=true (and matching eval/save strategies)")
        every.insert(-1, EarlyStoppingCallback(cfg.training.early_stopping_patience, cfg.training.early_stopping_threshold))
    optional = {"data_collator": collator, "compute_metrics": compute_metrics, "preprocess_logits_for_metrics": preprocess_logits}
    trainer = trainer_class(trainer_cls)(
        model=model, args=args, train_dataset=datasets["train"], eval_dataset=eval_ds, processing_class=tokenizer,
        callbacks=every, **{k: v for k, v in optional.items() if v is not None}, **(trainer_kwargs or {}),
    )
    trainer.nan_check = cfg.training.nan_check
    if tasks.spec(task).batch_mean_loss:
        # BERT's and GPT-2's classification heads and BERT's masked-LM head average their loss over the
        # batch and ignore `num_items_in_batch`, but their forward takes **kwargs, so Trainer would assume
        # they divided by the global item count: it multiplied loss and gradient by the number of processes
        # and skipped the division by gradient_accumulation_steps (N x the loss under N processes or steps)
        trainer.model_accepts_loss_kwargs = False
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    _tensorboard_under(trainer, run.path)

    try:
        with guard.installed():
            result = trainer.train(resume_from_checkpoint=str(run.checkpoint) if run.checkpoint else None)
    except Exception:
        run.reached_step = trainer.state.global_step  # for the failed summary.json RunDir writes
        raise
    if guard.signum is not None:
        raise Interrupted(
            guard.signum,
            f"stopped by {signal.Signals(guard.signum).name} at step {trainer.state.global_step}; checkpoint saved in "
            f"{run.path}; run the same command again to resume",
        )

    metrics = _final_eval(trainer, args) if eval_ds is not None else {}
    _save_final_model(trainer, str(run.path))
    if trainer.is_world_process_zero():
        trainer.save_state()
    summary = _summary(trainer, result.metrics, task, resume_step(run.checkpoint))
    summary.update(metrics)
    if "eval_loss" in metrics and is_lm:
        summary["perplexity"] = safe_exp(metrics["eval_loss"])
    if after_train is not None:
        summary.update(after_train(trainer))
    if trainer.state.best_model_checkpoint:
        summary["best_model_checkpoint"] = trainer.state.best_model_checkpoint
    if trainer.is_world_process_zero():
        write_json_atomic(run.path / "summary.json", summary)
    return summary


def user_callbacks(cfg: Config) -> list[TrainerCallback]:
    """`training.callbacks: [module:Class, ...]`: the user's own TrainerCallbacks, built with no arguments."""
    return [tasks.callback_class(ref)() for ref in cfg.training.callbacks]


def _tensorboard_under(trainer, run_path) -> None:
    """`report_to: tensorboard` writes under <run>/tensorboard (Transformers' default is ./runs/<date>)."""
    from transformers.integrations import TensorBoardCallback

    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback) and getattr(cb, "logging_dir", None) is None:
            cb.logging_dir = str(run_path / "tensorboard")


def _save_final_model(trainer, path: str) -> None:
    """The final model at the run dir root, loadable with from_pretrained. Under FSDP with sharded
    checkpoints (SHARDED_STATE_DICT) Trainer.save_model writes nothing: gather a full state dict."""
    if getattr(trainer, "is_fsdp_enabled", False):
        plugin = trainer.accelerator.state.fsdp_plugin
        if "FULL_STATE_DICT" not in str(plugin.state_dict_type):
            plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(path)


def _final_eval(trainer, args) -> dict[str, Any]:
    """The final evaluation, reusing one the schedule already ran at this very step (best model not reloaded)."""
    history = trainer.state.log_history
    last = history[-2] if len(history) > 1 else {}
    if "eval_loss" in last and last.get("step") == trainer.state.global_step and not args.load_best_model_at_end:
        return {k: v for k, v in last.items() if k.startswith("eval_")}
    return trainer.evaluate()


def _summary(trainer, train_metrics: dict[str, Any], task, resumed_from: int | None) -> dict[str, Any]:
    state = trainer.state
    runtime = float(train_metrics.get("train_runtime", 0.0))
    session_tokens = state.num_input_tokens_seen - (getattr(trainer, "_initial_num_input_tokens_seen", 0) or 0)
    return {
        "status": "finished",
        "task": str(task),
        "params": trainer.model.num_parameters() if hasattr(trainer.model, "num_parameters") else None,
        "train_loss": train_metrics.get("train_loss"),
        "global_step": state.global_step,
        "epoch": state.epoch,
        "train_tokens": state.num_input_tokens_seen,
        "train_tokens_per_second": (session_tokens / runtime) if runtime > 0 else None,
        "train_samples_per_second": train_metrics.get("train_samples_per_second"),
        "train_runtime_s": runtime,
        "resumed_from": resumed_from,
    }


def dry_run(cfg: Config, command: str, task: tasks.Task, model_path: str | None, args_cls: type | None = None) -> dict[str, Any]:
    """`--dry-run`: check the arguments as the Trainer would (its own consistency checks), print the
    resolved config (stdout) and what would run (stderr); nothing is written."""
    import yaml

    training_arguments(cfg, has_eval=True, args_cls=args_cls)
    out = output_dir_of(cfg)
    ckpt = latest_checkpoint(out, warn=False) if out.is_dir() else None
    source = source_fingerprint(cfg.data)
    files = {k: [f[0] for f in v] for k, v in source.items() if k != "hub"} or {"hub": source.get("hub")}
    plan = {
        "command": command,
        "task": str(task),
        "model": model_path or f"{cfg.model.model_type} from scratch {cfg.model.config_overrides or ''}".strip(),
        "tokenizer": cfg.model.tokenizer_name or model_path or f"train one (vocab_size={cfg.model.vocab_size})",
        **{k: ", ".join(map(str, v)) if isinstance(v, list) else v for k, v in files.items()},
        "output_dir": str(out),
        "would resume from": str(ckpt) if ckpt else "nothing (fresh start)",
    }
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    console.table("dry run: nothing was trained", list(plan.items()), to_stderr=True)
    return {"dry_run": True, **plan}
