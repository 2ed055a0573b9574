"""The frozen reference of `dpo` and `rl`: the starting model, which the KL penalty pulls towards.

llmcli makes it itself - a copy of the policy as llmcli built it, before any update (registered
architectures, `model.revision` and the safetensors rule apply as they did to the policy) - and
hands it to TRL, which would otherwise load it again from the policy's path with a loader that
knows only Transformers' built-in types (a GRU policy crashed there). With LoRA there is no copy:
the reference is the base model with the adapters disabled, as in TRL.
"""

from __future__ import annotations

import copy

DROPOUT_ATTRIBUTES = ("dropout", "attention_dropout", "attn_dropout", "dropout_p")


def reference_of(policy):
    """A frozen copy of `policy` in eval mode, or None for a LoRA policy (adapters off is the reference)."""
    if hasattr(policy, "disable_adapter"):
        return None
    reference = copy.deepcopy(policy).eval()
    reference.requires_grad_(False)
    return reference


def disable_dropout(model) -> None:
    """Every dropout off: nn.Dropout modules (as TRL's `disable_dropout_in_model`) and the rates that
    layers hold as numbers - nn.GRU/nn.LSTM between layers, attention dropout in functional calls -
    which TRL's misses. Sampling, policy and reference log-probs then agree: the KL starts at 0."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in DROPOUT_ATTRIBUTES:
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


class AdapterOff:
    """A LoRA policy with its adapters disabled: the reference, called like a model."""

    def __init__(self, peft_model):
        self.peft_model = peft_model

    def __call__(self, **kw):
        with self.peft_model.disable_adapter():
            return self.peft_model(**kw)


def grpo_with_reference(reference) -> type:
    """GRPOTrainer given `reference` instead of loading one: GRPO takes no reference argument, so
    its loader (`create_model_from_path` in TRL's grpo_trainer module) is swapped for the duration
    of the constructor, and the result is checked, so that a TRL that builds it otherwise fails
    loudly rather than training against another model."""
    import trl.trainer.grpo_trainer as grpo

    from llmcli.errors import ConfigError

    if not hasattr(grpo, "create_model_from_path"):
        raise ConfigError("task rl with training.beta > 0: this TRL builds GRPO's reference model in a way llmcli does "
                          "not know (TRL 1.16 to 1.x are supported)")

    class GRPOWithReference(grpo.GRPOTrainer):
        def __init__(self, *args, **kwargs):
            original = grpo.create_model_from_path
            grpo.create_model_from_path = lambda *_, **__: reference
            try:
                super().__init__(*args, **kwargs)
            finally:
                grpo.create_model_from_path = original
            if self.ref_model is not None and self.accelerator.unwrap_model(self.ref_model) is not reference:
                raise RuntimeError("GRPOTrainer did not take llmcli's reference model")

    return GRPOWithReference
