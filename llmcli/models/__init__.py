"""The models wing: resolving and loading models (`load.py`), building one for a run (`build.py`),
LoRA (`lora.py`), which head a task needs (`heads.py`), and llmcli's own architectures, one file each
(`gru.py`), registered here in one place. May import: the core and data. Nothing above.

Each architecture module (e.g. `gru.py`) holds a `PretrainedConfig` with its own `model_type`, and
`PreTrainedModel` classes (+ `GenerationMixin` for LMs). `register()` adds them to Transformers'
Auto classes, after which `AutoConfig.from_pretrained`, `AutoModelForCausalLM.from_pretrained`,
`save_pretrained` and `generate` work on them as on any built-in model, and a saved model dir records
what it is (`model_type`, `architectures` in config.json).

    import llmcli.models
    llmcli.models.register()
    model = AutoModelForCausalLM.from_pretrained("runs/shakespeare-gru")

To add an architecture: write `llmcli/models/<name>.py` (copy `gru.py`), list it in `_MODULES` and its
default task in `CUSTOM_MODELS`. This module imports nothing heavy: `import llmcli` stays torch-free,
and the architecture modules (which import torch) load inside `register()`.
"""

from __future__ import annotations

import importlib

# model_type -> the task llmcli trains it for when the config does not say (`task:`).
CUSTOM_MODELS: dict[str, str] = {
    "gru": "causal-lm",
}

# model_type -> module under llmcli.models. The module names its classes in `AUTO_CLASSES`:
# {"AutoConfig": ConfigClass, "AutoModelForCausalLM": ModelClass, ...}.
_MODULES: dict[str, str] = {
    "gru": "llmcli.models.gru",
}

_registered = False


def register() -> None:
    """Register every custom architecture with the Transformers Auto classes (idempotent)."""
    global _registered
    if _registered:
        return
    import transformers

    for model_type, module_name in _MODULES.items():
        classes = importlib.import_module(module_name).AUTO_CLASSES
        config_class = classes["AutoConfig"]
        transformers.AutoConfig.register(model_type, config_class)
        for auto_name, model_class in classes.items():
            if auto_name != "AutoConfig":
                getattr(transformers, auto_name).register(config_class, model_class)
    _registered = True


def is_custom(model_type: str | None) -> bool:
    return model_type in CUSTOM_MODELS
