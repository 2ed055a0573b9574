"""The evaluate wing: `llmcli eval` (`evaluate.py`), LM scoring in rolling and sliding windows
(`perplexity.py`), classification metrics (`metrics.py`), and scoring texts with a classifier or
reward model (`scoring.py`).

May import: the core, data and models. Not generate (a sibling) or any wing above.
"""
