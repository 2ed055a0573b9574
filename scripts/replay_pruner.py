"""Replay the sweep's median pruner on the curves of an unpruned sweep: what each setting would prune, and the cost.

A sweep run with `pruner: none` still reports every trial's evaluations to its study (`<sweep>/study.db`):
the values the pruner sees, as evaluation 1, 2, ... (perplexity included). Deterministic trials give the
same curve whether or not they are pruned, so feeding those curves, in the order the trials started, to a
fresh in-memory study shows exactly what a pruner would have cut. The pruner is the one `llmcli sweep`
builds (`--startup` = pruner_startup_trials, `--warmup` = pruner_warmup_evals); the metric and direction
are the sweep's own. As in the sweep, a trial's last evaluation never prunes it.

`cost` is the share of evaluations that would run: a lower bound on the share of time, since model loading
and each evaluation cost the same in a pruned trial, and trials of different lengths count by evaluations.

    python scripts/replay_pruner.py bench-out/sweep-runs/no-pruning --startup 1 2 3 5 --warmup 0 1 2
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import optuna
from optuna.trial import TrialState

from llmcli.sweep.study import median_pruner


def load(sweep_dir: Path, storage: str | None) -> tuple[optuna.Study, list[list[float]]]:
    """The sweep's study and its finished trials' reported curves, in the order the trials started."""
    url = storage or f"sqlite:///{sweep_dir.resolve() / 'study.db'}"
    names = [s.study_name for s in optuna.get_all_study_summaries(url)]
    if len(names) != 1:
        raise SystemExit(f"{url} holds {len(names)} studies ({', '.join(names)}); this script replays one")
    study = optuna.load_study(study_name=names[0], storage=url)
    trials = sorted((t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE), key=lambda t: t.datetime_start)
    if len(trials) < len(study.trials):
        print(f"note: {len(study.trials) - len(trials)} trial(s) not COMPLETE are left out: replay an unpruned, finished sweep")
    return study, [[t.intermediate_values[s] for s in sorted(t.intermediate_values)] for t in trials]


def replay(curves: list[list[float]], direction: str, startup: int, warmup: int) -> dict:
    study = optuna.create_study(direction=direction, pruner=median_pruner(startup, warmup))
    ran, total, pruned = 0, 0, []
    for number, curve in enumerate(curves):
        trial = study.ask()
        total += len(curve)
        for step, value in enumerate(curve, 1):
            trial.report(value, step)
            ran += 1
            if step < len(curve) and trial.should_prune():
                study.tell(trial, state=TrialState.PRUNED)
                pruned.append(f"{number}@{step}")
                break
        else:
            study.tell(trial, curve[-1])
    return {"startup": startup, "warmup": warmup, "cost": ran / total, "pruned": pruned,
            "best_trial": study.best_trial.number, "best": study.best_value}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--storage", help="the sweep's --storage URL, if not <sweep_dir>/study.db")
    p.add_argument("--startup", type=int, nargs="+", default=[1, 2, 3, 5])
    p.add_argument("--warmup", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, curves = load(args.sweep_dir, args.storage)
    sweep = study.user_attrs.get("sweep") or {}
    metric, direction = sweep.get("metric", "the metric"), study.direction.name.lower()
    finals = [c[-1] for c in curves]
    unpruned = max(finals) if direction == "maximize" else min(finals)
    print(f"{len(curves)} trials; {metric} ({direction}), best without pruning: {unpruned:.4f}")
    print(f"{'startup':>7} {'warmup':>6} {'cost':>6} {'best':>7} {'best trial':>10}  pruned (trial@evaluation)")
    rows = [replay(curves, direction, s, w) for s, w in itertools.product(args.startup, args.warmup)]
    for r in rows:
        print(f"{r['startup']:>7} {r['warmup']:>6} {r['cost']:>6.3f} {r['best']:>7.4f} {r['best_trial']:>10}  {' '.join(r['pruned'])}")
    print(json.dumps({"sweep_dir": str(args.sweep_dir), "metric": metric, "direction": direction, "unpruned_best": unpruned,
                      "replays": rows}))


if __name__ == "__main__":
    main()
