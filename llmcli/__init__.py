"""llmcli: train, fine-tune, generate with and evaluate GPT-2 and BERT style models."""

__version__ = "0.1.0"
