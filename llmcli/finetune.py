"""`llmcli finetune`: sequence classification or causal-LM fine-tuning of a pretrained model.

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

from pathlib import Path
from typing import Any

from llmcli import console, data, metrics, modeling
from llmcli.config import Config
from llmcli.errors import ConfigError


def run(cfg: Config, resume: bool = True, overwrite: bool = False, dry_run: bool = False, callbacks: tuple = ()) -> dict[str, Any]:
    """The whole command; `callbacks` are extra TrainerCallbacks (sweeps add a pruning one)."""
    from llmcli import training

    training.output_dir_of(cfg)
    if not cfg.model.model_name_or_path:
        raise ConfigError("finetune needs a pretrained model: set model.model_name_or_path or pass --model")
    model_path = modeling.resolve_model_path(cfg.model.model_name_or_path)
    model_config = modeling.load_pretrained_config(model_path, cfg.model)
    data.source_fingerprint(cfg.data)
    task = _task(cfg, model_config.model_type, training.seed_of(cfg))
    if dry_run:
        return training.dry_run(cfg, "finetune", task, model_path)

    with training.RunDir(cfg, resume, overwrite) as run_dir:
        import transformers

        seed = training.seed_of(cfg)
        transformers.set_seed(seed)
        tokenizer = modeling.load_tokenizer(cfg, model_path)
        extra: dict[str, Any] = {}
        if task == "classification":
            label_names = data.label_names_from(data.load_raw(cfg.data, seed), cfg.data, modeling.user_labels(model_config))
            model = modeling.build_model(cfg, task, tokenizer, model_path, label_names)
            datasets = data.classification_datasets(cfg.data, tokenizer, label_names, seed)
            tokenizer.padding_side = "right"  # absolute position embeddings (BERT, GPT-2) must start at 0
            collator = transformers.DataCollatorWithPadding(tokenizer)
            extra = dict(compute_metrics=metrics.trainer_metrics(label_names), preprocess_logits=metrics.argmax_logits)
            console.info(f"classification into {len(label_names)} labels ({', '.join(label_names[:10])}) on {len(datasets['train']):,} examples")
        elif _is_instruction_data(cfg, seed):
            model = modeling.build_model(cfg, task, tokenizer, model_path)
            datasets = data.instruction_datasets(cfg.data, tokenizer, seed)
            collator = transformers.DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
            console.info(f"prompt/completion fine-tuning on {len(datasets['train']):,} pairs (loss on completions only)")
        else:
            model = modeling.build_model(cfg, task, tokenizer, model_path)
            datasets, collator, about = training.lm_data(cfg, model, tokenizer, task == "masked-lm", seed)
            console.info(f"{task} fine-tuning on {about}")
        if cfg.peft is not None:
            model = _add_lora(model, cfg, task)

        def after_train(trainer) -> dict[str, Any]:
            out: dict[str, Any] = {}
            if task == "classification" and "validation" in datasets:
                out.update(_classification_report(trainer, datasets["validation"], label_names, run_dir.path))
            if cfg.peft is not None and cfg.peft.merge and trainer.is_world_process_zero():
                out["merged_model"] = str(_save_merged(trainer.model, tokenizer, run_dir.path))
            return out

        return training.fit(run_dir, cfg, model, tokenizer, datasets, collator, task, after_train=after_train, callbacks=callbacks, **extra)


def _task(cfg: Config, model_type: str, seed: int) -> str:
    if cfg.task != "auto":
        return cfg.task
    if cfg.data.label_column:
        return "classification"
    if cfg.data.prompt_column or cfg.data.completion_column:
        return "causal-lm"
    columns = next(iter(data.load_raw(cfg.data, seed).values())).column_names
    if "label" in columns or "labels" in columns:
        return "classification"
    return "masked-lm" if modeling.is_masked_lm_type(model_type) else "causal-lm"


def _is_instruction_data(cfg: Config, seed: int) -> bool:
    if cfg.data.prompt_column or cfg.data.completion_column:
        return True
    raw = data.load_raw(cfg.data, seed)
    columns = next(iter(raw.values())).column_names
    return "prompt" in columns and "completion" in columns


def _add_lora(model, cfg: Config, task: str):
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError:
        raise ConfigError("peft: LoRA needs the peft package: pip install 'llmcli[peft]'") from None
    p = cfg.peft
    task_type = {"classification": TaskType.SEQ_CLS, "causal-lm": TaskType.CAUSAL_LM}.get(task)
    if task_type is None:
        raise ConfigError(f"peft: LoRA is supported for classification and causal-lm, not {task}")
    lora = LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=p.target_modules, task_type=task_type)
    try:
        model = get_peft_model(model, lora)
    except ValueError as err:
        raise ConfigError(f"peft.target_modules: {err}") from None
    trainable = sum(x.numel() for x in model.parameters() if x.requires_grad)
    total = sum(x.numel() for x in model.parameters())
    console.info(f"LoRA r={p.r}: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    return model


def _save_merged(model, tokenizer, run_dir: Path) -> Path:
    """A full model with the LoRA weights folded in, loadable without peft."""
    merged_dir = run_dir / "merged"
    merged = model.merge_and_unload()
    merged.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    return merged_dir


def _classification_report(trainer, dataset, label_names: list[str], run_dir: Path) -> dict[str, Any]:
    """Per-class metrics and the confusion matrix of the final model on the validation set."""
    prediction = trainer.predict(dataset, metric_key_prefix="final")
    preds = prediction.predictions
    if preds.ndim > 1:
        preds = preds.argmax(-1)
    report = metrics.classification_report(prediction.label_ids, preds, label_names)
    if trainer.is_world_process_zero():
        metrics.save_confusion_matrix(report, run_dir)
    return {"eval_per_class": report["per_class"], "confusion_matrix": report["confusion_matrix"]}
