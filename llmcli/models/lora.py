"""LoRA on any model a run trains (peft): adding the adapters, and what a LoRA run dir keeps beside
them - the classifier head's labels (head_config.json) and a merged full model (merged/).
Reading them back is `load.py`'s.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmcli import console, tasks
from llmcli.config import Config
from llmcli.errors import ConfigError
from llmcli.files import write_json_atomic
from llmcli.tasks import Task

HEAD_CONFIG = "head_config.json"  # a LoRA classifier's labels beside its adapter (save_head_config)


def add_lora(model, cfg: Config, task: Task, checkpoint: Path | None):
    """`model` wrapped by peft with `cfg.peft`'s adapters; a resumed run (`checkpoint`) trains the
    same extra modules its checkpoint saved."""
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


def save_head_config(model, run_dir: Path) -> None:
    """A LoRA classifier's head beside its adapter: class, labels and pad token, which the base
    model's config does not have (so an adapter-only load gets the trained labels, not LABEL_0..)."""
    c = model.config
    write_json_atomic(run_dir / HEAD_CONFIG, {"architectures": [type(model).__name__], "id2label": c.id2label,
                                              "label2id": c.label2id, "pad_token_id": c.pad_token_id})


def save_merged(model, tokenizer, run_dir: Path) -> Path:
    """A full model with the LoRA weights folded in, loadable without peft."""
    merged_dir = run_dir / "merged"
    merged = model.merge_and_unload()
    merged.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    return merged_dir
