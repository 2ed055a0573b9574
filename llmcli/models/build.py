"""Building the model a training run starts from: from scratch (`model_type` + `config_overrides`)
or from a pretrained checkpoint, with the head its task needs; the LM block size it can take.
"""

from __future__ import annotations

from typing import Any

from llmcli import console, tasks
from llmcli.config import Config, ModelSection
from llmcli.errors import ConfigError, first_line
from llmcli.models import heads
from llmcli.models.load import (check_vocab, check_weights, context_is_a_limit, context_length, load_kwargs,
                                load_pretrained_config)
from llmcli.tasks import Task

REWARD_LABELS = ["reward"]  # a reward model: one output, its score (heads.is_reward_model)


def build_model(cfg: Config, task: str, tokenizer, model_path: str | None, label_names: list[str] | None = None):
    """From scratch (no model path) or from_pretrained, with the head `task` needs."""
    m = cfg.model
    head = heads.head_class(task)
    if model_path is None:
        config = scratch_config(m)
        vocab = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
        multiple = m.pad_vocab_to_multiple_of
        config.vocab_size = ((vocab + multiple - 1) // multiple) * multiple
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            token_id = getattr(tokenizer, attr, None)
            if token_id is not None:
                setattr(config, attr, token_id)
        if tasks.spec(task).sequence_head:
            _set_labels(config, REWARD_LABELS if task == Task.REWARD else label_names)
        if m.attn_implementation:
            config._attn_implementation = m.attn_implementation
        model = head.from_config(config)
        console.info(f"built {m.model_type} from scratch: {_count(model) / 1e6:.2f}M parameters, vocab {config.vocab_size} (tokenizer {vocab})")
        return model

    check_weights(model_path, m.allow_pickle)
    config = load_pretrained_config(model_path, m)
    if m.config_overrides:
        _apply_overrides(config, m.config_overrides)
    kwargs = load_kwargs(m, config=config)
    if tasks.spec(task).sequence_head:
        _set_labels(config, REWARD_LABELS if task == Task.REWARD else label_names)
        if config.pad_token_id is None and tokenizer.pad_token_id is not None:
            config.pad_token_id = tokenizer.pad_token_id  # GPT2ForSequenceClassification finds the last non-pad token
    if task == Task.REWARD:
        kwargs["ignore_mismatched_sizes"] = True  # a classifier may start a reward model: its head is replaced
    try:
        model, loaded = head.from_pretrained(model_path, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as err:
        raise ConfigError(f"could not load model '{model_path}': {first_line(err)}") from None
    check_vocab(model, tokenizer)
    # the modules the checkpoint did not hold start random (a new head; BERT's pooler after masked-LM
    # pretraining): LoRA must train and save them with the adapter (lora.add_lora)
    new = [k if isinstance(k, str) else k[0] for k in [*loaded["missing_keys"], *loaded["mismatched_keys"]]]
    model.llmcli_new_modules = sorted({k.rsplit(".", 1)[0] for k in new if "." in k})
    return model


def scratch_config(m: ModelSection):
    """The architecture config of a from-scratch model: `model_type` + `config_overrides`, checked
    (commands call it before touching the run dir, so a bad override is exit 2 with nothing written)."""
    from transformers import AutoConfig

    from llmcli import models

    models.register()
    try:
        config = AutoConfig.for_model(m.model_type)
    except ValueError:
        raise ConfigError(f"model.model_type: unknown model type '{m.model_type}' (e.g. gpt2, bert, llama)") from None
    _apply_overrides(config, m.config_overrides)
    return config


def _apply_overrides(config, overrides: dict[str, Any]) -> None:
    known = set(config.to_dict()) | set(getattr(config, "attribute_map", {}))
    for key, value in overrides.items():
        if key not in known:
            import difflib

            match = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{match[0]}'?)" if match else ""
            raise ConfigError(f"unknown config key 'model.config_overrides.{key}' for {config.model_type}{hint}")
        try:
            setattr(config, key, value)  # strict (dataclass) configs check types on assignment
        except Exception as err:
            raise ConfigError(f"model.config_overrides.{key}: {str(err).strip().splitlines()[-1].strip()}") from None
    if hasattr(config, "validate_architecture"):
        try:
            config.validate_architecture()
        except Exception as err:
            raise ConfigError(f"model.config_overrides: {str(err).strip().splitlines()[-1].strip()}") from None


def _set_labels(config, label_names: list[str] | None) -> None:
    if not label_names:
        return
    config.num_labels = len(label_names)
    config.id2label = {i: name for i, name in enumerate(label_names)}
    config.label2id = {name: i for i, name in enumerate(label_names)}


def lm_block_size(model_config, tokenizer, requested: int | None) -> int:
    """The LM block size: `data.block_size` checked against the model's context, else the model's
    context (at most 1024 and the tokenizer's `model_max_length`)."""
    limit = context_length(model_config)
    if requested is None:
        limit = limit or 1024
        return min(1024, limit, getattr(tokenizer, "model_max_length", limit) or limit)
    if limit is not None and requested > limit and context_is_a_limit(model_config):
        raise ConfigError(f"data.block_size={requested} is larger than the model's context ({limit} positions)")
    return requested


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())
