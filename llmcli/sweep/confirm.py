"""Results you can believe: the sweep's best trials re-run with more seeds, and the winner measured
on a held-out test file.

One seed's ranking of fine-tuning runs moves by about as much as tuning gains, so with
`confirm: {top_k, seeds}` the top_k completed trials (ranked on the validation metric, once no
search trial is running or waiting) are run again with `training.seed` set to each seed; a seed
equal to the trial's own reuses its run. The re-runs are trials of a second study in the same
storage, `<study>-confirm`, whose trials carry `confirm_of` (the search trial) and `seed`: workers
claim them as they claim search trials (Optuna's WAITING queue), a killed one resumes from its
checkpoint, and the search study's sampler, pruner and best trial never see them. Each runs in
`<sweep>/trial-NNNN-seed-S/`. The leaderboard ranks confirmed trials by their mean (± sample std)
and best.yaml is the best mean.

With `test_file`, the winner's run dirs (each seed's, with confirm) are evaluated on it with
`llmcli eval`'s code path after the sweep; the result is kept in each run dir's `test.json`.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from llmcli import console, files
from llmcli.config import load_config
from llmcli.sweep.schema import SweepConfig, param_override

LIVE = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)


def trial_dir(sweep_dir: Path, trial) -> Path:
    """A search trial's run dir `trial-NNNN`, or a confirm run's `trial-NNNN-seed-S`."""
    a = trial.user_attrs
    if "confirm_of" in a:
        return sweep_dir / f"trial-{int(a['confirm_of']):04d}-seed-{a['seed']}"
    return sweep_dir / f"trial-{trial.number:04d}"


def confirm_study(study, create: bool = False):
    """The study of the confirm runs in the search study's storage; None until one is created."""
    name = f"{study.study_name}-confirm"
    if create:
        confirm = optuna.create_study(storage=study._storage, study_name=name, direction=study.direction,
                                      pruner=optuna.pruners.NopPruner(), load_if_exists=True)
        if confirm.user_attrs.get("confirms") != study.study_name:
            confirm.set_user_attr("confirms", study.study_name)  # `llmcli report` tells the two apart
        return confirm
    try:
        return optuna.load_study(study_name=name, storage=study._storage)
    except KeyError:
        return None


def search_done(study) -> bool:
    return not study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))


def top_trials(study, k: int) -> list:
    """The k best completed search trials, ties by trial number."""
    sign = -1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    return sorted(done, key=lambda t: (sign * t.value, t.number))[:k]


def seeds_of(sweep: SweepConfig, overrides: list[str], trials: list) -> list[int]:
    """The training.seed each search trial ran with: its searched value, else the base config's (read once)."""
    base = None if all("training.seed" in t.params for t in trials) else load_config(sweep.base, overrides).training.seed
    return [int(t.params["training.seed"]) if "training.seed" in t.params else base for t in trials]


def runs_of(confirm, source: int, seed: int) -> list:
    """The confirm trials of one (search trial, seed), surplus duplicates left out, by number."""
    if confirm is None:
        return []
    return [t for t in confirm.get_trials(deepcopy=False)
            if t.user_attrs.get("confirm_of") == source and t.user_attrs.get("seed") == seed and not t.user_attrs.get("surplus")]


def needed(runs: list) -> bool:
    """Whether a (trial, seed) needs a run: none done, running or queued, and not given up (a second
    failure, or a divergence, which is a result)."""
    failed = [t for t in runs if t.state == TrialState.FAIL]
    return not any(t.state in LIVE for t in runs) and len(failed) < 2 and not any(t.user_attrs.get("diverged") for t in failed)


