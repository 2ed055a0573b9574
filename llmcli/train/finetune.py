"""`llmcli finetune`: sequence classification or causal-LM fine-tuning of a pretrained model, or
learning from feedback (`task: reward | dpo | rl`, TRL's trainers: see `llmcli/feedback/`).

    llmcli finetune --config configs/sst2.yaml
    llmcli finetune --config configs/sst2-minilm-cpu.yaml --set peft=true
    llmcli finetune --model runs/shakespeare --set data.train_file=more.txt -o runs/more

`task: auto` picks classification when the data has a label column (`data.label_column`, or a
column named `label`), else the model's LM objective. Classification labels may be ints or
strings; names are saved as the model's id2label. Causal-LM data is either plain text (as in
pretrain) or prompt/completion pairs, with the loss on the completion only. `peft:` adds LoRA; the
run dir then holds the adapter, and `merged/` a full model (unless `peft.merge: false`).

Two recipes build what a run trains - `_supervised` (classification, causal LM) and `_feedback`
(reward, dpo, rl) - and `_train` does the rest for both: the LoRA head config, `fit`, the merge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llmcli import console, tasks
from llmcli.config import Config
from llmcli.data import preferences, tokenization, tokenized
from llmcli.data.sources import RawData, source_fingerprint
from llmcli.dist import is_main_process
from llmcli.errors import ConfigError
from llmcli.evaluate import metrics
from llmcli.models import build, heads, load, lora
from llmcli.tasks import Task
from llmcli.train.rundir import RunDir, output_dir_of


def run(cfg: Config, resume: bool = True, overwrite: bool = False, dry_run: bool = False, callbacks: tuple = ()) -> dict[str, Any]:
    """The whole command; `callbacks` are extra TrainerCallbacks (sweeps add a pruning one)."""
    from llmcli.feedback import setup
    from llmcli.train import fit

    output_dir_of(cfg)
    if not cfg.model.model_name_or_path:
        raise ConfigError("finetune needs a pretrained model: set model.model_name_or_path or pass --model")
    model_path = load.resolve_model_path(cfg.model.model_name_or_path)
    load.check_weights(model_path, cfg.model.allow_pickle)  # before the run dir: a dir without weights writes nothing
    model_config = load.load_pretrained_config(model_path, cfg.model)
    source_fingerprint(cfg.data)
    raw = RawData(cfg.data, cfg.training.seed)  # loaded on first use, once for the whole command
    d = cfg.data
    task, fmt = tasks.resolve_task(cfg.task, "finetune", lambda: heads.default_lm_task(model_config.model_type), raw.columns,
                                   prompt_columns_set=bool(d.prompt_column or d.completion_column),
                                   label_column_set=bool(d.label_column))
    tasks.check_batching(cfg, fmt)
    setup.check_config(cfg, task)
    lora.check_config(cfg, model_config.model_type)
    feedback = task in tasks.FEEDBACK_TASKS
    if feedback:  # the rows are checked before anything is written
        rows, about = preferences.datasets(task, raw)
        tokenizer = tokenization.load_tokenizer(cfg, model_path, raw)  # the model's own: nothing is trained or written
        preferences.check_rows_for(rows, tokenizer)
    if dry_run:
        return fit.dry_run(cfg, "finetune", task, model_path)

    with RunDir(cfg, resume, overwrite, protect=model_path, task=task) as run_dir:
        if run_dir.finished is not None:
            return run_dir.finished
        if feedback:
            plan = _feedback(cfg, task, run_dir, model_path, tokenizer, rows, about)
        else:
            plan = _supervised(cfg, task, fmt, run_dir, model_path, model_config, raw)
        summary = _train(cfg, task, run_dir, plan, callbacks)
    console.summary_table("finetune", cfg.training.output_dir, summary)
    return summary


@dataclass
class _Plan:
    """What a recipe hands to `_train`: the model (LoRA added), its data and the Trainer's extras."""

    model: Any
    tokenizer: Any
    datasets: Any
    collator: Any = None
    after_train: Callable[[Any], dict[str, Any]] | None = None  # extra summary.json entries
    fit_kwargs: dict[str, Any] = field(default_factory=dict)


