"""What a run trains: one `Task` enum, one table of what each task needs, one resolver.

The task decides the model head (an Auto class, named here and built by `models/heads.py`), the
collator, the main metric and the Trainer and arguments classes. `resolve_task` is the only place
that works it out from the config, the model's own LM objective and the data's columns. Part of the
core, so it imports no wing; stdlib-only at import: the schema uses `Task`, and `llmcli --help` must
not load torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable

from llmcli.errors import ConfigError


class Task(str, Enum):
    CAUSAL_LM = "causal-lm"
    MASKED_LM = "masked-lm"
    CLASSIFICATION = "classification"
    REWARD = "reward"  # pairwise reward model (TRL RewardTrainer)
    DPO = "dpo"  # direct preference optimisation of a causal LM (TRL DPOTrainer)
    RL = "rl"  # online policy gradient of a causal LM against a reward (TRL GRPOTrainer)

    def __str__(self) -> str:
        return self.value


class DataFormat(str, Enum):
    TEXT = "text"  # concatenated and cut into blocks (LM objectives)
    PROMPT_COMPLETION = "prompt-completion"  # one example per row, loss on the completion only
    LABELLED = "labelled"  # text (and text pair) with a label per row
    PREFERENCE = "preference"  # prompt? + chosen + rejected per row (reward, dpo)
    PROMPTS = "prompts"  # prompts only: the policy writes the completions (rl)


@dataclass(frozen=True)
class TaskSpec:
    auto_class: str  # transformers Auto class for the head
    is_lm: bool  # eval loss is a token loss: perplexity is reported
    main_metric: str  # what a run's one-line summary reports
    args_class: str = "transformers:TrainingArguments"  # the Trainer's arguments class (checks `training:` keys)
    trainer_class: str = "transformers:Trainer"
    commands: tuple[str, ...] = ("pretrain", "finetune")
    # the head's loss is a plain batch mean that ignores Trainer's `num_items_in_batch` (train/fit.py)
    batch_mean_loss: bool = False

    @property
    def sequence_head(self) -> bool:
        """A classifier head (labels in the config, a pad token to find the last token, LoRA's SEQ_CLS)."""
        return self.auto_class == "AutoModelForSequenceClassification"


SPECS: dict[Task, TaskSpec] = {
    Task.CAUSAL_LM: TaskSpec("AutoModelForCausalLM", is_lm=True, main_metric="eval_loss"),
    Task.MASKED_LM: TaskSpec("AutoModelForMaskedLM", is_lm=True, main_metric="eval_loss", batch_mean_loss=True),
    Task.CLASSIFICATION: TaskSpec("AutoModelForSequenceClassification", is_lm=False, main_metric="eval_accuracy",
                                  commands=("finetune",), batch_mean_loss=True),
    # learning from feedback (llmcli.feedback): TRL's trainers, each with its own config class
    Task.REWARD: TaskSpec("AutoModelForSequenceClassification", is_lm=False, main_metric="eval_accuracy",
                          args_class="trl:RewardConfig", trainer_class="trl:RewardTrainer", commands=("finetune",)),
    Task.DPO: TaskSpec("AutoModelForCausalLM", is_lm=False, main_metric="eval_rewards/accuracies",
                       args_class="trl:DPOConfig", trainer_class="trl:DPOTrainer", commands=("finetune",)),
    Task.RL: TaskSpec("AutoModelForCausalLM", is_lm=False, main_metric="reward_after",
                      args_class="trl:GRPOConfig", trainer_class="trl:GRPOTrainer", commands=("finetune",)),
}

FEEDBACK_TASKS = frozenset({Task.REWARD, Task.DPO, Task.RL})


def spec(task: Task) -> TaskSpec:
    return SPECS[Task(task)]


def load_object(ref: str) -> Any:
    """'module:attr' -> the object (classes of the task table, user callbacks, reward functions). A
    user's module is found next to the config, in the current directory, as `python -m llmcli`
    would find it: one rule for `training.callbacks` and `reward.function`."""
    import os
    import sys

    module, _, attr = ref.partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"cannot import '{ref}': {err}") from None
    finally:
        if added:
            sys.path.remove(cwd)
    return obj


def callback_class(ref: str) -> type:
    """A user's TrainerCallback class named 'module:Class' (`training.callbacks`)."""
    from transformers import TrainerCallback

    cls = load_object(ref)
    if not (isinstance(cls, type) and issubclass(cls, TrainerCallback)):
        raise ConfigError(f"training.callbacks: '{ref}' is not a transformers.TrainerCallback class")
    return cls


def args_class(task: Task | str):
    return _trl_checked(task, spec(task).args_class) if task != "auto" else load_object("transformers:TrainingArguments")


def trainer_class(task: Task):
    return _trl_checked(task, spec(task).trainer_class)


def _trl_checked(task, ref: str):
    """The class `ref`; TRL's with a one-line install hint when TRL is missing."""
    if ref.startswith("trl:"):
        import importlib.util

        if importlib.util.find_spec("trl") is None:
            raise ConfigError(f"task: {task} trains with TRL, which is not installed: pip install 'llmcli[feedback]'")
    return load_object(ref)


# --------------------------------------------------------------------------------------------
# Resolving the task


def resolve_task(requested: str, command: str, lm_task: Callable[[], Task], columns: Callable[[], list[str]] | None = None,
                 prompt_columns_set: bool = False, label_column_set: bool = False) -> tuple[Task, DataFormat]:
    """(task, data format) for a run. `lm_task()` is the model's own LM objective
    (`models.heads.default_lm_task`), `columns()` lists the training data's columns; each is asked
    only when needed."""
    if requested != "auto":
        task = Task(requested)
        if command not in spec(task).commands:
            raise ConfigError(f"task: {task} is for `llmcli {' / '.join(spec(task).commands)}`, not `llmcli {command}`")
    elif command == "finetune" and (label_column_set or (not prompt_columns_set and _has_label_column(columns))):
        task = Task.CLASSIFICATION
    else:
        task = lm_task()
    return task, _data_format(task, command, columns, prompt_columns_set)


