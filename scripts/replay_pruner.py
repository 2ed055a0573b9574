"""Replay the sweep's median pruner on the curves of an unpruned sweep: what each setting would prune, and the cost.

A sweep run with `pruner: none` holds every trial's evaluation curve (`trial-NNNN/metrics.jsonl`). Deterministic
trials give the same curve whether or not they are pruned, so feeding those curves, in trial order, to a fresh
in-memory study with a given pruner shows exactly what that pruner would have cut (the pruner is the one
`llmcli sweep` builds, `--startup` = pruner_startup_trials and `--warmup` = pruner_warmup_evals, with values
reported at evaluation 1, 2, ... as the sweep does). Cost is the fraction of evaluations run: trials of equal
length make it the fraction of training time.

    python scripts/replay_pruner.py bench-out/sweep-runs/no-pruning --metric eval_accuracy --startup 1 2 3 --warmup 0 1
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import optuna

from llmcli.sweep import median_pruner


def curves(sweep_dir: Path, metric: str) -> list[list[float]]:
    out = []
    for trial_dir in sorted(sweep_dir.glob("trial-*")):
        rows = [json.loads(line) for line in (trial_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        out.append([r[metric] for r in rows if metric in r])
    return out


def replay(all_curves: list[list[float]], startup: int, warmup: int, maximize: bool) -> dict:
    study = optuna.create_study(direction="maximize" if maximize else "minimize", pruner=median_pruner(startup, warmup))
    run, pruned, total = 0, [], 0
    for number, curve in enumerate(all_curves):
        trial = study.ask()
        total += len(curve)
        for step, value in enumerate(curve, 1):
            trial.report(value, step)
            run += 1
            if step < len(curve) and trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                pruned.append(f"{number}@{step}")
                break
        else:
            study.tell(trial, curve[-1])
    return {"startup": startup, "warmup": warmup, "cost": run / total, "pruned": pruned,
            "best_trial": study.best_trial.number, "best": study.best_value}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--metric", default="eval_accuracy")
    p.add_argument("--minimize", action="store_true")
    p.add_argument("--startup", type=int, nargs="+", default=[1, 2, 3, 5])
    p.add_argument("--warmup", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    all_curves = curves(args.sweep_dir, args.metric)
    unpruned_best = max(c[-1] for c in all_curves) if not args.minimize else min(c[-1] for c in all_curves)
    print(f"{len(all_curves)} trials; best final {args.metric} without pruning: {unpruned_best:.4f}")
    print(f"{'startup':>7} {'warmup':>6} {'cost':>6} {'best':>7} {'best trial':>10}  pruned (trial@evaluation)")
    rows = [replay(all_curves, s, w, not args.minimize) for s, w in itertools.product(args.startup, args.warmup)]
    for r in rows:
        print(f"{r['startup']:>7} {r['warmup']:>6} {r['cost']:>6.3f} {r['best']:>7.4f} {r['best_trial']:>10}  {' '.join(r['pruned'])}")
    print(json.dumps({"sweep_dir": str(args.sweep_dir), "metric": args.metric, "unpruned_best": unpruned_best, "replays": rows}))


if __name__ == "__main__":
    main()
