"""llmcli's own architectures (placeholder until the GRU lands): model_type -> the task it trains for."""

CUSTOM_MODELS: dict[str, str] = {}


def register() -> None:
    """Register every architecture with the Auto classes (idempotent)."""
