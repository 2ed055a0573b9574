"""The train wing: the `pretrain` and `finetune` recipes, the one training path (`fit.py`), what
every run adds to a Trainer (`hooks.py`), the run dir it writes (`rundir.py`), curves.png, and the
`--num-processes` relaunch.

May import: the core, data, models, generate, evaluate and feedback. Not sweep, report or cli.
"""