def _has_label_column(columns) -> bool:
    return columns is not None and any(c in ("label", "labels") for c in columns())


def _data_format(task: Task, command: str, columns, prompt_columns_set: bool) -> DataFormat:
    if task in (Task.REWARD, Task.DPO):
        return DataFormat.PREFERENCE
    if task == Task.RL:
        return DataFormat.PROMPTS
    if task == Task.CLASSIFICATION:
        return DataFormat.LABELLED
    if task == Task.CAUSAL_LM and command == "finetune":
        if prompt_columns_set or (columns is not None and {"prompt", "completion"} <= set(columns())):
            return DataFormat.PROMPT_COMPLETION
    return DataFormat.TEXT


# --------------------------------------------------------------------------------------------
# What a task trains with


def collator(task: Task, fmt: DataFormat, tokenizer, mlm_probability: float):
    """The batch collator: LM blocks are full length and carry their labels (run_clm.py); masked
    blocks are masked on the fly; rows are padded dynamically (right-padded: absolute position
    embeddings of BERT/GPT-2 must start at 0)."""
    import transformers

    if fmt in (DataFormat.PREFERENCE, DataFormat.PROMPTS):
        return None  # TRL's trainers bring their own collators
    if fmt == DataFormat.LABELLED:
        tokenizer.padding_side = "right"
        return transformers.DataCollatorWithPadding(tokenizer)
    if fmt == DataFormat.PROMPT_COMPLETION:
        return transformers.DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    if task == Task.MASKED_LM:
        return transformers.DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability)
    return transformers.default_data_collator


def check_batching(cfg, fmt: DataFormat) -> None:
    """How rows become batches. `data.packing` packs prompt/completion rows (`data/packing.py`) and
    nothing else. Labelled rows (classification) of similar length are batched together unless
    `training.train_sampling_strategy` is set (`random` turns it off): Trainer's `group_by_length`
    sampler, a seeded shuffle, then rows sorted by length inside mega-batches of up to 50 batches, which
    cuts the padding that random batches of short and long rows carry. Prompt/completion rows keep
    random batches unless asked: grouped, one of three seeds of `scripts/bench_sft.py` hit a loss spike
    (a batch of like rows, gradient norm 145) and ended 0.9 above the others' eval loss, while packing
    cuts the padding and matched random batches' loss on every seed. A stream has no lengths to group
    by. Set in the config, so the run's config.yaml records it."""
    if cfg.data.packing and fmt != DataFormat.PROMPT_COMPLETION:
        raise ConfigError(f"data.packing=true packs prompt/completion rows for causal-LM fine-tuning; this run's data is {fmt.value}"
                          + (" (text is already cut into full blocks)" if fmt == DataFormat.TEXT else ""))
    if cfg.data.packing and cfg.data.streaming:
        raise ConfigError("data.packing=true needs the whole training set to pack (set data.streaming=false)")
    if fmt != DataFormat.LABELLED or cfg.data.streaming:
        return
    if "train_sampling_strategy" not in (cfg.training.model_extra or {}):
        cfg.training = cfg.training.model_copy(update={"train_sampling_strategy": "group_by_length"})


def check_training_keys(training: dict[str, Any], args_cls: type | None = None) -> dict[str, Any]:
    """Check every `training:` key against the fields and declared types of `args_cls`
    (TrainingArguments, or a subclass such as TRL's DPOConfig).

    Returns the dict with values converted where YAML gave a string for a number
    (PyYAML reads `5e-4` as a string).
    """
    import dataclasses
    import typing

    if args_cls is None:
        from transformers import TrainingArguments as args_cls

    fields = {f.name for f in dataclasses.fields(args_cls) if f.init}
    return check_training_values(training, fields, typing.get_type_hints(args_cls), args_cls.__name__)


def check_training_values(training: dict[str, Any], fields: set[str], hints: dict[str, Any], class_name: str) -> dict[str, Any]:
    """`check_training_keys` given the class's field names and declared types rather than the class
    (`llmcli init --from` reads them from TrainingArguments' source); a field without a type in
    `hints` has its name checked only."""
    from pydantic import TypeAdapter, ValidationError

    from llmcli.config import TrainingSection, suggest

    out = dict(training)
    for key, value in training.items():
        if key in TrainingSection.LLMCLI_KEYS:
            continue
        if key not in fields:
            raise ConfigError(f"unknown config key 'training.{key}': not a {class_name} field{suggest(key, fields | TrainingSection.LLMCLI_KEYS)}")
        if value is None or key not in hints:
            continue
        if isinstance(value, bool) and _admits_str_not_bool(hints[key]):
            # YAML 1.1 reads `save_strategy: no` as False; these fields mean the string
            value = out[key] = "no" if value is False else "yes"
        try:
            converted = TypeAdapter(hints[key]).validate_python(value)
        except ValidationError:
            expected = getattr(hints[key], "__name__", None) or str(hints[key]).replace("typing.", "")
            raise ConfigError(f"config key 'training.{key}': expected {expected}, got {value!r}") from None
        if isinstance(value, str) and not isinstance(converted, str):
            out[key] = converted.value if hasattr(converted, "value") else converted
    return out


def _admits_str_not_bool(annotation) -> bool:
    import typing

    args = typing.get_args(annotation) or (annotation,)
    return str in args and bool not in args
