"""Which head a model has or needs: the Auto class of a task, the LM objective of a model type
(llmcli's own architectures declare theirs in `llmcli.models`), and the task a saved model was
trained for, read from its config.
"""

from __future__ import annotations

from llmcli import models
from llmcli.errors import ConfigError
from llmcli.tasks import Task, spec


def head_class(task: Task):
    """The transformers Auto class for `task`'s head (llmcli's architectures registered with it)."""
    import transformers

    models.register()
    return getattr(transformers, spec(task).auto_class)


def default_lm_task(model_type: str) -> Task:
    """The LM objective a model type trains with: its own declaration (llmcli.models), else causal
    when Transformers has a causal-LM head for it, else masked. An unknown type is a config error."""
    if model_type in models.CUSTOM_MODELS:
        return Task(models.CUSTOM_MODELS[model_type])
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return Task.CAUSAL_LM
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return Task.MASKED_LM
    if model_type in CONFIG_MAPPING_NAMES:
        raise ConfigError(f"model.model_type: '{model_type}' has no causal-LM or masked-LM head; set task: "
                          f"({', '.join(t.value for t in Task)}) or pick another model type")
    known = sorted(set(models.CUSTOM_MODELS) | {"gpt2", "bert", "llama", "roberta", "gpt_neox", "qwen2"})
    raise ConfigError(f"model.model_type: unknown model type '{model_type}' (e.g. {', '.join(known)}; "
                      "llmcli.models lists llmcli's own architectures); task: one of auto, "
                      f"{', '.join(t.value for t in Task)}")


def task_of_model(config) -> Task:
    """The task a saved model was trained for, from its recorded architecture (a reward model is a
    one-output sequence classifier: `classification` here, told apart by `is_reward_model`)."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return Task.CLASSIFICATION
    if any(a.endswith("ForMaskedLM") for a in archs):
        return Task.MASKED_LM
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return Task.CAUSAL_LM
    return default_lm_task(config.model_type)


def is_reward_model(config) -> bool:
    """A sequence classifier with one output: a reward model (`task: reward`), scored by its logit."""
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith("ForSequenceClassification") for a in archs) and getattr(config, "num_labels", 2) == 1
