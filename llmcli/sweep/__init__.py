"""The sweep wing: `llmcli sweep` - an Optuna study whose trials are ordinary training runs
(`sweep.py`), the sweep file's schema (`schema.py`), and the leaderboard, best.yaml and plots
(`results.py`).

May import: the core and every wing below it (train and what train builds on). Not report or cli.
"""
