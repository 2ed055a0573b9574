"""LoRA on any model a run trains (peft): adding the adapters, and what a LoRA run dir keeps beside
them - the classifier head's labels (head_config.json) and a merged full model (merged/).
Reading them back is `load.py`'s.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmcli import console, models, tasks
from llmcli.config import Config
from llmcli.errors import ConfigError
from llmcli.files import write_json_atomic
from llmcli.tasks import Task

HEAD_CONFIG = "head_config.json"  # a LoRA classifier's labels beside its adapter (save_head_config)


def check_config(cfg: Config, model_type: str) -> None:
    """Before the run dir records the config: LoRA on llmcli's GRU adapts its recurrent weight
    matrices in place (peft's `target_parameters`), which peft allows only without LoRA dropout, so
    the schema's default dropout becomes 0 there and an explicit one is a config error."""
    p = cfg.peft
    if p is None or p.target_modules is not None or not models.is_custom(model_type) or not p.dropout:
        return
    if "dropout" in p.model_fields_set:
        raise ConfigError(f"peft.dropout: LoRA on the {model_type}'s recurrent weights (peft target_parameters) takes no "
                          "dropout; set peft.dropout: 0")
    cfg.peft = p.model_copy(update={"dropout": 0.0})


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
    targets = {"target_modules": p.target_modules}
    if p.target_modules is None and recurrent_weights(model):
        # peft has no default for llmcli's own architectures; a recurrent layer's weights are parameters,
        # not Linear modules, so LoRA adapts them in place (peft's target_parameters)
        targets = {"target_modules": [], "target_parameters": recurrent_weights(model)}
    lora = LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, task_type=task_type,
                      modules_to_save=modules_to_save, **targets)
    try:
        model = get_peft_model(model, lora)
    except ValueError as err:
        raise ConfigError(f"peft.target_modules: {err}") from None
    trainable = sum(x.numel() for x in model.parameters() if x.requires_grad)
    total = sum(x.numel() for x in model.parameters())
    console.info(f"LoRA r={p.r}: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    return model


def recurrent_weights(model) -> list[str]:
    """The input and hidden weight matrices of every recurrent layer (nn.GRU/nn.LSTM/nn.RNN): what
    LoRA adapts in llmcli's GRU when `peft.target_modules` is not set."""
    import torch

    return [f"{name}.{weight}" for name, module in model.named_modules() if isinstance(module, torch.nn.RNNBase)
            for weight, _ in module.named_parameters(recurse=False) if weight.startswith(("weight_ih_l", "weight_hh_l"))]


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
