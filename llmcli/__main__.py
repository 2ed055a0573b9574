"""`python -m llmcli ...` (what `accelerate launch -m llmcli` runs on each process)."""

from llmcli.cli import main

main()
