"""The generate wing: `llmcli generate` - batched completions from a causal LM or labels from a
classifier (`generate.py`), prompts read from flags, files or a pipe (`prompts.py`).

May import: the core, data and models. Not evaluate (a sibling) or any wing above.
"""