def claim(study, sweep: SweepConfig, overrides: list[str]):
    """Queue the confirm runs still needed and claim one: (confirm study, trial, the search trial), or
    None when none is left to claim. Two workers may queue the same run at once; the later-numbered
    copy is marked surplus when claimed, so each (trial, seed) runs once."""
    confirm = confirm_study(study, create=True)
    top = top_trials(study, sweep.confirm.top_k)
    for source, mine in zip(top, seeds_of(sweep, overrides, top)):
        for seed in sweep.confirm.seeds:
            if seed != mine and needed(runs_of(confirm, source.number, seed)):
                confirm.enqueue_trial({}, user_attrs={"confirm_of": source.number, "seed": seed}, skip_if_exists=False)
    while confirm.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial = confirm.ask()
        a = trial.user_attrs
        earlier = [t for t in runs_of(confirm, a.get("confirm_of"), a.get("seed"))
                   if t.number < trial.number and t.state in LIVE]
        if "confirm_of" not in a or earlier:  # another worker claimed the last one, or queued it first
            trial.set_user_attr("surplus", True)
            confirm.tell(trial, state=TrialState.FAIL)
            continue
        return confirm, trial, next(t for t in study.get_trials(deepcopy=False) if t.number == a["confirm_of"])
    return None


def confirmed(study, sweep: SweepConfig, overrides: list[str], sweep_dir: Path) -> dict[int, dict[str, Any]]:
    """Search trial -> its seeds' values and run dirs, mean, sample std (None for one value) and n."""
    if sweep.confirm is None:
        return {}
    confirm = confirm_study(study)
    out = {}
    top = top_trials(study, sweep.confirm.top_k)
    for source, mine in zip(top, seeds_of(sweep, overrides, top)):
        values, dirs, pending = {}, {}, []
        for seed in sweep.confirm.seeds:
            if seed == mine:
                values[seed], dirs[seed] = source.value, str(trial_dir(sweep_dir, source))
                continue
            runs = runs_of(confirm, source.number, seed)
            done = [t for t in runs if t.state == TrialState.COMPLETE]
            if done:
                values[seed], dirs[seed] = done[0].value, str(trial_dir(sweep_dir, done[0]))
            elif not runs or any(t.state in LIVE for t in runs) or needed(runs):
                pending.append(seed)
        got = list(values.values())
        out[source.number] = {"values": values, "run_dirs": dirs, "n": len(got), "pending": pending,
                              "mean": statistics.fmean(got) if got else None,
                              "std": statistics.stdev(got) if len(got) > 1 else None}
    return out


def test_results(sweep: SweepConfig, run_dirs: list[str]) -> dict[str, Any] | None:
    """Each run dir evaluated on `test_file` (kept in its test.json, so a rerun or another worker
    reuses it): the test metric per run, their mean and sample std."""
    if not sweep.test_file or not run_dirs:
        return None
    import json

    from llmcli.evaluate import evaluate

    name = sweep.test_metric or test_metric_of(sweep.metric)
    values = {}
    for run_dir in run_dirs:
        path = Path(run_dir) / "test.json"
        result = json.loads(path.read_text()) if path.is_file() else None
        if result is None or result.get("data") != sweep.test_file:
            cfg = load_config(Path(run_dir) / "config.yaml", [
                param_override("model.model_name_or_path", run_dir), param_override("data.validation_file", sweep.test_file),
                "data.train_file=null", "data.dataset_name=null"])
            console.info(f"evaluating {run_dir} on {sweep.test_file}")
            result = evaluate.run(cfg)
            files.write_json_atomic(path, result)
        metric = result["metrics"].get(name)
        if not isinstance(metric, (int, float)):
            console.warn(f"test_metric '{name}' is not among the test results ({', '.join(k for k, v in result['metrics'].items() if isinstance(v, (int, float)))})")
            return None
        values[run_dir] = float(metric)
    got = list(values.values())
    return {"metric": name, "file": sweep.test_file, "values": values, "mean": statistics.fmean(got),
            "std": statistics.stdev(got) if len(got) > 1 else None}


def test_metric_of(metric: str) -> str:
    name = metric.removeprefix("eval_")
    return "nll" if name == "loss" else name


def mean_std(entry: dict[str, Any] | None) -> str:
    """`0.8131 ± 0.0042 (3)`, as the leaderboard prints a confirmed or test result."""
    if not entry or entry.get("mean") is None:
        return "-"
    std = "" if entry.get("std") is None or math.isnan(entry["std"]) else f" ± {console.format_value(entry['std'])}"
    n = entry.get("n", len(entry.get("values", {})))
    return f"{console.format_value(entry['mean'])}{std} ({n})"
