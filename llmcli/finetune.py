"""`llmcli finetune`: sequence classification or causal-LM fine-tuning of a pretrained model, or
learning from feedback (`task: reward | dpo | rl`, TRL's trainers: see llmcli/feedback.py).

    llmcli finetune --config configs/sst2.yaml
    llmcli finetune --config configs/sst2-minilm-cpu.yaml --set peft=true
    llmcli finetune --model runs/shakespeare --set data.train_file=more.txt -o runs/more

`task: auto` picks classification when the data has a label column (`data.label_column`, or a
column named `label`), else the model's LM objective. Classification labels may be ints or
strings; names are saved as the model's id2label. Causal-LM data is either plain text (as in
pretrain) or prompt/completion pairs, with the loss on the completion only. `peft:` adds LoRA; the
run dir then holds the adapter, and `merged/` a full model (unless `peft.merge: false`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmcli import console, data, metrics, modeling, tasks
from llmcli.config import Config
from llmcli.dist import is_main_process
from llmcli.errors import ConfigError
from llmcli.runs import RunDir, output_dir_of
from llmcli.sources import RawData, source_fingerprint
from llmcli.tasks import Task


def run(cfg: Config, resume: bool = True, overwrite: bool = False, dry_run: bool = False, callbacks: tuple = ()) -> dict[str, Any]:
    """The whole command; `callbacks` are extra TrainerCallbacks (sweeps add a pruning one)."""
    output_dir_of(cfg)
    if not cfg.model.model_name_or_path:
        raise ConfigError("finetune needs a pretrained model: set model.model_name_or_path or pass --model")
    model_path = modeling.resolve_model_path(cfg.model.model_name_or_path)
    model_config = modeling.load_pretrained_config(model_path, cfg.model)
    source_fingerprint(cfg.data)
    raw = RawData(cfg.data, cfg.training.seed)  # loaded on first use, once for the whole command
    d = cfg.data
    task, fmt = tasks.resolve_task(cfg.task, "finetune", model_config.model_type, raw.columns,
                                   prompt_columns_set=bool(d.prompt_column or d.completion_column),
                                   label_column_set=bool(d.label_column))
    from llmcli import feedback, training

    feedback.check_config(cfg, task)
    if task in tasks.FEEDBACK_TASKS:
        return _run_feedback(cfg, task, raw, model_path, resume, overwrite, dry_run, callbacks)
    if dry_run:
        return training.dry_run(cfg, "finetune", task, model_path)

    with RunDir(cfg, resume, overwrite, protect=model_path) as run_dir:
        if run_dir.finished is not None:
            return run_dir.finished
        label_names = data.label_names_from(raw, modeling.user_labels(model_config)) if task == Task.CLASSIFICATION else None
        tokenizer, model, datasets, collator = training.prepare(cfg, task, fmt, raw, model_path, label_names)
        scoring = tasks.metric_functions(task, label_names)
        if cfg.peft is not None:
            model = _add_lora(model, cfg, task, run_dir.checkpoint)

        def after_train(trainer) -> dict[str, Any]:
            out: dict[str, Any] = {}
            if task == Task.CLASSIFICATION and "validation" in datasets:
                out.update(_classification_report(trainer, datasets["validation"], scoring["compute_metrics"], run_dir.path))
            if cfg.peft is not None and cfg.peft.merge and trainer.is_world_process_zero():
                out["merged_model"] = str(_save_merged(trainer.model, tokenizer, run_dir.path))
            return out

        _save_head_config(model, cfg, task, run_dir.path)
        summary = training.fit(run_dir, cfg, model, tokenizer, datasets, collator, task, after_train=after_train,
                               callbacks=callbacks, **scoring)
    console.summary_table("finetune", cfg.training.output_dir, summary)
    return summary


def _run_feedback(cfg: Config, task: Task, raw: RawData, model_path: str, resume: bool, overwrite: bool, dry_run: bool,
                  callbacks: tuple) -> dict[str, Any]:
    """task reward / dpo / rl: the rows are checked before anything is written; TRL's trainer runs
    through `training.fit` with what `feedback.setup` adds (reward function, before/after numbers)."""
    from llmcli import feedback, preferences, training

    from llmcli import tokenization

    rows, about = preferences.datasets(task, raw)
    tokenizer = tokenization.load_tokenizer(cfg, model_path, raw)  # the model's own: nothing is trained or written
    preferences.check_rows_for(rows, tokenizer)
    if dry_run:
        return training.dry_run(cfg, "finetune", task, model_path)
    with RunDir(cfg, resume, overwrite, protect=model_path) as run_dir:
        if run_dir.finished is not None:
            return run_dir.finished
        if run_dir.checkpoint is not None and (cfg.training.model_extra or {}).get("eval_on_start"):
            # the start was evaluated by the first session (and kept in metrics.jsonl): not again at the resumed step
            cfg.training = cfg.training.model_copy(update={"eval_on_start": False})
        import transformers

        transformers.set_seed(cfg.training.seed)
        model = modeling.build_model(cfg, task, tokenizer, model_path)
        console.info(about)
        if cfg.peft is not None:
            model = _add_lora(model, cfg, task, run_dir.checkpoint)
        s = feedback.setup(task, cfg, model, tokenizer, rows, model_path, run_dir.path)

        def after_train(trainer) -> dict[str, Any]:
            out = s.after_train(trainer) if s.after_train else {}
            if cfg.peft is not None and cfg.peft.merge and trainer.is_world_process_zero():
                out["merged_model"] = str(_save_merged(trainer.model, tokenizer, run_dir.path))
            return out

        _save_head_config(model, cfg, task, run_dir.path)
        summary = training.fit(run_dir, cfg, model, tokenizer, s.datasets, None, task, after_train=after_train,
                               callbacks=callbacks, trainer_cls=tasks.trainer_class(task), args_cls=tasks.args_class(task),
                               trainer_kwargs=s.trainer_kwargs)
    console.summary_table("finetune", cfg.training.output_dir, summary)
    return summary


def _add_lora(model, cfg: Config, task: str, checkpoint: Path | None):
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError:
        raise ConfigError("peft: LoRA needs the peft package: pip install 'llmcli[peft]'") from None
    p = cfg.peft
    task_type = {Task.CLASSIFICATION: TaskType.SEQ_CLS, Task.REWARD: TaskType.SEQ_CLS, Task.CAUSAL_LM: TaskType.CAUSAL_LM,
                 Task.DPO: TaskType.CAUSAL_LM, Task.RL: TaskType.CAUSAL_LM}.get(task)
    if task_type is None:
        raise ConfigError(f"peft: LoRA is supported for classification, causal-lm, reward, dpo and rl, not {task}")
    modules_to_save = None
    if tasks.spec(task).sequence_head:
        # peft trains and saves the head (classifier/score); layers the checkpoint did not hold (BERT's pooler
        # after masked-LM pretraining) start random too, so they are trained and saved with it, or an
        # adapter-only load would draw them afresh. A resumed run keeps what its checkpoint trained (the
        # optimizer state matches those parameters).
        new = getattr(model, "llmcli_new_modules", [])
        if checkpoint is not None and (checkpoint / "adapter_config.json").exists():
            new = json.loads((checkpoint / "adapter_config.json").read_text()).get("modules_to_save") or []
        modules_to_save = [n for n in new if n.split(".")[0] not in ("classifier", "score")] or None
    lora = LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=p.target_modules, task_type=task_type,
                      modules_to_save=modules_to_save)
    try:
        model = get_peft_model(model, lora)
    except ValueError as err:
        raise ConfigError(f"peft.target_modules: {err}") from None
    trainable = sum(x.numel() for x in model.parameters() if x.requires_grad)
    total = sum(x.numel() for x in model.parameters())
    console.info(f"LoRA r={p.r}: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    return model


def _save_head_config(model, cfg: Config, task: str, run_dir: Path) -> None:
    """A LoRA classifier's or reward model's labels and pad token beside its adapter (head_config.json),
    written once the head is final, before training: checkpoints read their run's."""
    if cfg.peft is not None and tasks.spec(task).sequence_head and is_main_process():
        modeling.save_head_config(model.get_base_model(), run_dir)


def _save_merged(model, tokenizer, run_dir: Path) -> Path:
    """A full model with the LoRA weights folded in, loadable without peft."""
    merged_dir = run_dir / "merged"
    merged = model.merge_and_unload()
    merged.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    return merged_dir


def _classification_report(trainer, dataset, scores: metrics.TrainerMetrics, run_dir: Path) -> dict[str, Any]:
    """Per-class metrics and the confusion matrix of the final model on the validation set. `training.fit`
    has just evaluated the final model (or reused an evaluation at this step): its report is `scores`'
    latest. Only when this process ran no evaluation (resumed from a checkpoint at the last step) does
    it predict again."""
    if scores.last_report is None:
        trainer.predict(dataset, metric_key_prefix="final")  # its compute_metrics call fills last_report
    report = scores.last_report
    if trainer.is_world_process_zero():
        metrics.save_confusion_matrix(report, run_dir)
    return {"eval_per_class": report["per_class"], "confusion_matrix": report["confusion_matrix"]}
