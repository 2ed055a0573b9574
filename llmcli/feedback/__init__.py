"""The feedback wing: what `task: reward | dpo | rl` add to `finetune` - config checks and each TRL
trainer's setup (`setup.py`), rewards for GRPO and the rl before/after measurement (`rewards.py`).

May import: the core, data, models, generate and evaluate. Not train, sweep, report or cli.
"""