def _supervised(cfg: Config, task: Task, fmt, run_dir: RunDir, model_path: str, model_config, raw: RawData) -> _Plan:
    """Classification or causal LM: the tokenized rows, the model with its head, the metrics."""
    from llmcli.train import fit

    label_names = tokenized.label_names_from(raw, load.user_labels(model_config)) if task == Task.CLASSIFICATION else None
    tokenizer, model, datasets, collator = fit.prepare(cfg, task, fmt, raw, model_path, label_names)
    if cfg.peft is not None:
        model = lora.add_lora(model, cfg, task, run_dir.checkpoint)
    scoring = metrics.for_trainer(task, label_names)
    plan = _Plan(model, tokenizer, datasets, collator, fit_kwargs=scoring)
    if task == Task.CLASSIFICATION and "validation" in datasets:
        plan.after_train = lambda trainer: _classification_report(trainer, datasets["validation"], scoring["compute_metrics"],
                                                                  run_dir.path)
    return plan


def _feedback(cfg: Config, task: Task, run_dir: RunDir, model_path: str, tokenizer, rows, about: str) -> _Plan:
    """task reward / dpo / rl: TRL's trainer with what `feedback.setup` adds (reward function,
    before/after numbers)."""
    import transformers

    from llmcli.feedback import setup

    if run_dir.checkpoint is not None and (cfg.training.model_extra or {}).get("eval_on_start"):
        # the start was evaluated by the first session (and kept in metrics.jsonl): not again at the resumed step
        cfg.training = cfg.training.model_copy(update={"eval_on_start": False})
    transformers.set_seed(cfg.training.seed)
    model = build.build_model(cfg, task, tokenizer, model_path)
    console.info(about)
    if cfg.peft is not None:
        model = lora.add_lora(model, cfg, task, run_dir.checkpoint)
    s = setup.setup(task, cfg, model, tokenizer, rows, run_dir.path)
    return _Plan(model, tokenizer, s.datasets, after_train=s.after_train,
                 fit_kwargs={"trainer_cls": s.trainer_cls or tasks.trainer_class(task), "args_cls": tasks.args_class(task),
                             "trainer_kwargs": s.trainer_kwargs})


def _train(cfg: Config, task: Task, run_dir: RunDir, plan: _Plan, callbacks: tuple) -> dict[str, Any]:
    """`fit` with the LoRA steps every recipe shares: a classifier's head_config.json beside its
    adapter (written once the head is final, before training: checkpoints read their run's), and
    the merged model after training."""
    from llmcli.train import fit

    if cfg.peft is not None and tasks.spec(task).sequence_head and is_main_process():
        lora.save_head_config(plan.model.get_base_model(), run_dir.path)

    def after_train(trainer) -> dict[str, Any]:
        out = plan.after_train(trainer) if plan.after_train else {}
        if cfg.peft is not None and cfg.peft.merge and trainer.is_world_process_zero():
            out["merged_model"] = str(lora.save_merged(trainer.model, plan.tokenizer, run_dir.path))
        return out

    return fit.fit(run_dir, cfg, plan.model, plan.tokenizer, plan.datasets, plan.collator, task, after_train=after_train,
                   callbacks=callbacks, **plan.fit_kwargs)


def _classification_report(trainer, dataset, scores: metrics.TrainerMetrics, run_dir: Path) -> dict[str, Any]:
    """Per-class metrics and the confusion matrix of the final model on the validation set. `fit`
    has just evaluated the final model (or reused an evaluation at this step): its report is `scores`'
    latest. Only when this process ran no evaluation (resumed from a checkpoint at the last step) does
    it predict again."""
    if scores.last_report is None:
        trainer.predict(dataset, metric_key_prefix="final")  # its compute_metrics call fills last_report
    report = scores.last_report
    if trainer.is_world_process_zero():
        metrics.save_confusion_matrix(report, run_dir)
    return {"eval_per_class": report["per_class"], "confusion_matrix": report["confusion_matrix"]}
