"""The data wing: raw sources (files, hub), tokenized datasets, the on-disk cache, tokenizers, and
preference/prompt rows for the feedback tasks.

May import: the core (config, tasks, errors, console, files, dist, layout). Nothing else of llmcli.
"""
